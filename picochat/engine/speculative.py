"""Speculative decoding: guess the next tokens cheaply, check all the guesses in one forward pass.

Decoding one token reads every weight of the model once; on a CPU that is bound by memory, so a forward
pass over k+1 tokens costs less than k+1 passes over one (how much less depends on the CPU's arithmetic
per byte read: it is measured as it runs, see PassCosts). A drafter proposes k tokens — a small model of the
same family (its tokenizer must be the same), or the text so far (prompt lookup: an n-gram that occurred
before is continued as it was then; quotes, summaries and code edits copy their input) — and the model
scores the last token and the k guesses in one pass. It keeps the guesses up to the first it disagrees
with, and adds one token of its own: every round yields at least one token, at most k+1.

Which tokens are kept (Leviathan et al. 2023; Chen et al. 2023), with p the model's distribution at a
position and q the drafter's:
  * greedy:   keep the guess d while d = argmax p — the output is plain greedy decoding, token for token;
  * sampling: keep d with probability min(1, p(d) / q(d)); on rejection draw from norm(max(0, p − q)).
    Every token is then distributed exactly as under plain sampling. An n-gram guess is one-hot
    (q(d) = 1): kept with probability p(d), else drawn from p without d.

The model's rows are processed one position at a time through the Generation (its sampler, stop rules,
logprobs and repetition penalty see exactly the tokens plain decoding would); the KV cache is then cut
back to the tokens kept (the keys of rejected guesses are overwritten by the next pass).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..model.gpt import GPT, KVCache
from .generation import Generation
from .prefill import PREFILL_CHUNK, common_prefix
from .sampling import MIN_TEMPERATURE, probabilities

MAX_DRAFT = 8        # guesses per round, at most (within kernels.DECODE_TOKENS: decoding's numbers)
NGRAM_MAX, NGRAM_MIN = 4, 2   # prompt lookup matches the last 4 .. 2 tokens (longest first)


@dataclass
class Draft:
    tokens: list[int]
    q: list[torch.Tensor] | None = None   # the drafter's (vocab,) distribution for each guess; None: one-hot
    source: str = ""                      # "model" or "ngram"
    step_seconds: float = 0.0             # of one draft-model step (not counting catching up on the text)


# ----------------------------------------------------------------------------- the drafters
class NgramIndex:
    """Prompt lookup over one sequence: for each n, where the last n tokens occurred before (the most
    recent earlier occurrence), kept up to date as tokens are appended (O(n) per token)."""

    def __init__(self):
        self.ids: list[int] = []
        self._last: dict[tuple, int] = {}     # n-gram -> the position after its latest occurrence
        self._match: dict[int, int] = {}      # n -> the position after the previous occurrence of the last n tokens

    def extend(self, tokens: list[int]):
        for token in tokens:
            self.ids.append(token)
            end = len(self.ids)
            for n in range(1, NGRAM_MAX + 1):
                if end < n:
                    break
                key = tuple(self.ids[end - n:end])
                previous = self._last.get(key)
                if previous is None:
                    self._match.pop(n, None)
                else:
                    self._match[n] = previous
                self._last[key] = end

    def propose(self, k: int) -> list[int]:
        """Up to k tokens that followed the longest earlier occurrence of the sequence's last n tokens."""
        for n in range(NGRAM_MAX, NGRAM_MIN - 1, -1):
            start = self._match.get(n)
            if start is not None:
                return self.ids[start:start + k]
        return []


class ModelDrafter:
    """A small model of the same tokenizer that drafts greedily (or by sampling, for sampled requests). It
    keeps its own KV cache; a proposal first feeds what it has not seen of the sequence (after a rejection,
    the common prefix is what stays)."""

    def __init__(self, model: GPT):
        self.model = model.eval()
        self.cache: KVCache | None = None
        self.fed: list[int] = []
        self.catch_up_seconds = 0.004   # per token fed to catch up (measured; 0.5B on 2 cores: ~4 ms)

    def unseen(self, ids: list[int]) -> int:
        """How many tokens of `ids` a proposal would first have to feed."""
        return len(ids) - min(common_prefix(self.fed, ids), len(ids) - 1)

    def _catch_up(self, ids: list[int]) -> torch.Tensor:
        """Feed ids[i:] for the longest prefix its cache holds; the logits of the last position."""
        reuse = min(common_prefix(self.fed, ids), len(ids) - 1)
        if self.cache is None or self.cache.max_len < len(ids) + MAX_DRAFT:
            size = min(self.model.config.max_seq_len, max(2 * len(ids) + MAX_DRAFT, 256))
            grown = self.model.new_kv_cache(1, size)
            if reuse and self.cache is not None:
                for old, new in zip((*self.cache.k, *self.cache.v), (*grown.k, *grown.v)):
                    new[:, :, :reuse] = old[:, :, :reuse]
            self.cache = grown
        self.cache.lengths.fill_(reuse)
        self.fed = ids[:reuse]
        start = time.perf_counter()
        for i in range(reuse, len(ids), PREFILL_CHUNK):
            chunk = ids[i:i + PREFILL_CHUNK]
            logits, _ = self.model(torch.tensor([chunk]), kv_cache=self.cache, last_only=True)
            self.fed.extend(chunk)
        if len(ids) - reuse > 16:
            self.catch_up_seconds = _average(self.catch_up_seconds, (time.perf_counter() - start) / (len(ids) - reuse), 0.5)
        return logits[0, -1]

    @torch.inference_mode()
    def propose(self, ids: list[int], k: int, gen: Generation, confidence: float = 0.0) -> Draft:
        """Up to k guesses after `ids`: the argmax for greedy requests, else drawn from the draft's own
        distribution under the request's settings (which the verification then needs: q). It stops after
        the first guess whose probability under the draft is below `confidence`."""
        row = self._catch_up(ids)
        start = time.perf_counter()
        sampled = gen.params.temperature >= MIN_TEMPERATURE
        tokens, qs = [], []
        for i in range(k):
            if sampled:
                q = probabilities(row, gen.params, gen.seen)
                token = int(torch.multinomial(q, 1, generator=gen.generator))
                qs.append(q)
                sure = float(q[token])
            else:
                top = torch.softmax(row.float(), dim=-1).max(dim=-1)
                token, sure = int(top.indices), float(top.values)
            tokens.append(token)
            if i + 1 < k and sure >= confidence:
                logits, _ = self.model(torch.tensor([[token]]), kv_cache=self.cache, last_only=True)
                self.fed.append(token)
                row = logits[0, -1]
            else:
                break
        return Draft(tokens, qs if sampled else None, "model", (time.perf_counter() - start) / len(tokens))


# ----------------------------------------------------------------------------- verifying
def choose(gen: Generation, row: torch.Tensor, guess: int, q: torch.Tensor | None) -> tuple[int, bool]:
    """The token the model keeps at a position whose (vocab,) logits are `row`, given the drafter's guess
    (and its distribution q, None for one-hot): (token, whether it is the guess)."""
    if gen.params.temperature < MIN_TEMPERATURE:
        token = gen.next_token(row)  # the very sampler plain decoding uses
        return token, token == guess
    p = probabilities(row, gen.params, gen.penalty_mask(row.shape[-1]), gen.grammar_mask(row.shape[-1]))
    q_guess = 1.0 if q is None else float(q[guess])
    if float(torch.rand(1, generator=gen.generator)) * q_guess < float(p[guess]):  # u < p(d) / q(d)
        return guess, True
    if q is None:
        residual = p.clone()
        residual[guess] = 0.0
    else:
        residual = (p - q).clamp_(min=0.0)
    if float(residual.sum()) <= 0.0:   # p = q up to rounding: p itself is the residual
        residual = p
    return int(torch.multinomial(residual, 1, generator=gen.generator)), False


@dataclass
class RoundResult:
    pieces: list[str] = field(default_factory=list)   # text, as gen.accept returned it
    kept: int = 0                                      # guesses kept


def verify(gen: Generation, rows: torch.Tensor, draft: Draft) -> RoundResult:
    """Walk the model's (k+1, vocab) rows — row j scores the position after guess j (row 0: after the last
    token) — keeping guesses until the first the model does not, then one token of its own."""
    result = RoundResult()
    for j, guess in enumerate(draft.tokens):
        token, kept = choose(gen, rows[j], guess, None if draft.q is None else draft.q[j])
        result.pieces.append(gen.accept(token, rows[j]))
        result.kept += kept
        if not kept or gen.done:
            return result
    k = len(draft.tokens)
    result.pieces.append(gen.accept(gen.next_token(rows[k]), rows[k]))  # every guess kept: a bonus token
    return result


# ----------------------------------------------------------------------------- what a round costs
class PassCosts:
    """Seconds of a model pass by the number of tokens it feeds, and of one draft-model step, as measured
    (moving averages, one per engine): what decides how far drafting pays on this CPU and model.

    A pass over k+1 tokens reads the weights once but does k+1 times the arithmetic: on 2 Zen 4 cores with
    Qwen2.5-Coder-1.5B it cost ~1.3× a one-token pass at 2 tokens, ~1.8× at 4 and ~3× at 9 (measured)."""

    SMOOTHING = 0.2

    def __init__(self, draft_share: float = 0.5):
        self.pass_seconds: dict[int, float] = {}
        self.draft_seconds: float | None = None
        self.draft_share = draft_share   # a draft step in model passes until measured: the share of bytes read

    def record(self, tokens: int, seconds: float, draft_step_seconds: float = 0.0):
        self.pass_seconds[tokens] = _average(self.pass_seconds.get(tokens), seconds, self.SMOOTHING)
        if draft_step_seconds:
            self.draft_seconds = _average(self.draft_seconds, draft_step_seconds, self.SMOOTHING)

    def relative(self, tokens: int) -> float:
        """A pass over `tokens` in one-token passes (not yet measured: 1 + 0.3 per extra token)."""
        one = self.pass_seconds.get(1)
        if one and tokens in self.pass_seconds:
            return self.pass_seconds[tokens] / one
        return 1.0 + 0.3 * (tokens - 1)

    def draft_relative(self) -> float:
        one = self.pass_seconds.get(1)
        return self.draft_seconds / one if one and self.draft_seconds else self.draft_share


def weight_bytes(model: GPT) -> int:
    """Bytes of weights one decode step reads (all parameters and buffers but the token embedding, of which
    a step reads a row)."""
    embed = {id(t) for t in model.embed.parameters()} | {id(t) for t in model.embed.buffers()}
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers()) if id(t) not in embed}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _average(old: float | None, new: float, weight: float) -> float:
    return new if old is None else (1 - weight) * old + weight * new


def best_length(acceptance: float, limit: int, pass_cost, draft_cost: float) -> int:
    """How many guesses maximise tokens per unit of time: a round of k guesses yields
    E(k) = 1 + a + a² + … + a^k tokens (each guess kept with probability a once those before it were)
    and costs pass_cost(k + 1) + k · draft_cost, in one-token passes. 0 when no k beats a plain step."""
    best, best_rate, expected = 0, 1.0, 1.0
    for k in range(1, limit + 1):
        expected += acceptance ** k
        rate = expected / (pass_cost(k + 1) + k * draft_cost)
        if rate > best_rate * 1.02:   # (a gain within measurement noise is no gain)
            best, best_rate = k, rate
    return best


# ----------------------------------------------------------------------------- one generation's rounds
class Speculation:
    """One generation's speculative decoding: its prompt-lookup index, the drafter, and the rounds.

    Each round drafts from the text so far when an n-gram matches and its guesses pay (they cost nothing to
    make), else from the draft model when its guesses pay, counting the cost of feeding it text it has not
    seen. How far to draft follows from what each source has had kept in this generation and from the
    measured costs (best_length); the draft model also stops at the first guess it is unsure of (top
    probability below `confidence`: such guesses are mostly rejected)."""

    PRIOR = {"ngram": 0.5, "model": 0.8}   # acceptance before anything was measured
    HORIZON = 32                            # output tokens a draft model's catching up must pay off within
    SMOOTHING = 0.3

    def __init__(self, drafter: ModelDrafter | None, ngram: bool, prompt_ids: list[int], costs: PassCosts,
                 confidence: float = 0.4, fixed: int | None = None):
        self.drafter, self.ngram, self.costs, self.confidence = drafter, ngram, costs, confidence
        self.fixed = fixed   # guesses per round, whatever they cost (None: as many as pay, measured)
        self.acceptance = dict(self.PRIOR)
        self.index = NgramIndex()
        self.index.extend(prompt_ids)
        self.rounds = 0

    def round(self, model: GPT, gen: Generation, cache: KVCache, fed: list[int]) -> list[str]:
        """Feed the generation's last token and a draft in one pass, keep what the model agrees with, cut the
        cache back to it. `fed` (the tokens the cache holds) grows by the tokens kept; returns the text."""
        context = fed + [gen.last_token]
        self.index.extend(context[len(self.index.ids):])
        room = min(cache.max_len, model.config.max_seq_len) - len(context)
        draft = self.draft(context, gen, min(MAX_DRAFT, gen.max_new - len(gen.token_ids) - 1, room))
        drafted = time.perf_counter()
        feed = [gen.last_token] + draft.tokens
        logits, _ = model(torch.tensor([feed]), kv_cache=cache)
        if logits.shape[1] != len(feed):
            raise RuntimeError(f"the model returned {logits.shape[1]} rows of scores for {len(feed)} tokens")
        result = verify(gen, logits[0], draft)
        cache.lengths.fill_(len(fed) + 1 + result.kept)
        fed.extend(feed[:1 + result.kept])
        self.rounds += 1
        self._record(gen, draft, result.kept, time.perf_counter() - drafted)
        return result.pieces

    def draft(self, context: list[int], gen: Generation, limit: int) -> Draft:
        """The guesses of this round (none: a plain step). The first round is plain: it measures a pass."""
        if limit <= 0 or self.rounds == 0 and 1 not in self.costs.pass_seconds and self.fixed is None:
            return Draft([])
        if self.fixed is not None:
            k = min(self.fixed, limit)
            if self.ngram and (tokens := self.index.propose(k)):
                return Draft(tokens, None, "ngram")
            return self.drafter.propose(context, k, gen) if self._drafter_fits(context) and k else Draft([])
        if self.ngram and (tokens := self.index.propose(limit)):   # free guesses first, when they pay
            k = best_length(self.acceptance["ngram"], len(tokens), self.costs.relative, 0.0)
            if k:
                return Draft(tokens[:k], None, "ngram")
        if self._drafter_fits(context):
            cost = self.costs.draft_relative()
            k = best_length(self.acceptance["model"], limit, self.costs.relative, cost)
            if k and self._catch_up_pays(context, gen, self._rate("model", k, cost)):
                return self.drafter.propose(context, k, gen, self.confidence)
        return Draft([])

    def _drafter_fits(self, context: list[int]) -> bool:
        """Whether there is a draft model whose context holds this text and a round of guesses."""
        return self.drafter is not None and len(context) + MAX_DRAFT < self.drafter.model.config.max_seq_len

    def _catch_up_pays(self, context: list[int], gen: Generation, rate: float) -> bool:
        """Whether what the draft model would save over the next HORIZON tokens (at `rate` tokens per
        one-token pass) outweighs feeding it the text it has not seen (a new prompt: hundreds of tokens)."""
        one = self.costs.pass_seconds.get(1)
        if rate <= 1.0 or not one:
            return False
        horizon = min(self.HORIZON, gen.max_new - len(gen.token_ids))
        return horizon * one * (1 - 1 / rate) > self.drafter.unseen(context) * self.drafter.catch_up_seconds

    def _rate(self, source: str, k: int, draft_cost: float) -> float:
        a = self.acceptance[source]
        return sum(a ** i for i in range(k + 1)) / (self.costs.relative(k + 1) + k * draft_cost)

    def _record(self, gen: Generation, draft: Draft, kept: int, pass_seconds: float):
        n = len(draft.tokens)
        self.costs.record(n + 1, pass_seconds, draft.step_seconds)
        stats = gen.stats
        stats.model_passes += 1
        if n:
            stats.drafted[draft.source] = stats.drafted.get(draft.source, 0) + n
            stats.accepted[draft.source] = stats.accepted.get(draft.source, 0) + kept
            # each guess was a trial until the first rejection: kept ones succeeded, one failed (if any)
            rate = kept / (kept + (kept < n))
            self.acceptance[draft.source] = _average(self.acceptance[draft.source], rate, self.SMOOTHING)
