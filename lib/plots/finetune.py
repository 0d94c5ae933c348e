"""Figures of notebook 10 (learning through selected heads): the paper's Fig 5, learning curves, weight-change map."""
from __future__ import annotations

import numpy as np
from matplotlib.patches import Rectangle

from lib.plots.common import new_figure

__all__ = ["accuracy_by_condition", "learning_curves", "delta_map"]

KIND_COLORS = {"synergistic": "C3", "redundant": "C0", "random": "0.35", "layer_matched": "C2"}
KIND_ORDER = ("synergistic", "redundant", "random", "layer_matched")


def accuracy_by_condition(result, metric: str = "final"):
    """Fig 5: test accuracy after training per condition (one panel per method); a dot per run (seed / random
    set) with its Clopper-Pearson 95% CI, the accuracy before training as a dashed line."""
    finals, curves = result.finals(), result.curves()
    methods = list(result.plan.methods)
    fig, axes = new_figure(4.2 * len(methods), 3.8, ncols=len(methods), squeeze=False)
    for ax, method in zip(axes[0], methods):
        rows = finals[finals.method == method]
        last = curves[(curves.method == method)].sort_values("step").groupby(["condition", "seed"]).tail(1)
        for x, kind in enumerate(k for k in KIND_ORDER if k in set(rows.kind)):
            sub = last[last.kind == kind]
            jitter = np.linspace(-0.15, 0.15, len(sub)) if len(sub) > 1 else np.zeros(1)
            ax.errorbar(x + jitter, 100 * sub.accuracy, yerr=100 * np.abs(sub[["ci_lo", "ci_hi"]].to_numpy().T
                        - sub.accuracy.to_numpy()), fmt="o", color=KIND_COLORS[kind], capsize=3, label=kind)
        ax.axhline(100 * rows.before.mean(), ls="--", color="0.5", lw=1, label="before training")
        kinds = [k for k in KIND_ORDER if k in set(rows.kind)]
        ax.set_xticks(range(len(kinds)), [k.replace("_", "-") for k in kinds], rotation=20)
        ax.set_ylabel("test accuracy after training (%)")
        ax.set_title(f"{method.upper()}: {len(result.plan.seeds_for(method))} seed(s), {len(rows)} runs", fontsize=10)
    _legend_below(fig, axes[0])
    fig.suptitle(f"Learning through {100 * result.plan.fraction:.0f}% of heads selected by {result.plan.variant} "
                 f"({result.plan.model})", fontsize=10)
    return fig


def _legend_below(fig, axes) -> None:
    """One legend for all panels, under them (a legend inside a panel covered an error bar)."""
    entries = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    fig.legend(entries.values(), entries.keys(), loc="outside lower center", ncol=min(len(entries), 5), fontsize=8)


def learning_curves(result):
    """Test accuracy vs training step per condition (mean over runs of a kind), with the 95% CI of one run's
    accuracy (Clopper-Pearson) as a band."""
    curves = result.curves()
    methods = list(result.plan.methods)
    fig, axes = new_figure(4.6 * len(methods), 3.6, ncols=len(methods), squeeze=False)
    for ax, method in zip(axes[0], methods):
        sub = curves[curves.method == method]
        for kind in (k for k in KIND_ORDER if k in set(sub.kind)):
            g = sub[sub.kind == kind].groupby("step")[["accuracy", "ci_lo", "ci_hi"]].mean()
            ax.plot(g.index, 100 * g.accuracy, "-o", ms=4, color=KIND_COLORS[kind], label=kind)
            ax.fill_between(g.index, 100 * g.ci_lo, 100 * g.ci_hi, color=KIND_COLORS[kind], alpha=0.12, lw=0)
        ax.fill_between([], [], [], color="0.5", alpha=0.25, lw=0, label="95% CI of one run's accuracy (band)")
        ax.set_xticks(sorted(set(sub.step)))
        ax.set_xlabel("training step")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(method.upper(), fontsize=10)
        ax.legend(fontsize=8)
    return fig


def delta_map(result, condition: str | None = None, method: str | None = None, seed: int | None = None):
    """Layer x head map of the weight change (Frobenius norm of the Q and O slices together) for one run; the
    selected heads are outlined: every change must sit inside an outline."""
    deltas = result.deltas()
    method = method or result.plan.methods[0]
    condition = condition or "synergistic"
    seed = result.plan.seeds[0] if seed is None else seed
    d = deltas[(deltas.method == method) & (deltas.condition == condition) & (deltas.seed == seed)
               & deltas.block.isin(["Q", "O"])]
    n_layers, n_heads = int(d["layer"].max()) + 1, int(d["head"].max()) + 1
    grid = np.zeros((n_layers, n_heads))
    chosen = np.zeros((n_layers, n_heads), bool)
    for layer, head, norm, selected in d[["layer", "head", "delta_norm", "selected"]].itertuples(index=False):
        grid[layer, head] = np.hypot(grid[layer, head], norm)
        chosen[layer, head] |= bool(selected)
    fig, ax = new_figure(2.5 + 0.35 * n_heads, 1.8 + 0.16 * n_layers)
    im = ax.imshow(grid, aspect="auto", cmap="magma", interpolation="nearest")
    for layer, head in zip(*np.nonzero(chosen)):
        ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, ec="cyan", lw=0.8))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax).set_label("||delta W|| of Q rows and O columns (weight units)")
    ax.set_title(f"weight change, {method.upper()} {condition} seed {seed} (outlined: trained heads)", fontsize=9)
    return fig
