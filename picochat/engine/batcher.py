"""Many generations at once (continuous batching): the server's engine, and any caller's with many prompts.

Every step is one forward pass that decodes a token for each active request, sampled for all rows at
once; a new request is prefilled into a free row a chunk at a time between decode steps, so active
streams keep flowing. The rows double as a prefix cache (rows.py). The Batcher is the scheduler: the
queue, the thread, admission, deadlines and the events each request gets; the steps themselves drive each
request's Generation like Engine does, with the same prefill and sampler.
"""
from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .engine import Engine
from .generation import Generation
from .prefill import PREFILL_CHUNK, prefill_chunk
from .rows import RowCache
from . import sampling
from .sampling import SamplingParams
from .speculative import Speculation

CALL_SECONDS = 0.25   # other model work (embeddings, retrieval) run between two steps while requests generate


class QueueFull(RuntimeError):
    """The batcher's waiting queue is at its limit (or the batcher is shutting down); try again later."""


@dataclass
class Request:
    gen: Generation
    on_event: Callable[[Generation, str | None], None]   # (generation, text piece), then (generation, None) at the end
    deadline: float | None = None                         # time.monotonic() after which it ends with an error
    cancelled: bool = False
    error: str | None = None                              # set when it must end with this error at the next step
    fed: int = 0                                          # prompt tokens in its cache row so far
    ended: bool = False                                   # its end event has been sent (exactly once)
    speculation: Speculation | None = None                # its drafts, once it has decoded alone
    siblings: list["Request"] = field(default_factory=list)   # other choices of the same prompt (n > 1):
                                                              # they start from this request's prefill


class Batcher:
    """Runs many generations at once on a background thread.

    The KV cache has `max_batch` rows. Rows 0..n-1 hold the n requests being decoded (`active`), row n the
    one being prefilled (`prefilling`); a finished request's row stays in the prefix cache.

    Failures stay with their request: if the model or the sampler fails on one request (at admission,
    prefill, decode or finish), that request ends with finish_reason "error: ..." and the others go on.
    Every submitted request gets exactly one end event, on every path (finished, cancelled, failed, timed
    out, closed).

    start=False leaves the loop to the caller: `run()` on a thread of its choosing. All of the model's work
    should happen on one thread: PyTorch's OpenMP runs several times slower per operation once a second
    thread has used it (libgomp stops spin-waiting when more threads than cores are about), so `picochat
    serve` loads the model and runs this loop on one engine thread, and `call()` runs other model work there.
    """

    def __init__(self, engine: Engine, max_batch: int = 8, max_queue: int = 64, max_len: int | None = None,
                 prefill_chunk: int = PREFILL_CHUNK, start: bool = True):
        self.engine, self.max_batch, self.max_queue = engine, max_batch, max_queue
        self.prefill_chunk = prefill_chunk
        self.max_len = min(max_len or engine.context_length, engine.context_length)
        self.rows = RowCache(engine.model, max_batch, self.max_len)
        self.active: list[Request] = []          # decoding, in rows 0..len(active)-1
        self.prefilling: Request | None = None   # in row len(active)
        self.waiting: collections.deque[Request] = collections.deque()
        self.wake = threading.Condition()
        self.tokens_generated = 0  # decoded tokens, all requests together
        self.decode_steps = 0      # batched forward passes
        self.cached_tokens = 0     # prompt tokens reused from the prefix cache
        self._calls: collections.deque = collections.deque()  # (fn, future) to run on the loop's thread
        self._calls_after = 0.0   # monotonic time before which calls wait while requests generate
        self._closed = False
        self._draining = False     # refuse new requests, finish those in flight
        self._running = threading.Event()   # set while run() is looping, on whichever thread
        self._thread = None
        if start:
            self._thread = threading.Thread(target=self.run, name="picochat-batcher", daemon=True)
            self._thread.start()

    @property
    def queue_length(self) -> int:
        return len(self.waiting)

    @property
    def busy(self) -> int:
        """Requests being prefilled or decoded."""
        return len(self.active) + (self.prefilling is not None)

    # ------------------------------------------------------------------ what callers do (any thread)
    def submit(self, prompt_ids: list[int], params: SamplingParams,
               on_event: Callable[[Generation, str | None], None], timeout: float | None = None) -> Request:
        """Queue a generation. on_event(gen, piece) is called from the batcher thread for each text piece,
        and on_event(gen, None) exactly once when it has ended (gen then holds the text, finish_reason and
        stats; finish_reason "error: ..." when it failed or ran past `timeout` seconds from now).

        Raises ValueError for a bad request and QueueFull when the queue is at its limit.
        """
        return self.submit_choices(prompt_ids, [params], on_event, timeout)[0]

    def submit_choices(self, prompt_ids: list[int], params: list[SamplingParams],
                       on_event: Callable[[Generation, str | None], None], timeout: float | None = None
                       ) -> list[Request]:
        """Queue len(params) generations of one prompt (a request's n choices): the prompt is prefilled
        once, and each choice starts from a copy of its keys and values in a row of its own, with its first
        token drawn from the same scores. They are admitted together (when that many rows are free)."""
        if not 1 <= len(params) <= self.max_batch:
            raise ValueError(f"{len(params)} choices of one prompt; this server runs at most {self.max_batch} "
                             "at once (--parallel)")
        deadline = None if timeout is None else time.monotonic() + timeout
        requests = [Request(self.engine.generate(prompt_ids, p, max_len=self.max_len), on_event, deadline=deadline)
                    for p in params]
        request = requests[0]
        request.siblings = requests[1:]
        with self.wake:
            if self._draining or self._closed:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
            self.waiting.append(request)
            self.wake.notify()
        return requests

    def cancel(self, request: Request):
        """Stop a generation (e.g. its client went away); its row is freed at the next step."""
        request.cancelled = True
        with self.wake:
            self.wake.notify()

    def call(self, fn: Callable[[], object]) -> "concurrent.futures.Future":
        """Run fn() on the batcher's thread between two steps (other model work); the returned Future holds
        its result or exception."""
        future = concurrent.futures.Future()
        with self.wake:
            self._calls.append((fn, future))
            self.wake.notify()
        return future

    def drain(self, timeout: float):
        """Refuse new requests and give those in flight up to `timeout` seconds to finish; then close()."""
        with self.wake:
            self._draining = True
        deadline = time.monotonic() + timeout
        while (self.busy or self.waiting) and time.monotonic() < deadline and self._running.is_set():
            time.sleep(0.05)
        self.close()

    def close(self):
        """Stop the loop after the current step; requests still in flight end at once, with an error."""
        with self.wake:
            self._closed = True
            self.wake.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        deadline = time.monotonic() + 30
        while self._running.is_set() and time.monotonic() < deadline:  # a loop on another thread: let it stop
            time.sleep(0.01)
        for fn, future in self._calls:
            future.cancel()
        with self.wake:
            in_flight = self.active + [self.prefilling] * (self.prefilling is not None) + list(self.waiting)
            self.active.clear()
            self.prefilling = None
            self.waiting.clear()
        for r in in_flight:
            for choice in [r, *r.siblings]:
                self._end(choice, error="the server is shutting down")

    # ------------------------------------------------------------------ the loop (the batcher's thread)
    def run(self, until_idle: bool = False):
        """The batcher's loop: admit, prefill, decode, until close() (or, with until_idle, until nothing is
        left to do)."""
        self._running.set()
        try:
            self._loop(until_idle)
        finally:
            self._running.clear()

    def _loop(self, until_idle: bool):
        while True:
            with self.wake:
                while not self.waiting and not self.busy and not self._calls and not self._closed:
                    if until_idle:
                        return
                    self.wake.wait()
                if self._closed:
                    return
            self._run_calls()
            self.engine.share_cores()
            try:
                self._expire()
                self.admit()
                if self.prefilling is not None:
                    self.prefill_step()
                if self.active:
                    self.decode_step()
            except Exception as e:  # a fault outside any one request (a bug): fail those in flight, go on
                self._fail_all(e)

    def _run_calls(self):
        """Queued calls. While requests generate or wait, calls get at most half the time: at most
        CALL_SECONDS of them in a row, and after calls that took t seconds, steps run for t seconds before
        the next; so a stream never waits behind a queue of model work (embeddings come in slices)."""
        generating = self.active or self.prefilling is not None or self.waiting
        if not self._calls or (generating and time.monotonic() < self._calls_after):
            return
        start = time.monotonic()
        while self._calls and not (generating and time.monotonic() - start > CALL_SECONDS):
            fn, future = self._calls.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except Exception as e:
                    future.set_exception(e)
        self._calls_after = 2 * time.monotonic() - start   # now + the time the calls took

    def _expire(self):
        """Requests past their deadline end with an error: waiting ones now, running ones at their next step."""
        now = time.monotonic()
        late = lambda r: r.deadline is not None and now > r.deadline  # noqa: E731
        with self.wake:
            expired = [r for r in self.waiting if late(r)]
            for r in expired:
                self.waiting.remove(r)
        for r in expired:
            for choice in [r, *r.siblings]:
                self._end(choice, error="timed out waiting for a free slot")
        for r in self.active + [self.prefilling] * (self.prefilling is not None):
            if late(r) and r.error is None:
                r.error = "timed out"

    def _fail_all(self, e: Exception):
        failed = self.active + [self.prefilling] * (self.prefilling is not None)
        if self.prefilling is not None:
            failed += self.prefilling.siblings
        self.active.clear()
        self.prefilling = None
        for r in failed:
            self._end(r, error=f"{type(e).__name__}: {e}")
        self.rows.forget_all()

    # ------------------------------------------------------------------ the steps
    def admit(self):
        """Start prefilling the next waiting request, in the free row that serves most of its prompt."""
        while self.prefilling is None and len(self.active) < self.max_batch:
            with self.wake:
                if not self.waiting or len(self.active) + 1 + len(self.waiting[0].siblings) > self.max_batch:
                    return   # (a request's choices wait until there are rows for all of them)
                request = self.waiting.popleft()
            gen = request.gen
            for choice in [request, *request.siblings]:
                choice.gen.begin()
            if request.cancelled or request.error:
                self._end(request)
                self._start_siblings(request, None)
                continue
            row = len(self.active)
            try:
                request.fed = self.rows.take(gen.prompt_ids, row, scoring=gen.params.prompt_logprobs is not None)
            except Exception as e:
                self.rows.forget(row)
                self._end(request, error=f"{type(e).__name__}: {e}")
                self._start_siblings(request, None)
                continue
            gen.stats.cached_tokens = request.fed
            self.cached_tokens += request.fed
            self.prefilling = request

    @torch.inference_mode()
    def prefill_step(self):
        """One chunk of the prefilling request's prompt; after its last, its first token, and it joins the
        decoding rows."""
        request, row = self.prefilling, len(self.active)
        gen = request.gen
        if request.cancelled or request.error:
            self.prefilling = None
            self._end(request)
            self._start_siblings(request, None)
            return
        try:
            chunk = gen.prompt_ids[request.fed:request.fed + self.prefill_chunk]
            logits = prefill_chunk(self.engine.model, gen, self.rows.rows(row, row + 1), request.fed, len(chunk))
            self.rows.append(row, chunk)
            request.fed += len(chunk)
            if request.fed < len(gen.prompt_ids):
                return
            self.rows.touch(row)
            piece = "" if gen.prompt_only() else gen.accept(gen.next_token(logits[0, -1]), logits[0, -1])
        except Exception as e:
            self.prefilling = None
            self.rows.forget(row)
            self._end(request, error=f"{type(e).__name__}: {e}")
            self._start_siblings(request, None, error=f"{type(e).__name__}: {e}")
            return
        self._join(request, row, piece)
        self.prefilling = None   # (after joining: it is never out of both, for drain() to see)
        self._start_siblings(request, row, logits[0, -1])

    def _join(self, request: Request, row: int, piece: str):
        """A request whose first token is out joins the decoding rows (row == len(active)): or, if it is
        already done, ends, its row kept as a cached prefix."""
        if not request.gen.done:
            self.active.append(request)
        self._emit(request, piece)
        if request.gen.done:
            self._end(request)

    def _start_siblings(self, request: Request, row: int | None, scores: torch.Tensor | None = None,
                        error: str | None = None):
        """The other choices of `request`'s prompt, once it is prefilled into `row`: each takes a copy of the
        row into the next free row and its first token from the same `scores` (its own sampler and seed).
        row None: the prefill did not happen (failed, cancelled); they end with it."""
        siblings, request.siblings = request.siblings, []
        for sibling in siblings:
            if row is None or sibling.cancelled or sibling.error:
                self._end(sibling, error=error or request.error or ("cancelled" if request.cancelled else None))
                continue
            gen, target = sibling.gen, len(self.active)
            try:
                self.rows.copy(row, target)
                gen.stats.cached_tokens = len(gen.prompt_ids)
                piece = "" if gen.prompt_only() else gen.accept(gen.next_token(scores), scores)
            except Exception as e:
                self.rows.forget(target)
                self._end(sibling, error=f"{type(e).__name__}: {e}")
                continue
            self._join(sibling, target, piece)

    @torch.inference_mode()
    def decode_step(self):
        """One token for every decoding request: one forward pass, one batched sample; finished requests
        leave the decoding rows (their caches kept). A request decoding alone decodes speculatively."""
        n = len(self.active)
        if n == 1 and self.prefilling is None and self.engine.speculate:
            self._speculate(self.active[0])
        else:
            self._decode_all(n)
        for i in reversed(range(len(self.active))):
            request = self.active[i]
            if request.gen.done or request.cancelled or request.error:
                self._leave(i)
                self._end(request)

    def _speculate(self, request: Request):
        """One speculative round for the only decoding request (row 0): its drafts checked in one pass."""
        gen = request.gen
        if request.speculation is None:
            request.speculation = self.engine.speculation(gen)
        produced = len(gen.token_ids)
        try:
            for piece in request.speculation.round(self.engine.model, gen, self.rows.rows(0, 1), self.rows.ids[0]):
                self._emit(request, piece)
        except Exception as e:
            request.error = f"{type(e).__name__}: {e}"
        self.tokens_generated += max(1, len(gen.token_ids) - produced)
        self.decode_steps += 1

    def _decode_all(self, n: int):
        """One token for each of the n decoding rows."""
        fed = [r.gen.last_token for r in self.active]
        logits = self._decode_logits(fed)
        tokens = self._sample(logits)
        for i, request in enumerate(self.active):
            if logits[i] is None or tokens[i] is None:
                continue
            self.rows.append(i, [fed[i]])
            try:
                self._emit(request, request.gen.accept(tokens[i], logits[i]))
            except Exception as e:
                request.error = f"{type(e).__name__}: {e}"
        self.tokens_generated += n
        self.decode_steps += 1

    def _leave(self, i: int):
        """Take decoding row i out of the decoding block: the last decoding row moves into its place."""
        last = len(self.active) - 1
        request = self.active[i]
        self.rows.swap(i, last)
        self.active[i] = self.active[last]
        self.active.pop()
        self.rows.touch(last)
        if request.error:
            self.rows.forget(last)
        if self.prefilling is not None:  # the prefilling row moves down next to the decoding ones
            self.rows.swap(last, last + 1)

    def _decode_logits(self, fed: list[int]) -> list[torch.Tensor | None]:
        """One forward pass for all decoding rows; if it fails, each row alone, so that only the row that
        fails is lost (a failed pass leaves the cache lengths as they were: the rows can be run again)."""
        n, model = len(fed), self.engine.model
        try:
            logits, _ = model(torch.tensor(fed)[:, None], kv_cache=self.rows.rows(0, n), last_only=True)
            return list(logits[:, -1])
        except Exception:
            pass
        out = []
        for i in range(n):
            try:
                logits, _ = model(torch.tensor([[fed[i]]]), kv_cache=self.rows.rows(i, i + 1), last_only=True)
                out.append(logits[0, -1])
            except Exception as e:
                self.active[i].error = f"{type(e).__name__}: {e}"
                out.append(None)
        return out

    def _sample(self, logits: list[torch.Tensor | None]) -> list[int | None]:
        """The next token of every row that has logits: all rows at once, or one at a time to find the one
        that fails."""
        ok = [i for i, row in enumerate(logits) if row is not None]
        tokens: list[int | None] = [None] * len(logits)
        if not ok:
            return tokens
        gens = [self.active[i].gen for i in ok]
        vocab = logits[ok[0]].shape[-1]
        try:
            picked = sampling.sample_rows(torch.stack([logits[i] for i in ok]), [g.params for g in gens],
                                          [g.generator for g in gens], [g.penalty_mask(vocab) for g in gens],
                                          [g.grammar_mask(vocab) for g in gens])
            for i, token in zip(ok, picked):
                tokens[i] = token
            return tokens
        except Exception:
            pass
        for i, gen in zip(ok, gens):
            try:
                tokens[i] = gen.next_token(logits[i])
            except Exception as e:
                self.active[i].error = f"{type(e).__name__}: {e}"
        return tokens

    # ------------------------------------------------------------------ events
    def _emit(self, request: Request, piece: str):
        if piece and not request.cancelled:
            request.on_event(request.gen, piece)

    def _end(self, request: Request, error: str | None = None):
        """Send the request's end event, exactly once: its held-back text, then None. Never raises."""
        if request.ended:
            return
        request.ended = True
        gen = request.gen
        error = error or request.error
        tail = ""
        if error is None and not request.cancelled:
            try:
                tail = gen.finish()
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
        if error is not None:
            gen.fail(error)
        gen.close()
        for piece in ([tail] if tail else []) + [None]:
            try:
                request.on_event(gen, piece)
            except Exception:  # a listener's failure is its own; the batcher goes on
                pass
