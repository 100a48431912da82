"""How byte-level BPE vocabularies split text before merging, and the byte alphabet they are spelled in.

A byte-level BPE vocabulary only reproduces its model's ids if text is split into words exactly as when
its merges were learned. These are the splits llama.cpp uses per family (GPT-2, SmolLM/StarCoder,
Llama 3, Qwen2); picochat's own tokenizers are trained with the Llama 3 split.
"""
from __future__ import annotations

from tokenizers import Regex, pre_tokenizers

# Llama 3 / GPT-4 style: case-insensitive contractions, letters with one leading non-letter, numbers
# in groups of up to 3 digits, punctuation runs that swallow trailing newlines, newline runs.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2: the Llama 3 split, but every digit on its own.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

def byte_level_pre_tokenizer(family: str) -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer of one family (gpt2, smollm, llama3, qwen2); all map bytes to GPT-2's alphabet."""
    if family == "gpt2":  # ByteLevel's built-in regex is GPT-2's
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if family == "smollm":  # what SmolLM2's own tokenizer.json does
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    split = {"llama3": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}[family]
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet byte-level BPE vocabularies are spelled in.

    Printable Latin-1 bytes stand for themselves; the other 68 are shifted to U+0100 and up, so that
    e.g. a space is spelled "Ġ" and a newline "Ċ".
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, shifted = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping
