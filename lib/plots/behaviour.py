"""Figures of notebook 09 (task behaviour under head perturbation): the paper's Fig 4b and accuracy vs sigma."""
from __future__ import annotations

import numpy as np

from lib.plots.common import new_figure

__all__ = ["plot_accuracy_bars", "plot_accuracy_vs_sigma", "plot_calibration"]

COLORS = {"baseline": "0.55", "redundant": "C2", "random": "0.25", "layer_matched": "C1", "synergistic": "C3"}
ORDER = ("baseline", "redundant", "random", "layer_matched", "synergistic")


def _bar(ax, x, acc, lo, hi, color, label):
    ax.bar(x, acc, color=color, width=0.8, label=label)
    ax.errorbar(x, acc, yerr=[[acc - lo], [hi - acc]], fmt="none", ecolor="k", capsize=3, lw=1)


def plot_accuracy_bars(result, perturbation: str | None = None, sigma: float | None = None):
    """Fig 4b: accuracy per condition kind and ranking variant for one perturbation setting. Bars: baseline,
    redundant, random (mean of the sets, error bar +- 1 sd over sets), layer-matched random, synergistic; the other
    error bars are 95% Clopper-Pearson CIs over problems."""
    perturbation, sigma = (perturbation, sigma) if perturbation else result.settings()[0]
    t = result.table
    variants = result.plan.variants
    fig, ax = new_figure(max(5.0, 2.6 * len(variants) + 1.5), 4.2)
    base = t[t.kind == "baseline"].iloc[0]
    block = t[(t.perturbation == perturbation) & (t.sigma == sigma)]
    width = len(ORDER) + 1
    for vi, v in enumerate(variants):
        for ki, kind in enumerate(ORDER):
            x = vi * width + ki
            label = kind.replace("_", "-") if vi == 0 else None
            if kind == "baseline":
                _bar(ax, x, base.accuracy, base.ci_low, base.ci_high, COLORS[kind], label)
            elif kind == "random":
                r = block[block.kind == "random"].accuracy.to_numpy()
                sd = r.std(ddof=1) if len(r) > 1 else 0.0
                _bar(ax, x, r.mean(), r.mean() - sd, r.mean() + sd, COLORS[kind],
                     f"random (mean +- sd of {len(r)} sets)" if vi == 0 else None)
            else:
                row = block[(block.kind == kind) & (block.variant == v)].iloc[0]
                _bar(ax, x, row.accuracy, row.ci_low, row.ci_high, COLORS[kind], label)
    ax.set_xticks([vi * width + 2 for vi in range(len(variants))], variants)
    ax.set_xlabel("ranking variant")
    ax.set_ylabel("accuracy (fraction correct)")
    ax.set_ylim(0, 1.05)
    what = f"noise sigma = {sigma:g} weight sd" if perturbation == "noise" else "heads zeroed"
    ax.set_title(f"Top {result.plan.fraction:.0%} of heads perturbed ({what}), {len(result.plan.problems)} problems")
    ax.legend(loc="upper right", ncols=2, fontsize=8)
    return fig


def plot_accuracy_vs_sigma(result):
    """Accuracy vs noise sigma per kind (first variant's synergistic / redundant / layer-matched; random: mean +- sd
    over sets); sigma 0 is the baseline."""
    curve = result.sigma_curve()
    fig, ax = new_figure(6.4, 4.0)
    if curve.empty:
        ax.axis("off")
        ax.text(0.5, 0.5, "no noise conditions in this run (perturbations without 'noise')", ha="center")
        return fig
    base = float(result.table[result.table.kind == "baseline"].accuracy.iloc[0])
    variant = result.plan.variants[0]
    for kind in ORDER[1:]:
        c = curve[(curve.kind == kind) & ((curve.variant == variant) | (kind == "random"))].sort_values("sigma")
        x = np.concatenate([[0.0], c.sigma.to_numpy()])
        y = np.concatenate([[base], c.accuracy.to_numpy()])
        ax.plot(x, y, "o-", color=COLORS[kind], label=kind.replace("_", "-") + ("" if kind == "random" else f" ({variant})"))
        if kind == "random" and c.n_sets.max() > 1:
            sd = np.concatenate([[0.0], c.sd.fillna(0).to_numpy()])
            ax.fill_between(x, y - sd, y + sd, color=COLORS[kind], alpha=0.15, lw=0, label="random +- 1 sd over sets")
    ax.set_xlabel("noise sigma (units of the weights' standard deviation)")
    ax.set_ylabel("accuracy (fraction correct)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    return fig


def plot_calibration(calibration, result=None):
    """The dose sweep (behaviour_calibration.csv): accuracy vs noise sigma (log axis) of each calibration random set
    (small markers) and of their mean (line, 95% bootstrap CI over problems), the baseline (dashed, with its 95%
    Clopper-Pearson band), the target (target x baseline accuracy), the chosen sigma (vertical line) and, given the
    main result, the main random sets' mean accuracy at the chosen sigma (diamond, +- 1 sd over sets)."""
    t = calibration.table
    fig, ax = new_figure(6.4, 4.0)
    if t.empty:
        ax.axis("off")
        ax.text(0.5, 0.5, "calibrate: false: no dose sweep (the given sigmas are used)", ha="center")
        return fig
    base = t[t.kind == "baseline"].iloc[0]
    mean = t[t.kind == "random_mean"].sort_values("sigma")
    sets = t[t.kind == "random"]
    ax.axhspan(base.ci_low, base.ci_high, color=COLORS["baseline"], alpha=0.15, lw=0)
    ax.axhline(base.accuracy, color=COLORS["baseline"], ls="--", label=f"baseline ({base.accuracy:.2f}, 95% CI band)")
    target = calibration.settings.target
    ax.axhline(target * base.accuracy, color="C0", ls=":",
               label=f"target: {target:g} x baseline = {target * base.accuracy:.2f}")
    ax.plot(sets.sigma, sets.accuracy, "o", ms=3, color=COLORS["random"], alpha=0.4,
            label=f"each of {sets.seed.nunique()} random sets")
    ax.errorbar(mean.sigma, mean.accuracy, yerr=[mean.accuracy - mean.ci_low, mean.ci_high - mean.accuracy], fmt="o-",
                color=COLORS["random"], capsize=3, label="random sets' mean (95% CI over problems)")
    ax.axvline(calibration.sigma, color="C3", lw=1, label=f"chosen sigma {calibration.sigma:g}")
    if result is not None:
        acc = result.table[(result.table.kind == "random") & (result.table.perturbation == "noise")
                           & (result.table.sigma == calibration.sigma)].accuracy.to_numpy()
        if len(acc):
            ax.errorbar([calibration.sigma], [acc.mean()], yerr=[[acc.std(ddof=1) if len(acc) > 1 else 0.0]] * 2,
                        fmt="D", color="C3", capsize=3,
                        label=f"main run: {len(acc)} random sets, {len(result.plan.problems)} problems (+- 1 sd)")
    ax.set_xscale("log")
    ax.set_xlabel("noise sigma (units of the weights' standard deviation, log scale)")
    ax.set_ylabel("accuracy (fraction correct)")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"Dose calibration on {int(base.n_problems)} problems (random head sets only)")
    ax.legend(fontsize=7, loc="upper right")
    return fig
