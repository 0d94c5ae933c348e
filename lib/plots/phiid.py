"""Figures for notebook 02 (PhiID over all head pairs). Each function returns a matplotlib Figure."""
import matplotlib
import numpy as np

from lib.plots.common import new_figure

__all__ = ["colour_norm", "atom_heatmaps"]

ATOM_LABELS = {"sts": "synergy (sts)", "rtr": "redundancy (rtr)"}


def layer_order(head_layer, head_index):
    """Permutation of heads sorted by (layer, index within layer)."""
    return np.lexsort((np.asarray(head_index), np.asarray(head_layer)))


def colour_norm(values: np.ndarray, lo_pct: float = 2, hi_pct: float = 98):
    """A colour scale that shows structure: limits at the 2nd-98th percentiles of the defined values, logarithmic
    when they are positive and span more than two decades. -> (matplotlib Normalize, description)."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if not v.size:
        return matplotlib.colors.Normalize(), "no defined value"
    lo, hi = np.percentile(v, [lo_pct, hi_pct])
    if lo > 0 and hi / lo > 100:
        return matplotlib.colors.LogNorm(lo, hi), f"log scale, {lo_pct:g}-{hi_pct:g} percentile limits"
    if hi <= lo:
        lo, hi = float(v.min()), float(v.max()) if v.max() > v.min() else float(v.min()) + 1e-12
    return matplotlib.colors.Normalize(lo, hi), f"{lo_pct:g}-{hi_pct:g} percentile limits"


def atom_heatmaps(atoms, head_layer, head_index, names=("sts", "rtr"), title="", cmap="magma"):
    """One heatmap per atom over all ordered head pairs (the paper's Fig 2a).

    atoms: dict name -> [heads, heads] (nats; [i, j] = head i source, head j target; NaN = undefined, drawn grey).
    head_layer, head_index: [heads]. Heads are ordered by layer; white lines mark layer boundaries and the ticks
    name the layers.
    """
    order = layer_order(head_layer, head_index)
    layers = np.asarray(head_layer)[order]
    starts = np.flatnonzero(np.r_[True, layers[1:] != layers[:-1]])
    centres = (starts + np.r_[starts[1:], len(layers)] - 1) / 2
    step = max(1, len(starts) // 12)  # at most ~12 layer labels
    fig, axes = new_figure(5.2 * len(names), 4.6, ncols=len(names), squeeze=False)
    for ax, name in zip(axes[0], names):
        values = np.asarray(atoms[name], dtype=float)[np.ix_(order, order)]
        colours = matplotlib.colormaps[cmap].with_extremes(bad="0.8")
        norm, how = colour_norm(values)
        image = ax.imshow(np.ma.masked_invalid(values), cmap=colours, norm=norm, interpolation="nearest")
        for s in starts[1:]:
            ax.axhline(s - 0.5, color="white", lw=0.6)
            ax.axvline(s - 0.5, color="white", lw=0.6)
        ax.set_xticks(centres[::step], [str(l) for l in layers[starts][::step]])
        ax.set_yticks(centres[::step], [str(l) for l in layers[starts][::step]])
        ax.set_xlabel("target head (ordered by layer; ticks: layer)")
        ax.set_ylabel("source head (ordered by layer; ticks: layer)")
        ax.set_title(ATOM_LABELS.get(name, name))
        fig.colorbar(image, ax=ax, shrink=0.85, extend="both", label=f"{name} (nats; {how})")
    if title:
        fig.suptitle(title)
    return fig
