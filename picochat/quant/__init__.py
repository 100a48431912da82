"""Weights kept as 4- or 8-bit integers: the packed layout (matrix.py), GGUF's blocks read into it exactly
(gguf_blocks.py), the layers that multiply by them on the compiled kernel (layers.py), and what this CPU
is measured to do fastest — precision, integer kernel or dense products (tuning.py)."""
