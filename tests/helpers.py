"""Helpers the serving and engine tests share: a live picochat server (create_app(...) served by uvicorn
on a background thread, on 127.0.0.1 and a free port), a tiny random chat engine, a wrapper to put
faults or delays around a model, and a stand-in knowledge base and sentence encoder."""
import json
import socket
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import torch
import uvicorn

from picochat.model.config import ModelConfig
from picochat.engine.engine import Engine
from picochat.model.gpt import GPT
from picochat.serve.app import create_app
from picochat.tokenizer.bpe import Tokenizer


def tiny_engine(text: str, vocab_size: int = 320, max_seq_len: int = 256) -> Engine:
    """A 2-layer random GPT (seed 0) with picochat's chat tokenizer trained on `text`; <|end|> ends a turn."""
    tok = Tokenizer.train([text], vocab_size=vocab_size)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                         intermediate_size=128, max_seq_len=max_seq_len, initializer_range=0.3,
                         eos_token_id=tok.token_to_id("<|end|>"))
    return Engine(GPT(config), tok)


# Qwen2.5's chat template (its tool section, <tool_call> and <tool_response>), for tiny tool-calling models
QWEN_TEMPLATE = (Path(__file__).parent / "data" / "qwen2.5_chat_template.jinja")
TOOL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>")


def tiny_tool_engine(text: str, vocab_size: int = 400, max_seq_len: int = 2048) -> Engine:
    """A 2-layer random GPT with a tokenizer that has Qwen2.5's chat template and tool-call tokens: a
    model whose template renders `tools` (what it writes is random; a grammar gives it the shape)."""
    tok = Tokenizer.train([text], vocab_size=vocab_size, special_tokens=TOOL_TOKENS)
    tok.chat_template = QWEN_TEMPLATE.read_text()
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                         intermediate_size=128, max_seq_len=max_seq_len, initializer_range=0.3,
                         eos_token_id=tok.token_to_id("<|im_end|>"))
    return Engine(GPT(config), tok)


def serving(engine, **kwargs):
    """A live server over `engine` as "tiny" for a module's tests: a fixture's body is `yield from serving(engine)`."""
    with LiveServer(lambda: engine, "tiny", **{"max_batch": 4, "max_queue": 16, **kwargs}) as live:
        live.wait_loaded()
        yield live


def sampler_failing_on_seed(sample_rows, seed: int = 666, after: int = 0):
    """engine.sampling.sample_rows, except that it raises for any batch holding a request with this seed, once
    `after` such batches have been sampled (0: at its first token, in the prefill; 1: at its next, decoding)."""
    calls = [0]

    def faulty(logits, params, generators, seen=None, allowed=None):
        if any(p.seed == seed for p in params):
            calls[0] += 1
            if calls[0] > after:
                raise FloatingPointError("injected sampler fault")
        return sample_rows(logits, params, generators, seen, allowed)
    return faulty


def save_tiny_folder(folder, text: str, max_seq_len: int = 128):
    """A tiny random picochat model (seed 0) with a tokenizer trained on `text`, saved as a HF folder."""
    from picochat.formats.hf import save_hf_folder
    tok = Tokenizer.train([text], vocab_size=300)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                         intermediate_size=64, max_seq_len=max_seq_len, initializer_range=0.2,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    save_hf_folder(GPT(config), folder, tokenizer=tok)
    return folder


class WrappedModel(torch.nn.Module):
    """A model that behaves as `model` (its config and KV caches); subclasses change forward()."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def new_kv_cache(self, *args, **kwargs):
        return self.model.new_kv_cache(*args, **kwargs)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


class SlowModel(WrappedModel):
    """`model`, `delay` seconds slower per forward pass (a stream still running when the test acts)."""

    def __init__(self, model, delay: float):
        super().__init__(model)
        self.delay = delay

    def forward(self, *args, **kwargs):
        time.sleep(self.delay)
        return self.model(*args, **kwargs)


class LiveServer:
    """create_app(load_engine, model_id, **kwargs) served at self.url until close()."""

    def __init__(self, load_engine, model_id: str, **kwargs):
        self.app = create_app(load_engine, model_id, **kwargs)
        self.model_id = model_id
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    @property
    def state(self):
        return self.app.state.picochat

    def wait_loaded(self, timeout: float = 60):
        """Until the model has loaded (and /health says so)."""
        self.state.loaded.wait(timeout=timeout)
        assert self.state.batcher is not None, self.state.load_error
        assert httpx.get(self.url + "/health").status_code == 200

    def post(self, path: str, body, **kwargs) -> httpx.Response:
        """POST a JSON body (a dict, or raw bytes sent as they are)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.post(self.url + path, content=data, headers={"content-type": "application/json"},
                          timeout=kwargs.pop("timeout", 60), **kwargs)

    def chat(self, messages, api_key=None, **body) -> dict:
        request = urllib.request.Request(
            f"{self.url}/v1/chat/completions", method="POST",
            data=json.dumps({"model": self.model_id, "messages": messages, **body}).encode(),
            headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------- a stand-in knowledge base
@dataclass
class FakeHit:
    source: str
    section: str
    text: str
    similarity: float
    score: float = 0.0
    bm25_rank: int | None = 1
    vector_rank: int = 1
    overlap: float = 0.0
    sentence_similarity: float | None = None


class FakeKB:
    """A knowledge base whose search answers from a table: relevant for questions about returns."""

    def __init__(self):
        self.settings = {"handoff": "I don't know that one; shall I put you through to a colleague?"}
        self.searched = []

    def search(self, query, k=5):
        self.searched.append(query)
        if "return" not in query.lower():
            return [FakeHit("/docs/faq.md", "Parking", "Parking is behind the shop.", 0.05)]
        return [FakeHit("/docs/policies.md", "Returns", "Returns are accepted within 30 days.", 0.71),
                FakeHit("/docs/policies.md", "Refunds", "Refunds take 5 days.", 0.65),
                FakeHit("/docs/faq.md", "Parking", "Parking is behind the shop.", 0.12)][:k]

    def setting(self, key, default=None):
        return self.settings.get(key, default)

    def embed(self, texts):
        return FakeEncoder().encode(texts)


class FakeEncoder:
    name, dim, max_tokens = "fake-embedder", 8, 256

    def encode(self, texts, batch_size=32):
        rng = [np.random.default_rng(sum(t.encode())) for t in texts]
        v = np.stack([r.standard_normal(self.dim) for r in rng]).astype(np.float32) if texts else np.zeros((0, 8))
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    def count_tokens(self, texts):
        return [len(t.split()) for t in texts]


def run_cli(argv, capsys, stdin=None, monkeypatch=None):
    """`picochat ARGV...` in this process: (exit status, stdout, stderr); stdin (a str) needs monkeypatch."""
    import io
    import sys
    from picochat import cli
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err
