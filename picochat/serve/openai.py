"""OpenAI's endpoints, each a thin translation onto the engine:

    POST /v1/chat/completions   POST /v1/completions   POST /v1/embeddings

A generating request takes one path: its body is parsed and checked against its schema (protocol.py),
mapped to the engine's terms (prompt ids and SamplingParams: `chat_to_engine`, `completion_to_engine`),
run by the Batcher (`run_generation`: its events arrive as text pieces), and written as protocol.py's
typed responses by one builder per kind: `chat_completion`, `chat_chunk` and `text_completion` (a
completion, and each chunk of its stream), streamed through the one SSE writer (stream.py). Generation
runs on the Batcher's thread: decode steps of all active requests share one forward pass; a client that
disconnects stops its generation; a request that fails ends alone.

With `--kb`, a chat request is grounded in a knowledge base first (apps/assistant.py: retrieve, then a
prompt with numbered sources, or a decline with no generation, written by the same builders); the reply
gets its sources appended and the response an extra `retrieval` field (each source's path relative to the
knowledge base's folder: a response never shows the server's own paths). Retrieval and embeddings also run
on the Batcher's thread (between decode steps), so the sentence encoder and the model never compete for
the CPU's cores.
"""
from __future__ import annotations

import asyncio
import base64
import time
import uuid
from typing import AsyncIterator

from fastapi import Request

from ..apps import assistant
from ..engine.batcher import QueueFull
from ..engine.generation import Generation
from ..engine.sampling import SamplingParams, TokenLogprob
from .protocol import (EMBEDDING_SLICE_TOKENS, MAX_BODY_BYTES, MAX_EMBEDDING_TOKENS, APIError, ChatChoice,
                       ChatCompletion, ChatCompletionChunk, ChatDelta, ChatLogprobs, ChatMessage, ChatRequest,
                       ChatTokenLogprob, ChunkChoice, Completion, CompletionChoice, CompletionLogprobs,
                       CompletionRequest, Embedding, EmbeddingList, EmbeddingRequest, EmbeddingUsage,
                       PromptTokensDetails, RequestError, Retrieval, Timings, TopLogprob, Usage, parse_json,
                       validate)
from .state import ServerState
from .stream import json_response, streaming_response

Pieces = AsyncIterator[tuple[str, int]]   # a generation's text pieces, each with the number of tokens so far
COUNT_SLICE = 256   # embeddings' texts tokenized (counted) at once on the engine's thread


# --------------------------------------------------------------------------- request -> engine
async def read_request(request: Request, schema):
    """The body, parsed and validated against schema, for this server's model."""
    body = await read_body(request, schema)
    model_id = request.app.state.picochat.model_id
    if body.model != model_id:
        raise APIError(404, f"the model '{body.model}' does not exist; this server serves '{model_id}'",
                       "model", "model_not_found")
    return body


async def read_body(request: Request, schema):
    """The body, read up to the size limit, parsed and validated against schema."""
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise APIError(413, f"request body exceeds the limit of {MAX_BODY_BYTES} bytes", code="request_too_large")
    try:
        return validate(schema, parse_json(bytes(raw)))
    except RequestError as e:
        raise APIError.from_request_error(e) from None


def sampling_params(body, prompt_ids: list[int], context: int, max_tokens: int | None,
                    allow_zero: bool = False) -> SamplingParams:
    """The body's sampling settings, with max_new_tokens checked against the context."""
    if max_tokens == 0 and not allow_zero:
        raise APIError(400, "'max_tokens' must be at least 1 (0 is allowed only with echo)", "max_tokens",
                       "invalid_value")
    if len(prompt_ids) + (max_tokens or 1) > context or len(prompt_ids) >= context:
        raise APIError(400, f"the prompt has {len(prompt_ids)} tokens and max_tokens is {max_tokens or 1}: together "
                            f"they exceed the model's context of {context} tokens", "max_tokens",
                       "context_length_exceeded")
    return SamplingParams(max_new_tokens=context - len(prompt_ids) if max_tokens is None else max_tokens,
                          temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                          repetition_penalty=body.repetition_penalty, seed=body.seed, stop=body.stop_list())


def chat_to_engine(state: ServerState, body: ChatRequest,
                   messages: list[dict] | None = None) -> tuple[list[int], SamplingParams]:
    """A chat request as prompt ids (the chat template over the messages — or over `messages`, the
    grounded conversation, when a knowledge base answers) and sampling settings."""
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    try:
        prompt_ids = state.engine.chat_prompt(messages if messages is not None else body.message_dicts())
    except ValueError as e:
        raise APIError(400, f"cannot render the chat template: {e}", "messages") from None
    max_tokens = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
    params = sampling_params(body, prompt_ids, state.ready().max_len, max_tokens)
    params.logprobs = body.top_logprobs if body.logprobs else None
    return prompt_ids, params


def completion_to_engine(state: ServerState, body: CompletionRequest) -> tuple[list[int], SamplingParams]:
    """A completion request as prompt ids (the raw prompt: the client owns all of its markup) and settings."""
    if body.echo and body.stream:
        raise APIError(400, "'echo' is not supported with 'stream'", "echo")
    prompt = body.prompt
    if isinstance(prompt, str):
        prompt_ids = state.engine.tokenizer.encode(prompt, add_special_tokens=True)
    else:
        vocab = state.engine.model.config.vocab_size
        bad = [t for t in prompt if t >= vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", "prompt")
        prompt_ids = list(prompt)
    if not prompt_ids:
        raise APIError(400, "'prompt' is empty", "prompt")
    params = sampling_params(body, prompt_ids, state.ready().max_len, body.max_tokens, allow_zero=body.echo)
    params.logprobs = body.logprobs
    if body.echo and body.logprobs is not None:  # scored on the batcher, a chunk at a time
        params.prompt_logprobs = body.logprobs
    return prompt_ids, params


# --------------------------------------------------------------------------- the engine
async def run_generation(state: ServerState, request: Request, prompt_ids: list[int],
                         params: SamplingParams) -> tuple[Generation, Pieces]:
    """Submit to the batcher. Returns (gen, pieces): pieces yields (text, tokens so far) as they come and
    raises APIError if the generation failed. A full queue raises here, before any response starts."""
    batcher = state.ready()
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def on_event(gen, piece):  # on the batcher thread
        loop.call_soon_threadsafe(events.put_nowait, (piece, len(gen.token_ids)))
    try:
        handle = batcher.submit(prompt_ids, params, on_event, timeout=state.request_timeout)
    except QueueFull as e:
        raise APIError(503, str(e), type="server_error", code="queue_full") from None
    except ValueError as e:
        raise APIError(400, str(e)) from None
    return handle.gen, pieces_of(state, request, handle, events)


async def pieces_of(state: ServerState, request: Request, handle, events: asyncio.Queue) -> Pieces:
    """The pieces of the batcher's request `handle` as its thread reports them through `events`; the tokens
    counted once it has ended. A client gone away (a cancelled stream, or a disconnect noticed while
    waiting) cancels the generation."""
    finished = False
    try:
        while True:
            try:
                piece, n = await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return
                continue
            if piece is None:
                finished = True
                break
            yield piece, n
    finally:
        if not finished:
            state.batcher.cancel(handle)
    gen = handle.gen
    state.prompt_tokens += gen.stats.prompt_tokens
    state.completion_tokens += gen.stats.completion_tokens
    if gen.finish_reason and gen.finish_reason.startswith("error"):
        raise generation_error(gen.finish_reason)


def generation_error(finish_reason: str) -> APIError:
    """The API error for a generation that ended with finish_reason 'error: ...'."""
    reason = finish_reason.removeprefix("error: ")
    if reason.startswith("timed out"):
        return APIError(504, f"the request {reason} (the server's limit is set by --timeout)",
                        type="server_error", code="timeout")
    if "shutting down" in reason:
        return APIError(503, reason, type="server_error", code="shutting_down")
    return APIError(500, f"generation failed: {reason}", type="server_error")


async def finish(pieces: Pieces) -> None:
    async for _ in pieces:
        pass


# --------------------------------------------------------------------------- engine -> response
def token_entries(tokenizer, logprobs: list[TokenLogprob | None], top_n: int) -> list[ChatTokenLogprob | None]:
    """Each token's text, bytes, log-probability and top alternatives, once for both response shapes."""
    def text(token):
        return tokenizer.decode([token])
    entries = []
    for lp in logprobs:
        if lp is None:  # a prompt's first token: nothing before it to score it
            entries.append(None)
            continue
        top = [TopLogprob(token=text(t), logprob=v, bytes=list(text(t).encode())) for t, v in lp.top[:top_n]]
        entries.append(ChatTokenLogprob(token=text(lp.token), logprob=lp.logprob, bytes=list(text(lp.token).encode()),
                                        top_logprobs=top))
    return entries


def chat_logprobs(tokenizer, logprobs: list[TokenLogprob], top_n: int) -> ChatLogprobs:
    """The chat shape: {"content": [{token, logprob, bytes, top_logprobs}, ...]}."""
    return ChatLogprobs(content=token_entries(tokenizer, logprobs, top_n))


def completion_logprobs(entries: list[ChatTokenLogprob | None], texts: list[str]) -> CompletionLogprobs:
    """The legacy completions shape: parallel lists of tokens (texts: each token's text), logprobs,
    {token: logprob} and text offsets."""
    tokens, lps, tops, offsets = [], [], [], []
    position = 0
    for entry, text in zip(entries, texts):
        tokens.append(text)
        offsets.append(position)
        position += len(text)
        lps.append(None if entry is None else entry.logprob)
        tops.append(None if entry is None else {t.token: t.logprob for t in entry.top_logprobs})
    return CompletionLogprobs(tokens=tokens, token_logprobs=lps, top_logprobs=tops, text_offset=offsets)


def usage_of(gen: Generation) -> Usage:
    p, c = gen.stats.prompt_tokens, gen.stats.completion_tokens
    return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=gen.stats.cached_tokens))


def timings_of(gen: Generation) -> Timings:
    s = gen.stats
    return Timings(time_to_first_token_ms=round(s.time_to_first_token * 1000, 2),
                   tokens_per_second=round(s.tokens_per_s, 2), draft_n=sum(s.drafted.values()),
                   draft_n_accepted=sum(s.accepted.values()), tokens_per_pass=round(s.tokens_per_pass, 2))


def retrieval_of(grounding: assistant.Grounding | None) -> Retrieval | None:
    return Retrieval(kb=grounding.kb, **grounding.as_dict()) if grounding else None


def response_head(prefix: str, model: str) -> dict:
    """What a response and every chunk of its stream share: the id, the time it was made, the model."""
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}


def chat_completion(head: dict, text: str, finish_reason: str | None, usage: Usage, logprobs=None,
                    timings=None, retrieval=None) -> ChatCompletion:
    choice = ChatChoice(message=ChatMessage(content=text), logprobs=logprobs, finish_reason=finish_reason)
    return ChatCompletion(**head, choices=[choice], usage=usage, timings=timings, retrieval=retrieval)


def chat_chunk(head: dict, delta: ChatDelta, finish_reason: str | None = None, logprobs=None,
               retrieval=None) -> ChatCompletionChunk:
    choice = ChunkChoice(delta=delta, logprobs=logprobs, finish_reason=finish_reason)
    return ChatCompletionChunk(**head, choices=[choice], retrieval=retrieval)


def text_completion(head: dict, text: str, finish_reason: str | None = None, logprobs=None,
                    usage=None) -> Completion:
    """A completion response, or (without usage) one chunk of its stream."""
    choice = CompletionChoice(text=text, logprobs=logprobs, finish_reason=finish_reason)
    return Completion(**head, choices=[choice], usage=usage)


async def chat_chunks(head: dict, gen: Generation, pieces: Pieces, body: ChatRequest, tokenizer,
                      retrieval: Retrieval | None) -> AsyncIterator[ChatCompletionChunk]:
    """A streamed chat reply: the role (and the retrieval), each piece with its tokens' logprobs if asked,
    the finish reason, then the usage if asked."""
    yield chat_chunk(head, ChatDelta(role="assistant", content=""), retrieval=retrieval)
    sent = 0  # tokens whose logprobs have gone out
    async for text, n in pieces:
        logprobs = None
        if body.logprobs:
            logprobs, sent = chat_logprobs(tokenizer, gen.logprobs[sent:n], body.top_logprobs), n
        yield chat_chunk(head, ChatDelta(content=text), logprobs=logprobs)
    yield chat_chunk(head, ChatDelta(), finish_reason=gen.finish_reason)
    if body.include_usage:
        yield ChatCompletionChunk(**head, choices=[], usage=usage_of(gen))


async def completion_chunks(head: dict, gen: Generation, pieces: Pieces,
                            include_usage: bool) -> AsyncIterator[Completion]:
    """A streamed completion: each piece, the finish reason, then the usage if asked."""
    async for text, _ in pieces:
        yield text_completion(head, text)
    yield text_completion(head, "", gen.finish_reason)
    if include_usage:
        yield Completion(**head, choices=[], usage=usage_of(gen))


async def with_footer(pieces: Pieces, gen: Generation, grounding: assistant.Grounding) -> Pieces:
    """The stream's pieces, then the sources footer (known once the reply is complete)."""
    n = 0
    async for piece, n in pieces:
        yield piece, n
    footer = assistant.footer_of(gen.text, grounding)
    if footer:
        yield footer, n


# --------------------------------------------------------------------------- endpoints
async def submit(request: Request, schema, to_engine):
    """The path both generating endpoints take: read and check the body, map it to the engine, submit.
    Returns (state, body, prompt ids, gen, pieces)."""
    state: ServerState = request.app.state.picochat
    body = await read_request(request, schema)
    state.ready()
    prompt_ids, params = to_engine(state, body)
    gen, pieces = await run_generation(state, request, prompt_ids, params)
    return state, body, prompt_ids, gen, pieces


async def ground_chat(state: ServerState, body: ChatRequest) -> assistant.Grounding | None:
    """Retrieval for a chat request, when a knowledge base applies to it (None when none does)."""
    name = state.knowledge.choose(body.kb)
    if name is None:
        return None
    try:
        question = assistant.question_of(body.message_dicts())
    except ValueError as e:
        raise APIError(400, str(e), "messages") from None
    knowledge = state.knowledge
    grounding = await state.on_engine_thread(lambda: knowledge.ground(name, question))
    grounding.kb = name
    return grounding


async def chat_completions(request: Request):
    state: ServerState = request.app.state.picochat
    body = await read_request(request, ChatRequest)
    state.ready()
    grounding = await ground_chat(state, body)
    if grounding is not None and grounding.declined:
        return declined_reply(state, body, grounding)
    messages = assistant.grounded_messages(body.message_dicts(), grounding) if grounding else None
    prompt_ids, params = chat_to_engine(state, body, messages)
    gen, pieces = await run_generation(state, request, prompt_ids, params)
    head, retrieval = response_head("chatcmpl", state.model_id), retrieval_of(grounding)
    tokenizer = state.engine.tokenizer
    if body.stream:
        if grounding:
            pieces = with_footer(pieces, gen, grounding)
        return streaming_response(chat_chunks(head, gen, pieces, body, tokenizer, retrieval))
    await finish(pieces)
    footer = assistant.footer_of(gen.text, grounding) if grounding else ""
    logprobs = chat_logprobs(tokenizer, gen.logprobs, body.top_logprobs) if body.logprobs else None
    return json_response(chat_completion(head, gen.text + footer, gen.finish_reason, usage_of(gen), logprobs,
                                         timings_of(gen), retrieval))


NO_USAGE = Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0)   # a reply the model never ran for


def declined_reply(state: ServerState, body: ChatRequest, grounding: assistant.Grounding):
    """Nothing relevant in the knowledge base: the hand-off text, with no generation at all."""
    head, retrieval = response_head("chatcmpl", state.model_id), retrieval_of(grounding)
    if body.stream:
        return streaming_response(declined_chunks(head, grounding.decline_text, retrieval, body.include_usage))
    return json_response(chat_completion(head, grounding.decline_text, "stop", NO_USAGE, retrieval=retrieval))


async def declined_chunks(head: dict, text: str, retrieval: Retrieval,
                          include_usage: bool) -> AsyncIterator[ChatCompletionChunk]:
    """The decline streamed as a reply is: the role (and the retrieval), the text, the finish, the usage."""
    yield chat_chunk(head, ChatDelta(role="assistant", content=""), retrieval=retrieval)
    yield chat_chunk(head, ChatDelta(content=text))
    yield chat_chunk(head, ChatDelta(), finish_reason="stop")
    if include_usage:
        yield ChatCompletionChunk(**head, choices=[], usage=NO_USAGE)


async def completions(request: Request):
    state, body, prompt_ids, gen, pieces = await submit(request, CompletionRequest, completion_to_engine)
    head = response_head("cmpl", state.model_id)
    if body.stream:
        return streaming_response(completion_chunks(head, gen, pieces, body.include_usage))
    await finish(pieces)
    tokenizer = state.engine.tokenizer
    prefix = tokenizer.decode(prompt_ids) if body.echo else ""
    logprobs = None
    if body.logprobs is not None:
        scored = (gen.prompt_logprobs if body.echo else []) + gen.logprobs
        ids = (prompt_ids if body.echo else []) + [lp.token for lp in gen.logprobs]
        logprobs = completion_logprobs(token_entries(tokenizer, scored, body.logprobs),
                                       [tokenizer.decode([t]) for t in ids])
    return json_response(text_completion(head, prefix + gen.text, gen.finish_reason, logprobs, usage_of(gen)))


async def embeddings(request: Request):
    """OpenAI's embeddings endpoint, from the knowledge bases' sentence encoder (all-MiniLM-L6-v2)."""
    state: ServerState = request.app.state.picochat
    body = await read_body(request, EmbeddingRequest)
    state.ready()
    encoder = await state.on_engine_thread(state.knowledge.encoder)
    if body.model not in (encoder.name, state.model_id):
        raise APIError(404, f"the model '{body.model}' does not exist; this server embeds with '{encoder.name}'",
                       "model", "model_not_found")
    if body.dimensions is not None and body.dimensions != encoder.dim:
        raise APIError(400, f"'{encoder.name}' embeds in {encoder.dim} dimensions; 'dimensions' must be "
                            f"{encoder.dim} or absent", "dimensions")
    texts = body.texts()
    counts = []
    for start in range(0, len(texts), COUNT_SLICE):   # 4 MB of text takes ~0.7 s to tokenize: in slices too
        part = texts[start:start + COUNT_SLICE]
        counts += await state.on_engine_thread(lambda part=part: encoder.count_tokens(part))
    tokens = int(sum(counts))
    if tokens > MAX_EMBEDDING_TOKENS:
        raise APIError(400, f"the input has {tokens} tokens; at most {MAX_EMBEDDING_TOKENS} per request: "
                            f"send the texts in several requests", "input", "too_many_tokens")
    vectors = []
    for part in token_slices(counts, EMBEDDING_SLICE_TOKENS):   # streams decode between two slices
        vectors += await state.on_engine_thread(lambda part=part: list(encoder.encode(texts[part])))
    data = [Embedding(index=i, embedding=embedding_value(v, body.encoding_format)) for i, v in enumerate(vectors)]
    return json_response(EmbeddingList(data=data, model=encoder.name,
                                       usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)))


def token_slices(counts: list[int], budget: int) -> list[slice]:
    """Consecutive runs of texts holding at most `budget` tokens each (a longer text alone)."""
    slices, start, total = [], 0, 0
    for i, n in enumerate(counts):
        if i > start and total + n > budget:
            slices.append(slice(start, i))
            start, total = i, 0
        total += n
    return slices + [slice(start, len(counts))]


def embedding_value(vector, encoding_format: str) -> list[float] | str:
    """A vector as OpenAI sends it: a list of floats, or base64 of little-endian float32 bytes."""
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]
