"""How often a model's tool call is right: the right function with the right arguments, on a fixed set of
tool-use prompts, under tool_choice "auto" (the model decides; the call is constrained once it opens one)
and "required" (a call from the first token) — through the same prompt and grammar path the server uses
(engine/tools.py: the tools through the model's own chat template; tool_parser.py reads the calls back).

    python benchmarks/tool_calls.py                      # the default model and SmolLM2
    python benchmarks/tool_calls.py --models qwen2.5-coder-0.5b --json out/bench/tools.json

A prompt counts as right when the reply's calls are exactly the expected ones (function names in order) and
each expected argument is there with the expected value (strings compared case-insensitively; arguments
the prompt does not fix may be anything); "first calls right" only asks it of as many calls as expected
(a model that repeats a right call is right there, wrong in the first column). Greedy decoding, so a run is
reproducible. Rows: tool_choice auto and required with parallel calls allowed (the API's default), and
required with parallel_tool_calls false.
"""
from __future__ import annotations

import argparse
import json
import time

from common import cpu_line, finish_report, log

TOOLS = [
    {"name": "get_weather", "description": "The weather forecast for a city",
     "parameters": {"type": "object", "properties": {
         "city": {"type": "string", "description": "City name"},
         "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}},
    {"name": "convert_currency", "description": "Convert an amount of money from one currency to another",
     "parameters": {"type": "object", "properties": {
         "amount": {"type": "number"}, "from_currency": {"type": "string", "description": "ISO code, e.g. USD"},
         "to_currency": {"type": "string", "description": "ISO code, e.g. EUR"}},
         "required": ["amount", "from_currency", "to_currency"]}},
    {"name": "send_email", "description": "Send an email",
     "parameters": {"type": "object", "properties": {
         "to": {"type": "string"}, "subject": {"type": "string"}, "body": {"type": "string"}},
         "required": ["to", "subject", "body"]}},
    {"name": "search_files", "description": "Search the user's files for a text",
     "parameters": {"type": "object", "properties": {
         "query": {"type": "string"}, "max_results": {"type": "integer", "minimum": 1, "maximum": 50}},
         "required": ["query"]}},
]

# (prompt, [(function, {argument: expected value})])
CASES = [
    ("What's the weather like in Paris today?", [("get_weather", {"city": "Paris"})]),
    ("Will it rain in Tokyo? Give me the temperature in fahrenheit.", [("get_weather", {"city": "Tokyo", "unit": "fahrenheit"})]),
    ("Weather forecast for Berlin in celsius please.", [("get_weather", {"city": "Berlin", "unit": "celsius"})]),
    ("How much is 100 US dollars in euros?", [("convert_currency", {"amount": 100, "from_currency": "USD", "to_currency": "EUR"})]),
    ("Convert 2500 JPY to GBP.", [("convert_currency", {"amount": 2500, "from_currency": "JPY", "to_currency": "GBP"})]),
    ("I have 42.5 euros, how many Swiss francs (CHF) is that?", [("convert_currency", {"amount": 42.5, "from_currency": "EUR", "to_currency": "CHF"})]),
    ("Email bob@example.com with subject 'Lunch' saying 'See you at noon'.", [("send_email", {"to": "bob@example.com", "subject": "Lunch", "body": "See you at noon"})]),
    ("Send an email to alice@corp.io, subject Report, body: The report is attached.", [("send_email", {"to": "alice@corp.io", "subject": "Report"})]),
    ("Find files mentioning 'invoice 2024'.", [("search_files", {"query": "invoice 2024"})]),
    ("Search my files for 'tax return', at most 5 results.", [("search_files", {"query": "tax return", "max_results": 5})]),
    ("Look up the weather in London and in Madrid.", [("get_weather", {"city": "London"}), ("get_weather", {"city": "Madrid"})]),
    ("Is it sunny in Sydney right now?", [("get_weather", {"city": "Sydney"})]),
    ("Quelle est la météo à Lyon ?", [("get_weather", {"city": "Lyon"})]),
    ("北京今天天气怎么样？", [("get_weather", {"city": "北京|Beijing"})]),
    ("把 300 人民币 (CNY) 换成美元 (USD)。", [("convert_currency", {"amount": 300, "from_currency": "CNY", "to_currency": "USD"})]),
    ("Find my notes about 'quarterly planning'.", [("search_files", {"query": "quarterly planning"})]),
]


def matches(expected, got) -> bool:
    """Whether an argument value is what the prompt asked for ("a|b": either; strings case-insensitive)."""
    if isinstance(expected, str):
        return isinstance(got, str) and got.strip().lower() in {e.lower() for e in expected.split("|")}
    if isinstance(expected, (int, float)):
        return isinstance(got, (int, float)) and not isinstance(got, bool) and abs(got - expected) < 1e-6
    return got == expected


def correct(calls, want) -> bool:
    if [c.name for c in calls] != [name for name, _ in want]:
        return False
    return first_correct(calls, want)


def first_correct(calls, want) -> bool:
    """The first len(want) calls are the expected ones (what follows them is not looked at)."""
    if [c.name for c in calls[:len(want)]] != [name for name, _ in want]:
        return False
    for call, (_, args) in zip(calls, want):
        try:
            got = json.loads(call.arguments)
        except ValueError:
            return False
        if not all(matches(v, got.get(k)) for k, v in args.items()):
            return False
    return True


def score(engine, choice: str, parallel: bool = True) -> dict:
    """Right calls, right first calls, replies with any call, and seconds, over CASES under one tool_choice."""
    from picochat.engine.sampling import SamplingParams
    from picochat.engine.tool_parser import parse_reply
    from picochat.engine.tools import Tool, ToolUse, chat_messages, output_grammar, template_has_tools
    use = ToolUse([Tool(**t) for t in TOOLS], choice, parallel)
    grammar, triggers = output_grammar(engine.grammars, use)
    native = template_has_tools(engine.tokenizer)
    right = first = called = 0
    start = time.perf_counter()
    for prompt, want in CASES:
        messages, kwargs = chat_messages([{"role": "user", "content": prompt}], use, native)
        ids = engine.tokenizer.encode_chat(messages, **kwargs)
        gen = engine.complete(ids, SamplingParams(max_new_tokens=160, temperature=0, grammar=grammar,
                                                  grammar_triggers=triggers))
        _, calls = parse_reply(gen.text, {t["name"] for t in TOOLS})
        called += bool(calls)
        ok = correct(calls, want)
        right += ok
        first += first_correct(calls, want)
        log(f"  [{choice}] {'ok ' if ok else 'BAD'} {prompt[:50]!r} -> {[(c.name, c.arguments) for c in calls]}")
    return {"right": right, "first": first, "called": called, "cases": len(CASES),
            "seconds": time.perf_counter() - start}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["qwen2.5-coder-1.5b", "smollm2"])
    p.add_argument("--json", default=None)
    args = p.parse_args()
    from picochat.engine.engine import Engine
    from picochat.load import load
    print(cpu_line())
    print(f"# {len(CASES)} tool-use prompts, {len(TOOLS)} tools, greedy; right = the expected functions with the "
          "expected arguments\n")
    rows, record, t0 = [], {}, time.perf_counter()
    for name in args.models:
        loaded = load(name)
        engine = Engine(loaded.model, loaded.tokenizer, draft=loaded.draft)
        native = "own template" if "tools" in (loaded.tokenizer.chat_template or "") else "system message"
        for choice, parallel in (("auto", True), ("required", True), ("required", False)):
            label = choice if parallel else f"{choice}, parallel_tool_calls false"
            log(f"{name}, tool_choice {label}")
            r = score(engine, choice, parallel)
            record[f"{name}/{label}"] = r
            n = r["cases"]
            rows.append(f"| {name} | {native} | {label} | {r['right']}/{n} ({100 * r['right'] / n:.0f} %) "
                        f"| {r['first']}/{n} | {r['called']}/{n} | {r['seconds']:.0f} s |")
    table = "\n".join(["| model | tools shown in | tool_choice | right calls | first calls right | replies with a call "
                       "| time |", "|---|---|---|---|---|---|---|", *rows])
    finish_report(table, time.perf_counter() - t0, args.json, record)


if __name__ == "__main__":
    main()
