"""A knowledge base's SQLite file: its schema, the mark that says picochat made it, and its errors in words.

picochat writes only to SQLite files it created: each is marked with `PRAGMA application_id` = APPLICATION_ID
(the bytes "pcKB"). `refuse_foreign` turns away a file that exists, is not empty and lacks the mark (another
program's database, or not SQLite at all) before anything is written to it; a knowledge base of an older
picochat (unmarked, with picochat's `meta` table) is accepted (kb.py marks it). `sqlite_problem` makes every
SQLite error one KnowledgeBaseError naming the file, the problem and what to do.
"""
from __future__ import annotations

import contextlib
import sqlite3
import stat
from pathlib import Path

APPLICATION_ID = int.from_bytes(b"pcKB", "big")   # 0x70634B42 = 1885555522: PRAGMA application_id of our files

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
    vector BLOB NOT NULL,               -- float32 embedding, unit length
    grams TEXT NOT NULL DEFAULT ''      -- its Chinese as bigrams and characters (index_grams); '' without any
);
CREATE INDEX IF NOT EXISTS passages_document ON passages(document_id);
-- the word index reads its text from `passages` (external content); the triggers keep it in step
CREATE VIRTUAL TABLE IF NOT EXISTS passages_fts USING fts5(
    text, section, grams, content='passages', content_rowid='id', tokenize='porter unicode61 remove_diacritics 2');
CREATE TRIGGER IF NOT EXISTS passages_ai AFTER INSERT ON passages BEGIN
    INSERT INTO passages_fts(rowid, text, section, grams) VALUES (new.id, new.text, new.section, new.grams);
END;
CREATE TRIGGER IF NOT EXISTS passages_ad AFTER DELETE ON passages BEGIN
    INSERT INTO passages_fts(passages_fts, rowid, text, section, grams)
        VALUES ('delete', old.id, old.text, old.section, old.grams);
END;
"""


class KnowledgeBaseError(ValueError):
    """A knowledge base that cannot be used as asked (a newer schema, a different embedding model, another
    program's file, an SQLite error); the message names the file, the problem and what to do."""


class EncoderMismatch(KnowledgeBaseError):
    """The knowledge base's vectors come from another embedding model than the one given."""


class KnowledgeBaseLocked(KnowledgeBaseError):
    """Another connection held the knowledge base's lock for longer than the timeout."""


class ReadOnlyKnowledgeBase(KnowledgeBaseError):
    """The knowledge base's file (or its folder) cannot be written."""


class RemovesEverything(KnowledgeBaseError):
    """remove() was given a folder that holds every document, without everything=True; `what` says which
    folder and knowledge base, for a caller that gives its own advice."""

    def __init__(self, what: str):
        super().__init__(f"{what}; pass everything=True to remove them all")
        self.what = what


# SQLite's primary result codes (sqlite3.h) → the exception and what to tell the user. Python < 3.11 has no
# sqlite_errorcode: there the message (SQLite's own text for each code) is matched instead.
_SQLITE_PROBLEMS = [
    ((5, 6), ("database is locked", "table is locked"), KnowledgeBaseLocked,
     "is locked by another program (waited {timeout:g} s); try again when it has finished "
     "(another `picochat kb add`?)"),
    ((8,), ("readonly",), ReadOnlyKnowledgeBase,
     "cannot be written ({error}); make the file and its folder writable, or use another knowledge base"),
    ((11, 26), ("malformed", "not a database"), KnowledgeBaseError,
     "is damaged ({error}); delete it and add the documents to a new knowledge base"),
    ((13,), ("disk is full",), KnowledgeBaseError, "cannot be written: the disk is full ({error}); free some space"),
    ((14,), ("unable to open",), KnowledgeBaseError,
     "cannot be opened ({error}); check that it is a file and that its folder exists and is writable"),
    ((10,), ("disk i/o error",), KnowledgeBaseError,
     "cannot be read or written ({error}); check the disk, or copy the file elsewhere"),
]


def sqlite_problem(path, error: sqlite3.Error, timeout: float) -> KnowledgeBaseError:
    """An SQLite error as a one-line KnowledgeBaseError: the file, what went wrong, what to do."""
    text = " ".join(str(error).split())
    code = getattr(error, "sqlite_errorcode", None)
    for codes, phrases, kind, advice in _SQLITE_PROBLEMS:
        if ((code & 0xFF) in codes) if code is not None else any(p in text.lower() for p in phrases):
            return kind(f"{path} " + advice.format(error=text, timeout=timeout))
    return KnowledgeBaseError(f"{path}: SQLite error: {text}")


def refuse_foreign(path: Path, timeout: float):
    """Raise KnowledgeBaseError unless `path` is absent, empty, or a knowledge base picochat wrote (marked
    with APPLICATION_ID, or an older picochat's, unmarked). Reads only, through a read-only connection, so
    that another program's file is left exactly as it was — and never opens the file itself: POSIX locks
    belong to the process, and closing any descriptor of the file would drop the locks this process's other
    connections to it hold (SQLite's own connections share them safely)."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return
    except OSError as e:
        raise KnowledgeBaseError(f"cannot read {path} ({e.strerror or e}); check its permissions") from None
    if stat.S_ISDIR(status.st_mode):
        raise KnowledgeBaseError(f"{path} is a folder, not a knowledge base file; give a file path ending in "
                                 f".sqlite, or a knowledge base name")
    if not stat.S_ISREG(status.st_mode):   # a FIFO would hold SQLite forever
        raise KnowledgeBaseError(f"{path} is not a regular file, so not a knowledge base; give another path")
    if status.st_size == 0:
        return                         # an empty file is a new database to SQLite too
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True,
                                                timeout=timeout)) as db:
            application_id = db.execute("PRAGMA application_id").fetchone()[0]
            if application_id == APPLICATION_ID or (application_id == 0 and _older_picochat(db)):
                return
    except sqlite3.Error as e:
        if (getattr(e, "sqlite_errorcode", 0) or 0) & 0xFF == sqlite3.SQLITE_NOTADB:
            raise KnowledgeBaseError(f"{path} is not an SQLite file (or a damaged one), so not a knowledge base; "
                                     f"picochat leaves it alone: give another path") from None
        raise sqlite_problem(path, e, timeout) from None
    raise KnowledgeBaseError(f"{path} is another program's SQLite database (application_id {application_id:#x}, "
                             f"not picochat's {APPLICATION_ID:#x}); picochat only writes to knowledge bases it "
                             f"created, so it left the file as it was: give another path")


def _older_picochat(db: sqlite3.Connection) -> bool:
    """Whether an unmarked SQLite database is a knowledge base of an older picochat (before the mark): its
    `meta` table holds picochat's keys and its `documents` and `passages` tables are there."""
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not {"meta", "documents", "passages"} <= tables:
        return False
    try:
        keys = {row[0] for row in db.execute("SELECT key FROM meta WHERE key IN ('schema_version', 'generation')")}
    except sqlite3.OperationalError:   # a `meta` table of another shape: not ours
        return False
    return keys == {"schema_version", "generation"}


def statements(script: str) -> list[str]:
    """Split a schema script into statements (a trigger's body holds `;` of its own)."""
    out, current = [], []
    for line in script.strip().splitlines():
        current.append(line)
        text = "\n".join(current)
        if line.rstrip().endswith(";") and sqlite3.complete_statement(text):
            out.append(text)
            current = []
    return out
