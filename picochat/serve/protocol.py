"""The HTTP API's request bodies as typed schemas: every field's type, range and size in one place.

The server parses a body in two steps: `parse_json` (size and nesting depth checked on the raw bytes,
before Python builds anything from them), then `validate` (one pydantic model per endpoint, strict: JSON
`true` is not a number, "1" is not an integer, NaN and infinities are refused). Every rejection becomes
`RequestError(message, param)` naming the field, which the server answers as OpenAI's error object.
Bounds follow OpenAI's documentation where it gives one; the rest are picochat's and named here.
"""
from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, Literal

import numpy as np
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_BODY_BYTES = 4 * 1024 * 1024   # the whole request body
MAX_JSON_DEPTH = 32                # nested objects/arrays (OpenAI's bodies need 4)
MAX_MESSAGES = 2048
MAX_CONTENT_PARTS = 256
MAX_STOP = 4                       # stop strings, as OpenAI allows
MAX_STOP_CHARS = 256               # per stop string (they are held back from a stream until ruled out)
MAX_LOGPROBS = 20                  # alternatives per token
MAX_TOKENS_BOUND = 1 << 20         # the context checks the real limit; this only keeps integers small
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)   # what torch.Generator.manual_seed accepts
MAX_REPETITION_PENALTY = 100.0
MAX_EMBEDDING_INPUTS = 2048        # texts per embeddings request, as OpenAI allows
MAX_EMBEDDING_CHARS = 100_000      # per text (the encoder reads its first 256 tokens)


class RequestError(ValueError):
    """A request the API refuses: `message` names the problem, `param` the field (None for the body)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = "invalid_value",
                 status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


# ----------------------------------------------------------------------------- raw bytes -> JSON
class APIError(Exception):
    """An error answered as OpenAI's {"error": {message, type, param, code}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    @classmethod
    def from_request_error(cls, e: RequestError) -> "APIError":
        return cls(e.status, e.message, e.param, e.code)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)



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
        raise RequestError(f"the request body nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json")

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
    return body


# ----------------------------------------------------------------------------- the schemas
Finite = Annotated[float, Field(allow_inf_nan=False)]


class _Strict(BaseModel):
    # unknown fields (user, presence_penalty, ...) are ignored, as OpenAI-compatible servers do;
    # they never reach the engine
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Any] | None = None

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
    n: Annotated[int, Field(ge=1, le=1)] = 1   # one choice per request
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

    def message_dicts(self) -> list[dict]:
        """[{role, content}] for the chat template ("developer" is OpenAI's newer name for "system")."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


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
