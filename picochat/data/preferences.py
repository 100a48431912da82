"""Preference pairs for DPO: files -> a prompt with a better and a worse reply -> token ids -> batches.

    pairs.jsonl: {"prompt": "..." | "messages": [... ending with a user turn], "chosen": ..., "rejected": ...}
      (chosen / rejected: the reply's text, {"role": "assistant", "content": ...} or a one-message list of it)
      -> each side rendered as the conversation plus its reply, masked as SFT masks it (data/conversations),
         keeping only the final reply's tokens: the earlier turns are the same on both sides
      -> a prepared folder (out_dir/data: meta.json, tokenizer/, ids/mask/offsets .npy per split and side)
      -> PairStream: batches of 2B rows, the B chosen replies first, then their B rejected ones
      -> the training loop, with train/dpo.py's objective
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_write_text
from ..tokenizer.bpe import Tokenizer
from .conversations import (ConversationError, encode_conversation, inputs_and_targets, normalize_conversation,
                            padded)
from .tokens import DataError, read_meta

DPO_FORMAT = "picochat-dpo-v1"
SIDES = ("chosen", "rejected")


@dataclass
class Pair:
    messages: list[dict]        # the conversation, ending with the user's turn the replies answer
    chosen: str
    rejected: str


def _reply_text(value, side: str) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict) and value.get("role", "assistant") == "assistant":
        value = value.get("content")
    if not isinstance(value, str):
        raise ValueError(f"'{side}' must be the reply's text, or an assistant message with string content")
    return value


def normalize_pair(record) -> Pair:
    """A record -> Pair; ValueError naming the field if malformed. Other keys are ignored."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        if not isinstance(record["messages"], list):
            raise ValueError("'messages' must be a list of {\"role\", \"content\"} objects")
        # checked as a conversation with the reply to come (normalize_conversation wants an assistant turn)
        reply_slot = {"role": "assistant", "content": ""}
        messages = normalize_conversation({"messages": record["messages"] + [reply_slot]})[:-1]
    elif isinstance(record.get("prompt"), str):
        messages = [{"role": "user", "content": record["prompt"]}]
    else:
        raise ValueError("no 'prompt' (a string) or 'messages' (a list) field")
    if messages[-1]["role"] != "user":
        raise ValueError("'messages' must end with the user's turn that the two replies answer")
    missing = [side for side in SIDES if side not in record]
    if missing:
        raise ValueError(f"no '{missing[0]}' field")
    chosen, rejected = (_reply_text(record[side], side) for side in SIDES)
    if chosen == rejected:
        raise ValueError("'chosen' and 'rejected' are the same text: nothing to prefer")
    return Pair(messages, chosen, rejected)


def load_pairs(path) -> list[Pair]:
    """Pairs from a .jsonl file; a malformed line raises ConversationError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no preference file at {path} (give a .jsonl file of prompt/chosen/rejected records)")
    pairs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                pairs.append(normalize_pair(json.loads(line)))
            except json.JSONDecodeError as e:
                raise ConversationError(f"{path}:{n}: bad JSON: {e.msg}") from None
            except ValueError as e:
                raise ConversationError(f"{path}:{n}: malformed preference pair: {e}") from None
    if not pairs:
        raise DataError(f"no preference pairs in {path}")
    return pairs


def encode_reply(tokenizer: Tokenizer, messages: list[dict], reply: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) of the conversation with `reply` as its last turn; mask True on that reply's tokens only
    (its text and end-of-turn token, as SFT trains them), not on earlier assistant turns."""
    ids, mask = encode_conversation(tokenizer, messages + [{"role": "assistant", "content": reply}])
    last = np.zeros_like(mask)
    end = len(mask)
    while end > 0 and not mask[end - 1]:
        end -= 1
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    last[start:end] = True
    return ids, last


# ----------------------------------------------------------------------------- the prepared folder
def read_dpo_meta(data_dir) -> dict:
    return read_meta(data_dir, DPO_FORMAT, "prepared preference dataset", "")


def prepare_pairs(pairs: list[Pair], tokenizer: Tokenizer, out, val_fraction: float = 0.1, seed: int = 0,
                  sources: list[str] | None = None) -> dict:
    """Encode pairs and write the folder PairStream reads (held-out pairs in 'val'); returns its meta."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(order) * val_fraction)) if val_fraction > 0 and len(order) > 1 else 0
    splits = {"val": order[:n_val], "train": order[n_val:]} if n_val else {"train": order}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out / "tokenizer")
    pad = next((int(i) for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    meta = {"format": DPO_FORMAT, "seed": seed, "sources": sources or [], "pad_id": pad, "splits": {}}
    for split, indices in splits.items():
        for side in SIDES:
            encoded = [encode_reply(tokenizer, pairs[i].messages, getattr(pairs[i], side)) for i in indices]
            lengths = np.array([len(ids) for ids, _ in encoded], dtype=np.int64)
            np.save(out / f"{split}_{side}_ids.npy", np.concatenate([ids for ids, _ in encoded]))
            np.save(out / f"{split}_{side}_mask.npy", np.concatenate([m for _, m in encoded]))
            np.save(out / f"{split}_{side}_offsets.npy", np.concatenate([[0], np.cumsum(lengths)]))
        meta["splits"][split] = {"pairs": len(indices)}
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=1))
    return meta


def _read_side(d: Path, split: str, side: str) -> list[tuple[np.ndarray, np.ndarray]]:
    ids, mask = np.load(d / f"{split}_{side}_ids.npy"), np.load(d / f"{split}_{side}_mask.npy")
    offsets = np.load(d / f"{split}_{side}_offsets.npy")
    return [(ids[a:b], mask[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]


class PairStream:
    """Batches of preference pairs for the training loop (TokenStream's interface), resumable exactly.

    Each batch is (x, y) of 2·batch_size rows padded to its longest: rows 0..B-1 the chosen replies,
    rows B..2B-1 the rejected ones of the same pairs; y is -100 except on the final reply's tokens. A pair
    either of whose sides is longer than seq_len + 1 tokens is left out (counted in .dropped): cutting it
    would cut the very reply being compared. Pairs are reshuffled each epoch from a fixed seed.
    """

    read_meta = staticmethod(read_dpo_meta)

    def __init__(self, data_dir, split: str, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1):
        meta = read_dpo_meta(data_dir)
        if split not in meta["splits"]:
            raise DataError(f"{data_dir} has no '{split}' split (has: {', '.join(meta['splits'])})")
        d = Path(data_dir)
        chosen, rejected = (_read_side(d, split, side) for side in SIDES)
        fits = [(c, r) for c, r in zip(chosen, rejected) if max(len(c[0]), len(r[0])) <= seq_len + 1]
        self.dropped = len(chosen) - len(fits)
        if not fits:
            raise DataError(f"no pair of the '{split}' split of {data_dir} fits in seq_len + 1 = {seq_len + 1} "
                            f"tokens: raise --seq-len")
        self.pairs, self.pad_id, self.seed = fits, int(meta["pad_id"]), int(meta["seed"])
        self.batch_size, self.rank = batch_size, rank
        self.step_windows = world_size * batch_size
        self.units = max(1, -(-len(fits) // self.step_windows))   # global batches in an epoch
        self.n_windows = self.units * self.step_windows
        self.position, self.epoch = 0, 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.pairs))
        start = self.position * self.step_windows + self.rank * self.batch_size
        picked = [self.pairs[order[(start + i) % len(order)]] for i in range(self.batch_size)]
        # the epoch's last batch is topped up from its start, untrained (all -100): each pair counts once
        counted = [start + i < len(order) for i in range(self.batch_size)] * 2
        rows = [pair[0] for pair in picked] + [pair[1] for pair in picked]
        ids, mask = padded([(row_ids, row_mask & counted[r]) for r, (row_ids, row_mask) in enumerate(rows)],
                           self.pad_id)
        self.position += 1
        if self.position >= self.units:
            self.position, self.epoch = 0, self.epoch + 1
        return inputs_and_targets(ids, mask)

    def state_dict(self) -> dict:
        return {"position": self.position, "epoch": self.epoch}

    def load_state_dict(self, state: dict):
        self.position, self.epoch = int(state["position"]), int(state["epoch"])
