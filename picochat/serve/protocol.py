"""The HTTP API's bodies as typed schemas: requests, with every field's type, range and size in one place,
and responses, in OpenAI's shapes.

Requests. The server parses a body in two steps: `parse_json` (size and nesting depth checked on the raw bytes,
before Python builds anything from them), then `validate` (one pydantic model per endpoint, strict: JSON
`true` is not a number, "1" is not an integer, NaN and infinities are refused). Every rejection becomes
`RequestError(message, param)` naming the field, which the server answers as OpenAI's error object.
Bounds follow OpenAI's documentation where it gives one; the rest are picochat's and named here.

Responses. One pydantic model per object OpenAI sends (chat.completion, chat.completion.chunk,
text_completion, the embeddings list, the models list, the error body), field for field in OpenAI's order.
A field is sent as null when it has no value, as OpenAI sends `"logprobs": null` and a chunk's
`"finish_reason": null`, except where OpenAI leaves the key out (`omitted_if_none`: a chunk's `usage`).
picochat's two extensions ride along the same way: `timings` and `retrieval`.
"""
from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, Literal

import numpy as np
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..engine.grammar import nesting_depth
from .tool_protocol import (MAX_CALL_ID_CHARS, MAX_TOOLS, ResponseFormat, ToolCallDeltaOut, ToolCallIn,
                            ToolCallOut, ToolChoice, ToolDef, omitted_if_none)

MAX_BODY_BYTES = 4 * 1024 * 1024   # the whole request body
MAX_JSON_DEPTH = 40                # nested objects/arrays (OpenAI's bodies need 4; a tool's schema more)
MAX_MESSAGES = 2048
MAX_CHOICES = 8                    # n: choices per request (and at most the server's --parallel)
MAX_CONTENT_PARTS = 256
MAX_STOP = 4                       # stop strings, as OpenAI allows
MAX_STOP_CHARS = 256               # per stop string (they are held back from a stream until ruled out)
MAX_LOGPROBS = 20                  # alternatives per token
MAX_TOKENS_BOUND = 1 << 20         # the context checks the real limit; this only keeps integers small
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)   # what torch.Generator.manual_seed accepts
MAX_REPETITION_PENALTY = 100.0
MAX_EMBEDDING_INPUTS = 2048        # texts per embeddings request, as OpenAI allows
MAX_EMBEDDING_CHARS = 100_000      # per text (the encoder reads its first 256 tokens)
MAX_EMBEDDING_TOKENS = 300_000     # per request, summed over its texts, as OpenAI allows
EMBEDDING_SLICE_TOKENS = 1024      # encoded in one go between two decode steps (~0.5 s on 2 cores)
MAX_RESPONSE_ID_CHARS = 256        # POST /v1/feedback: a chat completion's id ("chatcmpl-" + 32 hex digits)
MAX_EDITED_CHARS = 64 * 1024       # POST /v1/feedback: the user's corrected reply


class RequestError(ValueError):
    """A request the API refuses: `message` names the problem, `param` the field (None for the body)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = "invalid_value",
                 status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


# ----------------------------------------------------------------------------- raw bytes -> JSON
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)   # a JSON string, escapes included


def json_depth(raw: bytes) -> int:
    """How deeply objects and arrays nest in a JSON text (strings skipped), without parsing it."""
    skeleton = np.frombuffer(_STRING.sub(b"", raw), dtype=np.uint8)
    steps = (np.isin(skeleton, (ord("["), ord("{"))).astype(np.int64)
             - np.isin(skeleton, (ord("]"), ord("}"))).astype(np.int64))
    return int(steps.cumsum().max()) if steps.size else 0


def parse_json(raw: bytes) -> dict:
    """The body as a JSON object, refusing oversize, over-deep and non-standard (NaN, Infinity) input."""
    if len(raw) > MAX_BODY_BYTES:
        raise RequestError(f"request body of {len(raw)} bytes exceeds the limit of {MAX_BODY_BYTES}",
                           code="request_too_large", status=413)
    if json_depth(raw) > MAX_JSON_DEPTH:
        where = too_deep(raw)
        raise RequestError(f"'{where}' nests deeper than {MAX_JSON_DEPTH} levels" if where else
                           f"the request body nests deeper than {MAX_JSON_DEPTH} levels", param=where,
                           code="invalid_json")

    def no_constants(name):
        raise ValueError(f"{name} is not a JSON number")

    def finite(text):
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(f"the number {text[:40]} is too large")
        return value
    try:
        body = json.loads(raw, parse_constant=no_constants, parse_float=finite)
    except (ValueError, RecursionError) as e:  # also UnicodeDecodeError, and integers of > 4300 digits
        raise RequestError(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", code="invalid_json")
    where = lone_surrogate(body)
    if where is not None:   # JSON allows "\ud800"; no tokenizer (nor UTF-8) can take it
        raise RequestError(f"{where} contains a lone surrogate (\\ud800-\\udfff), which is not text: send valid "
                           f"UTF-16 pairs or the character itself", param=where)
    return body


def too_deep(raw: bytes) -> str | None:
    """The field ("response_format.json_schema.schema") under which a body nests too deeply, when Python
    can parse it at all (a few hundred levels); the path is cut to the first five names."""
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    path, level = [], 0
    while isinstance(value, (dict, list)) and level < MAX_JSON_DEPTH:
        items = list(value.items()) if isinstance(value, dict) else list(enumerate(value))
        deepest = max(items, key=lambda kv: nesting_depth(kv[1]), default=None)
        if deepest is None:
            return None
        path.append(deepest[0])
        value, level = deepest[1], level + 1
    return _param_name(tuple(path[:5])) if path else None


def lone_surrogate(value, path: str = "") -> str | None:
    """The path ("messages[0].content") of the first string, key or value, holding a lone surrogate."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "the body"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        name = key.encode("utf-8", "backslashreplace").decode() if isinstance(key, str) else key   # printable
        here = f"{path}[{name}]" if isinstance(key, int) else f"{path}.{name}" if path else str(name)
        found = lone_surrogate(key, here) if isinstance(key, str) else None
        found = found or lone_surrogate(item, here)
        if found is not None:
            return found
    return None


# ----------------------------------------------------------------------------- the requests
Finite = Annotated[float, Field(allow_inf_nan=False)]


class _Strict(BaseModel):
    # unknown fields (user, presence_penalty, ...) are ignored, as OpenAI-compatible servers do;
    # they never reach the engine
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Any] | None = None
    tool_calls: Annotated[list[ToolCallIn], Field(max_length=MAX_TOOLS)] | None = None   # an assistant's calls
    tool_call_id: Annotated[str, Field(max_length=MAX_CALL_ID_CHARS)] | None = None     # a tool's result is for

    @model_validator(mode="after")
    def _tool_fields(self):
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a 'tool' message needs 'tool_call_id': the id of the call it answers")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only an 'assistant' message can hold 'tool_calls'")
        return self

    @field_validator("content", mode="plain")
    @classmethod
    def _text_only(cls, content):
        if content is not None and not isinstance(content, (str, list)):
            raise ValueError("must be a string or a list of text parts")
        if isinstance(content, list):
            if len(content) > MAX_CONTENT_PARTS:
                raise ValueError(f"at most {MAX_CONTENT_PARTS} content parts")
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise ValueError('only text parts are supported ({"type": "text", "text": ...})')
        return content

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part["text"] for part in self.content)
        return self.content or ""


class _Sampling(_Strict):
    """Fields both endpoints share: how to sample and when to stop."""
    model: Annotated[str, Field(max_length=256)]
    max_tokens: Annotated[int, Field(ge=0, le=MAX_TOKENS_BOUND)] | None = None
    temperature: Annotated[Finite, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[Finite, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=0, le=MAX_TOKENS_BOUND)] = 0
    repetition_penalty: Annotated[Finite, Field(gt=0, le=MAX_REPETITION_PENALTY)] = 1.0
    seed: Annotated[int, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1])] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1
    response_format: ResponseFormat | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop", mode="plain")
    @classmethod
    def _stop(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop
        if stop is not None and not (isinstance(stops, list) and len(stops) <= MAX_STOP and all(
                isinstance(s, str) and len(s) <= MAX_STOP_CHARS for s in stops)):
            raise ValueError(f"must be a string or a list of up to {MAX_STOP} strings of up to {MAX_STOP_CHARS} "
                             "characters")
        return stop

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return [s for s in stops if s]

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Sampling):
    """POST /v1/chat/completions."""
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: Annotated[int, Field(ge=0, le=MAX_TOKENS_BOUND)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] = 0
    # picochat's extension: which knowledge base grounds the reply (a name the server was started with
    # --kb; false: none). Absent: the server's first knowledge base, if it has one.
    kb: Annotated[str, Field(max_length=256)] | bool | None = None
    tools: Annotated[list[ToolDef], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True

    def message_dicts(self) -> list[dict]:
        """[{role, content, ...}] for the chat template ("developer" is OpenAI's newer name for "system"):
        an assistant's calls as [{id, name, arguments}], a tool result's call id."""
        out = []
        for m in self.messages:
            message = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            if m.tool_calls:
                message["tool_calls"] = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                                         for c in m.tool_calls]
            if m.tool_call_id is not None:
                message["tool_call_id"] = m.tool_call_id
            out.append(message)
        return out


class CompletionRequest(_Sampling):
    """POST /v1/completions (one prompt per request: a string or token ids, or a batch of one of them)."""
    prompt: str | list[Any]
    max_tokens: Annotated[int, Field(ge=0, le=MAX_TOKENS_BOUND)] | None = 16   # OpenAI's default here
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None

    @field_validator("prompt", mode="plain")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str) or _is_token_ids(prompt):
            return prompt
        raise ValueError("must be a string or a non-empty list of token ids (one prompt per request)")


class EmbeddingRequest(_Strict):
    """POST /v1/embeddings: one text or a list of texts (token ids are refused: they are another model's)."""
    model: Annotated[str, Field(max_length=256)]
    input: str | list[Any]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1, le=MAX_TOKENS_BOUND)] | None = None

    @field_validator("input", mode="plain")
    @classmethod
    def _texts(cls, value):
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, list) or not texts:
            raise ValueError("must be a string or a non-empty list of strings")
        if len(texts) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"at most {MAX_EMBEDDING_INPUTS} texts per request")
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("must be text: token ids are not accepted (they would be another tokenizer's)")
        if any(not t.strip() for t in texts):
            raise ValueError("texts must not be empty")
        if any(len(t) > MAX_EMBEDDING_CHARS for t in texts):
            raise ValueError(f"each text may have at most {MAX_EMBEDDING_CHARS} characters")
        return value

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class FeedbackRequest(BaseModel):
    """POST /v1/feedback (picochat's own): a rating of a chat reply this server gave, and the user's correction.
    Unlike OpenAI's bodies, an unknown field is refused: a misspelt "edited" must not drop the user's edit."""
    model_config = ConfigDict(strict=True, extra="forbid")
    response_id: Annotated[str, Field(min_length=1, max_length=MAX_RESPONSE_ID_CHARS)]
    rating: Literal["up", "down"]
    edited: Annotated[str, Field(max_length=MAX_EDITED_CHARS)] | None = None

    @field_validator("edited")
    @classmethod
    def _has_text(cls, edited):
        if edited is not None and not edited.strip():
            raise ValueError("the corrected reply is empty: leave 'edited' out to rate the reply as it is")
        return edited


def _is_token_ids(value) -> bool:
    return (isinstance(value, list) and len(value) > 0
            and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 1 << 31 for t in value))


def validate(schema: type[BaseModel], body: dict) -> BaseModel:
    """body checked against schema; the first problem becomes a RequestError naming its field."""
    try:
        return schema.model_validate(body)
    except ValidationError as e:
        raise _request_error(e.errors(include_url=False)) from None


def _request_error(errors: list[dict]) -> RequestError:
    error = errors[0]
    param = _param_name(error["loc"])
    if error["type"] == "missing":
        return RequestError(f"'{param}' is required", param, "missing_required_parameter")
    message = error["msg"][0].lower() + error["msg"][1:]
    message = message.removeprefix("value error, ")
    got = json.dumps(error.get("input"), default=str)
    got = got if len(got) <= 60 else got[:57] + "..."
    code = "invalid_type" if error["type"].endswith("_type") or error["type"] == "literal_error" else "invalid_value"
    return RequestError(f"'{param}': {message}, got {got}", param, code)


def _param_name(loc: tuple) -> str:
    """('messages', 0, 'content') -> 'messages[0].content'."""
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or "body"


# ----------------------------------------------------------------------------- the responses
FinishReason = Literal["stop", "length", "tool_calls"] | None   # None: a chunk before the last


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")   # a misspelt field fails where it is built, not in a client


class PromptTokensDetails(_Response):
    cached_tokens: int   # prompt tokens whose keys and values were reused from the prefix cache


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = omitted_if_none()   # none for a reply the model never ran


class Timings(_Response):
    """picochat's extension on a non-streamed chat reply, as llama.cpp's server has one."""
    time_to_first_token_ms: float
    tokens_per_second: float
    draft_n: int = 0                 # speculative decoding (llama-server's names): tokens drafted ...
    draft_n_accepted: int = 0        # ... and how many of them the model kept
    tokens_per_pass: float = 1.0     # tokens decoded per forward pass of the model


class RetrievalSource(_Response):
    index: int
    source: str
    section: str
    label: str
    similarity: float
    text: str


class Retrieval(_Response):
    """picochat's extension with --kb: what the knowledge base gave the reply (OpenAI clients ignore it)."""
    kb: str
    query: str
    declined: bool
    sources: list[RetrievalSource]
    quote: str | None
    quote_source: int | None


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int]   # the token's text as UTF-8


class ChatTokenLogprob(_Response):
    """One token of a chat reply, with its most likely alternatives."""
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Response):
    content: list[ChatTokenLogprob]


class CompletionLogprobs(_Response):
    """The legacy completions shape: parallel lists, one entry per token (None: a prompt's first token)."""
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class ChatMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None                                        # null when the reply is only tool calls
    tool_calls: list[ToolCallOut] | None = omitted_if_none()


class ChatChoice(_Response):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(_Response):
    """POST /v1/chat/completions, not streamed."""
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str = "base"   # the adapter that answered (`picochat tune`); "base": none
    choices: list[ChatChoice]
    usage: Usage
    timings: Timings | None = omitted_if_none()
    retrieval: Retrieval | None = omitted_if_none()


class ChatDelta(_Response):
    """What a chunk adds to the reply: the role first, then text; nothing in the last chunk."""
    role: Literal["assistant"] | None = omitted_if_none()
    content: str | None = omitted_if_none()
    tool_calls: list[ToolCallDeltaOut] | None = omitted_if_none()


class ChunkChoice(_Response):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason = None


class ChatCompletionChunk(_Response):
    """One event of a streamed chat reply: choices, or (the usage chunk) no choices and the usage."""
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str = "base"   # the adapter that answered (`picochat tune`); "base": none
    choices: list[ChunkChoice]
    usage: Usage | None = omitted_if_none()
    retrieval: Retrieval | None = omitted_if_none()   # on the first chunk


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason = None


class Completion(_Response):
    """POST /v1/completions, and each event of its stream (OpenAI's chunks are text_completion objects too)."""
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str = "base"   # the adapter that answered (`picochat tune`); "base": none
    choices: list[CompletionChoice]
    usage: Usage | None = omitted_if_none()   # on the response, and alone in a stream's usage chunk


class Embedding(_Response):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str   # floats, or base64 of little-endian float32 bytes


class EmbeddingUsage(_Response):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(_Response):
    """POST /v1/embeddings."""
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "picochat"


class ModelList(_Response):
    """GET /v1/models."""
    object: Literal["list"] = "list"
    data: list[ModelCard]


class KnowledgeBase(_Response):
    id: str
    object: Literal["knowledge_base"] = "knowledge_base"


class KnowledgeBaseList(_Response):
    """GET /v1/kb: picochat's own, in the shape of the models list."""
    object: Literal["list"] = "list"
    data: list[KnowledgeBase]


class FeedbackStored(_Response):
    """POST /v1/feedback's answer."""
    id: str
    object: Literal["feedback"] = "feedback"
    rating: Literal["up", "down"]
    stored: bool


class ErrorDetail(_Response):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(_Response):
    error: ErrorDetail


class APIError(Exception):
    """An error answered as OpenAI's {"error": {message, type, param, code}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    @classmethod
    def from_request_error(cls, e: RequestError) -> "APIError":
        return cls(e.status, e.message, e.param, e.code)

    def body(self) -> ErrorBody:
        return ErrorBody(error=ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code))

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status)
