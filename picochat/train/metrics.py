"""A run's metrics: metrics.jsonl (one record a step, flushed as it goes) and loss.png drawn from it."""
from __future__ import annotations

import json
from pathlib import Path

from ..atomic import atomic_write


def read_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl, one a line. A last line without its newline is a record a killed
    process did not finish writing: it is left out."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")[:-1]  # [-1]: after the last newline
    return [json.loads(line) for line in lines if line.strip()]


def plot_losses(metrics_path, png_path) -> Path:
    """Train and validation loss against step, as a PNG."""
    return plot_curve(metrics_path, png_path, ("loss", "train loss"), ("val_loss", "val loss"),
                      "loss (nats per token)")


def plot_curve(metrics_path, png_path, train: tuple[str, str], held_out: tuple[str, str], ylabel: str,
               smoothing: float = 0.95, ylim: tuple[float, float] | None = None) -> Path:
    """A metric of every step (its key and label in `train`), with an exponential moving average (one batch's
    value is noisy), and its held-out measurements, against step: a PNG drawn on matplotlib's Agg canvas (no
    display needed)."""
    from matplotlib.figure import Figure
    records = read_metrics(metrics_path)
    steps_values = [(r["step"], r[train[0]]) for r in records if train[0] in r]
    measured = [(r["step"], r[held_out[0]]) for r in records if held_out[0] in r]
    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.add_subplot()
    if steps_values:
        steps, values = zip(*steps_values)
        ax.plot(steps, values, lw=0.6, alpha=0.3, color="C0", label=train[1])
        smooth, avg = [], values[0]
        for v in values:
            avg = smoothing * avg + (1 - smoothing) * v
            smooth.append(avg)
        ax.plot(steps, smooth, lw=1.5, color="C0", label=f"{train[1]} (moving average)")
    if measured:
        ax.plot(*zip(*measured), "o-", lw=1.5, color="C1", label=held_out[1])
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return atomic_write(Path(png_path), lambda p: fig.savefig(p, format="png"))
