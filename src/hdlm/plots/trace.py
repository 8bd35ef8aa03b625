"""The denoising of one sample, drawn like the paper's Fig. 3 (§3.1-3.3).

Rows are generation steps (x_0, pure noise, on top; x_T, the output, at the bottom), columns are
positions. Each cell is coloured by its role in the step t → t+1 of Eq. (1): settled (gold),
active MASK ("known unknowns", light grey), active token (light blue), worthless (dark grey);
a token that changed in the step that produced x_t is red. With few positions and steps the
tokens are written in their cells.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from . import figure_path

WORTHLESS, ACTIVE_MASK, ACTIVE, SETTLED, CHANGED = range(5)
COLOURS = ["#4a4a4a", "#d9d9d9", "#bcd7f0", "#e8c15a", "#d9402b"]
LABELS = ["worthless", "active MASK", "active token", "settled", "changed this step"]
MAX_TEXT_D, MAX_TEXT_ROWS = 40, 80


def trace_grid(states: Sequence, splits: Sequence[tuple[int, int]], mask_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and roles of one sample: ``states`` x_0..x_T (each (d,)), ``splits`` the (settled_end,
    active_end) of each transition t → t+1 (T of them). Returns two (T+1, d) integer arrays."""
    tokens = np.stack([np.asarray(s, dtype=np.int64) for s in states])
    rows, d = tokens.shape
    if len(splits) != rows - 1:
        raise ValueError(f"trace_grid: {rows} states need {rows - 1} splits, got {len(splits)}")
    role = np.full((rows, d), SETTLED, dtype=np.int64)
    pos = np.arange(d)
    for t, (settled_end, active_end) in enumerate(splits):
        role[t] = np.where(pos < settled_end, SETTLED,
                           np.where(pos >= active_end, WORTHLESS,
                                    np.where(tokens[t] == mask_id, ACTIVE_MASK, ACTIVE)))
    changed = np.zeros_like(role, dtype=bool)
    changed[1:] = tokens[1:] != tokens[:-1]
    role[changed] = CHANGED
    return tokens, role


def plot_trace(result, path: str | Path, *, mask_id: int, sample: int = 0,
               decode: Callable[[int], str] | None = None, title: str | None = None) -> Path:
    """Write the Fig. 3-style picture of sample ``sample`` of a traced :class:`GenerationResult`.

    ``decode`` turns one token id into text for the annotations (default: the id).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if not result.trace:
        raise ValueError("plot_trace: the result has no trace (generate with trace=True)")
    states = [step.tokens[sample] for step in result.trace] + [result.tokens[sample].cpu()]
    splits = [(step.settled_end, step.active_end) for step in result.trace]
    tokens, role = trace_grid([s.numpy() if hasattr(s, "numpy") else s for s in states], splits, mask_id)
    rows, d = role.shape

    path = figure_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = d <= MAX_TEXT_D and rows <= MAX_TEXT_ROWS
    w = min(24.0, max(4.0, (0.55 if text else 0.12) * d + 2.0))
    h = min(24.0, max(3.0, (0.3 if text else 0.08) * rows + 1.5))
    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(role, cmap=ListedColormap(COLOURS), vmin=-0.5, vmax=len(COLOURS) - 0.5, aspect="auto",
              interpolation="nearest", extent=(-0.5, d - 0.5, rows - 0.5, -0.5))
    if text:
        name = decode or str
        for t in range(rows):
            for i in range(d):
                if tokens[t, i] != mask_id:
                    label = name(int(tokens[t, i])).strip()[:6] or "␣"
                    colour = "white" if role[t, i] in (WORTHLESS, CHANGED) else "black"
                    ax.text(i, t, label, ha="center", va="center", fontsize=6, color=colour)
    ax.set_xlabel("position $i$")
    ax.set_ylabel("state $x_t$ (step $t$)")
    ax.set_title(title or f"denoising of sample {sample}: d = {d}, T = {rows - 1}", fontsize=10)
    ax.legend(handles=[Patch(color=c, label=lab) for c, lab in zip(COLOURS, LABELS)], loc="upper left",
              bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    with warnings.catch_warnings():  # tokens in scripts the default font lacks: drawn as boxes
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.tight_layout()
        fig.savefig(path)
    return path
