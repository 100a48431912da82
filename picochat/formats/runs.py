"""A training run's folder on disk: its step_NNNNNN checkpoints and the `latest` file naming the newest.

Shared by training (where to resume) and loading (`-m RUN_FOLDER` means its newest checkpoint). `latest`
is data written by a program that may have been killed: it is trusted only when it names a complete
checkpoint folder of the same run; otherwise the newest complete step_* folder is taken, with a warning.
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

from .hf import CheckpointError

TRAIN_STATE = "trainer_state.json"
CHECKPOINT_FORMAT = "picochat-train-v1"
CHECKPOINT_NAME = re.compile(r"step_[0-9]+")
CHECKPOINT_FILES = ("optimizer.safetensors", "rng.safetensors")  # beside the weights, in every checkpoint


class CheckpointWarning(UserWarning):
    """--resume took another checkpoint than `latest` names: `latest` was missing or named a broken one."""


def latest_checkpoint(run_dir: Path) -> Path:
    """The checkpoint a run's folder continues from: the one `latest` names, or — when a process killed
    mid-save left `latest` missing or naming a folder that is gone or incomplete — the newest complete
    step_* folder, with a CheckpointWarning saying so. `latest` must name a step_* folder of run_dir."""
    run_dir = Path(run_dir)
    named = read_latest(run_dir)
    problem = checkpoint_problem(named) if named is not None else f"{run_dir} has no 'latest' file"
    if problem is None:
        return named
    complete = [p for p in checkpoint_folders(run_dir) if checkpoint_problem(p) is None]
    if not complete:
        if named is None:
            raise CheckpointError(f"nothing to resume in {run_dir}: it is neither a training checkpoint (no "
                                  f"{TRAIN_STATE}) nor a run's output folder (no 'latest' file)")
        raise CheckpointError(f"{run_dir / 'latest'} names {named.name}, which {problem}; no other complete "
                              f"checkpoint is left in {run_dir}")
    if named is not None:
        problem = f"{run_dir / 'latest'} names {named.name}, which {problem}"
    warnings.warn(f"{problem} (a process killed while saving): resuming from {complete[-1]}, the newest "
                  f"complete checkpoint", CheckpointWarning, stacklevel=1)  # warned from here: shown once per process
    return complete[-1]


def read_latest(run_dir: Path) -> Path | None:
    """The folder run_dir/latest names (None without a `latest` file); CheckpointError if that is not a
    step_* folder inside run_dir (`latest` is data: it must not lead elsewhere)."""
    latest = Path(run_dir) / "latest"
    if not latest.is_file():
        return None
    try:
        with open(latest, "rb") as f:
            name = f.read(256).decode("utf-8", errors="replace").strip()  # a folder name: never a big read
    except OSError as e:
        raise CheckpointError(f"{latest} cannot be read ({e})") from None
    if not CHECKPOINT_NAME.fullmatch(name) or (Path(run_dir) / name).is_symlink():
        raise CheckpointError(f"{latest} names {name[:100]!r}, which is not a checkpoint folder inside {run_dir}: "
                              f"it must hold the name of one of the run's checkpoints (e.g. step_000200)")
    return Path(run_dir) / name


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """The step_* folders of a run, oldest first (whether complete or not)."""
    found = [p for p in Path(run_dir).glob("step_*")
             if CHECKPOINT_NAME.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` is not a complete checkpoint, as "is missing"-style words; None if it is complete:
    its trainer state reads and every file that state lists is there with the size it was written with."""
    folder = Path(folder)
    if not folder.is_dir():
        return "is missing"
    try:
        state = read_train_state(folder)
    except CheckpointError as e:
        return f"is incomplete ({e})"
    listed = state.get("files") or {n: None for n in CHECKPOINT_FILES}  # checkpoints saved before "files"
    for name, size in listed.items():
        path = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            return f"is not a checkpoint of this format (it lists the file {name[:100]!r})"
        if not path.is_file() or (size is not None and path.stat().st_size != size):
            return f"is incomplete ({name} is missing or truncated)"
    return None


def holds_run(out_dir) -> bool:
    """Whether out_dir holds a training run (a `latest` file or a checkpoint) that a new run would clobber."""
    out_dir = Path(out_dir)
    return (out_dir / "latest").exists() or bool(checkpoint_folders(out_dir))


def read_train_state(folder: Path) -> dict:
    path = Path(folder) / TRAIN_STATE
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not readable JSON ({e})") from None
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {state.get('format')!r}")
    return state
