"""`picochat serve`: the OpenAI-compatible HTTP API and the chat page (serve/), over the model -m."""
from __future__ import annotations

import sys

from .common import add_min_similarity, add_model_args, existing_kb, open_engine

HELP = "OpenAI-compatible HTTP API and web chat page"


def add_arguments(p):
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 requests")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the model's name)")
    p.add_argument("--parallel", type=int, default=8, help="sequences decoded together (default 8)")
    p.add_argument("--queue", type=int, default=64, help="requests that may wait for a free slot (default 64)")
    p.add_argument("--ctx-size", type=int, default=4096, help="context per sequence (default 4096, at most the model's)")
    p.add_argument("--timeout", type=float, default=600,
                   help="seconds a request may wait and generate before it ends with a 504 (default 600)")
    p.add_argument("--kb", action="append", default=[], metavar="NAME",
                   help="ground chat replies in this knowledge base (repeatable; the first is the default, a "
                        "request's \"kb\" field picks another or false for none)")
    p.add_argument("--base-only", action="store_true",
                   help="serve -m as it is: not the adapter `picochat tune` approved for it, and no swap when "
                        "another is approved (without --adapter, serve follows `picochat tune` by default)")
    add_min_similarity(p)


def run(args) -> int:
    import torch

    from ..serve.app import create_app, serve
    if args.threads:
        torch.set_num_threads(args.threads)
    model_id = served_name(args)
    watch = adapter_watch(args)
    app = create_app(lambda: open_engine(args),  # called on the server's engine thread, which does all model work
                     model_id, api_key=args.api_key, max_batch=args.parallel, max_queue=args.queue,
                     max_len=args.ctx_size, request_timeout=args.timeout, knowledge=server_knowledge(args),
                     watch=watch)
    tuned = f" with adapter {watch.name(watch.served())}" if watch is not None and watch.served() else ""
    print(f"picochat serving '{model_id}'{tuned} on http://{args.host}:{args.port}  (chat page at /, API at /v1)"
          + (f"; answering from knowledge base(s): {', '.join(args.kb)}" if args.kb else ""), file=sys.stderr)
    serve(app, host=args.host, port=args.port)  # on SIGTERM: in-flight streams finish or end cleanly
    return 0


def adapter_watch(args):
    """Serving what `picochat tune --from-feedback` approved for -m, swapped in when that changes (None: with
    --adapter or --base-only, the model is served as given)."""
    import argparse

    from ..apps import tuned
    from ..serve.state import AdapterWatch
    if args.adapter is not None or args.base_only:
        return None
    tuned.read_served(args.model)  # a damaged served.json fails now, with its name, not on the engine thread

    def load(adapter):
        return open_engine(argparse.Namespace(**{**vars(args), "adapter": None if adapter is None else str(adapter)}))
    return AdapterWatch(served=lambda: tuned.served_adapter(args.model), load=load,
                        name=lambda adapter: tuned.adapter_id(args.model, adapter))


def served_name(args) -> str:
    """The model id clients send: --model-name, a packaged model's name, or the file's or folder's name (an
    adapter's, with --adapter). Resolving the paths here fails fast on a bad one, before the server starts."""
    from ..hub import DEFAULT_MODEL, MODELS, resolve
    path = resolve(args.adapter) if args.adapter is not None else resolve(args.model)
    if args.adapter is not None and args.model is not None:
        resolve(args.model)
    if args.model_name:
        return args.model_name
    if args.adapter is None and (args.model is None or args.model in MODELS):
        return args.model or DEFAULT_MODEL
    return path.stem if path.is_file() else path.name


def server_knowledge(args):
    """The server's knowledge bases (checked now, opened on its engine thread) and embedding model."""
    from ..apps.kb import KnowledgeBase, kb_path
    from ..hub import find_embedding
    from ..load import load_encoder
    from ..serve.knowledge import Knowledge
    for name in args.kb:
        existing_kb(name)
    if args.kb:
        find_embedding()  # fail fast when the embedding model was never pulled
    return Knowledge(args.kb, open_kb=lambda name, encoder: KnowledgeBase(kb_path(name), encoder=encoder),
                     load_encoder=load_encoder, min_similarity=args.min_similarity)
