"""A knowledge base: documents cut into passages, kept in one SQLite file, searched by words and by meaning.

    add(files) → read (documents.py) → passages → embed (encoder.py) → one transaction per document
    search(query) → BM25 over the words (SQLite FTS5)  ┐
                  → cosine similarity of embeddings    ┴ → reciprocal rank fusion → Hits

Two rankings because each fails where the other does not: words find exact names, codes and rare terms
("error E42"), embeddings find paraphrases ("where can I leave my car" → the parking passage). Reciprocal
rank fusion, score = Σ 1/(60 + rank), combines them without having to calibrate BM25 scores against
cosines. Each Hit also carries its cosine similarity: an absolute measure the caller can threshold on to
decide that nothing relevant is known.

The file runs in WAL mode: readers (a server answering questions) never wait for a writer (`kb add`) and
always see whole documents, because a document's row and all its passages are written in one transaction.
Embeddings are computed before that transaction opens, so the writer holds the lock for milliseconds.
"""
from __future__ import annotations

import hashlib
import re
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..hub import DEFAULT_EMBEDDING, EMBEDDING_MODELS
from ..paths import cache_dir
from .documents import DocumentError, iter_files, read_document, split_passages

SCHEMA_VERSION = 1
RRF_K = 60                  # reciprocal rank fusion's constant (Cormack et al. 2009)
BM25_CANDIDATES = 100       # how deep the word ranking goes into the fusion
NAME = re.compile(r"^[A-Za-z0-9_.-]+$")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    id INTEGER PRIMARY KEY,
    source TEXT NOT NULL UNIQUE,        -- absolute path of the file
    sha256 TEXT NOT NULL,               -- of the file's bytes: unchanged files are skipped
    title TEXT NOT NULL,
    added_at REAL NOT NULL,             -- unix time of the last (re)indexing
    passages INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS passages (
    id INTEGER PRIMARY KEY,
    document_id INTEGER NOT NULL REFERENCES documents(id),
    ord INTEGER NOT NULL,               -- position in the document
    section TEXT NOT NULL,              -- heading path, "Delivery › Returns"
    text TEXT NOT NULL,
    start INTEGER NOT NULL,             -- character offset in the document's text
    vector BLOB NOT NULL                -- float32 embedding, unit length
);
CREATE INDEX IF NOT EXISTS passages_document ON passages(document_id);
-- the word index reads its text from `passages` (external content); the triggers keep it in step
CREATE VIRTUAL TABLE IF NOT EXISTS passages_fts USING fts5(
    text, section, content='passages', content_rowid='id', tokenize='porter unicode61 remove_diacritics 2');
CREATE TRIGGER IF NOT EXISTS passages_ai AFTER INSERT ON passages BEGIN
    INSERT INTO passages_fts(rowid, text, section) VALUES (new.id, new.text, new.section);
END;
CREATE TRIGGER IF NOT EXISTS passages_ad AFTER DELETE ON passages BEGIN
    INSERT INTO passages_fts(passages_fts, rowid, text, section) VALUES ('delete', old.id, old.text, old.section);
END;
"""


class KnowledgeBaseError(ValueError):
    """A knowledge base that cannot be used as asked (a newer schema, a different embedding model)."""


class EncoderMismatch(KnowledgeBaseError):
    """The knowledge base's vectors come from another embedding model than the one given."""


@dataclass
class AddReport:
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    passages: int = 0                                          # passages written
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (path, reason)


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
    score: float                # fused: Σ 1/(60 + rank) over the two rankings
    similarity: float           # cosine similarity of query and passage, in [-1, 1]
    bm25_rank: int | None       # 1-based rank by words; None when no query word is in the passage
    vector_rank: int            # 1-based rank by similarity


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


# English function words: left out of the word search (FTS5 has no stop list). In a small knowledge base
# a question's "until" or "how" matching one passage would otherwise outweigh the meaning of the question.
STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between
both but by can could did do does doing down during each few for from further had has have having he her
here hers herself him himself his how i if in into is it its itself just me more most my myself no nor not
now of off on once only or other our ours ourselves out over own same she should so some such than that the
their theirs them themselves then there these they this those through to too under until up very was we were
what when where which while who whom why will with would you your yours yourself yourselves
""".split())


def match_query(query: str) -> str | None:
    """An FTS5 MATCH expression for any user text: its words but function words, each quoted, OR-ed (all
    its words if it has only function words); None if it has no words at all.

    Quoting makes every word a plain term, so punctuation, `*`, `AND`/`OR`/`NOT` and unbalanced quotes or
    parentheses in the user's text can never be read as FTS syntax."""
    words = list(dict.fromkeys(re.findall(r"\w+", query.lower())))
    words = [w for w in words if w not in STOPWORDS] or words
    return " OR ".join(f'"{w}"' for w in words) or None


def _embedding_text(section: str, text: str) -> str:
    # the heading says what a passage is about ("Parking: behind building B"): embed it with the text
    return f"{section}\n{text}" if section else text


class KnowledgeBase:
    """One knowledge base file. Safe to share between threads (one connection, used under a lock); other
    processes and other KnowledgeBase objects on the same file read while one of them writes."""

    def __init__(self, path, encoder=None, timeout: float = 30.0):
        self.path = Path(path).expanduser()
        self._encoder = encoder
        self._lock = threading.RLock()
        self._vectors: tuple[str, np.ndarray, np.ndarray] | None = None  # (generation, ids, matrix)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None, check_same_thread=False)
        try:
            self._db.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")   # in WAL mode: consistent after a crash
            self._create()
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise KnowledgeBaseError(f"{self.path} is not a picochat knowledge base ({e})") from None
        except BaseException:
            self._db.close()
            raise

    def _create(self):
        """Check the schema version; create the tables if this is a new file (only then take the write lock,
        so that opening a knowledge base never waits for a writer)."""
        with self._read():
            version = self._version()
        if version is None:
            with self._write():
                version = self._version()
                if version is None:
                    for statement in _statements(SCHEMA):   # (executescript would commit our transaction)
                        self._db.execute(statement)
                    self._db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                    self._db.execute("INSERT INTO meta VALUES ('generation', '0')")
                    version = SCHEMA_VERSION
        if version > SCHEMA_VERSION:
            raise KnowledgeBaseError(f"{self.path} was written by a newer picochat "
                                     f"(schema {version}; this one reads {SCHEMA_VERSION})")

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
            except BaseException:
                self.kb._lock.release()
                raise
            return self.kb._db

        def __exit__(self, exc_type, *exc):
            try:
                self.kb._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
            finally:
                self.kb._lock.release()

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
        return EMBEDDING_MODELS[DEFAULT_EMBEDDING].name

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
    def add(self, paths, progress: Callable[[int, int], None] | None = None) -> AddReport:
        """Index files and folders (walked for .txt .md .markdown .html .htm .pdf); see AddReport.

        A file whose bytes are unchanged since it was indexed is skipped; a changed one has its passages
        replaced. progress(done, total) is called after each file."""
        encoder = self.encoder
        with self._read():
            self._check_encoder(encoder)
        report = AddReport()
        files = []
        for p in paths:
            if Path(p).expanduser().exists():
                files += iter_files(p)
            else:
                report.skipped.append((str(p), "no such file or folder"))
        for done, path in enumerate(files, 1):
            self._add_file(path, encoder, report)
            if progress is not None:
                progress(done, len(files))
        return report

    def _add_file(self, path: Path, encoder, report: AddReport):
        source = str(path.resolve())
        try:
            data = path.read_bytes()
        except OSError as e:
            report.skipped.append((source, f"unreadable: {e.strerror or e}"))
            return
        sha = hashlib.sha256(data).hexdigest()
        with self._read() as db:
            row = db.execute("SELECT sha256 FROM documents WHERE source = ?", (source,)).fetchone()
        if row is not None and row[0] == sha:
            report.unchanged += 1
            return
        try:
            doc = read_document(path, data)
        except DocumentError as e:
            report.skipped.append((source, str(e)))
            return
        passages = split_passages(doc)
        if not passages:
            report.skipped.append((source, "no text found" + (" (a scanned PDF?)" if path.suffix.lower() == ".pdf"
                                                              else "")))
            return
        # the slow part, outside any transaction: readers and other writers are not held up by it
        vectors = encoder.encode([_embedding_text(p.section, p.text) for p in passages])
        with self._write() as db:
            self._check_encoder(encoder)   # another writer may have set the model meanwhile
            db.execute("INSERT OR IGNORE INTO meta VALUES ('embedding_model', ?)", (encoder.name,))
            db.execute("INSERT OR IGNORE INTO meta VALUES ('embedding_dim', ?)", (str(encoder.dim),))
            old = db.execute("SELECT id FROM documents WHERE source = ?", (source,)).fetchone()
            if old is not None:
                doc_id = old[0]
                db.execute("DELETE FROM passages WHERE document_id = ?", (doc_id,))
                db.execute("UPDATE documents SET sha256 = ?, title = ?, added_at = ?, passages = ? WHERE id = ?",
                           (sha, doc.title, time.time(), len(passages), doc_id))
            else:
                doc_id = db.execute("INSERT INTO documents (source, sha256, title, added_at, passages) "
                                    "VALUES (?, ?, ?, ?, ?)",
                                    (source, sha, doc.title, time.time(), len(passages))).lastrowid
            db.executemany("INSERT INTO passages (document_id, ord, section, text, start, vector) "
                           "VALUES (?, ?, ?, ?, ?, ?)",
                           [(doc_id, i, p.section, p.text, p.start, vectors[i].astype(np.float32).tobytes())
                            for i, p in enumerate(passages)])
            self._bump(db)
        if old is None:
            report.added += 1
        else:
            report.updated += 1
        report.passages += len(passages)

    def _bump(self, db):
        """Count a change, so that every reader's cached vectors know to reload."""
        db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")

    def _delete(self, db, doc_id: int):
        db.execute("DELETE FROM passages WHERE document_id = ?", (doc_id,))
        db.execute("DELETE FROM documents WHERE id = ?", (doc_id,))

    def remove(self, source) -> bool:
        """Forget a document (by its path, which need not exist any more), or every document under a folder.
        Whether anything was removed."""
        path = str(Path(source).expanduser().resolve())
        with self._write() as db:
            folder = path.rstrip("/") + "/"
            rows = db.execute("SELECT id FROM documents WHERE source = ? OR source = ? OR substr(source, 1, ?) = ?",
                              (path, str(source), len(folder), folder)).fetchall()
            for (doc_id,) in rows:
                self._delete(db, doc_id)
            if rows:
                self._bump(db)
        return bool(rows)

    def sync(self) -> list[str]:
        """Remove the documents whose files are gone; the sources removed."""
        gone = [d.source for d in self.documents() if not Path(d.source).is_file()]
        for source in gone:
            self.remove(source)
        return gone

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
        match = match_query(query)
        if match is None or k < 1:
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
            by_vector = np.argsort(-similarity, kind="stable")
            vector_rank = np.empty(len(ids), dtype=np.int64)
            vector_rank[by_vector] = np.arange(1, len(ids) + 1)
            score = 1.0 / (RRF_K + vector_rank)
            bm25 = db.execute("SELECT rowid FROM passages_fts WHERE passages_fts MATCH ? "
                              "ORDER BY bm25(passages_fts) LIMIT ?", (match, max(BM25_CANDIDATES, k))).fetchall()
            position = {int(pid): i for i, pid in enumerate(ids)}
            bm25_rank = {}
            for rank, (pid,) in enumerate(bm25, 1):
                if pid in position:
                    bm25_rank[pid] = rank
                    score[position[pid]] += 1.0 / (RRF_K + rank)
            best = np.argsort(-score, kind="stable")[:k]
            hits = []
            for i in best:
                pid = int(ids[i])
                source, title, section, text = db.execute(
                    "SELECT d.source, d.title, p.section, p.text FROM passages p JOIN documents d "
                    "ON d.id = p.document_id WHERE p.id = ?", (pid,)).fetchone()
                hits.append(Hit(pid, source, title, section, text, float(score[i]), float(similarity[i]),
                                bm25_rank.get(pid), int(vector_rank[i])))
        return hits


def _statements(script: str) -> list[str]:
    """Split a schema script into statements (a trigger's body holds `;` of its own)."""
    out, current = [], []
    for line in script.strip().splitlines():
        current.append(line)
        text = "\n".join(current)
        if line.rstrip().endswith(";") and sqlite3.complete_statement(text):
            out.append(text)
            current = []
    return out
