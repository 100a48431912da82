"""What a running server holds: the engine, the batcher every request goes through, the knowledge bases,
and the counters /metrics reports."""
from __future__ import annotations

import asyncio
import threading
import time

from ..engine.batcher import Batcher
from ..engine.engine import Engine
from .knowledge import Knowledge
from .protocol import APIError


class ServerState:
    """The loaded model and engine (loaded on a background thread so /health can answer meanwhile), and counters."""

    def __init__(self, load_engine, model_id: str, api_key: str | None, max_batch: int, max_queue: int,
                 max_len: int | None, request_timeout: float, knowledge: Knowledge | None = None):
        self.model_id, self.api_key, self.request_timeout = model_id, api_key, request_timeout
        self.knowledge = knowledge or Knowledge()
        self.engine: Engine | None = None
        self.batcher: Batcher | None = None
        self.load_error: str | None = None
        self.created = int(time.time())
        self.routes: set[str] = set()  # the app's route templates: the only values of the metrics' label
        self.requests = {}            # (route, status) -> count
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.started = time.time()
        self.loaded = threading.Event()
        self.loader = threading.Thread(target=self._engine_thread, args=(load_engine, max_batch, max_queue, max_len),
                                       name="picochat-engine", daemon=True)
        self.loader.start()

    def _engine_thread(self, load_engine, max_batch, max_queue, max_len):
        """Load the model, then run the batcher: all model work on this one thread."""
        try:
            self.engine = load_engine()
            batcher = Batcher(self.engine, max_batch=max_batch, max_queue=max_queue, max_len=max_len, start=False)
        except Exception as e:  # reported by /health and every request
            self.load_error = str(e)
            self.loaded.set()
            return
        self.batcher = batcher
        self.loaded.set()
        batcher.run()

    def ready(self) -> Batcher:
        if self.batcher is None:
            if self.load_error:
                raise APIError(503, f"the model failed to load: {self.load_error}", type="server_error")
            raise APIError(503, "the model is still loading; retry shortly", type="server_error", code="loading")
        return self.batcher

    async def on_engine_thread(self, fn):
        """fn()'s result, run on the batcher's thread between decode steps (knowledge bases, embeddings)."""
        try:
            return await asyncio.wrap_future(self.ready().call(fn))
        except APIError:
            raise
        except (FileNotFoundError, ValueError) as e:  # a missing embedding model, a knowledge base problem
            raise APIError(503, str(e), type="server_error") from None

    def count(self, path: str, status: int):
        route = path if path in self.routes else "unmatched"  # raw paths would grow the metrics without bound
        self.requests[(route, status)] = self.requests.get((route, status), 0) + 1
