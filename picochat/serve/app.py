"""The server's wiring: the routes, the guard every request passes (API key, body size, metrics), OpenAI's
error shape for every failure (Anthropic's under /v1/messages), and uvicorn with a graceful shutdown.

    POST /v1/chat/completions   POST /v1/completions   POST /v1/embeddings     (openai.py)
    POST /v1/messages   POST /v1/messages/count_tokens                         (anthropic.py)
    POST /v1/feedback                                                          (feedback.py)
    GET /v1/models   GET /v1/kb   GET /health   GET /metrics   GET /           (here)

What a request becomes on its way to the engine and back is openai.py's; the typed bodies are
protocol.py's; the one SSE writer is stream.py's; the model, batcher and counters are the ServerState's.
"""
from __future__ import annotations

import contextlib
import hmac
import threading
import time
from importlib import resources

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .anthropic import count_message_tokens, create_message
from .anthropic import error_response as anthropic_error
from .feedback import post_feedback
from .knowledge import Knowledge
from .openai import chat_completions, completions, embeddings
from .protocol import MAX_BODY_BYTES, APIError, KnowledgeBase, KnowledgeBaseList, ModelCard, ModelList
from .state import AdapterWatch, ServerState
from .stream import json_response

REQUEST_TIMEOUT = 600.0   # seconds a request may wait and generate before it ends with an error
SHUTDOWN_GRACE = 10.0     # seconds in-flight requests get to finish after SIGTERM


# --------------------------------------------------------------------------- the small endpoints
async def health(request: Request):
    state: ServerState = request.app.state.picochat
    if state.batcher is None:
        status = "error" if state.load_error else "loading"
        return JSONResponse({"status": status, "error": state.load_error}, status_code=503)
    answer = {"status": "ok", "model": state.model_id, "adapter": state.adapter_id}
    if state.swap_error:  # an approved adapter that could not be swapped in: the model named here serves on
        answer["adapter_error"] = state.swap_error
    return answer


async def list_models(request: Request):
    state: ServerState = request.app.state.picochat
    return json_response(ModelList(data=[ModelCard(id=state.model_id, created=state.created)]))


async def list_knowledge_bases(request: Request):
    """The knowledge bases this server answers from (the chat page's switch)."""
    names = request.app.state.picochat.knowledge.names
    return json_response(KnowledgeBaseList(data=[KnowledgeBase(id=name) for name in names]))


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
ANTHROPIC_PATHS = "/v1/messages"   # Anthropic's API: its error shape, and its x-api-key header


def error_response(request: Request, exc: APIError) -> Response:
    """The error in the shape of the API the path belongs to."""
    if request.url.path.startswith(ANTHROPIC_PATHS):
        return anthropic_error(exc)
    return exc.response()


async def api_error(request: Request, exc: APIError):
    return error_response(request, exc)


async def http_error(request: Request, exc: StarletteHTTPException):
    return error_response(request, APIError(exc.status_code, str(exc.detail), type="invalid_request_error"))


async def unexpected(request: Request, exc: Exception):  # last resort: still the API's shape, no traceback
    return error_response(request, APIError(500, f"internal error: {type(exc).__name__}", type="server_error"))


async def guard(request: Request, call_next):
    """API key and body size before any endpoint runs; every answer counted by route and status."""
    state: ServerState = request.app.state.picochat
    path = request.url.path
    try:
        if state.api_key and path.startswith("/v1/") and path != "/v1/models":
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not token and path.startswith(ANTHROPIC_PATHS):   # Anthropic's clients send x-api-key
                token = request.headers.get("x-api-key", "")
            if not hmac.compare_digest(token.encode(), state.api_key.encode()):
                raise APIError(401, "missing or incorrect API key: send 'Authorization: Bearer KEY'"
                                    + (" or 'x-api-key: KEY'" if path.startswith(ANTHROPIC_PATHS) else ""),
                               type="authentication_error", code="invalid_api_key")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise APIError(413, f"request body of {length} bytes exceeds the limit of {MAX_BODY_BYTES}",
                           code="request_too_large")
        response = await call_next(request)
    except APIError as e:
        response = error_response(request, e)
    state.count(path, response.status_code)
    return response


# --------------------------------------------------------------------------- the app
ROUTES = [
    ("POST", "/v1/chat/completions", chat_completions),
    ("POST", "/v1/completions", completions),
    ("POST", "/v1/embeddings", embeddings),
    ("POST", "/v1/messages", create_message),
    ("POST", "/v1/messages/count_tokens", count_message_tokens),
    ("POST", "/v1/feedback", post_feedback),
    ("GET", "/v1/kb", list_knowledge_bases),
    ("GET", "/v1/models", list_models),
    ("GET", "/health", health),
    ("GET", "/metrics", metrics),
    ("GET", "/", index),
    ("GET", "/favicon.ico", favicon),
]


def create_app(load_engine, model_id: str, api_key: str | None = None, max_batch: int = 8,
               max_queue: int = 64, max_len: int | None = None, request_timeout: float = REQUEST_TIMEOUT,
               knowledge: Knowledge | None = None, feedback_db=None, watch: AdapterWatch | None = None) -> FastAPI:
    """The FastAPI app. load_engine() -> Engine is called once, on a background thread; `knowledge` holds
    the knowledge bases (and embedding model) it answers from; ratings go to the SQLite file `feedback_db`
    (default: cache_dir()/feedback.db); with `watch`, the model serves the adapter `picochat tune` approved,
    swapped in when that changes (and load_engine is not used)."""
    state = ServerState(load_engine, model_id, api_key, max_batch, max_queue, max_len, request_timeout, knowledge,
                        feedback_db, watch)
    app = FastAPI(title="picochat", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.picochat = state
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
    app.middleware("http")(guard)
    for method, path, endpoint in ROUTES:
        app.add_api_route(path, endpoint, methods=[method])
    state.routes = {route.path for route in app.routes}
    return app


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    yield
    app.state.picochat.close()  # stop the batcher thread (and the adapter watch) with the server


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
