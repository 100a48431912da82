"""The `picochat` command: a table of commands, one module each with `add_arguments(parser)` and `run(args)`.

Only this package prints and exits; the library raises exceptions with clear messages, which main() turns
into one line on stderr (never a traceback) and exit status 1. Command modules import the library inside
`run`, so `picochat --help` and `picochat COMMAND --help` answer without loading torch.
"""
from __future__ import annotations

import argparse
import sys
import warnings

from .. import __version__
from . import (ask, chat, code, data, dpo, evaluate, feedback, generate, info, kb, ls, merge, pull, quantize, rl, serve,
               sft, summarize, train, tune)

COMMANDS = {  # in the order `picochat --help` lists them
    "chat": chat, "generate": generate, "info": info, "quantize": quantize, "serve": serve, "kb": kb,
    "ask": ask, "summarize": summarize, "code": code, "eval": evaluate, "pull": pull, "ls": ls, "data": data,
    "train": train, "sft": sft, "dpo": dpo, "rl": rl, "merge": merge, "feedback": feedback, "tune": tune,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="picochat", description="A small ChatGPT you can read, run, train and own.")
    parser.add_argument("--version", action="version", version=f"picochat {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        p = sub.add_parser(name, help=module.HELP, description=getattr(module, "DESCRIPTION", None))
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    """picochat's own warnings (resuming from another checkpoint than `latest`, validating on less data than
    asked) as one plain line; others as Python shows them."""
    if category.__module__.startswith("picochat."):
        print(f"picochat: warning: {message}", file=file or sys.stderr)
    else:
        _default(message, category, filename, lineno, file, line)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = _show_warning
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, KeyError) as e:  # our errors carry a message meant for people
        msg = str(e) if not isinstance(e, KeyError) else f"missing {e}"
        print(f"picochat: error: {msg}", file=sys.stderr)
        return 1
