"""Charts: matplotlib without a display, imported only when a chart is drawn, and PNGs written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.rundir import atomic_path


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    """`fig` as a PNG at `path` (atomically), then closed."""
    plt = pyplot()
    try:
        with atomic_path(path) as tmp:
            # The temporary name ends in .tmp, so the format cannot come from the suffix.
            fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
