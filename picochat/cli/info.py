"""`picochat info`: what a model holds (read from its headers), or with --system what this machine is and
what picochat chose for it."""
from __future__ import annotations

HELP = "describe a model: architecture, parameters, dtypes, context, template"


def add_arguments(p):
    p.add_argument("model", nargs="?", default=None, help="folder, .gguf file or packaged name (default: qwen2.5-coder-1.5b)")
    p.add_argument("--system", action="store_true",
                   help="describe this machine instead: the CPU, the precision and kernels picochat chose and why")


def run(args) -> int:
    if args.system:
        from ..quant.tuning import report
        for key, value in report().items():
            print(f"{key:<18} {value}")
        if args.model is None:
            return 0
        print()
    from ..apps.info import describe
    for key, value in describe(args.model).items():
        print(f"{key:<18} {value}")
    return 0
