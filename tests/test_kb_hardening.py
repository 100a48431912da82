"""The knowledge base against careless input: `kb rm ""` (an unset shell variable), `--kb` pointed at another
program's SQLite file, a folder, a locked, read-only or damaged file, `kb add` that adds nothing, and the
server's absolute paths in API responses. Through the command's own main() where a user would meet them,
with the stand-in encoder (helpers.FakeEncoder): no model is loaded."""
import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import FakeEncoder, LiveServer, run_cli, tiny_engine
from picochat.apps import assistant
from picochat.apps import kb as kb_module
from picochat.apps.kb import (APPLICATION_ID, KnowledgeBase, KnowledgeBaseError, KnowledgeBaseLocked,
                              ReadOnlyKnowledgeBase, RemovesEverything)

PAGES = {"returns.md": "# Returns\n\nReturns are accepted within 30 days.\n",
         "parking.md": "# Parking\n\nParking is behind the shop.\n",
         "hours.md": "# Hours\n\nWe open at nine on weekdays.\n"}


@pytest.fixture
def no_model(monkeypatch):
    """`kb add` with the stand-in encoder: no embedding model is looked for or loaded."""
    monkeypatch.setattr("picochat.hub.find_embedding", lambda *a, **k: Path("unused"))
    monkeypatch.setattr("picochat.load.load_encoder", lambda *a, **k: FakeEncoder())


def one_error_line(err: str) -> str:
    """The stderr of a refused command: exactly one `picochat: error:` line, no traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("picochat: error: ") and "Traceback" not in err, err
    return lines[0]


def write_pages(folder: Path, pages: dict = PAGES) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in pages.items():
        (folder / name).write_text(text)
    return folder


def build_kb(path: Path, *folders: Path) -> Path:
    with KnowledgeBase(path, FakeEncoder()) as kb:
        kb.add(list(folders))
    return path


# ----------------------------------------------------------------------------- kb rm
def test_kb_rm_of_an_empty_path_or_a_folder_of_everything_removes_nothing(tmp_path, capsys, monkeypatch):
    docs = write_pages(tmp_path / "docs")
    path = build_kb(tmp_path / "shop.sqlite", docs)
    monkeypatch.chdir(docs)
    for argv in ([""], ["  "], ["returns.md", ""], ["."], [str(docs)], ["/"], [str(tmp_path)], []):
        code, _, err = run_cli(["kb", "rm", *argv, "--kb", path], capsys)
        line = one_error_line(err)
        assert code == 1 and "--all" in line, (argv, line)
        assert len(KnowledgeBase(path).documents()) == 3, argv          # all three are still there
    assert "an empty PATH" in one_error_line(run_cli(["kb", "rm", "", "--kb", path], capsys)[2])
    assert one_error_line(run_cli(["kb", "rm", ".", "--kb", path], capsys)[2]) == (
        f"picochat: error: '.' is the folder {docs}/, which holds all 3 documents of {path}; "
        f"to remove them all, run `picochat kb rm --all --kb {path}`")

    assert run_cli(["kb", "rm", "returns.md", "--kb", path], capsys)[0] == 0    # one file: no --all needed
    assert len(KnowledgeBase(path).documents()) == 2
    code, out, _ = run_cli(["kb", "rm", "--all", "--kb", path], capsys)
    assert code == 0 and "2 document(s) removed" in out and KnowledgeBase(path).documents() == []


def test_remove_refuses_an_empty_source_and_a_folder_of_everything(tmp_path):
    docs = write_pages(tmp_path / "docs")
    write_pages(tmp_path / "docs" / "sub", {"more.md": "# More\n\nMore text here.\n"})
    with KnowledgeBase(build_kb(tmp_path / "kb.sqlite", docs), FakeEncoder()) as kb:
        for empty in ("", " ", "\t"):
            with pytest.raises(KnowledgeBaseError, match="empty path"):
                kb.remove(empty)
        with pytest.raises(RemovesEverything, match="holds all 4 documents"):
            kb.remove(docs)
        assert kb.remove(docs / "sub") and len(kb.documents()) == 3     # a folder holding some of them
        assert kb.remove(docs / "returns.md") and len(kb.documents()) == 2
        assert kb.remove(docs, everything=True) and kb.documents() == []
        kb.add([docs])
        assert kb.remove_all() == 4 and kb.documents() == [] and kb.remove_all() == 0


# ----------------------------------------------------------------------------- another program's file
FOREIGN = {"a table t": ["CREATE TABLE t (x TEXT)", "INSERT INTO t VALUES ('keep me')"],
           "a meta table too": ["CREATE TABLE t (x TEXT)", "CREATE TABLE meta (key TEXT, value TEXT)",
                                "INSERT INTO meta VALUES ('schema_version', '2')"]}   # not all picochat's keys


@pytest.mark.parametrize("schema", FOREIGN)
def test_another_programs_sqlite_file_is_refused_and_left_as_it_was(tmp_path, capsys, no_model, schema):
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode = DELETE")
        for statement in FOREIGN[schema]:
            db.execute(statement)
    db.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        tables = db.execute("SELECT name FROM sqlite_master").fetchall()
    before = path.read_bytes()
    doc = write_pages(tmp_path / "docs") / "returns.md"
    for argv in (["ls"], ["add", doc], ["rm", doc], ["search", "returns"], ["set", "--persona", "x"]):
        code, _, err = run_cli(["kb", argv[0], *argv[1:], "--kb", path], capsys)
        line = one_error_line(err)
        assert code == 1 and str(path) in line and "another program's SQLite database" in line, (argv, line)
    with pytest.raises(KnowledgeBaseError, match="other.db"):
        KnowledgeBase(path, FakeEncoder())
    assert path.read_bytes() == before                                       # not a byte changed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs", "other.db"]   # no -wal, no -journal
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("delete",)
        assert db.execute("SELECT name FROM sqlite_master").fetchall() == tables
    db.close()


def test_a_file_that_is_not_sqlite_is_refused_unchanged(tmp_path, capsys):
    path = tmp_path / "notes.sqlite"
    path.write_bytes(b"my notes, not a database\n" * 10)
    code, _, err = run_cli(["kb", "ls", "--kb", path], capsys)
    assert code == 1 and "is not an SQLite file" in one_error_line(err) and str(path) in err
    assert path.read_bytes() == b"my notes, not a database\n" * 10


# In another process: is any lock held on the byte range of SQLite's shared locks (PENDING_BYTE + 2, 510 bytes)?
LOCK_PROBE = """
import fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDWR)
probe = struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0x40000000 + 2, 510, 0)
print(struct.unpack("hhqqi", fcntl.fcntl(fd, fcntl.F_GETLK, probe))[0] != fcntl.F_UNLCK)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX locks")
def test_opening_a_knowledge_base_twice_keeps_the_first_ones_sqlite_locks(tmp_path):
    # POSIX locks belong to the process: had the foreign-file check opened and closed the file, the first
    # connection's shared lock would be gone, and another process could checkpoint and delete the WAL under it
    def locked() -> bool:
        out = subprocess.run([sys.executable, "-c", LOCK_PROBE, str(path)], capture_output=True, text=True)
        return out.stdout.strip() == "True"
    path = tmp_path / "kb.sqlite"
    first = KnowledgeBase(path, FakeEncoder())
    first.set_setting("persona", "a shop assistant")   # a connection that has used the WAL holds a shared lock
    assert locked()
    second = KnowledgeBase(path, FakeEncoder())
    assert second.setting("persona") == "a shop assistant"
    second.close()
    assert locked()
    first.close()
    assert not locked()


def test_picochat_marks_its_files_and_accepts_an_older_unmarked_one(tmp_path):
    path = build_kb(tmp_path / "kb.sqlite", write_pages(tmp_path / "docs"))
    assert path.read_bytes()[68:72] == b"pcKB" and APPLICATION_ID == 0x70634B42   # the header's field
    with sqlite3.connect(path) as db:                 # as an older picochat left it: the same tables, no mark
        db.execute("PRAGMA application_id = 0")
    db.close()
    with KnowledgeBase(path, FakeEncoder()) as kb:
        assert len(kb.documents()) == 3               # accepted ...
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA application_id").fetchone() == (APPLICATION_ID,)   # ... and marked
    db.close()
    empty = tmp_path / "empty.sqlite"
    empty.touch()                                     # an empty file is a new database, not another's
    KnowledgeBase(empty, FakeEncoder()).close()
    assert empty.read_bytes()[68:72] == b"pcKB"


# ----------------------------------------------------------------------------- SQLite's errors, one line each
def test_a_folder_as_knowledge_base_is_one_line(tmp_path, capsys, no_model):
    folder = tmp_path / "kb.sqlite"
    folder.mkdir()
    for argv in (["ls"], ["add", tmp_path]):
        code, _, err = run_cli(["kb", *argv, "--kb", folder], capsys)
        assert code == 1 and f"{folder} is a folder" in one_error_line(err)


def test_a_locked_knowledge_base_is_one_line_after_the_timeout(tmp_path, capsys, monkeypatch, no_model):
    docs = write_pages(tmp_path / "docs")
    path = build_kb(tmp_path / "kb.sqlite", docs)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")                 # another writer that does not let go
    try:
        monkeypatch.setattr(kb_module, "BUSY_TIMEOUT", 0.2)
        for argv in (["rm", docs / "hours.md"], ["add", write_pages(tmp_path / "new", {"new.md": "# New\n\nNew.\n"})]):
            started = time.monotonic()
            code, _, err = run_cli(["kb", *argv, "--kb", path], capsys)
            line = one_error_line(err)
            assert code == 1 and f"{path} is locked by another program (waited 0.2 s)" in line, line
            assert time.monotonic() - started < 10
        with KnowledgeBase(path, FakeEncoder(), timeout=0.1) as kb:
            assert len(kb.documents()) == 3           # readers are not held up (WAL) ...
            with pytest.raises(KnowledgeBaseLocked):  # ... writers are, for the timeout
                kb.set_setting("persona", "x")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert len(KnowledgeBase(path).documents()) == 3


def make_unwritable(path: Path) -> bool:
    """Make a file unwritable even for root (chattr +i: immutable); False where that cannot be done here."""
    if os.geteuid() != 0:
        path.chmod(0o444)
        return True
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True)
    return done.returncode == 0


def test_a_read_only_knowledge_base_is_readable_and_one_line_to_write(tmp_path, capsys):
    docs = write_pages(tmp_path / "docs")
    path = build_kb(tmp_path / "kb.sqlite", docs)
    if not make_unwritable(path):
        pytest.skip("running as root on a file system without chattr +i: no file here is read-only to root")
    try:
        code, out, _ = run_cli(["kb", "ls", "--kb", path], capsys)
        assert code == 0 and "3 document(s)" in out
        code, _, err = run_cli(["kb", "rm", docs / "hours.md", "--kb", path], capsys)
        assert code == 1 and f"{path} cannot be written" in one_error_line(err)
        with KnowledgeBase(path) as kb, pytest.raises(ReadOnlyKnowledgeBase):
            kb.set_setting("persona", "x")
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(path)], check=True)


def test_a_damaged_knowledge_base_is_one_line(tmp_path, capsys):
    path = build_kb(tmp_path / "kb.sqlite", write_pages(tmp_path / "docs"))
    data = bytearray(path.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    data[page:] = b"\xa5" * (len(data) - page)        # every page but the first (the schema) overwritten
    path.write_bytes(bytes(data))
    code, _, err = run_cli(["kb", "ls", "--kb", path], capsys)
    assert code == 1 and f"{path} is damaged" in one_error_line(err)


# ----------------------------------------------------------------------------- kb add's exit status
def test_kb_add_fails_when_nothing_was_added(tmp_path, capsys, no_model):
    path = tmp_path / "kb.sqlite"
    empty = tmp_path / "empty.md"
    empty.write_text("\n\n")
    code, out, err = run_cli(["kb", "add", empty, tmp_path / "missing.md", "--kb", path], capsys)
    assert code == 1 and "0 added" in out and "nothing was added" in err and "every file was skipped (2)" in err
    (tmp_path / "nothing").mkdir()
    code, _, err = run_cli(["kb", "add", tmp_path / "nothing", "--kb", path], capsys)
    assert code == 1 and "no .txt .md .markdown .html .htm .pdf files found" in err
    docs = write_pages(tmp_path / "docs")
    assert run_cli(["kb", "add", docs, empty, "--kb", path], capsys)[0] == 0     # some added, one skipped
    code, out, _ = run_cli(["kb", "add", docs, "--kb", path], capsys)
    assert code == 0 and "3 unchanged" in out                             # nothing to do is not an error


def test_kb_add_skips_a_fifo_without_waiting_for_a_writer(tmp_path):
    docs = write_pages(tmp_path / "docs")
    os.mkfifo(docs / "pipe.md")                       # read_bytes() would wait for a writer forever
    with KnowledgeBase(tmp_path / "kb.sqlite", FakeEncoder()) as kb:
        report = kb.add([docs])
    assert report.added == 3 and [Path(p).name for p, _ in report.skipped] == ["pipe.md"]
    assert "FIFO" in report.skipped[0][1]


def test_symbolic_link_loops_and_devices_are_skipped_by_name(tmp_path):
    docs = write_pages(tmp_path / "docs")
    (docs / "loop.md").symlink_to(docs / "loop.md")            # a loop inside the folder
    (docs / "zero.md").symlink_to("/dev/zero")                 # a device behind a link
    (tmp_path / "here.md").symlink_to(tmp_path / "here.md")    # a loop given on the command line
    with KnowledgeBase(tmp_path / "kb.sqlite", FakeEncoder()) as kb:
        report = kb.add([docs, tmp_path / "here.md"], max_bytes=1 << 20)
    reasons = {Path(p).name: why for p, why in report.skipped}
    assert report.added == 3 and set(reasons) == {"loop.md", "zero.md", "here.md"}, reasons
    assert "loop" in reasons["loop.md"] and "character device" in reasons["zero.md"]
    assert "symbolic link that leads nowhere" in reasons["here.md"]


def test_one_odd_file_does_not_stop_the_others_and_the_size_flag_reaches_kb_add(tmp_path, capsys, no_model):
    docs = write_pages(tmp_path / "docs")
    (docs / "refs.html").write_text("<p>&#" + "0" * 5000 + "65; is A</p>")   # more digits than int() takes
    (docs / "big.md").write_text("# Big\n\n" + "A sentence of the big page. " * 60_000)   # ~1.7 MB
    kb = tmp_path / "kb.sqlite"
    code, out, err = run_cli(["kb", "add", docs, "--kb", kb, "--max-file-mb", "1"], capsys)
    assert code == 0 and "4 added" in out and "big.md" in err and "over the 1 MB limit" in err
    code, out, _ = run_cli(["kb", "add", docs, "--kb", kb, "--max-file-mb", "2"], capsys)
    assert code == 0 and "1 added" in out
    code, _, err = run_cli(["kb", "add", docs, "--kb", kb, "--max-file-mb", "inf"], capsys)
    assert code == 1 and "--max-file-mb must be a positive number" in err


def test_a_fifo_as_knowledge_base_path_is_refused_without_waiting(tmp_path):
    os.mkfifo(tmp_path / "kb.sqlite")
    with pytest.raises(KnowledgeBaseError, match="not a regular file"):
        KnowledgeBase(tmp_path / "kb.sqlite", FakeEncoder())


# ----------------------------------------------------------------------------- sources in API responses
def test_relative_source_and_root(tmp_path):
    assert assistant.relative_source("/srv/docs/a/x.md", "/srv/docs") == "a/x.md"
    assert assistant.relative_source("/srv/docs/a/x.md", None) == "x.md"
    assert assistant.relative_source("/elsewhere/x.md", "/srv/docs") == "x.md"
    docs = write_pages(tmp_path / "docs" / "a")
    with KnowledgeBase(tmp_path / "kb.sqlite", FakeEncoder()) as kb:
        assert kb.root() is None
        kb.add([docs / "returns.md"])
        assert kb.root() == str(docs)                 # one document: its folder (its file name shows)
        kb.add([write_pages(tmp_path / "docs" / "b", {"more.md": "# More\n\nMore text.\n"})])
        assert kb.root() == str(tmp_path / "docs")


def test_api_sources_are_relative_to_the_knowledge_base(tmp_path):
    from picochat.serve.app import Knowledge
    docs = tmp_path / "srv" / "docs"
    write_pages(docs / "policies", {"returns.md": PAGES["returns.md"]})
    write_pages(docs / "visit", {"parking.md": PAGES["parking.md"]})
    build_kb(tmp_path / "shop.sqlite", docs)
    knowledge = Knowledge(["shop"], load_encoder=FakeEncoder,
                          open_kb=lambda name, encoder: KnowledgeBase(tmp_path / f"{name}.sqlite", encoder=encoder))
    engine = tiny_engine("Returns are accepted within 30 days. Parking is behind the shop. " * 20, max_seq_len=512)
    with LiveServer(lambda: engine, "tiny", knowledge=knowledge) as server:
        server.wait_loaded()
        # the stand-in encoder gives equal texts equal vectors: the passage's own sentence is a sure match
        body = server.chat([{"role": "user", "content": "Returns are accepted within 30 days."}], max_tokens=2)
        assert [s["source"] for s in body["retrieval"]["sources"]] == ["policies/returns.md"]
        assert str(tmp_path) not in json.dumps(body)
