"""`picochat data prepare`: sources -> a trained tokenizer -> token shards, a split and meta.json.

`prepare` turns sources (files, folders, JSONL, named offline corpora: sources.py) into the folder tokens.py
describes. It reads every source twice: pass 1 validates the input, counts it, decides each document's
split by a hash of its text and (unless a tokenizer is given) trains the tokenizer; pass 2 tokenizes in
worker processes and writes the shards. When the hashed split leaves validation fewer than min_val_tokens
tokens (a small corpus whose validation is one short document), `top_up_validation` gives it more and
pass 2 runs once more. Every pass sees the same documents in the same order, so the output depends only
on the inputs and settings, never on the number of workers.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import re
import secrets
import shutil
from array import array
from collections import deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..tokenizer.bpe import DEFAULT_SPECIAL_TOKENS, ENDOFTEXT, Tokenizer
from .sources import SourceStats, resolve_source
from .tokens import FORMAT, DataError

SPLITS = ("train", "val")  # in this order: a document's is_val flag (0 or 1) indexes it

# A top-up gives validation at most this share of the corpus's tokens: a small corpus keeps nine tenths of
# itself for training, and a top-up never leaves training with less than validation takes.
MAX_TOP_UP_SHARE = 0.1


@dataclass
class PrepareConfig:
    """Settings for `prepare`. Caps (max_chars, max_documents) apply to each source separately."""
    sources: list[str]
    out: str | os.PathLike
    vocab_size: int = 8192                # for a trained tokenizer (an upper bound for tiny corpora)
    tokenizer: str | os.PathLike | None = None  # use this tokenizer (folder, tokenizer.json, model or
                                          # dataset folder) instead of training one
    val_fraction: float = 0.005           # share of documents for validation (at least one document)
    # Validation gets at least this many tokens (topped up from training, at most MAX_TOP_UP_SHARE of the
    # corpus; 0: never topped up). 16 × 512 + 1 is one evaluation batch of the `small` preset (two of
    # `demo`'s 16 × 256), the presets a CPU runs: their validation then reads whole batches even when a
    # small corpus's hashed split gives validation a single short document.
    min_val_tokens: int = 16 * 512 + 1
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
    if cfg.min_val_tokens < 0:
        raise DataError(f"min_val_tokens must not be negative, got {cfg.min_val_tokens}")
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


@dataclass
class _Encoded:
    """A chunk of documents tokenized: what each split gets (index 0 train, 1 val), every document led by the
    boundary id, and each input document's token count (its boundary included)."""
    ids: tuple[np.ndarray, np.ndarray]
    documents: tuple[int, int]
    chars: tuple[int, int]
    lengths: np.ndarray           # uint32: 4 bytes a document are kept for the whole corpus


class _ChunkEncoder:
    """Tokenizes a chunk of documents into one id array per split, each document led by the boundary id."""

    def __init__(self, tokenizer_json: str, boundary_id: int, dtype: np.dtype):
        import tokenizers
        self.backend = tokenizers.Tokenizer.from_str(tokenizer_json)
        # document text is only text: "<|endoftext|>" written inside a document must not become a boundary
        self.backend.encode_special_tokens = True
        self.boundary_id, self.dtype = boundary_id, dtype

    def __call__(self, work: tuple[list[str], bytes, tuple[int, int] | None]) -> _Encoded:
        texts, is_val, cut = work
        parts: tuple[list, list] = ([], [])
        documents, chars = [0, 0], [0, 0]
        lengths = np.empty(len(texts), dtype=np.uint32)
        for i, (text, encoding) in enumerate(zip(texts, self.backend.encode_batch(texts, add_special_tokens=False))):
            ids = np.array([self.boundary_id, *encoding.ids], dtype=self.dtype)
            lengths[i] = len(ids)
            pieces = self._cut(text, encoding, ids, cut[1]) if cut and cut[0] == i else [(is_val[i], ids, len(text))]
            for split, piece, n_chars in pieces:
                parts[split].append(piece)
                documents[split] += 1
                chars[split] += n_chars
        ids = tuple(np.concatenate(p) if p else np.empty(0, self.dtype) for p in parts)
        return _Encoded(ids, tuple(documents), tuple(chars), lengths)

    @staticmethod
    def _cut(text: str, encoding, ids: np.ndarray, tail: int) -> list[tuple[int, np.ndarray, int]]:
        """A document's beginning for training and its last `tail` tokens for validation, led there by a
        boundary token of their own: (split, ids, characters) of the two pieces."""
        head = min(max(len(ids) - tail, 2), len(ids) - 1)  # (a document that changed since it was counted
        at = encoding.offsets[head - 1][0]                   # still splits: the caller notices the change)
        return [(0, ids[:head], at), (1, np.concatenate([ids[:1], ids[head:]]), len(text) - at)]


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


def _chunks(docs: Iterable[str], plan: SplitPlan, max_chars: int = 1 << 20, max_docs: int = 1024):
    """Work units of about a megabyte of text, with its size: ((texts, their splits, the cut among them:
    (index, tokens) or None), characters)."""
    texts, start, size = [], 0, 0
    for i, text in enumerate(docs):
        texts.append(text)
        size += len(text)
        if size >= max_chars or len(texts) >= max_docs:
            yield plan.work(texts, start), size
            texts, start, size = [], i + 1, 0
    if texts:
        yield plan.work(texts, start), size


def _encoded(chunks, workers: int, encoder_args: tuple) -> Iterator[tuple[_Encoded, int]]:
    """(encoded chunk, its characters) for each chunk, in order: here with one worker, else in a pool."""
    if workers == 1:
        encode = _ChunkEncoder(*encoder_args)
        for work, size in chunks:
            yield encode(work), size
        return
    with _worker_pool(workers, encoder_args) as pool:
        pending = deque()  # results come back in order; a bounded queue keeps memory bounded
        for work, size in chunks:
            pending.append((pool.apply_async(_encode_in_worker, (work,)), size))
            if len(pending) >= 2 * workers:
                result, done = pending.popleft()
                yield result.get(), done
        while pending:
            result, done = pending.popleft()
            yield result.get(), done


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
    out = _check_config(cfg)
    opened = [resolve_source(s, cfg.jsonl_field) for s in cfg.sources]
    tok = _load_tokenizer(cfg.tokenizer) if cfg.tokenizer is not None else None
    scan, tok = _first_pass(opened, cfg, tok, progress)
    boundary = _boundary_token(tok)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()  # (not tempfile.mkdtemp: its 0700 permissions would stay on the dataset)
    try:
        tok.save(tmp / "tokenizer")
        encoder_args = (tok.backend.to_str(), tok.token_to_id(boundary), token_dtype(tok.vocab_size))
        job = _Tokenizing(opened, cfg, tmp, encoder_args, sum(s.chars for s in scan.stats), progress)
        written, top_up = _write_splits(job, scan)
        meta = _meta(cfg, tok, boundary, scan, written, top_up)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


# ----------------------------------------------------------------------------- pass 1: read, split, train
@dataclass
class Scan:
    """What pass 1 found: each source's counts, and each document's split hash and split, in input order."""
    stats: list[SourceStats]
    hashes: array = field(default_factory=lambda: array("Q"))
    is_val: bytearray = field(default_factory=bytearray)

    @property
    def documents(self) -> int:
        return len(self.is_val)


def _first_pass(opened, cfg: PrepareConfig, tok: Tokenizer | None, progress: bool) -> tuple[Scan, Tokenizer]:
    """Read and check every document, decide its split by its hash, and train the tokenizer (on the
    training documents only) unless one was given."""
    reading = _Pass(opened, cfg)
    scan = Scan(reading.stats)
    training_documents = _hash_documents(reading, scan, int(cfg.val_fraction * 2**64), progress)
    if tok is None:
        tok = _train_tokenizer(training_documents, reading, scan, cfg, progress)
    else:
        for _ in training_documents:
            pass
    _check_splits(scan, cfg.val_fraction)
    return scan, tok


def _hash_documents(reading: _Pass, scan: Scan, val_cut: int, progress: bool) -> Iterator[str]:
    """The training documents of `reading`; every document's hash and split go into `scan` on the way."""
    from tqdm import tqdm
    with tqdm(desc="reading", unit=" docs", disable=not progress) as bar:
        for text in reading:
            h = split_hash(text)
            scan.hashes.append(h)
            scan.is_val.append(h < val_cut)
            bar.update()
            if h >= val_cut:
                yield text


def _train_tokenizer(documents: Iterator[str], reading: _Pass, scan: Scan, cfg: PrepareConfig,
                     progress: bool) -> Tokenizer:
    try:
        return Tokenizer.train(documents, vocab_size=cfg.vocab_size, special_tokens=DEFAULT_SPECIAL_TOKENS,
                               show_progress=progress)
    except DataError:
        raise
    except ValueError as e:  # a vocabulary too small, or no training text
        if reading.done:
            _check_splits(scan, cfg.val_fraction)  # says better why there was no text
        raise DataError(f"cannot train the tokenizer: {e}") from None


def _check_splits(scan: Scan, val_fraction: float):
    """Refuse a corpus that cannot be split in two; with no hash under the cut, the lowest goes to validation."""
    if scan.documents == 0:
        raise DataError(f"empty corpus: no documents with text in {_empty_corpus_message(scan.stats)}")
    if not any(scan.is_val):  # (that document was seen by the tokenizer: only tiny corpora get here)
        scan.is_val[int(np.argmin(np.frombuffer(scan.hashes, dtype=np.uint64)))] = True  # the first lowest
    if scan.documents == 1:
        raise DataError("only 1 document: need at least 2, one of them for validation")
    if all(scan.is_val):
        raise DataError(f"val_fraction {val_fraction} left no training documents (of {scan.documents})")


# ----------------------------------------------------------------------------- pass 2: tokenize, write
@dataclass
class SplitPlan:
    """Where pass 2 puts each document: is_val[i] in input order, and at most one training document whose
    last cut_tokens tokens go to validation instead, as a document of their own."""
    is_val: bytearray
    cut_document: int | None = None
    cut_tokens: int = 0

    def work(self, texts: list[str], start: int) -> tuple[list[str], bytes, tuple[int, int] | None]:
        """The documents start, start + 1, ... as _ChunkEncoder takes them: (texts, splits, cut or None)."""
        cut = None
        if self.cut_document is not None and start <= self.cut_document < start + len(texts):
            cut = (self.cut_document - start, self.cut_tokens)
        return texts, bytes(self.is_val[start:start + len(texts)]), cut


@dataclass
class _Tokenizing:
    """What pass 2 needs besides the split: the sources, the tokenizer as its workers get it, where to write."""
    opened: list
    cfg: PrepareConfig
    folder: Path
    encoder_args: tuple           # _ChunkEncoder's: (tokenizer JSON, boundary id, dtype)
    chars: int                    # of the whole corpus: the progress bar's total
    progress: bool


@dataclass
class Written:
    """Pass 2's shards, by split, and each input document's token count (its boundary included)."""
    splits: dict[str, _ShardWriter]
    doc_tokens: np.ndarray


def _write_splits(job: _Tokenizing, scan: Scan) -> tuple[Written, TopUp]:
    """The shards of the hashed split; written again, topped up, when they give validation too little."""
    written = _second_pass(job, SplitPlan(bytearray(scan.is_val)), scan.documents)
    plan, top_up = top_up_validation(scan, written.doc_tokens, job.cfg.min_val_tokens)
    if plan.is_val == scan.is_val and plan.cut_document is None:
        return written, top_up
    for writer in written.splits.values():
        for name in writer.shards:
            (job.folder / name).unlink()
    again = _second_pass(job, plan, scan.documents, "tokenizing again (validation topped up)")
    if not np.array_equal(again.doc_tokens, written.doc_tokens):
        raise DataError("the sources changed while being read (a document's tokens differ between two readings)")
    return again, top_up


def _second_pass(job: _Tokenizing, plan: SplitPlan, documents: int, desc: str = "tokenizing") -> Written:
    """Tokenize every document (in worker processes) into the shards of the split `plan` gives it."""
    from tqdm import tqdm
    writers = {split: _ShardWriter(job.folder, split, job.encoder_args[2], job.cfg.shard_tokens) for split in SPLITS}
    reading, lengths = _Pass(job.opened, job.cfg), []
    chunks = _chunks(reading, plan)
    with tqdm(total=job.chars, desc=desc, unit=" chars", unit_scale=True, disable=not job.progress) as bar:
        for encoded, size in _encoded(chunks, job.cfg.workers or _available_cores(), job.encoder_args):
            for i, split in enumerate(SPLITS):
                writers[split].write(encoded.ids[i])
                writers[split].documents += encoded.documents[i]
                writers[split].chars += encoded.chars[i]
            lengths.append(encoded.lengths)
            bar.update(size)
    for w in writers.values():
        w.close()
    if reading.documents != documents:
        raise DataError(f"the sources changed while being read ({documents} then {reading.documents} documents)")
    return Written(writers, np.concatenate(lengths))


# ----------------------------------------------------------------------------- validation's top-up
@dataclass
class TopUp:
    """How validation was topped up beyond its hashed split: meta.json's "val_top_up"."""
    min_val_tokens: int
    max_share: float                # of the corpus's tokens, the most a top-up gives validation:
    cap_tokens: int                 # this many
    hashed_val_tokens: int          # what the hashed split (val_fraction) gave validation
    moved_documents: int = 0        # whole training documents moved to validation
    moved_tokens: int = 0
    cut_document: dict | None = None  # the document whose end went to validation: source, document, tokens


def top_up_validation(scan: Scan, doc_tokens: np.ndarray, min_val_tokens: int) -> tuple[SplitPlan, TopUp]:
    """The split with validation topped up to min_val_tokens, or to MAX_TOP_UP_SHARE of the corpus if less.

    It continues the hashed split: the training documents with the next-lowest hashes move whole (exact
    duplicates together, as they share a hash) while validation stays within the cap; the first that
    would pass it is cut instead, its end going to validation. The same corpus gives the same split.
    """
    is_val = np.frombuffer(scan.is_val, dtype=np.uint8).astype(bool)
    val_tokens = int(doc_tokens[is_val].sum())
    cap = int(MAX_TOP_UP_SHARE * int(doc_tokens.sum()))
    plan, record = SplitPlan(bytearray(scan.is_val)), TopUp(min_val_tokens, MAX_TOP_UP_SHARE, cap, val_tokens)
    target = min(min_val_tokens, cap)
    if val_tokens >= target:
        return plan, record
    hashes = np.frombuffer(scan.hashes, dtype=np.uint64)
    training = np.flatnonzero(~is_val)
    in_hash_order = training[np.argsort(hashes[training], kind="stable")].tolist()
    for _, same_text in groupby(in_hash_order, key=hashes.__getitem__):
        group = list(same_text)
        tokens = int(doc_tokens[group].sum())
        if val_tokens + tokens > cap:
            _cut_into_validation(plan, record, group[0], int(doc_tokens[group[0]]), target - val_tokens, scan.stats)
            break
        for i in group:
            plan.is_val[i] = 1
        val_tokens += tokens
        record.moved_documents += len(group)
        record.moved_tokens += tokens
        if val_tokens >= target:
            break
    return plan, record


def _cut_into_validation(plan: SplitPlan, record: TopUp, document: int, tokens: int, missing: int,
                         stats: list[SourceStats]):
    """Plan `missing` more validation tokens from the end of a training document of `tokens` tokens: its
    last missing - 1 (at least 1) behind a boundary token; the document keeps its boundary and one token."""
    tail = min(max(missing - 1, 1), tokens - 2)
    if tail < 1:
        return
    plan.cut_document, plan.cut_tokens = document, tail
    source, index = _source_of(stats, document)
    record.cut_document = {"source": source, "document": index, "tokens_moved": tail, "tokens_kept": tokens - tail}


def _source_of(stats: list[SourceStats], document: int) -> tuple[str, int]:
    """(source name, the document's index among that source's documents) of a document in input order."""
    for s in stats:
        if document < s.documents:
            return s.name, document
        document -= s.documents
    raise IndexError(document)


# ----------------------------------------------------------------------------- meta.json
def _meta(cfg: PrepareConfig, tok: Tokenizer, boundary: str, scan: Scan, written: Written, top_up: TopUp) -> dict:
    folder = written.splits["train"].folder
    return {
        "format": FORMAT,
        "dtype": token_dtype(tok.vocab_size).name,
        "vocab_size": tok.vocab_size,
        "boundary_token": boundary,
        "boundary_token_id": tok.token_to_id(boundary),
        "tokenizer": "tokenizer",
        "tokenizer_sha256": hashlib.sha256((folder / "tokenizer" / "tokenizer.json").read_bytes()).hexdigest(),
        "tokenizer_source": (str(Path(cfg.tokenizer).absolute()) if cfg.tokenizer is not None
                             else f"trained here (byte-level BPE, vocab_size {cfg.vocab_size} asked)"),
        "settings": {"val_fraction": cfg.val_fraction, "min_val_tokens": cfg.min_val_tokens,
                     "min_chars": cfg.min_chars, "max_chars": cfg.max_chars, "max_documents": cfg.max_documents,
                     "shard_tokens": cfg.shard_tokens, "jsonl_field": cfg.jsonl_field},
        "documents": scan.documents,
        "chars": sum(s.chars for s in scan.stats),
        "sources": [s.to_dict() for s in scan.stats],
        "splits": {split: {"shards": w.shards, "documents": w.documents, "tokens": w.tokens, "chars": w.chars}
                   for split, w in written.splits.items()},
        "val_top_up": asdict(top_up),
    }
