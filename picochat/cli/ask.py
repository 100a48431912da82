"""`picochat ask`: answer a question from a knowledge base or a file, citing the passages used (apps/assistant.py)."""
from __future__ import annotations

import sys

from ..apps.reading import MAX_FILE_BYTES
from .common import add_kb_args, add_max_file_arg, add_model_args, add_remote_args, backend, max_file_bytes, open_kb

HELP = "answer a question from a knowledge base or a file, showing the passage used"
NO_GROUNDING = {"kb": False}  # the application brings its own prompt: a picochat server must not ground it again


def add_arguments(p):
    p.add_argument("question")
    add_model_args(p)
    add_remote_args(p)
    add_kb_args(p, "answer from the knowledge base NAME")
    p.add_argument("--file", default=None, help="answer from this file (text, Markdown, HTML or PDF)")
    add_max_file_arg(p, "--file")
    p.add_argument("--quote", action="store_true",
                   help="answer with the exact sentence of the text that answers (extractive: no model runs)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--seed", type=int, default=None)


def run(args) -> int:
    import tempfile

    from ..apps import assistant
    from ..engine.sampling import SamplingParams
    if (args.kb is None) == (args.file is None):
        raise ValueError("give the text to answer from: --kb NAME or --file FILE (one of them)")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="picochat-ask-") as tmp:
        kb = open_kb(args.kb) if args.kb else file_kb(args.file, tmp, max_file_bytes(args))
        # --quote answers with the text's own sentence: no model is loaded
        model = None if args.quote else backend(args, extra_body=NO_GROUNDING)
        result = assistant.answer(model, kb, args.question, params, k=args.top_k_passages,
                                  min_similarity=args.min_similarity, generate=not args.quote)
        kb.close()
    if result.grounding.declined:
        print(result.text)
    elif args.quote:
        print(f"\u201c{result.quote}\u201d\n  \u2014 {result.quote_source.label}")
    else:
        print(result.text + assistant.footer_of(result.text, result.grounding))
    if args.verbose:
        for s in result.sources:
            print(f"[{s.number}] {s.label} (similarity {s.similarity:.2f}): {' '.join(s.text.split())[:300]}",
                  file=sys.stderr)
    return 0


def file_kb(path: str, folder: str, max_bytes: int = MAX_FILE_BYTES):
    """A one-off knowledge base of one file, in a temporary folder."""
    from ..apps.reading import read_bounded
    from ..apps.kb import KnowledgeBase
    from ..load import load_encoder
    # refused here, by name, before the encoder loads: a FIFO, a device, a symbolic link loop, a file over
    # max_bytes
    read_bounded(path, max_bytes)
    kb = KnowledgeBase(f"{folder}/ask.sqlite", encoder=load_encoder())
    report = kb.add([path], max_bytes=max_bytes)
    if report.skipped:
        raise ValueError(f"cannot read {path}: {report.skipped[0][1]}")
    return kb
