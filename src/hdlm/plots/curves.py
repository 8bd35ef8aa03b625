"""Training and validation curves from a run's ``metrics.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import HDLMError
from . import figure_path


def read_metrics(metrics_jsonl: str | Path) -> list[dict]:
    """The rows of a metrics file (one JSON object per line; blank lines skipped)."""
    path = Path(metrics_jsonl)
    if not path.exists():
        raise HDLMError(f"metrics file '{path}' not found")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise HDLMError(f"metrics file '{path}' line {n}: not valid JSON") from None
    return rows


def plot_curves(metrics_jsonl: str | Path, path: str | Path) -> Path:
    """Draw the loss (train: total, CE and diffusion parts; valid: total) and the learning rate
    against the optimizer step, and save the figure to ``path`` (PNG/PDF/SVG by extension)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_jsonl)
    train = [r for r in rows if r.get("split", "train") == "train"]
    valid = [r for r in rows if r.get("split") == "valid"]
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(3, 1))
    for key, style in (("loss", "-"), ("ce", ":"), ("diffusion", "--")):
        pts = [(r["step"], r[key]) for r in train if r.get(key) is not None]
        if pts and (key == "loss" or any(v != 0 for _, v in pts)):
            ax.plot(*zip(*pts), style, lw=1.2, label=f"train {key}")
    if valid:
        ax.plot([r["step"] for r in valid], [r["loss"] for r in valid], "o-", ms=4, lw=1.5, label="valid loss")
    ax.set_ylabel("loss per token (nats)")
    ax.grid(alpha=0.3)
    if ax.has_data():
        ax.legend()
    lr = [(r["step"], r["lr"]) for r in train if "lr" in r]
    if lr:
        ax_lr.plot(*zip(*lr), color="tab:gray")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    path = figure_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
