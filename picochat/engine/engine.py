"""The engine: prompt ids -> prefill -> decode steps with a KV cache -> streamed text, one sequence at a time.

Everything that generates (the chat REPL, `generate`, the evals, the apps, the server's Batcher) goes
through this package. `Engine.generate` runs one sequence; batcher.py runs many at once through the same
Generation steps, prefill and sampler, so sampling, stop rules, logprobs and speed measurements live in
one place.

The Engine keeps what it has computed: a prompt that starts like the last one (the next turn of a chat,
the other choices of a multiple-choice question) reuses the keys and values of that common prefix and
computes only the new tokens.
"""
from __future__ import annotations

import torch

from ..hw import IdleCores
from ..model.gpt import GPT, KVCache
from ..tokenizer.bpe import Tokenizer
from .generation import Generation
from .grammar import GrammarCompiler
from .prefill import PREFILL_CHUNK, prefill_chunk, reusable_prefix
from .sampling import SamplingParams, TokenLogprob, token_logprob
from .speculative import ModelDrafter, PassCosts, Speculation, weight_bytes


class Engine:
    """Generates text from a picochat model and its tokenizer, one sequence at a time.

    It keeps the KV cache of its last generation: a prompt that extends it (a chat's next turn) computes
    only its new tokens. The model's weights must not change while an Engine reuses its cache (`reset()`).

    It decodes speculatively (speculative.py): guesses from `draft`, a smaller model with the same
    tokenizer (load() gives a model's paired draft as LoadedModel.draft), and from the text so far, checked
    in one forward pass each round; the output is what plain decoding gives. speculate=False decodes
    one token per pass; draft_tokens fixes the guesses per round (default: as many as pay, measured as it
    decodes). It computes on as many threads as there are cores other processes leave idle
    (adapt_threads=False: on torch's thread count as it is).
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer, prefill_chunk: int = PREFILL_CHUNK,
                 draft: GPT | None = None, speculate: bool = True, draft_tokens: int | None = None,
                 adapt_threads: bool = True):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.prefill_chunk = prefill_chunk
        if draft is not None and draft.config.vocab_size != model.config.vocab_size:
            raise ValueError(f"the draft model's vocabulary ({draft.config.vocab_size} tokens) is not the "
                             f"model's ({model.config.vocab_size}): a draft must share the model's tokenizer")
        self.drafter = ModelDrafter(draft) if draft is not None and speculate else None
        self.speculate = speculate
        self.draft_tokens = draft_tokens   # guesses per round; None: as many as the measured costs say pay
        # measured as it decodes: how far drafting pays here (a draft step: its share of bytes, until measured)
        self.pass_costs = PassCosts(weight_bytes(draft) / weight_bytes(model) if draft is not None else 0.5)
        # computes on the cores other processes leave idle (hw.IdleCores), unless told a thread count
        self.cores = IdleCores() if adapt_threads else None
        self._cache: KVCache | None = None   # the last generation's keys and values ...
        self._cached_ids: list[int] = []     # ... for these tokens
        self._grammars: GrammarCompiler | None = None

    @property
    def grammars_built(self) -> bool:
        return self._grammars is not None

    @property
    def grammars(self) -> GrammarCompiler:
        """Compiles the grammars generations are constrained to (made on first use: ~1 s for 150k tokens)."""
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer, self.model.config.vocab_size)
        return self._grammars

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

    def generate(self, prompt_ids: list[int], params: SamplingParams | None = None,
                 max_len: int | None = None) -> Generation:
        """A streaming generation: `for piece in engine.generate(ids, params): ...`. The request is checked
        here, for every caller (the Batcher too): settings in range, a prompt of known tokens that leaves room
        in the context (`max_len` positions, at most the model's)."""
        params = params or SamplingParams()
        params.validate()
        context = min(max_len or self.context_length, self.context_length)
        if not prompt_ids:
            raise ValueError("the prompt is empty: give at least one token")
        if len(prompt_ids) >= context:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the context is {context}")
        vocab = self.model.config.vocab_size
        if not all(isinstance(t, int) and 0 <= t < vocab for t in prompt_ids):
            raise ValueError(f"the prompt holds token ids outside the vocabulary (0..{vocab - 1})")
        return Generation(self, prompt_ids, params, context)

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

    def _cache_for(self, prompt_ids: list[int], needed: int, scoring: bool = False,
                   max_reuse: int | None = None) -> tuple[KVCache, int]:
        """A cache of at least `needed` positions for this generation, and how many prompt tokens it already
        holds (see prefill.reusable_prefix); the engine gets it back when the generation ends."""
        reuse = 0
        if self._cache is not None:
            reuse = reusable_prefix(self._cached_ids, prompt_ids, scoring)
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

    def share_cores(self):
        """Compute on the cores other processes leave idle (checked at most once a second)."""
        if self.cores is not None:
            self.cores.update()

    def speculation(self, gen: Generation) -> Speculation:
        """How `gen` decodes: with the draft model and prompt lookup, or (speculate=False) plainly."""
        return Speculation(self.drafter, self.speculate, gen.prompt_ids, self.pass_costs, fixed=self.draft_tokens)

    @torch.inference_mode()
    def stream(self, gen: Generation):
        """Run `gen` (what iterating it does): prefill what is not cached, then decode, yielding text pieces."""
        gen.begin()
        self.share_cores()
        ids = gen.prompt_ids
        cache, done = self._cache_for(ids, len(ids) + gen.max_new, scoring=gen.params.prompt_logprobs is not None)
        gen.stats.cached_tokens = done
        fed = ids[:done]   # the tokens the cache holds
        try:
            while len(fed) < len(ids):
                logits = prefill_chunk(self.model, gen, cache, len(fed), self.prefill_chunk)
                fed = ids[:len(fed) + self.prefill_chunk]
            if not gen.prompt_only():
                row = logits[0, -1]
                piece = gen.accept(gen.next_token(row), row)
                if piece:
                    yield piece
                rounds = self.speculation(gen)
                while not gen.done:  # a round feeds the last token (and any guesses) and keeps 1 or more
                    self.share_cores()
                    for piece in rounds.round(self.model, gen, cache, fed):
                        if piece:
                            yield piece
            tail = gen.finish()
            if tail:
                yield tail
        finally:
            gen.close()
            if int(cache.lengths[0]) == len(fed):  # keep it for the next prompt (unless a step failed midway)
                self._cache, self._cached_ids = cache, fed
