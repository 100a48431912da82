"""`picochat dpo`: preference tuning on chosen / rejected pairs, full or LoRA (train/dpo.py)."""
from __future__ import annotations

import sys

from ..train.config import add_config_args
from .sft import add_lora_args, lora_config, train_config

HELP = "preference-tune a model on pairs of a better and a worse reply (DPO, IPO or SimPO)"
DESCRIPTION = ("Direct preference optimisation on the one training loop. Pairs: JSONL of {\"prompt\": TEXT or "
               "\"messages\": [... ending with a user turn], \"chosen\": REPLY, \"rejected\": REPLY} (what "
               "`picochat feedback export --format dpo` writes). The reference is the frozen base: with "
               "--lora-rank the same weights with the adapter off.")


def add_arguments(p):
    p.add_argument("-m", "--model", default=None, help="the model to tune: folder, .gguf or packaged name "
                   "(often an SFT run's output)")
    p.add_argument("--data", required=True, metavar="FILE", help="a .jsonl file of preference pairs")
    p.add_argument("--beta", type=float, default=0.1, help="β: how far from the reference the policy may go "
                   "(default 0.1)")
    p.add_argument("--loss", choices=["sigmoid", "ipo", "simpo"], default="sigmoid",
                   help="sigmoid (DPO, default), ipo, or simpo (length-normalised, no reference)")
    p.add_argument("--sft-weight", type=float, default=0.0, metavar="ALPHA",
                   help="add ALPHA × the chosen reply's SFT loss (RPO; keeps good replies likely, e.g. 1.0)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="pairs held out to measure (default 0.1)")
    add_lora_args(p)
    add_config_args(p, model_flags=False)


def show_pairs_record(record: dict):
    """Held-out pairs as they are measured, above the progress bar."""
    from tqdm import tqdm
    if "val_loss" in record:
        tqdm.write(f"step {record['step']}: held-out pairs: loss {record['val_loss']:.4f}, chosen wins "
                   f"{record['val_accuracy']:.1%}, reward margin {record['val_margin']:+.3f}", file=sys.stderr)


def run(args) -> int:
    from ..train.dpo import dpo, dpo_defaults
    lora = lora_config(args)
    config = train_config(args, dpo_defaults(lora is not None))
    result = dpo(args.model, args.data, config, lora=lora, beta=args.beta, loss_type=args.loss,
                 val_fraction=args.val_fraction, resume=args.resume, on_record=show_pairs_record,
                 sft_weight=args.sft_weight)
    if result.rank == 0:
        val = f", held-out loss {result.val_loss:.4f}" if result.val_loss is not None else ""
        print(f"preference-tuned {result.step:,} steps in {result.elapsed:.0f} s: loss {result.loss:.4f}{val}",
              file=sys.stderr)
        print(result.checkpoint)
    return 0
