"""`picochat summarize`: a summary of a document of any length (apps/summarize.py: map-reduce over its parts)."""
from __future__ import annotations

import sys

from ..apps.reading import MAX_FILE_BYTES
from .ask import NO_GROUNDING
from .common import add_max_file_arg, add_model_args, add_remote_args, backend, max_file_bytes, progress_bar

HELP = "summarize a document of any length (map-reduce over its parts)"
# a long book is ~1 MB; 4 MiB is about a million tokens, hours of reading on a laptop: more is likely a mistake
SUMMARY_MAX_BYTES = 4 * 2**20


def add_arguments(p):
    p.add_argument("file", help="a text, Markdown, HTML or PDF file; '-' reads standard input")
    add_model_args(p)
    add_remote_args(p)
    p.add_argument("--words", type=int, default=80, help="about how long the summary is (default 80 words)")
    p.add_argument("--ctx-size", type=int, default=None, help="context to split for (default: the model's)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=None)
    add_max_file_arg(p, "file (or standard input)", SUMMARY_MAX_BYTES)


def run(args) -> int:
    from ..apps.summarize import summarize
    from ..engine.sampling import SamplingParams
    text = read_input(args.file, max_file_bytes(args))
    if not text.strip():
        raise ValueError(f"{args.file} holds no text to summarize")
    model = backend(args, extra_body=NO_GROUNDING)
    context, count_tokens = summary_budget(args, model)
    params = SamplingParams(max_new_tokens=max(16, 2 * args.words), temperature=args.temperature, seed=args.seed)
    bar, progress = progress_bar("summarize", " rounds")
    with bar:
        result = summarize(model, text, words=args.words, context_tokens=context, count_tokens=count_tokens,
                           params=params, progress=progress)
    print(result.summary)
    if args.verbose:
        print(f"[{result.pieces} pieces, {result.rounds} round(s), {result.calls} model calls]", file=sys.stderr)
    return 0


def read_input(path: str, max_bytes: int = MAX_FILE_BYTES) -> str:
    """A file's text ('-': standard input), at most max_bytes of it; documents in other formats are read as the
    knowledge base reads them. DocumentError for more, or for binary data."""
    from ..apps.documents import read_document
    from ..apps.reading import decode_text, read_stream_bounded
    if path == "-":
        return decode_text(read_stream_bounded(sys.stdin, max_bytes), "standard input")
    document = read_document(path, max_bytes=max_bytes)
    return "\n\n".join((f"{s.heading}\n{s.text}" if s.heading else s.text) for s in document.sections)


def summary_budget(args, model):
    """(context tokens, token counter) for splitting: the local model's, or --ctx-size over a server
    (counting a token per 3 characters, on the safe side: a server's tokenizer is not at hand)."""
    if args.base_url:
        return args.ctx_size or 2048, lambda text: len(text) // 3 + 1
    tokenizer = model.tokenizer
    context = min(model.engine.context_length, args.ctx_size or model.engine.context_length)
    return context, lambda text: len(tokenizer.encode(text))
