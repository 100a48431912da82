"""The maths: the decoder-only Transformer (gpt.py: attention and the loss, each written once), its
configuration (config.py: GPT-2, Llama and Qwen2 as switches), LoRA layers (lora.py) and the BERT sentence
encoder behind the knowledge bases (encoder.py). Floor 2: imports only the kernels' floor and below."""
