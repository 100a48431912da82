"""Anthropic's Messages API, a thin translation onto the chat path that OpenAI's chat completions take:

    POST /v1/messages   POST /v1/messages/count_tokens

A request is parsed and checked against the typed schemas below (openai.read_request: the same size, depth
and strictness rules, the same 404 for another model), becomes a chat.ChatCall — `system` the system
message, a user's `tool_result` blocks one `tool` message each, an assistant's `tool_use` blocks its
`tool_calls`, `tool_choice` {auto, any, tool, none} a ToolUse {auto, required, <name>, none} — and runs
through chat.prepare and chat.run_choices exactly as a chat completion does (n is always 1 here).

The reply comes back as content blocks: a text block per run of text, a tool_use block per call, never
interleaved. `Blocks` builds them from the parsed pieces as they arrive, and both the streamed reply (its
content_block_* events) and the whole message are made by it, so the two always join to the same content.
Tool-use ids are the parser's call ids with Anthropic's prefix (`call_x` -> `toolu_x`).

The engine reports a stop sequence only as finish_reason 'stop' (as it does the end of the turn) and cuts it
from the text; which one ended the reply is found again in the text the model wrote (`matched_stop`).

Errors on these paths go out in Anthropic's shape, {"type": "error", "error": {type, message}}, with the
status the OpenAI side would use (app.py converts every APIError through `error_response`); a failure
after a stream began is an `error` event.
"""
from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, PlainValidator, TypeAdapter, field_validator, model_validator
from pydantic_core import from_json

from ..engine.grammar import schema_problem
from ..engine.sampling import SamplingParams
from ..engine.tool_parser import ParsedDelta
from ..engine.tools import Tool, ToolUse
from .chat import ChatCall, ChoiceReply, Events, check_tool_choice, grammars_ready, prepare, run_choices
from .openai import read_request
from .protocol import MAX_CONTENT_PARTS, MAX_MESSAGES, MAX_STOP_CHARS, MAX_TOKENS_BOUND, APIError, Finite
from .state import ServerState
from .stream import json_response, streaming_response
from .tool_protocol import MAX_CALL_ID_CHARS, MAX_DESCRIPTION_CHARS, MAX_TOOLS, NAME_PATTERN

MAX_STOP_SEQUENCES = 8   # picochat's bound (each is held back from a stream until ruled out)
ADAPTER_HEADER = "picochat-adapter"   # names the adapter that answered (`picochat tune`); "base": none


# ----------------------------------------------------------------------------- the request
class _Strict(BaseModel):
    # unknown fields (cache_control, citations, metadata's contents, ...) are ignored; they never reach the engine
    model_config = ConfigDict(strict=True, extra="ignore")


class TextParam(_Strict):
    type: Literal["text"]
    text: str


class ToolUseParam(_Strict):
    """A call the assistant made earlier in the conversation, sent back by the client."""
    type: Literal["tool_use"]
    id: Annotated[str, Field(max_length=MAX_CALL_ID_CHARS)]
    name: Annotated[str, Field(max_length=64)]
    input: dict[str, Any]


def _text_content(value):
    """A string, or a list of text blocks (validated here, not as a union: an error then names the block's own
    field, `messages[0].content[1].text`, rather than a union member)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _TEXT_BLOCKS.validate_python(value)
    raise ValueError("must be a string or a list of text blocks")


class ToolResultParam(_Strict):
    """The result of an earlier call, in a user message."""
    type: Literal["tool_result"]
    tool_use_id: Annotated[str, Field(max_length=MAX_CALL_ID_CHARS)]
    content: Annotated[str | list[TextParam], PlainValidator(_text_content)] = ""
    is_error: bool = False

    def text(self) -> str:
        text = joined(self.content)
        return f"Error: {text}" if self.is_error else text


BLOCKS = {"text": TextParam, "tool_use": ToolUseParam, "tool_result": ToolResultParam}
Block = TextParam | ToolUseParam | ToolResultParam


def _block(value) -> Block:
    """A content block, validated as the model its `type` names."""
    kind = value.get("type") if isinstance(value, dict) else None
    model = BLOCKS.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise ValueError(f"must be a content block of type {', '.join(map(repr, BLOCKS))} (picochat takes text "
                         "and tools only)")
    return model.model_validate(value)


_TEXT_BLOCKS = TypeAdapter(Annotated[list[TextParam], Field(max_length=MAX_CONTENT_PARTS)])
_BLOCKS = TypeAdapter(Annotated[list[Annotated[Block, PlainValidator(_block)]], Field(max_length=MAX_CONTENT_PARTS)])


def _content(value):
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _BLOCKS.validate_python(value)
    raise ValueError("must be a string or a list of content blocks")


class MessageParam(_Strict):
    role: Literal["user", "assistant"]
    content: Annotated[str | list[Block], PlainValidator(_content)]

    @model_validator(mode="after")
    def _blocks_fit_the_role(self):
        kinds = {b.type for b in self.blocks()}
        if self.role == "user" and "tool_use" in kinds:
            raise ValueError("'tool_use' blocks are the assistant's: a 'user' message cannot hold them")
        if self.role == "assistant" and "tool_result" in kinds:
            raise ValueError("'tool_result' blocks answer the assistant's calls: only a 'user' message holds them")
        return self

    def blocks(self) -> list[Block]:
        return [TextParam(type="text", text=self.content)] if isinstance(self.content, str) else self.content


class ToolParam(_Strict):
    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    description: Annotated[str, Field(max_length=MAX_DESCRIPTION_CHARS)] = ""
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None   # Anthropic's server tools (web search, bash, ...) are not ours

    @field_validator("input_schema")
    @classmethod
    def _object_schema(cls, schema):
        problem = schema_problem(schema)
        if problem:
            raise ValueError(problem)
        if schema.get("type") != "object":
            raise ValueError(f"must be a JSON schema of an object (type 'object'), not of {schema.get('type')!r}")
        return schema


class ToolChoiceParam(_Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: Annotated[str, Field(max_length=64)] | None = None
    disable_parallel_tool_use: bool = False

    @model_validator(mode="after")
    def _named(self):
        if self.type == "tool" and self.name is None:
            raise ValueError("type 'tool' needs 'name': the tool the reply must call")
        return self


class CountTokensRequest(_Strict):
    """POST /v1/messages/count_tokens: the conversation, without what only generation needs."""
    model: Annotated[str, Field(max_length=256)]
    messages: Annotated[list[MessageParam], Field(min_length=1, max_length=MAX_MESSAGES)]
    system: Annotated[str | list[TextParam], PlainValidator(_text_content)] = ""
    tools: Annotated[list[ToolParam], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoiceParam | None = None


class MessagesRequest(CountTokensRequest):
    """POST /v1/messages."""
    max_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_BOUND)]
    stop_sequences: Annotated[list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]],
                              Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    temperature: Annotated[Finite, Field(ge=0, le=1)] = 1.0
    top_p: Annotated[Finite, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=0, le=MAX_TOKENS_BOUND)] = 0
    stream: bool = False
    metadata: dict[str, Any] | None = None   # user_id: accepted, unused


def joined(content: str | list[TextParam]) -> str:
    """Text blocks as one text (joined as the OpenAI side joins text parts: the same prompt either way)."""
    return content if isinstance(content, str) else "".join(b.text for b in content)


# ----------------------------------------------------------------------------- the response
class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class TextBlock(_Response):
    type: Literal["text"] = "text"
    text: str


class ToolUseBlock(_Response):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


class Usage(_Response):
    input_tokens: int
    output_tokens: int


class Message(_Response):
    """POST /v1/messages, not streamed (and, with no content yet, the stream's message_start)."""
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[TextBlock | ToolUseBlock]
    stop_reason: StopReason | None
    stop_sequence: str | None
    usage: Usage


class MessageStart(_Response):
    type: Literal["message_start"] = "message_start"
    message: Message


class Ping(_Response):
    type: Literal["ping"] = "ping"


class ContentBlockStart(_Response):
    type: Literal["content_block_start"] = "content_block_start"
    index: int
    content_block: TextBlock | ToolUseBlock   # empty: text "", input {}


class TextDelta(_Response):
    type: Literal["text_delta"] = "text_delta"
    text: str


class InputJSONDelta(_Response):
    type: Literal["input_json_delta"] = "input_json_delta"
    partial_json: str


class ContentBlockDelta(_Response):
    type: Literal["content_block_delta"] = "content_block_delta"
    index: int
    delta: TextDelta | InputJSONDelta


class ContentBlockStop(_Response):
    type: Literal["content_block_stop"] = "content_block_stop"
    index: int


class StopDelta(_Response):
    stop_reason: StopReason | None
    stop_sequence: str | None


class DeltaUsage(_Response):
    output_tokens: int


class MessageDelta(_Response):
    type: Literal["message_delta"] = "message_delta"
    delta: StopDelta
    usage: DeltaUsage


class MessageStop(_Response):
    type: Literal["message_stop"] = "message_stop"


class ErrorDetail(_Response):
    type: str
    message: str


class ErrorResponse(_Response):
    """An error, as the response body or as a stream's `error` event."""
    type: Literal["error"] = "error"
    error: ErrorDetail


class TokenCount(_Response):
    """POST /v1/messages/count_tokens."""
    input_tokens: int


StreamEvent = (MessageStart | Ping | ContentBlockStart | ContentBlockDelta | ContentBlockStop | MessageDelta
               | MessageStop | ErrorResponse)


# ----------------------------------------------------------------------------- errors
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


def error_body(e: APIError) -> ErrorResponse:
    """An APIError in Anthropic's shape. Anthropic's error has no `param`, so the message names the field
    (in Anthropic's terms: a tool's schema is its `input_schema`)."""
    kind = ERROR_TYPES.get(e.status) or ("api_error" if e.status >= 500 else "invalid_request_error")
    param = (e.param or "").replace(".function.parameters", ".input_schema")
    message = e.message if not param or param in e.message else f"{param}: {e.message}"
    return ErrorResponse(error=ErrorDetail(type=kind, message=message))


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e).model_dump(), status_code=e.status)


# ----------------------------------------------------------------------------- request -> engine
def messages_of(body: CountTokensRequest) -> list[dict]:
    """The conversation as the chat path's messages: the system text first, a user's tool results as one
    `tool` message each (before the user's text, as Anthropic orders them), an assistant's calls as its
    tool_calls. The last message must be the user's: continuing an assistant's text (prefill) is not
    supported (the chat path always opens a new assistant turn)."""
    if body.messages[-1].role != "user":
        raise APIError(400, "the last message must be the user's: continuing an assistant message (prefill) is "
                            "not supported", f"messages[{len(body.messages) - 1}].role")
    system = joined(body.system)
    out = [{"role": "system", "content": system}] if system else []
    for m in body.messages:
        blocks = m.blocks()
        text = "".join(b.text for b in blocks if b.type == "text")
        if m.role == "assistant":
            calls = [{"id": b.id, "name": b.name, "arguments": json.dumps(b.input, ensure_ascii=False)}
                     for b in blocks if b.type == "tool_use"]
            out.append({"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})})
            continue
        results = [{"role": "tool", "tool_call_id": b.tool_use_id, "content": b.text()}
                   for b in blocks if b.type == "tool_result"]
        out += results + ([{"role": "user", "content": text}] if text or not results else [])
    return out


def tool_use_of(body: CountTokensRequest) -> ToolUse | None:
    """tools and tool_choice as a ToolUse: auto -> auto, any -> required, tool -> its name, none -> none;
    disable_parallel_tool_use -> at most one call. None when the request has neither."""
    if body.tools is None and body.tool_choice is None:
        return None
    tools = [Tool(t.name, t.description, t.input_schema) for t in body.tools or []]
    choice = body.tool_choice or ToolChoiceParam(type="auto")
    if choice.type in ("any", "tool") and not tools:
        raise APIError(400, f"tool_choice of type '{choice.type}' needs 'tools'", "tool_choice.type")
    mode = {"auto": "auto", "any": "required", "none": "none", "tool": "function"}[choice.type]
    use = ToolUse(tools, mode, parallel=not choice.disable_parallel_tool_use,
                  function=choice.name if mode == "function" else None)
    check_tool_choice(use, "tool_choice.name")
    return use


def sampling_of(body: MessagesRequest) -> SamplingParams:
    return SamplingParams(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                          stop=[s for s in body.stop_sequences or [] if s])


def chat_call(body: CountTokensRequest, max_tokens: int | None = None,
              sampling: SamplingParams | None = None) -> ChatCall:
    return ChatCall(messages_of(body), sampling or SamplingParams(), max_tokens, tool_use_of(body))


# ----------------------------------------------------------------------------- engine -> response
def tool_use_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def tool_input(arguments: str) -> dict:
    """A call's input from its arguments' JSON text. A call cut short (max_tokens) keeps what parsed, read
    as the SDKs read a stream's partial_json (jiter's partial mode), so both replies agree."""
    value = from_json(arguments, allow_partial=True) if arguments.strip() else {}
    return value if isinstance(value, dict) else {}


@dataclass
class Blocks:
    """The reply's content blocks, built from its parsed pieces as they arrive, with the stream events that
    build them: consecutive text is one text block, each call one tool_use block, and a block is stopped
    before the next one starts."""
    content: list[TextBlock | ToolUseBlock] = field(default_factory=list)
    is_open: bool = False    # whether content[-1] has started and not stopped
    call: int = -1           # the parser's index of the call the open tool_use block holds
    arguments: str = ""      # the open tool_use block's input so far, as JSON text

    def add(self, delta: ParsedDelta) -> list[StreamEvent]:
        out = []
        if delta.content:
            if not (self.is_open and self.content[-1].type == "text"):
                out += self._start(TextBlock(text=""))
            self.content[-1].text += delta.content
            out.append(ContentBlockDelta(index=len(self.content) - 1, delta=TextDelta(text=delta.content)))
        for d in delta.calls:
            if not (self.is_open and self.content[-1].type == "tool_use" and self.call == d.index):
                out += self._start(ToolUseBlock(id=tool_use_id(d.id or ""), name=d.name or "", input={}))
                self.call = d.index
            if d.arguments:
                self.arguments += d.arguments
                out.append(ContentBlockDelta(index=len(self.content) - 1,
                                             delta=InputJSONDelta(partial_json=d.arguments)))
        return out

    def stop(self) -> list[StreamEvent]:
        """Stop the open block (a tool_use block gets its input, parsed from the JSON text it was sent as)."""
        if not self.is_open:
            return []
        if self.content[-1].type == "tool_use":
            self.content[-1].input = tool_input(self.arguments)
        self.is_open, self.arguments = False, ""
        return [ContentBlockStop(index=len(self.content) - 1)]

    def _start(self, block: TextBlock | ToolUseBlock) -> list[StreamEvent]:
        out = self.stop()
        self.content.append(block)
        self.is_open = True
        return out + [ContentBlockStart(index=len(self.content) - 1, content_block=block.model_copy())]


STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def stop_of(reply: ChoiceReply) -> tuple[str | None, str | None]:
    """(stop_reason, stop_sequence): a matched stop sequence first (it may cut a call short), then the
    finish reason's counterpart."""
    if reply.gen.stop_string is not None:
        return "stop_sequence", reply.gen.stop_string
    return STOP_REASONS.get(reply.finish_reason or ""), None


def new_message(model: str, prompt_tokens: int) -> Message:
    """The message before any content: the head of the stream (message_start) and of the whole reply."""
    return Message(id=f"msg_{uuid.uuid4().hex[:24]}", model=model, content=[], stop_reason=None, stop_sequence=None,
                   usage=Usage(input_tokens=prompt_tokens, output_tokens=0))


async def message_events(head: Message, reply: ChoiceReply, events: Events) -> AsyncIterator[StreamEvent]:
    """A streamed reply: message_start, ping, each block's start, deltas and stop, message_delta (the stop
    reason and the output tokens), message_stop."""
    yield MessageStart(message=head)
    yield Ping()
    blocks = Blocks()
    async for _, delta in events:
        for event in blocks.add(delta):
            yield event
    for event in blocks.stop():
        yield event
    reason, sequence = stop_of(reply)
    yield MessageDelta(delta=StopDelta(stop_reason=reason, stop_sequence=sequence),
                       usage=DeltaUsage(output_tokens=reply.gen.stats.completion_tokens))
    yield MessageStop()


async def whole_message(head: Message, reply: ChoiceReply, events: Events) -> Message:
    """The reply as one message, its blocks built as the stream builds them."""
    blocks = Blocks()
    async for _, delta in events:
        blocks.add(delta)
    blocks.stop()
    reason, sequence = stop_of(reply)
    usage = Usage(input_tokens=head.usage.input_tokens, output_tokens=reply.gen.stats.completion_tokens)
    return head.model_copy(update={"content": blocks.content, "stop_reason": reason, "stop_sequence": sequence,
                                   "usage": usage})


# ----------------------------------------------------------------------------- endpoints
async def create_message(request: Request):
    state: ServerState = request.app.state.picochat
    body = await read_request(request, MessagesRequest)
    state.ready()
    call = chat_call(body, body.max_tokens, sampling_of(body))
    await grammars_ready(state, call.tools is not None)
    prompt_ids, params = prepare(state, call)
    replies, events = await run_choices(state, request, prompt_ids, params, call.tools)
    head = new_message(state.model_id, len(prompt_ids))
    adapter = {ADAPTER_HEADER: replies[0].adapter or "base"}   # Anthropic's shape has no field for it
    if body.stream:   # Anthropic's events are named (`event: message_start`) and end without [DONE]
        return streaming_response(message_events(head, replies[0], events), named=True, error_body=error_body,
                                  headers=adapter)
    return json_response(await whole_message(head, replies[0], events), headers=adapter)


async def count_message_tokens(request: Request):
    """The prompt's tokens as /v1/messages would build it (system, tools and their grammar checked), without
    generating; a request /v1/messages would refuse is refused alike (a prompt past the context included)."""
    state: ServerState = request.app.state.picochat
    body = await read_request(request, CountTokensRequest)
    state.ready()
    call = chat_call(body)
    await grammars_ready(state, call.tools is not None)
    prompt_ids, _ = prepare(state, call)
    return json_response(TokenCount(input_tokens=len(prompt_ids)))
