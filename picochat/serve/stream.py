"""How a response body goes out: whole, as JSON, or as server-sent events — the one SSE writer that chat,
completions, a knowledge base's decline and Anthropic's messages all stream through. OpenAI's events are
`data:` lines ending with `data: [DONE]`; Anthropic's are named (`event: <type>`) and end with their last."""
from __future__ import annotations

import json
from typing import AsyncIterable, Callable

from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from .protocol import APIError


def json_response(body: BaseModel, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(body.model_dump(), headers=headers)


def streaming_response(chunks: AsyncIterable[BaseModel], named: bool = False,
                       error_body: Callable[[APIError], BaseModel] | None = None,
                       headers: dict | None = None) -> StreamingResponse:
    return StreamingResponse(sse_events(chunks, named, error_body), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", **(headers or {})})


async def sse_events(chunks: AsyncIterable[BaseModel], named: bool = False,
                     error_body: Callable[[APIError], BaseModel] | None = None):
    """Each chunk as an event, then (OpenAI's) `data: [DONE]`. A failure after the status line has gone out
    (the generation failed or timed out, the server is shutting down) ends the stream with an error event
    instead: `error_body(e)`, or OpenAI's error object."""
    try:
        async for chunk in chunks:
            yield event(chunk, named)
    except APIError as e:
        yield event(error_body(e) if error_body else e.body(), named)
        return
    if not named:
        yield "data: [DONE]\n\n"


def event(body: BaseModel, named: bool = False) -> str:
    """One server-sent event; named: `event: <its type>` first, as Anthropic's API writes them."""
    head = f"event: {body.type}\n" if named else ""
    return f"{head}data: {json.dumps(body.model_dump(), ensure_ascii=False)}\n\n"
