"""Shared figure style: one look for every notebook and the HTML reports."""
from __future__ import annotations

import matplotlib

__all__ = ["LAYER_CMAP", "style", "new_figure", "layer_colors"]

matplotlib.use(matplotlib.get_backend() if matplotlib.get_backend() != "agg" else "agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

LAYER_CMAP = "viridis"


def style() -> None:
    """Readable defaults for reports (called on import)."""
    plt.rcParams.update({
        "figure.dpi": 110, "savefig.dpi": 150, "font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10,
        "legend.fontsize": 9, "axes.spines.top": False, "axes.spines.right": False, "figure.autolayout": False,
    })


def new_figure(width: float = 6.4, height: float = 4.0, ncols: int = 1, nrows: int = 1, **kwargs):
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), layout="constrained", **kwargs)
    return fig, axes


def layer_colors(n_layers: int) -> np.ndarray:
    """[n_layers, 4] RGBA colours, early layers dark, late layers bright."""
    return plt.get_cmap(LAYER_CMAP)(np.linspace(0, 1, max(n_layers, 2)))[:n_layers]


style()
