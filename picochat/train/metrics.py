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
