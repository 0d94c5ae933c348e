"""Figures of notebook 04 (ranking variants). Each function returns a matplotlib Figure."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from lib.plots.common import new_figure

__all__ = ["variant_heatmaps", "variant_profiles", "excess_profiles", "agreement_heatmap", "reliability_plot",
           "tag_profiles"]

SCORE_LABEL = "head score (0 = most redundant, 1 = most synergistic)"
DEPTH_LABEL = "normalised depth (layer / (layers - 1))"


def _grid(n, ncols):
    return int(np.ceil(n / ncols)), min(n, ncols)


def variant_heatmaps(scores: dict, head_layer, head_index, n_layers: int, n_heads: int, ncols: int = 4):
    """Fig 2b per variant: head score as a [layer x head] heatmap."""
    names = list(scores)
    nrows, ncols = _grid(len(names), ncols)
    fig, axes = new_figure(3.4 * ncols, 3.4 * nrows, ncols=ncols, nrows=nrows, squeeze=False)
    im = None
    for ax, name in zip(axes.flat, names):
        grid = np.full((n_layers, n_heads), np.nan)
        grid[np.asarray(head_layer), np.asarray(head_index)] = scores[name].score
        im = ax.imshow(grid, aspect="auto", origin="lower", cmap="RdBu_r", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("head index within layer")
        ax.set_ylabel("layer")
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    cb = fig.colorbar(im, ax=axes, shrink=0.8)
    cb.set_label(SCORE_LABEL)
    fig.suptitle("Head scores per ranking variant (red = synergistic, blue = redundant)")
    return fig


def variant_profiles(null_table, verdicts=None, ncols: int = 4):
    """Fig 2c per variant: per-layer mean score against normalised depth, with the circular-shift surrogate
    null (mean and 95% band). null_table: lib.experiments.ranking.null_tables; verdicts: lib.experiments.ranking.inverted_u_table."""
    names = list(dict.fromkeys(null_table["variant"]))
    verdict = {} if verdicts is None else dict(zip(verdicts["variant"], verdicts["verdict"]))
    nrows, ncols = _grid(len(names), ncols)
    fig, axes = new_figure(3.6 * ncols, 3.1 * nrows, ncols=ncols, nrows=nrows, squeeze=False, sharey=True)
    for ax, name in zip(axes.flat, names):
        t = null_table[null_table["variant"] == name]
        if np.isfinite(t["null_mean"]).any():
            ax.fill_between(t["depth"], t["null_lo"], t["null_hi"], color="0.8", label="surrogate null, 95%")
            ax.plot(t["depth"], t["null_mean"], color="0.45", ls="--", lw=1, label="surrogate null, mean")
        ax.plot(t["depth"], t["observed"], color="C3", marker="o", ms=3, lw=1.5, label="observed")
        ax.set_title(f"{name}\nraw shape: {verdict.get(name, '')}", fontsize=9)
        ax.set_xlabel(DEPTH_LABEL, fontsize=8)
        ax.set_ylabel("layer mean score (0-1)", fontsize=9)
        ax.set_ylim(-0.02, 1.02)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    axes.flat[0].legend(loc="lower center", fontsize=7)
    fig.suptitle("Layer profiles per ranking variant, with the circular-shift null (raw shape; the claim is decided "
                 "on the excess over the null, next figure)", fontsize=10)
    return fig


def excess_profiles(null_table, verdicts_beyond_null=None, ncols: int = 4):
    """Per variant: the layer mean's excess over the surrogate null (observed - null mean, score units) with the
    null's 95% band around 0; titled with the inverted-U verdict on that excess (the one the claims use)."""
    names = list(dict.fromkeys(null_table["variant"]))
    verdict = {} if verdicts_beyond_null is None else dict(zip(verdicts_beyond_null["variant"],
                                                               verdicts_beyond_null["verdict"]))
    nrows, ncols = _grid(len(names), ncols)
    fig, axes = new_figure(3.6 * ncols, 3.1 * nrows, ncols=ncols, nrows=nrows, squeeze=False, sharey=True)
    for ax, name in zip(axes.flat, names):
        t = null_table[null_table["variant"] == name]
        if np.isfinite(t["null_mean"]).any():
            ax.fill_between(t["depth"], t["null_lo"] - t["null_mean"], t["null_hi"] - t["null_mean"], color="0.85",
                            label="null 95% band")
        ax.axhline(0, color="0.45", ls="--", lw=1)
        ax.plot(t["depth"], t["observed"] - t["null_mean"], color="C0", marker="o", ms=3, lw=1.5,
                label="observed - null mean")
        ax.set_title(f"{name}\nbeyond null: {verdict.get(name, '')}", fontsize=9)
        ax.set_xlabel(DEPTH_LABEL, fontsize=8)
        ax.set_ylabel("excess over null (score)", fontsize=9)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    axes.flat[0].legend(loc="best", fontsize=7)
    fig.suptitle("Excess of each layer mean over the circular-shift null (verdict beyond the null)", fontsize=10)
    return fig


def agreement_heatmap(matrix):
    """Spearman correlation between the head scores of every two variants."""
    n = len(matrix)
    fig, ax = new_figure(1.0 + 0.75 * n, 0.6 + 0.65 * n)
    im = ax.imshow(matrix.to_numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
    for i in range(n):
        for j in range(n):
            v = matrix.iat[i, j]
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color="w" if abs(v) > 0.6 else "k")
    ax.set_xticks(range(n), matrix.columns, rotation=45, ha="right")
    ax.set_yticks(range(n), matrix.index)
    cb = fig.colorbar(im, ax=ax)
    cb.set_label("Spearman ρ between head scores")
    ax.set_title("Agreement between ranking variants")
    return fig


def reliability_plot(summary, per_split):
    """Split-half Spearman per variant (one dot per split), the mean, and the Spearman-Brown estimate."""
    names = list(summary["variant"])
    fig, ax = new_figure(1.5 + 0.9 * len(names), 4.0)
    rng = np.random.default_rng(0)
    for k, name in enumerate(names):
        r = per_split.loc[per_split["variant"] == name, "spearman"].to_numpy()
        ax.scatter(k + 0.08 * rng.standard_normal(len(r)), r, s=10, color="0.5", alpha=0.6,
                   label="one split" if k == 0 else None)
    ax.errorbar(range(len(names)), summary["r_mean"], yerr=summary["r_sd"], fmt="o", color="C0", capsize=3,
                label="mean ± sd over splits")
    ax.scatter(range(len(names)), summary["spearman_brown"], marker="D", color="C3", zorder=3,
               label="Spearman-Brown (full prompt set)")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right")
    ax.set_ylabel("Spearman ρ between halves' head scores")
    ax.set_ylim(min(-0.1, float(np.nanmin(per_split["spearman"])) - 0.05) if len(per_split) else -0.1, 1.02)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title(f"Split-half reliability ({int(summary['prompts_per_half'].iloc[0])} prompts per half)")
    return fig


def tag_profiles(profiles, variants=None, reference: str = "trained", ncols: int = 4, title: str = ""):
    """Layer profiles per variant for several tags (trained, random_init, rev-<revision>, ...).
    profiles: DataFrame (tag, variant, layer, depth, mean); tags keep their order of appearance.
    `reference` is drawn black, random_init grey dashed, checkpoints coloured in training order."""
    variants = list(variants or dict.fromkeys(profiles["variant"]))
    tags = list(dict.fromkeys(profiles["tag"]))
    revs = [t for t in tags if t not in (reference, "random_init")]
    colours = dict(zip(revs, plt.get_cmap("plasma")(np.linspace(0.05, 0.85, max(len(revs), 1)))))
    nrows, ncols = _grid(len(variants), ncols)
    fig, axes = new_figure(3.6 * ncols, 3.1 * nrows, ncols=ncols, nrows=nrows, squeeze=False, sharey=True)
    for ax, name in zip(axes.flat, variants):
        for tag in tags:
            t = profiles[(profiles["variant"] == name) & (profiles["tag"] == tag)]
            if t.empty:
                continue
            style = ({"color": "k", "lw": 2} if tag == reference else
                     {"color": "0.5", "ls": "--", "lw": 1.5} if tag == "random_init" else
                     {"color": colours[tag], "lw": 1.2})
            ax.plot(t["depth"], t["mean"], marker="o", ms=2.5, label=tag, **style)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(DEPTH_LABEL, fontsize=8)
        ax.set_ylabel("layer mean score (0-1)", fontsize=9)
        ax.set_ylim(-0.02, 1.02)
    for ax in list(axes.flat)[len(variants):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7, loc="best")
    fig.suptitle(title or "Layer profiles per variant and model state")
    return fig
