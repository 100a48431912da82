"""The training loop: one loop for pretraining and chat fine-tuning (sft.py: masked targets, LoRA).

Each optimizer step:

    (x, y) batches -> forward under bfloat16 autocast -> loss -> backward (gradient accumulation)
    -> clip the gradient norm -> AdamW (or Muon for hidden matrices) at the scheduled learning rate

and every N steps: validation loss and bits per byte, a text sample, and a checkpoint (a Hugging Face
folder plus optimizer state, step, data position and RNG states) that `--resume` continues exactly —
from the newest complete checkpoint, however the last process died (even SIGKILLed mid-save).

    picochat train --preset demo --data-dir data/demo --out-dir out/demo
    torchrun --nproc_per_node=2 -m picochat.cli train ... --distributed ddp     # or fsdp (FSDP2)

Targets equal to -100 are ignored, and only parameters with requires_grad are trained, so the same
loop serves chat fine-tuning (masked prompts) and LoRA (a few trainable matrices).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import time
import typing
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .config import PRESETS, ModelConfig
from .data import DataError, TokenStream, read_meta
from .evaluation import validation_loss
from .formats.atomic import atomic_write, atomic_write_text, fsync_dir, fsync_tree
from .formats.hf import CheckpointError, load_hf_folder, read_config, save_hf_folder
from .formats.runs import (CHECKPOINT_FORMAT, TRAIN_STATE, CheckpointWarning,  # noqa: F401 (re-exported)
                           checkpoint_folders, checkpoint_problem, holds_run, latest_checkpoint, read_train_state)
from .model import GPT
from .tokenizer import Tokenizer


# ----------------------------------------------------------------------------- configuration
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


def configs_from_args(args) -> tuple[ModelConfig, TrainConfig]:
    """The preset named by args.preset (or the checkpoint being resumed), with the given flags applied."""
    given = vars(args)
    model_names = {f.name for f in dataclasses.fields(ModelConfig)} - set(MODEL_FIELDS_NOT_FLAGS)
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    model_over = {k: v for k, v in given.items() if k in model_names}
    train_over = {k: v for k, v in given.items() if k in train_names}
    preset = getattr(args, "preset", None)
    resume = getattr(args, "resume", None)
    if resume is not None and preset is None:  # continue with the configuration the checkpoint was made with
        folder = find_checkpoint(resume, train_over.get("out_dir"))
        model_config, train_config = checkpoint_configs(folder)
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


# ----------------------------------------------------------------------------- learning-rate schedule
def lr_schedule(step: int, total_steps: int, config: TrainConfig, elapsed: float = 0.0) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based).

    Linear warmup over warmup_steps, then a decay over the rest of the run: cosine down to min_lr_frac,
    or warmup-stable-decay (flat, then linear down to min_lr_frac over the last decay_frac), or constant.
    With a time budget, progress is whichever of steps and time is further along.
    """
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = 0.0
    if total_steps > 0:  # the last step (total_steps - 1) reaches progress 1 exactly
        progress = (step - config.warmup_steps) / max(1, total_steps - 1 - config.warmup_steps)
    if config.max_time > 0:
        progress = max(progress, elapsed / config.max_time)
    progress = min(max(progress, 0.0), 1.0)
    floor = config.min_lr_frac
    if config.schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if config.schedule == "wsd":
        start = 1 - config.decay_frac
        return 1.0 if progress <= start else floor + (1 - floor) * (1 - progress) / config.decay_frac
    return 1.0


# ----------------------------------------------------------------------------- optimizers
def param_groups(model: nn.Module, config: TrainConfig) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Trainable parameters by treatment: "muon" (2-D hidden matrices, with --optimizer muon),
    "decay" (other matrices: AdamW with weight decay), "no_decay" (norms, biases, embeddings)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    groups = {"muon": [], "decay": [], "no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim == 2 and id(p) not in embeddings:
            hidden = name.startswith("layers.")  # the Transformer blocks: not the embedding, not the head
            groups["muon" if config.optimizer == "muon" and hidden else "decay"].append((name, p))
        else:
            groups["no_decay"].append((name, p))
    return groups


class Muon(torch.optim.Muon):
    """torch.optim.Muon with its Newton–Schulz orthogonalisation in a chosen dtype, batched.

    torch runs the iteration in bfloat16, which a CPU without native bf16 (AVX2-only) multiplies several
    times slower than float32: there it made Muon's step most of a training step. And it orthogonalises
    one matrix at a time; a small model has dozens of small matrices of a few shapes, so matrices of the
    same shape go through the iteration together (batched matrix products: far fewer operations). The
    arithmetic per matrix is torch's; the optimizer state (momentum_buffer) is the same.
    """

    def __init__(self, params, ns_dtype: torch.dtype = torch.bfloat16, **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        from torch.optim._muon import _adjust_lr
        for group in self.param_groups:
            momentum, updates = group["momentum"], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                buf.lerp_(p.grad, 1 - momentum)
                updates.append((p, p.grad.lerp(buf, momentum) if group["nesterov"] else buf))
            ns = (group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype)
            for p, update in orthogonalise(updates, *ns):
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-_adjust_lr(group["lr"], group["adjust_lr_fn"], p.shape))


def orthogonalise(updates: list, coefficients, steps: int, eps: float, dtype) -> list:
    """[(param, update)] -> [(param, orthogonalised update)]: same-shaped plain tensors as one batch."""
    batches: dict = {}
    out = []
    for p, u in updates:
        if type(u) is torch.Tensor:  # (FSDP2's sharded DTensors go one at a time)
            batches.setdefault((tuple(u.shape), u.device), []).append((p, u))
        else:
            out.append((p, newton_schulz(u, coefficients, steps, eps, dtype)))
    for items in batches.values():
        x = newton_schulz(torch.stack([u for _, u in items]), coefficients, steps, eps, dtype)
        out += [(p, x[i]) for i, (p, _) in enumerate(items)]
    return out


def newton_schulz(g: torch.Tensor, coefficients, steps: int, eps: float, dtype) -> torch.Tensor:
    """Orthogonalise g, or each matrix of a batch g, (U·S'·Vᵀ with S' ≈ 1) by the quintic Newton–Schulz
    iteration in `dtype`."""
    a, b, c = coefficients
    x = g.to(dtype)
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm at most 1
    mul_add = torch.baddbmm if x.dim() == 3 else torch.addmm  # beta·input + alpha·(m1 @ m2), one operation
    for _ in range(steps):
        gram = x @ x.mT
        x = mul_add(x, mul_add(gram, gram, gram, beta=b, alpha=c), x, beta=a)  # a·x + (b·G + c·G²)·x
    return x.mT if tall else x


def make_optimizers(model: nn.Module, config: TrainConfig, device_type: str,
                    dtype: torch.dtype = torch.bfloat16) -> list[torch.optim.Optimizer]:
    """AdamW (decoupled weight decay on matrices only; fused into one kernel per step), plus Muon with
    --optimizer muon, orthogonalising in the training dtype (bfloat16 where the CPU multiplies it fast)."""
    groups = param_groups(model, config)
    if not any(groups.values()):
        raise ValueError("the model has no trainable parameters (every requires_grad is False)")
    adam_groups = [{"params": [p for _, p in groups["decay"]], "weight_decay": config.weight_decay,
                    "base_lr": config.lr},
                   {"params": [p for _, p in groups["no_decay"]], "weight_decay": 0.0, "base_lr": config.lr}]
    adam_groups = [g for g in adam_groups if g["params"]]
    optimizers = []
    if adam_groups:
        optimizers.append(torch.optim.AdamW(adam_groups, lr=config.lr, betas=(config.beta1, config.beta2),
                                            eps=1e-8, fused=True))
    if groups["muon"]:
        optimizers.append(Muon([{"params": [p for _, p in groups["muon"]], "base_lr": config.muon_lr}],
                               ns_dtype=dtype, lr=config.muon_lr, weight_decay=config.weight_decay, momentum=0.95,
                               nesterov=True))
    return optimizers


def training_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    """The autocast dtype: as given, or for "auto" bfloat16 on a GPU that supports it and on a CPU whose
    bfloat16 matrix products are measured faster (cpu.compute_dtype), float32 elsewhere."""
    if device.type == "cuda" and config.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    from .cpu import resolve_dtype
    return resolve_dtype(config.dtype)


# ----------------------------------------------------------------------------- distributed
@dataclass
class DistInfo:
    """Where this process stands: its rank among world_size processes, its device, how it shards."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mode: str = "single"               # "single" | "ddp" | "fsdp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(config: TrainConfig) -> DistInfo:
    """Join the torchrun process group if there is one (gloo on CPU, NCCL on CUDA); else one process."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is cuda but torch sees no CUDA GPU")
    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo(device=torch.device("cuda" if use_cuda else "cpu"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return DistInfo(rank, world, local_rank, device, config.distributed)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def wrap_model(model: GPT, info: DistInfo) -> nn.Module:
    """DDP replicas or FSDP2 shards (each block its own unit, then the whole model); as is for one process."""
    if info.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
    if info.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for block in model.layers:
            fully_shard(block)
        fully_shard(model)  # modifies model in place: its parameters become sharded DTensors
    return model


def _state_dict_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: GPT, info: DistInfo) -> dict:
    """The model's whole state dict (FSDP2: gathered onto rank 0, on CPU; other ranks get {}).
    Every rank must call it."""
    if info.mode != "fsdp":
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(model, options=_state_dict_options())


# ----------------------------------------------------------------------------- checkpoints
# Hidden leftovers of a killed process in a run's folder: a checkpoint being written or being deleted,
# and atomic_write's temporary files. Removed when a run starts there.
LEFTOVERS = (".step_*.tmp", ".step_*.old", ".latest.*.tmp", ".metrics.jsonl.*.tmp", ".loss.png.*.tmp")
# For tests (tests/test_kill_resume.py): "STAGE:STEP" makes save_checkpoint SIGKILL its own process at
# that stage of writing checkpoint STEP — after_weights, replacing, after_rename or pruning — to show
# that a kill there loses no work.
KILL_HOOK = "PICOCHAT_TEST_KILL_IN_CHECKPOINT"


def find_checkpoint(resume, out_dir=None) -> Path:
    """The checkpoint folder `--resume` means: the folder itself, or the newest one of a run's out dir
    (see latest_checkpoint)."""
    path = Path(resume) if isinstance(resume, (str, os.PathLike)) and str(resume) else None
    if path is None:
        if not out_dir:
            raise ValueError("--resume without a folder continues the run in --out-dir: give --out-dir")
        path = Path(out_dir)
    if (path / TRAIN_STATE).is_file():
        problem = checkpoint_problem(path)
        if problem:
            raise CheckpointError(f"cannot resume from {path}: {problem}")
        return path
    if not path.exists():
        raise CheckpointError(f"nothing to resume: {path} does not exist")
    return latest_checkpoint(path)


def checkpoint_configs(folder: Path) -> tuple[ModelConfig, TrainConfig]:
    """The (model, training) configuration a checkpoint was made with."""
    state = read_train_state(folder)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return read_config(Path(folder)), TrainConfig(**{k: v for k, v in state["train_config"].items() if k in known})


def check_resumable(folder: Path, model_config: ModelConfig, config: TrainConfig, tokenizer: Tokenizer) -> dict:
    """Refuse (with the differences named) a checkpoint that is not this run's model, optimizer or tokenizer."""
    state = read_train_state(folder)
    theirs = dataclasses.asdict(read_config(folder))
    ours = dataclasses.asdict(model_config)
    diff = [k for k in ours if k != "extra" and ours[k] != theirs[k]]
    if diff:
        raise CheckpointError(f"cannot resume from {folder}: it holds a different model — "
                              + ", ".join(f"{k}: checkpoint {theirs[k]!r}, this run {ours[k]!r}" for k in diff))
    if state["train_config"].get("optimizer") != config.optimizer:
        raise CheckpointError(f"cannot resume from {folder}: it was trained with optimizer "
                              f"{state['train_config'].get('optimizer')!r}, this run uses {config.optimizer!r}")
    try:
        saved_tok = Tokenizer.from_file(folder)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot resume from {folder}: its tokenizer does not load ({e})") from None
    if saved_tok.backend.to_str() != tokenizer.backend.to_str():
        raise CheckpointError(f"cannot resume from {folder}: its tokenizer differs from the dataset's "
                              f"({config.data_dir}/tokenizer)")
    return state


def _rng_state() -> tuple[dict, dict]:
    """(tensors, json) capturing the torch, numpy and python random generators."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    version, internal, gauss_next = random.getstate()
    return tensors, {"numpy": [kind, int(pos), int(has_gauss), float(gauss)],
                     "python": [version, list(internal), gauss_next]}


def _set_rng_state(tensors: dict, meta: dict):
    torch.set_rng_state(tensors["torch"])
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def optimizer_state(model: nn.Module, optimizers) -> dict:
    """The optimizers' state dict keyed by parameter name ({"state": {name: {"exp_avg": ...}}, "param_groups": [...]}),
    with whole tensors even under FSDP2 (on rank 0). Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizers, options=_state_dict_options())


def load_optimizer_state(model: nn.Module, optimizers, osd: dict):
    """Load a state from optimizer_state into this run's optimizers (FSDP2: each rank keeps its shard)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizers, osd, options=StateDictOptions(full_state_dict=True))


def _optimizer_to_files(osd: dict) -> tuple[dict, dict]:
    """(tensors for safetensors as "name/key", JSON for the rest): no pickle in a checkpoint."""
    tensors, values = {}, {}
    for name, state in osd["state"].items():
        for key, v in state.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{name}/{key}"] = v.detach().cpu().contiguous().clone()
            else:
                values.setdefault(name, {})[key] = v
    return tensors, {"state_values": values, "param_groups": osd["param_groups"]}


def _optimizer_from_files(tensors: dict, meta: dict) -> dict:
    state = {name: dict(v) for name, v in meta["state_values"].items()}
    for key, t in tensors.items():
        name, _, field = key.rpartition("/")
        state.setdefault(name, {})[field] = t
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(out_dir: Path, step: int, model_sd: dict, model_config: ModelConfig, tokenizer: Tokenizer,
                    osd: dict, train_state: dict, keep_last: int, finetune=None) -> Path:
    """Write step_NNNNNN/ (HF folder + training state), point `latest` at it, drop old checkpoints.

    Each stage is on disk before the next begins, so a process killed anywhere leaves `latest` naming a
    complete checkpoint, or missing / naming one that is gone — then latest_checkpoint resumes from the
    newest complete step_* folder. The files go into a hidden folder, are fsynced, and the folder is
    renamed into place; trainer_state.json, written last, lists every file with its size. Folders on
    their way out (old checkpoints, or an earlier save of the same step when a run was resumed from an
    older checkpoint) are first renamed to hidden names, so no half-deleted folder ever carries a
    checkpoint's name. Only rank 0 calls this.
    """
    name = f"step_{step:06d}"
    final, tmp = out_dir / name, out_dir / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    _write_checkpoint_files(tmp, step, model_sd, model_config, tokenizer, osd, train_state, finetune)
    doomed = [_hide(final)] if final.exists() else []
    _test_kill_point("replacing", step)
    os.replace(tmp, final)
    fsync_dir(out_dir)
    _test_kill_point("after_rename", step)
    atomic_write_text(out_dir / "latest", name + "\n")
    if keep_last > 0:
        doomed += [_hide(old) for old in checkpoint_folders(out_dir)[:-keep_last] if old != final]
    _test_kill_point("pruning", step)
    for folder in doomed:
        shutil.rmtree(folder, ignore_errors=True)
    return final


def _write_checkpoint_files(folder: Path, step: int, model_sd: dict, model_config: ModelConfig,
                            tokenizer: Tokenizer, osd: dict, train_state: dict, finetune=None):
    """A checkpoint's files in `folder`, fsynced; trainer_state.json (listing the others) last."""
    if finetune is not None:  # fine-tuning decides what a checkpoint's weights are (e.g. a LoRA adapter)
        finetune.save_weights(folder, model_sd, tokenizer)
    else:
        with torch.device("meta"):  # a GPT that merely holds the (gathered) weights, for save_hf_folder
            holder = GPT(model_config)
        holder.load_state_dict(model_sd, strict=True, assign=True)
        save_hf_folder(holder, folder, tokenizer=tokenizer)
    _test_kill_point("after_weights", step)
    opt_tensors, opt_meta = _optimizer_to_files(osd)
    save_file(opt_tensors, folder / "optimizer.safetensors")
    rng_tensors, rng_meta = _rng_state()
    save_file(rng_tensors, folder / "rng.safetensors")
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    state = {"format": CHECKPOINT_FORMAT, **train_state, "optimizer": opt_meta, "rng": rng_meta, "files": files}
    (folder / TRAIN_STATE).write_text(json.dumps(state, indent=1))
    fsync_tree(folder)


def _hide(folder: Path) -> Path:
    """Rename a checkpoint folder that is to be deleted to a hidden name (atomic, unlike deleting it)."""
    hidden = folder.with_name(f".{folder.name}.old")
    if hidden.exists():
        shutil.rmtree(hidden)
    os.replace(folder, hidden)
    fsync_dir(folder.parent)
    return hidden


def _test_kill_point(stage: str, step: int):
    """SIGKILL this process here if $PICOCHAT_TEST_KILL_IN_CHECKPOINT is "STAGE:STEP" (KILL_HOOK)."""
    if os.environ.get(KILL_HOOK) == f"{stage}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def remove_leftovers(run_dir: Path):
    """Delete what killed processes left in a run's folder (LEFTOVERS: hidden, never a checkpoint)."""
    for pattern in LEFTOVERS:
        for path in Path(run_dir).glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def load_checkpoint_state(folder: Path, finetune=None) -> tuple[dict, dict, dict, dict]:
    """(model state dict, optimizer state dict, RNG tensors, trainer state) of a checkpoint folder."""
    state = read_train_state(folder)
    model_sd = load_hf_folder(folder)[1] if finetune is None else finetune.load_weights(folder)
    try:
        osd = _optimizer_from_files(load_file(folder / "optimizer.safetensors"), state["optimizer"])
        rng = load_file(folder / "rng.safetensors")
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{folder}: cannot read the optimizer or RNG state ({e})") from None
    return model_sd, osd, rng, state


# ----------------------------------------------------------------------------- evaluation and samples
def sample_text(model: GPT, tokenizer: Tokenizer, config: TrainConfig) -> str:
    """The sample prompt and what the model writes after it (through the Engine, on the CPU)."""
    from .engine import Engine, SamplingParams
    ids = tokenizer.encode(config.sample_prompt, add_special_tokens=True)
    params = SamplingParams(max_new_tokens=config.sample_tokens, temperature=config.sample_temperature,
                            top_k=50 if config.sample_temperature > 0 else 0, seed=config.seed)
    gen = Engine(model, tokenizer).complete(ids, params)  # its own seeded generator: training RNG untouched
    model.train()
    return config.sample_prompt + gen.text


# ----------------------------------------------------------------------------- metrics
def read_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl, one a line. A last line without its newline is a record a killed
    process did not finish writing: it is left out."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")[:-1]  # [-1]: after the last newline
    return [json.loads(line) for line in lines if line.strip()]


def plot_losses(metrics_path, png_path) -> Path:
    """Train and validation loss against step, as a PNG (matplotlib's Agg canvas: no display needed)."""
    from matplotlib.figure import Figure
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.add_subplot()
    if train:
        steps, values = zip(*train)
        ax.plot(steps, values, lw=0.6, alpha=0.3, color="C0", label="train loss")
        smooth, avg = [], values[0]
        for v in values:  # an exponential moving average: one batch's loss is noisy
            avg = 0.95 * avg + 0.05 * v
            smooth.append(avg)
        ax.plot(steps, smooth, lw=1.5, color="C0", label="train loss (moving average)")
    if val:
        ax.plot(*zip(*val), "o-", lw=1.5, color="C1", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return atomic_write(Path(png_path), lambda p: fig.savefig(p, format="png"))


# ----------------------------------------------------------------------------- one optimizer step
def accumulate_gradients(forward, batches, info: DistInfo, autocast, sync_context) -> float:
    """Forward and backward over one step's passes (x, y); returns the step's loss.

    The gradient is that of the mean loss over every valid target (not -100) of the global batch,
    wherever the masked targets fall among passes and processes: each pass's mean loss is weighted by
    its share of the valid targets. sync_context(last) holds back the gradient all-reduce until the last pass.
    """
    counts = [int((y != -100).sum()) for _, y in batches]
    n_valid = int(all_reduce_sum(torch.tensor([sum(counts)], dtype=torch.float64, device=info.device), info).item())
    loss_sum = torch.zeros((), dtype=torch.float64, device=info.device)
    for i, ((x, y), n) in enumerate(zip(batches, counts)):
        x, y = x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)
        with sync_context(i == len(batches) - 1):
            with autocast:
                logits, loss = forward(x, y)
            if n == 0:  # nothing to learn from this pass, but every process must still run backward
                loss = logits.float().sum() * 0.0
            # DDP and FSDP average gradients over processes: scaling by world_size makes that a sum
            (loss * (n * info.world_size / max(n_valid, 1))).backward()
        loss_sum += loss.detach().double() * n
    return float(all_reduce_sum(loss_sum, info).item() / max(n_valid, 1))


# ----------------------------------------------------------------------------- the run
@dataclass
class TrainResult:
    """What a run ended with. Only rank 0's copy has the metrics of the whole run."""
    out_dir: Path
    checkpoint: Path | None
    step: int
    tokens: int
    elapsed: float
    loss: float | None = None
    val_loss: float | None = None
    val_bpb: float | None = None
    tokens_per_s: float | None = None
    sample: str | None = None
    rank: int = 0


def model_config_for(tokenizer: Tokenizer, model_config: ModelConfig, config: TrainConfig) -> ModelConfig:
    """The model config with the vocabulary (rounded up to vocab_multiple) and special ids of the tokenizer."""
    m = config.vocab_multiple
    vocab = (tokenizer.vocab_size + m - 1) // m * m
    ends = [i for i in (tokenizer.eos_token_id, tokenizer.token_to_id("<|end|>")) if i is not None]
    eos = ends[0] if len(set(ends)) == 1 else (sorted(set(ends), key=ends.index) or None)
    return model_config.replace(vocab_size=vocab, bos_token_id=tokenizer.bos_token_id, eos_token_id=eos)


def train(config: TrainConfig, model_config: ModelConfig, resume=None,
          on_record: Callable[[dict], None] | None = None, stream=TokenStream, finetune=None) -> TrainResult:
    """Train a model on a prepared dataset; `picochat train` is this function.

    resume: None (a new run: out_dir must not hold one), True (the newest complete checkpoint in out_dir:
    latest_checkpoint) or a checkpoint / out-dir path. on_record(record) is called on rank 0 with each step's metrics (the
    same dicts metrics.jsonl gets: step, loss, lr, tokens/s, elapsed, and val_loss, val_bpb, sample
    when those were computed). stream(data_dir, split, batch_size, seq_len, rank, world_size) gives the
    batches (TokenStream's interface: next_batch() -> (x, y) with -100 for targets to ignore,
    state_dict(), load_state_dict(), n_windows, step_windows; a `read_meta(data_dir)` attribute, if it has
    one, reads its dataset's meta.json instead of data.read_meta). finetune, for fine-tuning a pretrained
    model (sft.FineTune), gives the model instead of a random one: .model_config, .build_model(), and the
    checkpoint weights: .save_weights(folder, state_dict, tokenizer), .load_weights(folder) -> state dict
    (for LoRA: only the adapter). Bad input raises before anything is written.
    """
    # Check everything that can be checked before a file is written or a process group joined.
    validate(config)
    data_dir, out_dir = Path(config.data_dir), Path(config.out_dir)
    getattr(stream, "read_meta", read_meta)(data_dir)
    try:
        tokenizer = Tokenizer.from_file(data_dir / "tokenizer")
    except (OSError, ValueError) as e:
        raise DataError(f"{data_dir}/tokenizer: the dataset's tokenizer does not load ({e})") from None
    if finetune is not None:  # the pretrained model's shape and vocabulary, as they are
        model_config = finetune.model_config
    else:
        model_config = model_config_for(tokenizer, model_config, config)
    check_exportable(model_config)
    if config.seq_len > model_config.max_seq_len:
        raise ValueError(f"seq_len {config.seq_len} exceeds the model's context (max_seq_len "
                         f"{model_config.max_seq_len}): raise --max-seq-len or lower --seq-len")
    ckpt = None
    if resume is not None and resume is not False:
        ckpt = find_checkpoint(None if resume is True else resume, out_dir)
        check_resumable(ckpt, model_config, config, tokenizer)
    elif holds_run(out_dir):
        raise ValueError(f"{out_dir} already holds a training run (its checkpoints and 'latest'): pass --resume "
                         f"to continue it, or choose another --out-dir")
    threads_before = torch.get_num_threads()
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    info = init_distributed(config)
    try:
        return _run(config, model_config, tokenizer, ckpt, info, on_record, stream, finetune)
    finally:
        torch.set_num_threads(threads_before)  # a library call leaves the process as it found it
        if info.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _run(config: TrainConfig, model_config: ModelConfig, tokenizer: Tokenizer, ckpt: Path | None,
         info: DistInfo, on_record, stream, finetune=None) -> TrainResult:
    from tqdm import tqdm
    data_dir, out_dir = Path(config.data_dir), Path(config.out_dir)
    B, T = config.batch_size, config.seq_len
    grad_accum = config.grad_accum
    if config.total_batch_tokens:
        per_pass = info.world_size * B * T
        if config.total_batch_tokens % per_pass:
            raise ValueError(f"total_batch_tokens {config.total_batch_tokens} is not a multiple of "
                             f"world_size × batch_size × seq_len = {per_pass}")
        grad_accum = config.total_batch_tokens // per_pass
    step_tokens = info.world_size * grad_accum * B * T
    total_steps = config.max_steps
    if config.max_tokens > 0:
        by_tokens = math.ceil(config.max_tokens / step_tokens)
        total_steps = min(total_steps, by_tokens) if total_steps > 0 else by_tokens
    # Each process reads its own rows of every global batch; together they read what one process would.
    train_data = stream(data_dir, "train", B, T, info.rank, info.world_size)
    val_data = None  # a dataset without a val split trains without validation
    if "val" in getattr(stream, "read_meta", read_meta)(data_dir)["splits"]:
        val_data = stream(data_dir, "val", B, T, info.rank, info.world_size)
        n_eval = min(config.eval_batches, val_data.n_windows // val_data.step_windows)
    token_bytes = torch.from_numpy(tokenizer.token_byte_lengths())
    token_bytes = torch.cat([token_bytes, torch.zeros(model_config.vocab_size - len(token_bytes),
                                                      dtype=torch.int64)]).to(info.device)

    # The model: fresh (seeded, so every rank starts identical) or the checkpoint's weights.
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    model = GPT(model_config) if finetune is None else finetune.build_model()
    step, tokens, elapsed_before, osd, rng = 0, 0, 0.0, None, None
    if ckpt is not None:
        model_sd, osd, rng, state = load_checkpoint_state(ckpt, finetune)
        if finetune is None:
            model.load_state_dict(model_sd, strict=True)
        else:  # the checkpoint holds the trained tensors (all of them, or a LoRA adapter's)
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            if set(model_sd) != trainable:
                raise CheckpointError(f"{ckpt}: its weights do not match this run's trainable parameters "
                                      f"(a different --lora-rank or target modules?)")
            model.load_state_dict(model_sd, strict=False)
        step, tokens, elapsed_before = state["step"], state["tokens"], state["elapsed"]
        train_data.load_state_dict(state["data"])
    model.to(info.device).train()
    train_model = wrap_model(model, info)
    forward = torch.compile(train_model) if config.compile else train_model
    dtype = training_dtype(config, info.device)
    optimizers = make_optimizers(model, config, info.device.type, dtype)
    if osd is not None:
        load_optimizer_state(model, optimizers, osd)
        for opt in optimizers:  # the peak learning rates are this run's (they may be changed on resume)
            for group in opt.param_groups:
                group["base_lr"] = config.muon_lr if isinstance(opt, torch.optim.Muon) else config.lr
        _set_rng_state(rng, state["rng"])
    autocast = torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def accumulation_context(last: bool):
        if info.mode == "ddp" and not last:
            return train_model.no_sync()  # all-reduce gradients only on the last pass
        if info.mode == "fsdp":
            model.set_requires_gradient_sync(last)
        return nullcontext()

    def sampling_model() -> GPT | None:
        """A model rank 0 can generate from alone: the model itself, or a CPU copy of the gathered weights."""
        if info.mode != "fsdp" and info.device.type == "cpu":
            return model if info.is_main else None
        sd = full_model_state(model, info)  # collective under FSDP2
        if not info.is_main:
            return None
        from .models import build_model
        return build_model(model_config, {k: v.detach().cpu() for k, v in sd.items()}, torch.float32, "training")

    # Output: only rank 0 writes. Resuming drops metrics of steps after the checkpoint (a crashed tail),
    # and what a killed process left half-written.
    metrics_path = out_dir / "metrics.jsonl"
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_leftovers(out_dir)
        kept = [r for r in read_metrics(metrics_path) if r["step"] <= step] if ckpt is not None else []
        atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
    metrics_file = open(metrics_path, "a") if info.is_main else None
    result = TrainResult(out_dir, ckpt, step, tokens, elapsed_before, rank=info.rank)
    for r in kept if info.is_main else []:  # a run resumed at its end (killed after its last save) has these
        result.loss = r.get("loss", result.loss)
        result.val_loss, result.val_bpb = r.get("val_loss", result.val_loss), r.get("val_bpb", result.val_bpb)
    pbar = tqdm(total=total_steps or None, initial=step, unit="step", dynamic_ncols=True, disable=not info.is_main,
                desc="train")
    t_start = time.perf_counter()
    last_saved = step if ckpt is not None else -1

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t_start

    def due(interval: int, final: bool) -> bool:
        return final or (interval > 0 and step % interval == 0)

    def periodic(record: dict, final: bool):
        """Validation, sample and checkpoint when due; then the record goes to metrics.jsonl."""
        nonlocal last_saved
        if val_data is not None and (step == 0 or due(config.eval_interval, final)):
            val_data.load_state_dict({"position": 0, "epoch": 0})  # the same validation tokens every time
            record["val_loss"], record["val_bpb"] = validation_loss(
                model, (val_data.next_batch() for _ in range(n_eval)), token_bytes, autocast,
                reduce=lambda totals: all_reduce_sum(totals, info))
            result.val_loss, result.val_bpb = record["val_loss"], record["val_bpb"]
        if step > 0 and due(config.sample_interval, final) and config.sample_tokens > 0:
            sampler = sampling_model()
            if info.is_main:
                record["sample"] = result.sample = sample_text(sampler, tokenizer, config)
        if info.is_main and record:
            metrics_file.write(json.dumps({"step": step, **record}) + "\n")
            metrics_file.flush()
            if on_record is not None:
                on_record({"step": step, **record})
        if step > 0 and step != last_saved and due(config.checkpoint_interval, final):
            if info.is_main:  # the checkpoint's metrics are on disk before it is: a resume keeps them
                os.fsync(metrics_file.fileno())
            model_sd = full_model_state(model, info)
            osd = optimizer_state(model, optimizers)
            if info.is_main:
                state = {"step": step, "tokens": tokens, "elapsed": elapsed(), "data": train_data.state_dict(),
                         "world_size": info.world_size, "train_config": dataclasses.asdict(config),
                         "model_config": dataclasses.asdict(model_config)}
                result.checkpoint = save_checkpoint(out_dir, step, model_sd, model_config, tokenizer, osd,
                                                    state, config.keep_last, finetune)
            last_saved = step
            if info.world_size > 1:
                dist.barrier()

    def finished() -> bool:
        return (total_steps > 0 and step >= total_steps) or (config.max_time > 0 and elapsed() >= config.max_time)

    try:
        if ckpt is None:
            periodic({}, final=False)  # validation loss of the untrained model: the curve's start
        final = finished()  # already, when resuming a run that had finished
        while not final:
            t0 = time.perf_counter()
            lr_factor = lr_schedule(step, total_steps, config, elapsed())
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = group["base_lr"] * lr_factor
            batches = [train_data.next_batch() for _ in range(grad_accum)]
            loss_value = accumulate_gradients(forward, batches, info, autocast, accumulation_context)
            grad_norm = None
            if config.grad_clip > 0:
                norm = nn.utils.clip_grad_norm_(trainable, config.grad_clip)
                grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            for opt in optimizers:
                opt.step()
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            step += 1
            tokens += step_tokens
            dt = time.perf_counter() - t0
            if not math.isfinite(loss_value):
                raise RuntimeError(f"the loss became {loss_value} at step {step}: lower --lr or check the data")
            result.loss, result.tokens_per_s = loss_value, step_tokens / dt
            record = {"loss": loss_value, "lr": lr_factor * config.lr, "grad_norm": grad_norm,
                      "tokens": tokens, "tokens_per_s": step_tokens / dt, "elapsed": elapsed()}
            if config.optimizer == "muon":
                record["muon_lr"] = lr_factor * config.muon_lr
            final = finished()
            periodic(record, final)
            pbar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{step_tokens / dt:,.0f}", refresh=False)
            pbar.update(1)
    finally:
        pbar.close()
        if metrics_file is not None:
            metrics_file.close()
    if info.is_main:
        plot_losses(metrics_path, out_dir / "loss.png")
    result.step, result.tokens, result.elapsed = step, tokens, elapsed()
    return result
