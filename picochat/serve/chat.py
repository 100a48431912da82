"""The one chat path under both chat APIs (OpenAI's /v1/chat/completions and Anthropic's /v1/messages):
a ChatCall — the conversation, tools and answer shape in the engine's terms — becomes prompt ids and one
SamplingParams per choice (`prepare`), runs on the Batcher (`run_choices`: the choices share one prefill),
and comes back as each choice's text parsed into content and tool calls (`ChoiceReply`). The endpoints
only translate their request into a ChatCall and these replies into their response shapes.

Everything the grammar engine cannot enforce is refused here, before the engine sees the request, as a 400
naming the field (never a 200 with unconstrained output).
"""
from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field
from typing import AsyncIterator

from fastapi import Request

from ..engine.batcher import QueueFull
from ..engine.generation import Generation
from ..engine.grammar import GrammarError
from ..engine.sampling import SamplingParams
from ..engine.tool_parser import ParsedDelta, ToolCall, ToolCallParser
from ..engine.tools import ToolUse, chat_messages, output_grammar, schema_instruction, template_has_tools
from .protocol import APIError
from .state import ServerState


@dataclass
class ChatCall:
    """What a chat request asks of the engine, whichever API it came through."""
    messages: list[dict]                   # {role, content, tool_calls: [{id, name, arguments}], tool_call_id}
    sampling: SamplingParams               # the settings every choice shares (its seed: the first choice's)
    max_tokens: int | None = None          # None: up to the end of the context
    tools: ToolUse | None = None
    json_mode: bool = False                # answer with a JSON object ...
    schema: dict | None = None             # ... valid under this schema
    strict: bool = False                   # OpenAI's strict: objects take only their listed properties
    n: int = 1


def check_tool_choice(use: ToolUse, param: str = "tool_choice"):
    """A tool_choice the tools can honour: 'required' or a name needs tools, a name must be one of them."""
    names = [t.name for t in use.tools]
    if len(set(names)) != len(names):
        raise APIError(400, "two tools have the same name", "tools")
    if use.choice in ("none", "auto"):
        return
    if not use.tools:
        raise APIError(400, f"tool_choice '{use.function or use.choice}' needs 'tools'", param)
    if use.choice == "function" and use.function not in names:
        raise APIError(400, f"tool_choice names the function '{use.function}', which is not among the tools "
                            f"({', '.join(names)})", param)


async def grammars_ready(state: ServerState, needed: bool):
    """Build the grammar engine's view of the vocabulary (~1 s for 150k tokens, once) on the engine's
    thread, between steps, before a request that needs it; after that, compiling a grammar takes ~1 ms and
    is done where the request is handled (never queued behind other model work)."""
    if needed and not state.engine.grammars_built:
        await state.on_engine_thread(lambda: state.engine.grammars)


def prepare(state: ServerState, call: ChatCall) -> tuple[list[int], list[SamplingParams]]:
    """Prompt ids (the chat template over the messages, tools and answer shape) and each choice's
    settings (the first choice's seed, then seed + 1, ...; the grammar compiled and checked). After
    `grammars_ready` when the call has tools or an answer shape."""
    engine = state.engine
    grammar, triggers = compile_grammar(engine, call)   # first: the tools' size is checked here
    instruction = schema_instruction(call.schema) if call.json_mode else None
    messages, kwargs = chat_messages(call.messages, call.tools, template_has_tools(engine.tokenizer), instruction)
    try:
        prompt_ids = engine.tokenizer.encode_chat(messages, **kwargs)
    except ValueError as e:
        raise APIError(400, f"cannot render the chat template: {e}", "messages") from None
    params = sampling_for(call.sampling, prompt_ids, state.ready().max_len, call.max_tokens)
    params.grammar, params.grammar_triggers = grammar, triggers
    return prompt_ids, choices_of(params, call.n)


def choices_of(params: SamplingParams, n: int) -> list[SamplingParams]:
    """The settings of n choices: the same but for the seed (seed, seed + 1, ...: different choices that
    a request can reproduce)."""
    seed = params.seed
    return [dataclasses.replace(params, seed=None if seed is None else seed + i, stop=list(params.stop))
            for i in range(n)]


def sampling_for(base: SamplingParams, prompt_ids: list[int], context: int, max_tokens: int | None) -> SamplingParams:
    """`base` with max_new_tokens checked against the context (None: up to its end)."""
    if len(prompt_ids) + (max_tokens or 1) > context or len(prompt_ids) >= context:
        raise APIError(400, f"the prompt has {len(prompt_ids)} tokens and max_tokens is {max_tokens or 1}: together "
                            f"they exceed the model's context of {context} tokens", "max_tokens",
                       "context_length_exceeded")
    return dataclasses.replace(base, max_new_tokens=context - len(prompt_ids) if max_tokens is None else max_tokens,
                               stop=list(base.stop))


def compile_grammar(engine, call: ChatCall) -> tuple[str | None, tuple[str, ...]]:
    """(grammar, triggers) for the reply (none for a plain chat: the grammar engine is not even made); a
    schema or a tool's parameters the engine cannot enforce is a 400 naming it."""
    if call.json_mode:
        return answer_grammar(engine.grammars, call.schema, call.strict), ()
    if call.tools is None:
        return None, ()
    compiler = engine.grammars
    try:
        grammar = output_grammar(compiler, call.tools)
    except GrammarError as e:
        failed = e
    else:
        if call.tools.calls_possible:   # all the tools compiled in one grammar: each is enforceable
            return grammar
        failed = None                   # "none" leaves the schemas out of the grammar: check them one by one
    for i, tool in enumerate(call.tools.tools):   # which tool's parameters the engine cannot enforce
        try:
            compiler.json_schema(tool.parameters, strict=True)   # as the call grammar holds it
        except GrammarError as e:
            raise APIError(400, f"the parameters of '{tool.name}' cannot be enforced: {e}",
                           f"tools[{i}].function.parameters") from None
    if failed is not None:
        raise APIError(400, f"the tools cannot be enforced together: {failed}", "tools") from None
    return grammar


def answer_grammar(compiler, schema: dict | None, strict: bool) -> str:
    """The grammar of a JSON answer (any object when there is no schema); 400 naming the schema if the
    engine cannot enforce it (its message names the keyword)."""
    try:
        return compiler.json_schema(schema or {"type": "object"}, strict=strict)
    except GrammarError as e:
        raise APIError(400, f"the schema cannot be enforced: {e}", "response_format.json_schema.schema") from None


# ----------------------------------------------------------------------------- running and reading back
@dataclass
class ChoiceReply:
    """One choice as it comes back: its generation, and its text parsed into content and tool calls."""
    index: int
    gen: Generation
    parser: ToolCallParser | None            # None: no tools, all text is content
    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)
    tokens: int = 0                          # tokens generated when the last piece was reported
    sent_tokens: int = 0                     # tokens whose logprobs have been reported
    ended: bool = False
    adapter: str | None = None               # the adapter of the model that wrote it (None: the base)

    def parse(self, piece: str) -> ParsedDelta:
        delta = self.parser.feed(piece) if self.parser else ParsedDelta(content=piece)
        return self._record(delta)

    def finish(self) -> ParsedDelta:
        return self._record(self.parser.finish() if self.parser else ParsedDelta())

    def _record(self, delta: ParsedDelta) -> ParsedDelta:
        self.content += delta.content
        for d in delta.calls:
            if d.index == len(self.calls):
                self.calls.append(ToolCall(d.id or "", d.name or "", ""))
            self.calls[d.index].arguments += d.arguments
        return delta

    @property
    def finish_reason(self) -> str | None:
        """The generation's, except that a reply whose calls are complete ends with 'tool_calls'."""
        reason = self.gen.finish_reason
        return "tool_calls" if self.calls and reason == "stop" else reason


Events = AsyncIterator[tuple[ChoiceReply, ParsedDelta]]   # each choice's parsed pieces as they come


async def run_choices(state: ServerState, request: Request, prompt_ids: list[int], params: list[SamplingParams],
                      tools: ToolUse | None = None) -> tuple[list[ChoiceReply], Events]:
    """Submit the choices to the batcher. Returns (replies, events): events yields (reply, delta) as pieces
    come — the last delta of each choice once it has ended — and raises APIError if a generation failed.
    A full queue or a bad request raises here, before any response starts."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def on_event(gen, piece):  # on the batcher thread
        loop.call_soon_threadsafe(queue.put_nowait, (gen, piece, len(gen.token_ids)))
    try:
        handles, adapter = state.submit_choices(prompt_ids, params, on_event, timeout=state.request_timeout)
    except QueueFull as e:
        raise APIError(503, str(e), type="server_error", code="queue_full") from None
    except ValueError as e:
        raise APIError(400, str(e)) from None
    names = {t.name for t in tools.tools} if tools and tools.calls_possible else None
    # under tools the grammar holds a ```json block opening the reply to a call: it streams as one
    replies = [ChoiceReply(i, h.gen, ToolCallParser(names, fenced_calls=True) if names is not None else None,
                           adapter=adapter) for i, h in enumerate(handles)]
    return replies, events_of(state, request, handles, replies, queue)


async def events_of(state: ServerState, request: Request, handles, replies: list[ChoiceReply],
                    queue: asyncio.Queue) -> Events:
    """The choices' parsed pieces as the batcher reports them. A client gone away (a cancelled stream, or a
    disconnect noticed while waiting) cancels every choice."""
    by_gen = {id(r.gen): r for r in replies}
    running = len(replies)
    try:
        while running:
            try:
                gen, piece, tokens = await asyncio.wait_for(queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return
                continue
            reply = by_gen[id(gen)]
            reply.tokens = tokens
            if piece is not None:
                yield reply, reply.parse(piece)
                continue
            running -= 1
            reply.ended = True
            if (gen.finish_reason or "").startswith("error"):
                raise generation_error(gen.finish_reason)   # (the other choices are cancelled below)
            yield reply, reply.finish()
    finally:
        for handle in handles if running else []:
            state.batcher.cancel(handle)
        count_usage(state, replies)


def count_usage(state: ServerState, replies: list[ChoiceReply]):
    state.prompt_tokens += replies[0].gen.stats.prompt_tokens   # one prompt, prefilled once
    state.completion_tokens += sum(r.gen.stats.completion_tokens for r in replies)


def generation_error(finish_reason: str) -> APIError:
    """The API error for a generation that ended with finish_reason 'error: ...'."""
    reason = finish_reason.removeprefix("error: ")
    if reason.startswith("timed out"):
        return APIError(504, f"the request {reason} (the server's limit is set by --timeout)",
                        type="server_error", code="timeout")
    if "shutting down" in reason:
        return APIError(503, reason, type="server_error", code="shutting_down")
    return APIError(500, f"generation failed: {reason}", type="server_error")


async def finish(events: Events) -> None:
    async for _ in events:
        pass
