"""Tasks with verifiable rewards, generated from a seed, for reinforcement learning (grpo.py).

Each task is a prompt and a `reward(completion_text) -> float` in [0, 1] that checks the reply itself:

    arithmetic   "What is 37 + 48? Reply with the number only."   1 if the reply's last number is 85
    reverse      "Reverse the letters of 'kqzt'. ..."             1 if the reply's last word is exactly "tzqk"
    code         "Write a Python function add_k(x) ..."           1 if its code, run in picochat.sandbox (a
                                                                  separate, fenced process), returns the right
                                                                  results on the unit tests' arguments

The training and held-out sets come from disjoint seeds and are checked disjoint by prompt text
(`task_sets`): a model is measured on prompts it never trained on. HumanEval is not among these tasks:
it stays an evaluation (eval/humaneval.py).
"""
from __future__ import annotations

import concurrent.futures
import json
import random
import re
import time
from dataclasses import dataclass
from typing import Callable

from ..engine.batcher import Batcher
from ..engine.engine import Engine
from ..engine.generation import Generation
from ..engine.sampling import SamplingParams
from ..sandbox import run_python

TASKS = ("arithmetic", "reverse", "code")
MAX_TOKENS = {"arithmetic": 32, "reverse": 24, "code": 128}   # room for a reply to each kind (a fenced function)
TRAIN_SEED_OFFSET, EVAL_SEED_OFFSET = 0, 1_000_003   # the two sets' random streams never share a seed
CODE_TIMEOUT_S, CODE_MEMORY_MB = 5.0, 256
RESULTS_MARK = "@@picochat-results@@"   # the line on which a code task's tests print the function's results
NUMBER = re.compile(r"-?\d[\d,]*")


@dataclass(frozen=True)
class AnswerTask:
    """A question with one right answer (arithmetic, reverse): the reward is an exact match."""
    kind: str
    prompt: str
    answer: str

    @property
    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.prompt}]

    def reward(self, completion: str) -> float:
        read = final_number(completion) if self.kind == "arithmetic" else final_word(completion)
        return float(read == self.answer)


@dataclass(frozen=True)
class CodeTask:
    """A small Python function to write. The reply's code runs in the sandbox, then calls of the function
    print repr() of each result; the reward is 1 if the program ran to its end and the results printed are
    exactly the right ones, compared here, outside the sandbox.

    Why outside: the sandbox's "passed" is reported by a harness in the code's own process, which a reply
    can patch (`sys.modules["__main__"]._execute = lambda *a: True` skips the tests and still reports a
    pass). No patch can print the right results without computing them, i.e. without solving the task."""
    kind: str
    prompt: str
    entry_point: str
    arguments: tuple[str, ...]    # repr() of each test call's argument
    expected: tuple[str, ...]     # repr() of the right result of each call (type and value: True is not 1)
    timeout: float = CODE_TIMEOUT_S

    @property
    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.prompt}]

    @property
    def tests(self) -> str:
        """What runs after the reply's code: the calls, their results printed on one marked line."""
        calls = ", ".join(f"{self.entry_point}({a})" for a in self.arguments)
        return f"import json as _json\nprint({RESULTS_MARK!r} + _json.dumps([repr(_r) for _r in [{calls}]]))\n"

    def reward(self, completion: str) -> float:
        code = extract_code(completion)
        if not code.strip():
            return 0.0
        result = run_python(code, self.tests, timeout=self.timeout, memory_mb=CODE_MEMORY_MB)
        return float(result.passed and reported_results(result.output) == list(self.expected))


def reported_results(output: str) -> list[str] | None:
    """The results the tests printed: the JSON list after the last RESULTS_MARK, or None."""
    at = output.rfind(RESULTS_MARK)
    if at < 0:
        return None
    line = output[at + len(RESULTS_MARK):].split("\n", 1)[0]
    try:
        found = json.loads(line)
    except ValueError:
        return None
    return found if isinstance(found, list) and all(isinstance(x, str) for x in found) else None


Task = AnswerTask | CodeTask


# ----------------------------------------------------------------------------- reading a reply
def final_number(text: str) -> str | None:
    """The last integer written in the reply ("1,234" -> "1234"), or None."""
    found = NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def final_word(text: str) -> str:
    """The last word of the reply, without quotes, brackets or punctuation around it: the answer to a
    one-word question ("The answer is: 'tzqk'." -> "tzqk")."""
    words = text.split()
    return words[-1].strip("`'\"*.,;:!?()[]") if words else ""


FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(text: str) -> str:
    """The first fenced code block of the reply (even one cut before its closing fence), else the reply."""
    match = FENCE.search(text)
    return match.group(1) if match else text


# ----------------------------------------------------------------------------- generators
def arithmetic_task(rng: random.Random) -> AnswerTask:
    """+ and − of numbers up to 99, × of numbers up to 12: hard enough for a small model to miss some."""
    op = rng.choice("+-*")
    a, b = (rng.randint(2, 12), rng.randint(2, 12)) if op == "*" else (rng.randint(0, 99), rng.randint(0, 99))
    value = a + b if op == "+" else a - b if op == "-" else a * b
    shown = {"+": "+", "-": "-", "*": "×"}[op]
    return AnswerTask("arithmetic", f"What is {a} {shown} {b}? Reply with the number only.", str(value))


def reverse_task(rng: random.Random) -> AnswerTask:
    """Reverse 3 to 5 random lowercase letters (no word to remember: the model must spell it backwards)."""
    word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 5)))
    return AnswerTask("reverse", f"Reverse the letters of '{word}'. Reply with the reversed letters only.",
                      word[::-1])


# (name, signature, description of k, the range k is drawn from, reference implementation of k, test arguments
# of k: chosen so that a function that ignores k, or gets the edge wrong, fails)
CODE_TEMPLATES = [
    ("add_k", "add_k(x)", "returns x plus {k}", (2, 99), lambda k: lambda x: x + k,
     lambda k: [0, 1, -3, 10, 57]),
    ("times_k", "times_k(x)", "returns x multiplied by {k}", (2, 99), lambda k: lambda x: x * k,
     lambda k: [0, 1, -2, 7, 13]),
    ("is_multiple", "is_multiple(x)", "returns True if x is divisible by {k}, else False", (2, 60),
     lambda k: lambda x: x % k == 0, lambda k: [0, 1, k, 2 * k, k + 1, 3 * k - 1, 7, 60]),
    ("first_k", "first_k(xs)", "returns a list of the first {k} elements of the list xs", (1, 8),
     lambda k: lambda xs: xs[:k], lambda k: [list(range(10, 20)), [9], [], [4, 3, 2, 1]]),
    ("count_above", "count_above(xs)", "returns how many numbers in the list xs are greater than {k}", (0, 60),
     lambda k: lambda xs: sum(x > k for x in xs), lambda k: [[k - 1, k, k + 1, 3], [], [k + 5] * 3, [100, -1, 2 * k]]),
    ("repeat_k", "repeat_k(s)", "returns the string s repeated {k} times", (2, 12),
     lambda k: lambda s: s * k, lambda k: ["ab", "", "x", "hi!"]),
]


def code_task(rng: random.Random) -> CodeTask:
    """A function from CODE_TEMPLATES with its constant k drawn, and its right results on the test arguments."""
    name, signature, description, (low, high), make, arguments_of = rng.choice(CODE_TEMPLATES)
    k = rng.randint(low, high)
    reference, arguments = make(k), arguments_of(k)
    prompt = (f"Write a Python function `{signature}` that {description.format(k=k)}. "
              "Reply with the code in a ```python block.")
    return CodeTask("code", prompt, name, tuple(repr(a) for a in arguments),
                    tuple(repr(reference(a)) for a in arguments))


GENERATORS: dict[str, Callable[[random.Random], Task]] = {
    "arithmetic": arithmetic_task, "reverse": reverse_task, "code": code_task}


# ----------------------------------------------------------------------------- the two sets
def generate_tasks(kind: str, n: int, seed: int) -> list[Task]:
    """n distinct tasks (by prompt) of one kind from one seed."""
    if kind not in GENERATORS:
        raise ValueError(f"unknown task {kind!r} (--task): choose from {', '.join(TASKS)}")
    rng, seen, tasks = random.Random(seed), set(), []
    for _ in range(50 * n + 100):   # (bounded: a kind holds a few hundred to thousands of distinct prompts)
        if len(tasks) == n:
            return tasks
        task = GENERATORS[kind](rng)
        if task.prompt not in seen:
            seen.add(task.prompt)
            tasks.append(task)
    raise ValueError(f"the {kind!r} task has fewer than {n} distinct prompts: ask for fewer")


def task_sets(kind: str, n_train: int, n_eval: int, seed: int = 0) -> tuple[list[Task], list[Task]]:
    """(training tasks, held-out tasks): from disjoint seeds, and any training prompt that the held-out set
    also holds is dropped, so the two share no prompt text."""
    held_out = generate_tasks(kind, n_eval, seed + EVAL_SEED_OFFSET)
    eval_prompts = {t.prompt for t in held_out}
    train = [t for t in generate_tasks(kind, n_train + n_eval, seed + TRAIN_SEED_OFFSET)
             if t.prompt not in eval_prompts][:n_train]
    if len(train) < n_train:
        raise ValueError(f"only {len(train)} training prompts of {kind!r} are left beside {n_eval} held-out ones")
    return train, held_out


# ----------------------------------------------------------------------------- running a model on tasks
def generate_all(engine: Engine, prompts: list[list[int]], choices: list[list[SamplingParams]],
                 max_batch: int = 8) -> list[list[Generation]]:
    """Every prompt's completions (one per SamplingParams of its choices: n from one prefill), run to their
    end through a Batcher on this thread. A generation that fails raises: a rollout must not lose one quietly."""
    longest = max(len(ids) for ids in prompts) + max(p.max_new_tokens for ps in choices for p in ps)
    batcher = Batcher(engine, max_batch=max_batch, max_queue=len(prompts) + 1, max_len=longest + 1, start=False)
    requests = [batcher.submit_choices(ids, params, lambda gen, piece: None) for ids, params in zip(prompts, choices)]
    batcher.run(until_idle=True)
    batcher.close()
    generations = [[r.gen for r in group] for group in requests]
    for gen in (g for group in generations for g in group):
        if gen.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"a rollout failed: {gen.finish_reason}")
    return generations


def rewards_of(tasks: list[Task], texts: list[str], workers: int = 2) -> list[float]:
    """task.reward(text) for each pair; `workers` at once (code rewards each run a sandboxed process)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda pair: pair[0].reward(pair[1]), zip(tasks, texts)))


@dataclass
class TaskScore:
    mean_reward: float
    rewards: list[float]
    completions: list[str]
    seconds: float


def evaluate_tasks(engine: Engine, tasks: list[Task], max_new_tokens: int = 64, max_batch: int = 8) -> TaskScore:
    """The model's mean reward on `tasks` (the held-out set), each answered once, greedily."""
    start = time.perf_counter()
    greedy = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    prompts = [engine.chat_prompt(t.messages) for t in tasks]
    texts = [group[0].text for group in generate_all(engine, prompts, [[greedy]] * len(tasks), max_batch)]
    rewards = rewards_of(tasks, texts)
    return TaskScore(sum(rewards) / max(1, len(rewards)), rewards, texts, time.perf_counter() - start)
