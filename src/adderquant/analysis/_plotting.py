"""The one way the analysis reports draw: a matplotlib ``Figure`` on an Agg canvas (no pyplot state, no
global backend switch), saved as a file. matplotlib is an optional extra, imported here only."""

from __future__ import annotations

from pathlib import Path


def agg_figure(**kwargs):
    """A new ``matplotlib.figure.Figure(**kwargs)`` with an Agg canvas; a clear error without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("plotting needs matplotlib: pip install 'adderquant[plot]'") from err
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path, dpi: int = 120) -> Path:
    """Lay ``fig`` out tightly and write it to ``path`` (format from the suffix), creating the directory."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
