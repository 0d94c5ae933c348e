"""Figures of notebook 03 (PhiID diagnostics). Each function returns a matplotlib Figure."""
from __future__ import annotations

import matplotlib as mpl
import numpy as np

from lib.plots.common import LAYER_CMAP, new_figure

__all__ = ["syn_red_scatter", "pair_hexbin", "autocorr_vs_atoms", "layer_profiles", "head_heatmaps", "pair_matrix",
           "c1_null"]

LABELS = {
    "synergy": "synergy, mean sts per pair (nats)",
    "redundancy": "redundancy, mean rtr per pair (nats)",
    "autocorr": "lag-1 autocorrelation (Pearson r)",
    "drift": "drift (fitted change / mean norm)",
    "tdmi": "TDMI, I(past; future) per pair (nats)",
    "mean_norm": "mean head output norm (L2)",
}


def _layer_colorbar(fig, ax, n_layers):
    norm = mpl.colors.Normalize(0, max(n_layers - 1, 1))
    cb = fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=LAYER_CMAP), ax=ax)
    cb.set_label("layer (0 = first)")
    return cb


def _corr_text(c, prefix=""):
    return f"{prefix}Pearson r = {c['pearson']:.2f}, Spearman ρ = {c['spearman']:.2f} (n = {c['n']})"


def syn_red_scatter(heads, corr: dict, n_layers: int, title_prefix: str = ""):
    """Per-head synergy vs redundancy, coloured by layer. corr: diagnostics summary['syn_red']."""
    fig, ax = new_figure(6.4, 4.8)
    ax.scatter(heads["redundancy"], heads["synergy"], c=heads["layer"], cmap=LAYER_CMAP, vmin=0,
               vmax=max(n_layers - 1, 1), s=18, edgecolor="none", alpha=0.85)
    _layer_colorbar(fig, ax, n_layers)
    ax.set_xlabel(LABELS["redundancy"])
    ax.set_ylabel(LABELS["synergy"])
    ax.set_title(f"{title_prefix}Per-head synergy vs redundancy\nPearson r = {corr['head_pearson']:.2f}, "
                 f"Spearman ρ = {corr['head_spearman']:.2f} ({corr['n_heads']} heads)")
    return fig


def pair_hexbin(pairs, corr: dict, gridsize: int = 50):
    """Pair-level sts vs rtr as a hexbin (log counts)."""
    fig, ax = new_figure(6.4, 4.8)
    hb = ax.hexbin(pairs["rtr"], pairs["sts"], gridsize=gridsize, bins="log", cmap="magma_r", mincnt=1)
    cb = fig.colorbar(hb, ax=ax)
    cb.set_label("head pairs per bin (log scale)")
    ax.set_xlabel("redundancy rtr of the pair (nats)")
    ax.set_ylabel("synergy sts of the pair (nats)")
    ax.set_title(f"Pair-level synergy vs redundancy\nPearson r = {corr['pair_pearson']:.2f}, "
                 f"Spearman ρ = {corr['pair_spearman']:.2f} ({corr['n_pairs']} pairs)")
    return fig


def autocorr_vs_atoms(heads, summary: dict, n_layers: int):
    """Lag-1 autocorrelation vs per-head synergy and redundancy (two panels), coloured by layer."""
    fig, axes = new_figure(11, 4.3, ncols=2)
    for ax, col, key in zip(axes, ("synergy", "redundancy"), ("autocorr_vs_synergy", "autocorr_vs_redundancy")):
        ax.scatter(heads["autocorr"], heads[col], c=heads["layer"], cmap=LAYER_CMAP, vmin=0,
                   vmax=max(n_layers - 1, 1), s=16, edgecolor="none", alpha=0.85)
        ax.set_xlabel(LABELS["autocorr"])
        ax.set_ylabel(LABELS[col])
        ax.set_title(f"{col} vs autocorrelation\n{_corr_text(summary[key])}", fontsize=10)
    _layer_colorbar(fig, axes[-1], n_layers)
    return fig


def layer_profiles(profiles: dict, columns=None, ncols: int = 3):
    """Per-layer mean +- standard error (over the heads of the layer) of per-head quantities against
    normalised depth. profiles: name -> lib.experiments.diagnostics.layer_profile frame."""
    columns = list(columns or profiles)
    nrows = int(np.ceil(len(columns) / ncols))
    fig, axes = new_figure(4.0 * ncols, 3.2 * nrows, ncols=ncols, nrows=nrows, squeeze=False)
    for ax, col in zip(axes.flat, columns):
        p = profiles[col]
        ax.errorbar(p["depth"], p["mean"], yerr=p["sem"], marker="o", ms=3, lw=1.2, capsize=2, color="C0",
                    label="layer mean ± s.e.m.")
        ax.set_xlabel("normalised depth (layer / (layers - 1))")
        ax.set_ylabel(LABELS.get(col, col), fontsize=9)
        ax.set_title(col)
        ax.set_xlim(-0.03, 1.03)
    for ax in list(axes.flat)[len(columns):]:
        ax.set_visible(False)
    axes.flat[0].legend(loc="best")
    fig.suptitle("Per-layer profiles (mean over the heads of each layer)")
    return fig


def head_heatmaps(grids: dict, ncols: int = 3, cmaps: dict | None = None):
    """[layers, heads] heatmaps of per-head quantities. grids: name -> 2-D array."""
    names = list(grids)
    nrows = int(np.ceil(len(names) / ncols))
    fig, axes = new_figure(4.2 * ncols, 3.6 * nrows, ncols=ncols, nrows=nrows, squeeze=False)
    for ax, name in zip(axes.flat, names):
        g = np.asarray(grids[name])
        im = ax.imshow(g, aspect="auto", origin="lower", cmap=(cmaps or {}).get(name, "viridis"),
                       interpolation="nearest")
        cb = fig.colorbar(im, ax=ax)
        cb.set_label(LABELS.get(name, name), fontsize=8)
        ax.set_xlabel("head index within layer")
        ax.set_ylabel("layer")
        ax.set_title(name)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    return fig


def pair_matrix(M, head_layer, title: str, unit: str = "nats", cmap: str = "viridis"):
    """[heads, heads] pair matrix (row = source head, column = target head) with layer boundaries."""
    fig, ax = new_figure(6.2, 5.2)
    M = np.asarray(M, dtype=float)
    finite = M[np.isfinite(M)]
    vmax = np.quantile(finite, 0.99) if len(finite) else None
    im = ax.imshow(M, cmap=cmap, vmax=vmax, interpolation="nearest")
    cb = fig.colorbar(im, ax=ax)
    cb.set_label(f"{title} ({unit}; colour clipped at the 99th percentile)", fontsize=8)
    head_layer = np.asarray(head_layer)
    starts = np.flatnonzero(np.diff(head_layer)) + 0.5
    for s in starts:
        ax.axhline(s, color="w", lw=0.3, alpha=0.35)
        ax.axvline(s, color="w", lw=0.3, alpha=0.35)
    n_layers = int(head_layer.max()) + 1
    step = max(1, n_layers // 10)
    ticks = [np.flatnonzero(head_layer == l)[0] for l in range(0, n_layers, step)]
    ax.set_xticks(ticks, [str(head_layer[t]) for t in ticks])
    ax.set_yticks(ticks, [str(head_layer[t]) for t in ticks])
    ax.set_xlabel("target head (ticks: first head of the layer)")
    ax.set_ylabel("source head (layer)")
    ax.set_title(f"{title} for every head pair")
    return fig


def c1_null(rows: list[dict], nulls: dict, brain: float = -0.4):
    """Claim C1 per copy of the model (rows: lib.pipeline.claims.c1_against_null; nulls: copy -> [surrogates] Spearman r of
    each circular-shift surrogate): every surrogate's r (grey dots), the null's 95% band (grey bar), the observed r
    with its bootstrap 95% CI (black), and the brain's r (dashed)."""
    fig, ax = new_figure(7.6, 1.6 + 0.75 * len(rows))
    for y, row in enumerate(rows):
        null = np.asarray(nulls.get(row["copy"], []), float)
        ax.fill_betweenx([y - 0.28, y + 0.28], row["null_low"], row["null_high"], color="0.75", lw=0,
                         label="null: 95% band of the surrogates" if y == 0 else None)
        ax.plot(null, y + np.linspace(-0.18, 0.18, len(null)), "o", ms=2.5, color="0.45", ls="none",
                label=f"null: each surrogate's r ({len(null)})" if y == 0 else None)
        ax.errorbar([row["r"]], [y], xerr=[[row["r"] - row["ci_low"]], [row["ci_high"] - row["r"]]], fmt="D",
                    color="k", capsize=4, ms=6, label="observed r (95% bootstrap CI over heads)" if y == 0 else None)
    ax.axvline(brain, color="C3", ls="--", lw=1, label=f"brain (Luppi et al.): r ~ {brain:g}")
    ax.axvline(0, color="0.6", lw=0.6)
    ax.set_yticks(range(len(rows)), [r["copy"].replace("_", "-") for r in rows])
    ax.set_ylim(len(rows) - 0.4, -0.6)                   # the first copy (the trained model) on top
    ax.set_xlim(-1, 1)
    ax.set_xlabel("Spearman r(synergy, redundancy) over heads, per-prompt PhiID")
    ax.set_title("Claim C1: observed syn-red correlation against its circular-shift null", fontsize=10)
    ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    return fig
