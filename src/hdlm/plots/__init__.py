"""Pictures people would rather look at: hyperschedules, training curves, denoising traces.

Matplotlib is imported lazily (Agg backend) so that importing hdlm stays cheap.
"""

from __future__ import annotations

from pathlib import Path


def figure_path(path: str | Path) -> Path:
    """The file a picture is written to, so that the path printed is the file written (issue #12
    item 10): a name without a suffix gets ``.png`` (what matplotlib appends); a suffix must be an
    image format matplotlib writes (png, pdf, svg, ...), else one line."""
    from ..errors import HDLMError

    path = Path(path)
    if not path.suffix:
        return path.with_name(path.name + ".png")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if path.suffix[1:].lower() not in FigureCanvasAgg.get_supported_filetypes():
        raise HDLMError(f"picture '{path}': unknown image format '{path.suffix}' (use .png, .pdf or .svg)")
    return path
