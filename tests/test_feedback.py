"""Feedback on replies (issue 22): the SQLite store (round trip, a second rating replacing the first,
surviving a restart, concurrent writers in threads and processes, another program's file left alone),
POST /v1/feedback on a live server (good bodies stored with the conversation and the model; every bad body a
4xx naming the field, fuzzed: never a 500), the training data it becomes (the shapes `picochat dpo` and
`picochat sft` read), and `picochat feedback ls|export`. The page's buttons: tests/test_web.py."""
import contextlib
import hashlib
import json
import os
import re
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from picochat.data.conversations import load_conversations
from picochat.data.feedback import Feedback, FeedbackError, FeedbackStore, dpo_pairs, sft_examples
from picochat.data.preferences import load_pairs
from picochat.serve import state as state_module
from picochat.serve.protocol import MAX_EDITED_CHARS, FeedbackRequest, RequestError, parse_json, validate

from helpers import LiveServer, run_cli, serving, tiny_engine

ROOT = Path(__file__).resolve().parent.parent
TEXT = "The quick brown fox jumps over the lazy dog. Hello there, how are you today? " * 20
HELLO = [{"role": "user", "content": "Hello there"}]
FUZZ_EXAMPLES = int(os.environ.get("PICOCHAT_FUZZ_EXAMPLES", "150"))
DERANDOMIZE = not os.environ.get("PICOCHAT_FUZZ_RANDOM")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- the store
def test_round_trip_and_a_second_rating_replaces_the_first(tmp_path):
    store = FeedbackStore(tmp_path / "fb.db")
    assert store.entries() == [] and store.count() == 0
    assert not store.path.exists(), "reading must not create the file"
    first = store.record("r1", HELLO, "Hi!", "down", edited="Hello! How can I help?", model="tiny",
                         adapter="shop-lora")
    store.record("r2", HELLO, "Yo.", "up", model="tiny")
    again = store.record("r1", HELLO, "Hi!", "up", model="tiny")   # the user changed their mind
    assert again.created == first.created and again.updated >= first.updated
    reopened = FeedbackStore(tmp_path / "fb.db")                    # a new process would see the same
    assert reopened.count() == 2
    r1, r2 = reopened.entries()
    assert (r1.response_id, r1.rating, r1.edited, r1.adapter, r1.messages) == ("r1", "up", None, None, HELLO)
    assert (r2.response_id, r2.reply, r2.model) == ("r2", "Yo.", "tiny")
    assert [e.response_id for e in reopened.entries(limit=1)] == ["r2"]   # the newest
    with pytest.raises(ValueError, match="rating"):
        store.record("r3", HELLO, "x", "meh")
    with sqlite3.connect(store.path) as db:   # picochat's mark, its schema version, WAL for concurrent readers
        assert db.execute("PRAGMA application_id").fetchone()[0] == int.from_bytes(b"pcFB", "big")
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_file_left_in_rollback_mode_is_switched_to_wal_by_the_next_write(tmp_path):
    # (the switch needs the file to itself for a moment: under other writers it may be left to a later write)
    store = FeedbackStore(tmp_path / "fb.db")
    store.record("r1", HELLO, "Hi!", "up")
    with contextlib.closing(sqlite3.connect(store.path)) as db:
        assert db.execute("PRAGMA journal_mode = DELETE").fetchone()[0] == "delete"
    store.record("r2", HELLO, "Yo.", "down")
    with contextlib.closing(sqlite3.connect(store.path)) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.count() == 2


def test_another_programs_file_is_refused_and_left_as_it_was(tmp_path):
    foreign = tmp_path / "theirs.db"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE notes (text TEXT)")
        db.execute("INSERT INTO notes VALUES ('mine')")
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not a database\n" * 10)
    for path, problem in ((foreign, "another SQLite database"), (text_file, "not an SQLite file")):
        before = digest(path)
        for operation in (lambda s: s.record("r", HELLO, "x", "up"), FeedbackStore.entries, FeedbackStore.count):
            with pytest.raises(FeedbackError, match=problem):
                operation(FeedbackStore(path))
        assert digest(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "theirs.db"]   # no journal left either
    newer = FeedbackStore(tmp_path / "newer.db")
    newer.record("r", HELLO, "x", "up")
    with sqlite3.connect(newer.path) as db:
        db.execute("PRAGMA user_version = 2")
    with pytest.raises(FeedbackError, match="newer picochat"):
        newer.entries()


WRITER = """
import sys
from picochat.data.feedback import FeedbackStore
store = FeedbackStore(sys.argv[1])
for i in range(int(sys.argv[3])):
    store.record(f"{sys.argv[2]}-{i}", [{"role": "user", "content": f"q{i}"}], f"a{i}", "up" if i % 2 else "down",
                 model="tiny")
"""


def test_concurrent_writers_in_threads_and_processes_all_land(tmp_path):
    """8 threads and 2 processes, 50 ratings each, on one new file: every rating stored, none 'locked'."""
    path, per_writer = tmp_path / "fb.db", 50
    processes = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), f"process{n}", str(per_writer)],
                                  cwd=ROOT, stderr=subprocess.PIPE, text=True) for n in range(2)]
    errors = []

    def write(n):
        store = FeedbackStore(path)   # one store shared would do too: each operation has its own connection
        try:
            for i in range(per_writer):
                store.record(f"thread{n}-{i}", [{"role": "user", "content": f"q{i}"}], f"a{i}", "up", model="tiny")
        except Exception as e:  # noqa: BLE001 - reported below, with the thread's name
            errors.append(f"thread {n}: {e}")
    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in processes:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    assert errors == []
    ids = {e.response_id for e in FeedbackStore(path).entries()}
    expected = {f"thread{n}-{i}" for n in range(8) for i in range(per_writer)}
    expected |= {f"process{n}-{i}" for n in range(2) for i in range(per_writer)}
    assert ids == expected


# ----------------------------------------------------------------------------- training data
def entry(response_id, reply, rating, edited=None, messages=HELLO) -> Feedback:
    return Feedback(response_id, messages, reply, rating, edited, "tiny", None, 0.0, 0.0)


OTHER = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
TOOLS = [{"role": "user", "content": "weather?"}, {"role": "tool", "content": "sunny"}]


def test_dpo_pairs_and_sft_examples():
    entries = [entry("a", "Hi.", "down", edited="Hello! How can I help you today?"),
               entry("b", "Hello there, friend.", "up"),
               entry("c", "Go away.", "down"),
               entry("d", "4", "up", messages=OTHER),          # no "down" reply to this conversation: no pair
               entry("e", "Go away.", "down"),                 # the same pair as c's: made once
               entry("f", "Hello there, friend.", "down"),     # the same text as the "up" reply: nothing to prefer
               entry("g", "It is sunny.", "up", edited="Sunny, 24 °C.", messages=TOOLS)]   # not a plain chat
    pairs = dpo_pairs(entries)
    assert pairs == [
        {"messages": HELLO, "chosen": "Hello! How can I help you today?", "rejected": "Hi.", "source": "edit",
         "response_ids": ["a"]},
        {"messages": HELLO, "chosen": "Hello there, friend.", "rejected": "Hi.", "source": "rating",
         "response_ids": ["b", "a"]},
        {"messages": HELLO, "chosen": "Hello there, friend.", "rejected": "Go away.", "source": "rating",
         "response_ids": ["b", "c"]},
    ]
    assert sft_examples(entries) == [
        {"messages": HELLO + [{"role": "assistant", "content": "Hello! How can I help you today?"}]},
        {"messages": HELLO + [{"role": "assistant", "content": "Hello there, friend."}]},
        {"messages": OTHER + [{"role": "assistant", "content": "4"}]},
    ]


def test_exports_are_what_picochat_dpo_and_sft_read(tmp_path, capsys):
    db = tmp_path / "fb.db"
    store = FeedbackStore(db)
    store.record("a", OTHER, "5", "down", edited="4", model="tiny")
    store.record("b", OTHER, "four", "up", model="tiny")
    assert run_cli(["feedback", "export", "--format", "dpo", "--db", db, "--out", tmp_path / "pairs.jsonl"],
                   capsys)[:2] == (0, f"2 preference pairs from 2 rating(s) written to {tmp_path / 'pairs.jsonl'}\n")
    pairs = load_pairs(tmp_path / "pairs.jsonl")
    assert [(p.chosen, p.rejected) for p in pairs] == [("4", "5"), ("four", "5")]
    code, out, _ = run_cli(["feedback", "export", "--format", "sft", "--db", db], capsys)
    assert code == 0 and [json.loads(line)["messages"][-1]["content"] for line in out.splitlines()] == ["4", "four"]
    (tmp_path / "chats.jsonl").write_text(out)
    assert [c[-1]["content"] for c in load_conversations(str(tmp_path / "chats.jsonl"))] == ["4", "four"]


# ----------------------------------------------------------------------------- the CLI
def test_cli_ls_and_its_errors(tmp_path, capsys):
    db = tmp_path / "fb.db"
    code, out, _ = run_cli(["feedback", "ls", "--db", db], capsys)
    assert code == 0 and out.startswith("no feedback in") and not db.exists()
    FeedbackStore(db).record("a", [{"role": "user", "content": "How do I   reverse a list in Python quickly?"}],
                             "Use reversed() or a slice with a step of -1, like items[::-1].", "down",
                             edited="items[::-1]", model="qwen2.5-coder-1.5b", adapter="my-lora")
    code, out, _ = run_cli(["feedback", "ls", "--db", db], capsys)
    header, row = out.splitlines()
    assert header.split() == ["TIME", "RATING", "EDITED", "MODEL", "USER", "REPLY"]
    assert "down" in row and "yes" in row and "qwen2.5-coder-1.5b + my-lora" in row
    assert "  How do I reverse a list in Python q…  " in row and row.endswith("  items[::-1]")   # the edit
    code, out, _ = run_cli(["feedback", "ls", "--json", "--db", db], capsys)
    [listed] = json.loads(out)
    assert listed["edited"] == "items[::-1]" and listed["adapter"] == "my-lora"
    foreign = tmp_path / "theirs.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE t (x)")
    for argv in (["ls"], ["export", "--format", "dpo"]):
        code, out, err = run_cli(["feedback", *argv, "--db", foreign], capsys)
        assert code == 1 and out == "" and err.count("\n") == 1
        assert err.startswith(f"picochat: error: {foreign} is another SQLite database")


# ----------------------------------------------------------------------------- POST /v1/feedback
@pytest.fixture(scope="module")
def engine():
    return tiny_engine(TEXT, vocab_size=300)


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("feedback") / "feedback.db"


@pytest.fixture(scope="module")
def server(engine, db):
    yield from serving(engine, feedback_db=db)


def completion_id(server, **body) -> tuple[str, str]:
    """A non-streamed reply to HELLO: (its id, its text)."""
    reply = server.chat(HELLO, max_tokens=6, temperature=0, **body)
    return reply["id"], reply["choices"][0]["message"]["content"]


def streamed_reply(server, messages) -> tuple[str, str]:
    """A streamed reply: (the id its chunks carry, the text they join to)."""
    body = {"model": "tiny", "messages": messages, "max_tokens": 6, "temperature": 0, "stream": True}
    ids, text = set(), ""
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                ids.add(chunk["id"])
                text += "".join(c["delta"].get("content") or "" for c in chunk["choices"])
    [response_id] = ids
    return response_id, text


def test_nothing_is_written_for_replies_nobody_rates(engine, tmp_path):
    with LiveServer(lambda: engine, "tiny", feedback_db=tmp_path / "fb.db") as live:
        live.wait_loaded()
        completion_id(live)
        streamed_reply(live, HELLO)
    assert list(tmp_path.iterdir()) == []


def test_a_rating_is_stored_with_the_conversation_and_the_model(server, db, monkeypatch):
    monkeypatch.setattr(server.state.serving, "adapter", "support-lora")   # as a swap would serve it
    response_id, text = completion_id(server)
    conversation = [{"role": "system", "content": "Be kind."}, {"role": "developer", "content": "Be brief."},
                    *HELLO]
    streamed_id, streamed_text = streamed_reply(server, conversation)
    r = server.post("/v1/feedback", {"response_id": response_id, "rating": "down", "edited": "Hello! How are you?"})
    assert r.status_code == 200 and r.json() == {"id": response_id, "object": "feedback", "rating": "down",
                                                 "stored": True}
    assert server.post("/v1/feedback", {"response_id": streamed_id, "rating": "up"}).status_code == 200
    stored = {e.response_id: e for e in FeedbackStore(db).entries()}
    first, second = stored[response_id], stored[streamed_id]
    assert (first.messages, first.reply, first.rating, first.edited) == (HELLO, text, "down", "Hello! How are you?")
    assert (first.model, first.adapter) == ("tiny", "support-lora")
    assert second.reply == streamed_text and second.rating == "up" and second.edited is None
    assert second.messages[1] == {"role": "system", "content": "Be brief."}   # as the chat template saw it
    metrics = httpx.get(server.url + "/metrics").text
    assert 'picochat_requests_total{route="/v1/feedback",status="200"}' in metrics


def test_of_several_choices_the_first_is_rated(server, db):
    reply = server.chat(HELLO, max_tokens=6, temperature=1.0, seed=3, n=2)
    assert server.post("/v1/feedback", {"response_id": reply["id"], "rating": "up"}).status_code == 200
    stored = {e.response_id: e for e in FeedbackStore(db).entries()}[reply["id"]]
    assert stored.reply == reply["choices"][0]["message"]["content"]


def test_the_server_remembers_only_its_latest_replies(server, monkeypatch):
    monkeypatch.setattr(state_module, "REMEMBERED_REPLIES", 2)
    ids = [completion_id(server)[0] for _ in range(3)]
    assert server.state.recalled(ids[0]) is None and server.state.recalled(ids[2]) is not None
    r = server.post("/v1/feedback", {"response_id": ids[0], "rating": "up"})
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["param"] == "response_id" and "remembers only" in error["message"]


def test_grounded_and_declined_replies_are_rated_as_the_client_got_them(tmp_path):
    """A knowledge base's reply is stored with its sources footer (what the user saw and edits); a decline,
    written without the model, can be rated too ("it should have answered")."""
    from helpers import FakeEncoder, FakeKB
    from picochat.serve.knowledge import Knowledge
    kb = FakeKB()
    knowledge = Knowledge(["shop"], open_kb=lambda name, encoder: kb, load_encoder=FakeEncoder)
    engine = tiny_engine(TEXT, vocab_size=300, max_seq_len=1024)   # room for the sources in the prompt
    with LiveServer(lambda: engine, "tiny", knowledge=knowledge, feedback_db=tmp_path / "fb.db") as live:
        live.wait_loaded()
        grounded_id, grounded = streamed_reply(live, [{"role": "user", "content": "Can I return a tent?"}])
        declined_id, declined = streamed_reply(live, [{"role": "user", "content": "Who won the world cup?"}])
        for response_id in (grounded_id, declined_id):
            assert live.post("/v1/feedback", {"response_id": response_id, "rating": "down"}).status_code == 200
    stored = {e.response_id: e.reply for e in FeedbackStore(tmp_path / "fb.db").entries()}
    assert "Sources: [" in grounded and stored[grounded_id] == grounded
    assert stored[declined_id] == declined == kb.settings["handoff"]


BAD_BODIES = [
    ({"rating": "up"}, "response_id"),
    ({"response_id": "R"}, "rating"),
    ({"response_id": "R", "rating": "meh"}, "rating"),
    ({"response_id": "R", "rating": 1}, "rating"),
    ({"response_id": "R", "rating": None}, "rating"),
    ({"response_id": 5, "rating": "up"}, "response_id"),
    ({"response_id": "", "rating": "up"}, "response_id"),
    ({"response_id": "x" * 257, "rating": "up"}, "response_id"),
    ({"response_id": "R", "rating": "up", "edited": 5}, "edited"),
    ({"response_id": "R", "rating": "up", "edited": ["text"]}, "edited"),
    ({"response_id": "R", "rating": "up", "edited": " \n"}, "edited"),
    ({"response_id": "R", "rating": "down", "edited": "x" * (MAX_EDITED_CHARS + 1)}, "edited"),
    ({"response_id": "R", "rating": "up", "comment": "great"}, "comment"),    # a misspelt field is not dropped
    ({"response_id": "R", "rating": "up", "edit": "the fix"}, "edit"),
    ({"response_id": "chatcmpl-never-given", "rating": "up"}, "response_id"),   # a 404
]


@pytest.mark.parametrize("body,field", BAD_BODIES, ids=[f for _, f in BAD_BODIES])
def test_every_bad_body_gets_a_4xx_naming_the_field(server, body, field):
    if body.get("response_id") == "R":   # otherwise valid: only the named field is wrong
        body = {**body, "response_id": completion_id(server)[0]}
    r = server.post("/v1/feedback", body)
    unknown = "never-given" in str(body)
    assert r.status_code == (404 if unknown else 400), r.text
    error = r.json()["error"]
    assert error["param"] == field
    assert ("no reply with the id" if unknown else f"'{field}'") in error["message"]


def test_a_body_that_is_not_an_object_is_refused(server):
    for raw in (b"", b"[1]", b'"up"', b"{", b'{"response_id": NaN}'):
        r = server.post("/v1/feedback", raw)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", raw


def test_a_store_that_cannot_be_written_is_a_500_without_the_servers_paths(engine, tmp_path):
    theirs = tmp_path / "theirs.db"
    with sqlite3.connect(theirs) as conn:
        conn.execute("CREATE TABLE t (x)")
    with LiveServer(lambda: engine, "tiny", feedback_db=theirs) as live:
        live.wait_loaded()
        r = live.post("/v1/feedback", {"response_id": completion_id(live)[0], "rating": "up"})
    assert r.status_code == 500 and r.json()["error"]["code"] == "feedback_not_stored"
    assert str(tmp_path) not in r.text and "another SQLite database" in r.text


def test_ratings_survive_a_server_restart(engine, tmp_path, capsys):
    db = tmp_path / "fb.db"
    with LiveServer(lambda: engine, "tiny", feedback_db=db) as before:
        before.wait_loaded()
        old_id = completion_id(before)[0]
        assert before.post("/v1/feedback", {"response_id": old_id, "rating": "down"}).status_code == 200
    with LiveServer(lambda: engine, "tiny", feedback_db=db) as after:
        after.wait_loaded()
        assert after.post("/v1/feedback", {"response_id": old_id, "rating": "up"}).status_code == 404  # memory only
        new_id = completion_id(after)[0]
        assert after.post("/v1/feedback", {"response_id": new_id, "rating": "up"}).status_code == 200
    code, out, _ = run_cli(["feedback", "ls", "--json", "--db", db], capsys)
    assert code == 0 and [(e["response_id"], e["rating"]) for e in json.loads(out)] == [(old_id, "down"),
                                                                                        (new_id, "up")]


# ----------------------------------------------------------------------------- fuzzing
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(1 << 80), max_value=1 << 80)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)
fuzzed_bodies = st.fixed_dictionaries({}, optional={
    "response_id": st.just("GIVEN") | json_values,
    "rating": st.sampled_from(["up", "down", "UP", ""]) | json_values,
    "edited": st.text(max_size=40) | json_values,
    "comment": json_values})


@settings(max_examples=FUZZ_EXAMPLES, derandomize=DERANDOMIZE, database=None, deadline=None)
@given(body=fuzzed_bodies)
def test_fuzz_schema_accepts_or_refuses_by_name(body):
    try:
        request = validate(FeedbackRequest, parse_json(json.dumps(body).encode()))
    except RequestError as e:
        assert e.status == 400 and re.split(r"[.\[]", e.param)[0] in set(body) | {"response_id", "rating"}
        return
    assert request.rating in ("up", "down") and set(body) <= {"response_id", "rating", "edited"}


@settings(max_examples=max(20, FUZZ_EXAMPLES // 5), derandomize=DERANDOMIZE, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(body=fuzzed_bodies)
def test_fuzz_live_server_never_answers_500(server, body):
    if body.get("response_id") == "GIVEN":
        body["response_id"] = next(reversed(server.state.replies), "none yet")
    r = server.post("/v1/feedback", body)
    assert r.status_code in (200, 400, 404), r.text
    if r.status_code != 200:
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["param"]
