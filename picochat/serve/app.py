"""An OpenAI-compatible HTTP API (and the web chat page) over the generation engine.

    POST /v1/chat/completions   POST /v1/completions   POST /v1/embeddings
    GET /v1/models   GET /v1/kb   GET /health   GET /metrics   GET /

Every request takes one path: its body is parsed and checked against its schema (schemas.py), mapped
to the engine's terms (prompt ids and SamplingParams: `chat_to_engine`, `completion_to_engine`), run
by the Batcher (`run_generation`: its events arrive as text pieces), and the finished generation is
written in OpenAI's shape (`chat_response`, `completion_response`, or one streaming writer, `sse_stream`,
for both). Generation runs on the Batcher's thread: decode steps of all active requests share one
forward pass; a client that disconnects stops its generation; a request that fails ends alone.

With `--kb`, a chat request is grounded in a knowledge base first (assistant.py: retrieve, then a prompt
with numbered sources, or a decline with no generation); the reply gets its sources appended and the
response an extra `retrieval` field. Retrieval and embeddings also run on the Batcher's thread (between
decode steps), so the sentence encoder and the model never compete for the CPU's cores.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import threading
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from typing import AsyncIterator, Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..apps import assistant
from ..engine.batcher import Batcher, QueueFull
from ..engine.engine import Engine
from ..engine.generation import Generation
from ..engine.sampling import SamplingParams, TokenLogprob
from .knowledge import Knowledge
from .protocol import (APIError, MAX_BODY_BYTES, ChatRequest, CompletionRequest, EmbeddingRequest, RequestError, parse_json,
                      validate)

REQUEST_TIMEOUT = 600.0   # seconds a request may wait and generate before it ends with an error
SHUTDOWN_GRACE = 10.0     # seconds in-flight requests get to finish after SIGTERM


# --------------------------------------------------------------------------- the server state
class ServerState:
    """The loaded model and engine (loaded on a background thread so /health can answer meanwhile), and counters."""

    def __init__(self, load_engine, model_id: str, api_key: str | None, max_batch: int, max_queue: int,
                 max_len: int | None, request_timeout: float, knowledge: "Knowledge | None" = None):
        self.model_id, self.api_key, self.request_timeout = model_id, api_key, request_timeout
        self.knowledge = knowledge or Knowledge()
        self.engine: Engine | None = None
        self.batcher: Batcher | None = None
        self.load_error: str | None = None
        self.created = int(time.time())
        self.routes: set[str] = set()  # the app's route templates: the only values of the metrics' label
        self.requests = {}            # (route, status) -> count
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.started = time.time()
        self.loaded = threading.Event()
        self.loader = threading.Thread(target=self._engine_thread, args=(load_engine, max_batch, max_queue, max_len),
                                       name="picochat-engine", daemon=True)
        self.loader.start()

    def _engine_thread(self, load_engine, max_batch, max_queue, max_len):
        """Load the model, then run the batcher: all model work on this one thread."""
        try:
            self.engine = load_engine()
            batcher = Batcher(self.engine, max_batch=max_batch, max_queue=max_queue, max_len=max_len, start=False)
        except Exception as e:  # reported by /health and every request
            self.load_error = str(e)
            self.loaded.set()
            return
        self.batcher = batcher
        self.loaded.set()
        batcher.run()

    def ready(self) -> Batcher:
        if self.batcher is None:
            if self.load_error:
                raise APIError(503, f"the model failed to load: {self.load_error}", type="server_error")
            raise APIError(503, "the model is still loading; retry shortly", type="server_error", code="loading")
        return self.batcher

    async def on_engine_thread(self, fn):
        """fn()'s result, run on the batcher's thread between decode steps (knowledge bases, embeddings)."""
        try:
            return await asyncio.wrap_future(self.ready().call(fn))
        except APIError:
            raise
        except (FileNotFoundError, ValueError) as e:  # a missing embedding model, a knowledge base problem
            raise APIError(503, str(e), type="server_error") from None

    def count(self, path: str, status: int):
        route = path if path in self.routes else "unmatched"  # raw paths would grow the metrics without bound
        self.requests[(route, status)] = self.requests.get((route, status), 0) + 1


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
                         params: SamplingParams) -> tuple[Generation, AsyncIterator[tuple[str, int]]]:
    """Submit to the batcher. Returns (gen, pieces): pieces yields (text, tokens so far) as they come and
    raises APIError if the generation failed.

    A full queue raises here, before any response starts. When the client goes away (a cancelled
    stream, or a disconnect noticed while waiting) the generation is cancelled.
    """
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

    async def pieces():
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
                batcher.cancel(handle)
        gen = handle.gen
        state.prompt_tokens += gen.stats.prompt_tokens
        state.completion_tokens += gen.stats.completion_tokens
        if gen.finish_reason and gen.finish_reason.startswith("error"):
            raise generation_error(gen.finish_reason)
    return handle.gen, pieces()


def generation_error(finish_reason: str) -> APIError:
    """The API error for a generation that ended with finish_reason 'error: ...'."""
    reason = finish_reason.removeprefix("error: ")
    if reason.startswith("timed out"):
        return APIError(504, f"the request {reason} (the server's limit is set by --timeout)",
                        type="server_error", code="timeout")
    if "shutting down" in reason:
        return APIError(503, reason, type="server_error", code="shutting_down")
    return APIError(500, f"generation failed: {reason}", type="server_error")


async def finish(pieces: AsyncIterator) -> None:
    async for _ in pieces:
        pass


# --------------------------------------------------------------------------- engine -> response
def token_entries(tokenizer, logprobs: list[TokenLogprob | None], top_n: int) -> list[dict | None]:
    """Each token's text, bytes, log-probability and top alternatives, once for both response shapes."""
    def text(token):
        return tokenizer.decode([token])
    entries = []
    for lp in logprobs:
        if lp is None:  # a prompt's first token: nothing before it to score it
            entries.append(None)
            continue
        entries.append({"token": text(lp.token), "logprob": lp.logprob, "bytes": list(text(lp.token).encode()),
                        "top_logprobs": [{"token": text(t), "logprob": v, "bytes": list(text(t).encode())}
                                         for t, v in lp.top[:top_n]]})
    return entries


def chat_logprobs(entries: list[dict]) -> dict:
    """The chat shape: {"content": [{token, logprob, bytes, top_logprobs}, ...]}."""
    return {"content": entries}


def completion_logprobs(entries: list[dict | None], texts: list[str]) -> dict:
    """The legacy completions shape: parallel lists of tokens (texts: each token's text), logprobs,
    {token: logprob} and text offsets."""
    tokens, lps, tops, offsets = [], [], [], []
    position = 0
    for entry, text in zip(entries, texts):
        tokens.append(text)
        offsets.append(position)
        position += len(text)
        lps.append(None if entry is None else entry["logprob"])
        tops.append(None if entry is None else {t["token"]: t["logprob"] for t in entry["top_logprobs"]})
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def usage(gen: Generation) -> dict:
    p, c = gen.stats.prompt_tokens, gen.stats.completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": gen.stats.cached_tokens}}  # reused from the prefix cache


def timings(gen: Generation) -> dict:  # picochat's extension, as llama.cpp's server has one
    s = gen.stats
    return {"time_to_first_token_ms": round(s.time_to_first_token * 1000, 2),
            "tokens_per_second": round(s.tokens_per_s, 2)}


@dataclass
class StreamShape:
    """What one endpoint's stream chunks look like; sse_stream writes any of them."""
    first: dict | None                          # sent before any text (the chat's role)
    piece: Callable[[str, int], dict]           # a chunk for a text piece (and how many tokens so far)
    final: Callable[[], dict]                   # the chunk with the finish reason
    usage: Callable[[], dict]                   # the usage chunk (stream_options.include_usage)


async def sse_stream(pieces: AsyncIterator[tuple[str, int]], shape: StreamShape, include_usage: bool):
    """Server-sent events: the pieces as chunks, the final chunk, usage if asked, then [DONE]. A failure
    after the status line has gone out is reported as an error event in the stream."""
    if shape.first is not None:
        yield _sse(shape.first)
    try:
        async for piece, n in pieces:
            yield _sse(shape.piece(piece, n))
    except APIError as e:
        yield _sse(e.body())
        return
    yield _sse(shape.final())
    if include_usage:
        yield _sse(shape.usage())
    yield "data: [DONE]\n\n"


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def streaming_response(events) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


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


async def ground_chat(state: ServerState, body: ChatRequest) -> "assistant.Grounding | None":
    """Retrieval for a chat request, when a knowledge base applies to it (None when none does)."""
    name = state.knowledge.choose(body.kb)
    if name is None:
        return None
    try:
        question = assistant.question_of(body.message_dicts())
    except ValueError as e:
        raise APIError(400, str(e), "messages") from None
    knowledge = state.knowledge
    grounding = await state.on_engine_thread(
        lambda: assistant.ground(knowledge.kb(name), question, min_similarity=knowledge.min_similarity))
    grounding.kb = name
    return grounding


async def chat_completions(request: Request):
    state: ServerState = request.app.state.picochat
    body = await read_request(request, ChatRequest)
    state.ready()
    grounding = await ground_chat(state, body)
    if grounding is not None and grounding.declined:
        return declined_response(state, body, grounding)
    messages = assistant.grounded_messages(body.message_dicts(), grounding) if grounding else None
    prompt_ids, params = chat_to_engine(state, body, messages)
    gen, pieces = await run_generation(state, request, prompt_ids, params)
    rid, created, top_n = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), body.top_logprobs
    tokenizer = state.engine.tokenizer
    retrieval = {"retrieval": {"kb": grounding.kb, **grounding.as_dict()}} if grounding else {}
    footer = (lambda: assistant.footer_of(gen.text, grounding)) if grounding else (lambda: "")

    def chunk(delta, finish=None, logprobs=None) -> dict:
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_id,
                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}

    if body.stream:
        if grounding:
            pieces = with_footer(pieces, footer)
        sent = [0]  # tokens whose logprobs have gone out

        def piece(text, n):
            lp = None
            if body.logprobs:
                lp = chat_logprobs(token_entries(tokenizer, gen.logprobs[sent[0]:n], top_n))
                sent[0] = n
            return chunk({"content": text}, logprobs=lp)
        shape = StreamShape(first={**chunk({"role": "assistant", "content": ""}), **retrieval}, piece=piece,
                            final=lambda: chunk({}, finish=gen.finish_reason),
                            usage=lambda: {**chunk({}), "choices": [], "usage": usage(gen)})
        return streaming_response(sse_stream(pieces, shape, body.include_usage))
    await finish(pieces)
    logprobs = chat_logprobs(token_entries(tokenizer, gen.logprobs, top_n)) if body.logprobs else None
    return {"id": rid, "object": "chat.completion", "created": created, "model": state.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": gen.text + footer()},
                         "logprobs": logprobs, "finish_reason": gen.finish_reason}],
            "usage": usage(gen), "timings": timings(gen), **retrieval}


async def with_footer(pieces, footer: Callable[[], str]):
    """The stream's pieces, then the sources footer (known once the reply is complete)."""
    n = 0
    async for piece, n in pieces:
        yield piece, n
    text = footer()
    if text:
        yield text, n


def declined_response(state: ServerState, body: ChatRequest, grounding: "assistant.Grounding"):
    """Nothing relevant in the knowledge base: the hand-off text, with no generation at all."""
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    retrieval = {"kb": grounding.kb, **grounding.as_dict()}
    no_usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}

    def chunk(delta, finish=None) -> dict:
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_id,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    if body.stream:
        events = [{**chunk({"role": "assistant", "content": ""}), "retrieval": retrieval},
                  chunk({"content": grounding.decline_text}), chunk({}, "stop")]
        if body.include_usage:
            events.append({**chunk({}), "choices": [], "usage": no_usage})

        async def stream():
            for event in events:
                yield _sse(event)
            yield "data: [DONE]\n\n"
        return streaming_response(stream())
    return {"id": rid, "object": "chat.completion", "created": created, "model": state.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": grounding.decline_text},
                         "logprobs": None, "finish_reason": "stop"}],
            "usage": no_usage, "retrieval": retrieval}


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
    vectors, counts = await state.on_engine_thread(lambda: (encoder.encode(texts), encoder.count_tokens(texts)))
    data = [{"object": "embedding", "index": i, "embedding": embedding_value(v, body.encoding_format)}
            for i, v in enumerate(vectors)]
    tokens = int(sum(counts))
    return {"object": "list", "data": data, "model": encoder.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def embedding_value(vector, encoding_format: str):
    """A vector as OpenAI sends it: a list of floats, or base64 of little-endian float32 bytes."""
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]


async def list_knowledge_bases(request: Request):
    """The knowledge bases this server answers from (the chat page's switch)."""
    return {"object": "list", "data": [{"id": name, "object": "knowledge_base"}
                                       for name in request.app.state.picochat.knowledge.names]}


async def completions(request: Request):
    state, body, prompt_ids, gen, pieces = await submit(request, CompletionRequest, completion_to_engine)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(text, finish=None) -> dict:
        return {"id": rid, "object": "text_completion", "created": created, "model": state.model_id,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

    if body.stream:
        shape = StreamShape(first=None, piece=lambda text, n: chunk(text), final=lambda: chunk("", gen.finish_reason),
                            usage=lambda: {**chunk(""), "choices": [], "usage": usage(gen)})
        return streaming_response(sse_stream(pieces, shape, body.include_usage))
    await finish(pieces)
    tokenizer = state.engine.tokenizer
    prefix = tokenizer.decode(prompt_ids) if body.echo else ""
    logprobs = None
    if body.logprobs is not None:
        scored = (gen.prompt_logprobs if body.echo else []) + gen.logprobs
        ids = (prompt_ids if body.echo else []) + [lp.token for lp in gen.logprobs]
        logprobs = completion_logprobs(token_entries(tokenizer, scored, body.logprobs),
                                       [tokenizer.decode([t]) for t in ids])
    return {"id": rid, "object": "text_completion", "created": created, "model": state.model_id,
            "choices": [{"index": 0, "text": prefix + gen.text, "logprobs": logprobs,
                         "finish_reason": gen.finish_reason}],
            "usage": usage(gen)}


async def health(request: Request):
    state: ServerState = request.app.state.picochat
    if state.batcher is None:
        status = "error" if state.load_error else "loading"
        return JSONResponse({"status": status, "error": state.load_error}, status_code=503)
    return {"status": "ok", "model": state.model_id}


async def list_models(request: Request):
    state: ServerState = request.app.state.picochat
    return {"object": "list", "data": [{"id": state.model_id, "object": "model", "created": state.created,
                                        "owned_by": "picochat"}]}


async def metrics(request: Request):
    state: ServerState = request.app.state.picochat
    b = state.batcher
    lines = ["# HELP picochat_requests_total HTTP requests by route and status.",
             "# TYPE picochat_requests_total counter"]
    for (route, status), n in sorted(state.requests.items()):
        lines.append(f'picochat_requests_total{{route="{route}",status="{status}"}} {n}')
    uptime = time.time() - state.started
    gauges = [("prompt_tokens_total", "counter", "Prompt tokens processed.", state.prompt_tokens),
              ("completion_tokens_total", "counter", "Tokens generated.", state.completion_tokens),
              ("tokens_per_second", "gauge", "Generated tokens per second since start.",
               f"{state.completion_tokens / uptime if uptime else 0:.3f}"),
              ("queue_length", "gauge", "Requests waiting for a free batch row.", b.queue_length if b else 0),
              ("active_sequences", "gauge", "Requests being generated now.", b.busy if b else 0),
              ("model_loaded", "gauge", "Whether the model is ready.", 1 if b else 0)]
    for name, kind, help_text, value in gauges:
        lines += [f"# HELP picochat_{name} {help_text}", f"# TYPE picochat_{name} {kind}", f"picochat_{name} {value}"]
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")


async def index(request: Request):
    page = resources.files("picochat.serve").joinpath("web/index.html")
    return HTMLResponse(page.read_text(encoding="utf-8"))


async def favicon(request: Request):
    return Response(status_code=204)


# --------------------------------------------------------------------------- errors and the guard
async def api_error(request: Request, exc: APIError):
    return exc.response()


async def http_error(request: Request, exc: StarletteHTTPException):
    return APIError(exc.status_code, str(exc.detail), type="invalid_request_error").response()


async def unexpected(request: Request, exc: Exception):  # last resort: still OpenAI's shape, no traceback
    return APIError(500, f"internal error: {type(exc).__name__}", type="server_error").response()


async def guard(request: Request, call_next):
    """API key and body size before any endpoint runs; every answer counted by route and status."""
    state: ServerState = request.app.state.picochat
    path = request.url.path
    try:
        if state.api_key and path.startswith("/v1/") and path != "/v1/models":
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), state.api_key.encode()):
                raise APIError(401, "missing or incorrect API key: send 'Authorization: Bearer KEY'",
                               type="authentication_error", code="invalid_api_key")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise APIError(413, f"request body of {length} bytes exceeds the limit of {MAX_BODY_BYTES}",
                           code="request_too_large")
        response = await call_next(request)
    except APIError as e:
        response = e.response()
    state.count(path, response.status_code)
    return response


def create_app(load_engine, model_id: str, api_key: str | None = None, max_batch: int = 8,
               max_queue: int = 64, max_len: int | None = None, request_timeout: float = REQUEST_TIMEOUT,
               knowledge: Knowledge | None = None) -> FastAPI:
    """The FastAPI app. load_engine() -> Engine is called once, on a background thread; `knowledge` holds
    the knowledge bases (and embedding model) it answers from."""
    state = ServerState(load_engine, model_id, api_key, max_batch, max_queue, max_len, request_timeout, knowledge)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        if state.batcher is not None:  # stop the batcher thread with the server
            state.batcher.close()

    app = FastAPI(title="picochat", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.picochat = state
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
    app.middleware("http")(guard)
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/embeddings", embeddings, methods=["POST"])
    app.add_api_route("/v1/kb", list_knowledge_bases, methods=["GET"])
    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    app.add_api_route("/", index, methods=["GET"])
    app.add_api_route("/favicon.ico", favicon, methods=["GET"])
    state.routes = {route.path for route in app.routes}
    return app


# --------------------------------------------------------------------------- running it
class GracefulServer(uvicorn.Server):
    """uvicorn's server, except that SIGTERM / Ctrl-C first lets in-flight requests finish (up to `grace`
    seconds; then they end with a 'shutting down' error event) while no new connection is accepted."""

    def __init__(self, config: uvicorn.Config, state: ServerState, grace: float = SHUTDOWN_GRACE):
        super().__init__(config)
        self.state, self.grace = state, grace

    def handle_exit(self, sig, frame):
        if self.state.batcher is not None and not self.should_exit:
            threading.Thread(target=self.state.batcher.drain, args=(self.grace,), daemon=True).start()
        super().handle_exit(sig, frame)


def serve(app: FastAPI, host: str, port: int, grace: float = SHUTDOWN_GRACE):
    """Run the app with uvicorn until SIGINT/SIGTERM, then end in-flight streams cleanly."""
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=grace + 5)
    GracefulServer(config, app.state.picochat, grace).run()
