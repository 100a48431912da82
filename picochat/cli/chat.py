"""`picochat chat`: a streaming multi-turn chat in the terminal (with --kb, answered from a knowledge base;
with --tools, the model may call a calculator and sandboxed Python, which picochat runs for it)."""
from __future__ import annotations

import sys

from ..apps.assistant import DEFAULT_PERSONA
from .common import (add_kb_args, add_model_args, add_sampling_args, open_engine, open_kb, print_stats,
                     sampling_from_args, show_retrieval, stream)

HELP = "chat in the terminal (streaming, multi-turn)"
MAX_TOOL_ROUNDS = 5   # replies with tool calls in one turn: a model that keeps calling is stopped here

SAMPLING_KNOBS = {  # /set name -> (SamplingParams field, type)
    "temperature": ("temperature", float), "top_k": ("top_k", int), "top_p": ("top_p", float),
    "max_new_tokens": ("max_new_tokens", int), "max_tokens": ("max_new_tokens", int), "seed": ("seed", int),
    "repetition_penalty": ("repetition_penalty", float),
}

CHAT_HELP = """commands:
  /help                 this help
  /clear                forget the conversation (keeps the system prompt)
  /system TEXT          set the system prompt (and start over); '/system' alone removes it
  /set NAME VALUE       change a sampling setting: temperature, top_k, top_p, max_new_tokens, seed,
                        repetition_penalty (seed none = random); '/set' alone shows them
  /exit                 leave (or Ctrl-D); Ctrl-C stops a reply"""


def add_arguments(p):
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    add_kb_args(p, "answer from the knowledge base NAME, citing its passages (see `picochat kb`)")
    p.add_argument("--tools", nargs="*", default=None, metavar="TOOL",
                   help="let the model call built-in tools, which picochat runs and answers: calculator, python "
                        "(in the sandbox); --tools alone: both. -v shows each call and its result")
    p.add_argument("--tool-choice", default="auto", metavar="auto|required|TOOL",
                   help="with --tools: auto (default): the model decides; required: it calls a tool first in "
                        "each turn; TOOL: it calls that tool first in each turn")


def run(args) -> int:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    from ..engine.session import ChatSession
    kb = open_kb(args.kb) if args.kb else None
    tools = tool_use(args.tools, args.tool_choice) if args.tools is not None else None
    if kb is not None and tools is not None:
        raise ValueError("--kb and --tools cannot be used together")
    engine = open_engine(args)
    params = sampling_from_args(args)
    system = args.system
    if kb is not None:  # the knowledge base's persona, then the user's own system prompt
        system = "\n\n".join(p for p in (kb.setting("persona", DEFAULT_PERSONA), args.system) if p)
    chat = ChatSession(engine, system, tools)  # keeps the conversation's KV cache between turns
    print("picochat — type a message, /help for commands, Ctrl-D to leave.", file=sys.stderr)
    while True:
        try:
            text = input(">>> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        if not text:
            continue
        if text.startswith("/"):
            if slash_command(chat, params, text) == "exit":
                return 0
        elif kb is not None:
            grounded_turn(chat, kb, text, params, args)
        elif tools is not None:
            tool_turn(chat, text, params, args.verbose)
        else:
            gen = chat.ask(text, params)
            stream(gen, args.verbose)
            chat.record(gen)


def slash_command(chat, params, text: str) -> str | None:
    """Carry out one /command of the REPL; "exit" when it asks to leave."""
    cmd, _, rest = text.partition(" ")
    rest = rest.strip()
    if cmd in ("/exit", "/quit", "/bye"):
        return "exit"
    if cmd == "/help":
        print(CHAT_HELP)
    elif cmd == "/clear":
        chat.clear()
        print("[conversation cleared]")
    elif cmd == "/system":
        chat.clear(rest or None)
        print(f"[system prompt {'set' if rest else 'removed'}; conversation cleared]")
    elif cmd == "/set":
        set_knob(params, rest)
    else:
        print(f"unknown command {cmd}; /help lists the commands")
    return None


def set_knob(params, rest: str):
    """/set NAME VALUE: change one sampling setting (a value out of range leaves it as it was)."""
    if not rest:
        print("  " + "  ".join(f"{k}={getattr(params, k)}" for k in
                               ("temperature", "top_k", "top_p", "max_new_tokens", "seed", "repetition_penalty")))
        return
    name, _, value = rest.partition(" ")
    if name not in SAMPLING_KNOBS or not value.strip():
        print(f"usage: /set NAME VALUE with NAME one of {', '.join(SAMPLING_KNOBS)}")
        return
    field_name, kind = SAMPLING_KNOBS[name]
    old = getattr(params, field_name)
    try:
        setattr(params, field_name, None if value.strip() == "none" and field_name == "seed" else kind(value.strip()))
        params.validate()
    except ValueError as e:
        setattr(params, field_name, old)
        print(f"[not changed: {e}]")
        return
    print(f"[{field_name} = {getattr(params, field_name)}]")


def grounded_turn(chat, kb, text: str, params, args):
    """One chat turn answered from a knowledge base: retrieval (shown with -v), then the reply and its
    sources — or the hand-off when nothing relevant is found."""
    from ..apps import assistant
    grounding = assistant.ground(kb, text, k=args.top_k_passages, min_similarity=args.min_similarity)
    if args.verbose:
        show_retrieval(grounding)
    if grounding.declined:
        print(grounding.decline_text)
        return
    gen = chat.ask(grounding.prompt, params)
    stream(gen, args.verbose)
    print(assistant.footer_of(gen.text, grounding).strip())
    chat.record(gen)


# ----------------------------------------------------------------------------- tools
def tool_use(names: list[str], choice: str):
    """The ToolUse of --tools NAMES... (none named: all built-ins) and --tool-choice."""
    from ..apps.agent_tools import tools_named
    from ..engine.tools import ToolUse
    tools = tools_named(names)
    if choice not in ("auto", "required", *(t.name for t in tools)):
        raise ValueError(f"--tool-choice must be auto, required or one of the tools "
                         f"({', '.join(t.name for t in tools)}), got {choice!r}")
    if choice in ("auto", "required"):
        return ToolUse(tools, choice)
    return ToolUse(tools, "function", function=choice)


def tool_turn(chat, text: str, params, verbose: bool):
    """One turn in which the model may call tools: each reply's calls are run (shown with -v) and their
    results fed back, until it answers without a call — at most MAX_TOOL_ROUNDS replies."""
    from ..apps.agent_tools import run_tool
    enabled = [t.name for t in chat.tools.tools]
    used, answered = [], {}   # (name, arguments) -> the result it got this turn
    try:
        gen = chat.ask(text, params)
        for round_ in range(MAX_TOOL_ROUNDS):
            interrupted = stream_content(gen, set(enabled), verbose)
            calls = chat.record(gen)
            if interrupted or not calls:
                break
            if all((c.name, c.arguments) in answered for c in calls):   # a small model asking again: show what
                for c in calls:                                         # it has, rather than loop
                    print(f"[{c.name} answered: {answered[c.name, c.arguments]}]")
                break
            results = [(call, run_tool(call, enabled)) for call in calls]
            answered.update(((call.name, call.arguments), result) for call, result in results)
            for call, result in results:
                used.append(call.name)
                if verbose:
                    show_call(call, result)
            chat.add_tool_results(results)
            if round_ == MAX_TOOL_ROUNDS - 1:
                print(f"[the model was still calling tools after {MAX_TOOL_ROUNDS} rounds; stopped it]")
                break
            gen = chat.resume(params)
    except KeyboardInterrupt:   # while a tool ran: the turn ends here, its calls unanswered
        print(" [stopped]")
    except ValueError as e:     # the results left no room in the context: the next turn may fit again
        print(f"[the turn could not go on: {e}]")
    if used and not verbose:
        print(f"(used {', '.join(dict.fromkeys(used))})", file=sys.stderr)


def stream_content(gen, tool_names: set[str], verbose: bool) -> bool:
    """Print a reply's text as it streams, without its tool calls (their tags and JSON); Ctrl-C stops it.
    Returns whether it was interrupted."""
    from ..engine.tool_parser import ToolCallParser
    parser, shown, interrupted = ToolCallParser(tool_names, fenced_calls=True), False, False
    try:
        for piece in gen:
            shown |= write(parser.feed(piece).content)
    except KeyboardInterrupt:
        interrupted = True
        shown |= write(" [stopped]")
    shown |= write(parser.finish().content)
    if shown:
        sys.stdout.write("\n")
    if verbose:
        print_stats(gen)
    return interrupted


def write(text: str) -> bool:
    sys.stdout.write(text)
    sys.stdout.flush()
    return bool(text)


def show_call(call, result: str):
    """-v: `[tool] calculator({"expression": "2+2"}) → 4`, a result's further lines indented below."""
    indent = "\n" + " " * len("[tool] ")
    print(f"[tool] {call.name}({call.arguments}) → {indent.join(result.splitlines()) or '(empty)'}", file=sys.stderr)
