"""How well a model predicts text: bits per byte on a held-out text.

bits per byte = Σ −log₂ p(token | the tokens before it) / the UTF-8 bytes those tokens spell. Unlike the
loss per token it does not depend on the tokenizer, so differently tokenized (or quantized) models compare.
The training loop reports the same measure on its validation split.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterable

import torch

from .data import _val_hash, iter_documents


@dataclass
class BitsPerByte:
    bits_per_byte: float
    nll_per_token: float        # nats
    tokens: int                 # scored tokens
    bytes: int
    seconds: float


@torch.inference_mode()
def bits_per_byte(model, tokenizer, text: str, window: int = 512, max_tokens: int | None = None) -> BitsPerByte:
    """Score `text` in consecutive windows of `window` tokens (each token predicted from the ones before it in
    its window). max_tokens caps how much of the text is read."""
    t0 = time.perf_counter()
    ids = tokenizer.encode(text)
    if max_tokens:
        ids = ids[:max_tokens]
    window = min(window, model.config.max_seq_len)
    if len(ids) < 2:
        raise ValueError("the evaluation text is too short: it needs at least two tokens")
    token_bytes = torch.from_numpy(tokenizer.token_byte_lengths())
    nll, n, nbytes = 0.0, 0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor([ids[start:start + window + 1]])
        if chunk.shape[1] < 2:
            break
        x, y = chunk[:, :-1], chunk[:, 1:]
        _, loss = model(x, y)  # the model's own loss: the mean −log p over the window's tokens
        nll += loss.item() * y.numel()
        n += y.numel()
        nbytes += int(token_bytes[y[0].clamp(max=len(token_bytes) - 1)].sum())
    return BitsPerByte(nll / (math.log(2) * max(nbytes, 1)), nll / max(n, 1), n, nbytes, time.perf_counter() - t0)


def held_out_text(source: str = "sharegpt", chars: int = 40_000, val_fraction: float = 0.005) -> str:
    """About `chars` characters of held-out text. A file or folder is taken as it is (it is yours, held out by
    you); of a named corpus (sharegpt, python-stdlib, chatterbot) only the documents its hash puts in the
    validation split of `picochat data prepare` (at its default val_fraction), so that a model trained on
    the prepared training split has not seen them."""
    from .data import NAMED_SOURCES
    picked: list[str] = []
    total = 0
    cut = int(val_fraction * 2**64) if source in NAMED_SOURCES else 2**64
    docs: Iterable[str] = iter_documents(source)
    for doc in docs:
        if _val_hash(doc) < cut:
            picked.append(doc)
            total += len(doc)
            if total >= chars:
                break
    if not picked:
        raise ValueError(f"{source}: no held-out documents found")
    return "\n\n".join(picked)[:chars]
