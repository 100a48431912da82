"""Write code with a model, run it against tests in the sandbox, and ask again with the error when it fails.

    task ──▶ model ──▶ reply ──extract_code──▶ code + tests ──run_python──▶ passed? ──no──▶ conversation
                ▲                                                                         + the error tail
                └─────────────────────────────────────────────────────────────────────────────┘ (retries)

generate_code_batch runs that loop for many tasks at once: each round sends the conversations of all tasks
still failing in ONE generate call (a LocalModel decodes them together in its Batcher, a RemoteModel sends
them concurrently) and checks the answers in the sandbox a few at a time. generate_code is a batch of one.
The model is anything with `generate(prompts, params, n=1)` (backends.Generator).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
from dataclasses import dataclass, field
from typing import Callable

from ..backends import Generator
from ..engine.sampling import SamplingParams
from ..eval.humaneval import FENCED_BLOCK, PYTHON_TAGS
from ..sandbox import SandboxResult, run_python

# what the first message adds after the task (None: the task is sent as it is)
INSTRUCTION = "Write a complete {lang} program for this. Reply with the code in a single ```{lang} block."
ERROR_TAIL = 2000   # characters of the failing run's output the model sees (the end: the traceback is there)
# fence tags each language's code blocks go by ("" is a bare fence)
LANGUAGE_TAGS = {
    "python": PYTHON_TAGS,
    "javascript": ("", "javascript", "js", "node"),
    "typescript": ("", "typescript", "ts"),
    "c++": ("", "c++", "cpp", "cxx", "cc"),
    "shell": ("", "shell", "sh", "bash", "zsh"),
}
ALIASES = {"py": "python", "python3": "python", "js": "javascript", "ts": "typescript", "cpp": "c++",
           "sh": "shell", "bash": "shell"}


@dataclass
class Attempt:
    """One answer of the model and how it fared."""
    reply: str              # the model's whole reply
    code: str               # the code extracted from it
    passed: bool | None     # None when there were no tests to run
    output: str = ""        # the tail of the sandbox's output (empty when not run)


@dataclass
class CodeResult:
    """The last attempt's code, whether it passed, and every attempt."""
    code: str
    passed: bool | None     # None when there were no tests
    attempts: list[Attempt] = field(default_factory=list)


def language(lang: str) -> str:
    """The canonical name of a language ("py" -> "python")."""
    lang = lang.strip().lower()
    return ALIASES.get(lang, lang)


def extract_code(reply: str, lang: str = "python") -> str:
    """The code in a chat reply: the first fenced block tagged for `lang` (or bare ```), even if the reply
    was cut before its closing fence; with no such block, the whole reply stripped."""
    lang = language(lang)
    tags = LANGUAGE_TAGS.get(lang, ("", lang))
    for match in FENCED_BLOCK.finditer(reply):
        if match.group(1).lower() in tags:
            return match.group(2).strip("\n").rstrip()
    return reply.strip()


def generate_code(model: Generator, task: str, *, tests: str | None = None, lang: str = "python",
                  retries: int = 2, params: SamplingParams | None = None, system: str | None = None,
                  timeout: float = 10.0, retry_temperature: float | None = None,
                  show_tests: bool = False, instruction: str | None = INSTRUCTION) -> CodeResult:
    """Ask `model` for code doing `task`; with `tests` (Python code, e.g. asserts, run after the answer in
    the sandbox) ask again with the error up to `retries` times. See generate_code_batch."""
    return generate_code_batch(model, [(task, tests)], lang=lang, retries=retries, params=params, system=system,
                               timeout=timeout, retry_temperature=retry_temperature, show_tests=show_tests,
                               instruction=instruction)[0]


def generate_code_batch(model: Generator, tasks: list[tuple[str, str | None]], *, lang: str = "python",
                        retries: int = 2, params: SamplingParams | None = None, system: str | None = None,
                        timeout: float = 10.0, retry_temperature: float | None = None,
                        show_tests: bool = False, instruction: str | None = INSTRUCTION, workers: int = 2,
                        extract: Callable[[int, str], str] | None = None) -> list[CodeResult]:
    """generate_code for each (task, tests) pair, in rounds: each round sends every still-failing task's
    conversation in ONE generate call, then runs the answers that have tests in the sandbox, `workers` at a
    time. A task without tests takes one round and has passed None.

    params: sampling for the first attempt (default greedy, 512 new tokens); retries use the same params (the
    error in the conversation changes the prompt) unless retry_temperature is given.
    system: a system message to start each conversation with.
    instruction: added after the task in the first message ({lang} is filled in); None sends the task as it
    is (a benchmark whose tasks carry their own instruction, so that first attempts equal a plain run).
    show_tests: put the tests in the first prompt too (off: they are hidden, as in a benchmark; a failure's
    output still shows the model what went wrong).
    extract(i, reply): the program task i's reply stands for (default extract_code(reply, lang)); HumanEval
    passes lambda i, reply: humaneval.completion_code(problems[i], reply), which keeps the prompt's imports.
    Raises ValueError for tests in a language other than Python (only Python runs in the sandbox)."""
    lang = language(lang)
    if lang != "python" and any(tests is not None for _, tests in tasks):
        raise ValueError(f"tests can only be run for Python code, not {lang!r}: the sandbox runs Python")
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    params = params or SamplingParams(max_new_tokens=512, temperature=0.0)
    retry_params = params if retry_temperature is None else dataclasses.replace(params,
                                                                                temperature=retry_temperature)
    conversations = [_first_messages(task, tests, lang, system, show_tests, instruction) for task, tests in tasks]
    results = [CodeResult(code="", passed=None) for _ in tasks]
    pending = list(range(len(tasks)))
    for round_ in range(retries + 1):
        if not pending:
            break
        replies = model.generate([conversations[i] for i in pending], params if round_ == 0 else retry_params)
        if len(replies) != len(pending):
            raise ValueError(f"the model answered {len(replies)} of {len(pending)} prompts")
        attempts = [Attempt(reply[0], extract(i, reply[0]) if extract else extract_code(reply[0], lang), None)
                    for i, reply in zip(pending, replies)]
        checked = _check_all([(a.code, tasks[i][1]) for i, a in zip(pending, attempts)], timeout, workers)
        still_failing = []
        for i, attempt, run in zip(pending, attempts, checked):
            if run is not None:
                attempt.passed, attempt.output = run.passed, run.output
            results[i].attempts.append(attempt)
            results[i].code, results[i].passed = attempt.code, attempt.passed
            if attempt.passed is False:
                conversations[i] = conversations[i] + [{"role": "assistant", "content": attempt.reply},
                                                       {"role": "user", "content": _feedback(run, lang, timeout)}]
                still_failing.append(i)
        pending = still_failing
    return results


def _first_messages(task: str, tests: str | None, lang: str, system: str | None, show_tests: bool,
                    instruction: str | None) -> list[dict]:
    prompt = task if instruction is None else f"{task.strip()}\n\n{instruction.replace('{lang}', lang)}"
    if tests is not None and show_tests:
        prompt += f"\n\nIt must pass these tests, run after it:\n```{lang}\n{tests.strip()}\n```"
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def _check_all(jobs: list[tuple[str, str | None]], timeout: float, workers: int) -> list[SandboxResult | None]:
    """Each (code, tests) run in the sandbox, None where there are no tests; a few subprocesses at a time."""
    def check(job):
        code, tests = job
        return None if tests is None else run_python(code, tests, timeout=timeout)
    if sum(tests is not None for _, tests in jobs) <= 1:
        return [check(job) for job in jobs]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(check, jobs))


def _feedback(run: SandboxResult, lang: str, timeout: float) -> str:
    """The user's next message after a failed run: what happened, the output's tail, and what to do."""
    if run.status == "timeout":
        what = f"Running your code with the tests did not finish within {timeout:g} seconds."
    else:
        what = f"Running your code with the tests failed ({run.status})."
    output = run.output.strip()
    if len(output) > ERROR_TAIL:
        output = "..." + output[3 - ERROR_TAIL:]
    shown = f"\n\n```\n{output}\n```" if output else ""
    return (f"{what}{shown}\n\nFix the problem and reply with the corrected complete program in a single "
            f"```{lang} block.")
