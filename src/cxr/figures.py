"""Figures: matplotlib without a display, written atomically."""

from __future__ import annotations

from pathlib import Path

from cxr.files import atomic_path


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (stages run without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 100) -> None:
    """Write a matplotlib figure as a PNG, atomically, and free it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    pyplot().close(fig)
