"""The generation engine: prompt ids -> prefill -> decode steps with a KV cache -> streamed text.

Everything that generates (the chat REPL, `generate`, the server, the evals) goes through this
module: `Engine.generate` runs one sequence, `Batcher` runs many at once (one forward pass decodes a
token for every active sequence). Both drive the same per-sequence `Generation`, so sampling, stop
rules, logprobs and speed measurements live in one place.
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .model import GPT
from .tokenizer import StreamDecoder, Tokenizer


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop. temperature 0 means greedy."""
    max_new_tokens: int = 512
    temperature: float = 0.7
    top_k: int = 0                      # 0: off
    top_p: float = 1.0                  # 1.0: off
    repetition_penalty: float = 1.0     # 1.0: off; >1 discourages tokens already in the context (not end-of-turn)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)   # stop strings (not included in the output)
    stop_token_ids: list[int] | None = None         # default: the tokenizer's end-of-turn tokens
    logprobs: int | None = None                     # record each token's log-probability and this many alternatives

    def validate(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be between 0 and 20, got {self.logprobs}")


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    time_to_first_token: float = 0.0    # seconds from the call to the first sampled token (includes prefill)
    decode_seconds: float = 0.0         # time spent after the first token
    decode_steps: int = 0               # forward passes after the first token
    total_seconds: float = 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.time_to_first_token if self.time_to_first_token else 0.0

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: tokens after the first, per second (what llama.cpp calls eval speed)."""
        return self.decode_steps / self.decode_seconds if self.decode_steps and self.decode_seconds else 0.0


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
                context: torch.Tensor | None = None) -> int:
    """Pick one token id from a (vocab,) row of logits."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and context is not None and context.numel():
        seen = torch.unique(context)
        scores = logits[seen]  # CTRL-style penalty: shrink positive scores, grow negative ones
        logits[seen] = torch.where(scores > 0, scores / params.repetition_penalty, scores * params.repetition_penalty)
    if params.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:  # nucleus: keep the smallest set of tokens whose probability sums to top_p
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs[before >= params.top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]        # the most likely alternatives, best first


def token_logprob(logits: torch.Tensor, token: int, top_n: int) -> TokenLogprob:
    """log p(token) under the model's raw distribution (before temperature and truncation)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top = []
    if top_n:
        values, ids = torch.topk(logp, top_n)
        top = list(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(logp[token]), top)


class Generation:
    """One generation: iterate to stream text pieces; afterwards read text, token_ids, finish_reason, stats.

    It also holds the per-sequence decoding state (sampler, stop rules, streaming detokenizer) that
    both Engine and Batcher drive one token at a time through `_accept`.
    """

    def __init__(self, engine: "Engine", prompt_ids: list[int], params: SamplingParams):
        self.engine, self.prompt_ids, self.params = engine, list(prompt_ids), params
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []   # filled when params.logprobs is not None
        self.text = ""
        self.finish_reason: str | None = None   # "stop" (end of turn or stop string) or "length"
        self.stats = GenerationStats(prompt_tokens=len(prompt_ids))
        self.done = False
        self.max_new = min(params.max_new_tokens, engine.context_length - len(prompt_ids))
        self._stop_ids = set(engine.tokenizer.end_of_turn_ids if params.stop_token_ids is None else params.stop_token_ids)
        self._generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        # the penalty spares end-of-turn tokens: a chat prompt holds <|end|> after every turn, and
        # penalising it would keep the reply from ever stopping
        self._context = (torch.tensor([t for t in prompt_ids if t not in self._stop_ids], dtype=torch.long)
                         if params.repetition_penalty != 1.0 else None)
        self._decoder = StreamDecoder(engine.tokenizer)
        self._pending = ""  # decoded text held back because it may be the start of a stop string
        self._holdback = max((len(s) for s in params.stop), default=1) - 1
        self._stopped_by_string = False
        self._start = self._first_token_at = None
        self.last_token: int | None = None

    def __iter__(self):
        yield from self.engine._run(self)

    def _begin(self):
        self._start = time.perf_counter()

    def _accept(self, logits: torch.Tensor) -> str:
        """Sample the next token from a (vocab,) row of logits and apply the stop rules; return new text."""
        token = sample_next(logits, self.params, self._generator, self._context)
        now = time.perf_counter()
        if self._first_token_at is None:
            self._first_token_at = now
            self.stats.time_to_first_token = now - self._start
        else:
            self.stats.decode_steps += 1
        self.last_token = token
        if token in self._stop_ids:
            self.finish_reason, self.done = "stop", True
            return ""
        if self.params.logprobs is not None:
            self.logprobs.append(token_logprob(logits, token, self.params.logprobs))
        self.token_ids.append(token)
        self.stats.completion_tokens = len(self.token_ids)
        if self._context is not None:
            self._context = torch.cat([self._context, torch.tensor([token])])
        if len(self.token_ids) >= self.max_new:
            self.finish_reason, self.done = "length", True
        self._pending += self._decoder.push(token)
        if (hit := _find_stop(self._pending, self.params.stop)) is not None:
            self._pending, self.finish_reason, self.done = self._pending[:hit], "stop", True
            self._stopped_by_string = True
            return ""
        emit = self._pending[:len(self._pending) - self._holdback]
        self._pending = self._pending[len(emit):]
        self.text += emit
        return emit

    def _finish(self) -> str:
        """The held-back tail of the text once generation has ended (it may still hold a stop string)."""
        if not self._stopped_by_string:
            self._pending += self._decoder.flush()
            if (hit := _find_stop(self._pending, self.params.stop)) is not None:
                self._pending, self.finish_reason = self._pending[:hit], "stop"
        tail, self._pending = self._pending, ""
        self.text += tail
        self.done = True
        return tail

    def _close(self):
        if self._start is None:  # never started (cancelled while waiting)
            return
        end = time.perf_counter()
        self.stats.total_seconds = end - self._start
        if self._first_token_at is not None:
            self.stats.decode_seconds = end - self._first_token_at


class Engine:
    """Generates text from a picochat model and its tokenizer."""

    def __init__(self, model: GPT, tokenizer: Tokenizer):
        self.model = model.eval()
        self.tokenizer = tokenizer

    @property
    def context_length(self) -> int:
        return self.model.config.max_seq_len

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """Render messages with the model's chat template and tokenize, ready for the assistant's reply."""
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))

    def generate(self, prompt_ids: list[int], params: SamplingParams | None = None) -> Generation:
        """A streaming generation: `for piece in engine.generate(ids, params): ...`."""
        params = params or SamplingParams()
        params.validate()
        if not prompt_ids:
            raise ValueError("the prompt is empty: give at least one token")
        if len(prompt_ids) >= self.context_length:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {self.context_length}")
        return Generation(self, prompt_ids, params)

    def complete(self, prompt_ids: list[int], params: SamplingParams | None = None) -> Generation:
        """Generate to the end without streaming."""
        gen = self.generate(prompt_ids, params)
        for _ in gen:
            pass
        return gen

    @torch.inference_mode()
    def prompt_logprobs(self, prompt_ids: list[int], top_n: int = 0) -> list[TokenLogprob | None]:
        """log p(token_i | tokens before i) for every prompt token (None for the first, which has no context)."""
        logits, _ = self.model(torch.tensor([prompt_ids]))
        return [None] + [token_logprob(logits[0, i - 1], prompt_ids[i], top_n) for i in range(1, len(prompt_ids))]

    @torch.inference_mode()
    def _run(self, gen: Generation):
        gen._begin()
        cache = self.model.new_kv_cache(1, len(gen.prompt_ids) + gen.max_new)
        x = torch.tensor([gen.prompt_ids])
        try:
            while not gen.done:
                logits, _ = self.model(x, kv_cache=cache, last_only=True)
                piece = gen._accept(logits[0, -1])
                if piece:
                    yield piece
                x = torch.tensor([[gen.last_token]])
            tail = gen._finish()
            if tail:
                yield tail
        finally:
            gen._close()


class QueueFull(RuntimeError):
    """The batcher's waiting queue is at its limit; try again later."""


@dataclass
class _Request:
    gen: Generation
    on_event: Callable[[Generation, str | None], None]   # (generation, text piece), then (generation, None) at the end
    cancelled: bool = False


class Batcher:
    """Runs many generations at once on a background thread (continuous batching).

    A new request is prefilled on its own into a free row of a shared KV cache; then every step does one
    forward pass that decodes a token for each active row. A finished or cancelled row is freed at once
    and the last active row moves into its place, so the active rows are always 0..n-1.
    """

    def __init__(self, engine: Engine, max_batch: int = 8, max_queue: int = 64, max_len: int | None = None):
        self.engine, self.max_batch, self.max_queue = engine, max_batch, max_queue
        self.max_len = min(max_len or engine.context_length, engine.context_length)
        self.cache = engine.model.new_kv_cache(max_batch, self.max_len)
        self.active: list[_Request] = []
        self.waiting: collections.deque[_Request] = collections.deque()
        self.wake = threading.Condition()
        self.tokens_generated = 0  # decoded tokens, all requests together
        self.decode_steps = 0      # batched forward passes
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="picochat-batcher", daemon=True)
        self._thread.start()

    @property
    def queue_length(self) -> int:
        return len(self.waiting)

    def submit(self, prompt_ids: list[int], params: SamplingParams,
               on_event: Callable[[Generation, str | None], None]) -> _Request:
        """Queue a generation. on_event(gen, piece) is called from the batcher thread for each text piece,
        and on_event(gen, None) when it has finished (gen then holds the text, finish_reason and stats).

        Raises ValueError for a bad request and QueueFull when the queue is at its limit.
        """
        params.validate()
        if not prompt_ids:
            raise ValueError("the prompt is empty: give at least one token")
        if len(prompt_ids) >= self.max_len:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the context is {self.max_len}")
        gen = Generation(self.engine, prompt_ids, params)
        gen.max_new = min(gen.max_new, self.max_len - len(prompt_ids))
        request = _Request(gen, on_event)
        with self.wake:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
            self.waiting.append(request)
            self.wake.notify()
        return request

    def cancel(self, request: _Request):
        """Stop a generation (e.g. its client went away); its row is freed at the next step."""
        request.cancelled = True

    # ------------------------------------------------------------------ the batcher thread
    def close(self):
        """Stop the batcher thread after the current step; requests still in flight end at once."""
        with self.wake:
            self._closed = True
            self.wake.notify()
        self._thread.join(timeout=30)
        for r in self.active + list(self.waiting):
            r.cancelled = True
            self._end(r)
        self.active.clear()
        self.waiting.clear()

    def _loop(self):
        while True:
            with self.wake:
                while not self.waiting and not self.active and not self._closed:
                    self.wake.wait()
                if self._closed:
                    return
            try:
                self._admit()
                if self.active:
                    self._decode_step()
            except Exception as e:  # never let one bad step kill the thread: fail the requests in flight
                for r in self.active + list(self.waiting):
                    r.gen.finish_reason = f"error: {e}"
                    self._end(r)
                self.active.clear()
                self.waiting.clear()
                self.cache.lengths.zero_()

    @torch.inference_mode()
    def _admit(self):
        while len(self.active) < self.max_batch:
            with self.wake:
                if not self.waiting:
                    return
                request = self.waiting.popleft()
            if request.cancelled:
                request.gen._begin()
                self._end(request)
                continue
            row = len(self.active)
            gen = request.gen
            gen._begin()
            self.cache.lengths[row] = 0
            logits, _ = self.engine.model(torch.tensor([gen.prompt_ids]), kv_cache=self.cache.rows(row, row + 1),
                                          last_only=True)
            self._emit(request, gen._accept(logits[0, -1]))
            if gen.done:
                self._end(request)
            else:
                self.active.append(request)

    @torch.inference_mode()
    def _decode_step(self):
        n = len(self.active)
        x = torch.tensor([[r.gen.last_token] for r in self.active])
        logits, _ = self.engine.model(x, kv_cache=self.cache.rows(0, n), last_only=True)
        for i, request in enumerate(self.active):
            self._emit(request, request.gen._accept(logits[i, -1]))
        self.tokens_generated += n
        self.decode_steps += 1
        for i in reversed(range(n)):  # free finished rows, moving the last active row into the gap
            request = self.active[i]
            if request.gen.done or request.cancelled:
                last = len(self.active) - 1
                if i != last:
                    self._move_row(last, i)
                    self.active[i] = self.active[last]
                self.active.pop()
                self._end(request)

    def _move_row(self, src: int, dst: int):
        length = int(self.cache.lengths[src])
        for t in (*self.cache.k, *self.cache.v):
            t[dst, :, :length] = t[src, :, :length]
        self.cache.lengths[dst] = length

    def _emit(self, request: _Request, piece: str):
        if piece and not request.cancelled:
            request.on_event(request.gen, piece)

    def _end(self, request: _Request):
        tail = request.gen._finish() if not request.cancelled else ""
        request.gen._close()
        if tail:
            request.on_event(request.gen, tail)
        request.on_event(request.gen, None)


def _find_stop(text: str, stops: list[str]) -> int | None:
    """Index of the earliest stop string in text, or None."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None
