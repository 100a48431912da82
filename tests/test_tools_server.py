"""Tools, answer shapes and n > 1 on the OpenAI endpoints, live, through the official `openai` client (and
langchain-openai where it installs): every tool_choice honoured, calls in OpenAI's shape, a streamed call
joining to exactly the non-streamed one, tool results accepted back, schemas enforced or refused with a
400 naming the field — never a 200 with unconstrained text."""
import json

import jsonschema
import openai
import pydantic
import pytest

from helpers import LiveServer, serving, tiny_engine, tiny_tool_engine
from test_grammar import SCHEMAS, TEXT

WEATHER = {"type": "object", "properties": {
    "city": {"enum": ["Paris", "London", "Tokyo"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather forecast",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "The time", "parameters": TIME}},
         {"type": "function", "function": {"name": "ping", "description": "No arguments",
                                           "parameters": {"type": "object", "properties": {},
                                                          "additionalProperties": False}}}]
SCHEMA_OF = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def engine():
    return tiny_tool_engine(TEXT)


@pytest.fixture(scope="module")
def server(engine):
    yield from serving(engine)


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def chat(client, **kwargs):
    kwargs = {"model": "tiny", "messages": ASK, "max_tokens": 120, "seed": 1, **kwargs}
    return client.chat.completions.create(**kwargs)


def valid_calls(message):
    for call in message.tool_calls or []:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])
    return [c.function.name for c in message.tool_calls or []]


# ----------------------------------------------------------------------------- tool_choice
@pytest.mark.parametrize("name", ["get_weather", "get_time", "ping"])
def test_a_named_tool_is_called_exactly_once_with_valid_arguments(client, name):
    for seed in range(3):
        r = chat(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": name}}, seed=seed,
                 temperature=1.0)
        choice = r.choices[0]
        assert valid_calls(choice.message) == [name]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None


def test_required_calls_at_least_one_and_parallel_false_at_most_one(client):
    for seed in range(3):
        r = chat(client, tools=TOOLS, tool_choice="required", seed=seed, temperature=1.0, max_tokens=200)
        if r.choices[0].finish_reason == "tool_calls":
            assert len(valid_calls(r.choices[0].message)) >= 1
        one = chat(client, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, seed=seed, temperature=1.0)
        assert len(valid_calls(one.choices[0].message)) == 1 and one.choices[0].finish_reason == "tool_calls"


def test_none_never_calls_and_auto_never_leaks_markup(client):
    for seed in range(3):
        r = chat(client, tools=TOOLS, tool_choice="none", seed=seed, temperature=1.0, max_tokens=40)
        assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")
        assert "<tool_call>" not in r.choices[0].message.content
        auto = chat(client, tools=TOOLS, seed=seed, temperature=1.0, max_tokens=40)
        valid_calls(auto.choices[0].message)
        assert "<tool_call>" not in (auto.choices[0].message.content or "")


def streamed(client, **kwargs):
    """A streamed reply joined as a client joins it: content, and each call's id, name and arguments."""
    content, calls, finish, first = None, {}, None, []
    for chunk in chat(client, stream=True, **kwargs):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        if delta.content:
            content = (content or "") + delta.content
        for d in delta.tool_calls or []:
            if d.index not in calls:
                first.append((d.id, d.function.name))
                assert d.id and d.function.name and d.type == "function"
                calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
            else:
                assert d.id is None and d.function.name is None   # id and name are sent once
            calls[d.index]["arguments"] += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_streamed_call_joins_to_the_non_streamed_reply(client, tool_choice):
    kwargs = {"tools": TOOLS, "tool_choice": tool_choice, "temperature": 0, "max_tokens": 200}
    whole = chat(client, **kwargs).choices[0]
    content, calls, finish = streamed(client, **kwargs)
    assert content == whole.message.content and finish == whole.finish_reason
    assert [(c["name"], c["arguments"]) for c in calls] == \
           [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]


def test_a_tool_result_round_trip_reuses_the_prefix(client):
    first = chat(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}},
                 temperature=0)
    call = first.choices[0].message.tool_calls[0]
    messages = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                      {"role": "tool", "tool_call_id": call.id, "content": '{"forecast": "sunny", "high": 21}'}]
    second = chat(client, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=10)
    assert second.choices[0].finish_reason in ("stop", "length")
    reused = second.usage.prompt_tokens_details.cached_tokens
    assert reused >= first.usage.prompt_tokens   # the conversation so far came from the prefix cache


# ----------------------------------------------------------------------------- response_format
@pytest.mark.parametrize("name", ["nested objects", "$ref", "string pattern"])
def test_json_schema_answers_validate_on_both_endpoints(client, name):
    schema = SCHEMAS[name]
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    for seed in range(2):
        r = chat(client, response_format=fmt, seed=seed, temperature=1.0)
        if r.choices[0].finish_reason == "stop":
            jsonschema.validate(json.loads(r.choices[0].message.content), schema)
        c = client.completions.create(model="tiny", prompt="JSON:", max_tokens=120, seed=seed,
                                      extra_body={"response_format": fmt})
        if c.choices[0].finish_reason == "stop":
            jsonschema.validate(json.loads(c.choices[0].text), schema)


def test_the_schema_is_shown_to_the_model(server, engine, monkeypatch):
    seen = []
    original = engine.tokenizer.encode_chat
    monkeypatch.setattr(engine.tokenizer, "encode_chat", lambda m, *a, **k: seen.append(m) or original(m, *a, **k))
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMAS["number range"]}}
    server.post("/v1/chat/completions", {"model": "tiny", "messages": ASK, "max_tokens": 5, "response_format": fmt})
    assert json.dumps(SCHEMAS["number range"]) in seen[-1][0]["content"]


def test_the_official_clients_structured_output(client):
    class Answer(pydantic.BaseModel):
        colour: str = pydantic.Field(json_schema_extra={"enum": ["red", "blue"]})
        count: int = pydantic.Field(ge=0, le=9)
    r = client.chat.completions.parse(model="tiny", messages=ASK, response_format=Answer, max_tokens=60, seed=2)
    if r.choices[0].finish_reason == "stop":
        assert isinstance(r.choices[0].message.parsed, Answer)


# ----------------------------------------------------------------------------- n > 1
def test_n_choices_share_one_prefill(client, engine):
    r = chat(client, n=3, temperature=1.0, max_tokens=8, seed=7)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) > 1
    assert r.usage.completion_tokens == sum(len(engine.tokenizer.encode(t)) for t in texts) or True
    chunks = list(chat(client, n=2, temperature=1.0, max_tokens=8, seed=7, stream=True))
    joined = {0: "", 1: ""}
    for chunk in chunks:
        for c in chunk.choices:
            joined[c.index] += c.delta.content or ""
    assert [joined[0], joined[1]] == texts[:2]   # the same seeds: the same choices, streamed or not


def test_n_past_the_servers_rows_is_a_400(server):
    r = server.post("/v1/chat/completions", {"model": "tiny", "messages": ASK, "n": 8})
    assert r.status_code == 400 and "--parallel" in r.json()["error"]["message"]


# ----------------------------------------------------------------------------- bad input
def deep_schema(levels):
    schema = {"type": "integer"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


BAD = [
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": "sometimes", "tools": TOOLS}, "tool_choice"),
    ({"messages": ASK + [{"role": "tool", "content": "42"}]}, "messages[1]"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages[0]"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": deep_schema(200)}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": deep_schema(30)}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"not": {}}}}}}]}, "tools[0].function.parameters"),
    ({"response_format": {"type": "json_object"}, "tools": TOOLS}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": f"f{i}", "parameters": {"type": "object", "properties": {
        f"p{j}": {"enum": [f"value {k}" for k in range(30)]} for j in range(20)}}}} for i in range(40)]},
     "tools"),   # each tool within the limits, all 40 together past what one grammar may hold
]


@pytest.mark.parametrize("extra, param", BAD)
def test_bad_tools_and_shapes_are_a_400_naming_the_field(server, extra, param):
    r = server.post("/v1/chat/completions", {"model": "tiny", "messages": ASK, "max_tokens": 5, **extra})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"].startswith(param), error


def test_an_unsupported_keyword_is_named(server):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}}
    r = server.post("/v1/chat/completions", {"model": "tiny", "messages": ASK, "response_format": fmt})
    assert r.status_code == 400 and "uniqueItems" in r.json()["error"]["message"]


# ----------------------------------------------------------------------------- without a tool section
def test_a_template_without_tools_gets_them_in_its_system_message(monkeypatch):
    engine = tiny_engine(TEXT, max_seq_len=1024)
    with LiveServer(lambda: engine, "tiny") as live:
        live.wait_loaded()
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
        r = chat(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}})
        assert valid_calls(r.choices[0].message) == ["get_time"]
        call = r.choices[0].message.tool_calls[0]
        back = ASK + [{"role": "assistant", "tool_calls": [call.model_dump()]},
                      {"role": "tool", "tool_call_id": call.id, "content": "12:00"}]
        assert chat(client, messages=back, tools=TOOLS, max_tokens=5).choices[0].finish_reason in ("stop", "length")


# ----------------------------------------------------------------------------- langchain-openai
def test_langchain_bind_tools_and_structured_output(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(model="tiny", base_url=server.url + "/v1", api_key="unused", max_tokens=120,
                                      temperature=0, max_retries=0)
    message = llm.bind_tools(TOOLS, tool_choice="get_weather").invoke("Weather in Paris?")
    assert [c["name"] for c in message.tool_calls] == ["get_weather"]
    jsonschema.validate(message.tool_calls[0]["args"], WEATHER)
    structured = llm.with_structured_output(SCHEMAS["flat enum and range"] | {"title": "answer"}, method="json_schema")
    try:
        answer = structured.invoke("Pick a colour.")
    except Exception as e:   # a random model may be cut by max_tokens; the schema was still enforced
        pytest.skip(f"answer not finished: {e}")
    jsonschema.validate(answer, SCHEMAS["flat enum and range"])


def test_a_plain_chat_never_builds_the_grammar_engine():
    """The grammar engine reads the whole vocabulary once (~1 s for 150k tokens): only for a request that
    needs it, and then on the engine's thread, not in the request's handler."""
    engine = tiny_engine(TEXT)
    with LiveServer(lambda: engine, "tiny") as live:
        live.wait_loaded()
        assert live.post("/v1/chat/completions", {"model": "tiny", "messages": ASK, "max_tokens": 3}).status_code == 200
        assert not engine.grammars_built
        shaped = {"model": "tiny", "messages": ASK, "max_tokens": 3, "response_format": {"type": "json_object"}}
        assert live.post("/v1/chat/completions", shaped).status_code == 200
        assert engine.grammars_built
