"""Figures of the cross-model comparison (the notebook NB.COMPARE of lib.storage.notebooks, run by lib/compare.py)."""
from __future__ import annotations

import pandas as pd

from lib.plots.common import new_figure

__all__ = ["plot_syn_red", "plot_depth_profiles", "plot_ablation_curves"]


def plot_depth_profiles(profiles: list[pd.DataFrame], variant: str = "rank_diff"):
    """The paper's Fig 2c: mean `variant` score per layer over normalised depth, one line per run (markers on the
    layers), with the circular-shift null's 2.5-97.5 % band."""
    fig, ax = new_figure(7.0, 4.2)
    for i, p in enumerate(profiles):
        color = f"C{i}"
        ax.fill_between(p["depth"], p["null_lo"], p["null_hi"], color=color, alpha=0.15,
                        label=f"{p['run'].iloc[0]}: null 95% band")
        ax.plot(p["depth"], p["score"], "o-", color=color, ms=4, label=f"{p['run'].iloc[0]}: {variant}")
    ax.set_xlabel("normalised depth ((layer + 0.5) / layers)")
    ax.set_ylabel(f"mean {variant} score of the layer's heads (rank, 0-1)")
    ax.set_xlim(0, 1)
    ax.set_title("Synergy-minus-redundancy profile over depth (cf. the paper's Fig 2c)")
    ax.legend(loc="best", fontsize=8)
    return fig


def plot_ablation_curves(curves: list[pd.DataFrame], variant: str = "rank_diff"):
    """KL(clean ‖ ablated) vs fraction of heads removed, one panel per run: ranking, reverse, random mean and band."""
    fig, axes = new_figure(4.2 * len(curves), 3.8, ncols=len(curves), squeeze=False)
    for ax, c in zip(axes[0], curves):
        ax.fill_between(c["fraction"], c["random_lo"], c["random_hi"], color="0.6", alpha=0.3,
                        label="random orders (min-max)")
        ax.plot(c["fraction"], c["random_mean"], "s--", color="0.4", ms=4, label="random orders (mean)")
        ax.plot(c["fraction"], c["ranking"], "o-", color="C3", ms=4, label=f"{variant} (most synergistic first)")
        ax.plot(c["fraction"], c["reverse"], "^-", color="C0", ms=4, label=f"{variant} reversed")
        ax.set_xlabel("fraction of heads removed")
        ax.set_ylabel("KL(clean ‖ ablated) (nats/token)")
        ax.set_title(c["run"].iloc[0])
        ax.legend(fontsize=7)
    return fig


def plot_syn_red(table: pd.DataFrame):
    """Head-level synergy-redundancy Spearman with its 95% CI, per run and weights (trained, random-init)."""
    fig, ax = new_figure(6.0, 3.2)
    labels = [f"{r.run}\n{r.weights}" for r in table.itertuples()]
    y = table["syn-red Spearman"].to_numpy(float)
    lo = table["ci_lo"].to_numpy(float)
    hi = table["ci_hi"].to_numpy(float)
    ax.errorbar(range(len(y)), y, yerr=[y - lo, hi - y], fmt="o", capsize=4, label="Spearman (95% CI)")
    ax.axhline(0, color="0.5", lw=0.8, ls=":", label="no correlation (null)")
    ax.set_xticks(range(len(y)), labels, fontsize=8)
    ax.set_ylabel("synergy vs redundancy (Spearman over heads)")
    ax.set_xlabel("run and weights")
    ax.legend(fontsize=8)
    return fig
