"""The picture of a hyperschedule, drawn like the paper's Fig. 2 (§3.1)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from . import figure_path

if TYPE_CHECKING:  # pragma: no cover
    from ..hyperschedule import Hyperschedule


def plot_hyperschedule(hs: "Hyperschedule", path: str | Path, title: str | None = None) -> Path:
    """Write a heat map of τ[t, i] / 𝒯 to ``path`` (format from its suffix) and return the path.

    Positions i run across, generation steps t run down (t = 0, pure noise, on top), and the
    colour is the noise level, red high and blue low as in Fig. 2. Uses matplotlib's Agg canvas
    directly, so no global backend is changed and no display is needed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    path = figure_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = (hs.table.double() / hs.levels).numpy()
    # Keep tiny tables legible and huge ones bounded.
    w = min(12.0, max(3.0, 0.25 * hs.d + 1.5))
    h = min(12.0, max(2.5, 0.25 * (hs.T + 1) + 1.0))
    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(noise, cmap="coolwarm", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest",
                   extent=(-0.5, hs.d - 0.5, hs.T + 0.5, -0.5))
    ax.set_xlabel("position $i$")
    ax.set_ylabel("generation step $t$")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if title is None:
        title = (f"{hs.kind}: $d$={hs.d}, $T$={hs.T}, $\\mathcal{{T}}$={hs.levels}, "
                 f"$\\omega$={hs.width}, $\\rho$={hs.rho:g}")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label=r"noise level $\tau/\mathcal{T}$")
    fig.tight_layout()
    fig.savefig(path)
    return path
