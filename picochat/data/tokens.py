"""Training data: a prepared dataset folder -> batches for the training loop.

A prepared dataset (prepare.py writes it from sources.py's corpora) is a folder:

    meta.json          format, dtype, boundary token id, tokenizer hash, sources, per-split shards and counts
    tokenizer/         the tokenizer the ids belong to (tokenizer.json, tokenizer_config.json)
    train_000.bin ...  token ids, raw little-endian uint16 (vocab <= 65536) or uint32, memory-mappable;
    val_000.bin ...    every document starts with the boundary token (<|endoftext|>)

TokenStream reads one split as a single long sequence of ids and cuts it into (input, target) batches.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

FORMAT = "picochat-tokens-v1"


class DataError(ValueError):
    """A dataset folder or corpus that cannot be used; the message names the file and the problem."""


class SplitTooSmall(DataError):
    """A split with fewer windows than one step takes; `tokens` is how many tokens it has (a caller may
    read it in smaller batches instead)."""

    def __init__(self, message: str, tokens: int):
        super().__init__(message)
        self.tokens = tokens


class DataWarning(UserWarning):
    """Training goes on with less than asked of the data: validation in smaller batches, or none."""


def _coprime_stride(n: int) -> int:
    """A large step that is coprime to n, so g -> g·stride mod n visits every window once per epoch."""
    stride = int(n * 0.6180339887) | 1  # near n/φ: neighbouring g land far apart
    while math.gcd(stride, n) != 1:
        stride += 2
    return stride % n or 1


def read_meta(data_dir, expected: str = FORMAT, what: str = "prepared dataset",
              hint: str = ": run `picochat data prepare` first") -> dict:
    """The meta.json of a prepared folder, checked to be of the `expected` format."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise DataError(f"{data_dir} is not a {what} (no meta.json){hint}")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from None
    if meta.get("format") != expected:
        raise DataError(f"{path}: unknown dataset format {meta.get('format')!r} (expected {expected})")
    return meta


class TokenStream:
    """Batches of seq_len-token windows from one split, in a fixed shuffled order, resumable exactly.

    The split's shards are one virtual array cut into windows of seq_len tokens (plus the one token
    after, for the targets). Window g of the run is window perm(g) of the split, where perm is a fixed
    affine permutation — so a batch mixes text from all over the corpus (consecutive windows of one long
    document would make every batch nearly one document) without storing an index. A global step takes
    world_size × batch_size windows; rank r gets rows [r·batch_size, (r+1)·batch_size), so N processes
    together read exactly what one process with N× the batch reads. After every window has been used
    the next epoch starts. `state_dict()` / `load_state_dict()` capture the position.
    """

    def __init__(self, data_dir, split: str, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1):
        meta = read_meta(data_dir)
        if split not in meta["splits"]:
            raise DataError(f"{data_dir} has no '{split}' split (has: {', '.join(meta['splits'])})")
        dtype = np.dtype(meta["dtype"])
        self.shards = [np.memmap(Path(data_dir) / name, dtype=dtype, mode="r")
                       for name in meta["splits"][split]["shards"]]
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])
        self.n_tokens = int(self.offsets[-1])
        self.batch_size, self.seq_len, self.rank, self.world_size = batch_size, seq_len, rank, world_size
        self.step_windows = world_size * batch_size
        self.n_windows = (self.n_tokens - 1) // seq_len
        if self.n_windows < self.step_windows:
            raise SplitTooSmall(f"the '{split}' split of {data_dir} has {self.n_tokens:,} tokens, fewer than one "
                                f"step needs ({world_size} × {batch_size} × {seq_len} + 1): use a smaller batch or "
                                f"more data", self.n_tokens)
        self.stride = _coprime_stride(self.n_windows)
        self.position, self.epoch = 0, 0   # windows consumed in this epoch (all ranks together)

    def _read(self, start: int, length: int) -> np.ndarray:
        """`length` tokens from virtual position `start` (which may span shards)."""
        out, filled = np.empty(length, dtype=np.int64), 0
        while filled < length:
            pos = start + filled
            shard = int(np.searchsorted(self.offsets, pos, side="right") - 1)
            local = pos - self.offsets[shard]
            take = min(length - filled, len(self.shards[shard]) - local)
            out[filled:filled + take] = self.shards[shard][local:local + take]
            filled += take
        return out

    def window(self, g: int) -> int:
        """Which window of the split the g-th window of an epoch is."""
        return (g * self.stride + self.epoch) % self.n_windows

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), each (batch_size, seq_len) int64; y is x shifted by one token."""
        T, first = self.seq_len, self.position + self.rank * self.batch_size
        rows = [self._read(self.window(first + i) * T, T + 1) for i in range(self.batch_size)]
        buf = torch.from_numpy(np.stack(rows))
        self.position += self.step_windows
        if self.position + self.step_windows > self.n_windows:  # the next step would repeat windows
            self.position, self.epoch = 0, self.epoch + 1
        return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()

    def state_dict(self) -> dict:
        return {"position": self.position, "epoch": self.epoch}

    def load_state_dict(self, state: dict):
        self.position, self.epoch = int(state["position"]), int(state["epoch"])


