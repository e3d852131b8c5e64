"""What every picture of ``triform.inspect`` shares: pyplot on the Agg backend, imported on first use
(matplotlib is slow to import), and a figure written as PNG and then freed."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot``, on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path | str, **savefig: Any) -> Path:
    """Write ``fig`` to ``path`` (``savefig`` options such as ``bbox_inches``), close it, return the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.savefig(path, **savefig)
    plt.close(fig)
    return path
