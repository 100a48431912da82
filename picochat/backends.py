"""A model to ask, behind one protocol: picochat's own engine (`LocalModel`) or any OpenAI-compatible server
(`RemoteModel`: picochat serve, llama.cpp's llama-server, Ollama, vLLM).

Every evaluation task (eval/tasks.py, the lm-evaluation-harness adapter) and every application (apps/:
summaries, code, grounded answers) asks one of three questions:

    loglikelihood([(context, continuation), ...]) -> [(log p(continuation | context), is it greedy?), ...]
    loglikelihood_rolling([text, ...])            -> [log p(text), ...]   (the whole text, in windows)
    generate([prompt, ...], params, n)            -> [[n completions], ...]  (a str prompt is raw text,
                                                                             a list of messages is a chat)

`LocalModel` answers them with picochat's Engine (scoring reuses a question's context across its choices;
generation batches through the Batcher). `RemoteModel` asks a server through /v1/completions (echo +
logprobs for log-likelihoods) and /v1/chat/completions, so picochat, llama.cpp's server, Ollama or vLLM
answer the same questions.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Callable, Protocol

import httpx

from .engine.batcher import Batcher
from .engine.engine import Engine
from .engine.sampling import SamplingParams

Prompt = str | list[dict]   # raw text, or chat messages


class Generator(Protocol):
    """What the applications ask of a model (LocalModel and RemoteModel have it)."""

    def generate(self, prompts: list[Prompt], params: SamplingParams, n: int = 1) -> list[list[str]]:
        """n completions of each prompt; all prompts of one call are decoded together."""
        ...


def split_tokens(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness cuts them: the whole string is tokenized
    once and split where the context's own tokens end (spaces at the end of the context move to the
    continuation, so " Paris" stays one token). An empty context is the BOS (or end-of-text) token."""
    tail = len(context) - len(context.rstrip(" "))
    if tail:
        context, continuation = context[:-tail], context[-tail:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=True)
    context_ids = tokenizer.encode(context, add_special_tokens=True) if context else []
    continuation_ids = whole[len(context_ids):]
    if not context_ids:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        context_ids = [start] if start is not None and (not whole or whole[0] != start) else []
        if not context_ids:  # the tokenizer adds BOS itself: it is the context
            context_ids, continuation_ids = whole[:1], whole[1:]
    return context_ids, continuation_ids


def rolling_windows(prefix: list[int], ids: list[int], length: int) -> list[tuple[list[int], list[int]]]:
    """(context, tokens to score) windows that score every token of `ids` once, each window feeding at most
    `length` tokens to the model (lm-evaluation-harness's rolling windows with one token of context)."""
    first = min(length, len(ids))
    windows = [(prefix, ids[:first])]
    position = first
    while position < len(ids):
        end = position + min(len(ids) - position, length)
        windows.append((ids[max(0, end - length - 1):position], ids[position:end]))
        position = end
    return windows


class LocalModel:
    """picochat's own engine as an evaluation model."""

    def __init__(self, engine: Engine, name: str = "picochat", batch_size: int = 8,
                 progress: Callable[[int], None] | None = None):
        self.engine, self.name, self.batch_size = engine, name, batch_size
        self.progress = progress   # called with how many items have been done, as they are

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        """For each (context, continuation): Σ log p of the continuation's tokens, and whether each of
        them is the most likely one (the continuation is what greedy decoding would write)."""
        out = []
        for context, continuation in requests:
            context_ids, continuation_ids = split_tokens(self.tokenizer, context, continuation)
            context_ids = self._fit(context_ids, len(continuation_ids))
            scored = self.engine.continuation_logprobs(context_ids, continuation_ids, top_n=1)
            out.append((sum(s.logprob for s in scored), all(s.top[0][0] == s.token for s in scored)))
            self._tick()
        return out

    def loglikelihood_rolling(self, texts: list[str]) -> list[float]:
        """log p(text) of whole texts, in the windows lm-evaluation-harness uses for perplexity: the first
        predicted from BOS, each next one of the model's context length from the token before it, the last
        (partial) one from as many tokens before it as fit."""
        out = []
        for text in texts:
            prefix, ids = split_tokens(self.tokenizer, "", text)
            total = 0.0
            for context, predicted in rolling_windows(prefix, ids, self.engine.context_length):
                total += sum(s.logprob for s in self.engine.continuation_logprobs(context, predicted, top_n=0))
            out.append(total)
            self._tick()
        return out

    def generate(self, prompts: list[Prompt], params: SamplingParams, n: int = 1) -> list[list[str]]:
        """n completions of each prompt, all decoded together through a Batcher (sampled ones seeded
        params.seed + i, so a run is reproducible)."""
        tokenizer = self.tokenizer
        ids = [self.engine.chat_prompt(p) if isinstance(p, list) else tokenizer.encode(p, add_special_tokens=True)
               for p in prompts]
        longest = max((len(i) for i in ids), default=1)
        max_len = min(self.engine.context_length, longest + params.max_new_tokens)
        batcher = Batcher(self.engine, max_batch=self.batch_size, max_queue=len(ids) * n + 1, max_len=max_len,
                          start=False)
        done = [0]

        def on_event(gen, piece):
            if piece is None:
                done[0] += 1
                self._tick()
        requests = []
        for prompt_ids in ids:
            prompt_ids = self._fit(prompt_ids, params.max_new_tokens, max_len)
            for i in range(n):
                seed = None if params.seed is None else params.seed + i
                requests.append(batcher.submit(prompt_ids, dataclasses.replace(params, seed=seed), on_event))
        batcher.run(until_idle=True)
        batcher.close()
        texts = [r.gen.text for r in requests]
        return [texts[i * n:(i + 1) * n] for i in range(len(ids))]

    def _fit(self, ids: list[int], keep: int, max_len: int | None = None) -> list[int]:
        """The prompt's last tokens, so that it and `keep` more fit the context (lm-evaluation-harness
        cuts contexts from the left the same way)."""
        room = (max_len or self.engine.context_length) - keep
        if room < 1:
            raise ValueError(f"{keep} tokens to score or generate do not fit the model's context")
        return ids[-room:]

    def _tick(self):
        if self.progress is not None:
            self.progress(1)


class RemoteModel:
    """Any OpenAI-compatible server as an evaluation model (picochat serve, llama.cpp's llama-server,
    Ollama, vLLM). Log-likelihoods need /v1/completions with echo + logprobs."""

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 concurrency: int = 4, timeout: float = 600.0, progress: Callable[[int], None] | None = None,
                 extra_body: dict | None = None):
        self.base_url = base_url.rstrip("/")
        self.extra_body = extra_body or {}   # fields added to every generation request
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(headers=headers, timeout=timeout)
        self.concurrency, self.progress = concurrency, progress
        self.name = model or self._first_model()

    def _first_model(self) -> str:
        models = self._call("GET", "/models")["data"]
        if not models:
            raise ValueError(f"{self.base_url}/models lists no model: pass --remote-model")
        return models[0]["id"]

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        try:
            r = self.client.request(method, self.base_url + path, json=body)
        except httpx.HTTPError as e:
            raise ConnectionError(f"cannot reach {self.base_url}{path}: {e}") from None
        if r.status_code != 200:
            raise ValueError(f"{self.base_url}{path} answered {r.status_code}: {r.text[:300]}")
        return r.json()

    def _map(self, fn, items: list) -> list:
        with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
            results = []
            for result in pool.map(fn, items):
                results.append(result)
                if self.progress is not None:
                    self.progress(1)
            return results

    def _echo(self, text: str) -> dict:
        """The server's log-probabilities of `text` itself (echo, no new tokens), with text_offset made
        relative to `text` (the echoed text may start with a BOS token's text, as picochat's and llama.cpp's
        servers decode it)."""
        # one new token, ignored: some servers read max_tokens 0 as "no limit" (llama-cpp-python's)
        body = {"model": self.name, "prompt": text, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
        choice = self._call("POST", "/completions", body)["choices"][0]
        logprobs = choice.get("logprobs")
        if not logprobs or "token_logprobs" not in logprobs:
            raise ValueError(f"{self.base_url} does not return prompt log-probabilities (echo + logprobs), "
                             "which log-likelihood tasks need")
        shift = max(choice.get("text", "").find(text), 0)
        return {**logprobs, "text_offset": [offset - shift for offset in logprobs["text_offset"]]}

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        def one(request):
            context, continuation = request
            lp = self._echo(context + continuation)
            start, end = len(context.rstrip(" ")), len(context) + len(continuation)  # as split_tokens cuts
            total, greedy = 0.0, True
            for token, offset, value, top in zip(lp["tokens"], lp["text_offset"], lp["token_logprobs"],
                                                 lp.get("top_logprobs") or [None] * len(lp["tokens"])):
                if not start <= offset < end or value is None:
                    continue
                total += value
                greedy = greedy and bool(top) and max(top, key=top.get) == token
            return total, greedy
        return self._map(one, requests)

    def loglikelihood_rolling(self, texts: list[str]) -> list[float]:
        return [self.score_text(text)[0] for text in texts]

    def score_text(self, text: str, chunk_chars: int = 4000) -> tuple[float, int, int]:
        """(Σ log p, UTF-8 bytes, tokens) of the tokens the server scores in `text`, sent in pieces of
        about `chunk_chars` characters cut at white space (a server's context is unknown here). The first
        token of each piece has nothing before it and is not counted, in bytes either."""
        pieces, start = [], 0
        while start < len(text):
            end = min(len(text), start + chunk_chars)
            if end < len(text):
                cut = max(text.rfind(" ", start, end), text.rfind("\n", start, end))
                end = cut if cut > start else end
            pieces.append(text[start:end])
            start = end

        def one(piece):
            lp = self._echo(piece)
            offsets = list(lp["text_offset"]) + [len(piece)]
            total, nbytes, n = 0.0, 0, 0
            for i, value in enumerate(lp["token_logprobs"]):
                if value is None or not 0 <= offsets[i] < len(piece):
                    continue
                total += value
                nbytes += len(piece[offsets[i]:offsets[i + 1]].encode("utf-8"))
                n += 1
            return total, nbytes, n
        scored = self._map(one, pieces)
        return sum(s[0] for s in scored), sum(s[1] for s in scored), sum(s[2] for s in scored)

    def generate(self, prompts: list[Prompt], params: SamplingParams, n: int = 1) -> list[list[str]]:
        def one(item):
            prompt, i = item
            body = {"model": self.name, "max_tokens": params.max_new_tokens, "temperature": params.temperature,
                    "top_p": params.top_p, **({"stop": params.stop} if params.stop else {}),
                    **({"seed": params.seed + i} if params.seed is not None else {}), **self.extra_body}
            if isinstance(prompt, list):
                choice = self._call("POST", "/chat/completions", {**body, "messages": prompt})["choices"][0]
                return choice["message"]["content"] or ""
            return self._call("POST", "/completions", {**body, "prompt": prompt})["choices"][0]["text"]
        flat = self._map(one, [(p, i) for p in prompts for i in range(n)])
        return [flat[j * n:(j + 1) * n] for j in range(len(prompts))]
