"""One generation: its prompt, what it has produced, and the per-sequence state that decides the next token
(its random generator, repetition penalty, stop tokens and strings, streaming detokenizer, speed stats).

Whoever runs the model — one sequence at a time (engine.py) or many in one batch (batcher.py) — drives a
Generation through the same public steps:

    gen.begin()                              the clock starts (time to first token counts from here)
    gen.score_prompt(logits, start)          prompt log-probabilities, when asked for
    token = gen.next_token(logits)           or one row of a batched sample_rows
    text = gen.accept(token, logits)         stop rules, logprobs, the text it completes
    ... until gen.done
    tail = gen.finish()                      text held back (a possible stop string), once it has ended
    gen.close()                              the stats' total time
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..tokenizer.bpe import StreamDecoder
from . import sampling
from .grammar import Grammar
from .sampling import SamplingParams, TokenLogprob, token_logprob


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0              # prompt tokens whose keys/values were reused, not computed
    completion_tokens: int = 0
    time_to_first_token: float = 0.0    # seconds from the call to the first sampled token (includes prefill)
    decode_seconds: float = 0.0         # time spent after the first token
    decode_steps: int = 0               # tokens after the first
    total_seconds: float = 0.0
    model_passes: int = 0               # forward passes after the first token (fewer than tokens when drafts
    drafted: dict = field(default_factory=dict)    # are kept); guesses drafted, by source ("model", "ngram"),
    accepted: dict = field(default_factory=dict)   # and how many of them the model kept

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prompt tokens computed (not reused) per second of time to the first token."""
        n = self.prompt_tokens - self.cached_tokens
        return n / self.time_to_first_token if self.time_to_first_token else 0.0

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: tokens after the first, per second (what llama.cpp calls eval speed)."""
        return self.decode_steps / self.decode_seconds if self.decode_steps and self.decode_seconds else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """Tokens per forward pass of the model while decoding (1.0 without speculative decoding)."""
        return self.decode_steps / self.model_passes if self.model_passes else 1.0


OPENING_SPAN = 256   # characters of a reply's opening an opening trigger ("^...") is looked for in


class Generation:
    """One generation: iterate to stream text pieces; afterwards read text, token_ids, finish_reason, stats."""

    def __init__(self, engine, prompt_ids: list[int], params: SamplingParams, max_len: int | None = None):
        self.engine, self.prompt_ids, self.params = engine, list(prompt_ids), params
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []   # filled when params.logprobs is not None
        self.prompt_logprobs: list[TokenLogprob | None] = []  # when params.prompt_logprobs is not None
        self.text = ""
        self.finish_reason: str | None = None   # "stop" (end of turn or stop string), "length" or "error: ..."
        self.stats = GenerationStats(prompt_tokens=len(prompt_ids))
        self.done = False
        self.max_new = min(params.max_new_tokens, (max_len or engine.context_length) - len(prompt_ids))
        tokenizer = engine.tokenizer
        self._stop_ids = set(tokenizer.end_of_turn_ids if params.stop_token_ids is None else params.stop_token_ids)
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        self.seen: torch.Tensor | None = None   # tokens the repetition penalty sees (made on the first step)
        self._decoder = StreamDecoder(tokenizer)
        self._pending = ""  # decoded text held back because it may be the start of a stop string
        self._holdback = max((len(s) for s in params.stop), default=1) - 1
        self.stop_string: str | None = None   # the stop string that ended it, if one did
        self._start = self._first_token_at = None
        self.last_token: int | None = None
        # a grammar constrains the output from the start, or (grammar_triggers) once the text holds a trigger
        self.grammar: Grammar | None = None
        self._triggers, self._trigger_from = tuple(params.grammar_triggers), 0
        if params.grammar is not None and not self._triggers:
            self.grammar = engine.grammars.start(params.grammar)
        self._mask: tuple[int, torch.Tensor] | None = None   # (grammar.version, its mask) of this step

    def __iter__(self):
        yield from self.engine.stream(self)

    def begin(self):
        """Start the clock: time to the first token counts from here."""
        self._start = time.perf_counter()

    def score_prompt(self, logits: torch.Tensor, start: int):
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

    def prompt_only(self) -> bool:
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

    def grammar_mask(self, vocab: int) -> torch.Tensor | None:
        """(vocab,) bool: the tokens the grammar allows next (None: no grammar, or not started). Computed
        once per step, however many times the sampler and the speculative checks ask."""
        if self.grammar is None:
            return None
        if self._mask is None or self._mask[0] != self.grammar.version:
            self._mask = (self.grammar.version, self.grammar.allowed(vocab))
        return self._mask[1]

    def next_token(self, logits: torch.Tensor) -> int:
        """Sample the next token from a (vocab,) row of logits with this generation's settings (every token
        of every caller is picked by sampling.sample_rows: one sampler, one place to look)."""
        vocab = logits.shape[-1]
        return sampling.sample_rows(logits[None], [self.params], [self.generator], [self.penalty_mask(vocab)],
                                    [self.grammar_mask(vocab)])[0]

    def accept(self, token: int, logits: torch.Tensor) -> str:
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
        if self.grammar is not None and not self.grammar.accept([token]):
            raise ValueError(f"token {token} breaks the output's grammar")
        if self.params.logprobs is not None:
            self.logprobs.append(token_logprob(logits, token, self.params.logprobs))
        self.token_ids.append(token)
        self.stats.completion_tokens = len(self.token_ids)
        if self.seen is not None and token < self.seen.numel():
            self.seen[token] = True
        if len(self.token_ids) >= self.max_new:
            self.finish_reason, self.done = "length", True
        text = self._text_of(token)
        if self._triggers:
            self._start_grammar_on_trigger()
        if self.grammar is not None and self.grammar.is_done() and not self.done:
            self.finish_reason, self.done = "stop", True   # complete: nothing but the end of the turn may follow
        return text

    def _start_grammar_on_trigger(self):
        """Start the grammar once the output holds a trigger (the first to appear); what follows it (a token
        may reach past it) is fed to the grammar first. If that breaks the grammar, the model has left the
        format: the output stays free. Each call reads only the text written since the last one (and the
        reply's opening, while an opening trigger can still match): never the whole reply per token."""
        text, pending = self.text, self._pending
        since = max(0, self._trigger_from - max(map(len, self._triggers)))
        self._trigger_from = len(text) + len(pending)
        tail = text[since:] + pending[max(0, since - len(text)):]
        found = [(since + at, t) for t in self._triggers if not t.startswith("^") and (at := tail.find(t)) >= 0]
        found += self._opening_trigger(text, pending)
        if not found:
            return
        at, trigger = min(found)
        rest, self._triggers = (text + pending)[at + len(trigger):], ()
        grammar = self.engine.grammars.start(self.params.grammar)
        if not rest or grammar.accept(self.engine.grammars.tokenize(rest)):
            self.grammar = grammar

    def _opening_trigger(self, text: str, pending: str) -> list[tuple[int, str]]:
        """[(where, trigger)] for a "^trigger" the reply opens with (after whitespace); once the reply's
        opening is longer than every such trigger and matched none, they are dropped."""
        openings = [t[1:] for t in self._triggers if t.startswith("^")]
        if not openings:
            return []
        head = (text + pending)[:OPENING_SPAN] if len(text) < OPENING_SPAN else text[:OPENING_SPAN]
        begins = len(head) - len(head.lstrip())
        found = [(begins, t) for t in openings if head.startswith(t, begins)]
        if not found and len(head) - begins >= max(map(len, openings)):
            self._triggers = tuple(t for t in self._triggers if not t.startswith("^"))
        return found

    def _text_of(self, token: int) -> str:
        """The text `token` completes, less what may be the start of a stop string (held back until ruled out)."""
        self._pending += self._decoder.push(token)
        if (hit := find_stop(self._pending, self.params.stop)) is not None:
            self._stop_at(hit)
            self.done = True
            return ""
        emit = self._pending[:len(self._pending) - self._holdback]
        self._pending = self._pending[len(emit):]
        self.text += emit
        return emit

    def finish(self) -> str:
        """The held-back tail of the text once generation has ended (it may still hold a stop string)."""
        if self.stop_string is None:
            self._pending += self._decoder.flush()
            if (hit := find_stop(self._pending, self.params.stop)) is not None:
                self._stop_at(hit)
        tail, self._pending = self._pending, ""
        self.text += tail
        self.done = True
        return tail

    def _stop_at(self, hit: int):
        """End at the stop string found at `hit` in the held-back text (of several starting there, the
        shortest: it was complete first)."""
        self.stop_string = min((s for s in self.params.stop if s and self._pending.startswith(s, hit)), key=len)
        self._pending, self.finish_reason = self._pending[:hit], "stop"

    def fail(self, error: str):
        """End with finish_reason "error: ..." (the model or sampler failed on it, or it ran out of time)."""
        self.finish_reason, self.done = f"error: {error}", True

    def close(self):
        """Stop the clock (total time, decode time); a generation that never began has none."""
        if self._start is None:
            return
        end = time.perf_counter()
        self.stats.total_seconds = end - self._start
        if self._first_token_at is not None:
            self.stats.decode_seconds = end - self._first_token_at


def find_stop(text: str, stops: list[str]) -> int | None:
    """Index of the earliest stop string in text, or None."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None
