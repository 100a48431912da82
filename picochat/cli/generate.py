"""`picochat generate`: one reply to one prompt, streamed ('-' reads the prompt from standard input);
with --json-schema FILE, the reply is JSON valid under that schema (enforced by a grammar, for scripts)."""
from __future__ import annotations

import json
import sys

from .common import add_model_args, add_sampling_args, open_engine, sampling_from_args, stream

HELP = "generate once from a prompt ('-' reads stdin)"


def add_arguments(p):
    p.add_argument("prompt")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system prompt (with --chat)")
    p.add_argument("--json-schema", default=None, metavar="FILE",
                   help="answer with JSON valid under the JSON schema in FILE (enforced token by token; with "
                        "--chat the schema is also shown to the model)")


def read_schema(path: str) -> dict:
    """The JSON schema in `path`, read within the grammar's size limit; ValueError saying what is wrong."""
    from ..apps.reading import read_bounded
    from ..engine.grammar import MAX_SCHEMA_BYTES
    raw = read_bounded(path, MAX_SCHEMA_BYTES, advice="a JSON schema holds at most that much")
    try:
        schema = json.loads(raw)
    except ValueError as e:   # (UnicodeDecodeError too)
        raise ValueError(f"{path}: not a JSON schema: {e}") from None
    if not isinstance(schema, dict):
        raise ValueError(f"{path}: a JSON schema must be a JSON object, not {type(schema).__name__}")
    return schema


def run(args) -> int:
    schema = read_schema(args.json_schema) if args.json_schema else None
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    engine = open_engine(args)
    params = sampling_from_args(args)
    if schema is not None:
        from ..engine.grammar import GrammarError
        try:
            params.grammar = engine.grammars.json_schema(schema)
        except GrammarError as e:
            raise ValueError(f"{args.json_schema}: the schema cannot be enforced: {e}") from None
    if args.chat:
        from ..engine.tools import schema_instruction, with_system_note
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": prompt}]
        if schema is not None:
            messages = with_system_note(messages, schema_instruction(schema))
        ids = engine.chat_prompt(messages)
    else:
        ids = engine.tokenizer.encode(prompt, add_special_tokens=True)
    stream(engine.generate(ids, params), args.verbose)
    return 0
