"""No single request stalls the others: embeddings run in slices between decode steps, a per-request token
budget, and text that is not text (lone surrogates) refused by name on every endpoint."""
import json
import threading
import time

import httpx
import pytest
import torch

from helpers import FakeEncoder, LiveServer, tiny_engine
from picochat.serve import protocol
from picochat.serve.app import Knowledge
from picochat.serve.openai import token_slices

TEXT = "Returns are accepted within 30 days. Parking is behind the shop. " * 20
SECONDS_PER_TOKEN = 0.0005   # the slow encoder: 1,000 tokens take half a second


class SlowEncoder(FakeEncoder):
    """An encoder whose time grows with the tokens it is given, as a real one's does."""
    calls: list[int] = []

    def encode(self, texts, batch_size=32):
        tokens = sum(self.count_tokens(texts))
        SlowEncoder.calls.append(tokens)
        time.sleep(tokens * SECONDS_PER_TOKEN)
        return super().encode(texts)


@pytest.fixture(scope="module")
def live():
    engine = tiny_engine(TEXT, max_seq_len=2048)
    with torch.no_grad():   # a zero row never wins the argmax: the stream runs to max_tokens
        for token in engine.tokenizer.end_of_turn_ids:
            engine.model.embed.weight[token] = 0
    knowledge = Knowledge([], load_encoder=SlowEncoder)
    with LiveServer(lambda: engine, "tiny", knowledge=knowledge) as server:
        server.wait_loaded()
        yield server


def stream_gaps(live, max_tokens: int, started: threading.Event) -> list[float]:
    """Seconds between the chunks of one streamed chat completion."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
            "stream": True, "temperature": 0}
    stamps = []
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                stamps.append(time.monotonic())
                started.set()
    return [b - a for a, b in zip(stamps, stamps[1:])]


def test_a_stream_keeps_flowing_while_a_large_embeddings_request_runs(live):
    texts = [" ".join(["word"] * 200)] * 40   # 8,000 tokens: 4 s of encoding, in slices of ~1,000
    started, gaps = threading.Event(), []
    streamer = threading.Thread(target=lambda: gaps.extend(stream_gaps(live, 1500, started)))
    streamer.start()
    assert started.wait(30)
    SlowEncoder.calls.clear()
    began = time.monotonic()
    r = live.post("/v1/embeddings", {"model": "fake-embedder", "input": texts}, timeout=120)
    took = time.monotonic() - began
    streamer.join(120)
    assert r.status_code == 200 and len(r.json()["data"]) == 40 and r.json()["usage"]["prompt_tokens"] == 8000
    assert took > 3.5 and max(SlowEncoder.calls) <= protocol.EMBEDDING_SLICE_TOKENS   # it was sliced
    assert max(gaps) < 1.5, f"a chunk waited {max(gaps):.2f} s"


def test_a_stream_that_arrives_during_three_embeddings_requests_is_admitted_and_flows(live):
    texts = [" ".join(["word"] * 200)] * 15   # 3,000 tokens each: 1.5 s of encoding, in slices
    posts = [threading.Thread(target=live.post, args=("/v1/embeddings", {"model": "fake-embedder", "input": texts}),
                              kwargs={"timeout": 120}) for _ in range(3)]
    for post in posts:
        post.start()
    time.sleep(0.3)   # all are encoding, one slice after the other
    started, gaps = threading.Event(), []
    began = time.monotonic()
    stream_gaps_into = threading.Thread(target=lambda: gaps.extend(stream_gaps(live, 200, started)))
    stream_gaps_into.start()
    assert started.wait(30)
    first_chunk = time.monotonic() - began
    stream_gaps_into.join(120)
    for post in posts:
        post.join(120)
    assert first_chunk < 1.0 and max(gaps) < 0.8, (first_chunk, max(gaps))   # a slice is 0.5 s


def test_an_embeddings_request_over_the_token_budget_is_refused_by_name(live, monkeypatch):
    monkeypatch.setattr("picochat.serve.openai.MAX_EMBEDDING_TOKENS", 100)
    r = live.post("/v1/embeddings", {"model": "fake-embedder", "input": ["one two three"] * 40})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    assert "at most 100" in r.json()["error"]["message"]


def test_token_slices_cover_every_text_once_within_the_budget():
    counts = [300, 300, 500, 2000, 10, 10, 1024]
    parts = token_slices(counts, 1024)
    assert [i for part in parts for i in range(len(counts))[part]] == list(range(len(counts)))
    assert all(sum(counts[part]) <= 1024 or part.stop - part.start == 1 for part in parts)
    assert token_slices([5], 1024) == [slice(0, 1)]


@pytest.mark.parametrize("path, body, param", [
    ("/v1/embeddings", {"model": "fake-embedder", "input": ["fine", "bad \ud800 text"]}, "input[1]"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "a\udc00"}]},
     "messages[0].content"),
    ("/v1/completions", {"model": "tiny", "prompt": "\ud800"}, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "\ud800": 1}, "\\ud800"),   # in a key
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                              "stop": ["\udfff"]}, "stop[0]"),
])
def test_a_lone_surrogate_is_a_400_naming_the_field(live, path, body, param):
    raw = json.dumps(body).encode()   # json.dumps writes the surrogate as the escape "\ud800", as clients do
    r = live.post(path, raw)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and "surrogate" in r.json()["error"]["message"]
    assert live.post("/v1/embeddings", {"model": "fake-embedder", "input": "\U0001F600 fine"}).status_code == 200
