"""OpenAI's endpoints, each a thin translation onto the engine:

    POST /v1/chat/completions   POST /v1/completions   POST /v1/embeddings

A generating request takes one path: its body is parsed and checked against its schema (protocol.py),
mapped to the engine's terms (a chat.ChatCall, or a completion's prompt ids and SamplingParams), run by
the Batcher through chat.run_choices (its n choices share one prefill; each choice's text is parsed into
content and tool calls as it comes), and written as protocol.py's typed responses by one builder per
kind: `chat_completion`, `chat_chunk` and `text_completion`, streamed through the one SSE writer
(stream.py). A client that disconnects stops its generation; a request that fails ends alone.

Tools and answer shapes: `tools` and `tool_choice` become a ToolUse, `response_format` a JSON mode with its
schema (engine/tools.py renders them into the prompt and the grammar the reply keeps to); a streamed tool
call goes out as OpenAI's deltas — index, id and name once, then pieces of its arguments — that join to
exactly the non-streamed reply.

With `--kb`, a chat request without tools or an answer shape is grounded in a knowledge base first
(apps/assistant.py: retrieve, then a prompt with numbered sources, or a decline with no generation,
written by the same builders); the reply gets its sources appended and the response an extra `retrieval`
field (each source's path relative to the knowledge base's folder: a response never shows the server's own
paths). Retrieval and embeddings also run on the Batcher's thread (between decode steps), so the sentence
encoder and the model never compete for the CPU's cores.
"""
from __future__ import annotations

import base64
import time
import uuid
from typing import AsyncIterator

from fastapi import Request

from ..apps import assistant
from ..engine.sampling import SamplingParams, TokenLogprob
from ..engine.tool_parser import ToolCallDelta
from ..engine.tools import Tool, ToolUse
from .chat import (ChatCall, ChoiceReply, Events, answer_grammar, check_tool_choice, choices_of, finish,
                   grammars_ready, prepare, run_choices, sampling_for)
from .protocol import (EMBEDDING_SLICE_TOKENS, MAX_BODY_BYTES, MAX_EMBEDDING_TOKENS, APIError, ChatChoice,
                       ChatCompletion, ChatCompletionChunk, ChatDelta, ChatLogprobs, ChatMessage, ChatRequest,
                       ChatTokenLogprob, ChunkChoice, Completion, CompletionChoice, CompletionLogprobs,
                       CompletionRequest, Embedding, EmbeddingList, EmbeddingRequest, EmbeddingUsage,
                       PromptTokensDetails, RequestError, Retrieval, Timings, TopLogprob, Usage, parse_json,
                       validate)
from .state import ServerState
from .stream import json_response, streaming_response
from .tool_protocol import FunctionCallOut, FunctionDelta, ToolCallDeltaOut, ToolCallOut

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


def base_sampling(body) -> SamplingParams:
    """The body's sampling settings (max_new_tokens is set against the prompt's length later)."""
    return SamplingParams(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                          repetition_penalty=body.repetition_penalty, seed=body.seed, stop=body.stop_list())


def answer_shape(body) -> tuple[bool, dict | None, bool]:
    """response_format as (JSON mode, schema, strict)."""
    shape = body.response_format
    if shape is None or shape.type == "text":
        return False, None, False
    if shape.type == "json_object":
        return True, None, False
    return True, shape.json_schema.schema_, bool(shape.json_schema.strict)


def tool_use_of(body: ChatRequest) -> ToolUse | None:
    """tools and tool_choice as a ToolUse (None when the request has neither), checked against each other."""
    if body.tools is None and body.tool_choice is None:
        return None
    choice = body.tool_choice or ("auto" if body.tools else "none")
    tools = [Tool(t.function.name, t.function.description, t.function.parameters or {"type": "object", "properties": {}})
             for t in body.tools or []]
    use = ToolUse(tools, choice, body.parallel_tool_calls) if isinstance(choice, str) else \
        ToolUse(tools, "function", body.parallel_tool_calls, function=choice.function.name)
    check_tool_choice(use, "tool_choice" if isinstance(choice, str) else "tool_choice.function.name")
    return use


def chat_call(body: ChatRequest, messages: list[dict] | None = None) -> ChatCall:
    """A chat request in the engine's terms (`messages`: the grounded conversation, when a knowledge base
    answers)."""
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    max_tokens = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
    if max_tokens == 0:
        raise APIError(400, "'max_tokens' must be at least 1", "max_tokens", "invalid_value")
    json_mode, schema, strict = answer_shape(body)
    tools = tool_use_of(body)
    if json_mode and tools is not None and tools.calls_possible:
        raise APIError(400, "'response_format' cannot be combined with tools the model may call: set tool_choice "
                            "'none' or send one of them", "response_format")
    sampling = base_sampling(body)
    sampling.logprobs = body.top_logprobs if body.logprobs else None
    return ChatCall(messages if messages is not None else body.message_dicts(), sampling, max_tokens, tools,
                    json_mode, schema, strict, body.n)


def completion_to_engine(state: ServerState, body: CompletionRequest) -> tuple[list[int], list[SamplingParams]]:
    """A completion request as prompt ids (the raw prompt: the client owns all of its markup) and each
    choice's settings (a schema's grammar compiled: after chat.grammars_ready)."""
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
    if body.max_tokens == 0 and not body.echo:
        raise APIError(400, "'max_tokens' must be at least 1 (0 is allowed only with echo)", "max_tokens")
    params = sampling_for(base_sampling(body), prompt_ids, state.ready().max_len, body.max_tokens)
    params.logprobs = body.logprobs
    if body.echo and body.logprobs is not None:  # scored on the batcher, a chunk at a time
        params.prompt_logprobs = body.logprobs
    json_mode, schema, strict = answer_shape(body)
    if json_mode:
        params.grammar = answer_grammar(state.engine.grammars, schema, strict)
    return prompt_ids, choices_of(params, body.n)


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


def usage_of(replies: list[ChoiceReply]) -> Usage:
    """The prompt counted once (its choices share one prefill), the completions of every choice."""
    stats = replies[0].gen.stats
    p, c = stats.prompt_tokens, sum(r.gen.stats.completion_tokens for r in replies)
    return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=stats.cached_tokens))


def timings_of(gen) -> Timings:
    s = gen.stats
    return Timings(time_to_first_token_ms=round(s.time_to_first_token * 1000, 2),
                   tokens_per_second=round(s.tokens_per_s, 2), draft_n=sum(s.drafted.values()),
                   draft_n_accepted=sum(s.accepted.values()), tokens_per_pass=round(s.tokens_per_pass, 2))


def retrieval_of(grounding: assistant.Grounding | None) -> Retrieval | None:
    return Retrieval(kb=grounding.kb, **grounding.as_dict()) if grounding else None


def response_head(prefix: str, model: str, adapter: str | None) -> dict:
    """What a response and every chunk of its stream share: the id, the time it was made, the model and the
    adapter that answered (system_fingerprint)."""
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model,
            "system_fingerprint": adapter or "base"}


def chat_message(reply: ChoiceReply, footer: str = "") -> ChatMessage:
    """A choice's message: its content (null when it is only tool calls) and its calls."""
    content = reply.content + footer
    calls = [ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments)) for c in reply.calls]
    return ChatMessage(content=None if calls and not content else content, tool_calls=calls or None)


def chat_completion(head: dict, choices: list[ChatChoice], usage: Usage, timings=None, retrieval=None
                    ) -> ChatCompletion:
    return ChatCompletion(**head, choices=choices, usage=usage, timings=timings, retrieval=retrieval)


def chat_chunk(head: dict, index: int, delta: ChatDelta, finish_reason: str | None = None, logprobs=None,
               retrieval=None) -> ChatCompletionChunk:
    choice = ChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason)
    return ChatCompletionChunk(**head, choices=[choice], retrieval=retrieval)


def tool_deltas(calls: list[ToolCallDelta]) -> list[ToolCallDeltaOut]:
    """Parsed call pieces in OpenAI's delta shape (id, type and name on a call's first delta only)."""
    return [ToolCallDeltaOut(index=d.index, id=d.id, type="function" if d.id else None,
                             function=FunctionDelta(name=d.name, arguments=d.arguments)) for d in calls]


def text_completion(head: dict, choices: list[CompletionChoice], usage=None) -> Completion:
    """A completion response, or (without usage) one chunk of its stream."""
    return Completion(**head, choices=choices, usage=usage)


async def chat_chunks(head: dict, replies: list[ChoiceReply], events: Events, body: ChatRequest, tokenizer,
                      grounding: assistant.Grounding | None, state: ServerState,
                      adapter: str | None) -> AsyncIterator[ChatCompletionChunk]:
    """A streamed chat reply, per choice: the role (with tools possible, no empty content: a reply of only
    calls joins to content null), content pieces with their tokens' logprobs if asked, tool-call deltas,
    the sources footer when grounded, the finish reason; then the usage if asked. A reply streamed to its
    end is remembered for feedback before the stream ends."""
    for reply in replies:
        first = ChatDelta(role="assistant", content=None if reply.parser else "")
        yield chat_chunk(head, reply.index, first, retrieval=retrieval_of(grounding) if reply.index == 0 else None)
    async for reply, delta in events:
        logprobs = None
        if body.logprobs and reply.tokens > reply.sent_tokens:
            logprobs = chat_logprobs(tokenizer, reply.gen.logprobs[reply.sent_tokens:reply.tokens], body.top_logprobs)
            reply.sent_tokens = reply.tokens
        content = delta.content + (assistant.footer_of(reply.content, grounding) if grounding and reply.ended else "")
        if content or logprobs:
            yield chat_chunk(head, reply.index, ChatDelta(content=content), logprobs=logprobs)
        if delta.calls:
            yield chat_chunk(head, reply.index, ChatDelta(tool_calls=tool_deltas(delta.calls)))
        if reply.ended:
            yield chat_chunk(head, reply.index, ChatDelta(), finish_reason=reply.finish_reason)
    rated = replies[0]   # (not ended: the client left before the end of the stream)
    if rated.ended and not rated.calls:
        footer = assistant.footer_of(rated.content, grounding) if grounding else ""
        remember_reply(state, head, body, rated.content + footer, adapter)
    if body.include_usage:
        yield ChatCompletionChunk(**head, choices=[], usage=usage_of(replies))


async def completion_chunks(head: dict, replies: list[ChoiceReply], events: Events,
                            include_usage: bool) -> AsyncIterator[Completion]:
    """A streamed completion: each choice's pieces, its finish reason, then the usage if asked."""
    async for reply, delta in events:
        if delta.content:
            yield text_completion(head, [CompletionChoice(index=reply.index, text=delta.content)])
        if reply.ended:
            yield text_completion(head, [CompletionChoice(index=reply.index, text="",
                                                          finish_reason=reply.finish_reason)])
    if include_usage:
        yield Completion(**head, choices=[], usage=usage_of(replies))


# --------------------------------------------------------------------------- endpoints
async def ground_chat(state: ServerState, body: ChatRequest) -> assistant.Grounding | None:
    """Retrieval for a chat request, when a knowledge base applies to it (None when none does, and for a
    request with tools or an answer shape: those are a program's, not a reader's)."""
    if body.tools or (body.response_format and body.response_format.type != "text"):
        return None
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
        return declined_reply(state, body, grounding, state.adapter_id)
    messages = assistant.grounded_messages(body.message_dicts(), grounding) if grounding else None
    call = chat_call(body, messages)
    await grammars_ready(state, call.json_mode or call.tools is not None)
    prompt_ids, params = prepare(state, call)
    replies, events = await run_choices(state, request, prompt_ids, params, call.tools)
    adapter = replies[0].adapter   # the adapter of the model that took the request (one may be swapped in since)
    head = response_head("chatcmpl", state.model_id, adapter)
    tokenizer = state.engine.tokenizer
    if body.stream:
        return streaming_response(chat_chunks(head, replies, events, body, tokenizer, grounding, state, adapter))
    await finish(events)
    choices = []
    for r in replies:
        footer = assistant.footer_of(r.content, grounding) if grounding else ""
        logprobs = chat_logprobs(tokenizer, r.gen.logprobs, body.top_logprobs) if body.logprobs else None
        choices.append(ChatChoice(index=r.index, message=chat_message(r, footer), logprobs=logprobs,
                                  finish_reason=r.finish_reason))
    message = choices[0].message
    remember_reply(state, head, body, None if message.tool_calls else message.content, adapter)
    return json_response(chat_completion(head, choices, usage_of(replies), timings_of(replies[0].gen),
                                         retrieval_of(grounding)))


def remember_reply(state: ServerState, head: dict, body: ChatRequest, text: str | None, adapter: str | None):
    """A finished chat reply's text (choice 0, as the client got it; None: only tool calls, nothing to rate)
    kept in memory by the response's id, with the conversation as the client sent it, so that POST
    /v1/feedback can name it. Nothing reaches the disk unless the user rates it."""
    if text is not None:
        conversation = [{"role": m["role"], "content": m["content"]} for m in body.message_dicts()]
        state.remember(head["id"], conversation, text, state.model_id, adapter)


NO_USAGE = Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0)   # a reply the model never ran for


def declined_reply(state: ServerState, body: ChatRequest, grounding: assistant.Grounding, adapter: str | None):
    """Nothing relevant in the knowledge base: the hand-off text, with no generation at all (rated as a reply:
    "it should have answered" is feedback too)."""
    head, retrieval = response_head("chatcmpl", state.model_id, adapter), retrieval_of(grounding)
    remember_reply(state, head, body, grounding.decline_text, adapter)
    if body.stream:
        return streaming_response(declined_chunks(head, grounding.decline_text, retrieval, body.include_usage))
    choice = ChatChoice(index=0, message=ChatMessage(content=grounding.decline_text), finish_reason="stop")
    return json_response(chat_completion(head, [choice], NO_USAGE, retrieval=retrieval))


async def declined_chunks(head: dict, text: str, retrieval: Retrieval,
                          include_usage: bool) -> AsyncIterator[ChatCompletionChunk]:
    """The decline streamed as a reply is: the role (and the retrieval), the text, the finish, the usage."""
    yield chat_chunk(head, 0, ChatDelta(role="assistant", content=""), retrieval=retrieval)
    yield chat_chunk(head, 0, ChatDelta(content=text))
    yield chat_chunk(head, 0, ChatDelta(), finish_reason="stop")
    if include_usage:
        yield ChatCompletionChunk(**head, choices=[], usage=NO_USAGE)


async def completions(request: Request):
    state: ServerState = request.app.state.picochat
    body = await read_request(request, CompletionRequest)
    state.ready()
    await grammars_ready(state, answer_shape(body)[0])
    prompt_ids, params = completion_to_engine(state, body)
    replies, events = await run_choices(state, request, prompt_ids, params)
    head = response_head("cmpl", state.model_id, replies[0].adapter)
    if body.stream:
        return streaming_response(completion_chunks(head, replies, events, body.include_usage))
    await finish(events)
    tokenizer = state.engine.tokenizer
    prefix = tokenizer.decode(prompt_ids) if body.echo else ""
    choices = []
    for r in replies:
        logprobs = None
        if body.logprobs is not None:
            scored = (r.gen.prompt_logprobs if body.echo else []) + r.gen.logprobs
            ids = (prompt_ids if body.echo else []) + [lp.token for lp in r.gen.logprobs]
            logprobs = completion_logprobs(token_entries(tokenizer, scored, body.logprobs),
                                           [tokenizer.decode([t]) for t in ids])
        choices.append(CompletionChoice(index=r.index, text=prefix + r.content, logprobs=logprobs,
                                        finish_reason=r.finish_reason))
    return json_response(text_completion(head, choices, usage_of(replies)))


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
