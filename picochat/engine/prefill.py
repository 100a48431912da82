"""The two steps every generation takes before it decodes, shared by Engine and Batcher:

  * how much of its prompt a cache already holds (`reusable_prefix`): the keys and values of a common
    prefix (the chat so far, an agent loop's history, a system prompt) are reused, not computed again;
  * computing the rest, a chunk of tokens per forward pass (`prefill_chunk`), so a long prompt never needs
    (prompt × vocabulary) of memory and a server can decode its other requests between two chunks.
"""
from __future__ import annotations

import torch

from ..model.gpt import KVCache
from .generation import Generation

PREFILL_CHUNK = 256   # prompt tokens per forward pass while prefilling


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens a and b share."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:   # the usual case (a chat's next turn, a draft catching up), compared in C
        return n
    i = 0
    while a[i] == b[i]:
        i += 1
    return i


def reusable_prefix(cached_ids: list[int], prompt_ids: list[int], scoring: bool = False) -> int:
    """How many prompt tokens a cache holding `cached_ids` can serve. At least one prompt token is always
    left to compute (the last position's logits pick the first new token); scoring the prompt needs every
    position's logits, so then none is reused."""
    if scoring:
        return 0
    return min(common_prefix(cached_ids, prompt_ids), len(prompt_ids) - 1)


@torch.inference_mode()
def prefill_chunk(model, gen: Generation, cache: KVCache, fed: int, chunk: int = PREFILL_CHUNK) -> torch.Tensor:
    """Feed the next `chunk` prompt tokens of `gen` after the `fed` its cache (one row) holds; record their
    prompt log-probabilities if asked. Returns the logits: (1, tokens, vocab) when scoring the prompt, else
    (1, 1, vocab) of the last position (what the first new token is sampled from)."""
    scoring = gen.params.prompt_logprobs is not None
    tokens = gen.prompt_ids[fed:fed + chunk]
    logits, _ = model(torch.tensor([tokens]), kv_cache=cache, last_only=not scoring)
    gen.score_prompt(logits[0], fed)
    return logits
