"""Figures of notebook 07 (QK-OV interference). Each function takes a lib.experiments.interference.InterferenceResult and
returns a Figure. K and V panels have one column per KV head (grouped-query attention: not copied per query head).
An empty result (no task-B samples) gives a figure that says so instead of NaN heatmaps."""
from __future__ import annotations

import numpy as np
from matplotlib.colors import TwoSlopeNorm

from lib.plots.common import new_figure

__all__ = ["BLOCKS", "block_heatmaps", "layer_profiles", "pair_matrix", "fisher_profile"]

BLOCKS = ("Q", "K", "V", "O")
BLOCK_COLORS = {"Q": "#1f77b4", "K": "#ff7f0e", "V": "#2ca02c", "O": "#d62728"}
VARIANT_LABELS = {
    "magnitude": "M = sum C_i/F_A |g_j|",
    "signed": "signed sum g_i g_j / F_A",
    "symmetric": "symmetric sum sqrt(C_i C_j) / F_A",
    "pooled": "M with pooled Fisher (F_A+F_B)/2",
}
UNITS = {"magnitude": "nats per unit weight", "pooled": "nats per unit weight",
         "signed": "dimensionless", "symmetric": "dimensionless"}


def _empty_figure(result, title: str):
    fig, ax = new_figure(6.4, 2.4)
    ax.axis("off")
    ax.text(0.5, 0.5, f"no pairs to show: task A has {result.n_a} and task B ({result.task_b!r}) has "
            f"{result.n_b} samples", ha="center", va="center", wrap=True)
    ax.set_title(title)
    return fig


def _title(result, what: str) -> str:
    return f"{what}\nA = {result.task_a!r} (n={result.n_a}), B = {result.task_b!r} (n={result.n_b})"


def block_heatmaps(result, variant: str = "magnitude"):
    """Layer x head mean score over all (i, j) pairs, one panel per block (Q, K, V, O), one colour scale each."""
    title = _title(result, f"QK-OV interference per head, {VARIANT_LABELS.get(variant, variant)}")
    if result.empty:
        return _empty_figure(result, title)
    widths = [result.heads(b) + 1.5 for b in BLOCKS]
    fig, axes = new_figure(max(12.8, 2.0 + 0.45 * sum(widths)), 1.9 + 0.16 * result.n_layers,
                           ncols=len(BLOCKS), gridspec_kw={"width_ratios": widths})
    for ax, block in zip(axes, BLOCKS):
        m = result.layer_head_mean(block, variant)
        if variant == "signed":
            lim = float(np.abs(m).max()) or 1.0
            im = ax.imshow(m, aspect="auto", cmap="RdBu", norm=TwoSlopeNorm(0.0, -lim, lim), origin="lower")
        else:
            im = ax.imshow(m, aspect="auto", cmap="magma", origin="lower", vmin=0)
        kind = "KV head" if block in ("K", "V") else "query head"
        ax.set_title(f"{block} ({result.heads(block)} {kind}s)")
        ax.set_xlabel(f"{kind} index")
        ax.set_ylabel("layer")
        ax.set_xticks(range(result.heads(block)))
        cbar = fig.colorbar(im, ax=ax, fraction=0.08)
        cbar.set_label(f"mean score\n({UNITS.get(variant, '')})")
    fig.suptitle(title)
    return fig


def layer_profiles(result, variants=None):
    """Per-layer mean score (over pairs and heads) of each block, one panel per variant."""
    variants = list(variants or result.variants)
    title = _title(result, "QK-OV interference by layer")
    if result.empty:
        return _empty_figure(result, title)
    fig, axes = new_figure(3.6 * len(variants), 3.9, ncols=len(variants), squeeze=False)
    layers = np.arange(result.n_layers)
    for ax, variant in zip(axes[0], variants):
        for block in BLOCKS:
            ax.plot(layers, result.layer_head_mean(block, variant).mean(1), marker="o", ms=3,
                    color=BLOCK_COLORS[block], label=block)
        if variant == "signed":
            ax.axhline(0, color="grey", lw=0.8)
        elif all((result.layer_head_mean(b, variant) > 0).all() for b in BLOCKS):
            ax.set_yscale("log")                    # blocks differ by orders of magnitude
        ax.set_title(VARIANT_LABELS.get(variant, variant), fontsize=9)
        ax.set_xlabel("layer")
        ax.set_ylabel(f"mean score per head\n({UNITS.get(variant, '')})")
        ax.legend(title="block")
    fig.suptitle(title)
    return fig


def pair_matrix(result, variant: str = "magnitude"):
    """Each (task-A sample, task-B sample) pair's score summed over layers, heads and blocks, with the true ids."""
    title = _title(result, f"Per-pair total, {VARIANT_LABELS.get(variant, variant)}")
    if result.empty:
        return _empty_figure(result, title)
    totals = result.pair_totals(variant)
    fig, ax = new_figure(max(6.4, 3.5 + 0.4 * result.n_b), 2.4 + 0.3 * result.n_a)
    if variant == "signed":
        lim = float(np.abs(totals).max()) or 1.0
        im = ax.imshow(totals, aspect="auto", cmap="RdBu", norm=TwoSlopeNorm(0.0, -lim, lim))
    else:
        im = ax.imshow(totals, aspect="auto", cmap="magma")
    ax.set_xticks(range(result.n_b), result.ids_b, rotation=90, fontsize=7)
    ax.set_yticks(range(result.n_a), result.ids_a, fontsize=7)
    ax.set_xlabel(f"task B sample j ({result.task_b})")
    ax.set_ylabel(f"task A sample i ({result.task_a})")
    fig.colorbar(im, ax=ax).set_label(f"sum over layers, heads, blocks ({UNITS.get(variant, '')})")
    fig.suptitle(title, fontsize=10)
    return fig


def fisher_profile(result):
    """Task-A Fisher mass (sum of F_A over each head's slice) per layer and block: where task A is sensitive."""
    title = f"Task-A diagonal Fisher per layer\nA = {result.task_a!r} (n={result.n_a})"
    fig, ax = new_figure(5.6, 3.4)
    for block in BLOCKS:
        ax.plot(np.arange(result.n_layers), result.fisher_mass[block].sum(1), marker="o", ms=3,
                color=BLOCK_COLORS[block], label=block)
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("sum of F_A over the block\n(nats² per unit weight²)")
    ax.legend(title="block")
    ax.set_title(title, fontsize=10)
    return fig
