"""How a response body goes out: whole, as JSON, or as server-sent events — the one SSE writer that chat,
completions and a knowledge base's decline all stream through."""
from __future__ import annotations

import json
from typing import AsyncIterable

from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from .protocol import APIError


def json_response(body: BaseModel) -> JSONResponse:
    return JSONResponse(body.model_dump())


def streaming_response(chunks: AsyncIterable[BaseModel]) -> StreamingResponse:
    return StreamingResponse(sse_events(chunks), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def sse_events(chunks: AsyncIterable[BaseModel]):
    """Each chunk as a `data:` event, then `data: [DONE]`. A failure after the status line has gone out (the
    generation failed or timed out, the server is shutting down) ends the stream with an error event instead."""
    try:
        async for chunk in chunks:
            yield event(chunk)
    except APIError as e:
        yield event(e.body())
        return
    yield "data: [DONE]\n\n"


def event(body: BaseModel) -> str:
    return f"data: {json.dumps(body.model_dump(), ensure_ascii=False)}\n\n"
