"""How the next token is picked: SamplingParams, and `sample_rows`, which picks it for every row of a batch
in a few tensor operations (greedy, temperature, top-k, top-p, repetition penalty, a seeded generator per
row); and the log-probabilities the API reports.

Everything that generates samples here — one sequence (engine.py) or many (batcher.py) — so a request
gets the same tokens whatever else is in its batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

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
    grammar: str | None = None          # output constrained to this grammar (grammar.py: a compiled grammar's text)
    grammar_triggers: tuple[str, ...] = ()  # ... only once the output holds one of these (a tool call's opening;
                                            # "^text": only where the output begins with it, after whitespace)

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


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style: shrink the positive scores of tokens already seen, grow their negative ones."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def sample_rows(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                seen: list[torch.Tensor | None] | None = None,
                allowed: list[torch.Tensor | None] | None = None) -> list[int]:
    """Pick the next token of each row of (rows, vocab) logits, all rows in a few tensor operations.

    Greedy rows take the argmax. Sampled rows draw from `distributions` with a uniform number from their
    own generator (seeded requests are reproducible whatever else is in the batch). `allowed` holds each
    row's grammar mask (None: any token), so constrained and free rows share one batch.
    Raises ValueError when a row's scores hold NaN (a broken model or weights).
    """
    logits = penalised(logits, params, seen, allowed)
    tokens = logits.max(dim=-1).indices.tolist()  # (max is ~3× faster than argmax on the CPU; same first index)
    rows = [b for b, p in enumerate(params) if p.temperature >= MIN_TEMPERATURE]
    if not rows:
        return tokens
    ids, probs = distributions(logits[rows], [params[b] for b in rows])
    u = torch.stack([torch.rand(1, generator=generators[b]) for b in rows])  # (rows, 1)
    cumulative = probs.cumsum(-1)
    choice = (cumulative < u * cumulative[:, -1:]).sum(-1).clamp_(max=probs.shape[-1] - 1)
    picked = ids.gather(1, choice[:, None])[:, 0] if ids is not None else choice
    for b, token in zip(rows, picked.tolist()):
        tokens[b] = token
    return tokens


def penalised(logits: torch.Tensor, params: list[SamplingParams], seen: list[torch.Tensor | None] | None = None,
              allowed: list[torch.Tensor | None] | None = None) -> torch.Tensor:
    """(rows, vocab) logits as float32 with each row's repetition penalty and grammar mask applied (a token
    the grammar forbids scores -inf); ValueError on NaN or on a row its grammar leaves no token."""
    logits = logits.float()
    broken = torch.isnan(logits).any(dim=-1)
    if bool(broken.any()):
        raise ValueError(f"the model's scores for row(s) {broken.nonzero()[:, 0].tolist()} are NaN")
    seen = [s if s is not None and p.repetition_penalty != 1.0 else None for s, p in zip(seen or [], params)]
    allowed = allowed or []
    if any(s is not None for s in seen) or any(a is not None for a in allowed):
        logits = logits.clone()
    for b, s in enumerate(seen):
        if s is not None:
            logits[b] = apply_repetition_penalty(logits[b], s, params[b].repetition_penalty)
    for b, a in enumerate(allowed):
        if a is not None:
            if not bool(a.any()):
                raise ValueError(f"the grammar of row {b} allows no token")
            logits[b].masked_fill_(~a, float("-inf"))
    return logits


def distributions(logits: torch.Tensor, params: list[SamplingParams]) -> tuple[torch.Tensor | None, torch.Tensor]:
    """What sampled rows (temperature > 0) draw from: (ids, probs), probs[b, i] the (unnormalised where
    truncated) probability of token ids[b, i]; ids None when probs covers the whole vocabulary in order.

    Each row is divided by its temperature; top-k keeps the k most likely tokens; top-p (nucleus) keeps
    the smallest set whose probability reaches p. Both are computed on the TOP_CANDIDATES most likely
    tokens instead of sorting the whole vocabulary: that is exact whenever those candidates hold
    probability p (a row where they do not is sorted in full).
    """
    vocab = logits.shape[-1]
    z = logits / torch.tensor([[p.temperature] for p in params])
    top_k = torch.tensor([p.top_k for p in params])
    top_p = torch.tensor([p.top_p for p in params])
    if not bool(((top_k > 0) | (top_p < 1)).any()):
        return None, torch.softmax(z, dim=-1)
    k = min(vocab, max(TOP_CANDIDATES, int(top_k.max())))
    ids, probs = _candidates(z, top_k, k)
    short = (top_k == 0) & (top_p < 1) & (probs.sum(-1) < top_p)  # the nucleus reaches past the candidates
    if bool(short.any()) and k < vocab:
        ids, probs = _candidates(z, top_k, vocab)
    before = probs.cumsum(-1) - probs                                  # mass of the more likely tokens
    return ids, probs.masked_fill(before >= top_p[:, None], 0.0)


def probabilities(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None,
                  allowed: torch.Tensor | None = None) -> torch.Tensor:
    """The (vocab,) distribution the next token is drawn from under `params` (and a grammar's mask),
    normalised: one-hot on the argmax when greedy (what speculative decoding checks a drafted token against)."""
    row = penalised(logits[None], [params], [seen], [allowed])
    if params.temperature < MIN_TEMPERATURE:
        return torch.nn.functional.one_hot(row.max(dim=-1).indices[0], row.shape[-1]).float()
    ids, probs = distributions(row, [params])
    if ids is not None:
        probs = torch.zeros_like(row).scatter_(1, ids, probs)
    return probs[0] / probs[0].sum()


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
