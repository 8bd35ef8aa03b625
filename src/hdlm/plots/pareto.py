"""The quality / diversity trade-off of a sweep: generative perplexity against token entropy (paper Fig. 4, left)."""

from __future__ import annotations

from pathlib import Path
from . import figure_path


def plot_pareto(rows: list[dict], front: list[bool], path: str | Path, title: str = "") -> Path | None:
    """One point per (cell, setting) of :func:`hdlm.sweep.sweep_rows` with a gen. PPL: entropy on x,
    gen. PPL on a log y axis (lower is better), one colour per cell, ρ written next to each point;
    the Pareto front (``front``) joined by a line. Returns None when no row has a gen. PPL (no judge)."""
    pts = [(r, f) for r, f in zip(rows, front) if r["gen_ppl"] is not None]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    cells = list(dict.fromkeys(r["cell"] for r, _ in pts))
    for k, cell in enumerate(cells):
        mine = [r for r, _ in pts if r["cell"] == cell]
        ax.scatter([r["entropy"] for r in mine], [r["gen_ppl"] for r in mine], color=f"C{k % 10}", label=cell, s=30)
        for r in mine:
            eta = f", η={r['eta']:g}" if r["eta"] is not None else ""
            ax.annotate(f"ρ={r['rho']:g}{eta}", (r["entropy"], r["gen_ppl"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    best = sorted((r["entropy"], r["gen_ppl"]) for r, f in pts if f)
    if len(best) > 1:
        ax.plot(*zip(*best), "k--", lw=1, label="Pareto front")
    ax.set_yscale("log")
    ax.set_xlabel("token entropy (nats; higher = more diverse)")
    ax.set_ylabel("generative perplexity (judge; lower = more fluent)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = figure_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
