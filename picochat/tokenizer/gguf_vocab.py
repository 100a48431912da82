"""The tokenizer a GGUF file describes, rebuilt from its metadata as llama.cpp reads it.

Only byte-level BPE ("tokenizer.ggml.model" == "gpt2") is supported, with the word-splitting regex chosen
by "tokenizer.ggml.pre" (pretokenize.py). Control tokens (<|im_start|>) become special tokens; user-defined
ones (<think>) are matched whole in text but decode as ordinary text, as llama.cpp treats them.
"""
from __future__ import annotations

import tokenizers
from tokenizers import AddedToken, decoders, models, processors

from .pretokenize import byte_level_pre_tokenizer, bytes_to_unicode

# tokenizer.ggml.pre -> pre-tokenizer family (names as llama.cpp's llama-vocab.cpp spells them)
GGUF_PRE_TOKENIZERS = {
    **dict.fromkeys(("default", "gpt-2", "gpt2", "phi-2", "roberta-bpe", "mpt", "olmo"), "gpt2"),
    # StarCoder-derived vocabularies: split off every digit, then the GPT-2 regex
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"), "smollm"),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3"), "llama3"),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"), "qwen2"),
}


# GGUF token types (llama.cpp's llama_token_type)
GGUF_TOKEN_NORMAL, GGUF_TOKEN_CONTROL, GGUF_TOKEN_USER_DEFINED = 1, 3, 4


def gguf_tokenizer_settings(meta: dict, source: str = "GGUF metadata") -> dict:
    """Tokenizer(...)'s arguments for a GGUF file's metadata (GGUF key -> plain Python value): the backend and
    the special tokens, chat template, context and end-of-turn tokens. ValueError naming `source` for a
    vocabulary picochat cannot build."""
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"{source}: tokenizer model {model!r} (tokenizer.ggml.model) is not supported; "
                         "picochat supports only 'gpt2' (byte-level BPE)")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in GGUF_PRE_TOKENIZERS:
        raise ValueError(f"{source}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; "
                         f"supported: {', '.join(sorted(GGUF_PRE_TOKENIZERS))}")
    family = GGUF_PRE_TOKENIZERS[pre]
    tokens = meta.get("tokenizer.ggml.tokens")
    merges = meta.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise ValueError(f"{source}: missing tokenizer.ggml.tokens or tokenizer.ggml.merges")
    types = meta.get("tokenizer.ggml.token_type") or [GGUF_TOKEN_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"{source}: {len(tokens)} tokens but {len(types)} token types")
    backend = bpe_backend(tokens, types, merges, family, source)
    bos = token_at(meta, "tokenizer.ggml.bos_token_id", tokens, source)
    # llama.cpp adds BOS by default for Llama 3 vocabularies unless the file says otherwise
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", family == "llama3")) and bos is not None
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[
            (bos, backend.token_to_id(bos))])
    ctx = meta.get(f"{meta.get('general.architecture')}.context_length")
    ends = [token_at(meta, f"tokenizer.ggml.{key}_token_id", tokens, source) for key in ("eot", "eom")]
    return dict(backend=backend, bos_token=bos, eos_token=token_at(meta, "tokenizer.ggml.eos_token_id", tokens, source),
                pad_token=token_at(meta, "tokenizer.ggml.padding_token_id", tokens, source),
                chat_template=meta.get("tokenizer.chat_template"),
                model_max_length=int(ctx) if ctx is not None else None, add_bos_token=add_bos,
                extra_end_of_turn_tokens=[t for t in ends if t is not None])


def bpe_backend(tokens: list[str], types: list[int], merges: list[str], family: str, source: str):
    """A `tokenizers` byte-level BPE over the file's tokens, merges and token types."""
    # Normal tokens are stored spelled in GPT-2's byte alphabet; respell any that are not (rare
    # converter quirk) so that BPE can reach them. Control/user-defined tokens stay verbatim.
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {}
    for i, (token, kind) in enumerate(zip(tokens, types)):
        if kind not in (GGUF_TOKEN_CONTROL, GGUF_TOKEN_USER_DEFINED) and not set(token) <= alphabet:
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, i)  # on duplicate strings the first id wins, as in lookups
    try:
        pairs = [tuple(m.split(" ")) for m in merges]
        # Llama 3 vocabularies look a whole word up before merging (llama.cpp: ignore_merges)
        bpe = models.BPE(vocab=vocab, merges=pairs, ignore_merges=(family == "llama3"))
    except Exception as e:
        raise ValueError(f"{source}: invalid BPE vocabulary or merges ({e})") from e
    backend = tokenizers.Tokenizer(bpe)
    backend.pre_tokenizer = byte_level_pre_tokenizer(family)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, k in zip(tokens, types) if k == GGUF_TOKEN_CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, k in zip(tokens, types) if k == GGUF_TOKEN_USER_DEFINED])
    return backend


def token_at(meta: dict, key: str, tokens: list[str], source: str) -> str | None:
    """The token a metadata key names by id (None when the file has no such key)."""
    i = meta.get(key)
    if i is None:
        return None
    if not 0 <= int(i) < len(tokens):
        raise ValueError(f"{source}: {key} = {i} is outside the vocabulary of {len(tokens)}")
    return tokens[int(i)]
