"""Adapters tuned from feedback, per base model, and which one is served — the hand-over between
`picochat tune` (writes) and `picochat serve` (reads, and swaps when it changes).

    cache_dir()/tuned/<model key>/
        runs/001/  runs/002/ ...     one tune each: its data, the adapter (adapter/), gate.json, gate.md
        served.json                  {"served": "runs/002/adapter" | null, "history": [what was served before]}

served.json is replaced atomically, so a server polling it reads the old or the new choice, never half.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import atomic_write_text
from ..hub import DEFAULT_MODEL, MODELS, resolve
from ..paths import cache_dir

SERVED = "served.json"


def model_key(model: str | None) -> str:
    """The folder name of a base model's tuned adapters: a packaged model's name, else the file's or folder's
    name and a hash of its full path (two `model.gguf` in different folders are different models)."""
    if model is None or model in MODELS:
        return model or DEFAULT_MODEL
    path = resolve(model).resolve()
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:10]
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '-', path.stem if path.is_file() else path.name)}-{digest}"


def tuned_dir(model: str | None) -> Path:
    return cache_dir() / "tuned" / model_key(model)


@dataclass
class Served:
    """What served.json says: the adapter served now (None: the base alone) and those served before it."""
    served: str | None = None
    history: list[str | None] = field(default_factory=list)
    updated: float = 0.0


def read_served(model: str | None) -> Served:
    path = tuned_dir(model) / SERVED
    if not path.is_file():
        return Served()
    try:
        data = json.loads(path.read_text())
        return Served(data.get("served"), list(data.get("history", [])), float(data.get("updated", 0)))
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{path} is damaged ({e}): delete it to serve the base model") from None


def served_adapter(model: str | None) -> Path | None:
    """The folder of the adapter approved for `model`, or None (the base alone)."""
    served = read_served(model).served
    return None if served is None else tuned_dir(model) / served


def _write_served(model: str | None, served: Served):
    folder = tuned_dir(model)
    folder.mkdir(parents=True, exist_ok=True)
    served.updated = time.time()
    atomic_write_text(folder / SERVED, json.dumps(served.__dict__, indent=1) + "\n")


def new_run_folder(model: str | None) -> Path:
    """runs/NNN, the next free number (created)."""
    runs = tuned_dir(model) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name) for p in runs.iterdir() if p.name.isdigit()]
    for n in range(max(taken, default=0) + 1, max(taken, default=0) + 100):
        try:
            (runs / f"{n:03d}").mkdir()
            return runs / f"{n:03d}"
        except FileExistsError:  # another tune took it a moment ago
            continue
    raise OSError(f"no free run folder in {runs}")


def approve(model: str | None, adapter: Path):
    """Serve `adapter` (a folder under tuned_dir(model)) from now on; what was served goes on the history."""
    current = read_served(model)
    relative = str(Path(adapter).resolve().relative_to(tuned_dir(model).resolve()))
    _write_served(model, Served(relative, current.history + [current.served]))


def rollback(model: str | None) -> Path | None:
    """Serve what was served before the current adapter; returns it (None: the base alone)."""
    current = read_served(model)
    if current.served is None and not current.history:
        raise ValueError(f"nothing to roll back: {model_key(model)} is served as the base model, with no tuned "
                         f"adapter before it")
    previous = current.history[-1] if current.history else None
    _write_served(model, Served(previous, current.history[:-1]))
    return None if previous is None else tuned_dir(model) / previous


def adapter_id(model: str | None, adapter: Path | None) -> str | None:
    """How responses name an adapter: its run ('tuned-002'), or the folder's name when it is not a tuned one."""
    if adapter is None:
        return None
    adapter = Path(adapter).resolve()
    runs = (tuned_dir(model) / "runs").resolve()
    if adapter.parent.parent == runs:
        return f"tuned-{adapter.parent.name}"
    return adapter.name
