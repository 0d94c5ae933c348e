"""Claim C5 from the ablation curves (ablation_kl): removing synergistic heads first diverges behaviour faster
than random orders; every ordering variant, its reverse and the oracle ordering with their own verdicts."""
from __future__ import annotations

import numpy as np

from lib.pipeline.claims.rules import (C5_PERCENTILE, C5_RANGE, Claim, ORACLE_VARIANT, PAPER_EFFECTS, PRIMARY_VARIANT,
                                       judge, new_claim, not_tested, oracle_check, too_few)
from lib.pipeline.verdicts import Evidence, decide
from lib.storage import artifacts
from lib.storage.notebooks import NB

__all__ = ["claim_c5", "ORDERING_WORDS"]


# ----------------------------------------------------------------------------- C5: ablation

def claim_c5(out_dir, n_boot: int = 2000, seed: int = 0) -> Claim:
    from lib.experiments.ablation import AblationResult
    if not artifacts.path("ablation_kl", out_dir).exists():
        return not_tested("C5", f"no ablation_kl.npz ({NB.ABLATION} did not run)", ["ablation_kl"])
    result = AblationResult.load(out_dir)
    if not result.variants or not result.index("random"):
        return not_tested("C5", "the ablation has no ranking or no random orders (n_random = 0)", ["ablation_kl"])
    variant = PRIMARY_VARIANT if PRIMARY_VARIANT in result.variants else result.variants[0]
    upto = min(C5_RANGE, float(result.fractions[-1]))
    part = result.auc_table(n_boot=n_boot, seed=seed, max_fraction=upto)
    full = result.auc_table(n_boot=n_boot, seed=seed) if result.fractions[-1] >= 1 - 1e-9 else None
    rows = {f"{r.ordering}:{r.variant}": r for r in part.itertuples()}
    row = rows[f"ranking:{variant}"]
    c = new_claim("C5")
    c.statistic = (f"AUC('{variant}' ranking) / mean AUC(random orders) of KL vs fraction removed, 0-{upto:.0%} "
                   f"of heads; CI resamples prompts and random orders")
    c.value, c.ci95, c.n = row.auc_ratio, [row.ci_low, row.ci_high], int(result.kl.shape[2])
    c.null = {"name": f"{int(row.n_random)} random removal orders (ratio 1); band = 2.5-97.5% of single random "
                      f"orders' ratios",
              "value": 1.0, "ci95": _random_ratio_band(result, upto)}
    c.source = ["ablation_kl"]
    points = int(np.sum((np.asarray(result.fractions) > 0) & (np.asarray(result.fractions) <= upto + 1e-9)))
    sizes = {"prompts": int(result.kl.shape[2]), "random_orders": int(row.n_random), "points_in_range": points,
             "layer_matched_orders": int(row.n_matched)}
    band = tuple(c.null["ci95"])
    orderings = {key: _ordering_summary(r, band) for key, r in rows.items()}
    c.details = {"variant": variant, "percentile_among_random": row.percentile, "n_random": int(row.n_random),
                 "layer_matched": {"n": int(row.n_matched), "ratio": row.matched_ratio,
                                   "ci95": [row.matched_ci_low, row.matched_ci_high],
                                   "percentile": row.matched_percentile},
                 "range": f"0-{upto:.0%}", "n_prompts": int(result.kl.shape[2]), "orderings": orderings,
                 "per_variant": _per_variant(part, full), "also": _c5_also(orderings, f"ranking:{variant}")}
    if result.fractions[-1] >= 0.3:
        r30 = result.fraction_table(fractions=[0.3])
        r30 = r30[r30.variant == variant].iloc[0]
        c.details["kl_at_30pct"] = {"ranking": r30.ranking_kl, "random_mean": r30.random_mean, "ratio": r30.ratio}
    c.reason = too_few(sizes)
    if c.reason:
        c.verdict = "underpowered"
        return c
    judge(c, _c5_evidence(row, band), sizes, {f"{NB.ABLATION}.n_prompts": sizes["prompts"],
                                        f"{NB.ABLATION}.n_random": sizes["random_orders"]})
    return oracle_check(c, orderings.get(f"ranking:{ORACLE_VARIANT}"))


def _c5_evidence(row, band: tuple) -> Evidence:
    """The ranking's ratio CI against the band of single random orders (a ranking is one order: one more random
    order lands anywhere in that band)."""
    matched_ok = not row.n_matched or not np.isfinite(row.matched_ci_low) or row.matched_ci_low > 1
    pct_ok = row.percentile >= C5_PERCENTILE
    note = "; ".join(x for x in ("" if pct_ok else f"percentile {row.percentile:.0f} among random orders < "
                                                   f"{C5_PERCENTILE:.0f}",
                                 "" if matched_ok else "explained by the layers: layer-matched ratio CI reaches 1")
                     if x)
    se = getattr(row, "se", None)
    return Evidence(row.auc_ratio, (row.ci_low, row.ci_high), 1.0, band, "greater", PAPER_EFFECTS["C5"][0],
                    se=None if se is None or not np.isfinite(se) else float(se), extra_ok=pct_ok and matched_ok,
                    extra_note=note)


def _ordering_summary(r, band: tuple) -> dict:
    """One ordering's ratio, CI, percentile and direction ("faster" / "slower" / "like random")."""
    way = "faster than random" if r.ci_low > 1 else "slower than random" if r.ci_high < 1 else "like random"
    out = {"auc_ratio": r.auc_ratio, "ci95": [r.ci_low, r.ci_high], "percentile": r.percentile, "direction": way,
           "matched_ratio": r.matched_ratio, "matched_ci95": [r.matched_ci_low, r.matched_ci_high]}
    if r.ordering == "ranking":
        out["verdict"] = decide(_c5_evidence(r, band))[0]
    return out


ORDERING_WORDS = {"ranking": "removing the heads its ranking puts first (most synergistic) first",
                  "reverse": "removing the heads its ranking puts last (most redundant) first"}


def _c5_also(orderings: dict, primary: str) -> list[str]:
    """Sentences for the orderings other than the primary one that leave the random band."""
    out = []
    for key, o in orderings.items():
        kind, variant = key.split(":", 1)
        if key != primary and o["direction"] != "like random":
            lo, hi = o["ci95"]
            out.append(f"{variant}: {ORDERING_WORDS[kind]} diverges {o['auc_ratio']:.2f}x random [{lo:.2f}, "
                       f"{hi:.2f}] ({o['direction']}; percentile {o['percentile']:.0f})")
    return out


def _random_ratio_band(result, upto) -> list:
    auc = result.prompt_auc(upto)[result.index("random")].mean(-1)
    ratio = auc / auc.mean()
    return [float(np.quantile(ratio, 0.025)), float(np.quantile(ratio, 0.975))]


def _per_variant(part, full) -> dict:
    out = {}
    for tbl, key in ((part, "range"), (full, "full")):
        if tbl is None:
            continue
        for r in tbl.itertuples():
            out.setdefault(f"{r.ordering}:{r.variant}", {})[key] = {
                "auc_ratio": r.auc_ratio, "ci95": [r.ci_low, r.ci_high], "percentile": r.percentile,
                "matched_ratio": r.matched_ratio, "matched_ci95": [r.matched_ci_low, r.matched_ci_high]}
    return out
