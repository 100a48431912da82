"""Anthropic's Messages API (serve/anthropic.py), live on 127.0.0.1, driven by the official `anthropic` client
and raw HTTP: replies against the engine's own greedy output, tools under each tool_choice, the exact event
order of a stream and its equality with the whole reply, stop sequences, token counts, and errors in
Anthropic's shape. The model is a tiny random one: the tests check shapes and contracts, not answers."""
import json
import re

import anthropic
import httpx
import jsonschema
import pytest

from picochat.engine import sampling as engine_module
from picochat.engine.sampling import SamplingParams
from picochat.engine.tool_parser import ParsedDelta, ToolCallDelta
from picochat.serve.anthropic import Blocks, MessagesRequest, error_body, messages_of
from picochat.serve.protocol import APIError, validate

from helpers import LiveServer, serving, tiny_tool_engine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_hardening_server import DERANDOMIZE, FUZZ_EXAMPLES, json_values

TEXT = ('Hello there! {"name": "Ada", "age": 36, "tags": ["x", "y"], "ok": true, "score": 0.5} '
        "What is the weather in Paris? London, Tokyo. 2024-01-01 abc-123 null, false. ") * 40

# schemas a random model's calls end under (enums, integer ranges, short strings, no extra properties)
WEATHER = {"name": "get_weather", "description": "The weather in a city.", "input_schema": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "London", "Tokyo"]},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 5}},
    "required": ["city", "days"], "additionalProperties": False}}
CLOCK = {"name": "get_time", "description": "The time in a zone.", "input_schema": {
    "type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}},
    "required": ["zone"], "additionalProperties": False}}
TOOLS = [WEATHER, CLOCK]
SCHEMAS = {t["name"]: t["input_schema"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
GREEDY = {"temperature": 0}   # the 2.x SDK has no temperature argument: sent as an extra body field


@pytest.fixture(scope="module")
def engine():
    return tiny_tool_engine(TEXT)


@pytest.fixture(scope="module")
def server(engine):
    yield from serving(engine)


@pytest.fixture()
def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0)


def events_of(server, body) -> list[tuple[str, dict]]:
    """A streamed reply's (event name, data) pairs, read from the raw SSE text."""
    with httpx.stream("POST", server.url + "/v1/messages", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        text = "".join(r.iter_text())
    events = []
    for chunk in text.strip().split("\n\n"):
        name, data = chunk.split("\n")
        events.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return events


def joined_content(events) -> list[dict]:
    """The content blocks a stream builds: starts, text deltas joined, partial_json joined and parsed."""
    blocks, pieces = [], []
    for _, data in events:
        if data["type"] == "content_block_start":
            blocks.append(dict(data["content_block"]))
            pieces.append("")
        elif data["type"] == "content_block_delta":
            delta = data["delta"]
            if delta["type"] == "text_delta":
                blocks[data["index"]]["text"] += delta["text"]
            else:
                pieces[data["index"]] += delta["partial_json"]
    for block, piece in zip(blocks, pieces):
        if block["type"] == "tool_use" and piece:
            block["input"] = json.loads(piece)
    return blocks


def shape(message) -> dict:
    """A message as the SDK reads it, less what differs between two requests (message and tool-use ids)."""
    content = [{k: v for k, v in b.model_dump(exclude_none=True).items() if k != "id"} for b in message.content]
    return {"content": content, "stop_reason": message.stop_reason, "stop_sequence": message.stop_sequence,
            "usage": message.usage.model_dump(exclude_none=True), "model": message.model, "role": message.role}


# ----------------------------------------------------------------------------- text replies
def test_text_reply_matches_the_engine(client, engine, server):
    m = client.messages.create(model="tiny", max_tokens=20, system="Be brief.", extra_body=GREEDY,
                               messages=[{"role": "user", "content": "Hello there!"}])
    prompt = engine.chat_prompt([{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "Hello there!"}])
    want = engine.complete(prompt, SamplingParams(temperature=0, max_new_tokens=20))
    assert want.text and [b.type for b in m.content] == ["text"] and m.content[0].text == want.text
    assert m.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[want.finish_reason]
    assert m.stop_sequence is None and m.type == "message" and m.role == "assistant" and m.model == "tiny"
    assert m.id.startswith("msg_")
    assert (m.usage.input_tokens, m.usage.output_tokens) == (len(prompt), len(want.token_ids))
    raw = server.post("/v1/messages", {"model": "tiny", "max_tokens": 5, "messages": ASK}).json()
    assert list(raw) == ["id", "type", "role", "model", "content", "stop_reason", "stop_sequence", "usage"]
    assert list(raw["usage"]) == ["input_tokens", "output_tokens"]


def test_system_as_blocks_is_the_same_prompt(client):
    as_text = client.messages.count_tokens(model="tiny", system="Be brief. Be kind.", messages=ASK)
    as_blocks = client.messages.count_tokens(model="tiny", messages=ASK, system=[
        {"type": "text", "text": "Be brief. "}, {"type": "text", "text": "Be kind."}])
    shorter = client.messages.count_tokens(model="tiny", system="Be brief.", messages=ASK)
    assert as_text.input_tokens == as_blocks.input_tokens > shorter.input_tokens


def test_max_tokens_ends_the_reply(client):
    m = client.messages.create(model="tiny", max_tokens=3, messages=ASK, extra_body=GREEDY)
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 3


def test_stop_sequences(client, server):
    base = client.messages.create(model="tiny", max_tokens=20, messages=ASK, extra_body=GREEDY).content[0].text
    # two plain characters from the middle of the greedy reply, where they first occur
    cut = next(i for i in range(len(base) // 2, len(base) - 1)
               if base[i:i + 2].isascii() and base[i:i + 2].isprintable() and base.find(base[i:i + 2]) == i)
    stop = base[cut:cut + 2]
    kwargs = {"model": "tiny", "max_tokens": 20, "messages": ASK, "extra_body": GREEDY,
              "stop_sequences": ["never in the reply", stop]}
    m = client.messages.create(**kwargs)
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == stop
    assert "".join(b.text for b in m.content) == base[:cut]
    with client.messages.stream(**kwargs) as s:
        assert shape(s.get_final_message()) == shape(m)
    unmatched = client.messages.create(**{**kwargs, "stop_sequences": ["never in the reply"]})
    assert unmatched.stop_reason != "stop_sequence" and unmatched.stop_sequence is None


# ----------------------------------------------------------------------------- tools
def test_a_named_tool_gives_exactly_that_call(client):
    for _ in range(3):   # sampled (temperature 1): different inputs, each valid under the schema
        m = client.messages.create(model="tiny", max_tokens=80, messages=ASK, tools=TOOLS,
                                   tool_choice={"type": "tool", "name": "get_weather"})
        assert [b.type for b in m.content] == ["tool_use"] and m.stop_reason == "tool_use"
        call = m.content[0]
        assert call.name == "get_weather" and call.id.startswith("toolu_")
        jsonschema.validate(call.input, WEATHER["input_schema"])


def test_any_gives_calls_and_none_gives_none(client):
    m = client.messages.create(model="tiny", max_tokens=200, messages=ASK, tools=TOOLS, tool_choice={"type": "any"},
                               extra_body=GREEDY)
    calls = [b for b in m.content if b.type == "tool_use"]
    assert calls and m.stop_reason == "tool_use" and len({c.id for c in calls}) == len(calls)
    for call in calls:
        jsonschema.validate(call.input, SCHEMAS[call.name])
    one = client.messages.create(model="tiny", max_tokens=200, messages=ASK, tools=TOOLS,
                                 tool_choice={"type": "any", "disable_parallel_tool_use": True})
    assert [b.type for b in one.content] == ["tool_use"] and one.stop_reason == "tool_use"
    none = client.messages.create(model="tiny", max_tokens=20, messages=ASK, tools=TOOLS, tool_choice={"type": "none"})
    assert all(b.type == "text" for b in none.content) and none.stop_reason in ("end_turn", "max_tokens")


ROUND_TRIP = ASK + [
    {"role": "assistant", "content": [{"type": "text", "text": "Let me check."},
                                      {"type": "tool_use", "id": "toolu_01", "name": "get_weather",
                                       "input": {"city": "Paris", "days": 1}}]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "18 degrees, sunny"},
                                 {"type": "text", "text": "Thanks!"}]}]


def test_a_tool_result_round_trip_is_answered(client):
    m = client.messages.create(model="tiny", max_tokens=10, messages=ROUND_TRIP, tools=TOOLS)
    assert m.stop_reason in ("end_turn", "max_tokens", "tool_use") and m.usage.output_tokens > 0
    counted = client.messages.count_tokens(model="tiny", messages=ROUND_TRIP, tools=TOOLS).input_tokens
    assert counted == m.usage.input_tokens > client.messages.count_tokens(model="tiny", messages=ASK,
                                                                           tools=TOOLS).input_tokens


def test_the_conversation_becomes_the_chat_paths_messages():
    body = validate(MessagesRequest, {"model": "tiny", "max_tokens": 5, "system": [{"type": "text", "text": "Hi."}],
                                      "messages": ROUND_TRIP + [
                                          {"role": "assistant", "content": [
                                              {"type": "tool_use", "id": "toolu_02", "name": "get_time",
                                               "input": {"zone": "UTC"}}]},
                                          {"role": "user", "content": [
                                              {"type": "tool_result", "tool_use_id": "toolu_02", "is_error": True,
                                               "content": [{"type": "text", "text": "no "}, {"type": "text",
                                                                                           "text": "clock"}]}]}]})
    assert messages_of(body) == [
        {"role": "system", "content": "Hi."},
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "Let me check.",
         "tool_calls": [{"id": "toolu_01", "name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'}]},
        {"role": "tool", "tool_call_id": "toolu_01", "content": "18 degrees, sunny"},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "toolu_02", "name": "get_time",
                                                             "arguments": '{"zone": "UTC"}'}]},
        {"role": "tool", "tool_call_id": "toolu_02", "content": "Error: no clock"}]


# ----------------------------------------------------------------------------- streaming
STREAM_ORDER = re.compile(r"message_start ping (content_block_start (content_block_delta )*content_block_stop )*"
                          r"message_delta message_stop")
CASES = {"text": {"model": "tiny", "max_tokens": 20, "messages": ASK, **GREEDY},
         "forced tool": {"model": "tiny", "max_tokens": 80, "messages": ASK, "tools": TOOLS, **GREEDY,
                         "tool_choice": {"type": "tool", "name": "get_weather"}},
         "auto tools": {"model": "tiny", "max_tokens": 60, "messages": ASK, "tools": TOOLS, **GREEDY}}


@pytest.mark.parametrize("case", CASES)
def test_stream_event_order_and_equality_with_the_whole_reply(server, case):
    body = CASES[case]
    events = events_of(server, body)
    names = [name for name, _ in events]
    assert all(name == data["type"] for name, data in events)
    assert STREAM_ORDER.fullmatch(" ".join(names)), names
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["output_tokens"] == 0
    open_block = None
    for _, data in events:   # blocks never interleave: each delta is for the one open block, of its kind
        if data["type"] == "content_block_start":
            open_block = (data["index"], data["content_block"]["type"])
            assert data["content_block"] in ({"type": "text", "text": ""}, {**data["content_block"], "input": {}})
        elif data["type"] == "content_block_delta":
            kind = {"text_delta": "text", "input_json_delta": "tool_use"}[data["delta"]["type"]]
            assert (data["index"], kind) == open_block
        elif data["type"] == "content_block_stop":
            assert data["index"] == open_block[0]
    whole = httpx.post(server.url + "/v1/messages", json=body, timeout=60).json()
    streamed = joined_content(events)
    assert [{k: v for k, v in b.items() if k != "id"} for b in streamed] == \
           [{k: v for k, v in b.items() if k != "id"} for b in whole["content"]]
    assert all(b["id"].startswith("toolu_") for b in streamed if b["type"] == "tool_use")
    end = events[-2][1]
    assert end["delta"] == {"stop_reason": whole["stop_reason"], "stop_sequence": None}
    assert end["usage"] == {"output_tokens": whole["usage"]["output_tokens"]}
    assert start["usage"]["input_tokens"] == whole["usage"]["input_tokens"]
    if case == "forced tool":
        assert [b["type"] for b in streamed] == ["tool_use"] and whole["stop_reason"] == "tool_use"


def test_blocks_never_interleave_and_join_as_the_whole_reply():
    blocks, events = Blocks(), []
    for delta in [ParsedDelta(content="Let me "), ParsedDelta(content="look."),
                  ParsedDelta(calls=[ToolCallDelta(0, "call_a1", "get_weather", '{"city": ')]),
                  ParsedDelta(calls=[ToolCallDelta(0, arguments='"Paris"}')]),
                  ParsedDelta(calls=[ToolCallDelta(1, "call_b2", "get_time", '{"zone": "UT')]),   # cut short
                  ParsedDelta(content="More text.")]:
        events += blocks.add(delta)
    events += blocks.stop()
    assert [(e.type, getattr(e, "index", None)) for e in events] == [
        ("content_block_start", 0), ("content_block_delta", 0), ("content_block_delta", 0), ("content_block_stop", 0),
        ("content_block_start", 1), ("content_block_delta", 1), ("content_block_delta", 1), ("content_block_stop", 1),
        ("content_block_start", 2), ("content_block_delta", 2), ("content_block_stop", 2),
        ("content_block_start", 3), ("content_block_delta", 3), ("content_block_stop", 3)]
    assert events[0].content_block.text == "" and events[4].content_block.input == {}   # started empty
    assert [b.model_dump() for b in blocks.content] == [
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "toolu_a1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "toolu_b2", "name": "get_time", "input": {}},   # as the SDKs read partial JSON
        {"type": "text", "text": "More text."}]


def test_the_stop_string_that_ended_a_generation_is_recorded(engine):
    """Generation.stop_string (what stop_sequence reports): of several stops starting at the earliest hit,
    the shortest (it completed first); None when the turn ended or max_tokens cut it."""
    ids = engine.chat_prompt(ASK)
    text = engine.complete(ids, SamplingParams(max_new_tokens=24, temperature=0)).text
    longer, shorter = text[4:8], text[4:6]
    at = min(text.find(longer), text.find(shorter))
    gen = engine.complete(ids, SamplingParams(max_new_tokens=24, temperature=0, stop=["\u2603", longer, shorter]))
    assert gen.text == text[:at] and gen.finish_reason == "stop"
    assert gen.stop_string == min((s for s in (longer, shorter) if text.startswith(s, at)), key=len)
    cut = engine.complete(ids, SamplingParams(max_new_tokens=3, temperature=0, stop=["\u2603"]))
    assert cut.stop_string is None and cut.finish_reason == "length"


@pytest.mark.parametrize("case", ["text", "forced tool"])
def test_the_sdks_stream_builds_the_same_message(client, case):
    kwargs = {k: v for k, v in CASES[case].items() if k != "temperature"}
    created = client.messages.create(**kwargs, extra_body=GREEDY)
    with client.messages.stream(**kwargs, extra_body=GREEDY) as s:
        final = s.get_final_message()
    assert shape(final) == shape(created)
    assert created.content and final.content[0].type == ("text" if case == "text" else "tool_use")


# ----------------------------------------------------------------------------- counting tokens
def test_count_tokens_equals_the_replys_input_tokens(client):
    kwargs = {"model": "tiny", "system": "Be brief.", "messages": ASK, "tools": TOOLS}
    counted = client.messages.count_tokens(**kwargs)
    m = client.messages.create(**kwargs, max_tokens=3)
    assert counted.input_tokens == m.usage.input_tokens > 0


# ----------------------------------------------------------------------------- errors
DEEP = {"type": "object"}
for _ in range(200):
    DEEP = {"type": "object", "properties": {"a": DEEP}}
OK = {"model": "tiny", "max_tokens": 5, "messages": ASK}
BAD = [  # (body, the field its error must name)
    ({"model": "tiny", "messages": ASK}, "max_tokens"),
    ({**OK, "max_tokens": 0}, "max_tokens"),
    ({**OK, "tools": [{"input_schema": {"type": "object"}}]}, "tools[0].name"),
    ({**OK, "tools": [{"name": "f", "input_schema": {"type": "string"}}]}, "tools[0].input_schema"),
    ({**OK, "tools": [{"name": "f", "input_schema": "object"}]}, "tools[0].input_schema"),
    ({**OK, "tools": [{"name": "f", "input_schema": DEEP}]}, "tools[0].input_schema"),
    ({**OK, "tools": [{"name": "f", "input_schema": {"type": "object", "properties": {"a": {"not": {}}}}}]},
     "tools[0].input_schema"),
    ({**OK, "tools": TOOLS, "tool_choice": {"type": "tool", "name": "nope"}}, "tool_choice.name"),
    ({**OK, "tools": TOOLS, "tool_choice": {"type": "tool"}}, "tool_choice"),
    ({**OK, "tool_choice": {"type": "any"}}, "tool_choice"),
    ({**OK, "messages": [{"role": "user", "content": [{"type": "tool_result", "content": "x"}]}]},
     "messages[0].content[0].tool_use_id"),
    ({**OK, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "messages[0].content[0]"),
    ({**OK, "messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]},
     "messages[0]"),
    ({**OK, "messages": ASK + [{"role": "assistant", "content": "Sure"}]}, "messages[1].role"),
    ({**OK, "temperature": 1.5}, "temperature"),
    ({**OK, "stop_sequences": ["a"] * 9}, "stop_sequences"),
]


@pytest.mark.parametrize("body, field", BAD, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD)])
def test_bad_requests_get_anthropics_error_naming_the_field(server, body, field):
    r = server.post("/v1/messages", body)
    assert r.status_code == 400, r.text
    error = r.json()
    assert list(error) == ["type", "error"] and error["type"] == "error"
    assert error["error"]["type"] == "invalid_request_error" and field in error["error"]["message"]
    if field in ("max_tokens", "temperature", "stop_sequences"):   # count_tokens takes (ignores) none of them
        return
    counted = server.post("/v1/messages/count_tokens", body)
    assert counted.status_code == 400 and field in counted.json()["error"]["message"]


def test_wrong_model_unknown_path_and_oversized_body(client, server):
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="gpt-4", max_tokens=5, messages=ASK)
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "not_found_error"
    assert "gpt-4" in e.value.body["error"]["message"]
    assert server.post("/v1/messages/count_tokens", {**OK, "model": "gpt-4"}).status_code == 404
    r = server.post("/v1/messages/batches", OK)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.get(server.url + "/v1/messages")
    assert r.status_code == 405 and r.json()["type"] == "error"
    r = server.post("/v1/messages", b" " * (4 * 1024 * 1024 + 1))
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"
    openai_side = server.post("/v1/chat/completions", {"model": "gpt-4", "messages": ASK})
    assert openai_side.status_code == 404 and openai_side.json()["error"]["code"] == "model_not_found"


def test_error_types_by_status():
    assert error_body(APIError(503, "the queue is full", code="queue_full")).error.type == "overloaded_error"
    assert error_body(APIError(500, "generation failed: x")).error.type == "api_error"
    assert error_body(APIError(504, "timed out")).error.type == "api_error"
    named = error_body(APIError(400, "cannot be enforced", "tools[1].function.parameters")).error
    assert named.message == "tools[1].input_schema: cannot be enforced"


def failing_when_stopped_by(sample_rows, stop: str):
    """engine.sampling.sample_rows, except that it raises for a batch holding a request with this stop string."""
    def faulty(logits, params, generators, seen=None, allowed=None):
        if any(stop in p.stop for p in params):
            raise FloatingPointError("injected sampler fault")
        return sample_rows(logits, params, generators, seen, allowed)
    return faulty


def test_a_failure_is_anthropics_error_whole_or_streamed(server, monkeypatch):
    monkeypatch.setattr(engine_module, "sample_rows", failing_when_stopped_by(engine_module.sample_rows, "boom"))
    body = {**OK, "stop_sequences": ["boom"]}
    r = server.post("/v1/messages", body)
    assert r.status_code == 500 and r.json()["error"]["type"] == "api_error"
    assert "injected" in r.json()["error"]["message"]
    events = events_of(server, body)
    assert [name for name, _ in events] == ["message_start", "ping", "error"]
    assert events[-1][1]["type"] == "error" and events[-1][1]["error"]["type"] == "api_error"
    assert server.post("/v1/messages", OK).status_code == 200   # the others go on


def test_api_key(engine):
    with LiveServer(lambda: engine, "tiny", api_key="s3cret") as live:
        live.wait_loaded()
        url = live.url + "/v1/messages"
        assert httpx.post(url, json=OK, headers={"x-api-key": "s3cret"}).status_code == 200
        assert httpx.post(url, json=OK, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        for headers in ({}, {"x-api-key": "wrong"}, {"Authorization": "Bearer wrong"}):
            r = httpx.post(url, json=OK, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            assert r.json()["type"] == "error"
        counted = httpx.post(url + "/count_tokens", json=OK, headers={"x-api-key": "wrong"})
        assert counted.status_code == 401
        good = anthropic.Anthropic(base_url=live.url, api_key="s3cret", max_retries=0)
        assert good.messages.create(model="tiny", max_tokens=3, messages=ASK).content
        with pytest.raises(anthropic.AuthenticationError):
            anthropic.Anthropic(base_url=live.url, api_key="nope", max_retries=0).messages.create(
                model="tiny", max_tokens=3, messages=ASK)
        openai_side = httpx.post(live.url + "/v1/chat/completions", headers={"x-api-key": "s3cret"},
                                 json={"model": "tiny", "messages": ASK, "max_tokens": 3})
        assert openai_side.status_code == 401 and openai_side.json()["error"]["code"] == "invalid_api_key"


# ----------------------------------------------------------------------------- fuzzing
blocks = st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "tool_use", "tool_result", "image", 3])},
                                        optional={"text": json_values, "id": json_values, "name": json_values,
                                                  "input": json_values, "tool_use_id": json_values,
                                                  "content": json_values, "is_error": json_values}), max_size=3)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool"])},
                                          optional={"content": st.text(max_size=20) | blocks | json_values}),
                    max_size=3)
ANTHROPIC_FIELDS = {"max_tokens": st.integers(-2, 6) | json_values, "system": st.text(max_size=10) | blocks | json_values,
                    "messages": messages, "tools": st.lists(st.fixed_dictionaries({}, optional={
                        "name": st.sampled_from(["get_weather", "", "bad name"]) | json_values,
                        "input_schema": json_values}), max_size=2) | json_values,
                    "tool_choice": st.fixed_dictionaries({"type": st.sampled_from(["auto", "any", "tool", "none", "x"])},
                                                         optional={"name": json_values}) | json_values,
                    "stop_sequences": json_values, "temperature": json_values, "top_p": json_values,
                    "top_k": json_values, "stream": st.booleans()}
anthropic_bodies = st.fixed_dictionaries({}, optional=ANTHROPIC_FIELDS).map(
    lambda d: {"model": "tiny", "max_tokens": 3, "messages": ASK, **d})


@settings(max_examples=max(20, FUZZ_EXAMPLES // 5), derandomize=DERANDOMIZE, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(body=anthropic_bodies, path=st.sampled_from(["/v1/messages", "/v1/messages/count_tokens"]))
def test_fuzz_messages_never_answers_500(server, body, path):
    """Random bodies: a reply, or a 4xx in Anthropic's error shape naming the problem — never a 500."""
    if isinstance(body.get("max_tokens"), int) and not isinstance(body.get("max_tokens"), bool):
        body["max_tokens"] = min(body["max_tokens"], 6)   # keep generation short; the checks still run
    r = server.post(path, body)
    assert r.status_code in (200, 400, 404), r.text
    if r.status_code != 200:
        error = r.json()
        assert error["type"] == "error" and error["error"]["type"] and error["error"]["message"]
