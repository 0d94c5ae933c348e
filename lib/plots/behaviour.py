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


def _sweep(ax, table):
    """The calibration sweep's random sets: each set (small markers) and their mean with its 95% CI."""
    mean, sets = table[table.kind == "random_mean"].sort_values("sigma"), table[table.kind == "random"]
    n = int(table.n_problems.iloc[0])
    ax.plot(sets.sigma, sets.accuracy, "o", ms=3, color=COLORS["random"], alpha=0.35,
            label=f"dose sweep: each of {sets.seed.nunique()} random sets ({n} problems)")
    ax.errorbar(mean.sigma, mean.accuracy, yerr=[mean.accuracy - mean.ci_low, mean.ci_high - mean.accuracy],
                fmt="o-", color=COLORS["random"], capsize=3, ms=4, lw=1,
                label="dose sweep: random sets' mean (95% CI over problems)")


def _main_sets(ax, noise, variant: str):
    """The main run's head sets at each noise sigma: named sets with Clopper-Pearson CIs (shifted a little
    along the log axis so that they do not hide each other), random sets as mean +- 1 sd over sets."""
    for kind, shift in (("redundant", 0.95), ("layer_matched", 1.05), ("synergistic", 1.1)):
        c = noise[(noise.kind == kind) & (noise.variant == variant)].sort_values("sigma")
        if len(c):
            ax.errorbar(c.sigma * shift, c.accuracy, yerr=[c.accuracy - c.ci_low, c.ci_high - c.accuracy],
                        fmt="o" + "-" * (c.sigma.nunique() > 1), color=COLORS[kind], capsize=3, ms=5,
                        label=f"{kind.replace('_', '-')} ({variant}), 95% CI")
    r = noise[noise.kind == "random"].groupby("sigma").accuracy.agg(["mean", "std", "count"])
    if len(r):
        ax.errorbar(r.index, r["mean"], yerr=r["std"].fillna(0.0), fmt="s" + "-" * (len(r) > 1), ms=5, capsize=3,
                    color="k", mfc="white", label=f"random sets' mean, main run (+- 1 sd over {int(r['count'].max())} sets)")


def plot_accuracy_vs_sigma(result, calibration=None):
    """Accuracy vs noise sigma (log axis) at every measured dose: the calibration sweep's random sets (given
    `calibration`), the main run's synergistic / redundant / layer-matched sets of the first variant and its random
    sets; the baseline (dashed, 95% Clopper-Pearson band) and the floor (dotted: max(2, 5 % of n) problems, where a
    comparison is flagged invalid) as horizontal lines. Lines join measured sigmas only."""
    t = result.table
    noise = t[t.perturbation == "noise"]
    sweep = calibration.table if calibration is not None else t.iloc[:0]
    fig, ax = new_figure(7.8, 4.4)
    if noise.empty and sweep.empty:
        ax.axis("off")
        ax.text(0.5, 0.5, "no noise conditions in this run (perturbations without 'noise')", ha="center")
        return fig
    base = t[t.kind == "baseline"].iloc[0]
    n = int(base.n_problems)
    ax.axhspan(base.ci_low, base.ci_high, color=COLORS["baseline"], alpha=0.15, lw=0)
    ax.axhline(base.accuracy, color=COLORS["baseline"], ls="--",
               label=f"baseline, no noise: {base.accuracy:.0%} of {n} (95% CI band)")
    margin = result.floor_margin()
    ax.axhline(margin / n, color="C3", ls=":", lw=1.2, label=f"floor: {margin:g} of {n} problems ({margin / n:.0%})")
    if len(sweep):
        _sweep(ax, sweep)
    _main_sets(ax, noise, result.plan.variants[0])
    ax.set_xscale("log")
    ax.set_xlabel("noise sigma (units of the weights' standard deviation, log scale)")
    ax.set_ylabel("accuracy (fraction correct)")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"Accuracy at every measured noise dose (top {result.plan.fraction:.0%} of heads perturbed)",
                 fontsize=10)
    ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
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
