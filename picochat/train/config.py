"""A training run's settings: TrainConfig (everything but the model's shape, which is ModelConfig), the
presets, the checks, and one command-line flag per field (`--lr 3e-4`, `--n-layer 4`, `--compile/--no-compile`).

Plain dataclasses and argparse: importing this costs nothing (no torch), so `picochat train --help` is quick.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass

from ..model.config import ModelConfig


@dataclass
class TrainConfig:
    """Everything about a training run except the model's shape (that is ModelConfig)."""
    data_dir: str = ""                 # a prepared dataset folder (`picochat data prepare`)
    out_dir: str = "out"               # checkpoints, metrics.jsonl, loss.png
    # batch: one optimizer step sees world_size × grad_accum × batch_size sequences of seq_len tokens
    batch_size: int = 8                # sequences per forward pass, per process
    seq_len: int = 256
    grad_accum: int = 1                # forward/backward passes per optimizer step
    total_batch_tokens: int = 0        # > 0: derive grad_accum so that a step sees this many tokens
    # how long: whichever budget is reached first ends the run (0 = no such budget)
    max_steps: int = 1000
    max_tokens: int = 0
    max_time: float = 0.0              # seconds of wall-clock time
    # optimizer
    optimizer: str = "adamw"           # "adamw" | "muon" (Muon for the 2-D hidden matrices, AdamW for the rest)
    lr: float = 3e-3                   # peak learning rate of AdamW
    muon_lr: float = 0.02              # peak learning rate of Muon (with --optimizer muon)
    weight_decay: float = 0.1          # decoupled; matrices only (never norms, biases or embeddings)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0             # max global gradient norm (0 = off)
    # learning-rate schedule: linear warmup, then "cosine" | "wsd" (warmup-stable-decay) | "constant"
    schedule: str = "cosine"
    warmup_steps: int = 100
    decay_frac: float = 0.2            # wsd: the last fraction of the run that decays
    min_lr_frac: float = 0.1           # the final learning rate, as a fraction of the peak
    # numerics and hardware
    dtype: str = "auto"                # autocast dtype: "auto" (what this CPU/GPU is fast at) | "bfloat16" | "float32"
    compile: bool = False              # torch.compile the model
    device: str = "auto"               # "auto" (cuda if available) | "cpu" | "cuda"
    threads: int = 0                   # CPU threads per process (0 = torch's default)
    distributed: str = "ddp"           # under torchrun: "ddp" (replicas) | "fsdp" (FSDP2, sharded)
    vocab_multiple: int = 64           # round the model's vocabulary up to a multiple of this
    # periodic work, every N steps (0 = only at the end)
    eval_interval: int = 250
    eval_batches: int = 20             # validation batches (batch_size × seq_len tokens per process each)
    sample_interval: int = 250
    sample_prompt: str = "The"
    sample_tokens: int = 64
    sample_temperature: float = 0.8    # 0 = greedy
    checkpoint_interval: int = 500
    keep_last: int = 3                 # checkpoints to keep (0 = all)
    seed: int = 1337


# Training presets; the model shape of each lives in config.PRESETS under the same name.
TRAIN_PRESETS: dict[str, TrainConfig] = {
    # seconds on a CPU: for tests and smoke runs
    "tiny": TrainConfig(batch_size=8, seq_len=128, max_steps=200, lr=3e-3, warmup_steps=20,
                        eval_interval=100, eval_batches=4, sample_interval=100, checkpoint_interval=100,
                        dtype="float32"),
    # ~10 minutes on 2 CPU cores (a 9.5-minute cap if the machine is slower): 5.5M parameters that write
    # English words and punctuation. Muon: at this size it learns several times faster per step than AdamW
    "demo": TrainConfig(batch_size=16, seq_len=256, max_steps=1000, max_time=570, optimizer="muon", lr=3e-3,
                        muon_lr=0.02, weight_decay=0.0, warmup_steps=50, schedule="cosine", min_lr_frac=0.05,
                        compile=True, eval_interval=250, eval_batches=8, sample_interval=250,
                        checkpoint_interval=500, sample_tokens=80,
                        sample_prompt="User: Write a short story about a dog.\n\nAssistant:"),
    # ~1 hour on 2 CPU cores (capped at 59 minutes): 13.8M parameters, ~4,100 tokens/s, ~14M tokens
    "small": TrainConfig(batch_size=16, seq_len=512, max_steps=1700, max_time=3540, optimizer="muon", lr=3e-3,
                         muon_lr=0.02, weight_decay=0.0, warmup_steps=50, schedule="cosine", min_lr_frac=0.05,
                         compile=True, eval_interval=200, eval_batches=8, sample_interval=400,
                         checkpoint_interval=400, sample_tokens=80,
                         sample_prompt="User: Write a short story about a dog.\n\nAssistant:"),
    # GPT-2 (124M) as nanoGPT trains it: 0.5M tokens a step, ~10B tokens; for GPUs
    "gpt2-124m": TrainConfig(batch_size=16, seq_len=1024, total_batch_tokens=524288, max_steps=19073, lr=6e-4,
                             warmup_steps=715, schedule="cosine", min_lr_frac=0.1, compile=True,
                             eval_interval=250, eval_batches=20, sample_interval=1000, checkpoint_interval=2000),
    # nanochat's depth-20 model (~560M parameters, ~11B tokens: 20 tokens per parameter); for 8 GPUs
    "d20": TrainConfig(batch_size=32, seq_len=2048, total_batch_tokens=524288, max_steps=21400,
                       optimizer="muon", lr=3e-3, muon_lr=0.02, weight_decay=0.0, warmup_steps=0,
                       schedule="wsd", decay_frac=0.2, min_lr_frac=0.0, compile=True,
                       eval_interval=250, eval_batches=40, sample_interval=2000, checkpoint_interval=2000),
}

CHOICES = {"optimizer": ("adamw", "muon"), "schedule": ("cosine", "wsd", "constant"),
           "dtype": ("auto", "bfloat16", "float32"), "device": ("auto", "cpu", "cuda"), "distributed": ("ddp", "fsdp")}

# ModelConfig fields the command line does not set: they come from the dataset's tokenizer, or are
# structured values a flag cannot hold.
MODEL_FIELDS_NOT_FLAGS = ("vocab_size", "bos_token_id", "eos_token_id", "rope_scaling", "extra")


def validate(config: TrainConfig):
    """Raise ValueError naming the first setting that cannot work."""
    for name, allowed in CHOICES.items():
        if getattr(config, name) not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {getattr(config, name)!r}")
    for name in ("batch_size", "seq_len", "grad_accum", "vocab_multiple"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(config, name)}")
    if config.max_steps <= 0 and config.max_tokens <= 0 and config.max_time <= 0:
        raise ValueError("the run needs a budget: set max_steps, max_tokens or max_time")
    if config.lr < 0 or config.muon_lr < 0 or config.weight_decay < 0 or config.grad_clip < 0:
        raise ValueError("lr, muon_lr, weight_decay and grad_clip must not be negative")
    if not 0 < config.decay_frac <= 1:
        raise ValueError(f"decay_frac must be in (0, 1], got {config.decay_frac}")
    if not 0 <= config.min_lr_frac <= 1:
        raise ValueError(f"min_lr_frac must be in [0, 1], got {config.min_lr_frac}")
    if not config.data_dir:
        raise ValueError("no dataset: give --data-dir (a folder made by `picochat data prepare`)")


def check_exportable(config: ModelConfig):
    """A trained model must save as a Hugging Face folder that loads back as the same model."""
    back = ModelConfig.from_hf(config.to_hf())
    ours, theirs = dataclasses.asdict(config), dataclasses.asdict(back)
    diff = [k for k in ours if k != "extra" and ours[k] != theirs[k]]
    if diff:
        raise ValueError(f"this model cannot be saved as a Hugging Face {config.architecture} folder: "
                         + ", ".join(f"{k}={ours[k]!r} (a {config.architecture} model has {theirs[k]!r})"
                                     for k in diff))


# ----------------------------------------------------------------------------- command-line flags
def _flag_type(cls, name):
    """The Python type of a dataclass field (int | None -> int)."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def add_config_args(parser: argparse.ArgumentParser, model_flags: bool = True):
    """One flag per field of TrainConfig and ModelConfig: `--lr 3e-4`, `--n-layer 4`, `--compile/--no-compile`.

    Flags default to "not given", so a preset (or the checkpoint being resumed) supplies the rest.
    model_flags=False: training flags only (fine-tuning keeps the pretrained model's shape).
    """
    classes = ((TrainConfig, "training (overrides the preset)"),
               (ModelConfig, "model shape (overrides the preset; vocab size comes from the dataset)"))
    for cls, title in classes if model_flags else classes[:1]:
        group = parser.add_argument_group(title)
        for f in dataclasses.fields(cls):
            if cls is TrainConfig and not model_flags and f.name == "data_dir":
                continue
            if cls is ModelConfig and f.name in MODEL_FIELDS_NOT_FLAGS:
                continue
            kind = _flag_type(cls, f.name)
            flag = "--" + f.name.replace("_", "-")
            default = f.default if f.default is not dataclasses.MISSING else None
            if kind is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                   help=f"(default {default})")
            else:
                group.add_argument(flag, type=kind, default=argparse.SUPPRESS,
                                   metavar=None if f.name in CHOICES else kind.__name__.upper(),
                                   choices=CHOICES.get(f.name), help=f"(default {default})")
