"""Statistics of the behaviour experiment: accuracies per condition with bootstrap CIs, the relative drop of
synergistic against random sets, floor and ceiling checks, the summary notebook 09 writes."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from lib.storage import artifacts
from lib.experiments.behaviour.plan import (BehaviourPlan, Calibration, PAPER, PAPER_EFFECT, PAPER_EFFECT_NOTE,
                                            TARGET_RELATIVE_ACCURACY)
from lib.storage.notebooks import NB

__all__ = ["clopper_pearson", "mcnemar", "percentile_among", "paired_difference_ci", "relative_difference",
           "relative_accuracy", "floor_margin", "floor_ceiling"]


# ----------------------------------------------------------------------------- statistics

def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact binomial CI of k successes out of n."""
    from scipy.stats import beta
    if n == 0:
        return (math.nan, math.nan)
    lo = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def mcnemar(a: np.ndarray, b: np.ndarray) -> float:
    """Exact (binomial) McNemar p-value, two-sided, of paired correctness vectors a, b (same problems)."""
    from scipy.stats import binomtest
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    return 1.0 if only_a + only_b == 0 else float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def percentile_among(value: float, others: np.ndarray) -> float:
    """Percent of `others` below `value` (ties count half): 0 = worse than every random set."""
    return float(100 * (np.sum(others < value) + 0.5 * np.sum(others == value)) / len(others))


def _boot_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n] problem indices drawn with replacement (the same draw for every paired statistic)."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _quantiles(idx: np.ndarray, stat) -> tuple[float, float]:
    values = stat(idx)
    return float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))


def paired_difference_ci(cond: np.ndarray, random: np.ndarray, n_boot: int = 2000, seed: int = 0) -> list[float]:
    """95% bootstrap CI (problems resampled, paired) of accuracy(cond) - mean accuracy of the random sets.
    cond [problems] bool, random [sets, problems] bool."""
    idx = _boot_indices(len(cond), n_boot, seed)
    return list(_quantiles(idx, lambda i: cond[i].mean(-1) - random[:, i].mean(-1).mean(0)))


def relative_difference(cond: np.ndarray, random: np.ndarray, base: np.ndarray, n_boot: int = 2000,
                        seed: int = 0) -> dict:
    """(accuracy(cond) - mean accuracy(random sets)) / accuracy(baseline) with its paired bootstrap: the problems
    of each replicate are drawn once (paired_difference_ci's draw) for cond, every random set and the baseline,
    and the replicate's difference is divided by the replicate's baseline accuracy (replicates with baseline 0
    dropped). cond [problems] bool, random [sets, problems] bool, base [problems] bool ->
    {value, ci95, se (sd of the replicates), n_boot (replicates kept)}; NaN when the baseline has no correct answer."""
    idx = _boot_indices(len(cond), n_boot, seed)
    diff, b = cond[idx].mean(-1) - random[:, idx].mean(-1).mean(0), base[idx].mean(-1)
    rel = diff[b > 0] / b[b > 0]
    value = (cond.mean() - random.mean(-1).mean()) / base.mean() if base.any() else math.nan
    ci = [float(np.quantile(rel, 0.025)), float(np.quantile(rel, 0.975))] if len(rel) else [math.nan, math.nan]
    return {"value": float(value), "ci95": ci, "se": float(rel.std(ddof=1)) if len(rel) > 1 else math.nan,
            "n_boot": int(len(rel))}


def relative_accuracy(random: np.ndarray, base: np.ndarray, n_boot: int = 2000,
                      seed: int = 0) -> tuple[float, float, float]:
    """Mean accuracy of the random sets / baseline accuracy, with the paired bootstrap CI of relative_difference
    (random [sets, problems] bool, base [problems] bool) -> (value, ci low, ci high); NaN without baseline."""
    zero = np.zeros(random.shape[1], dtype=bool)
    r = relative_difference(zero, random, base, n_boot, seed)         # (0 - mean random) / baseline
    return 0.0 - r["value"], 0.0 - r["ci95"][1], 0.0 - r["ci95"][0]          # 0.0 - x: no "-0.0"


def floor_margin(n: int) -> float:
    """Problems within which of 0 (floor) or of the baseline (ceiling) a head set counts as stuck: max(2, 5 % of n)."""
    return max(2.0, 0.05 * n)


def floor_ceiling(baseline_correct: int, random_correct, n: int) -> dict:
    """Validity of a synergistic-vs-random comparison: invalid when the random sets' mean number of correct problems
    lies within margin = max(2, 5 % of n) problems of 0 (floor) or of the baseline's number correct (ceiling).
    random_correct [sets] -> {valid, reason, margin, random_mean_correct, baseline_correct, n}."""
    mean, margin = float(np.mean(random_correct)), floor_margin(n)
    where = f"random sets at {mean:.1f}/{n} problems, baseline {baseline_correct}/{n}"
    floor, ceiling = mean <= margin, mean >= baseline_correct - margin
    problems = [f"floor (within {margin:g} problems of 0)"] * floor + \
               [f"ceiling (within {margin:g} problems of the baseline)"] * ceiling
    reason = (" and ".join(problems) + ": " + where) if problems else \
        f"{where}: more than {margin:g} problems from 0 and from the baseline"
    return {"valid": not problems, "reason": reason, "margin": margin, "random_mean_correct": mean,
            "baseline_correct": int(baseline_correct), "n": int(n)}


@dataclass
class BehaviourResult:
    plan: BehaviourPlan
    rows: list[dict]                 # one per (condition, problem), the generations
    correct: np.ndarray              # bool [conditions, problems]
    scale: float                     # weight standard deviation (unit of sigma)
    seconds: float = 0.0
    units_computed: int = 0
    checkpoint: Path | None = None
    table: pd.DataFrame = field(default_factory=pd.DataFrame)

    @classmethod
    def from_rows(cls, plan, rows, scale, seconds=0.0, computed=0, checkpoint=None) -> "BehaviourResult":
        ci = {c.key: i for i, c in enumerate(plan.conditions)}
        pi = {p.id: j for j, p in enumerate(plan.problems)}
        correct = np.zeros((len(plan.conditions), len(plan.problems)), dtype=bool)
        for r in rows:
            correct[ci[r["condition"]], pi[r["problem"]]] = r["correct"]
        order = sorted(rows, key=lambda r: (ci[r["condition"]], pi[r["problem"]]))
        result = cls(plan, order, correct, scale, seconds, computed, checkpoint)
        result.table = result.make_table()
        return result

    def index(self, kind: str, perturbation: str | None = None, sigma: float | None = None,
              variant: str | None = None) -> list[int]:
        return [i for i, c in enumerate(self.plan.conditions) if c.kind == kind
                and (perturbation is None or c.perturbation == perturbation)
                and (sigma is None or c.sigma == sigma) and (variant is None or c.variant == variant)]

    def settings(self) -> list[tuple[str, float]]:
        """(perturbation, sigma) of every perturbed block, in plan order."""
        return list(dict.fromkeys((c.perturbation, c.sigma) for c in self.plan.conditions if c.kind != "baseline"))

    def make_table(self) -> pd.DataFrame:
        """behaviour.csv: per condition accuracy with Clopper-Pearson CI, McNemar p vs each random set of the same
        perturbation (median over sets) and the percentile among the random sets' accuracies."""
        n = len(self.plan.problems)
        rows = []
        for i, c in enumerate(self.plan.conditions):
            k = int(self.correct[i].sum())
            lo, hi = clopper_pearson(k, n)
            rnd = self.index("random", c.perturbation, c.sigma) if c.kind != "baseline" else []
            p_each = [mcnemar(self.correct[i], self.correct[j]) for j in rnd if j != i]
            rows.append({"condition": c.key, "kind": c.kind, "variant": c.variant, "seed": c.seed,
                         "perturbation": c.perturbation, "sigma": c.sigma, "n_heads": len(c.heads),
                         "n_problems": n, "n_correct": k, "accuracy": k / n, "ci_low": lo, "ci_high": hi,
                         "mcnemar_p": float(np.median(p_each)) if p_each and c.kind != "random" else np.nan,
                         "percentile_among_random": percentile_among(k / n, self.correct[rnd].mean(-1))
                         if rnd and c.kind != "random" else np.nan})
        return pd.DataFrame(rows)

    def variant_tests(self, perturbation: str, sigma: float, variant: str) -> dict:
        """Synergistic vs random of one block: accuracies with CIs, difference with its paired CI, McNemar, percentile."""
        t = self.table.set_index("condition")
        rnd = self.index("random", perturbation, sigma)
        syn = self.index("synergistic", perturbation, sigma, variant)[0]
        acc = lambda i: {"accuracy": float(t.iloc[i]["accuracy"]),       # noqa: E731
                         "ci95": [float(t.iloc[i]["ci_low"]), float(t.iloc[i]["ci_high"])]}
        rnd_acc = self.correct[rnd].mean(-1)
        return {"synergistic": acc(syn), "redundant": acc(self.index("redundant", perturbation, sigma, variant)[0]),
                "layer_matched": acc(self.index("layer_matched", perturbation, sigma, variant)[0]),
                "random_mean": float(rnd_acc.mean()), "random_sd": float(rnd_acc.std(ddof=1)) if len(rnd) > 1 else None,
                "syn_minus_random": float(self.correct[syn].mean() - rnd_acc.mean()),
                "syn_minus_random_ci95": paired_difference_ci(self.correct[syn], self.correct[rnd], seed=self.plan.seed),
                "mcnemar_p_median": float(t.iloc[syn]["mcnemar_p"]),
                "mcnemar_p_each": [mcnemar(self.correct[syn], self.correct[j]) for j in rnd],
                "percentile_among_random": float(t.iloc[syn]["percentile_among_random"]),
                "relative": {kind: self.relative(perturbation, sigma, kind, variant)
                             for kind in ("synergistic", "redundant", "layer_matched")}}

    def relative(self, perturbation: str, sigma: float, kind: str, variant: str) -> dict:
        """relative_difference of one head set (kind, variant) against the random sets of the same setting."""
        cond = self.correct[self.index(kind, perturbation, sigma, variant)[0]]
        return relative_difference(cond, self.correct[self.index("random", perturbation, sigma)],
                                   self.correct[self.index("baseline")[0]], seed=self.plan.seed)

    def floor_margin(self) -> float:
        """floor_margin of this run's number of problems."""
        return floor_margin(len(self.plan.problems))

    def validity(self, perturbation: str, sigma: float) -> dict:
        """floor_ceiling of one setting's random sets against the baseline."""
        counts = self.correct[self.index("random", perturbation, sigma)].sum(-1)
        return floor_ceiling(int(self.correct[self.index("baseline")[0]].sum()), counts, len(self.plan.problems))

    def relative_random(self, perturbation: str, sigma: float) -> float:
        """Mean accuracy of the setting's random sets / baseline accuracy (the dose actually reached)."""
        base = self.correct[self.index("baseline")[0]].mean()
        rnd = self.correct[self.index("random", perturbation, sigma)].mean()
        return float(rnd / base) if base > 0 else math.nan

    def calibration_block(self, perturbation: str, sigma: float) -> dict:
        cal = self.plan.calibrated or Calibration.off()
        return {"calibrated": cal.settings is not None, "sigma": sigma if perturbation == "noise" else None,
                "relative_accuracy_random": self.relative_random(perturbation, sigma),
                "target": cal.settings.target if cal.settings else TARGET_RELATIVE_ACCURACY,
                "relative_accuracy_random_sweep": cal.relative_at_sigma,
                "sigmas": list(cal.settings.sigmas) if cal.settings else [], "note": cal.note}

    def sample_sizes(self) -> dict:
        cal = self.plan.calibration
        return {"problems": len(self.plan.problems), "random_sets": self.plan.n_random, "heads_per_set": self.plan.k,
                "heads_total": self.plan.n_heads_total, "variants": len(self.plan.variants),
                "calibration_problems": cal.n_problems if cal else 0,
                "calibration_random_sets": cal.n_sets if cal else 0,
                "calibration_sigmas": len(cal.sigmas) if cal else 0}

    def claim(self) -> dict:
        """The C6 block: first variant, first perturbation setting (see CLAIM_INPUTS / lib.pipeline.claims). value: the
        relative accuracy difference (relative_difference); the absolute difference is in details["absolute"]."""
        perturbation, sigma = self.settings()[0]
        variant = self.plan.variants[0]
        tests = self.variant_tests(perturbation, sigma, variant)
        rel = tests["relative"]["synergistic"]
        rnd_acc = self.correct[self.index("random", perturbation, sigma)].mean(-1)
        base = self.table.iloc[self.index("baseline")[0]]
        spread = (rnd_acc - rnd_acc.mean()) / base["accuracy"] if base["accuracy"] > 0 else \
            np.full(len(rnd_acc), np.nan)
        unit = f", sigma {sigma:g} weight sd" if perturbation == "noise" else ""
        return {"id": "C6",
                "statistic": f"(accuracy(top {self.plan.fraction:.0%} synergistic heads perturbed) - mean accuracy("
                             f"random sets)) / accuracy(baseline), {perturbation}{unit}, variant {variant} (relative "
                             f"accuracy difference; paired bootstrap CI over problems, each replicate divided by its "
                             f"own baseline accuracy)",
                "value": rel["value"], "ci95": rel["ci95"], "se": rel["se"],
                "null": {"name": f"spread of {len(rnd_acc)} random head sets ((accuracy - their mean) / baseline "
                                 f"accuracy)", "value": 0.0,
                         "ci95": [float(np.quantile(spread, 0.025)), float(np.quantile(spread, 0.975))]},
                "direction": "less", "paper": PAPER, "paper_effect": PAPER_EFFECT,
                "paper_effect_note": PAPER_EFFECT_NOTE, "n": len(self.plan.problems),
                "validity": {k: v for k, v in self.validity(perturbation, sigma).items() if k in ("valid", "reason")},
                "sample_sizes": self.sample_sizes(),
                "by_variant": {v: {k: {"value": r["value"], "ci95": r["ci95"], "se": r["se"]}
                                   for k, r in self.variant_tests(perturbation, sigma, v)["relative"].items()}
                               for v in self.plan.variants},
                "calibration": self.calibration_block(perturbation, sigma),
                "details": {"perturbation": perturbation, "sigma": sigma, "variant": variant,
                            "baseline": {"accuracy": float(base["accuracy"]),
                                         "ci95": [float(base["ci_low"]), float(base["ci_high"])]},
                            "absolute": {"value": tests["syn_minus_random"], "ci95": tests["syn_minus_random_ci95"],
                                         "null_ci95": [float(np.quantile(rnd_acc - rnd_acc.mean(), q))
                                                       for q in (0.025, 0.975)],
                                         "paper": -0.16, "unit": "accuracy points, 0-1 scale"},
                            "validity": self.validity(perturbation, sigma),
                            "validity_per_setting": {f"{p}/{s:g}": self.validity(p, s) for p, s in self.settings()},
                            "per_variant": {v: self.variant_tests(perturbation, sigma, v) for v in self.plan.variants},
                            "per_setting": {f"{p}/{s:g}": {v: self.variant_tests(p, s, v) for v in self.plan.variants}
                                            for p, s in self.settings()}}}

    def summary(self) -> dict:
        p = self.plan
        claim = self.claim()
        return {"claim": claim, "model": p.model, "task": p.task, "n_problems": len(p.problems),
                "variants": p.variants, "fraction": p.fraction, "k_heads": p.k, "n_random": p.n_random,
                "perturbations": p.perturbations, "sigmas": p.sigmas, "weight_sd": self.scale,
                "max_new_tokens": p.max_new_tokens, "chat_template": p.chat_template,
                "answer_prefix": p.answer_prefix, "seed": p.seed, "calibration": claim["calibration"]
                | {"seconds": (p.calibrated.seconds if p.calibrated else 0.0)}, "validity": claim["validity"],
                "seconds": self.seconds}

    def sigma_curve(self) -> pd.DataFrame:
        """Accuracy vs sigma per kind (random: mean and sd over sets) for the noise conditions, plus sigma 0 =
        baseline."""
        t = self.table[self.table.perturbation == "noise"]
        g = t.groupby(["sigma", "kind", "variant"], sort=True)["accuracy"]
        out = g.agg(accuracy="mean", sd="std", n_sets="count").reset_index()
        return out

    def examples(self, n: int = 2) -> pd.DataFrame:
        """The first n generations of each non-random condition and of the first random set."""
        keep = {c.key for c in self.plan.conditions if c.kind != "random"}
        first_random = [c.key for c in self.plan.conditions if c.kind == "random"][:1]
        rows = [r for r in self.rows if r["condition"] in keep | set(first_random)]
        frame = pd.DataFrame(rows)
        return frame.groupby("condition", sort=False).head(n)[["condition", "question", "gold", "text", "extracted",
                                                               "correct"]]

    def save(self, out_dir=None) -> list[Path]:
        """behaviour.csv, behaviour_calibration.csv (header only when calibrate is false),
        behaviour_generations.jsonl, behaviour_summary.json (atomic, lib.storage.artifacts) and the manifest entry of 09."""
        from lib.storage.store import update_manifest
        out_dir = Path(out_dir or self.plan.out_dir)
        summary = self.summary()
        paths = [artifacts.save("behaviour", out_dir, self.table),
                 artifacts.save("behaviour_calibration", out_dir, (self.plan.calibrated or Calibration.off()).table),
                 artifacts.save("behaviour_generations", out_dir, self.rows),
                 artifacts.save("behaviour_summary", out_dir, summary)]
        update_manifest(out_dir, NB.BEHAVIOUR, {k: v for k, v in summary.items() if k != "claim"}
                        | {"files": [p.name for p in paths], "c6_value": summary["claim"]["value"]})
        return paths
