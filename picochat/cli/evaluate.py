"""`picochat eval`: measure a model, or any OpenAI-compatible server, on one task (eval/tasks.py)."""
from __future__ import annotations

import json
import sys

from .common import add_model_args, add_remote_args, backend, count

HELP = "evaluate a model (or any OpenAI-compatible server): bits per byte, multiple choice, generation, HumanEval"
DESCRIPTION = ("Measure a model on one task and print a table (and --out JSON). -m takes a model as everywhere "
               "else; --base-url evaluates a running OpenAI-compatible server instead (picochat serve, "
               "llama-server, Ollama, vLLM).")


def add_arguments(p):
    add_model_args(p)
    add_remote_args(p, use="evaluate")
    p.add_argument("--task", required=True, choices=["bpb", "mc", "gen", "humaneval"])
    p.add_argument("--data", default=None,
                   help="bpb: a text file or folder, a prepared dataset, or a named corpus (default sharegpt's held-out "
                        "documents); mc / gen: a JSONL file")
    p.add_argument("--limit", type=int, default=None, help="use the first N items")
    p.add_argument("--chars", type=count, default=40_000, help="bpb: characters of text (default 40K)")
    p.add_argument("--fewshot", type=int, default=0, help="mc: solved examples before each question")
    p.add_argument("--samples", type=int, default=1, help="humaneval: completions per problem")
    p.add_argument("--k", type=int, nargs="+", default=[1], help="humaneval: pass@k for these k (≤ --samples)")
    p.add_argument("--temperature", type=float, default=0.0, help="gen / humaneval (default 0: greedy)")
    p.add_argument("--max-tokens", type=int, default=384, help="gen / humaneval: tokens per completion")
    p.add_argument("--chat", action="store_true", help="humaneval: ask through the chat template")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, metavar="FILE.json", help="write the results as JSON")


def run(args) -> int:
    from tqdm import tqdm

    from ..atomic import atomic_write_text
    with tqdm(desc=f"eval {args.task}", unit=" items", file=sys.stderr, disable=None) as bar:
        model = backend(args, progress=bar.update)
        rows = [r.as_dict() for r in run_task(args, model)]
    print(f"{'model':<28} {'task':<10} {'metric':<14} {'value':>10} {'n':>6} {'seconds':>9}")
    for r in rows:
        print(f"{r['model'][:28]:<28} {r['task']:<10} {r['metric']:<14} {r['value']:>10.4f} {r['n']:>6} "
              f"{r['seconds']:>9.1f}")
    if args.out:
        atomic_write_text(args.out, json.dumps(rows, indent=1) + "\n")
        print(f"results written to {args.out}", file=sys.stderr)
    return 0


def run_task(args, model):
    """The EvalResult rows of --task on the model."""
    from ..engine.sampling import SamplingParams
    from ..eval import tasks
    if args.task == "bpb":
        text, source = tasks.evaluation_text(args.data, chars=args.chars)
        return tasks.run_bpb(model, text, source)
    if args.data is None and args.task in ("mc", "gen"):
        raise ValueError(f"--task {args.task} needs --data FILE.jsonl")
    if args.task == "mc":
        questions = tasks.read_questions(args.data, args.limit)
        return tasks.run_mc(model, questions, fewshot=args.fewshot, seed=args.seed, source=args.data)
    if args.task == "gen":
        items = tasks.read_generation_items(args.data, args.limit)
        params = SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
        return tasks.run_gen(model, items, params, source=args.data)
    return tasks.run_humaneval(model, limit=args.limit, samples=args.samples, ks=args.k,
                               temperature=args.temperature, max_tokens=args.max_tokens, chat=args.chat,
                               seed=args.seed)
