"""`picochat data prepare`: sources -> a trained tokenizer -> token shards, a split and meta.json.

`prepare` turns sources (files, folders, JSONL, named offline corpora: sources.py) into the folder tokens.py
describes. It reads every source twice: pass 1 validates the input, counts it, decides each document's
split and (unless a tokenizer is given) trains the tokenizer; pass 2 tokenizes in worker processes and
writes the shards. Both passes see the same documents in the same order, so the output depends only on
the inputs and settings, never on the number of workers.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import re
import secrets
import shutil
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..tokenizer.bpe import DEFAULT_SPECIAL_TOKENS, ENDOFTEXT, Tokenizer
from .sources import SourceStats, resolve_source
from .tokens import FORMAT, DataError

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


def split_hash(text: str) -> int:
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
                h = split_hash(text)
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
