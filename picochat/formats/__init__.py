"""Files in and out, each validated before anything is allocated: Hugging Face folders (hf.py), GGUF files
(gguf_reader.py: the container; gguf.py: the model in it), packed quantized folders (packed.py), PEFT
LoRA adapters (peft.py), BERT sentence-embedding folders (bert.py) and training runs' folders (runs.py)."""
