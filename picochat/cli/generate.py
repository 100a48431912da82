"""`picochat generate`: one reply to one prompt, streamed ('-' reads the prompt from standard input)."""
from __future__ import annotations

import sys

from .common import add_model_args, add_sampling_args, open_engine, sampling_from_args, stream

HELP = "generate once from a prompt ('-' reads stdin)"


def add_arguments(p):
    p.add_argument("prompt")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system prompt (with --chat)")


def run(args) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    engine = open_engine(args)
    params = sampling_from_args(args)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": prompt}]
        ids = engine.chat_prompt(messages)
    else:
        ids = engine.tokenizer.encode(prompt, add_special_tokens=True)
    stream(engine.generate(ids, params), args.verbose)
    return 0
