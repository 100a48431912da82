"""What a running server holds: the engine, the batcher every request goes through, the knowledge bases,
the counters /metrics reports, and its latest chat replies (for POST /v1/feedback) with the feedback file."""
from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..data.feedback import FeedbackStore
from ..engine.batcher import Batcher, QueueFull
from ..engine.engine import Engine
from .knowledge import Knowledge
from .protocol import APIError

REMEMBERED_REPLIES = 4096   # chat replies kept in memory so that feedback can name them by id


@dataclass
class RememberedReply:
    """A chat reply as feedback needs it: the conversation before it, its text, what wrote it."""
    messages: list[dict]
    reply: str
    model: str
    adapter: str | None


@dataclass
class AdapterWatch:
    """Serving what `picochat tune` approved: which adapter is served now (apps/tuned.py's served.json, read
    every `interval` seconds), how to load the model with it, and the adapter's name in responses."""
    served: Callable[[], Path | None]          # the adapter to serve now (None: the base model alone)
    load: Callable[[Path | None], Engine]      # the model with that adapter, ready to generate
    name: Callable[[Path | None], str | None]
    interval: float = 1.0


@dataclass
class Serving:
    """One loaded model and the batcher its requests go through; the adapter it carries (None: the base)."""
    engine: Engine
    batcher: Batcher
    adapter: str | None = None
    adapter_path: Path | None = None


class ServerState:
    """The loaded model and engine (loaded on a background thread so /health can answer meanwhile), and counters.

    With an AdapterWatch, a newly approved adapter is swapped in without dropping a stream: its model loads
    beside the one serving, new requests go to it, and the old batcher finishes the requests it runs, then
    stops (model work runs on two threads only while both hold requests)."""

    def __init__(self, load_engine, model_id: str, api_key: str | None, max_batch: int, max_queue: int,
                 max_len: int | None, request_timeout: float, knowledge: Knowledge | None = None,
                 feedback_db=None, watch: AdapterWatch | None = None):
        self.model_id, self.api_key, self.request_timeout = model_id, api_key, request_timeout
        self.knowledge = knowledge or Knowledge()
        # only in memory, the oldest forgotten first: a conversation reaches the disk only when rated
        self.replies: OrderedDict[str, RememberedReply] = OrderedDict()
        self.feedback = FeedbackStore(feedback_db)   # opens its file at the first rating
        self.serving: Serving | None = None
        self.watch, self.batch_settings = watch, (max_batch, max_queue, max_len)
        self.swaps = 0                # adapters swapped in since the start
        self.swap_error: str | None = None   # why the last swap failed (the model serving then went on)
        self.stopped = threading.Event()
        self.load_error: str | None = None
        self.created = int(time.time())
        self.routes: set[str] = set()  # the app's route templates: the only values of the metrics' label
        self.requests = {}            # (route, status) -> count
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.started = time.time()
        self.loaded = threading.Event()
        self.loader = threading.Thread(target=self._engine_thread, args=(load_engine,), name="picochat-engine",
                                       daemon=True)
        self.loader.start()

    @property
    def engine(self) -> Engine | None:
        return None if self.serving is None else self.serving.engine

    @property
    def batcher(self) -> Batcher | None:
        return None if self.serving is None else self.serving.batcher

    @property
    def adapter_id(self) -> str | None:
        return None if self.serving is None else self.serving.adapter

    def _engine_thread(self, load_engine):
        """Load the model (with the approved adapter, if watching), then run the batcher: model work on this thread."""
        try:
            if self.watch is None:
                serving = self._serving(load_engine(), None)
            else:
                serving = self._serving(self.watch.load(adapter := self.watch.served()), adapter)
        except Exception as e:  # reported by /health and every request
            self.load_error = str(e)
            self.loaded.set()
            return
        self.serving = serving
        self.loaded.set()
        if self.watch is not None:
            threading.Thread(target=self._watch_thread, name="picochat-adapter-watch", daemon=True).start()
        serving.batcher.run()

    def _serving(self, engine: Engine, adapter: Path | None) -> Serving:
        max_batch, max_queue, max_len = self.batch_settings
        batcher = Batcher(engine, max_batch=max_batch, max_queue=max_queue, max_len=max_len, start=False)
        return Serving(engine, batcher, self.watch.name(adapter) if self.watch else None, adapter)

    def _watch_thread(self):
        """Swap in the adapter served.json names whenever it changes (approved, or rolled back)."""
        failed = None   # (the adapter that failed to load,): not tried again until served.json names another
        while not self.stopped.wait(self.watch.interval):
            try:
                wanted = self.watch.served()
                if wanted != self.serving.adapter_path and (failed is None or wanted != failed[0]):
                    failed = (wanted,)
                    self.swap(wanted)
                    failed, self.swap_error = None, None
            except Exception as e:  # a damaged file or a failed load: keep serving what serves now
                self.swap_error = f"{type(e).__name__}: {e}"

    def swap(self, adapter: Path | None):
        """Serve the model with `adapter` from now on: load it here, start its batcher on a thread of its own,
        send new requests to it, and let the old batcher finish what it runs (then it stops)."""
        new = self._serving(self.watch.load(adapter), adapter)
        threading.Thread(target=new.batcher.run, name="picochat-engine", daemon=True).start()
        old, self.serving = self.serving, new
        self.swaps += 1
        old.batcher.drain(self.request_timeout)

    def close(self):
        """Stop watching for adapters and stop the batcher (the server is going down)."""
        self.stopped.set()
        if self.batcher is not None:
            self.batcher.close()

    def ready(self) -> Batcher:
        if self.batcher is None:
            if self.load_error:
                raise APIError(503, f"the model failed to load: {self.load_error}", type="server_error")
            raise APIError(503, "the model is still loading; retry shortly", type="server_error", code="loading")
        return self.batcher

    def submit_choices(self, prompt_ids: list[int], params: list, on_event, timeout: float):
        """Queue a request's choices on the batcher serving now: (their handles, the adapter that answers). A
        request that met a batcher swapped out a moment before goes to the new one."""
        while True:
            serving = self.serving
            self.ready()
            try:
                return serving.batcher.submit_choices(prompt_ids, params, on_event, timeout=timeout), serving.adapter
            except QueueFull:
                if self.serving is serving:
                    raise

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

    def remember(self, response_id: str, messages: list[dict], reply: str, model: str, adapter: str | None):
        """Keep a finished chat reply for POST /v1/feedback (the latest REMEMBERED_REPLIES of them)."""
        self.replies[response_id] = RememberedReply(messages, reply, model, adapter)
        while len(self.replies) > REMEMBERED_REPLIES:
            self.replies.popitem(last=False)

    def recalled(self, response_id: str) -> RememberedReply | None:
        return self.replies.get(response_id)
