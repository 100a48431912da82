"""The tool-call parser: every split of a reply streams to what the whole reply parses to, no tag leaks into
content, deltas have OpenAI's shape, bare and fenced JSON calls, malformed and cut-off calls, linear time."""
import itertools
import json
import random
import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from picochat.engine.tool_parser import (
    CLOSE,
    OPEN,
    ParsedDelta,
    ToolCall,
    ToolCallDelta,
    ToolCallParser,
    join_deltas,
    new_call_id,
    parse_reply,
)

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
TRICKY_ARGS = '{"q": "say \\"hi\\" {x} [y", "odd": "\\"{", "k\\"ey": 1, "path": "C:\\\\dir\\\\", "n": [1, {"b": "}"}], "ok": null}'
CALL = f"<tool_call>\n{WEATHER}\n</tool_call>"

# (reply, content, [(name, arguments)]) — what parse_reply must give
CASES = [
    ("Hello, world!", "Hello, world!", []),
    ("a < b, <tool> and </tool_ x <tool_calls> <", "a < b, <tool> and </tool_ x <tool_calls> <", []),
    ("   ", "   ", []),
    ("<tool_ call", "<tool_ call", []),
    (CALL + "\n</tool \nok", "\n</tool \nok", [("get_weather", '{"city": "Paris"}')]),
    (CALL, "", [("get_weather", '{"city": "Paris"}')]),
    ("Let me check.\n" + CALL, "Let me check.\n", [("get_weather", '{"city": "Paris"}')]),
    ("\n" + CALL + "\n\n" + CALL + "\n", "", [("get_weather", '{"city": "Paris"}')] * 2),
    (CALL + "\nIt is sunny.", "\nIt is sunny.", [("get_weather", '{"city": "Paris"}')]),
    ("\n " + CALL + "\nDone", "\nDone", [("get_weather", '{"city": "Paris"}')]),
    (f'<tool_call>{{"name": "search", "arguments": {TRICKY_ARGS}}}</tool_call>', "", [("search", TRICKY_ARGS)]),
    (f'<tool_call>{{"arguments": {TRICKY_ARGS}, "name": "search"}}</tool_call>', "", [("search", TRICKY_ARGS)]),
    ('<tool_call>{"name": "f", "parameters": {"a": 1}}</tool_call>', "", [("f", '{"a": 1}')]),
    ('<tool_call>{"name":"now","arguments":{}}</tool_call><tool_call>{"name":"f","arguments":{"x":[]}}</tool_call>',
     "", [("now", "{}"), ("f", '{"x":[]}')]),
    ('<tool_call>{"name": "now"}</tool_call>', "", [("now", "{}")]),
    ('<tool_call>{"name": "f", "arguments": null}</tool_call>', "", [("f", "null")]),   # verbatim, even if odd
    ('<tool_call>{"name": "f", "arguments": {\n  "a" :  1\n}  }</tool_call>', "", [("f", '{\n  "a" :  1\n}')]),
    ('<tool_call>{"id": "x1", "name": "f\\u00e9", "arguments": {"a": "é"}, "arguments": [3, 4]}</tool_call>',
     "", [("fé", '{"a": "é"}')]),
    ("<tool_call>not json</tool_call> after", "not json after", []),
    ("<tool_call>{}</tool_call>", "{}", []),
    ('<tool_call>{"arguments": {"a": 1}}</tool_call>', '{"arguments": {"a": 1}}', []),
    ('<tool_call>{"name": "f", oops}</tool_call>ok', "ok", [("f", "{}")]),
    ('<tool_call>{"name": "f", "arguments": {"a": "Par', "", [("f", '{"a": "Par')]),
    ('<tool_call>{"nam', "", []),
    ('x<tool_call>{"name": "f", "arguments": {}}\nand more', "x\nand more", [("f", "{}")]),
    ("stray </tool_call>close", "stray close", []),
    ('查一下天气。\n<tool_call>{"name": "天气", "arguments": {"城市": "北京"}}</tool_call>',
     "查一下天气。\n", [("天气", '{"城市": "北京"}')]),
    (WEATHER, "", [("get_weather", '{"city": "Paris"}')]),
    ("  ```json\n" + WEATHER + "\n```\n", "", [("get_weather", '{"city": "Paris"}')]),
    ('[{"name": "f", "parameters": {"a": "é"}}, {"name": "g", "arguments": {}}]', "",
     [("f", '{"a": "é"}'), ("g", "{}")]),
    ('{"answer": 42}', '{"answer": 42}', []),
    ('{"name": "f", "arguments": {}} trailing', '{"name": "f", "arguments": {}} trailing', []),
    ("```python\nprint(1)\n```", "```python\nprint(1)\n```", []),
    ("```" + " " * 20 + "json\n" + WEATHER + "```", "```" + " " * 20 + "json\n" + WEATHER + "```", []),
    ("``not a fence", "``not a fence", []),
    ('{"a": 1}\n' + CALL, '{"a": 1}\n', [("get_weather", '{"city": "Paris"}')]),
]


def ids():
    """A make_id that counts, so a stream and a whole parse can be compared call for call."""
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def stream(text: str, cuts, tool_names=None, fenced_calls=False) -> tuple[list[ParsedDelta], ToolCallParser]:
    parser = ToolCallParser(tool_names, make_id=ids(), fenced_calls=fenced_calls)
    bounds = [0, *sorted(cuts), len(text)]
    deltas = [parser.feed(text[a:b]) for a, b in itertools.pairwise(bounds)]
    return deltas + [parser.finish()], parser


def check_stream(text: str, cuts, tool_names=None, fenced_calls=False):
    """The stream cut at `cuts` joins to parse_reply, in OpenAI's delta shape, with no tag in its content."""
    deltas, _ = stream(text, cuts, tool_names, fenced_calls)
    whole = parse_reply(text, tool_names, make_id=ids(), fenced_calls=fenced_calls)
    assert join_deltas(deltas) == whole, (text, cuts)
    seen = set()
    for call in (c for d in deltas for c in d.calls):
        if call.index in seen:
            assert call.id is None and call.name is None, (text, cuts)
        else:
            assert call.index == len(seen) and call.id and call.name, (text, cuts)
            seen.add(call.index)
    content = "".join(d.content for d in deltas)
    assert OPEN not in content and CLOSE not in content


@pytest.mark.parametrize("text, content, calls", CASES)
def test_parse_reply_gives_the_expected_content_and_calls(text, content, calls):
    got_content, got_calls = parse_reply(text, make_id=ids())
    assert got_content == content
    assert [(c.name, c.arguments) for c in got_calls] == calls
    assert [c.id for c in got_calls] == [f"call_{i}" for i in range(len(calls))]
    for call in got_calls:
        if call.arguments.endswith("}"):
            json.loads(call.arguments)


def check_every_split(text: str, fenced_calls=False):
    n = len(text)
    check_stream(text, range(1, n), fenced_calls=fenced_calls)      # one character at a time
    for cut in range(n + 1):
        check_stream(text, [cut], fenced_calls=fenced_calls)
    step = 1 if n <= 90 else 3                           # every pair for short texts, every third for long
    for a in range(0, n + 1, step):
        for b in range(a, n + 1, step):
            check_stream(text, [a, b], fenced_calls=fenced_calls)


@pytest.mark.parametrize("text", [case[0] for case in CASES])
def test_every_split_and_every_pair_of_splits_streams_the_same(text):
    check_every_split(text)


CUT_OFF = ('"na', '"nam', '"Par')   # replies that end inside a call would swallow what is joined after them
LONG = "\n".join(text for text, *_ in CASES if text.lstrip()[:1] not in "{[`" and not text.endswith(CUT_OFF))
FENCED_LIST = "```json\n" + f'[{WEATHER}, {{"name": "g", "parameters": {{"q": "[x]"}}}}]' + "\n```"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(0, len(LONG)), max_size=40), st.sampled_from([LONG, FENCED_LIST, "{" + LONG]))
def test_random_chunkings_of_long_replies_stream_the_same(cuts, text):
    check_stream(text, [c for c in cuts if c <= len(text)])


def test_random_chunkings_with_tool_names():
    rng = random.Random(0)
    for text, *_ in CASES:
        for _ in range(20):
            cuts = rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 8)))
            check_stream(text, cuts, tool_names={"get_weather"})


def test_a_partial_tag_is_held_until_ruled_in_or_out():
    parser = ToolCallParser(make_id=ids())
    assert parser.feed("Hello <tool_").content == "Hello "
    assert parser.feed("x").content == "<tool_x"
    assert parser.feed(" a <").content == " a "
    assert parser.feed(" b").content == "< b"
    assert parser.feed("</tool_ca").content == ""
    assert parser.feed("rd>").content == "</tool_card>"
    assert parser.feed("<tool_call").content == ""
    assert parser.feed('>{"name": "f"').calls[0].name == "f"
    parser = ToolCallParser()
    assert parser.feed("ends with <").content == "ends with "
    assert parser.finish().content == "<"


def test_arguments_stream_as_they_arrive_and_the_name_is_sent_once():
    parser = ToolCallParser(make_id=ids())
    assert parser.feed("<tool_call>\n").calls == []
    first = parser.feed('{"name": "get_weather", "arguments": {"city": "Pa').calls
    assert [(c.index, c.id, c.name, c.arguments) for c in first] == [(0, "call_0", "get_weather", '{"city": "Pa')]
    later = parser.feed('ris"}}\n</tool_call>\n<tool_call>{"name": "g", ').calls
    assert [(c.index, c.id, c.name, c.arguments) for c in later] == [(0, None, None, 'ris"}'), (1, "call_1", "g", "")]
    assert [(c.index, c.arguments) for c in parser.finish().calls] == [(1, "{}")]


def test_arguments_before_the_name_wait_for_it():
    parser = ToolCallParser(make_id=ids())
    assert parser.feed('<tool_call>{"arguments": {"a": [1, 2]}, ').calls == []
    calls = parser.feed('"name": "f"}</tool_call>').calls
    assert [(c.index, c.id, c.name, c.arguments) for c in calls] == [(0, "call_0", "f", '{"a": [1, 2]}')]


def test_malformed_json_is_content_unless_the_name_was_sent():
    assert parse_reply("Hi <tool_call>\nnot json\n</tool_call>") == ("Hi \nnot json\n", [])
    parser = ToolCallParser(make_id=ids())
    sent = parser.feed('<tool_call>{"name": "f", "arguments": {"a": 1}')
    rest = [parser.feed(" garbage}</tool_call>Done"), parser.finish()]
    assert join_deltas([sent, *rest]) == ("Done", [ToolCall("call_0", "f", '{"a": 1}')])
    assert all(d.calls == [] for d in rest)


def test_a_call_cut_before_its_name_is_dropped_and_recorded():
    parser = ToolCallParser(make_id=ids())
    deltas = [parser.feed('Wait.<tool_call>{"arguments": {"a": 1}, "na'), parser.finish()]
    assert join_deltas(deltas) == ("Wait.", [])
    assert parser.dropped == ['{"arguments": {"a": 1}, "na']
    parser = ToolCallParser(make_id=ids())   # a named call cut in its arguments ends as sent
    deltas = [parser.feed('<tool_call>{"name": "f", "arguments": {"a": "x'), parser.finish()]
    assert join_deltas(deltas) == ("", [ToolCall("call_0", "f", '{"a": "x')]) and parser.dropped == []


def test_bare_and_fenced_json_is_held_until_finish():
    parser = ToolCallParser(make_id=ids())
    held = [parser.feed(piece) for piece in ["\n", "```", "json\n", WEATHER[:20], WEATHER[20:], "\n```"]]
    assert all(d == ParsedDelta() for d in held)
    end = parser.finish()
    assert [(c.index, c.id, c.name, c.arguments) for c in end.calls] == [(0, "call_0", "get_weather",
                                                                            '{"city": "Paris"}')]
    parser = ToolCallParser()   # a code fence in another language streams at once
    assert parser.feed("```python\nprint(").content == "```python\nprint("


def test_tool_names_filter_bare_calls_only():
    assert parse_reply(WEATHER, {"get_weather"}, ids())[1][0].name == "get_weather"
    assert parse_reply(WEATHER, {"search"}, ids()) == (WEATHER, [])
    both = f'[{WEATHER}, {{"name": "search", "arguments": {{}}}}]'
    assert parse_reply(both, {"get_weather"}, ids()) == (both, [])
    assert parse_reply(CALL, {"search"}, ids())[1][0].name == "get_weather"   # tagged: a call whatever its name


def test_feeding_after_finish_is_an_error():
    parser = ToolCallParser()
    parser.finish()
    with pytest.raises(RuntimeError):
        parser.feed("x")
    with pytest.raises(RuntimeError):
        parser.finish()


def test_call_ids_look_like_openais():
    first, second = new_call_id(), new_call_id()
    assert re.fullmatch(r"call_[0-9a-f]{24}", first) and first != second


@pytest.mark.parametrize("text", [
    "Some text, a < b; " * 11_112,
    '<tool_call>{"name": "f", "arguments": {"code": "' + 'x\\"{[' * 40_000 + '"}}</tool_call>',
    '<tool_call>{"arguments": {"v": [' + "1, " * 66_667 + "2]}, " + '"name": "f"}</tool_call>',
    '{"name": "f", "arguments": {"code": "' + "y" * 200_000 + '"}}',
], ids=["text", "arguments", "arguments-before-name", "bare-call"])
def test_feeding_200_kb_one_character_at_a_time_is_linear(text):
    parser = ToolCallParser()
    start = time.perf_counter()
    deltas = [parser.feed(ch) for ch in text]
    deltas.append(parser.finish())
    elapsed = time.perf_counter() - start
    content, calls = join_deltas(deltas)
    assert len(content) + sum(len(c.arguments) for c in calls) >= 190_000
    assert elapsed < 4.0, f"{elapsed:.2f} s for {len(text)} characters: quadratic?"


# ----------------------------------------------------------------------------- fenced call blocks (fenced_calls=True)
FENCE = "```json\n"
F_ONE = FENCE + WEATHER + "\n```"
SEARCH = '{"name": "search", "arguments": {"q": "rain"}}'
PARIS = ("get_weather", '{"city": "Paris"}')


def as_text(reply):
    """What a reply parses to when none of it is a call."""
    return reply, []


# (reply, content and calls with fenced_calls=True, content and calls without: what the code gave before the option)
FENCED_CASES = [
    (F_ONE, ("", [PARIS]), ("", [PARIS])),
    (FENCE + f"[{WEATHER}, {SEARCH}]\n```", ("", [PARIS, ("search", '{"q": "rain"}')]),
     ("", [PARIS, ("search", '{"q": "rain"}')])),
    (FENCE + '{"name": "now", "arguments": {}}\n```', ("", [("now", "{}")]), ("", [("now", "{}")])),
    (FENCE + '[{"name": "now", "arguments": {}}, {"name": "f", "arguments": {"a": 1}}]\n```',
     ("", [("now", "{}"), ("f", '{"a": 1}')]), ("", [("now", "{}"), ("f", '{"a": 1}')])),
    (F_ONE + "\n\nIt is sunny.", ("It is sunny.", [PARIS]), as_text(F_ONE + "\n\nIt is sunny.")),
    ("\n  " + F_ONE, ("", [PARIS]), ("", [PARIS])),
    (FENCE + '{"arguments": {"a": [1, 2]}, "name": "f"}\n```', ("", [("f", '{"a": [1, 2]}')]),
     ("", [("f", '{"a": [1, 2]}')])),
    (FENCE + '{"name": "get_weather", "arguments": {"city": "Pa', ("", [("get_weather", '{"city": "Pa')]),
     as_text(FENCE + '{"name": "get_weather", "arguments": {"city": "Pa')),
    (FENCE + '{"answer": 42}\n```', as_text(FENCE + '{"answer": 42}\n```'), as_text(FENCE + '{"answer": 42}\n```')),
    (FENCE + "not json\n```\nok", as_text(FENCE + "not json\n```\nok"), as_text(FENCE + "not json\n```\nok")),
    (FENCE + "[]\n```", as_text(FENCE + "[]\n```"), as_text(FENCE + "[]\n```")),
    (FENCE + '{"name": 1}\n```', as_text(FENCE + '{"name": 1}\n```'), as_text(FENCE + '{"name": 1}\n```')),
    ("```python\nprint(1)\n```", as_text("```python\nprint(1)\n```"), as_text("```python\nprint(1)\n```")),
    (FENCE + '{"name": "now"}\n```', ("", [("now", "{}")]), as_text(FENCE + '{"name": "now"}\n```')),
    (FENCE + '{"name": "f", "parameters": {"a": 1}}\n```', ("", [("f", '{"a": 1}')]), ("", [("f", '{"a": 1}')])),
    (FENCE + WEATHER, ("", [PARIS]), as_text(FENCE + WEATHER)),
    (FENCE + '{"name": "f", "arguments": {"a": 1}, oops}\n```Done', ("Done", [("f", '{"a": 1}')]),
     as_text(FENCE + '{"name": "f", "arguments": {"a": 1}, oops}\n```Done')),
    (FENCE + '{"name": "f", oops}\n``` ok', ("ok", [("f", "{}")]), as_text(FENCE + '{"name": "f", oops}\n``` ok')),
    (F_ONE + "\n" + CALL, ("", [PARIS, PARIS]), (F_ONE + "\n", [PARIS])),
    (FENCE + f'[{WEATHER}, {{"oops": 1}}]\n```ok', ("ok", [PARIS]), as_text(FENCE + f'[{WEATHER}, {{"oops": 1}}]\n```ok')),
    (FENCE + WEATHER + " extra\n```", (" extra\n```", [PARIS]), as_text(FENCE + WEATHER + " extra\n```")),
    (FENCE + f"[{WEATHER} {WEATHER}]```\n<tool_call>", ("", [PARIS]),
     (FENCE + f"[{WEATHER} {WEATHER}]```\n", [])),
    (FENCE, ("", []), as_text(FENCE)),
    (FENCE + '{"nam', ("", []), as_text(FENCE + '{"nam')),
    ("``` json\n" + WEATHER + "\n```", ("", [PARIS]), ("", [PARIS])),
    ("```JSON\n" + WEATHER + "\n```", ("", [PARIS]), ("", [PARIS])),
    ("```json{" + WEATHER[1:], as_text("```json{" + WEATHER[1:]), as_text("```json{" + WEATHER[1:])),
    ("```js", as_text("```js"), as_text("```js")),
    ("`", as_text("`"), as_text("`")),
]


def parsed(text, fenced_calls):
    content, calls = parse_reply(text, make_id=ids(), fenced_calls=fenced_calls)
    assert [c.id for c in calls] == [f"call_{i}" for i in range(len(calls))]
    return content, [(c.name, c.arguments) for c in calls]


@pytest.mark.parametrize("text, fenced, plain", FENCED_CASES)
def test_fenced_calls_parse_as_calls_only_with_the_option(text, fenced, plain):
    assert parsed(text, fenced_calls=True) == fenced
    assert parsed(text, fenced_calls=False) == plain


@pytest.mark.parametrize("text", [case[0] for case in FENCED_CASES])
def test_every_split_of_a_fenced_reply_streams_the_same(text):
    check_every_split(text, fenced_calls=True)


FENCED_LONG = ("\n" + FENCE + f'[{{"arguments": {TRICKY_ARGS}, "name": "search"}}, {WEATHER}, '
               + '{"name": "now", "arguments": {}}]\n```\n\n' + LONG)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(0, len(FENCED_LONG)), max_size=40), st.sampled_from([FENCED_LONG, FENCED_LIST, LONG]))
def test_random_chunkings_of_long_fenced_replies_stream_the_same(cuts, text):
    check_stream(text, [c for c in cuts if c <= len(text)], fenced_calls=True)


def test_a_fenced_call_is_sent_before_its_block_closes():
    parser = ToolCallParser(make_id=ids(), fenced_calls=True)
    assert parser.feed("```js") == ParsedDelta()          # a prefix of the fence: held
    assert parser.feed("on\n") == ParsedDelta()
    first = parser.feed('[{"name": "get_weather"').calls
    assert [(c.index, c.id, c.name, c.arguments) for c in first] == [(0, "call_0", "get_weather", "")]
    assert parser.feed(', "arguments": {"ci').calls == [ToolCallDelta(0, None, None, '{"ci')]
    later = parser.feed('ty": "Paris"}}, {"name": "now", "arguments": {}}]\n``').calls
    assert [(c.index, c.id, c.name, c.arguments) for c in later] == [(0, None, None, 'ty": "Paris"}'),
                                                                      (1, "call_1", "now", "{}")]
    assert parser.feed("`\n Done.") == ParsedDelta("Done.")
    assert parser.finish() == ParsedDelta()


def test_a_fence_that_is_not_json_streams_as_before():
    parser = ToolCallParser(fenced_calls=True)
    assert parser.feed("``").content == ""
    assert parser.feed("`python\nprint(").content == "```python\nprint("


def test_a_fenced_block_cut_before_a_name_is_dropped_and_recorded():
    for text, dropped in [(FENCE + '{"arguments": {"a": 1}, "na', ['{"arguments": {"a": 1}, "na']),
                          (FENCE + "[ ", ["[ "]), (FENCE + f'[{WEATHER}, {{"na', ['{"na'])]:
        deltas, parser = stream(text, [len(text) // 2], fenced_calls=True)
        assert join_deltas(deltas)[0] == "" and parser.dropped == dropped


def test_tool_names_do_not_filter_fenced_calls():
    assert parse_reply(F_ONE, {"search"}, ids(), fenced_calls=True) == ("", [ToolCall("call_0", *PARIS)])
    assert parse_reply(F_ONE, {"search"}, ids()) == (F_ONE, [])   # without the option: a filtered bare guess


@pytest.mark.parametrize("text", [
    FENCE + '{"name": "f", "arguments": {"code": "' + 'x\\"{[' * 40_000 + '"}}\n```',
    FENCE + '[{"arguments": {"v": [' + "1, " * 66_667 + '2]}, "name": "f"}]\n```',
    FENCE + '{"name": "f", "arguments": {"a": 1}, oops' + "y" * 200_000 + "\n```",
    F_ONE + " " * 200_000 + "Done",
], ids=["arguments", "arguments-before-name", "skipped", "whitespace-after"])
def test_feeding_a_200_kb_fenced_reply_one_character_at_a_time_is_linear(text):
    parser = ToolCallParser(fenced_calls=True)
    start = time.perf_counter()
    deltas = [parser.feed(ch) for ch in text]
    deltas.append(parser.finish())
    elapsed = time.perf_counter() - start
    assert join_deltas(deltas)[1]
    assert elapsed < 4.0, f"{elapsed:.2f} s for {len(text)} characters: quadratic?"
