"""Code generation: extracting code from replies, the sandbox test-and-retry loop, batched rounds."""
import pytest

from picochat.apps.codegen import extract_code, generate_code, generate_code_batch
from picochat.engine.sampling import SamplingParams

WRONG = "Here you go:\n```python\ndef add(a, b):\n    return a - b\n```\nIt adds."
RIGHT = "Fixed:\n```python\ndef add(a, b):\n    return a + b\n```"
TESTS = "assert add(2, 3) == 5, 'add(2, 3) should be 5'"


class Scripted:
    """A model that records every generate call and answers reply(conversation) for each prompt."""

    def __init__(self, reply):
        self.reply, self.calls = reply, []

    def generate(self, prompts, params, n=1):
        self.calls.append((prompts, params))
        return [[self.reply(prompt)] for prompt in prompts]


def attempt_number(conversation) -> int:
    """1 for the first prompt, 2 after one failure, ..."""
    return sum(m["role"] == "assistant" for m in conversation) + 1


@pytest.mark.parametrize("reply, code", [
    ("Sure:\n```python\nx = 1\n```\nDone.", "x = 1"),
    ("```py\nx = 2\n```", "x = 2"),
    ("```\nx = 3\n```", "x = 3"),
    ("Here:\n```python\ndef f():\n    return 4", "def f():\n    return 4"),   # cut before the closing fence
    ("  x = 5  \n", "x = 5"),                                                # no fence: the whole reply
    ("```js\nlet x = 6;\n```\n```python\nx = 6\n```", "x = 6"),              # another language's block skipped
    ("```Python\n  if True:\n    x = 7\n```", "  if True:\n    x = 7"),        # indentation kept
])
def test_extract_code(reply, code):
    assert extract_code(reply) == code


def test_extract_code_for_another_language():
    assert extract_code("```python\nx = 1\n```\n```js\nlet x = 1;\n```", "javascript") == "let x = 1;"


def test_a_wrong_answer_is_retried_with_the_error():
    model = Scripted(lambda c: WRONG if attempt_number(c) == 1 else RIGHT)
    got = generate_code(model, "Write add(a, b) returning their sum.", tests=TESTS, system="Be brief.")
    assert got.passed is True and len(got.attempts) == 2 and "a + b" in got.code
    first, second = got.attempts
    assert first.passed is False and first.code == "def add(a, b):\n    return a - b"
    assert "AssertionError" in first.output and "add(2, 3) should be 5" in first.output
    assert second.passed is True and second.reply == RIGHT
    (one,), (two,) = (prompts for prompts, _ in model.calls)
    assert [m["role"] for m in one] == ["system", "user"] and "add(a, b)" in one[1]["content"]
    assert [m["role"] for m in two] == ["system", "user", "assistant", "user"] and two[:2] == one
    assert two[2]["content"] == WRONG
    assert "AssertionError: add(2, 3) should be 5" in two[3]["content"] and "corrected" in two[3]["content"]


def test_a_model_always_wrong_fails_after_all_retries():
    model = Scripted(lambda c: WRONG)
    got = generate_code(model, "Write add.", tests=TESTS, retries=2)
    assert got.passed is False and len(got.attempts) == 3 and len(model.calls) == 3
    assert all(a.passed is False for a in got.attempts)
    assert attempt_number(model.calls[-1][0][0]) == 3   # the last retry sees the whole conversation


def test_without_tests_one_call_and_passed_is_none():
    model = Scripted(lambda c: WRONG)
    got = generate_code(model, "Write add.")
    assert got.passed is None and len(got.attempts) == 1 and len(model.calls) == 1
    assert got.attempts[0].output == "" and got.code == "def add(a, b):\n    return a - b"


def test_a_batch_retries_only_the_failing_tasks_in_one_call():
    def reply(conversation):
        if "subtract" in conversation[0]["content"]:
            return "```python\ndef sub(a, b):\n    return a - b\n```"
        return WRONG if attempt_number(conversation) == 1 else RIGHT
    model = Scripted(reply)
    tasks = [("Write sub(a, b): subtract.", "assert sub(5, 3) == 2"), ("Write add(a, b).", TESTS),
             ("Write anything.", None)]
    first, second, third = generate_code_batch(model, tasks, retries=2)
    assert [len(prompts) for prompts, _ in model.calls] == [3, 1]
    assert (first.passed, len(first.attempts)) == (True, 1)
    assert (second.passed, len(second.attempts)) == (True, 2)
    assert (third.passed, len(third.attempts)) == (None, 1)
    assert "add" in model.calls[1][0][0][0]["content"]


def test_an_endless_loop_times_out_and_counts_as_failed():
    model = Scripted(lambda c: "```python\ndef add(a, b):\n    while True:\n        pass\n```")
    got = generate_code(model, "Write add.", tests=TESTS, retries=1, timeout=2)
    assert got.passed is False and len(got.attempts) == 2
    assert "did not finish within 2 seconds" in model.calls[1][0][0][-1]["content"]


def test_retries_keep_the_params_unless_a_retry_temperature_is_given():
    model = Scripted(lambda c: WRONG)
    params = SamplingParams(max_new_tokens=64, temperature=0.0)
    generate_code(model, "Write add.", tests=TESTS, retries=1, params=params)
    assert [p for _, p in model.calls] == [params, params]
    model = Scripted(lambda c: WRONG)
    generate_code(model, "Write add.", tests=TESTS, retries=1, params=params, retry_temperature=0.8)
    assert [p.temperature for _, p in model.calls] == [0.0, 0.8]
    assert model.calls[1][1].max_new_tokens == 64


def test_tests_need_python():
    with pytest.raises(ValueError, match="Python"):
        generate_code(Scripted(lambda c: ""), "Write add in JavaScript.", tests="add(1, 2)", lang="javascript")
    got = generate_code(Scripted(lambda c: "```js\nconst add = (a, b) => a + b;\n```"), "Write add.", lang="js")
    assert got.code == "const add = (a, b) => a + b;" and got.passed is None


def test_the_model_sees_at_most_the_last_2000_characters_of_the_output():
    noisy = "```python\nprint('x' * 10000)\nraise ValueError('the end')\n```"
    model = Scripted(lambda c: noisy)
    generate_code(model, "Write add.", tests=TESTS, retries=1)
    feedback = model.calls[1][0][0][-1]["content"]
    shown = feedback.split("```\n", 1)[1].split("\n```", 1)[0]
    assert len(shown) <= 2000 and shown.endswith("ValueError: the end")


def test_a_custom_extract_makes_the_program():
    model = Scripted(lambda c: "    return a + b")   # a base model's body, as HumanEval prompts get
    got = generate_code_batch(model, [("def add(a, b):\n", TESTS)], retries=0,
                              extract=lambda i, reply: f"def add(a, b):\n{reply}")
    assert got[0].passed is True and got[0].code == "def add(a, b):\n    return a + b"


def test_the_first_message_is_the_task_with_an_instruction_or_as_it_is():
    model = Scripted(lambda c: RIGHT)
    generate_code(model, "Write add(a, b).", tests=TESTS, show_tests=True)
    asked = model.calls[0][0][0][-1]["content"]
    assert asked.startswith("Write add(a, b).\n\n") and "```python block" in asked and TESTS in asked
    model = Scripted(lambda c: RIGHT)
    generate_code(model, "Complete this:\ndef add(a, b):\n", tests=TESTS, instruction=None)
    assert model.calls[0][0][0] == [{"role": "user", "content": "Complete this:\ndef add(a, b):\n"}]


def test_a_real_tiny_model_goes_through_the_loop():
    from picochat.backends import LocalModel

    from helpers import tiny_engine
    engine = tiny_engine("def add(a, b):\n    return a + b\n\nWrite a complete python program. " * 20)
    got = generate_code(LocalModel(engine), "Write add(a, b).", tests=TESTS, retries=1,
                        params=SamplingParams(max_new_tokens=16, temperature=0.0))
    assert len(got.attempts) == 2 and got.passed is False   # a random model's text is no program
    assert all(isinstance(a.reply, str) and a.output for a in got.attempts)
