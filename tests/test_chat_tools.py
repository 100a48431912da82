"""`picochat chat --tools`: the built-in tools (a calculator that refuses what is not arithmetic, Python in
the sandbox), a ChatSession that records calls, feeds results back and resumes on its cached prefix, and
the REPL showing calls with -v."""
import json
import math
import time

import pytest

from helpers import run_cli, tiny_tool_engine
from picochat.apps import agent_tools
from picochat.apps.agent_tools import CALCULATOR, PYTHON, calculate, run_tool, tools_named
from picochat.cli import chat as chat_cli
from picochat.engine.sampling import SamplingParams
from picochat.engine.session import ChatSession
from picochat.engine.tool_parser import ToolCall
from picochat.engine.tools import Tool, ToolUse
from picochat.sandbox import SandboxUnavailable

# text for the tiny tokenizers: the tool schemas among it keeps the prompt that shows them short
TEXT = ('What is 2 + 2? {"name": "calculator", "arguments": {"expression": "2 + 2"}} The answer is 4.\n'
        + json.dumps(CALCULATOR.as_openai()) + "\n" + json.dumps(PYTHON.as_openai()) + "\n") * 20


def call(name: str, **arguments) -> ToolCall:
    return ToolCall("call_1", name, json.dumps(arguments))


# ----------------------------------------------------------------------------- the calculator
@pytest.mark.parametrize("expression, value", [
    ("2+2", "4"), ("(3 + 4) * 2 - 1", "13"), ("7 // 2", "3"), ("7 % 3", "1"), ("2 ** 10", "1024"),
    ("-3 ** 2", "-9"), ("1 / 4", "0.25"), ("sqrt(16)", "4.0"), ("abs(-2.5)", "2.5"), ("round(2.567, 2)", "2.57"),
    ("log(100, 10)", "2.0"), ("exp(0) + cos(0)", "2.0"), ("round(sin(pi / 2))", "1"), ("2 ** -2", "0.25"),
    ("e", repr(math.e)), ("10 ** 999 // 10 ** 998", "10"),
])
def test_calculator_evaluates_arithmetic(expression, value):
    assert calculate(expression) == value


@pytest.mark.parametrize("expression, message", [
    ("__import__('os').system('true')", "only these functions can be called"),
    ("(1).real", "attributes are not allowed"),
    ("x + 1", "unknown name 'x'"),
    ("'a' * 3", "only numbers"),
    ("[1, 2]", "List is not allowed"),
    ("lambda: 0", "Lambda is not allowed"),
    ("1 / 0", "division by zero"), ("5 % 0", "division by zero"), ("0 ** -1", "division by zero"),
    ("sqrt(-1)", "math domain error"),
    ("exp(1000)", "too large"),
    ("10 ** 999 * 10 ** 999", "more than 1000 digits"),
    ("(-8) ** (1 / 3)", "not a real number"),
    ("2 +", "not an expression"),
    ("1" * 501, "at most 500"),
])
def test_calculator_refuses_with_error_text(expression, message):
    result = calculate(expression)
    assert result.startswith("error: ") and message in result


def test_calculator_refuses_huge_powers_at_once():
    start = time.perf_counter()
    for expression in ("9**9**9**9", "2 ** 10 ** 100", "(10 ** 500) ** 3"):
        result = calculate(expression)
        assert result.startswith("error: the result would have about") and "digits" in result
    assert time.perf_counter() - start < 0.5


def test_run_tool_dispatches_and_turns_bad_calls_into_error_text():
    assert run_tool(call("calculator", expression="6 * 7")) == "42"
    broken = ToolCall("c", "calculator", '{"expression": "1+')
    assert run_tool(broken).startswith("error: the arguments are not valid JSON")
    assert run_tool(call("calculator", code="1")) == 'error: calculator takes {"expression": string}'
    assert run_tool(call("search", q="x")).startswith("error: there is no tool 'search'")
    assert run_tool(call("python", code="print(1)"), enabled=["calculator"]).startswith("error: there is no tool")


def test_tools_named():
    assert tools_named(None) == [CALCULATOR, PYTHON] == tools_named([])
    assert tools_named(["python", "python"]) == [PYTHON]
    with pytest.raises(ValueError, match="no built-in tool 'shell'"):
        tools_named(["calculator", "shell"])


# ----------------------------------------------------------------------------- python in the sandbox
def sandboxed(code: str) -> str:
    result = run_tool(call("python", code=code))
    if "sandbox is unavailable" in result:
        pytest.skip(f"the kernel sandbox cannot run here: {result}")
    return result


def test_python_tool_returns_what_the_code_prints():
    assert sandboxed("print(sum(range(10)))\nprint('done')") == "status: ok\n45\ndone"


def test_python_tool_reports_an_exception():
    result = sandboxed("def f():\n    raise ValueError('boom')\nf()")
    assert result.startswith("status: failed\n") and "ValueError: boom" in result and "Traceback" in result


def test_python_tool_says_when_the_sandbox_is_unavailable(monkeypatch):
    def refuse(*args, **kwargs):
        raise SandboxUnavailable("unavailable: no user namespaces. The code was not run.")
    monkeypatch.setattr(agent_tools, "run_python", refuse)
    result = run_tool(call("python", code="print(1)"))
    assert result.startswith("error: the Python sandbox is unavailable") and "no user namespaces" in result


def test_long_output_is_clipped_in_the_middle():
    text = "".join(f"line {i}\n" for i in range(2000))
    clipped = agent_tools.clip(text)
    assert len(clipped) < agent_tools.MAX_RESULT_CHARS + 100
    assert clipped.startswith("line 0\n") and clipped.endswith("line 1999\n") and "characters cut" in clipped


# ----------------------------------------------------------------------------- the session
@pytest.fixture(scope="module")
def engine():
    return tiny_tool_engine(TEXT, max_seq_len=2048)


# the calculator with short expressions: a random model's call ends within a few tokens
SHORT_CALCULATOR = Tool("calculator", CALCULATOR.description, {
    "type": "object", "properties": {"expression": {"type": "string", "maxLength": 6}}, "required": ["expression"]})


def test_session_runs_a_forced_call_and_resumes_on_its_cached_prefix(engine):
    chat = ChatSession(engine, tools=ToolUse([SHORT_CALCULATOR], choice="function", function="calculator"))
    params = SamplingParams(temperature=0, max_new_tokens=300)
    first = chat.ask("What is 2+2?", params)
    list(first)
    call_json = '{"name": "calculator", "arguments": {"expression": "'
    assert first.text.startswith(("<tool_call>\n" + call_json, "```json\n" + call_json))   # either opening
    calls = chat.record(first)
    assert [c.name for c in calls] == ["calculator"]
    assert chat.messages[-1]["tool_calls"] == [{"id": calls[0].id, "name": "calculator",
                                                "arguments": calls[0].arguments}]
    result = run_tool(calls[0])
    assert result.startswith("error: ")    # a random model's expression: fed back all the same
    chat.add_tool_results([(calls[0], result)])
    second = chat.resume(params)
    list(second)
    # the conversation so far comes from the cache: with the tags, the call's own tokens too (a fenced call
    # is rendered back in the template's tags, so the cache serves up to the reply)
    reused = first.prompt_ids + first.token_ids if first.text.startswith("<tool_call>") else first.prompt_ids
    assert second.prompt_ids[:len(reused)] == reused
    assert second.stats.cached_tokens >= len(reused) - 1
    rendered = engine.tokenizer.decode(second.prompt_ids)
    assert f"<tool_response>\n{result}\n</tool_response><|im_end|>\n<|im_start|>assistant\n" in rendered
    assert "# Tools" in rendered and '"name": "calculator"' in rendered      # the template's tool section


def test_session_resume_needs_tool_results(engine):
    chat = ChatSession(engine, tools=ToolUse([CALCULATOR]))
    with pytest.raises(ValueError, match="add_tool_results"):
        chat.resume(SamplingParams())


def test_session_without_tools_renders_as_before(engine):
    chat = ChatSession(engine, system="Be brief.")
    params = SamplingParams(temperature=0, max_new_tokens=4)
    gen = chat.ask("Hello", params)
    list(gen)
    assert chat.record(gen) == [] and gen.params.grammar is None
    assert gen.prompt_ids == engine.chat_prompt([{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": "Hello"}])


def test_tool_turn_stops_a_model_that_keeps_calling(engine, monkeypatch, capsys):
    # a session that forces a call in every reply, not just the first: the loop must end by itself
    monkeypatch.setattr(ChatSession, "resume", lambda self, params: self._generate(params, "function"))
    chat = ChatSession(engine, tools=ToolUse([SHORT_CALCULATOR], choice="function", function="calculator"))
    chat_cli.tool_turn(chat, "What is 2+2?", SamplingParams(temperature=0, max_new_tokens=60), verbose=True)
    out, err = capsys.readouterr()
    assert err.count("[tool] calculator(") == chat_cli.MAX_TOOL_ROUNDS
    assert f"still calling tools after {chat_cli.MAX_TOOL_ROUNDS} rounds" in out
    assert sum(m["role"] == "tool" for m in chat.messages) == chat_cli.MAX_TOOL_ROUNDS


def test_tool_turn_ends_when_the_model_repeats_an_answered_call(engine, monkeypatch, capsys):
    """A small model that asks again for what it was just told (Qwen2.5-Coder-1.5B does) is shown the
    answer it has instead of looping: the same call is not run twice in a turn."""
    only_2_plus_2 = Tool("calculator", "", {"type": "object", "properties": {"expression": {"enum": ["2+2"]}},
                                            "required": ["expression"]})
    monkeypatch.setattr(ChatSession, "resume", lambda self, params: self._generate(params, "function"))
    chat = ChatSession(engine, tools=ToolUse([only_2_plus_2], choice="function", function="calculator"))
    chat_cli.tool_turn(chat, "What is 2+2?", SamplingParams(temperature=0, max_new_tokens=60), verbose=True)
    out, err = capsys.readouterr()
    assert err.count("[tool] calculator(") == 1 and "[calculator answered: 4]" in out
    assert sum(m["role"] == "tool" for m in chat.messages) == 1


# ----------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def tool_model_dir(tmp_path_factory):
    """tiny_tool_engine's model (Qwen2.5's template, <tool_call> tokens) saved as a HF folder."""
    from picochat.formats.hf import save_hf_folder
    engine = tiny_tool_engine(TEXT, max_seq_len=2048)
    return save_hf_folder(engine.model, tmp_path_factory.mktemp("tools"), tokenizer=engine.tokenizer)


def chat_args(folder, *extra):
    return ["chat", "-m", folder, "--dtype", "float32", "--temperature", "0", "--max-new-tokens", "200",
            "--tools", "calculator", "--tool-choice", "calculator", *extra]


def test_chat_tools_verbose_shows_each_call_and_its_result(tool_model_dir, capsys, monkeypatch):
    code, out, err = run_cli(chat_args(tool_model_dir, "-v"), capsys, stdin="What is 2+2?\n",
                             monkeypatch=monkeypatch)
    assert code == 0, err
    line = next(l for l in err.splitlines() if l.startswith("[tool] "))
    assert line.startswith('[tool] calculator({"expression": "') and ") → error: " in line
    assert "<tool_call>" not in out and "(used" not in err


def test_chat_tools_quiet_shows_only_the_answer_and_a_note(tool_model_dir, capsys, monkeypatch):
    code, out, err = run_cli(chat_args(tool_model_dir), capsys, stdin="What is 2+2?\n", monkeypatch=monkeypatch)
    assert code == 0, err
    assert "[tool]" not in err and "(used calculator)" in err
    assert "<tool_call>" not in out and '"expression"' not in out


@pytest.mark.parametrize("flags, message", [
    (["--tools", "shell"], "no built-in tool 'shell'"),
    (["--tools", "calculator", "--tool-choice", "python"], "--tool-choice must be"),
])
def test_chat_tools_refuses_bad_flags_before_loading(flags, message, tmp_path, capsys):
    code, _, err = run_cli(["chat", "-m", tmp_path / "no-model", *flags], capsys)
    assert code == 1 and message in err
