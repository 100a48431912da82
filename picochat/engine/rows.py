"""The rows of a batch's KV cache, and which tokens each holds — the Batcher's memory of what it computed.

Rows 0..n-1 hold the n sequences being decoded, row n the one being prefilled, and the rest are a prefix
cache: a finished request leaves its keys and values in its row, and a new request takes the free row
whose tokens share the longest prefix with its prompt (a chat's next turn, an agent loop, the same system
prompt), so it computes only the rest. The Batcher decides which row is which; this class moves rows,
finds the best one and forgets what cannot be trusted.
"""
from __future__ import annotations

import time

from ..hw import check_memory
from ..model.gpt import KVCache
from .prefill import common_prefix, reusable_prefix


class RowCache:
    def __init__(self, model, size: int, max_len: int):
        config = model.config
        norm = getattr(model, "norm", None)   # the cache takes the dtype of the model's final norm
        itemsize = norm.weight.element_size() if norm is not None else 4
        check_memory(2 * config.n_layer * size * config.n_kv_head * max_len * config.head_dim * itemsize,
                     f"a KV cache of {size} rows × {max_len} tokens (lower --parallel or --ctx-size)",
                     error=ValueError)
        self.kv = model.new_kv_cache(size, max_len)
        self.size = size
        self.ids: list[list[int]] = [[] for _ in range(size)]   # the tokens each row's cache holds
        self.used = [0.0] * size                                # when each row last served a request

    def rows(self, start: int, stop: int) -> KVCache:
        """Rows [start, stop) as a cache of their own (a view: the model's writes land here)."""
        return self.kv.rows(start, stop)

    def take(self, prompt_ids: list[int], first: int, scoring: bool = False) -> int:
        """Move the free row (first or later) that serves most of `prompt_ids` into row `first` and cut it to
        what the prompt can reuse; returns how many prompt tokens it holds. Among rows that share nothing, the
        one unused longest is taken (the others stay a prefix cache for longer)."""
        free = range(first, self.size)
        shared = {r: common_prefix(self.ids[r], prompt_ids) for r in free}
        row = max(free, key=lambda r: (shared[r], -self.used[r] if shared[r] == 0 else 0))
        self.swap(row, first)
        reuse = reusable_prefix(self.ids[first], prompt_ids, scoring)
        self.kv.lengths[first] = reuse
        del self.ids[first][reuse:]
        return reuse

    def append(self, row: int, tokens: list[int]):
        """Record that the model has fed `tokens` into `row` (their keys and values are now in it)."""
        self.ids[row] += tokens

    def touch(self, row: int):
        """Mark `row` as used now (of the rows that share nothing with a new prompt, `take` gives away the
        one unused longest)."""
        self.used[row] = time.monotonic()

    def swap(self, a: int, b: int):
        """Exchange two rows (their keys, values, lengths and token lists)."""
        if a == b:
            return
        la, lb = len(self.ids[a]), len(self.ids[b])
        for t in (*self.kv.k, *self.kv.v):
            if la and lb:
                keep = t[a, :, :la].clone()
                t[a, :, :lb] = t[b, :, :lb]
                t[b, :, :la] = keep
            elif la:
                t[b, :, :la] = t[a, :, :la]
            elif lb:
                t[a, :, :lb] = t[b, :, :lb]
        lengths = self.kv.lengths
        lengths[a], lengths[b] = lengths[b].clone(), lengths[a].clone()
        self.ids[a], self.ids[b] = self.ids[b], self.ids[a]
        self.used[a], self.used[b] = self.used[b], self.used[a]

    def copy(self, source: int, target: int):
        """Make row `target` hold what row `source` holds (another choice of the same prompt; a target
        used as a cached prefix loses it)."""
        if source == target:
            return
        n = len(self.ids[source])
        for t in (*self.kv.k, *self.kv.v):
            t[target, :, :n] = t[source, :, :n]
        self.kv.lengths[target] = self.kv.lengths[source].clone()
        self.ids[target] = list(self.ids[source])
        self.touch(target)

    def forget(self, row: int):
        """Drop what a row holds (after a failure its keys and values cannot be trusted)."""
        self.ids[row] = []
        self.kv.lengths[row] = 0

    def forget_all(self):
        for row in range(self.size):
            self.forget(row)
