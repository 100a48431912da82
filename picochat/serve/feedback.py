"""picochat's feedback endpoint:

    POST /v1/feedback   {"response_id": "chatcmpl-...", "rating": "up"|"down", "edited": "the corrected reply"}

The reply is named by its chat completion's id: the server remembers its latest replies (ServerState.remember,
in memory only), and this endpoint writes the rated one — the conversation before it, its text, the rating,
the user's edit, the model and adapter — to the feedback file (data/feedback.py), which `picochat feedback`
reads and turns into training data. A second rating of the same reply replaces the first.
"""
from __future__ import annotations

import asyncio

from fastapi import Request

from ..data.feedback import FeedbackError
from .openai import read_body
from .protocol import APIError, FeedbackRequest, FeedbackStored
from .state import REMEMBERED_REPLIES, ServerState
from .stream import json_response


async def post_feedback(request: Request):
    state: ServerState = request.app.state.picochat
    body = await read_body(request, FeedbackRequest)
    reply = state.recalled(body.response_id)
    if reply is None:
        raise APIError(404, f"no reply with the id '{body.response_id}': this server remembers only the chat "
                            f"replies it gave since it started (the latest {REMEMBERED_REPLIES})",
                       "response_id", "response_not_found")
    try:   # SQLite may wait for another writer's lock: never on the event loop
        await asyncio.to_thread(state.feedback.record, body.response_id, reply.messages, reply.reply, body.rating,
                                body.edited, reply.model, reply.adapter)
    except FeedbackError as e:   # (a response never shows the server's own paths)
        problem = str(e).replace(str(state.feedback.path), "the server's feedback file")
        raise APIError(500, f"the feedback could not be stored: {problem}", type="server_error",
                       code="feedback_not_stored") from None
    return json_response(FeedbackStored(id=body.response_id, rating=body.rating, stored=True))
