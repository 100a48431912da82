"""What users said about the replies: thumbs up or down and corrected replies, kept in an SQLite file, and
turned into training data.

    POST /v1/feedback (serve/feedback.py), `picochat feedback ls|export` (cli/feedback.py)
      -> FeedbackStore: one row per rated reply in cache_dir()/feedback.db (the conversation before the
         reply, the reply, the rating, the user's edit, the model and adapter that wrote it)
      -> dpo_pairs(): an edited reply over the original; an "up" reply over a "down" one to the same
         conversation                                  (the JSONL `picochat dpo --data` reads)
      -> sft_examples(): the conversation finished by an edited or "up" reply   (`picochat sft --data`)

The file is shared by a server's threads and by other processes (a second server, the CLI): every
operation opens its own short connection (sqlite3 connections are not shared across threads), WAL lets
readers go on while one writes, and a writer waits up to `timeout` seconds for another's lock instead of
failing. picochat writes only to a file it created: one marked with `PRAGMA application_id` = APPLICATION_ID
(or an empty one); another program's SQLite file is refused before anything is written to it.
"""
from __future__ import annotations

import contextlib
import json
import sqlite3
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from ..paths import cache_dir

APPLICATION_ID = int.from_bytes(b"pcFB", "big")   # PRAGMA application_id of picochat's feedback files
SCHEMA_VERSION = 1                                # PRAGMA user_version
BUSY_TIMEOUT = 30.0                               # seconds a writer waits for another's lock
RATINGS = ("up", "down")

SCHEMA = """
CREATE TABLE feedback (
    response_id TEXT PRIMARY KEY,   -- the chat completion's id ("chatcmpl-...")
    messages TEXT NOT NULL,         -- JSON: the conversation as the client sent it, before the reply
    reply TEXT NOT NULL,            -- what the model wrote
    rating TEXT NOT NULL CHECK (rating IN ('up', 'down')),
    edited TEXT,                    -- the user's corrected reply, if any
    model TEXT NOT NULL,
    adapter TEXT,                   -- the LoRA adapter serving the reply, if any
    created REAL NOT NULL,          -- unix time of the first rating
    updated REAL NOT NULL           -- unix time of the latest
)"""


class FeedbackError(ValueError):
    """A feedback file that cannot be used (another program's, damaged, locked, newer); the message names the
    file, the problem and what to do."""


@dataclass
class Feedback:
    """One rated reply."""
    response_id: str
    messages: list[dict]
    reply: str
    rating: str
    edited: str | None
    model: str
    adapter: str | None
    created: float
    updated: float

    @property
    def final(self) -> str:
        """The reply as the user would have it: their edit, else what the model wrote."""
        return self.edited if self.edited is not None else self.reply


def default_path() -> Path:
    return cache_dir() / "feedback.db"


class FeedbackStore:
    """The feedback file at `path` (default: cache_dir()/feedback.db). Nothing touches the disk until the
    first operation; reading a file that does not exist yet finds no feedback (and does not create it)."""

    def __init__(self, path=None, timeout: float = BUSY_TIMEOUT):
        self.path = Path(path).expanduser() if path is not None else default_path()
        self.timeout = timeout

    def record(self, response_id: str, messages: list[dict], reply: str, rating: str, edited: str | None = None,
               model: str = "", adapter: str | None = None) -> Feedback:
        """Store a rating; a second one for the same response_id replaces the first (the user changed their
        mind), keeping when it was first given."""
        if rating not in RATINGS:
            raise ValueError(f"rating must be 'up' or 'down', not {rating!r}")
        now = time.time()
        with self._writing() as db:
            db.execute("INSERT INTO feedback VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (response_id) DO UPDATE "
                       "SET messages = excluded.messages, reply = excluded.reply, rating = excluded.rating, "
                       "edited = excluded.edited, model = excluded.model, adapter = excluded.adapter, "
                       "updated = excluded.updated",
                       (response_id, json.dumps(messages, ensure_ascii=False), reply, rating, edited, model, adapter,
                        now, now))
            row = db.execute(f"SELECT {COLUMNS} FROM feedback WHERE response_id = ?", (response_id,)).fetchone()
        return feedback_of(row)

    def entries(self, limit: int | None = None) -> list[Feedback]:
        """The stored feedback, oldest first (by first rating); with `limit`, only the newest `limit`."""
        query = f"SELECT {COLUMNS} FROM feedback ORDER BY created DESC, response_id DESC"
        with self._reading() as db:
            rows = [] if db is None else db.execute(query + (" LIMIT ?" if limit is not None else ""),
                                                    () if limit is None else (limit,)).fetchall()
        return [feedback_of(row) for row in reversed(rows)]

    def count(self) -> int:
        with self._reading() as db:
            return 0 if db is None else db.execute("SELECT count(*) FROM feedback").fetchone()[0]

    # ------------------------------------------------------------------------- connections
    @contextlib.contextmanager
    def _writing(self):
        """A connection inside a write transaction on a file that is (now) picochat's feedback file."""
        self._has_content()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = self._connect(self.path)
        try:
            # IMMEDIATE: the write lock from the start, so a second writer waits (busy timeout) instead of
            # failing when its read transaction cannot be upgraded
            db.execute("BEGIN IMMEDIATE")
            self._claim(db)
            yield db
            db.execute("COMMIT")
            self._use_wal(db)
        except sqlite3.Error as e:
            raise self._problem(e) from None
        finally:
            db.close()   # (rolls back a transaction left open by an exception)

    def _use_wal(self, db: sqlite3.Connection):
        """Switch the file to WAL (readers never wait for a writer; the mode is kept in the file) unless it is
        already. The switch needs every other connection off the file for a moment; with other writers at work
        that may not come within the busy timeout, and the rating is already stored: then the file stays as it
        is and a later write switches it."""
        if db.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
            return
        db.execute("PRAGMA busy_timeout = 200")
        try:
            db.execute("PRAGMA journal_mode = WAL")
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) and "busy" not in str(e):
                raise

    @contextlib.contextmanager
    def _reading(self):
        """A read-only connection to picochat's feedback file, or None where there is no feedback yet."""
        if not self._has_content():
            yield None
            return
        db = self._connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            yield db if self._check(db) else None
        except sqlite3.Error as e:
            raise self._problem(e) from None
        finally:
            db.close()

    def _connect(self, target, uri: bool = False) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(target, timeout=self.timeout, isolation_level=None, uri=uri)
        except sqlite3.Error as e:
            raise self._problem(e) from None
        db.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
        return db

    def _has_content(self) -> bool:
        """Whether the file exists and is not empty; raises for a folder or a FIFO (which would hold SQLite
        forever). Only stat(): opening and closing the file here would drop every SQLite lock this process
        holds on it (POSIX locks belong to the process, and close() releases them all), letting another
        process write over a transaction in flight. A file that is not SQLite is refused by SQLite itself, at
        its first read, before anything is written."""
        try:
            status = self.path.stat()
        except FileNotFoundError:
            return False
        except OSError as e:
            raise FeedbackError(f"cannot read {self.path} ({e.strerror or e}); check its permissions") from None
        if not stat.S_ISREG(status.st_mode):
            raise FeedbackError(f"{self.path} is not a regular file, so not a feedback file; give another path")
        return status.st_size > 0

    def _check(self, db: sqlite3.Connection) -> bool:
        """Whether the file holds picochat's feedback table (False: an empty database, nothing stored yet);
        raises for another program's database or a newer schema."""
        application_id = db.execute("PRAGMA application_id").fetchone()[0]
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if application_id != APPLICATION_ID:
            if application_id == 0 and db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
                return False
            raise FeedbackError(f"{self.path} is another SQLite database, not picochat's feedback (application_id "
                                f"{application_id:#x}, not {APPLICATION_ID:#x}); picochat left it as it was: give "
                                f"another path")
        if version > SCHEMA_VERSION:
            raise FeedbackError(f"{self.path} was written by a newer picochat (feedback schema {version}; this "
                                f"one reads {SCHEMA_VERSION}): upgrade picochat")
        return True

    def _claim(self, db: sqlite3.Connection) -> bool:
        """Inside the write transaction: check the file is ours, or make a new (empty) one ours. Whether it
        was created now."""
        if self._check(db):
            return False
        db.execute(SCHEMA)
        db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        return True

    def _problem(self, error: sqlite3.Error) -> FeedbackError:
        """An SQLite error as one line naming the file and what to do."""
        text = " ".join(str(error).split())
        if "locked" in text or "busy" in text:
            return FeedbackError(f"{self.path} is locked by another program (waited {self.timeout:g} s); "
                                 f"try again when it has finished")
        if "not a database" in text:
            return FeedbackError(f"{self.path} is not an SQLite file, so not picochat's feedback; picochat leaves "
                                 f"it alone: give another path")
        if "readonly" in text or "unable to open" in text:
            return FeedbackError(f"{self.path} cannot be written or opened ({text}); check the file, its folder "
                                 f"and their permissions")
        return FeedbackError(f"{self.path}: SQLite error: {text}")


COLUMNS = "response_id, messages, reply, rating, edited, model, adapter, created, updated"


def feedback_of(row) -> Feedback:
    response_id, messages, reply, rating, edited, model, adapter, created, updated = row
    return Feedback(response_id, json.loads(messages), reply, rating, edited, model, adapter, created, updated)


# ----------------------------------------------------------------------------- training data
TRAINABLE_ROLES = {"system", "user", "assistant"}   # what `picochat sft` and `picochat dpo` read


def trainable(entry: Feedback) -> bool:
    """Whether the reply answers a plain chat (no tool turns) whose last turn is the user's: the only
    conversations the SFT and DPO readers take; a reply to anything else is left out of the training data."""
    roles = [m.get("role") for m in entry.messages]
    return bool(roles) and roles[-1] == "user" and set(roles) <= TRAINABLE_ROLES


def conversation_key(messages: list[dict]) -> str:
    """The conversation as canonical JSON: replies to the same conversation compare equal."""
    return json.dumps(messages, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def dpo_pairs(entries: list[Feedback]) -> list[dict]:
    """Preference pairs: each edited reply chosen over the model's original, and among the replies to one
    conversation, every "up" reply (as the user left it) chosen over every "down" reply (as the model wrote
    it). {"messages", "chosen", "rejected", "source": "edit"|"rating", "response_ids"}; a pair whose two
    sides are the same text, or that was made already, is left out."""
    entries = [e for e in entries if trainable(e)]
    pairs, seen = [], set()

    def add(messages, chosen, rejected, source, ids):
        key = (conversation_key(messages), chosen, rejected)
        if chosen != rejected and key not in seen:
            seen.add(key)
            pairs.append({"messages": messages, "chosen": chosen, "rejected": rejected, "source": source,
                          "response_ids": ids})
    for e in entries:
        if e.edited is not None:
            add(e.messages, e.edited, e.reply, "edit", [e.response_id])
    by_conversation: dict[str, list[Feedback]] = {}
    for e in entries:
        by_conversation.setdefault(conversation_key(e.messages), []).append(e)
    for group in by_conversation.values():
        for up in (e for e in group if e.rating == "up"):
            for down in (e for e in group if e.rating == "down"):
                add(up.messages, up.final, down.reply, "rating", [up.response_id, down.response_id])
    return pairs


def sft_examples(entries: list[Feedback]) -> list[dict]:
    """Conversations to imitate: each ended by an edited reply, or by a reply rated "up" as it was.
    {"messages": [..., {"role": "assistant", "content": ...}]} as `picochat sft --data` reads them."""
    return [{"messages": e.messages + [{"role": "assistant", "content": e.final}]}
            for e in entries if trainable(e) and (e.edited is not None or e.rating == "up")]
