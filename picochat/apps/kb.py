"""A knowledge base: documents cut into passages, kept in one SQLite file, searched by words and by meaning.

    add(files) → read (documents.py) → passages → embed (encoder.py) → one transaction per document
    search(query) → the share of its words a passage holds (SQLite FTS5's BM25)  ┐
                  → cosine similarity of embeddings                              ┴ → fused → top 10
                  → reranked by each passage's sentence closest to the question → Hits

Two signals because each fails where the other does not: words find exact names, codes and rare terms
("error E42"), embeddings find paraphrases ("where can I leave my car" → the parking passage). They are
fused as 0.4 × cosine + 0.6 × word overlap, where the overlap is the passage's BM25 over the BM25 of a
passage holding each of the question's words once: the share of the question it holds, each word weighted
by how rare it is. (Reciprocal rank fusion, used before, counts a match on a word half the passages hold
("number") as much as one on a rare word, and so in a small knowledge base ranked every passage sharing any
word above the best one by meaning that shares none. On the held-out questions of benchmarks/apps.py's
shop, recall@1 went from 83% to 90% with this fusion, to 95% with the reranking.) The top 10 are then
reranked by the cosine of their sentence closest to the question: a passage of several facts is judged by
the one that answers, not by the average of all it says (a passage's sentences are embedded the first time
it is a candidate, ~0.2 s for ten on 2 cores, and kept in memory). Each Hit also carries its cosine
similarity and its word overlap: absolute measures the caller can threshold on to decide that nothing
relevant is known.

Chinese has no spaces, and FTS5's unicode61 tokenizer reads a run of Han characters as one word, so that
a question never matched a passage. Each passage's Chinese (and Japanese kana) runs are also indexed as
overlapping character bigrams and single characters in a column of their own (`grams`; Lucene's CJK
approach, with the single characters that let 港 in 香港 find 港澳台), and a question's runs are searched
the same way, less function characters (的 了 吗 ...). FTS5's trigram tokenizer cannot match the two-
character words most Chinese questions hinge on (退货, 营业); on the held-out questions of the Chinese
handbook of benchmarks/shop_zh.py the word side alone ranks the right passage first / in the top 3 for
23% / 27% of them with trigrams, 77% / 80% with bigrams, 83% / 100% with bigrams and characters (unicode61
alone: 0%). all-MiniLM-L6-v2 reads most Han characters as [UNK], so its cosine says little about a Chinese
question (37% / 60%): the reranking is skipped for one.

The file runs in WAL mode: readers (a server answering questions) never wait for a writer (`kb add`) and
always see whole documents, because a document's row and all its passages are written in one transaction.
`add` embeds the passages of several files at once (ENCODE_BATCH passages per encoder call: one call per
small file spent most of its time on per-call overhead) before the transaction that writes those files
opens, so the writer holds the lock for milliseconds.

picochat writes only to SQLite files it created (kb_file.py: the mark, checked before anything is written),
and every SQLite error comes out as a KnowledgeBaseError naming the file, the problem and what to do.
"""
from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..paths import cache_dir
from .documents import mostly_chinese, sentences
from .kb_file import (APPLICATION_ID, SCHEMA, EncoderMismatch, KnowledgeBaseError,  # noqa: F401 (kb's API)
                      KnowledgeBaseLocked, ReadOnlyKnowledgeBase, RemovesEverything, refuse_foreign,
                      sqlite_problem, statements)
from .kb_ingest import AddReport, Prepared, cut_into_passages, files_under, read_file
from .reading import MAX_FILE_BYTES
from .terms import index_grams, match_terms, query_terms, quoted

SCHEMA_VERSION = 2          # 2: the `grams` column (Chinese words); a version-1 file is upgraded on opening
BM25_CANDIDATES = 100       # how deep the word ranking goes into the fusion
ALPHA = 0.4                 # the cosine's weight in the fused score, the word overlap's is 1 - ALPHA
RERANK_DEPTH = 10           # fused candidates reranked by their best sentence
RERANK_WEIGHT = 0.7         # the best sentence's cosine in the reranked score, the fused score's 1 - it
SENTENCE_CACHE = 4096       # passages whose sentence vectors are kept between searches
ENCODE_BATCH = 256          # passages (of one or many files) embedded per encoder call by `add`
BUSY_TIMEOUT = 30.0         # seconds to wait for another writer before giving up (KnowledgeBase(timeout=))
NAME = re.compile(r"^[A-Za-z0-9_.-]+$")

@dataclass
class DocumentInfo:
    id: int
    source: str
    title: str
    sha256: str
    added_at: float
    passages: int


@dataclass
class Hit:
    id: int                     # the passage's id
    source: str
    title: str
    section: str
    text: str
    score: float                # what the hits are ordered by (see search)
    similarity: float           # cosine similarity of query and passage, in [-1, 1]
    bm25_rank: int | None       # 1-based rank by words; None when no query word is in the passage
    vector_rank: int            # 1-based rank by similarity
    overlap: float = 0.0        # the share of the query's words in the passage, weighted by rarity, in [0, 1]
    sentence_similarity: float | None = None   # cosine of the query and the passage's closest sentence
                                               # (None where not reranked: a Chinese query)


def kb_path(name: str) -> Path:
    """A knowledge base's file: a name (letters, digits, - _ .) → cache_dir()/kb/NAME.sqlite; a path
    (ending in .sqlite or .db, or with a folder separator in it) → that path."""
    name = str(name)
    if name.endswith((".sqlite", ".db")) or "/" in name or "\\" in name:
        return Path(name).expanduser()
    if not NAME.match(name) or name in (".", ".."):
        raise ValueError(f"knowledge base name {name!r}: use letters, digits, '-', '_' and '.' only, "
                         f"or give a path ending in .sqlite")
    return cache_dir() / "kb" / f"{name}.sqlite"


def _idf(passages: int, holding: int) -> float:
    """FTS5's BM25 weight of a term that `holding` of `passages` passages hold (floored as FTS5 floors it)."""
    idf = float(np.log((passages - holding + 0.5) / (holding + 0.5)))
    return idf if idf > 0 else 1e-6


def _embedding_text(section: str, text: str) -> str:
    # the heading says what a passage is about ("Parking: behind building B"): embed it with the text
    return f"{section}\n{text}" if section else text


class KnowledgeBase:
    """One knowledge base file. Safe to share between threads (one connection, used under a lock); other
    processes and other KnowledgeBase objects on the same file read while one of them writes."""

    def __init__(self, path, encoder=None, timeout: float | None = None):
        """Open (or create) the knowledge base file at `path`; `timeout` is how long to wait for another
        writer's lock, BUSY_TIMEOUT seconds by default. Raises KnowledgeBaseError for a file picochat did not
        create, a folder, a damaged file or one it cannot open, before writing anything to it."""
        self.path = Path(path).expanduser()
        self.timeout = BUSY_TIMEOUT if timeout is None else float(timeout)
        self._encoder = encoder
        self._lock = threading.RLock()
        self._vectors: tuple[str, np.ndarray, np.ndarray] | None = None  # (generation, ids, matrix)
        self._sentences: tuple[str | None, dict[int, np.ndarray]] = (None, {})  # (generation, id → vectors)
        self._root: tuple[str | None, str | None] = (None, None)   # (generation, the documents' root folder)
        refuse_foreign(self.path, self.timeout)   # before sqlite3 writes to it (or switches it to WAL)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None,
                                       check_same_thread=False)
        except sqlite3.Error as e:
            raise sqlite_problem(self.path, e, self.timeout) from None
        try:
            self._db.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            self._create()   # a new file gets its tables and mark in one transaction, before WAL: a reader
            self._db.execute("PRAGMA journal_mode = WAL")   # never sees it non-empty but unmarked
            self._db.execute("PRAGMA synchronous = NORMAL")   # in WAL mode: consistent after a crash
        except sqlite3.Error as e:
            self._db.close()
            raise sqlite_problem(self.path, e, self.timeout) from None
        except BaseException:
            self._db.close()
            raise

    def _create(self):
        """Check the schema version; create the tables and mark the file if it is new (only then take the
        write lock, so that opening a knowledge base never waits for a writer); mark an older picochat's
        file; upgrade an older schema."""
        with self._read():
            version, marked = self._version(), self._marked()
        if version is None:
            with self._write():
                version, marked = self._version(), self._marked()   # another process may have created it
                if version is None:
                    self._db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                    for statement in statements(SCHEMA):   # (executescript would commit our transaction)
                        self._db.execute(statement)
                    self._db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                    self._db.execute("INSERT INTO meta VALUES ('generation', '0')")
                    version = marked = SCHEMA_VERSION
        if version > SCHEMA_VERSION:
            raise KnowledgeBaseError(f"{self.path} was written by a newer picochat "
                                     f"(schema {version}; this one reads {SCHEMA_VERSION})")
        if not marked:
            self._mark()
        if version < SCHEMA_VERSION:
            self._upgrade()

    def _marked(self) -> bool:
        return self._db.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID

    def _mark(self):
        """Mark an older picochat's knowledge base as picochat's (once); one that cannot be written stays
        readable as it is."""
        try:
            with self._write():
                self._db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        except ReadOnlyKnowledgeBase:
            pass

    def _upgrade(self):
        """Schema 1 → 2 in one transaction: the word index gets the `grams` column, filled from the passages
        (no embedding is recomputed); readers meanwhile see the old file whole."""
        try:
            with self._write() as db:
                if self._version() != 1:      # another process upgraded it while we waited for the lock
                    return
                for statement in ("DROP TRIGGER passages_ai", "DROP TRIGGER passages_ad", "DROP TABLE passages_fts",
                                  "ALTER TABLE passages ADD COLUMN grams TEXT NOT NULL DEFAULT ''"):
                    db.execute(statement)
                rows = db.execute("SELECT id, section, text FROM passages").fetchall()
                db.executemany("UPDATE passages SET grams = ? WHERE id = ?",
                               [(index_grams(section, text), pid) for pid, section, text in rows])
                for statement in statements(SCHEMA):   # IF NOT EXISTS: creates the new index and triggers
                    db.execute(statement)
                db.execute("INSERT INTO passages_fts(passages_fts) VALUES ('rebuild')")
                db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
                self._bump(db)
        except ReadOnlyKnowledgeBase as e:
            raise ReadOnlyKnowledgeBase(f"{self.path} has the schema of an older picochat and must be upgraded "
                                        f"(its word index rebuilt), but cannot be written ({e.__cause__}); make "
                                        f"it writable once, or add its documents to a new knowledge base") from None

    def _version(self) -> int | None:
        if self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone() is None:
            return None
        row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            raise KnowledgeBaseError(f"{self.path} is an SQLite file but not a picochat knowledge base")
        return int(row[0])

    # ------------------------------------------------------------------------- plumbing
    def close(self):
        with self._lock:
            self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    class _Transaction:
        def __init__(self, kb, begin):
            self.kb, self.begin = kb, begin

        def __enter__(self):
            self.kb._lock.acquire()
            try:
                self.kb._db.execute(self.begin)
            except sqlite3.Error as e:
                self.kb._lock.release()
                raise self.kb._problem(e) from e
            except BaseException:
                self.kb._lock.release()
                raise
            return self.kb._db

        def __exit__(self, exc_type, exc, traceback):
            try:
                self.kb._end(commit=exc_type is None)
            finally:
                self.kb._lock.release()
            if isinstance(exc, sqlite3.Error):   # a statement inside the transaction failed
                raise self.kb._problem(exc) from exc
            return False

    def _end(self, commit: bool):
        """COMMIT or ROLLBACK the open transaction. A commit that fails (locked, disk full) is rolled back,
        so that nothing of it is written, and raised as a KnowledgeBaseError; a rollback that fails after a
        failed statement is not raised (the statement's own error says more)."""
        try:
            self._db.execute("COMMIT" if commit else "ROLLBACK")
        except sqlite3.Error as e:
            if self._db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
            if commit:
                raise self._problem(e) from e

    def _problem(self, error: sqlite3.Error) -> KnowledgeBaseError:
        return sqlite_problem(self.path, error, self.timeout)

    def _write(self):
        """A write transaction: IMMEDIATE takes the write lock at once (waiting up to busy_timeout)."""
        return self._Transaction(self, "BEGIN IMMEDIATE")

    def _read(self):
        """A read transaction: one snapshot for all its queries, whatever a writer commits meanwhile."""
        return self._Transaction(self, "BEGIN")

    def _meta(self, key: str, default: str | None = None) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    # ------------------------------------------------------------------------- the embedding model
    @property
    def encoder(self):
        """The sentence encoder, loaded on first use (listing documents does not need it)."""
        with self._lock:
            if self._encoder is None:
                from ..load import load_encoder  # here: listing and removing documents need no torch
                self._encoder = load_encoder()
            return self._encoder

    @property
    def encoder_name(self) -> str:
        """The embedding model this knowledge base's vectors come from (or will, while it is empty)."""
        with self._read():
            name = self._meta("embedding_model")
        if name is not None:
            return name
        if self._encoder is not None:
            return self._encoder.name
        from ..hub import DEFAULT_EMBEDDING, EMBEDDING_MODELS  # here: hub imports torch, and the CLI's start
        return EMBEDDING_MODELS[DEFAULT_EMBEDDING].name         # imports this module (through assistant.py)

    def _check_encoder(self, encoder):
        name, dim = self._meta("embedding_model"), self._meta("embedding_dim")
        if name is not None and (name != encoder.name or int(dim) != encoder.dim):
            raise EncoderMismatch(f"{self.path} holds vectors of the embedding model {name} ({dim} dimensions); "
                                  f"they cannot be compared with {encoder.name}'s ({encoder.dim}). Use {name}, "
                                  f"or build a new knowledge base")

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embed texts with this knowledge base's encoder: (n, dim) float32 unit rows."""
        encoder = self.encoder
        with self._read():
            self._check_encoder(encoder)
        return encoder.encode(list(texts))

    # ------------------------------------------------------------------------- settings
    def set_setting(self, key: str, value: str):
        """Store a setting: `persona` (the assistant's system prompt), `handoff` (what to offer when the
        knowledge base has no answer), or any other key the caller uses."""
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)", (str(key), str(value)))

    def setting(self, key: str, default: str | None = None) -> str | None:
        """A stored setting, or `default`."""
        with self._read() as db:
            row = db.execute("SELECT value FROM settings WHERE key = ?", (str(key),)).fetchone()
        return row[0] if row else default

    # ------------------------------------------------------------------------- adding and removing
    def add(self, paths, progress: Callable[[int, int], None] | None = None,
            max_bytes: int = MAX_FILE_BYTES) -> AddReport:
        """Index files and folders (walked for .txt .md .markdown .html .htm .pdf); see AddReport.

        A file whose bytes are unchanged since it was indexed is skipped; a changed one has its passages
        replaced. Files are read and split one by one; their passages are embedded ENCODE_BATCH at a time
        (one encoder call for many small files), and each batch's documents are then written in one
        transaction (a document is never written in part). progress(done, total) is called after each file;
        a file over max_bytes is skipped with a reason (reading.read_bounded)."""
        encoder = self.encoder
        with self._read():
            self._check_encoder(encoder)
        report = AddReport()
        files = files_under(paths, report)
        done, pending, waiting = 0, [], 0      # files finished; files read and their passages, not yet embedded

        def finished(n: int):
            nonlocal done
            for _ in range(n):
                done += 1
                if progress is not None:
                    progress(done, len(files))

        for path in files:
            prepared = self._prepare(path, report, max_bytes)
            if prepared is None:            # unchanged or skipped: already counted in the report
                finished(1)
                continue
            pending.append(prepared)
            waiting += len(prepared.passages)
            if waiting >= ENCODE_BATCH:
                self._store(pending, encoder, report)
                finished(len(pending))
                pending, waiting = [], 0
        if pending:
            self._store(pending, encoder, report)
            finished(len(pending))
        return report

    def _prepare(self, path: Path, report: AddReport, max_bytes: int) -> Prepared | None:
        """A file read and cut into passages, ready to embed; None (counted in the report) when its bytes are
        unchanged since it was indexed, or it cannot be read, or it holds no text."""
        read = read_file(path, report, max_bytes)
        if read is None:
            return None
        source, data, sha = read
        with self._read() as db:
            row = db.execute("SELECT sha256 FROM documents WHERE source = ?", (source,)).fetchone()
        if row is not None and row[0] == sha:
            report.unchanged += 1
            return None
        return cut_into_passages(path, source, data, sha, report)

    def _store(self, prepared: list[Prepared], encoder, report: AddReport):
        """Embed the passages of several files in one encoder call, then write them all in one transaction."""
        texts = [_embedding_text(p.section, p.text) for doc in prepared for p in doc.passages]
        # the slow part, outside any transaction: readers and other writers are not held up by it
        vectors = encoder.encode(texts)
        with self._write() as db:
            self._check_encoder(encoder)   # another writer may have set the model meanwhile
            db.execute("INSERT OR IGNORE INTO meta VALUES ('embedding_model', ?)", (encoder.name,))
            db.execute("INSERT OR IGNORE INTO meta VALUES ('embedding_dim', ?)", (str(encoder.dim),))
            at, replaced = 0, []
            for doc in prepared:
                replaced.append(self._write_document(db, doc, vectors[at:at + len(doc.passages)]))
                at += len(doc.passages)
            self._bump(db)
        report.updated += sum(replaced)             # counted once committed
        report.added += len(replaced) - sum(replaced)
        report.passages += len(texts)

    def _write_document(self, db, doc: Prepared, vectors: np.ndarray) -> bool:
        """Insert a document and its passages, or replace those of the same source; whether it replaced."""
        old = db.execute("SELECT id FROM documents WHERE source = ?", (doc.source,)).fetchone()
        if old is not None:
            doc_id = old[0]
            db.execute("DELETE FROM passages WHERE document_id = ?", (doc_id,))
            db.execute("UPDATE documents SET sha256 = ?, title = ?, added_at = ?, passages = ? WHERE id = ?",
                       (doc.sha, doc.title, time.time(), len(doc.passages), doc_id))
        else:
            doc_id = db.execute("INSERT INTO documents (source, sha256, title, added_at, passages) "
                                "VALUES (?, ?, ?, ?, ?)",
                                (doc.source, doc.sha, doc.title, time.time(), len(doc.passages))).lastrowid
        db.executemany("INSERT INTO passages (document_id, ord, section, text, start, vector, grams) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)",
                       [(doc_id, i, p.section, p.text, p.start, vectors[i].astype(np.float32).tobytes(),
                         index_grams(p.section, p.text)) for i, p in enumerate(doc.passages)])
        return old is not None

    def _bump(self, db):
        """Count a change, so that every reader's cached vectors know to reload."""
        db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")

    def _delete(self, db, doc_id: int):
        db.execute("DELETE FROM passages WHERE document_id = ?", (doc_id,))
        db.execute("DELETE FROM documents WHERE id = ?", (doc_id,))

    def remove(self, source, everything: bool = False) -> bool:
        """Forget a document (by its path, which need not exist any more), or every document under a folder.
        Whether anything was removed.

        Raises KnowledgeBaseError for an empty path (an unset shell variable: it would resolve to the
        current folder), and RemovesEverything for a folder that holds every document (".", "/", the folder
        of them all) unless everything=True: emptying a knowledge base must be asked for."""
        if not str(source).strip():
            raise KnowledgeBaseError("an empty path names no document (an unset shell variable?); give the file "
                                     "or folder to remove")
        path = os.path.realpath(Path(source).expanduser())   # not resolve(): it raises on a link loop
        folder = path.rstrip("/") + "/"
        with self._write() as db:
            exact = db.execute("SELECT id FROM documents WHERE source = ? OR source = ?",
                               (path, str(source))).fetchall()
            under = db.execute("SELECT id FROM documents WHERE substr(source, 1, ?) = ?",
                               (len(folder), folder)).fetchall()
            ids = {row[0] for row in exact + under}
            total = db.execute("SELECT COUNT(*) FROM documents").fetchone()[0]
            if under and len(ids) == total and not everything:
                raise RemovesEverything(f"{str(source)!r} is the folder {folder}, which holds all {total} "
                                        f"documents of {self.path}")
            for doc_id in ids:
                self._delete(db, doc_id)
            if ids:
                self._bump(db)
        return bool(ids)

    def remove_all(self) -> int:
        """Forget every document (the settings and the embedding model stay); how many there were."""
        with self._write() as db:
            total = db.execute("SELECT COUNT(*) FROM documents").fetchone()[0]
            db.execute("DELETE FROM passages")
            db.execute("DELETE FROM documents")
            if total:
                self._bump(db)
        return total

    def sync(self) -> list[str]:
        """Remove the documents whose files are gone; the sources removed."""
        gone = [d.source for d in self.documents() if not Path(d.source).is_file()]
        for source in gone:
            self.remove(source)
        return gone

    def root(self) -> str | None:
        """The folder all documents are under (their deepest common folder), for showing sources without
        the machine's own paths; None when there are no documents or their only common folder is the
        filesystem's root. Cached until a writer changes the knowledge base."""
        with self._read() as db:
            generation = self._meta("generation")
            if self._root[0] == generation:
                return self._root[1]
            folders = [str(Path(row[0]).parent) for row in db.execute("SELECT DISTINCT source FROM documents")]
        try:
            common = Path(os.path.commonpath(folders)) if folders else None
        except ValueError:              # Windows: sources on different drives
            common = None
        root = str(common) if common is not None and common != Path(common.anchor) else None
        with self._lock:
            self._root = (generation, root)
        return root

    def documents(self) -> list[DocumentInfo]:
        """The documents indexed, by source path."""
        with self._read() as db:
            rows = db.execute("SELECT id, source, title, sha256, added_at, passages FROM documents "
                              "ORDER BY source").fetchall()
        return [DocumentInfo(*r) for r in rows]

    # ------------------------------------------------------------------------- searching
    def _matrix(self, db) -> tuple[np.ndarray, np.ndarray]:
        """Passage ids and their vectors as one matrix, cached until a writer changes the knowledge base."""
        generation = self._meta("generation")
        if self._vectors is None or self._vectors[0] != generation:
            rows = db.execute("SELECT id, vector FROM passages ORDER BY id").fetchall()
            dim = int(self._meta("embedding_dim", "0"))
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            matrix = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim)
            self._vectors = (generation, ids, matrix)
        return self._vectors[1], self._vectors[2]

    def search(self, query: str, k: int = 5) -> list[Hit]:
        """The k passages that best answer `query`, best first (see the module's docstring)."""
        terms = query_terms(query)
        if not terms or k < 1:
            return []
        encoder = self.encoder
        with self._read():
            self._check_encoder(encoder)
        q = encoder.encode([query])[0]      # before the read transaction: it is the slow part
        with self._read() as db:
            ids, matrix = self._matrix(db)
            if len(ids) == 0:
                return []
            similarity = matrix @ q
            vector_rank = np.empty(len(ids), dtype=np.int64)
            vector_rank[np.argsort(-similarity, kind="stable")] = np.arange(1, len(ids) + 1)
            overlap, bm25_rank = self._words(db, terms, ids)
            score = ALPHA * similarity + (1 - ALPHA) * overlap
            hits = []
            for i in np.argsort(-score, kind="stable")[:max(k, RERANK_DEPTH)]:
                pid = int(ids[i])
                source, title, section, text = db.execute(
                    "SELECT d.source, d.title, p.section, p.text FROM passages p JOIN documents d "
                    "ON d.id = p.document_id WHERE p.id = ?", (pid,)).fetchone()
                hits.append(Hit(pid, source, title, section, text, float(score[i]), float(similarity[i]),
                                bm25_rank.get(pid), int(vector_rank[i]), float(overlap[i])))
            generation = self._meta("generation")
        if not mostly_chinese(query):   # all-MiniLM-L6-v2 reads Chinese mostly as [UNK]: its cosine says little
            hits = self._rerank(hits, q, generation)
        return hits[:k]

    def _words(self, db, terms: list[str], ids: np.ndarray) -> tuple[np.ndarray, dict[int, int]]:
        """The word side: each passage's overlap with the query (aligned with ids; BM25 over the BM25 of a
        passage that holds each query term once, of average length: Σ idf) and the BM25 ranks by id."""
        weight = 0.0
        for term in terms:   # FTS5 does not tell a term's document frequency: one count per term
            holding = db.execute("SELECT count(*) FROM passages_fts WHERE passages_fts MATCH ?",
                                 (quoted(term),)).fetchone()[0]
            weight += _idf(len(ids), holding)
        rows = db.execute("SELECT rowid, -bm25(passages_fts) FROM passages_fts WHERE passages_fts MATCH ? "
                          "ORDER BY bm25(passages_fts) LIMIT ?",
                          (match_terms(terms), BM25_CANDIDATES)).fetchall()
        position = {int(pid): i for i, pid in enumerate(ids)}
        overlap, bm25_rank = np.zeros(len(ids)), {}
        for rank, (pid, bm25) in enumerate(rows, 1):
            if pid in position:
                bm25_rank[pid] = rank
                overlap[position[pid]] = min(1.0, bm25 / weight)
        return overlap, bm25_rank

    def _rerank(self, hits: list[Hit], q: np.ndarray, generation: str) -> list[Hit]:
        """The hits ordered by their sentence closest to the query (or the whole passage, if closer); the
        fused score is kept in as a tie-break between passages that answer alike."""
        for hit, vectors in zip(hits, self._sentence_vectors(hits, generation)):
            best = float((vectors @ q).max()) if len(vectors) else hit.similarity
            hit.sentence_similarity = max(hit.similarity, best)
            hit.score = RERANK_WEIGHT * hit.sentence_similarity + (1 - RERANK_WEIGHT) * hit.score
        return sorted(hits, key=lambda h: -h.score)

    def _sentence_vectors(self, hits: list[Hit], generation: str) -> list[np.ndarray]:
        """Each hit's sentences embedded, kept (for SENTENCE_CACHE passages) until the knowledge base changes:
        the same passages come back for question after question."""
        with self._lock:
            if self._sentences[0] != generation or len(self._sentences[1]) > SENTENCE_CACHE:
                self._sentences = (generation, {})
            cache = self._sentences[1]
            missing = [h for h in hits if h.id not in cache]
        split = [sentences(h.text) for h in missing]
        flat = [s for parts in split for s in parts]   # bare: with the heading prefixed, recall@1 was lower
        vectors = self.encoder.encode(flat) if flat else np.zeros((0, 0), dtype=np.float32)
        with self._lock:
            at = 0
            for h, parts in zip(missing, split):
                cache[h.id] = vectors[at:at + len(parts)]
                at += len(parts)
            return [cache[h.id] for h in hits]


