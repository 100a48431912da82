"""An OpenAI-compatible HTTP API (and the web chat page) over the generation engine.

    POST /v1/chat/completions   POST /v1/completions   GET /v1/models   GET /health   GET /metrics   GET /

Requests are checked by hand (not by a schema library) so every mistake gets OpenAI's error object
with a message that names the field. Generation runs on the Batcher's thread: decode steps of all
active requests share one forward pass; a client that disconnects stops its generation.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import threading
import time
import uuid
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Batcher, Engine, QueueFull, SamplingParams

MAX_BODY_BYTES = 4 * 1024 * 1024


class APIError(Exception):
    """An error answered as OpenAI's {"error": {message, type, param, code}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


# --------------------------------------------------------------------------- request checking
def _get(body: dict, name: str, kinds, default=None, required=False):
    if name not in body or body[name] is None:
        if required:
            raise APIError(400, f"'{name}' is required", name, "missing_required_parameter")
        return default
    value = body[name]
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if isinstance(value, bool) and bool not in kinds:  # JSON true is not a number here
        raise APIError(400, f"'{name}' must be {' or '.join(k.__name__ for k in kinds)}, got {json.dumps(value)}", name)
    if float in kinds and isinstance(value, int):
        value = float(value)
    if not isinstance(value, kinds):
        raise APIError(400, f"'{name}' must be {' or '.join(k.__name__ for k in kinds)}, got {json.dumps(value)[:60]}",
                       name, "invalid_type")
    return value


def _in_range(name, value, low, high):
    if value is not None and not low <= value <= high:
        raise APIError(400, f"'{name}' must be between {low} and {high}, got {value}", name, "invalid_value")
    return value


def _stop_list(body) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise APIError(400, "'stop' must be a string or a list of up to 4 strings", "stop", "invalid_value")
    return [s for s in stop if s]


def _message_text(message, i) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise APIError(400, f"messages[{i}].content: only text parts are supported "
                                    "({\"type\": \"text\", \"text\": ...})", f"messages[{i}].content")
        return "".join(parts)
    raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def _messages(body) -> list[dict]:
    messages = _get(body, "messages", list, required=True)
    if not messages:
        raise APIError(400, "'messages' must not be empty", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]")
        role = m.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"messages[{i}].role must be 'system', 'user' or 'assistant', got {json.dumps(role)}",
                           f"messages[{i}].role")
        out.append({"role": role, "content": _message_text(m, i)})
    return out


# --------------------------------------------------------------------------- the server state
class ServerState:
    """The loaded model and engine (loaded on a background thread so /health can answer meanwhile), and counters."""

    def __init__(self, load_engine, model_id: str, api_key: str | None, max_batch: int, max_queue: int,
                 max_len: int | None):
        self.model_id, self.api_key = model_id, api_key
        self.engine: Engine | None = None
        self.batcher: Batcher | None = None
        self.load_error: str | None = None
        self.created = int(time.time())
        self.requests = {}            # (endpoint, status) -> count
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.started = time.time()

        self.loaded = threading.Event()

        def engine_thread():  # loads the model, then runs the batcher: all model work on this one thread
            try:
                self.engine = load_engine()
                batcher = Batcher(self.engine, max_batch=max_batch, max_queue=max_queue, max_len=max_len,
                                  start=False)
            except Exception as e:  # reported by /health and every request
                self.load_error = str(e)
                self.loaded.set()
                return
            self.batcher = batcher
            self.loaded.set()
            batcher.run()
        self.loader = threading.Thread(target=engine_thread, name="picochat-engine", daemon=True)
        self.loader.start()

    def ready(self) -> Batcher:
        if self.batcher is None:
            if self.load_error:
                raise APIError(503, f"the model failed to load: {self.load_error}", type="server_error")
            raise APIError(503, "the model is still loading; retry shortly", type="server_error", code="loading")
        return self.batcher

    def count(self, endpoint: str, status: int):
        self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1


def create_app(load_engine, model_id: str, api_key: str | None = None, max_batch: int = 8,
               max_queue: int = 64, max_len: int | None = None) -> FastAPI:
    """The FastAPI app. load_engine() -> Engine is called once, on a background thread."""
    state = ServerState(load_engine, model_id, api_key, max_batch, max_queue, max_len)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        if state.batcher is not None:  # stop the batcher thread with the server
            state.batcher.close()

    app = FastAPI(title="picochat", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.picochat = state

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return APIError(exc.status_code, str(exc.detail), type="invalid_request_error").response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):  # last resort: still OpenAI's shape
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").response()

    @app.middleware("http")
    async def guard(request: Request, call_next):
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

    async def read_json(request: Request) -> dict:
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                raise APIError(413, f"request body exceeds the limit of {MAX_BODY_BYTES} bytes", code="request_too_large")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        return body

    def check_model(body):
        name = _get(body, "model", str, required=True)
        if name != state.model_id:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{state.model_id}'",
                           "model", "model_not_found")

    def sampling(body, max_tokens_name="max_tokens") -> tuple[SamplingParams, int | None]:
        n = _get(body, "n", int, 1)
        if n != 1:
            raise APIError(400, f"'n' must be 1 (picochat returns one choice per request), got {n}", "n")
        max_tokens = _get(body, "max_completion_tokens", int) if max_tokens_name == "max_tokens" else None
        max_tokens = _get(body, "max_tokens", int, max_tokens)
        _in_range("max_tokens", max_tokens, 0, 1 << 20)
        temperature = _in_range("temperature", _get(body, "temperature", float, 1.0), 0.0, 2.0)
        top_p = _in_range("top_p", _get(body, "top_p", float, 1.0), 0.0, 1.0)
        if top_p == 0:
            raise APIError(400, "'top_p' must be greater than 0", "top_p", "invalid_value")
        top_k = _in_range("top_k", _get(body, "top_k", int, 0), 0, 1 << 20)
        penalty = _get(body, "repetition_penalty", float, 1.0)
        if penalty <= 0:
            raise APIError(400, "'repetition_penalty' must be greater than 0", "repetition_penalty")
        seed = _get(body, "seed", int)
        params = SamplingParams(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p,
                                repetition_penalty=penalty, seed=seed, stop=_stop_list(body))
        return params, max_tokens

    def fit(prompt_ids, params, max_tokens, batcher, allow_zero=False):
        """Check prompt + max_tokens against the context and set max_new_tokens."""
        context = batcher.max_len
        if max_tokens == 0 and not allow_zero:
            raise APIError(400, "'max_tokens' must be at least 1", "max_tokens", "invalid_value")
        if len(prompt_ids) + (max_tokens or 1) > context or len(prompt_ids) >= context:
            raise APIError(400, f"the prompt has {len(prompt_ids)} tokens and max_tokens is {max_tokens or 1}: together "
                                f"they exceed the model's context of {context} tokens", "max_tokens",
                           "context_length_exceeded")
        params.max_new_tokens = max_tokens or (context - len(prompt_ids))

    def token_text(token: int) -> str:
        return state.engine.tokenizer.decode([token])

    def logprob_entry(lp, top_n):
        text = token_text(lp.token)
        return {"token": text, "logprob": lp.logprob, "bytes": list(text.encode("utf-8")),
                "top_logprobs": [{"token": token_text(t), "logprob": v, "bytes": list(token_text(t).encode("utf-8"))}
                                 for t, v in lp.top[:top_n]]}

    def start(request: Request, prompt_ids, params):
        """Submit to the batcher. Returns (gen, pieces): pieces yields (text, tokens so far) as they come.

        Bad requests and a full queue raise here, before any response starts. When the client goes
        away (a cancelled stream, or a disconnect noticed while waiting) the generation is cancelled.
        """
        batcher = state.ready()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_event(gen, piece):  # on the batcher thread
            loop.call_soon_threadsafe(events.put_nowait, (piece, len(gen.token_ids)))
        try:
            handle = batcher.submit(prompt_ids, params, on_event)
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
            if gen.finish_reason and gen.finish_reason.startswith("error"):
                raise APIError(500, f"generation failed: {gen.finish_reason}", type="server_error")
            state.prompt_tokens += gen.stats.prompt_tokens
            state.completion_tokens += gen.stats.completion_tokens
        return handle.gen, pieces()

    def usage(gen) -> dict:
        p, c = gen.stats.prompt_tokens, gen.stats.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
                "prompt_tokens_details": {"cached_tokens": gen.stats.cached_tokens}}  # reused from the prefix cache

    def timings(gen) -> dict:  # picochat's extension, as llama.cpp's server has one
        s = gen.stats
        return {"time_to_first_token_ms": round(s.time_to_first_token * 1000, 2),
                "tokens_per_second": round(s.tokens_per_s, 2)}

    # ------------------------------------------------------------------ endpoints
    @app.get("/health")
    async def health():
        if state.batcher is None:
            status = "error" if state.load_error else "loading"
            return JSONResponse({"status": status, "error": state.load_error}, status_code=503)
        return {"status": "ok", "model": state.model_id}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": state.model_id, "object": "model", "created": state.created,
                                            "owned_by": "picochat"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json(request)
        check_model(body)
        messages = _messages(body)
        params, max_tokens = sampling(body)
        stream = _get(body, "stream", bool, False)
        include_usage = bool((_get(body, "stream_options", dict, {}) or {}).get("include_usage"))
        want_logprobs = _get(body, "logprobs", bool, False)
        top_n = _in_range("top_logprobs", _get(body, "top_logprobs", int, 0), 0, 20)
        if top_n and not want_logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        batcher = state.ready()
        try:
            prompt_ids = state.engine.chat_prompt(messages)
        except ValueError as e:
            raise APIError(400, f"cannot render the chat template: {e}", "messages") from None
        fit(prompt_ids, params, max_tokens, batcher)
        params.logprobs = top_n if want_logprobs else None
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta, finish=None, logprobs=None):
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_id,
                    "choices": [choice]}

        gen, pieces = start(request, prompt_ids, params)
        if not stream:
            async for _ in pieces:
                pass
            logprobs = {"content": [logprob_entry(lp, top_n) for lp in gen.logprobs]} if want_logprobs else None
            return {"id": rid, "object": "chat.completion", "created": created, "model": state.model_id,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": gen.text},
                                 "logprobs": logprobs, "finish_reason": gen.finish_reason}],
                    "usage": usage(gen), "timings": timings(gen)}

        async def sse():
            yield _sse(chunk({"role": "assistant", "content": ""}))
            sent = 0  # logprobs of tokens already sent
            try:
                async for piece, n in pieces:
                    lp = None
                    if want_logprobs:
                        lp = {"content": [logprob_entry(x, top_n) for x in gen.logprobs[sent:n]]}
                        sent = n
                    yield _sse(chunk({"content": piece}, logprobs=lp))
            except APIError as e:  # the status line is already sent: report the error in the stream
                yield _sse(json.loads(e.response().body))
                return
            yield _sse(chunk({}, finish=gen.finish_reason))
            if include_usage:
                yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                            "model": state.model_id, "choices": [], "usage": usage(gen)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request)
        check_model(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            pass
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            pass
        else:
            raise APIError(400, "'prompt' must be a string or a list of token ids (one prompt per request)", "prompt")
        params, max_tokens = sampling(body)
        if max_tokens is None:
            max_tokens = 16  # OpenAI's default for completions
        stream = _get(body, "stream", bool, False)
        echo = _get(body, "echo", bool, False)
        top_n = _get(body, "logprobs", int)
        _in_range("logprobs", top_n, 0, 20)
        batcher = state.ready()
        tokenizer = state.engine.tokenizer
        if isinstance(prompt, str):
            prompt_ids = tokenizer.encode(prompt, add_special_tokens=True)
        else:
            vocab = state.engine.model.config.vocab_size
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", "prompt")
            prompt_ids = list(prompt)
        if not prompt_ids:
            raise APIError(400, "'prompt' is empty", "prompt")
        if max_tokens == 0 and not echo:
            raise APIError(400, "'max_tokens' must be at least 1 (0 is allowed only with echo)", "max_tokens")
        fit(prompt_ids, params, max_tokens, batcher, allow_zero=echo)
        params.logprobs = top_n
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        prompt_text = tokenizer.decode(prompt_ids)

        if stream:
            if echo:
                raise APIError(400, "'echo' is not supported with 'stream'", "echo")
            include_usage = bool((_get(body, "stream_options", dict, {}) or {}).get("include_usage"))
            gen, pieces = start(request, prompt_ids, params)

            def chunk(text, finish=None):
                return {"id": rid, "object": "text_completion", "created": created, "model": state.model_id,
                        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

            async def sse():
                try:
                    async for piece, _ in pieces:
                        yield _sse(chunk(piece))
                except APIError as e:  # the status line is already sent: report the error in the stream
                    yield _sse(json.loads(e.response().body))
                    return
                yield _sse(chunk("", gen.finish_reason))
                if include_usage:
                    yield _sse({"id": rid, "object": "text_completion", "created": created,
                                "model": state.model_id, "choices": [], "usage": usage(gen)})
                yield "data: [DONE]\n\n"
            return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        tokens, token_lps, tops, offsets = [], [], [], []
        text = ""
        if echo:
            text = prompt_text
            if top_n is not None:
                # on the engine's thread, between batch steps (model work on any other thread slows it all)
                lps = await asyncio.wrap_future(batcher.call(lambda: state.engine.prompt_logprobs(prompt_ids, top_n)))
                pos = 0
                for tok, lp in zip(prompt_ids, lps):
                    piece = token_text(tok)
                    tokens.append(piece)
                    offsets.append(pos)
                    pos += len(piece)
                    token_lps.append(None if lp is None else lp.logprob)
                    tops.append(None if lp is None else {token_text(t): v for t, v in lp.top[:top_n]})
        if max_tokens == 0:
            p = len(prompt_ids)
            gen_usage, finish = {"prompt_tokens": p, "completion_tokens": 0, "total_tokens": p}, "length"
            state.prompt_tokens += p
        else:
            gen, pieces = start(request, prompt_ids, params)
            async for _ in pieces:
                pass
            completion = gen.text
            if top_n is not None:
                pos = len(text)
                for lp in gen.logprobs:
                    piece = token_text(lp.token)
                    tokens.append(piece)
                    offsets.append(pos)
                    pos += len(piece)
                    token_lps.append(lp.logprob)
                    tops.append({token_text(t): v for t, v in lp.top[:top_n]})
            text += completion
            gen_usage, finish = usage(gen), gen.finish_reason
        logprobs = None
        if top_n is not None:
            logprobs = {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}
        return {"id": rid, "object": "text_completion", "created": created, "model": state.model_id,
                "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}],
                "usage": gen_usage}

    @app.get("/metrics")
    async def metrics():
        b = state.batcher
        lines = ["# HELP picochat_requests_total HTTP requests by path and status.",
                 "# TYPE picochat_requests_total counter"]
        for (path, status), n in sorted(state.requests.items()):
            lines.append(f'picochat_requests_total{{path="{path}",status="{status}"}} {n}')
        uptime = time.time() - state.started
        lines += ["# HELP picochat_prompt_tokens_total Prompt tokens processed.",
                  "# TYPE picochat_prompt_tokens_total counter",
                  f"picochat_prompt_tokens_total {state.prompt_tokens}",
                  "# HELP picochat_completion_tokens_total Tokens generated.",
                  "# TYPE picochat_completion_tokens_total counter",
                  f"picochat_completion_tokens_total {state.completion_tokens}",
                  "# HELP picochat_tokens_per_second Generated tokens per second since start.",
                  "# TYPE picochat_tokens_per_second gauge",
                  f"picochat_tokens_per_second {state.completion_tokens / uptime if uptime else 0:.3f}",
                  "# HELP picochat_queue_length Requests waiting for a free batch row.",
                  "# TYPE picochat_queue_length gauge",
                  f"picochat_queue_length {b.queue_length if b else 0}",
                  "# HELP picochat_active_sequences Requests being generated now.",
                  "# TYPE picochat_active_sequences gauge",
                  f"picochat_active_sequences {b.busy if b else 0}",
                  "# HELP picochat_model_loaded Whether the model is ready.",
                  "# TYPE picochat_model_loaded gauge",
                  f"picochat_model_loaded {1 if b else 0}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def index():
        page = resources.files("picochat").joinpath("web/index.html")
        return HTMLResponse(page.read_text(encoding="utf-8"))

    @app.get("/favicon.ico")
    async def favicon():
        return Response(status_code=204)

    return app


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
