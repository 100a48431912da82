"""The OpenAI-compatible server, live on 127.0.0.1, driven by the official `openai` client and raw HTTP."""
import json
import threading
import time

import httpx
import openai
import pydantic
import pytest
import torch
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.shared import ErrorObject

from picochat.engine.engine import Engine
from picochat.engine.sampling import SamplingParams
from picochat.load import load
from picochat.serve import protocol

from helpers import LiveServer, serving, tiny_engine

TEXT = ("Hello there! How are you today? I am fine, thank you. The weather is nice. "
        "def add(a, b):\n    return a + b\n你好，世界。") * 30


@pytest.fixture(scope="module")
def engine():
    return tiny_engine(TEXT)


@pytest.fixture(scope="module")
def server(engine):
    yield from serving(engine)


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def greedy_reference(engine, messages, max_tokens):
    ids = engine.chat_prompt(messages)
    return engine.complete(ids, SamplingParams(temperature=0, max_new_tokens=max_tokens))


HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"}]


# ----------------------------------------------------------------------------- the openai client
def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_chat_completion_matches_the_engine(client, engine):
    r = client.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=20)
    want = greedy_reference(engine, HELLO, 20)
    assert r.choices[0].message.content == want.text
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == len(engine.chat_prompt(HELLO))
    assert r.usage.completion_tokens == len(want.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_stream_shape_and_usage(client, engine):
    chunks = list(client.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=20,
                                                 stream=True, stream_options={"include_usage": True}))
    want = greedy_reference(engine, HELLO, 20)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_content_parts_are_accepted(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there!"}]}]
    a = client.chat.completions.create(model="tiny", messages=parts, temperature=0, max_tokens=8)
    b = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello there!"}],
                                       temperature=0, max_tokens=8)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_stop_strings(client, engine):
    full = greedy_reference(engine, HELLO, 30).text
    stop = full[6:9]
    r = client.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=30, stop=[stop, "zzz"])
    assert r.choices[0].message.content == full[:full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_same_seed_same_text(client):
    kw = dict(model="tiny", messages=HELLO, max_tokens=16)
    a = client.chat.completions.create(temperature=0, **kw).choices[0].message.content
    b = client.chat.completions.create(temperature=0, **kw).choices[0].message.content
    assert a == b
    c = client.chat.completions.create(temperature=1.0, seed=42, **kw).choices[0].message.content
    d = client.chat.completions.create(temperature=1.0, seed=42, **kw).choices[0].message.content
    assert c == d


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=6, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:  # greedy: the chosen token is the most likely one
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.logprob <= 0


def test_completions_text_and_token_ids(client, engine):
    prompt = "How are you"
    r = client.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=10)
    ids = engine.tokenizer.encode(prompt, add_special_tokens=True)
    want = engine.complete(ids, SamplingParams(temperature=0, max_new_tokens=10))
    assert r.choices[0].text == want.text
    r2 = client.completions.create(model="tiny", prompt=ids, temperature=0, max_tokens=10)
    assert r2.choices[0].text == want.text


def test_echo_logprobs_score_the_prompt(client, engine):
    """What lm-evaluation-harness's local-completions sends for loglikelihood."""
    prompt = "The weather is nice."
    r = client.completions.create(model="tiny", prompt=prompt, echo=True, logprobs=1, max_tokens=0, temperature=0)
    lp = r.choices[0].logprobs
    ids = engine.tokenizer.encode(prompt, add_special_tokens=True)
    assert r.choices[0].text.startswith(engine.tokenizer.decode(ids))
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None
    with torch.no_grad():
        logp = torch.log_softmax(engine.model(torch.tensor([ids]))[0][0].float(), -1)
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(float(logp[i - 1, ids[i]]), abs=1e-4)
    assert lp.text_offset[0] == 0


# ----------------------------------------------------------------------------- the response types
def sse_bodies(server, path, body) -> list[dict]:
    with httpx.stream("POST", server.url + path, json=body, timeout=60) as r:
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def unknown_fields(parsed: pydantic.BaseModel, path: str = "") -> list[str]:
    """The keys of an object parsed by one of the openai client's types, at any depth, that the type lacks."""
    found = [f"{path}{key}" for key in parsed.model_extra or {}]
    for name in type(parsed).model_fields:
        value = getattr(parsed, name)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, pydantic.BaseModel):
                found += unknown_fields(item, f"{path}{name}.")
    return found


def test_every_body_validates_as_the_openai_clients_types(server):
    """Stricter than the client, which builds its objects without checking them: every field its types
    require is there with its type, and no field they lack is sent but picochat's `timings`."""
    chat = {"model": "tiny", "messages": HELLO, "temperature": 0, "max_tokens": 4, "logprobs": True,
            "top_logprobs": 2}
    parsed = ChatCompletion.model_validate(server.post("/v1/chat/completions", chat).json())
    assert unknown_fields(parsed) == ["timings"] and len(parsed.choices[0].logprobs.content) == 4
    chunks = sse_bodies(server, "/v1/chat/completions",
                        {**chat, "stream": True, "stream_options": {"include_usage": True}})
    assert [unknown_fields(ChatCompletionChunk.model_validate(c)) for c in chunks] == [[]] * len(chunks)
    prompt = {"model": "tiny", "prompt": "How are you", "temperature": 0, "max_tokens": 3}
    parsed = Completion.model_validate(server.post("/v1/completions", {**prompt, "logprobs": 2}).json())
    assert unknown_fields(parsed) == [] and len(parsed.choices[0].logprobs.tokens) == 3
    chunks = sse_bodies(server, "/v1/completions", {**prompt, "stream": True, "stream_options": {"include_usage": True}})
    # OpenAI streams text_completion chunks with "finish_reason": null, which the client's type refuses
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    assert [unknown_fields(Completion.model_validate(c)) for c in chunks[-2:]] == [[], []]
    models = httpx.get(server.url + "/v1/models").json()
    assert models["object"] == "list" and unknown_fields(Model.model_validate(models["data"][0])) == []
    error = server.post("/v1/chat/completions", {**chat, "model": "gpt-9"}).json()
    assert unknown_fields(ErrorObject.model_validate(error["error"])) == []


def test_nulls_are_sent_as_openai_sends_them(server):
    """What is null is sent as null (a choice's logprobs, a chunk's finish_reason); what OpenAI leaves out
    is left out (a chunk's usage, the last chunk's delta)."""
    chat = {"model": "tiny", "messages": HELLO, "temperature": 0, "max_tokens": 3}
    body = server.post("/v1/chat/completions", chat).json()
    assert body["choices"][0]["logprobs"] is None and "retrieval" not in body
    first, second, *_, last = sse_bodies(server, "/v1/chat/completions", {**chat, "stream": True})
    assert first["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}]
    assert second["choices"][0]["finish_reason"] is None and set(second["choices"][0]["delta"]) == {"content"}
    assert last["choices"][0]["delta"] == {} and "usage" not in last and "retrieval" not in first
    body = server.post("/v1/completions", {"model": "tiny", "prompt": "Hi", "max_tokens": 2}).json()
    assert body["choices"][0]["logprobs"] is None and set(body["usage"]) == {
        "prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details"}


def test_response_models_refuse_what_openai_would_not_send():
    usage = protocol.Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2)
    reply = {"id": "chatcmpl-1", "created": 0, "model": "tiny", "usage": usage}
    with pytest.raises(pydantic.ValidationError, match="finish_reason"):   # an engine error is an error body
        protocol.ChatCompletion(**reply, choices=[protocol.ChatChoice(
            message=protocol.ChatMessage(content="x"), finish_reason="error: boom")])
    with pytest.raises(pydantic.ValidationError, match="finish"):          # a misspelt field fails where it is built
        protocol.ChunkChoice(delta=protocol.ChatDelta(), finish="stop")


# ----------------------------------------------------------------------------- bad requests
BAD_REQUESTS = [  # (path, body, status, text expected in the message)
    ("/v1/chat/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/chat/completions", b"[1, 2]", 400, "JSON object"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 400, "'model' is required"),
    ("/v1/chat/completions", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "does not exist"),
    ("/v1/chat/completions", {"model": "tiny"}, 400, "'messages' is required"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "at least 1 item"),
    ("/v1/chat/completions", {"model": "tiny", "messages": "hi"}, 400, "'messages': input should be a valid list"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": 5}]}, 400, "content"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400, "only text parts"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 3},
     400, "'temperature': input should be less than or equal to 2"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
     400, "'temperature': input should be a valid number"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1},
     400, "max_tokens"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 9}, 400, "'n': input should be less than or equal to 8"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stop": 7}, 400, "stop"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                              "top_logprobs": 21}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"},
     400, "'stream': input should be a valid boolean"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000},
     400, "exceed the model's context of 256"),
    ("/v1/completions", {"model": "tiny", "prompt": {"a": 1}}, 400, "'prompt': must be"),
    ("/v1/completions", {"model": "tiny", "prompt": [1, 99999]}, 400, "outside the vocabulary"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    ("/v1/nothing", {"model": "tiny"}, 404, "Not Found"),
]


@pytest.mark.parametrize("path,body,status,expect", BAD_REQUESTS)
def test_bad_requests_get_openai_errors_and_the_server_stays_healthy(server, path, body, status, expect):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + path, content=data, headers={"content-type": "application/json"})
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert expect in error["message"]
    assert httpx.get(server.url + "/health").status_code == 200


def test_context_error_names_both_numbers(server, engine):
    long = "Hello there! " * 60
    r = httpx.post(server.url + "/v1/chat/completions",
                   json={"model": "tiny", "messages": [{"role": "user", "content": long}], "max_tokens": 100})
    n_prompt = len(engine.chat_prompt([{"role": "user", "content": long}]))
    assert r.status_code == 400
    assert f"the prompt has {n_prompt} tokens and max_tokens is 100" in r.json()["error"]["message"]


def test_oversized_body_is_413(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b"x" * (5 * 1024 * 1024),
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and "exceeds" in r.json()["error"]["message"]


# ----------------------------------------------------------------------------- concurrency
def test_eight_parallel_streams_equal_sequential_greedy(client, engine):
    conversations = [[{"role": "user", "content": f"Hello {i}! How are you?"}] for i in range(8)]
    results = [None] * 8

    def stream(i):
        chunks = client.chat.completions.create(model="tiny", messages=conversations[i], temperature=0,
                                                max_tokens=24, stream=True)
        results[i] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for i in range(8):
        assert results[i] == greedy_reference(engine, conversations[i], 24).text


def test_disconnect_frees_the_slot(server):
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 200, "stream": True, "temperature": 1.0}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and "content" in line:
                break  # read one chunk, then hang up
    deadline = time.time() + 10
    while "picochat_active_sequences 0" not in httpx.get(server.url + "/metrics").text:
        assert time.time() < deadline, "the generation kept running after the client left"
        time.sleep(0.05)


def test_queue_full_is_503(engine):
    live = LiveServer(lambda: engine, "tiny", max_batch=1, max_queue=1)
    live.wait_loaded()
    try:
        body = {"model": "tiny", "messages": HELLO, "max_tokens": 150, "stream": True, "temperature": 1.0}
        statuses = []

        def call():
            with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=60) as r:
                statuses.append(r.status_code)
                r.read()
        threads = [threading.Thread(target=call) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert 503 in statuses and 200 in statuses
    finally:
        live.close()


def test_metrics_count_requests_and_tokens(server, client):
    client.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=5)
    text = httpx.get(server.url + "/metrics").text
    assert 'picochat_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert "picochat_completion_tokens_total" in text and "picochat_queue_length 0" in text


# ----------------------------------------------------------------------------- loading and keys
def test_health_is_503_while_loading(engine):
    release = threading.Event()
    live = LiveServer(lambda: release.wait(30) and engine, "tiny")
    try:
        assert httpx.get(live.url + "/health").status_code == 503
        r = httpx.post(live.url + "/v1/chat/completions", json={"model": "tiny", "messages": HELLO})
        assert r.status_code == 503 and r.json()["error"]["code"] == "loading"
        release.set()
        live.wait_loaded()
    finally:
        live.close()


def test_api_key(engine):
    live = LiveServer(lambda: engine, "tiny", api_key="s3cret")
    live.wait_loaded()
    try:
        url = live.url + "/v1/chat/completions"
        body = {"model": "tiny", "messages": HELLO, "max_tokens": 3}
        assert httpx.post(url, json=body).status_code == 401
        r = httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert httpx.post(url, json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(live.url + "/v1/models").status_code == 200   # open, as documented
        assert httpx.get(live.url + "/health").status_code == 200
        good = openai.OpenAI(base_url=live.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(model="tiny", messages=HELLO, max_tokens=3).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=live.url + "/v1", api_key="nope", max_retries=0).chat.completions.create(
                model="tiny", messages=HELLO, max_tokens=3)
    finally:
        live.close()


# ----------------------------------------------------------------------------- the real model
def test_smollm2_answers_paris_through_the_openai_client(smollm2_path):
    loaded = load(str(smollm2_path))
    live = LiveServer(lambda: Engine(loaded.model, loaded.tokenizer), "smollm2", max_len=1024)
    live.wait_loaded()
    try:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)
        r = client.chat.completions.create(model="smollm2", temperature=0, max_tokens=30,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
    finally:
        live.close()
