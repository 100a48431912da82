"""`picochat code`: generate code; with --test, run it against the tests in the sandbox and retry on failure."""
from __future__ import annotations

import sys

from .ask import NO_GROUNDING
from .common import add_model_args, add_remote_args, backend

HELP = "generate code; with --test, run it against tests and retry on failure"


def add_arguments(p):
    p.add_argument("task", help="what the code should do")
    add_model_args(p)
    add_remote_args(p)
    p.add_argument("--lang", default="python", help="language of the code (default python; --test needs python)")
    p.add_argument("--test", default=None, metavar="FILE",
                   help="Python tests (asserts) run after the code in a sandbox; a failure is fed back")
    p.add_argument("--retries", type=int, default=2, help="attempts after the first when tests fail (default 2)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds each test run may take (default 10)")
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    from ..apps.codegen import generate_code
    from ..engine.sampling import SamplingParams
    tests = None
    if args.test:
        with open(args.test, encoding="utf-8") as f:
            tests = f.read()
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    # the user's tests are part of the task's specification: the model sees them (a benchmark hides them)
    result = generate_code(backend(args, extra_body=NO_GROUNDING), args.task, tests=tests, lang=args.lang,
                           retries=args.retries, params=params, timeout=args.timeout, show_tests=True)
    for i, attempt in enumerate(result.attempts, 1):
        if tests is not None:
            print(f"[attempt {i}: tests {'passed' if attempt.passed else 'failed'}]", file=sys.stderr)
            if not attempt.passed and args.verbose:
                print("  " + attempt.output.strip().replace("\n", "\n  ")[-1500:], file=sys.stderr)
    print(result.code)
    if tests is not None and not result.passed:
        print(f"picochat: the code still fails its tests after {len(result.attempts)} attempt(s)", file=sys.stderr)
        return 2
    return 0
