"""Figures of notebook 06 (MLP neuron direct vs indirect effects). Each function returns a Figure."""
from __future__ import annotations

import matplotlib as mpl
import numpy as np
import pandas as pd

from lib.plots.common import LAYER_CMAP, layer_colors, new_figure

__all__ = ["direct_vs_total", "direct_ratio_by_layer", "class_counts_by_layer", "mean_direct_ratio_by_layer"]

CLASS_COLORS = {"routing-dominant": "#4c72b0", "mixed": "#bbbbbb", "logit-dominant": "#dd8452"}


def direct_vs_total(effects: pd.DataFrame, n_layers: int, mode: str = "add", scale: str = "symlog"):
    """Scatter of the direct vs total target-logit effect, one point per (neuron, prompt), coloured by layer.
    On the diagonal the effect is all direct; on the horizontal axis (direct = 0) it is all indirect.
    scale "symlog" (default): both axes linear within +-linthresh (the 25th percentile of the nonzero |effects|,
    rounded up to a power of ten) and logarithmic outside, so a few large effects do not squash the rest; "linear" otherwise."""
    fig, ax = new_figure(6.4, 5.0)
    norm = mpl.colors.BoundaryNorm(np.arange(-0.5, n_layers + 0.5), mpl.colormaps[LAYER_CMAP].N)
    sc = ax.scatter(effects["total"], effects["direct"], c=effects["layer"], cmap=LAYER_CMAP, norm=norm, s=10,
                    alpha=0.7, linewidths=0)
    values = np.abs(np.r_[effects["total"], effects["direct"]])
    values = values[np.isfinite(values) & (values > 0)]
    lim = float(values.max()) * 1.3 if len(values) else 1.0
    ax.plot([-lim, lim], [-lim, lim], color="k", lw=0.8, ls="--", label="direct = total (no indirect part)")
    ax.axhline(0, color="0.5", lw=0.6, label="direct = 0 (all indirect)")
    unit = "logits"
    if scale == "symlog" and len(values):
        linthresh = float(10 ** np.ceil(np.log10(np.percentile(values, 25))))     # a power of ten: clean ticks
        ax.set_xscale("symlog", linthresh=linthresh)
        ax.set_yscale("symlog", linthresh=linthresh)
        unit = f"logits; symlog, linear within ±{linthresh:.2g}"
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_xlabel(f"total effect on the target logit ({unit})")
    ax.set_ylabel(f"direct effect on the target logit ({unit})")
    ax.set_title(f"Neuron effects, mode '{mode}': direct vs total ({effects['neuron_id'].nunique()} neurons x "
                 f"{effects['prompt'].nunique()} prompts)")
    ax.legend(loc="upper left", frameon=False)
    bar = fig.colorbar(sc, ax=ax, label="layer (index)")
    bar.set_ticks(np.unique(np.linspace(0, n_layers - 1, min(n_layers, 11)).round().astype(int)))
    return fig


def direct_ratio_by_layer(summary: pd.DataFrame, n_layers: int, thresholds=(0.3, 0.7)):
    """Distribution of the neurons' mean direct_ratio per layer (box + points), with the class thresholds."""
    fig, ax = new_figure(max(6.4, 0.28 * n_layers + 2), 4.2)
    colors = layer_colors(n_layers)
    data = [summary.loc[summary["layer"] == l, "direct_ratio_mean"].to_numpy() for l in range(n_layers)]
    present = [l for l in range(n_layers) if len(data[l])]
    if present:
        ax.boxplot([data[l] for l in present], positions=present, widths=0.6, showfliers=False,
                   medianprops={"color": "k"})
    rng = np.random.default_rng(0)
    for l in present:
        ax.scatter(l + rng.uniform(-0.18, 0.18, len(data[l])), data[l], s=8, color=colors[l], alpha=0.8, zorder=3)
    lo, hi = thresholds
    ax.axhline(lo, color=CLASS_COLORS["routing-dominant"], ls="--", lw=1, label=f"{lo:g}: below = routing-dominant")
    ax.axhline(hi, color=CLASS_COLORS["logit-dominant"], ls="--", lw=1, label=f"{hi:g}: above = logit-dominant")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(-0.7, n_layers - 0.3)
    ax.set_xticks(range(n_layers))
    ax.set_xlabel("layer (index)")
    ax.set_ylabel("direct ratio |d| / (|d| + |i|) (mean over prompts)")
    ax.set_title("Direct ratio of the neurons per layer (0 = all indirect, 1 = all direct)")
    fig.legend(loc="outside lower center", ncols=2, frameon=False, fontsize=8)
    return fig


def class_counts_by_layer(layers: pd.DataFrame):
    """Stacked bars: number of neurons of each class per layer."""
    fig, ax = new_figure(max(6.4, 0.28 * len(layers) + 2), 4.0)
    bottom = np.zeros(len(layers))
    for cls, color in CLASS_COLORS.items():
        values = layers[f"n_{cls}"].to_numpy(float)
        ax.bar(layers["layer"], values, bottom=bottom, color=color, label=cls, width=0.8)
        bottom += values
    ax.set_xticks(layers["layer"])
    ax.set_xlabel("layer (index)")
    ax.set_ylabel("neurons (count)")
    ax.set_title("Neuron classes per layer (from the mean direct ratio)")
    fig.legend(loc="outside lower center", ncols=3, frameon=False)
    return fig


def mean_direct_ratio_by_layer(layers: pd.DataFrame, thresholds=(0.3, 0.7)):
    """Mean direct ratio per layer with the thresholds: the 'early routing, late logit' question in one line."""
    fig, ax = new_figure(6.4, 3.6)
    ax.plot(layers["layer"], layers["mean_direct_ratio"], marker="o", color="k", label="mean over neurons")
    ax.plot(layers["layer"], layers["median_direct_ratio"], marker=".", ls=":", color="0.4", label="median")
    for t in thresholds:
        ax.axhline(t, color="0.7", ls="--", lw=0.8)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("layer (index)")
    ax.set_ylabel("direct ratio (mean over neurons)")
    ax.set_title("Direct ratio by layer (dashed: class thresholds)")
    fig.legend(loc="outside lower center", ncols=2, frameon=False)
    return fig
