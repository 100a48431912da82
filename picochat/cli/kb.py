"""`picochat kb add|set|search|ls|rm`: knowledge bases of the user's documents (apps/kb.py)."""
from __future__ import annotations

import sys

from .common import add_max_file_arg, max_file_bytes, open_kb, progress_bar

HELP = "knowledge bases: add documents, search, list, remove"
DESCRIPTION = ("A knowledge base is an SQLite file (in ~/.cache/picochat/kb/NAME.sqlite, or a path ending in "
               ".sqlite) of passages from text, Markdown, HTML and PDF files, searched by keywords (BM25) and "
               "meaning (all-MiniLM-L6-v2) together.")


def add_arguments(kb):
    ks = kb.add_subparsers(dest="kb_command", required=True)
    p = ks.add_parser("add", help="add (or update) files and folders",
                      description="Add (or update) files and folders. Exit status 1 when no file was added, "
                                  "updated or found unchanged (every file skipped, or none found); 0 otherwise.")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--kb", required=True, metavar="NAME")
    p.add_argument("--persona", default=None, help="the assistant's system prompt for this knowledge base")
    p.add_argument("--handoff", default=None, help="what to say when the answer is not in it")
    add_max_file_arg(p, "file")
    p = ks.add_parser("set", help="set the persona (system prompt) or the hand-off text")
    p.add_argument("--kb", required=True, metavar="NAME")
    p.add_argument("--persona", default=None)
    p.add_argument("--handoff", default=None)
    p = ks.add_parser("search", help="show the passages a query retrieves, with scores and sources")
    p.add_argument("query")
    p.add_argument("--kb", required=True, metavar="NAME")
    p.add_argument("-k", type=int, default=5, help="results (default 5)")
    p = ks.add_parser("ls", help="list knowledge bases, or with --kb the documents of one")
    p.add_argument("--kb", default=None, metavar="NAME")
    p = ks.add_parser("rm", help="remove documents",
                      description="Remove documents by file, or every document under a folder. A folder that "
                                  "holds every document (., /, the folder of them all) is refused without --all.")
    p.add_argument("paths", nargs="*", metavar="PATH")
    p.add_argument("--kb", required=True, metavar="NAME")
    p.add_argument("--all", action="store_true",
                   help="remove every document (alone, or to let a PATH that holds them all remove them)")


def run(args) -> int:
    return {"add": add, "set": set_texts, "search": search, "ls": ls, "rm": rm}[args.kb_command](args)


def add(args) -> int:
    from ..hub import find_embedding
    find_embedding()   # before the knowledge base's file is created: a clear error if it was never pulled
    kb = open_kb(args.kb, must_exist=False)
    for key in ("persona", "handoff"):
        if getattr(args, key) is not None:
            kb.set_setting(key, getattr(args, key))
    bar, progress = progress_bar(f"kb {args.kb}", " docs")
    with bar:
        report = kb.add(args.paths, progress=progress, max_bytes=max_file_bytes(args))
    print(f"{args.kb}: {report.added} added, {report.updated} updated, {report.unchanged} unchanged "
          f"({report.passages} passages)")
    for path, reason in report.skipped:
        print(f"  skipped {path}: {reason.removeprefix(f'{path}: ')}", file=sys.stderr)   # named once
    if report.added + report.updated + report.unchanged == 0:   # unchanged files: nothing to do, not an error
        found = (f"every file was skipped ({len(report.skipped)})" if report.skipped
                 else "no .txt .md .markdown .html .htm .pdf files found")
        print(f"picochat: error: nothing was added to {args.kb}: {found}", file=sys.stderr)
        return 1
    return 0


def set_texts(args) -> int:
    kb = open_kb(args.kb)
    for key in ("persona", "handoff"):
        if getattr(args, key) is not None:
            kb.set_setting(key, getattr(args, key))
            print(f"{args.kb}: {key} set")
    return 0


def search(args) -> int:
    kb = open_kb(args.kb)
    hits = kb.search(args.query, k=args.k)
    if not hits:
        print("no passage matches")
    for i, h in enumerate(hits, 1):
        where = f"{h.source}" + (f" § {h.section}" if h.section else "")
        ranks = f"bm25 #{h.bm25_rank}" if h.bm25_rank is not None else "bm25 -"
        print(f"{i}. score {h.score:.4f}  similarity {h.similarity:.3f}  ({ranks}, vector #{h.vector_rank})  {where}")
        print("   " + " ".join(h.text.split())[:300])
    return 0


def ls(args) -> int:
    from ..apps.kb import kb_path
    from ..paths import cache_dir
    if args.kb is None:
        folder = cache_dir() / "kb"
        names = sorted(p.stem for p in folder.glob("*.sqlite")) if folder.is_dir() else []
        print("\n".join(names) if names else f"no knowledge bases in {folder}; create one with "
                                             "`picochat kb add FILES... --kb NAME`")
        return 0
    kb = open_kb(args.kb)
    docs = kb.documents()
    print(f"{args.kb}: {len(docs)} document(s) in {kb_path(args.kb)}")
    for d in docs:
        print(f"  {d.passages:>5} passages  {d.source}")
    return 0


def rm(args) -> int:
    from ..apps.kb import RemovesEverything
    if not args.paths and not args.all:
        raise ValueError("give the files or folders to remove, or --all to remove every document")
    if any(not p.strip() for p in args.paths):   # checked before any is removed
        raise ValueError("an empty PATH names no document (an unset shell variable?); give the file or folder "
                         f"to remove, or --all to remove every document of {args.kb}")
    kb = open_kb(args.kb)
    if not args.paths:
        print(f"{args.kb}: {kb.remove_all()} document(s) removed")
        return 0
    removed = []
    try:
        for p in args.paths:
            removed.append(kb.remove(p, everything=args.all))
    except RemovesEverything as e:
        before = f" ({sum(removed)} PATH(s) before it were removed)" if any(removed) else ""
        raise ValueError(f"{e.what}; to remove them all, run `picochat kb rm --all --kb {args.kb}`"
                         f"{before}") from None
    missing = [p for p, gone in zip(args.paths, removed) if not gone]
    for p in missing:
        print(f"picochat: warning: {p} is not in {args.kb}", file=sys.stderr)
    print(f"{args.kb}: {len(args.paths) - len(missing)} document(s) removed")
    return 1 if missing and len(missing) == len(args.paths) else 0
