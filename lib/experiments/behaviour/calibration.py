"""Dose calibration: the noise sigma at which random head sets lower task accuracy by the target
amount, found on calibration seeds before the main run."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd

from lib.model.architectures import ArchInfo
from lib.experiments.behaviour.plan import (CALIBRATION_COLUMNS, CALIBRATION_SEED_OFFSET, BehaviourPlan, Calibration,
                                            CalibrationSettings, Condition, make_conditions)
from lib.experiments.behaviour.running import run_behaviour
from lib.experiments.behaviour.statistics import _boot_indices, _quantiles, clopper_pearson, relative_accuracy

__all__ = ["pick_sigma", "calibration_plan", "calibrate"]


# ----------------------------------------------------------------------------- dose calibration



def pick_sigma(sigmas, relative, target: float) -> tuple[float, float, str]:
    """The sigma at which the random sets' relative accuracy (mean accuracy / baseline accuracy) first falls below
    `target`: linear interpolation in log sigma between the last grid point at or above the target and the first one
    below it, rounded to 3 significant digits. sigmas [grid] ascending > 0, relative [grid] ->
    (sigma, relative accuracy there (interpolated: the target), how it was chosen). Off the grid's range: the
    smallest sigma (already below the target) or the largest (never below), said in the note."""
    s, r = np.asarray(sigmas, dtype=float), np.asarray(relative, dtype=float)
    if not np.isfinite(r).all():
        return float(s[0]), math.nan, (f"baseline accuracy 0 on the calibration problems: relative accuracy is "
                                       f"undefined; smallest sigma {s[0]:g} used (use an easier task or more problems)")
    below = np.nonzero(r < target)[0]
    if len(below) == 0:
        return float(s[-1]), float(r[-1]), (f"random sets keep {r[-1]:.2f} of the baseline even at the largest sigma "
                                            f"{s[-1]:g} (target {target:g}): largest sigma used; extend "
                                            f"calibration_sigmas upwards")
    i = int(below[0])
    if i == 0:
        return float(s[0]), float(r[0]), (f"random sets keep only {r[0]:.2f} of the baseline at the smallest sigma "
                                          f"{s[0]:g} (target {target:g}): smallest sigma used; extend "
                                          f"calibration_sigmas downwards")
    t = (r[i - 1] - target) / (r[i - 1] - r[i])
    sigma = float(f"{math.exp(math.log(s[i - 1]) + t * (math.log(s[i]) - math.log(s[i - 1]))):.3g}")
    return sigma, float(target), (f"interpolated in log sigma between {s[i - 1]:g} (random sets keep {r[i - 1]:.2f} "
                                  f"of the baseline) and {s[i]:g} ({r[i]:.2f}) to the target {target:g}")


def calibration_head_sets(plan: BehaviourPlan) -> list[tuple[int, tuple[int, ...]]]:
    """(seed, heads) of the calibration's random sets: the first k heads of default_rng(seed + 1000 + i)'s
    permutation of the heads (as lib.experiments.ablation's random orders), so they are not the main random sets."""
    seeds = [plan.seed + CALIBRATION_SEED_OFFSET + i for i in range(plan.calibration.n_sets)]
    return [(s, tuple(sorted(int(h) for h in np.random.default_rng(s).permutation(plan.n_heads_total)[:plan.k])))
            for s in seeds]


def calibration_plan(plan: BehaviourPlan) -> BehaviourPlan:
    """The sweep as a plan of its own: baseline + every calibration set at every calibration sigma, on the first
    calibration.n_problems problems (its own checkpoint, resumable like the main run)."""
    cal = plan.calibration
    conds = [Condition("baseline", "", -1, (), "none")] + [
        Condition("random", "", seed, heads, "noise", sigma) for sigma in cal.sigmas
        for seed, heads in calibration_head_sets(plan)]
    return replace(plan, problems=plan.problems[:cal.n_problems], conditions=conds, perturbations=["noise"],
                   sigmas=list(cal.sigmas), n_random=cal.n_sets, calibration=None, calibrated=None)


def calibration_from_result(settings: CalibrationSettings, result: "BehaviourResult") -> Calibration:
    """Pick the sigma from the sweep's generations (result of calibration_plan)."""
    base, sigmas = result.correct[0], list(settings.sigmas)
    # [sigmas, sets, problems]
    rnd = np.stack([result.correct[result.index("random", "noise", s)] for s in sigmas])
    seeds = [c.seed for c in result.plan.conditions if c.kind == "random" and c.sigma == sigmas[0]]
    relative = [relative_accuracy(r, base, seed=result.plan.seed)[0] for r in rnd]
    sigma, at, note = pick_sigma(sigmas, relative, settings.target)
    table = calibration_table(base, rnd, sigmas, seeds, settings.target, sigma, result.plan.seed)
    return Calibration(settings, sigma, at, note, table, result.seconds)


def calibrate(model, tokenizer, arch: ArchInfo, plan: BehaviourPlan, progress: bool = True) -> Calibration:
    """Run the dose sweep of a plan prepared with calibrate=True and pick the sigma (Calibration.off() otherwise)."""
    if plan.calibration is None:
        return Calibration.off()
    return calibration_from_result(plan.calibration, run_behaviour(model, tokenizer, arch, calibration_plan(plan),
                                                                   progress))


def calibration_table(base: np.ndarray, rnd: np.ndarray, sigmas: list[float], seeds: list[int], target: float,
                      chosen: float, seed: int = 0) -> pd.DataFrame:
    """behaviour_calibration.csv. base [problems] bool, rnd [sigmas, sets, problems] bool. Rows: the baseline
    (sigma 0), every random set at every sigma (Clopper-Pearson CI), and per sigma the sets' mean ("random_mean":
    accuracy and relative accuracy with paired bootstrap CIs over problems)."""
    n = len(base)
    rows = [_cal_row("baseline", -1, 0.0, base[None], base, seed)]
    for sigma, block in zip(sigmas, rnd):
        rows += [_cal_row("random", s, sigma, block[j:j + 1], base, seed) for j, s in enumerate(seeds)]
        rows.append(_cal_row("random_mean", -1, sigma, block, base, seed))
    frame = pd.DataFrame(rows)
    frame.insert(3, "n_problems", n)
    return frame.assign(target=target, chosen_sigma=chosen)[CALIBRATION_COLUMNS]


def _cal_row(kind: str, seed: int, sigma: float, sets: np.ndarray, base: np.ndarray, boot_seed: int) -> dict:
    """One calibration row: sets [sets, problems] bool (one set: Clopper-Pearson CI; several: bootstrap CI of the
    mean over sets)."""
    acc = float(sets.mean())
    lo, hi = clopper_pearson(int(sets[0].sum()), sets.shape[1]) if len(sets) == 1 else \
        _quantiles(_boot_indices(sets.shape[1], 2000, boot_seed), lambda idx: sets[:, idx].mean(-1).mean(0))
    rel, rel_lo, rel_hi = relative_accuracy(sets, base, seed=boot_seed)
    return {"kind": kind, "seed": seed, "sigma": float(sigma), "n_correct": float(sets.sum(-1).mean()),
            "accuracy": acc, "ci_low": lo, "ci_high": hi, "relative_accuracy": rel, "relative_ci_low": rel_lo,
            "relative_ci_high": rel_hi}
