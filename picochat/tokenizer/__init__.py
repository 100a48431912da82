"""Text to tokens and back: byte-level BPE over the `tokenizers` library (bpe.py: load, train, chat
encoding, streaming decode), the word splits of each model family (pretokenize.py), the tokenizer a GGUF
file describes (gguf_vocab.py) and chat templates run as bounded, sandboxed Jinja (chat_template.py)."""
