"""`picochat data prepare`: corpus -> trained tokenizer -> token shards (data/prepare.py)."""
from __future__ import annotations

import time

from .common import count

HELP = "prepare training data (text -> token shards)"


def add_arguments(data):
    sub = data.add_subparsers(dest="data_command", required=True)
    p = sub.add_parser("prepare", help="tokenize files, folders, JSONL or named corpora into token shards",
                       description="Train (or take) a tokenizer and write token shards, meta.json and the tokenizer "
                                   "to DIR.")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="a file; a folder (recursive: .txt .md .markdown .rst .py one document per file, .jsonl "
                        "one per line); a .jsonl file; or a named source: sharegpt, python-stdlib, chatterbot")
    p.add_argument("--out", required=True, metavar="DIR", help="the dataset folder to write")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--vocab-size", type=count, default=8192, metavar="N",
                       help="train a byte-level BPE tokenizer with this many tokens (default 8192)")
    group.add_argument("--tokenizer", metavar="PATH", default=None,
                       help="use this tokenizer: a folder with tokenizer.json, the file, a model or dataset folder")
    p.add_argument("--val-fraction", type=float, default=0.005, metavar="F",
                   help="share of documents for validation, by a hash of their text (default 0.005, at least 1)")
    p.add_argument("--min-val-tokens", type=count, default=16 * 512 + 1, metavar="N",
                   help="give validation at least N tokens, moving documents from training (or the end of one) when "
                        "the hashed split gives fewer; at most 10%% of the corpus (default 8193: one 16 × 512 "
                        "evaluation batch; 0: never)")
    p.add_argument("--workers", type=int, default=None, metavar="N", help="tokenizing processes (default: all cores)")
    p.add_argument("--shard-tokens", type=count, default=100_000_000, metavar="N",
                   help="tokens per shard file (default 100M)")
    p.add_argument("--max-chars", type=count, default=None, metavar="N",
                   help="stop each source after this many characters (e.g. 20M)")
    p.add_argument("--max-documents", type=count, default=None, metavar="N",
                   help="stop each source after this many documents")
    p.add_argument("--min-chars", type=count, default=0, metavar="N", help="drop documents shorter than this")
    p.add_argument("--jsonl-field", default="text", metavar="NAME",
                   help="the text field of JSONL records (default: text)")
    p.add_argument("--force", action="store_true", help="replace DIR if it is not empty (once the new one is done)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def run(args) -> int:
    from ..data.prepare import PrepareConfig, prepare
    t0 = time.perf_counter()
    meta = prepare(PrepareConfig(
        sources=args.sources, out=args.out, vocab_size=args.vocab_size, tokenizer=args.tokenizer,
        val_fraction=args.val_fraction, min_val_tokens=args.min_val_tokens, workers=args.workers,
        shard_tokens=args.shard_tokens, max_chars=args.max_chars, max_documents=args.max_documents,
        min_chars=args.min_chars, jsonl_field=args.jsonl_field, force=args.force), progress=not args.quiet)
    seconds = time.perf_counter() - t0
    splits = meta["splits"]
    text_tokens = sum(s["tokens"] - s["documents"] for s in splits.values())  # without the boundary tokens
    print(f"prepared {args.out} in {seconds:.1f} s: {meta['documents']:,} documents, {meta['chars']:,} chars, "
          f"{meta['chars'] / max(text_tokens, 1):.2f} chars/token")
    for name, s in splits.items():
        print(f"  {name:<5} {s['documents']:>9,} documents {s['tokens']:>13,} tokens  ({len(s['shards'])} shard(s))")
    for line in validation_lines(meta):
        print(line)
    print(f"  tokenizer: {meta['vocab_size']:,} tokens ({meta['dtype']}), {meta['tokenizer_source']}")
    for s in meta["sources"]:
        print(source_line(s))
    return 0


def source_line(s: dict) -> str:
    """What one source gave, as `data prepare` reports it."""
    line = f"  {s['name']}: {s['documents']:,} documents, {s['chars']:,} chars"
    if "records_read" in s:
        if s["reached_end"]:
            whole = ", whose cut-off last record was skipped)" if s.get("incomplete_tail_chars") else ")"
            line += f", {s['records_read']:,} records read (the whole file{whole}"
        else:
            line += f", {s['records_read']:,} records read (stopped at the cap)"
    elif s.get("capped"):
        line += " (stopped at the cap)"
    if s["skipped"]:
        line += "; skipped " + ", ".join(f"{n:,} {why}" for why, n in s["skipped"].items())
    return line


def validation_lines(meta: dict) -> list[str]:
    """What the top-up gave validation beyond its hashed split, and whether the cap left it short."""
    top, val = meta["val_top_up"], meta["splits"]["val"]["tokens"]
    moved = []
    if top["moved_documents"]:
        moved.append(f"{top['moved_documents']:,} training documents ({top['moved_tokens']:,} tokens)")
    cut = top["cut_document"]
    if cut:
        moved.append(f"the last {cut['tokens_moved']:,} tokens of document {cut['document']} of {cut['source']} "
                     f"(cut: its first {cut['tokens_kept']:,} stay in training)")
    lines = []
    if moved:
        lines.append(f"  val topped up from {top['hashed_val_tokens']:,} to {val:,} tokens with " + " and ".join(moved))
    if val < top["min_val_tokens"]:
        lines.append(f"  val has fewer tokens than --min-val-tokens {top['min_val_tokens']:,}: a top-up takes at most "
                     f"{top['max_share']:.0%} of the corpus ({top['cap_tokens']:,} tokens)")
    return lines
