"""The generation engine: prompt ids -> prefill -> decode steps with a KV cache -> streamed text.

Everything that generates (the chat REPL, `generate`, the server, the evals) goes through
`Engine.generate`, so sampling, stop rules and speed measurements live in one place.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

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
    repetition_penalty: float = 1.0     # 1.0: off; >1 discourages tokens already in the context
    seed: int | None = None
    stop: list[str] = field(default_factory=list)   # stop strings (not included in the output)
    stop_token_ids: list[int] | None = None         # default: the tokenizer's end-of-turn tokens

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


class Generation:
    """One streaming generation. Iterate to get text pieces; afterwards read text, finish_reason, stats."""

    def __init__(self, engine: "Engine", prompt_ids: list[int], params: SamplingParams):
        self.engine, self.prompt_ids, self.params = engine, list(prompt_ids), params
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None   # "stop" (end of turn or stop string) or "length"
        self.stats = GenerationStats(prompt_tokens=len(prompt_ids))

    def __iter__(self):
        yield from self.engine._run(self)


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
    def _run(self, gen: Generation):
        params, model, stats, start = gen.params, self.model, gen.stats, time.perf_counter()
        stop_ids = set(self.tokenizer.end_of_turn_ids if params.stop_token_ids is None else params.stop_token_ids)
        generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        max_new = min(params.max_new_tokens, self.context_length - len(gen.prompt_ids))
        cache = model.new_kv_cache(1, len(gen.prompt_ids) + max_new)
        penalize = params.repetition_penalty != 1.0
        context = torch.tensor(gen.prompt_ids, dtype=torch.long)
        decoder = StreamDecoder(self.tokenizer)
        pending = ""  # decoded text held back because it may be the start of a stop string
        holdback = max((len(s) for s in params.stop), default=1) - 1
        x, first_token_at, stopped_by_string = context[None, :], None, False
        gen.finish_reason = "length"
        try:
            for step in range(max_new):
                logits, _ = model(x, kv_cache=cache, last_only=True)
                token = sample_next(logits[0, -1], params, generator, context if penalize else None)
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                    stats.time_to_first_token = first_token_at - start
                else:
                    stats.decode_steps = step
                if token in stop_ids:
                    gen.finish_reason = "stop"
                    break
                gen.token_ids.append(token)
                stats.completion_tokens = len(gen.token_ids)
                if penalize:
                    context = torch.cat([context, torch.tensor([token])])
                pending += decoder.push(token)
                if (hit := _find_stop(pending, params.stop)) is not None:
                    pending, gen.finish_reason, stopped_by_string = pending[:hit], "stop", True
                    break
                emit = pending[:len(pending) - holdback]
                if emit:
                    pending = pending[len(emit):]
                    gen.text += emit
                    yield emit
                x = torch.tensor([[token]])
            if not stopped_by_string:  # release the held-back tail (it may still hold a stop string)
                pending += decoder.flush()
                if (hit := _find_stop(pending, params.stop)) is not None:
                    pending, gen.finish_reason = pending[:hit], "stop"
            if pending:
                gen.text += pending
                yield pending
        finally:
            end = time.perf_counter()
            stats.total_seconds = end - start
            if first_token_at is not None:
                stats.decode_seconds = end - first_token_at


def _find_stop(text: str, stops: list[str]) -> int | None:
    """Index of the earliest stop string in text, or None."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None
