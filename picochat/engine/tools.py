"""What a chat with tools or an answer shape becomes for the engine: the prompt the model reads (tools
through its own chat template) and the grammar its output keeps to.

A model calls a tool by writing (Qwen2.5 and Hermes's format, which most open models were tuned on)

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

tool_parser.py reads such calls back out of the text. Here the request's `tool_choice` becomes a grammar:

    none       free text with no special token, so not the <tool_call> tag
    auto       free text; once the model opens a call — the tag, or a ```json fence opening the reply —
               the call is constrained: a known function's name and arguments valid under its parameters'
               schema (a grammar started by its trigger)
    required   one or more calls, from the first token
    function   exactly one call of the named function, from the first token — whatever the prompt says

A call may open either way (the model picks: Qwen2.5-Coder-1.5B writes a fenced block by itself, and when
made to use the tags goes on to call again and again); a fenced block holds one call, or a list of them.

A template without a tool section (SmolLM2's) gets the same instructions in its system message, and
earlier calls and results written out as text in that format.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from .grammar import ANY_TEXT, MAX_TOOLS_SCHEMA_BYTES, GrammarCompiler, strict_schema
from .tool_scan import CLOSE as CALL_CLOSE, FENCE_CLOSE, FENCE_OPEN, OPEN as CALL_OPEN   # the markup, one home

FALLBACK_INSTRUCTIONS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}}\n</tool_call>")


@dataclass
class Tool:
    name: str
    description: str = ""
    parameters: dict = field(default_factory=lambda: {"type": "object", "properties": {}})

    def as_openai(self) -> dict:
        """The tool as OpenAI's request holds it (what chat templates render)."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


CHOICES = ("none", "auto", "required", "function")


@dataclass
class ToolUse:
    """A request's tools and how the model may use them: choice "function" calls `function` exactly once
    (a function may itself be named "auto": the name never stands for a mode)."""
    tools: list[Tool]
    choice: str = "auto"            # one of CHOICES
    parallel: bool = True           # several calls in one reply (False: at most one)
    function: str | None = None     # the function to call, with choice "function"

    def __post_init__(self):
        if self.choice not in CHOICES:
            raise ValueError(f"tool choice must be one of {', '.join(CHOICES)}, got {self.choice!r}")
        if (self.function is None) != (self.choice != "function"):
            raise ValueError("a function name goes with tool choice 'function', and only with it")

    @property
    def calls_possible(self) -> bool:
        return bool(self.tools) and self.choice != "none"


def template_has_tools(tokenizer) -> bool:
    """Whether the model's chat template renders `tools` itself (Qwen2.5's does; SmolLM2's does not)."""
    return "tools" in (tokenizer.chat_template or "")


def chat_messages(messages: list[dict], use: ToolUse | None, native: bool, instruction: str | None = None
                  ) -> tuple[list[dict], dict]:
    """The messages and template arguments for a chat with tools (and an answer-shape instruction): for a
    template with a tool section, `tools=` and assistant tool calls as it expects them; for one without,
    the same content written out as text."""
    # with tool_choice "none" a template's own tool section still shows them (the grammar masks out its
    # call tag, a special token; and the prompt stays the prefix the conversation's other turns share),
    # but written-out instructions are left out: a tag spelled in text cannot be masked
    shown = use is not None and bool(use.tools) and (use.choice != "none" or native)
    out = [message_for_template(m, native) for m in messages]
    extra = []
    if shown and not native:
        extra.append(FALLBACK_INSTRUCTIONS.format(tools="\n".join(json.dumps(t.as_openai()) for t in use.tools)))
    if instruction:
        extra.append(instruction)
    if extra:
        out = with_system_note(out, "\n\n".join(extra))
    kwargs = {"tools": [t.as_openai() for t in use.tools]} if shown and native else {}
    return out, kwargs


def message_for_template(message: dict, native: bool) -> dict:
    """One message as the template expects it: a call's arguments as an object (templates write them with
    tojson; a JSON string would be quoted twice); without a tool section, calls and results as text."""
    calls = message.get("tool_calls") or []
    if message.get("role") == "assistant" and calls:
        calls = [{"type": "function", "function": {"name": c["name"], "arguments": _as_object(c["arguments"])}}
                 for c in calls]
        if native:
            return {"role": "assistant", "content": message.get("content") or "", "tool_calls": calls}
        written = "\n".join(f"{CALL_OPEN}\n{json.dumps(c['function'])}\n{CALL_CLOSE}" for c in calls)
        return {"role": "assistant", "content": "\n".join(filter(None, [message.get("content"), written]))}
    if message.get("role") == "tool" and not native:
        return {"role": "user", "content": f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"}
    if message.get("role") == "tool":
        return {"role": "tool", "content": message.get("content") or ""}
    return {"role": message["role"], "content": message.get("content") or ""}


def _as_object(arguments):
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments   # not JSON: rendered as the string it is
    return arguments


def with_system_note(messages: list[dict], note: str) -> list[dict]:
    """The messages with `note` appended to the system message (one is added first if there is none)."""
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{note}"}, *messages[1:]]
    return [{"role": "system", "content": note}, *messages]


def schema_instruction(schema: dict | None) -> str:
    """What the prompt says about an answer shape (the grammar enforces it; the model should know it)."""
    if schema is None:
        return "Answer with a JSON object only."
    return f"Answer with a JSON object only, valid under this JSON schema:\n{json.dumps(schema)}"


# ----------------------------------------------------------------------------- the grammar of the output
def call_schema(tools: list[Tool]) -> dict:
    """One call's JSON: {"name": one of the functions, "arguments": valid under that function's schema}
    (name first: a reader of the stream learns the function before its arguments). Arguments take only
    the properties a schema lists (strict_schema): a small model otherwise invents keys ("description",
    "type") that no function reads."""
    options = [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": strict_schema(t.parameters)},
                "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    return options[0] if len(options) == 1 else {"anyOf": options}


def output_grammar(compiler: GrammarCompiler, use: ToolUse) -> tuple[str | None, tuple[str, ...]]:
    """(grammar, triggers) for a reply under `use`: no triggers when the grammar holds from the first
    token. Raises GrammarError naming what cannot be enforced (a parameters schema it cannot compile)."""
    if not use.calls_possible:
        return compiler.lark(ANY_TEXT), ()
    tools = [t for t in use.tools if t.name == use.function] if use.choice == "function" else use.tools
    open_tag, close_tag = compiler.literal(CALL_OPEN), compiler.literal(CALL_CLOSE)
    several = use.parallel and use.choice != "function"   # a named function: exactly one call
    more = f' ("\\n" {open_tag} "\\n" call "\\n" {close_tag})*' if several else ""
    # a ```json block: what Qwen2.5-Coder writes by itself; one call, or (parallel) a list of them
    fenced = ('(call | "[" call (", " call)* "]")' if several else "call") + f' "\\n{FENCE_CLOSE}"'
    if use.choice == "auto":   # after the model's own opening: the tag anywhere, a fence opening the reply
        start, triggers = f'"\\n" call "\\n" {close_tag}{more} | {fenced}', (CALL_OPEN, "^" + FENCE_OPEN)
    else:
        start, triggers = f'{open_tag} "\\n" call "\\n" {close_tag}{more} | {json.dumps(FENCE_OPEN)} {fenced}', ()
    call = compiler.embedded_json(call_schema(tools), MAX_TOOLS_SCHEMA_BYTES)   # once: the rules refer to it
    return compiler.lark(f"start: {start}\ncall: {call}"), triggers
