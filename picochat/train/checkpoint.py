"""A training run's checkpoints as plain functions: save (atomically, durably), find, check and load.

A checkpoint is step_NNNNNN/: a Hugging Face folder (or, fine-tuning with LoRA, a PEFT adapter) plus
optimizer.safetensors, rng.safetensors and trainer_state.json (step, tokens, data position, configs, and
the list of files with their sizes). `latest` names the newest; formats/runs.py decides which one is
complete. No pickle anywhere: everything a user may download is safetensors or JSON.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_write_text, fsync_dir, fsync_tree
from ..formats.hf import CheckpointError, load_hf_folder, read_config, save_hf_folder
from ..formats.runs import (CHECKPOINT_FORMAT, TRAIN_STATE, checkpoint_folders, checkpoint_problem, latest_checkpoint,
                            read_train_state)
from ..model.config import ModelConfig
from ..model.gpt import GPT
from ..tokenizer.bpe import Tokenizer
from .config import TrainConfig


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


def set_rng_state(tensors: dict, meta: dict):
    torch.set_rng_state(tensors["torch"])
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


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
