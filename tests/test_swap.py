"""An approved adapter swapped into a running server: a stream in flight finishes on the model it started on,
a new request is answered by the new one, every response names its adapter, and a rollback swaps back."""
import json
import threading
import time

import httpx
import pytest

from picochat.engine.engine import Engine
from picochat.engine.sampling import SamplingParams
from picochat.serve.state import AdapterWatch

from helpers import LiveServer, SlowModel, tiny_engine

TEXT = "hello there, the cat sat on the mat. how can I help you today? " * 20


class Adapters:
    """A stand-in for apps/tuned's served.json: which 'adapter' is served, and a tiny engine for each."""

    def __init__(self):
        self.current = None
        self.loads = []
        base = tiny_engine(TEXT)
        self.engines = {None: Engine(SlowModel(base.model, 0.02), base.tokenizer),
                        "B": Engine(SlowModel(tiny_engine(TEXT).model, 0.0), base.tokenizer)}

    def load(self, adapter):
        self.loads.append(adapter)
        return self.engines[adapter]

    def watch(self) -> AdapterWatch:
        return AdapterWatch(served=lambda: self.current, load=self.load, name=lambda a: a, interval=0.05)


def stream_chat(url: str, out: dict):
    """A streamed chat reply of 60 tokens: its chunks and fingerprints into `out`."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "stream": True,
            "max_tokens": 60, "temperature": 0}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                out.setdefault("chunks", []).append(chunk)
    out["done"] = True


@pytest.fixture
def live():
    adapters = Adapters()
    with LiveServer(None, "tiny", max_batch=4, max_queue=8, watch=adapters.watch()) as server:
        server.wait_loaded()
        server.adapters = adapters
        yield server


def test_a_stream_in_flight_finishes_on_the_old_model_while_new_requests_get_the_new(live):
    out = {}
    streaming = threading.Thread(target=stream_chat, args=(live.url, out))
    streaming.start()
    deadline = time.time() + 30
    while len(out.get("chunks", [])) < 5:   # the stream is running on the base model
        assert time.time() < deadline
        time.sleep(0.01)
    live.adapters.current = "B"              # `picochat tune` approved an adapter
    while httpx.get(live.url + "/health").json()["adapter"] != "B":
        assert time.time() < deadline
        time.sleep(0.02)
    assert not out.get("done")               # swapped while the stream still runs
    reply = live.chat([{"role": "user", "content": "hi"}], max_tokens=5, temperature=0)
    assert reply["system_fingerprint"] == "B"
    streaming.join(timeout=60)
    chunks = out["chunks"]
    assert {c["system_fingerprint"] for c in chunks} == {"base"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"      # all 60 tokens, no error
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    base = live.adapters.engines[None]
    alone = base.complete(base.chat_prompt([{"role": "user", "content": "hello"}]),
                          SamplingParams(max_new_tokens=60, temperature=0)).text
    assert text == alone                     # the old model's whole reply, unbroken by the swap
    assert live.adapters.loads == [None, "B"]


def test_a_rollback_swaps_back_and_feedback_names_the_adapter(live):
    live.adapters.current = "B"
    deadline = time.time() + 30
    while live.state.adapter_id != "B":
        assert time.time() < deadline
        time.sleep(0.02)
    reply = live.chat([{"role": "user", "content": "hi"}], max_tokens=3, temperature=0)
    assert live.state.recalled(reply["id"]).adapter == "B"
    live.adapters.current = None             # `picochat tune --rollback`
    while live.state.adapter_id is not None:
        assert time.time() < deadline
        time.sleep(0.02)
    assert live.chat([{"role": "user", "content": "hi"}], max_tokens=3)["system_fingerprint"] == "base"
    assert live.state.swaps == 2


def test_a_failed_swap_keeps_the_model_serving(live):
    live.adapters.current = "missing"        # its load raises KeyError
    deadline = time.time() + 30
    while "adapter_error" not in httpx.get(live.url + "/health").json():
        assert time.time() < deadline
        time.sleep(0.02)
    assert live.chat([{"role": "user", "content": "hi"}], max_tokens=3)["system_fingerprint"] == "base"
    time.sleep(0.3)
    assert live.adapters.loads.count("missing") == 1       # not tried again every second
    live.adapters.current = "B"                            # another approved adapter is
    while live.state.adapter_id != "B":
        assert time.time() < deadline
        time.sleep(0.02)
    assert "adapter_error" not in httpx.get(live.url + "/health").json()
