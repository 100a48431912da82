"""The generation engine: prompt ids -> prefill -> decode steps with a KV cache -> streamed text.

Everything that generates (the chat REPL, `generate`, the server, the evals) goes through this
module: `Engine.generate` runs one sequence, `Batcher` runs many at once (one forward pass decodes a
token for every active sequence). Both drive the same per-sequence `Generation` and pick tokens with the
same `sample_rows`, so sampling, stop rules, logprobs and speed measurements live in one place.

Both keep what they have computed: a prompt that starts like an earlier one (the next turn of a chat,
an agent loop, the same system prompt) reuses the keys and values of that common prefix and computes
only the new tokens. Long prompts are prefilled in chunks, so a server's active streams keep flowing.
"""
from __future__ import annotations

import collections
import concurrent.futures
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .formats.gguf import check_memory
from .model import GPT, KVCache
from .tokenizer import StreamDecoder, Tokenizer

PREFILL_CHUNK = 256   # prompt tokens per forward pass while prefilling
TOP_CANDIDATES = 64   # top-p sampling looks at this many of the most likely tokens (exact; see sample_rows)
MIN_TEMPERATURE = 1e-5  # a temperature below this samples greedily (dividing by it could overflow to inf)
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed accepts


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop. temperature 0 (or below MIN_TEMPERATURE) means greedy."""
    max_new_tokens: int = 512
    temperature: float = 0.7
    top_k: int = 0                      # 0: off
    top_p: float = 1.0                  # 1.0: off
    repetition_penalty: float = 1.0     # 1.0: off; >1 discourages tokens already in the context (not end-of-turn)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)   # stop strings (not included in the output)
    stop_token_ids: list[int] | None = None         # default: the tokenizer's end-of-turn tokens
    logprobs: int | None = None                     # record each token's log-probability and this many alternatives
    prompt_logprobs: int | None = None              # score the prompt too: each prompt token's log-probability
                                                    # and this many alternatives (max_new_tokens may then be 0)

    def validate(self):
        """Raise ValueError naming the first setting out of range (NaN and infinities included)."""
        least = 0 if self.prompt_logprobs is not None else 1
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < least:
            raise ValueError(f"max_new_tokens must be an integer of at least {least}, got {self.max_new_tokens!r}")
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.seed is not None and not (_is_int(self.seed) and SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            raise ValueError(f"seed must be an integer from {SEED_RANGE[0]} to {SEED_RANGE[1]}, got {self.seed!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not (_is_int(value) and 0 <= value <= 20):
                raise ValueError(f"{name} must be an integer from 0 to 20, got {value!r}")
        if not all(isinstance(s, str) for s in self.stop):
            raise ValueError(f"stop must be a list of strings, got {self.stop!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0              # prompt tokens whose keys/values were reused, not computed
    completion_tokens: int = 0
    time_to_first_token: float = 0.0    # seconds from the call to the first sampled token (includes prefill)
    decode_seconds: float = 0.0         # time spent after the first token
    decode_steps: int = 0               # forward passes after the first token
    total_seconds: float = 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prompt tokens computed (not reused) per second of time to the first token."""
        n = self.prompt_tokens - self.cached_tokens
        return n / self.time_to_first_token if self.time_to_first_token else 0.0

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: tokens after the first, per second (what llama.cpp calls eval speed)."""
        return self.decode_steps / self.decode_seconds if self.decode_steps and self.decode_seconds else 0.0


# ----------------------------------------------------------------------------- sampling
def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style: shrink the positive scores of tokens already seen, grow their negative ones."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def sample_rows(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                seen: list[torch.Tensor | None] | None = None) -> list[int]:
    """Pick the next token of each row of (rows, vocab) logits, all rows in a few tensor operations.

    Greedy rows take the argmax. Sampled rows divide by their temperature; top-k keeps the k most likely
    tokens; top-p (nucleus) keeps the smallest set whose probability reaches p. Both are computed on the
    TOP_CANDIDATES most likely tokens instead of sorting the whole vocabulary: that is exact whenever those
    candidates hold probability p (a row where they do not is sorted in full). Each row draws its uniform
    number from its own generator (seeded requests are reproducible whatever else is in the batch).
    Raises ValueError when a row's scores hold NaN (a broken model or weights).
    """
    logits = logits.float()
    n, vocab = logits.shape
    broken = torch.isnan(logits).any(dim=-1)
    if bool(broken.any()):
        raise ValueError(f"the model's scores for row(s) {broken.nonzero()[:, 0].tolist()} are NaN")
    if seen is not None and any(s is not None for s in seen):
        logits = logits.clone()
        for b, s in enumerate(seen):
            if s is not None and params[b].repetition_penalty != 1.0:
                logits[b] = apply_repetition_penalty(logits[b], s, params[b].repetition_penalty)
    tokens = logits.max(dim=-1).indices.tolist()  # (max is ~3× faster than argmax on the CPU; same first index)
    rows = [b for b, p in enumerate(params) if p.temperature >= MIN_TEMPERATURE]
    if not rows:
        return tokens
    z = logits[rows] / torch.tensor([[params[b].temperature] for b in rows])
    top_k = torch.tensor([params[b].top_k for b in rows])
    top_p = torch.tensor([params[b].top_p for b in rows])
    truncated = bool(((top_k > 0) | (top_p < 1)).any())
    if truncated:
        k = min(vocab, max(TOP_CANDIDATES, int(top_k.max())))
        ids, probs = _candidates(z, top_k, k)
        short = (top_k == 0) & (top_p < 1) & (probs.sum(-1) < top_p)  # the nucleus reaches past the candidates
        if bool(short.any()) and k < vocab:
            ids, probs = _candidates(z, top_k, vocab)
        before = probs.cumsum(-1) - probs                                  # mass of the more likely tokens
        probs = probs.masked_fill(before >= top_p[:, None], 0.0)
    else:
        ids, probs = None, torch.softmax(z, dim=-1)
    u = torch.stack([torch.rand(1, generator=generators[b]) for b in rows])  # (rows, 1)
    cumulative = probs.cumsum(-1)
    choice = (cumulative < u * cumulative[:, -1:]).sum(-1).clamp_(max=probs.shape[-1] - 1)
    picked = ids.gather(1, choice[:, None])[:, 0] if ids is not None else choice
    for b, token in zip(rows, picked.tolist()):
        tokens[b] = token
    return tokens


def _candidates(z: torch.Tensor, top_k: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely tokens of each row (ids, most likely first) and their probabilities: under the whole
    distribution, or renormalised over the row's top-k set where its top_k is on."""
    values, ids = z.topk(k, dim=-1)
    outside = (top_k[:, None] > 0) & (torch.arange(k)[None, :] >= top_k[:, None])
    values = values.masked_fill(outside, float("-inf"))
    norm = torch.where(top_k[:, None] > 0, torch.logsumexp(values, -1, keepdim=True),
                       torch.logsumexp(z, -1, keepdim=True))
    return ids, torch.exp(values - norm)


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
                context: torch.Tensor | None = None) -> int:
    """Pick one token id from a (vocab,) row of logits (context: token ids the repetition penalty sees)."""
    seen = None
    if context is not None and context.numel() and params.repetition_penalty != 1.0:
        seen = torch.zeros(logits.shape[-1], dtype=torch.bool)
        seen[context] = True
    return sample_rows(logits[None], [params], [generator], [seen])[0]


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


# ----------------------------------------------------------------------------- one generation
class Generation:
    """One generation: iterate to stream text pieces; afterwards read text, token_ids, finish_reason, stats.

    It also holds the per-sequence decoding state (random generator, stop rules, streaming detokenizer)
    that both Engine and Batcher drive one token at a time through `_accept`.
    """

    def __init__(self, engine: "Engine", prompt_ids: list[int], params: SamplingParams):
        self.engine, self.prompt_ids, self.params = engine, list(prompt_ids), params
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []   # filled when params.logprobs is not None
        self.prompt_logprobs: list[TokenLogprob | None] = []  # when params.prompt_logprobs is not None
        self.text = ""
        self.finish_reason: str | None = None   # "stop" (end of turn or stop string) or "length"
        self.stats = GenerationStats(prompt_tokens=len(prompt_ids))
        self.done = False
        self.max_new = min(params.max_new_tokens, engine.context_length - len(prompt_ids))
        self._stop_ids = set(engine.tokenizer.end_of_turn_ids if params.stop_token_ids is None else params.stop_token_ids)
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        self.seen: torch.Tensor | None = None   # tokens the repetition penalty sees (made on the first step)
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

    def _score_prompt(self, logits: torch.Tensor, start: int):
        """Record log p(prompt token) from (T, vocab) logits computed at prompt positions start..start+T-1
        (the scores at position i are for token i+1), when params.prompt_logprobs asks for it."""
        top_n = self.params.prompt_logprobs
        if top_n is None:
            return
        if start == 0:
            self.prompt_logprobs.append(None)  # the first token has no context to be scored in
        ids = self.prompt_ids
        for j in range(min(logits.shape[0], len(ids) - 1 - start)):
            self.prompt_logprobs.append(token_logprob(logits[j], ids[start + j + 1], top_n))

    def _prompt_only(self) -> bool:
        """Whether this generation only scores its prompt (max_new_tokens 0): then it ends after the prefill."""
        if self.max_new > 0:
            return False
        self.finish_reason, self.done = "length", True
        return True

    def penalty_mask(self, vocab: int) -> torch.Tensor | None:
        """The tokens the repetition penalty applies to, or None when it is off. The penalty spares
        end-of-turn tokens: a chat prompt holds <|end|> after every turn, and penalising it would keep the
        reply from ever stopping."""
        if self.params.repetition_penalty == 1.0:
            return None
        if self.seen is None:
            self.seen = torch.zeros(vocab, dtype=torch.bool)
            context = [t for t in self.prompt_ids if t not in self._stop_ids and 0 <= t < vocab]
            if context:
                self.seen[torch.tensor(context)] = True
        return self.seen

    def _accept(self, logits: torch.Tensor) -> str:
        """Sample the next token from a (vocab,) row of logits and apply the stop rules; return new text."""
        token = sample_rows(logits[None], [self.params], [self.generator], [self.penalty_mask(logits.shape[-1])])[0]
        return self._accept_token(token, logits)

    def _accept_token(self, token: int, logits: torch.Tensor) -> str:
        """Take `token` (sampled from the (vocab,) row `logits`) and apply the stop rules; return new text."""
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
        if self.seen is not None and token < self.seen.numel():
            self.seen[token] = True
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


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens a and b share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


# ----------------------------------------------------------------------------- one sequence
class Engine:
    """Generates text from a picochat model and its tokenizer, one sequence at a time.

    It keeps the KV cache of its last generation: a prompt that extends it (a chat's next turn) computes
    only its new tokens. The model's weights must not change while an Engine reuses its cache (`reset()`).
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer, prefill_chunk: int = PREFILL_CHUNK):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.prefill_chunk = prefill_chunk
        self._cache: KVCache | None = None   # the last generation's keys and values ...
        self._cached_ids: list[int] = []     # ... for these tokens

    @property
    def context_length(self) -> int:
        return self.model.config.max_seq_len

    def reset(self):
        """Forget the cached keys and values (e.g. after changing the model's weights)."""
        self._cache, self._cached_ids = None, []

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """Render messages with the model's chat template and tokenize, ready for the assistant's reply.
        Message text is tokenized as text: only the template's markup becomes special tokens."""
        return self.tokenizer.encode_chat(messages, add_generation_prompt=True)

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

    def prompt_logprobs(self, prompt_ids: list[int], top_n: int = 0) -> list[TokenLogprob | None]:
        """log p(token_i | tokens before i) for every prompt token (None for the first, which has no context).
        Computed a chunk at a time, so memory stays (chunk × vocab) whatever the prompt's length."""
        gen = self.complete(prompt_ids, SamplingParams(max_new_tokens=0, temperature=0, prompt_logprobs=top_n))
        return gen.prompt_logprobs

    @torch.inference_mode()
    def continuation_logprobs(self, context_ids: list[int], continuation_ids: list[int],
                              top_n: int = 1) -> list[TokenLogprob]:
        """log p of each continuation token given the context and the continuation before it (what a
        multiple-choice question or lm-evaluation-harness asks). The context's keys and values are reused
        from the last call that shared it (the other choices of one question); memory is (chunk × vocab)."""
        if not context_ids or not continuation_ids:
            raise ValueError("scoring needs a context of at least one token and a continuation")
        ids = list(context_ids) + list(continuation_ids)
        if len(ids) - 1 > self.context_length:  # the last token is scored, never fed
            raise ValueError(f"context + continuation hold {len(ids)} tokens; the model's context is "
                             f"{self.context_length}")
        first = len(context_ids) - 1   # the position whose logits score the first continuation token
        cache, done = self._cache_for(ids, len(ids), max_reuse=first)
        scored: list[TokenLogprob] = []
        while done < len(ids) - 1:
            chunk = ids[done:min(done + self.prefill_chunk, len(ids) - 1)]
            logits, _ = self.model(torch.tensor([chunk]), kv_cache=cache, last_only=done + len(chunk) <= first)
            for j in range(len(chunk)):
                position = done + j
                if position >= first and logits.shape[1] == len(chunk):
                    scored.append(token_logprob(logits[0, j], ids[position + 1], top_n))
            done += len(chunk)
        self._cache, self._cached_ids = cache, ids[:-1]
        return scored

    def _cache_for(self, prompt_ids: list[int], needed: int, reuse_prefix: bool = True,
                   max_reuse: int | None = None) -> tuple[KVCache, int]:
        """A cache for this generation and how many prompt tokens it already holds (at least one token is
        always left to compute: the last prompt position's logits pick the first new token)."""
        reuse = 0
        if self._cache is not None and reuse_prefix:
            reuse = min(common_prefix(self._cached_ids, prompt_ids), len(prompt_ids) - 1)
            if max_reuse is not None:
                reuse = min(reuse, max_reuse)
        cache = self._cache
        if cache is None or cache.max_len < needed:  # grow in steps, keeping what is reused
            size = min(self.context_length, max(needed, 2 * (cache.max_len if cache else 0), 256))
            grown = self.model.new_kv_cache(1, size)
            if reuse:
                for old, new in zip((*cache.k, *cache.v), (*grown.k, *grown.v)):
                    new[:, :, :reuse] = old[:, :, :reuse]
            cache = grown
        cache.lengths.fill_(reuse)
        self._cache, self._cached_ids = None, []  # held by this generation until it ends
        return cache, reuse

    @torch.inference_mode()
    def _run(self, gen: Generation):
        gen._begin()
        ids = gen.prompt_ids
        scoring = gen.params.prompt_logprobs is not None  # needs every prompt position's logits: no reuse
        cache, done = self._cache_for(ids, len(ids) + gen.max_new, reuse_prefix=not scoring)
        gen.stats.cached_tokens = done
        fed = ids[:done]
        try:
            while done < len(ids):  # prefill what is not cached, a chunk at a time
                chunk = ids[done:done + self.prefill_chunk]
                logits, _ = self.model(torch.tensor([chunk]), kv_cache=cache, last_only=not scoring)
                gen._score_prompt(logits[0], done)
                done += len(chunk)
                fed += chunk
            while not gen._prompt_only():
                piece = gen._accept(logits[0, -1])
                if piece:
                    yield piece
                if gen.done:
                    break
                logits, _ = self.model(torch.tensor([[gen.last_token]]), kv_cache=cache, last_only=True)
                fed.append(gen.last_token)
            tail = gen._finish()
            if tail:
                yield tail
        finally:
            gen._close()
            if int(cache.lengths[0]) == len(fed):  # keep it for the next prompt (unless a step failed midway)
                self._cache, self._cached_ids = cache, fed


# ----------------------------------------------------------------------------- a conversation
class ChatSession:
    """A multi-turn chat with an Engine, built so each turn computes only its new tokens.

    The next prompt is the previous prompt's tokens, the reply's own tokens, then the tokens of the text
    the chat template adds after them (end of turn, the new user message, the generation prompt), so the
    Engine finds all of the earlier conversation in its cache. Where the template does not extend its
    previous rendering (or old turns were dropped to fit the context), the prompt is tokenized afresh and
    the cache is reused up to the first difference. Renderings are Tokenizer.render_chat's (special-token
    strings in messages escaped), so message text is tokenized as text, as in Engine.chat_prompt.
    """

    def __init__(self, engine: Engine, system: str | None = None):
        self.engine = engine
        self.system = system
        self.messages: list[dict] = []
        self._text, self._ids = "", []       # the last rendered prompt plus reply, and their tokens
        self._prompt: tuple[str, list[int]] | None = None
        self.clear()

    def clear(self, system: str | None = ...):
        """Start over (keeping the system prompt, or setting a new one: None removes it)."""
        if system is not ...:
            self.system = system
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self._text, self._ids = "", []

    def _render(self) -> tuple[str, list[int]]:
        tokenizer = self.engine.tokenizer
        text = tokenizer.render_chat(self.messages, add_generation_prompt=True)
        if self._text and text.startswith(self._text):
            return text, self._ids + tokenizer.encode_rendered(text[len(self._text):])
        return text, tokenizer.encode_rendered(text)

    def ask(self, text: str, params: SamplingParams) -> Generation:
        """Add a user message and start the reply (iterate the Generation, then call `record`). The oldest
        turns (never the system prompt) are dropped until the prompt leaves room for the reply."""
        self.messages.append({"role": "user", "content": text})
        context = self.engine.context_length
        first = 1 if self.messages[0]["role"] == "system" else 0
        while True:
            prompt_text, ids = self._render()
            room = context - len(ids)
            if room >= min(params.max_new_tokens, context // 4) or len(self.messages) - first <= 1:
                break
            del self.messages[first:first + 2]
            self._text, self._ids = "", []
        self._prompt = (prompt_text, ids)
        return self.engine.generate(ids, params)

    def record(self, gen: Generation):
        """Add the (possibly interrupted) reply to the conversation."""
        self.messages.append({"role": "assistant", "content": gen.text})
        prompt_text, ids = self._prompt
        tokenizer = self.engine.tokenizer
        # reuse the reply's tokens if they spell its text, and the text holds no special-token strings
        # (the next rendering escapes those into plain text)
        if tokenizer.decode(gen.token_ids) == gen.text == tokenizer.escape_special(gen.text):
            self._text, self._ids = prompt_text + gen.text, ids + gen.token_ids
        else:  # cut by a stop string, or spelling markup: tokenize the next prompt afresh
            self._text, self._ids = "", []


# ----------------------------------------------------------------------------- many sequences
class QueueFull(RuntimeError):
    """The batcher's waiting queue is at its limit (or the batcher is shutting down); try again later."""


@dataclass
class _Request:
    gen: Generation
    on_event: Callable[[Generation, str | None], None]   # (generation, text piece), then (generation, None) at the end
    deadline: float | None = None                         # time.monotonic() after which it ends with an error
    cancelled: bool = False
    error: str | None = None                              # set when it must end with this error at the next step
    fed: int = 0                                          # prompt tokens in its cache row so far
    ended: bool = False                                   # its end event has been sent (exactly once)


class Batcher:
    """Runs many generations at once on a background thread (continuous batching).

    The KV cache has `max_batch` rows. Rows 0..n-1 hold the sequences being decoded: every step is one
    forward pass that decodes a token for each of them, sampled for all rows at once. A new request is
    prefilled into row n, a chunk of `prefill_chunk` tokens between decode steps, then joins them. A
    finished sequence's row keeps its keys and values (rows n+1.. are this prefix cache): a new request
    takes the row whose tokens share the longest prefix with its prompt and computes only the rest.

    Failures stay with their sequence: if the model or the sampler fails on one request (at admission,
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
        config = engine.model.config
        norm = getattr(engine.model, "norm", None)   # the cache takes the dtype of the model's final norm
        itemsize = norm.weight.element_size() if norm is not None else 4
        check_memory(2 * config.n_layer * max_batch * config.n_kv_head * self.max_len * config.head_dim * itemsize,
                     f"a KV cache of {max_batch} rows × {self.max_len} tokens (lower --parallel or --ctx-size)",
                     error=ValueError)
        self.cache = engine.model.new_kv_cache(max_batch, self.max_len)
        self.row_ids: list[list[int]] = [[] for _ in range(max_batch)]  # the tokens each row's cache holds
        self.row_used = [0.0] * max_batch                                # when each row last served a request
        self.active: list[_Request] = []          # decoding, in rows 0..len(active)-1
        self.prefilling: _Request | None = None   # in row len(active)
        self.waiting: collections.deque[_Request] = collections.deque()
        self.wake = threading.Condition()
        self.tokens_generated = 0  # decoded tokens, all requests together
        self.decode_steps = 0      # batched forward passes
        self.cached_tokens = 0     # prompt tokens reused from the prefix cache
        self._calls: collections.deque = collections.deque()  # (fn, future) to run on the loop's thread
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

    def submit(self, prompt_ids: list[int], params: SamplingParams,
               on_event: Callable[[Generation, str | None], None], timeout: float | None = None) -> _Request:
        """Queue a generation. on_event(gen, piece) is called from the batcher thread for each text piece,
        and on_event(gen, None) exactly once when it has ended (gen then holds the text, finish_reason and
        stats; finish_reason "error: ..." when it failed or ran past `timeout` seconds from now).

        Raises ValueError for a bad request and QueueFull when the queue is at its limit.
        """
        params.validate()
        if not prompt_ids:
            raise ValueError("the prompt is empty: give at least one token")
        if len(prompt_ids) >= self.max_len:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the context is {self.max_len}")
        vocab = self.engine.model.config.vocab_size
        if not all(isinstance(t, int) and 0 <= t < vocab for t in prompt_ids):
            raise ValueError(f"the prompt holds token ids outside the vocabulary (0..{vocab - 1})")
        gen = Generation(self.engine, prompt_ids, params)
        gen.max_new = min(gen.max_new, self.max_len - len(prompt_ids))
        request = _Request(gen, on_event, deadline=None if timeout is None else time.monotonic() + timeout)
        with self.wake:
            if self._draining or self._closed:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
            self.waiting.append(request)
            self.wake.notify()
        return request

    def cancel(self, request: _Request):
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
            self._end(r, error="the server is shutting down")

    # ------------------------------------------------------------------ the loop
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
            try:
                self._expire()
                self._admit()
                if self.prefilling is not None:
                    self._prefill_step()
                if self.active:
                    self._decode_step()
            except Exception as e:  # a fault outside any one request (a bug): fail those in flight, go on
                self._fail_all(e)

    def _run_calls(self):
        while self._calls:
            fn, future = self._calls.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except Exception as e:
                    future.set_exception(e)

    def _expire(self):
        """Requests past their deadline end with an error: waiting ones now, running ones at their next step."""
        now = time.monotonic()
        late = lambda r: r.deadline is not None and now > r.deadline  # noqa: E731
        with self.wake:
            expired = [r for r in self.waiting if late(r)]
            for r in expired:
                self.waiting.remove(r)
        for r in expired:
            self._end(r, error="timed out waiting for a free slot")
        for r in self.active + [self.prefilling] * (self.prefilling is not None):
            if late(r) and r.error is None:
                r.error = "timed out"

    def _fail_all(self, e: Exception):
        failed = self.active + [self.prefilling] * (self.prefilling is not None)
        self.active.clear()
        self.prefilling = None
        for r in failed:
            self._end(r, error=f"{type(e).__name__}: {e}")
        self.cache.lengths.zero_()
        self.row_ids = [[] for _ in range(self.max_batch)]

    def _forget_row(self, row: int):
        """Drop what a row's cache holds (after a failure its keys and values cannot be trusted)."""
        self.row_ids[row] = []
        self.cache.lengths[row] = 0

    def _admit(self):
        """Start prefilling the next waiting request, in the free row that shares most of its prompt."""
        while self.prefilling is None and len(self.active) < self.max_batch:
            with self.wake:
                if not self.waiting:
                    return
                request = self.waiting.popleft()
            request.gen._begin()
            if request.cancelled or request.error:
                self._end(request)
                continue
            try:
                self._take_row(request)
            except Exception as e:
                self._forget_row(len(self.active))
                self._end(request, error=f"{type(e).__name__}: {e}")
                continue
            self.prefilling = request

    def _take_row(self, request: _Request):
        gen = request.gen
        first = len(self.active)
        free = range(first, self.max_batch)
        shared = {r: common_prefix(self.row_ids[r], gen.prompt_ids) for r in free}
        row = max(free, key=lambda r: (shared[r], -self.row_used[r] if shared[r] == 0 else 0))
        self._swap_rows(row, first)
        reuse = min(shared[row], len(gen.prompt_ids) - 1)
        if gen.params.prompt_logprobs is not None:  # scoring the prompt needs every position's logits
            reuse = 0
        self.cache.lengths[first] = reuse
        del self.row_ids[first][reuse:]
        request.fed = gen.stats.cached_tokens = reuse
        self.cached_tokens += reuse

    @torch.inference_mode()
    def _prefill_step(self):
        request, row = self.prefilling, len(self.active)
        gen = request.gen
        if request.cancelled or request.error:
            self.prefilling = None
            self._end(request)
            return
        scoring = gen.params.prompt_logprobs is not None
        chunk = gen.prompt_ids[request.fed:request.fed + self.prefill_chunk]
        try:
            logits, _ = self.engine.model(torch.tensor([chunk]), kv_cache=self.cache.rows(row, row + 1),
                                          last_only=not scoring)
            gen._score_prompt(logits[0], request.fed)
            request.fed += len(chunk)
            self.row_ids[row] += chunk
            if request.fed < len(gen.prompt_ids):
                return
            self.row_used[row] = time.monotonic()
            piece = "" if gen._prompt_only() else gen._accept(logits[0, -1])
        except Exception as e:
            self.prefilling = None
            self._forget_row(row)
            self._end(request, error=f"{type(e).__name__}: {e}")
            return
        if not gen.done:
            self.active.append(request)  # row == len(active): it joins the decoding rows as it is
        self.prefilling = None           # (after joining: it is never out of both, for drain() to see)
        self._emit(request, piece)
        if gen.done:
            self._end(request)   # its row stays a cached prefix

    @torch.inference_mode()
    def _decode_step(self):
        n = len(self.active)
        fed = [r.gen.last_token for r in self.active]
        logits = self._decode_logits(fed)
        tokens = self._sample(logits)
        for i, request in enumerate(self.active):
            if logits[i] is None or tokens[i] is None:
                continue
            self.row_ids[i].append(fed[i])
            try:
                self._emit(request, request.gen._accept_token(tokens[i], logits[i]))
            except Exception as e:
                request.error = f"{type(e).__name__}: {e}"
        self.tokens_generated += n
        self.decode_steps += 1
        now = time.monotonic()
        for i in reversed(range(n)):  # finished rows leave the decoding block, their caches kept
            request = self.active[i]
            if request.gen.done or request.cancelled or request.error:
                last = len(self.active) - 1
                self._swap_rows(i, last)
                self.active[i] = self.active[last]
                self.active.pop()
                self.row_used[last] = now
                if request.error:
                    self._forget_row(last)
                if self.prefilling is not None:  # the prefilling row moves down next to the decoding ones
                    self._swap_rows(last, last + 1)
                self._end(request)

    def _decode_logits(self, fed: list[int]) -> list[torch.Tensor | None]:
        """One forward pass for all decoding rows; if it fails, each row alone, so that only the row that
        fails is lost (a failed pass leaves the cache lengths as they were: the rows can be run again)."""
        n = len(fed)
        try:
            logits, _ = self.engine.model(torch.tensor(fed)[:, None], kv_cache=self.cache.rows(0, n), last_only=True)
            return list(logits[:, -1])
        except Exception:
            pass
        rows = []
        for i in range(n):
            try:
                logits, _ = self.engine.model(torch.tensor([[fed[i]]]), kv_cache=self.cache.rows(i, i + 1),
                                              last_only=True)
                rows.append(logits[0, -1])
            except Exception as e:
                self.active[i].error = f"{type(e).__name__}: {e}"
                rows.append(None)
        return rows

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
            picked = sample_rows(torch.stack([logits[i] for i in ok]), [g.params for g in gens],
                                 [g.generator for g in gens], [g.penalty_mask(vocab) for g in gens])
            for i, token in zip(ok, picked):
                tokens[i] = token
            return tokens
        except Exception:
            pass
        for i, gen in zip(ok, gens):
            try:
                tokens[i] = sample_rows(logits[i][None], [gen.params], [gen.generator], [gen.penalty_mask(vocab)])[0]
            except Exception as e:
                self.active[i].error = f"{type(e).__name__}: {e}"
        return tokens

    def _swap_rows(self, a: int, b: int):
        """Exchange two rows of the KV cache (their keys, values, lengths and token lists)."""
        if a == b:
            return
        la, lb = len(self.row_ids[a]), len(self.row_ids[b])
        for t in (*self.cache.k, *self.cache.v):
            if la and lb:
                keep = t[a, :, :la].clone()
                t[a, :, :lb] = t[b, :, :lb]
                t[b, :, :la] = keep
            elif la:
                t[b, :, :la] = t[a, :, :la]
            elif lb:
                t[a, :, :lb] = t[b, :, :lb]
        lengths = self.cache.lengths
        lengths[a], lengths[b] = lengths[b].clone(), lengths[a].clone()
        self.row_ids[a], self.row_ids[b] = self.row_ids[b], self.row_ids[a]
        self.row_used[a], self.row_used[b] = self.row_used[b], self.row_used[a]

    def _emit(self, request: _Request, piece: str):
        if piece and not request.cancelled:
            request.on_event(request.gen, piece)

    def _end(self, request: _Request, error: str | None = None):
        """Send the request's end event, exactly once: its held-back text, then None. Never raises."""
        if request.ended:
            return
        request.ended = True
        gen = request.gen
        error = error or request.error
        tail = ""
        if error is None and not request.cancelled:
            try:
                tail = gen._finish()
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
        if error is not None:
            gen.finish_reason, gen.done = f"error: {error}", True
        gen._close()
        for piece in ([tail] if tail else []) + [None]:
            try:
                request.on_event(gen, piece)
            except Exception:  # a listener's failure is its own; the batcher goes on
                pass


def _find_stop(text: str, stops: list[str]) -> int | None:
    """Index of the earliest stop string in text, or None."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None
