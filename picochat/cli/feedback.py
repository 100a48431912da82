"""`picochat feedback ls|export`: the ratings and corrected replies users gave on the chat page (POST
/v1/feedback), listed, or written out as training data (data/feedback.py)."""
from __future__ import annotations

import sys

HELP = "list the feedback given on replies, or export it as DPO pairs or SFT conversations"
DESCRIPTION = ("The chat page's thumbs up / down and 'edit this reply' are kept, with the conversation and the "
               "model that replied, in an SQLite file (~/.cache/picochat/feedback.db; $PICOCHAT_HOME moves it). "
               "`export --format dpo` writes preference pairs for `picochat dpo --data`, `--format sft` "
               "conversations for `picochat sft --data`.")
SNIPPET_CHARS = 36   # of the user's last message and of the reply, in `ls`
MODEL_CHARS = 30


def add_arguments(p):
    fs = p.add_subparsers(dest="feedback_command", required=True)
    ls = fs.add_parser("ls", help="a table of the feedback, oldest first")
    ls.add_argument("--json", action="store_true", help="a JSON array of every field instead")
    ls.add_argument("-n", "--limit", type=int, default=None, metavar="N", help="only the newest N")
    export = fs.add_parser("export", help="JSONL training data from the feedback",
                           description="dpo: {messages, chosen, rejected} pairs: an edited reply over the original, "
                                       "an 'up' reply over a 'down' one to the same conversation. sft: {messages} "
                                       "conversations ended by an edited or 'up' reply.")
    export.add_argument("--format", required=True, choices=["dpo", "sft"])
    export.add_argument("--out", default=None, metavar="FILE", help="write FILE (atomically) instead of stdout")
    for sub in (ls, export):
        sub.add_argument("--db", default=None, metavar="PATH", help="the feedback file (default: picochat's)")


def run(args) -> int:
    from ..data.feedback import FeedbackStore
    store = FeedbackStore(args.db)
    if args.feedback_command == "ls":
        return list_feedback(store, args)
    return export(store, args)


def list_feedback(store, args) -> int:
    import dataclasses
    import json
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    entries = store.entries(limit=args.limit)
    if args.json:
        print(json.dumps([dataclasses.asdict(e) for e in entries], ensure_ascii=False))
        return 0
    if not entries:
        print(f"no feedback in {store.path} yet: rate replies on the chat page of `picochat serve`")
        return 0
    columns = [("TIME", 16), ("RATING", 6), ("EDITED", 6), ("MODEL", MODEL_CHARS), ("USER", SNIPPET_CHARS)]
    print("  ".join(f"{name:<{width}}" for name, width in columns) + "  REPLY")
    for e in entries:
        model = e.model + (f" + {e.adapter}" if e.adapter else "")
        cells = [when(e.updated), e.rating, "yes" if e.edited is not None else "-", model, last_user_text(e.messages)]
        print("  ".join(f"{snippet(cell, width):<{width}}" for cell, (_, width) in zip(cells, columns))
              + "  " + snippet(e.final, SNIPPET_CHARS))
    return 0


def export(store, args) -> int:
    import json

    from ..atomic import atomic_write_text
    from ..data.feedback import dpo_pairs, sft_examples
    entries = store.entries()
    records = dpo_pairs(entries) if args.format == "dpo" else sft_examples(entries)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    what = "preference pairs" if args.format == "dpo" else "conversations"
    if not records:
        print(f"picochat: warning: no {what} in {len(entries)} rating(s) of {store.path}", file=sys.stderr)
    if args.out is None:
        sys.stdout.write(text)
    else:
        atomic_write_text(args.out, text)
        print(f"{len(records)} {what} from {len(entries)} rating(s) written to {args.out}")
    return 0


def when(timestamp: float) -> str:
    import time
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp))


def last_user_text(messages: list[dict]) -> str:
    return next((m.get("content") or "" for m in reversed(messages) if m.get("role") == "user"), "")


def snippet(text: str, width: int) -> str:
    """The first words of a text on one line, cut to `width` characters."""
    line = " ".join(text.split())
    return line if len(line) <= width else line[:width - 1] + "…"
