"""Claim C7 (the paper's Fig 5) from the fine-tuning runs: GRPO's effect, the SFT control, validity, overlap.

The claim block (finetune_summary.json "claim", read by lib.pipeline.claims) is GRPO's when GRPO ran (details.arm = "grpo"):
    value       Hedges' g of the FINAL test accuracy (after the last GRPO step; not the area under the learning
                curve), synergistic vs random heads, one value per run: training seeds x random head sets
                (random sets pooled as one group)
    ci95, se    analytic: g +- 1.96 se, se^2 = (na + nb) / (na nb) + g^2 / (2 (na + nb)) (Hedges & Olkin 1985);
                a bootstrap over 2-3 runs per group is meaningless
    null        no difference between head sets, g = 0 (no band: the verdict needs CI low > 0)
    vs_redundant the same g, synergistic vs redundant
    sft_control SFT's final accuracy, synergistic - random, paired over test problems (each problem's correctness
                averaged over the seeds and random sets), in accuracy points with its 95% t CI, and an equivalence
                test (TOST, two one-sided t-tests) against +-SFT_MARGIN_POINTS: the paper reports NO difference for
                SFT. When SFT changed no test answer the equivalence is vacuous: "inconclusive"
    validity    invalid when every condition sits at the ceiling (mean final accuracy >= CEILING) or at the floor
                (<= FLOOR), or when synergistic and a compared condition (random, redundant) train nearly the same
                weights (weight Jaccard >= MAX_PARAM_JACCARD under the run's KV policy; lib.experiments.finetune.masks.overlap)
    overlap     per pair of conditions and KV policy: query heads, KV heads and weights shared (masks.overlap)
Without GRPO (methods [sft]) the value, CI and null are SFT's as before (g over seeds with >= 2 runs per group,
else the paired difference over problems with a bootstrap CI) and details.arm = "sft": the wrong arm for the claim.
"""
from __future__ import annotations

import numpy as np

from lib.experiments.finetune.masks import KV_POLICIES, overlap
from lib.experiments.finetune.stats import equivalence_verdict, hedges_g_ci, tost_paired

__all__ = ["MAX_PARAM_JACCARD", "PAPER_EFFECT", "PAPER_EFFECT_NOTE", "validity", "overlap_rows", "claim_jaccard",
           "g_block", "sft_control"]

CEILING, FLOOR = 0.95, 0.05           # mean final test accuracy of every condition at or beyond: no room to differ
MAX_PARAM_JACCARD = 0.8               # weight Jaccard at or above which two conditions train "the same" weights
SFT_MARGIN_POINTS = 10.0              # equivalence margin of the SFT control, accuracy points
PAPER_EFFECT = 1.4
PAPER_EFFECT_NOTE = "GRPO synergistic vs random Hedges' g ~1.4 (read off Fig 5; vs redundant ~5.0)"
CLAIM_PAIRS = ("random", "redundant")  # the conditions synergistic is compared with in the claim


def validity(final: dict[str, list[float]], param_jaccard: dict[str, float]) -> dict:
    """final: condition kind -> final test accuracies (fractions) of its runs; param_jaccard: compared condition
    -> weight Jaccard with synergistic. -> {"valid": bool, "reason": str} (rule in the module docstring)."""
    means = {k: float(np.mean(v)) for k, v in final.items() if len(v)}
    if not means:
        return {"valid": False, "reason": "no runs of the claim's method"}
    if all(m >= CEILING for m in means.values()):
        return {"valid": False, "reason": f"ceiling: every condition's mean final accuracy >= {CEILING:.0%} "
                                          f"({_fmt(means)}): nothing left to learn on this test set"}
    if all(m <= FLOOR for m in means.values()):
        return {"valid": False, "reason": f"floor: every condition's mean final accuracy <= {FLOOR:.0%} "
                                          f"({_fmt(means)}): the model cannot do the task"}
    same = {k: j for k, j in param_jaccard.items() if np.isfinite(j) and j >= MAX_PARAM_JACCARD}
    if same:
        return {"valid": False, "reason": f"synergistic and {', '.join(same)} train nearly the same weights (weight "
                                          f"Jaccard {', '.join(f'{j:.2f}' for j in same.values())} >= "
                                          f"{MAX_PARAM_JACCARD}): choose another KV policy"}
    worst = max((j for j in param_jaccard.values() if np.isfinite(j)), default=float("nan"))
    return {"valid": True, "reason": f"conditions off the ceiling and floor ({_fmt(means)}); largest weight Jaccard "
                                     f"with synergistic {worst:.2f} < {MAX_PARAM_JACCARD}"}


def _fmt(means: dict[str, float]) -> str:
    return ", ".join(f"{k} {100 * m:.0f}%" for k, m in means.items())


def overlap_rows(layout, conditions, policies=KV_POLICIES) -> list[dict]:
    """masks.overlap of synergistic with every other condition, per KV policy (rows: policy, a, b, counts,
    query / KV / weight Jaccard)."""
    syn = [c for c in conditions if c.kind == "synergistic"]
    rows = []
    for kv in policies:
        for a in syn:
            for b in (c for c in conditions if c.kind != "synergistic"):
                rows.append({"a": a.key, "b": b.key, **overlap(layout, list(a.heads), list(b.heads), kv)})
    return rows


def claim_jaccard(rows: list[dict], kv: str) -> dict[str, float]:
    """Weight Jaccard of synergistic with each CLAIM_PAIRS kind under kv (the largest over random sets)."""
    out = {}
    for kind in CLAIM_PAIRS:
        values = [r["param_jaccard"] for r in rows if r["kv"] == kv and r["b"].split(":")[0] == kind]
        if values:
            out[kind] = float(max(values))
    return out


def g_block(a, b) -> dict:
    """Hedges' g of a vs b with its analytic CI and se, rounded for the JSON."""
    r = hedges_g_ci(a, b)
    return {"value": r["g"], "ci95": r["ci95"], "se": r["se"], "n_a": r["n_a"], "n_b": r["n_b"]}


def sft_control(correct_syn, correct_random, before: dict[str, float], after: dict[str, float],
                changed: bool = True) -> dict:
    """SFT synergistic - random: correct_* [problems] final correctness averaged over runs; before / after: mean
    accuracy per kind; changed: whether training changed any test answer of any compared run (when none did, the
    equivalence is vacuous and the verdict is 'inconclusive'). Paired over problems, accuracy points, TOST at
    +-SFT_MARGIN_POINTS."""
    diff = 100 * (np.asarray(correct_syn, float) - np.asarray(correct_random, float))
    t = tost_paired(diff, SFT_MARGIN_POINTS)
    verdict = equivalence_verdict(t) if changed else "inconclusive (training changed no test answer)"
    return {"difference_points": t["mean"], "ci95_points": t["ci95"], "ci90_points": t["ci90"], "se_points": t["se"],
            "unit": "test problem (paired): final correctness averaged over seeds and random sets",
            "n_problems": t["n"], "tost": {"margin_points": SFT_MARGIN_POINTS, "p_lower": t["p_lower"],
                                           "p_upper": t["p_upper"], "p": t["p"], "test": "two one-sided one-sample "
                                           "t-tests on the per-problem differences"},
            "before": before, "after": after, "changed_answers": bool(changed), "verdict": verdict,
            "line": f"SFT: {verdict} (synergistic - random {t['mean']:+.1f} points, 95% CI [{t['ci95'][0]:.1f}, "
                    f"{t['ci95'][1]:.1f}], TOST p = {t['p']:.3f} at +-{SFT_MARGIN_POINTS:.0f} points)"}
