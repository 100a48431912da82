"""`picochat train`: pre-train a model on a prepared dataset (train/loop.py), alone or under torchrun."""
from __future__ import annotations

import argparse
import dataclasses
import sys

from ..model.config import PRESETS, ModelConfig
from ..train.config import MODEL_FIELDS_NOT_FLAGS, TRAIN_PRESETS, TrainConfig, add_config_args

HELP = "train a model on a prepared dataset (single process or under torchrun)"
DESCRIPTION = ("Train a model on a prepared dataset. Every field of the training and model configurations has a "
               "flag; a preset gives the rest. Under torchrun (--nproc_per_node=N) it trains data-parallel "
               "(--distributed ddp or fsdp).")


def add_arguments(p):
    p.add_argument("--preset", choices=list(TRAIN_PRESETS), default=None,
                   help="model and training settings to start from (default: demo; with --resume: the checkpoint's)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="DIR",
                   help="continue the run in --out-dir from its latest checkpoint, or from DIR (a checkpoint or a "
                        "run's out dir), exactly where it stopped")
    add_config_args(p)


def run(args) -> int:
    from ..train.loop import train
    model_config, train_config = configs_from_args(args)
    result = train(train_config, model_config, resume=args.resume, on_record=show_record)
    if result.rank == 0:
        val = f", val loss {result.val_loss:.4f}, {result.val_bpb:.4f} bits/byte" if result.val_loss is not None else ""
        print(f"trained {result.step:,} steps ({result.tokens:,} tokens) in {result.elapsed:.0f} s: "
              f"loss {result.loss:.4f}{val}", file=sys.stderr)
        print(result.checkpoint)
    return 0


def show_record(record: dict, what: str = "bits per byte"):
    """Validation results and samples of a training run, printed above its progress bar."""
    from tqdm import tqdm
    if "val_loss" in record:
        extra = f", {record['val_bpb']:.4f} bits/byte" if what == "bits per byte" else f" ({what})"
        tqdm.write(f"step {record['step']}: val loss {record['val_loss']:.4f}{extra}", file=sys.stderr)
    if "sample" in record:
        tqdm.write(f"--- sample at step {record['step']} ---\n{record['sample']}\n---", file=sys.stderr)


def configs_from_args(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig]:
    """The preset named by args.preset (or the checkpoint being resumed), with the given flags applied."""
    given = vars(args)
    model_names = {f.name for f in dataclasses.fields(ModelConfig)} - set(MODEL_FIELDS_NOT_FLAGS)
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    model_over = {k: v for k, v in given.items() if k in model_names}
    train_over = {k: v for k, v in given.items() if k in train_names}
    preset = getattr(args, "preset", None)
    resume = getattr(args, "resume", None)
    if resume is not None and preset is None:  # continue with the configuration the checkpoint was made with
        from ..train.checkpoint import checkpoint_configs, find_checkpoint
        model_config, train_config = checkpoint_configs(find_checkpoint(resume, train_over.get("out_dir")))
    else:
        preset = preset or "demo"
        if preset not in TRAIN_PRESETS:
            raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(TRAIN_PRESETS)}")
        model_config, train_config = PRESETS[preset], TRAIN_PRESETS[preset]
    if ("n_embd" in model_over or "n_head" in model_over) and "head_dim" not in model_over:
        model_over["head_dim"] = None  # recomputed as n_embd // n_head
    if "n_head" in model_over and "n_kv_head" not in model_over and model_config.n_kv_head == model_config.n_head:
        model_over["n_kv_head"] = model_over["n_head"]  # stay multi-head if the preset was
    if "seq_len" in train_over and "max_seq_len" not in model_over:
        model_over["max_seq_len"] = max(model_config.max_seq_len, train_over["seq_len"])
    return model_config.replace(**model_over), dataclasses.replace(train_config, **train_over)
