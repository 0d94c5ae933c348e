"""Claims C1-C3 from the heads' activations and per-prompt PhiID: synergy vs redundancy (C1), the
inverted-U profile over depth (C2) and its emergence with training (C3), each against circular-shift (or
trend-keeping) surrogates, with bootstrap CIs over heads."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from lib.pipeline.claims.rules import (Claim, MIN_STEPS, PAPER_EFFECTS, PRIMARY_VARIANT, evidence_c1,
                                       evidence_profile, judge, new_claim, not_tested, too_few)
from lib.pipeline.verdicts import Evidence, decide
from lib.storage import artifacts
from lib.storage.notebooks import NB

__all__ = ["bootstrap_spearman", "HeadEvidence", "head_evidence", "series_correlation", "profile_verdicts",
           "c1_against_null", "claim_c1", "claim_c2", "claim_c3", "near_duplicates", "NULL_KINDS", "NULL_TEXT",
           "add_trend_null"]


# ----------------------------------------------------------------------------- C1-C3: head-level evidence

def bootstrap_spearman(a, b, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of Spearman r(a, b), resampling items (heads) with replacement."""
    from lib.experiments.diagnostics import bootstrap_correlation
    return tuple(bootstrap_correlation(a, b, n_boot, seed, level)["spearman_ci"])


@dataclass
class HeadEvidence:
    """Per-head synergy / redundancy of one tag (optionally truncated at the end of turn), with surrogates."""
    tag: str
    syn: np.ndarray                   # [heads] mean sts (nats)
    red: np.ndarray                   # [heads] mean rtr (nats)
    score: np.ndarray                 # [heads] rank_diff score in [0, 1]
    null_r: np.ndarray                # [surrogates] Spearman r(syn, red) of each surrogate
    null_score: np.ndarray            # [surrogates, heads] rank_diff scores of the surrogates
    head_layer: np.ndarray
    n_layers: int
    n_prompts: int
    steps: str                        # "100" or "10-100 (median 52)"
    series_r: np.ndarray | None = None  # [heads, heads] median over prompts of Pearson r between head series

    @property
    def r(self) -> float:
        return float(stats.spearmanr(self.syn, self.red)[0])

    def null_band(self) -> tuple[float, float]:
        return float(np.quantile(self.null_r, 0.025)), float(np.quantile(self.null_r, 0.975))


def _rank_diff(X, lengths, head_layer, n_layers, labels):
    """rank_diff VariantScore of series X [prompts, heads, steps], prompt p using its first lengths[p] steps
    (per-prompt MMI PhiID, the engine's fast option: sts, rtr and TDMI means over prompts)."""
    from lib.experiments import ranking as rk
    from lib.estimators.phiid import phiid_fast_stats
    full = lengths is None or np.all(lengths == X.shape[2])
    s = phiid_fast_stats(X, mode="per_prompt", lengths=None if full else [int(n) for n in lengths])
    pairs = rk.PairStats(sts=s.sts, rtr=s.rtr, tdmi=s.tdmi, valid=s.valid, n_heads=s.n_heads)
    return rk.variant_score(PRIMARY_VARIANT, pairs, head_layer, n_layers, labels=labels)


NULL_KINDS = ("circular", "trend")


def head_evidence(out_dir, tag: str = "", truncate_at_eos: bool = False, n_surrogates: int = 20,
                  seed: int = 0, null_kind: str = "circular") -> HeadEvidence:
    """Synergy, redundancy and rank_diff of every head from the per-prompt PhiID of the activations (the same
    numbers as phiid_per_prompt.npz, which 04 checks), plus circular-shift surrogates of both. With
    truncate_at_eos only the steps up to each prompt's first end-of-turn token are used (prompts with fewer
    than MIN_STEPS such steps are left out)."""
    from lib.experiments import diagnostics as dg
    artifacts.load("phiid", out_dir, tag=tag, mode="per_prompt", keys=["sts"])     # 02 must have run
    needed = ["activations", "tokens", "head_layer", "head_index", "n_layers", "model"]
    acts = artifacts.load("activations", out_dir, tag=tag, keys=needed + ["end_of_turn_ids"], require=needed)
    X = np.asarray(acts["activations"], np.float64)
    lengths = np.full(X.shape[0], X.shape[2])
    if truncate_at_eos:
        from lib.model.prompts import end_of_turn_lengths
        eot = acts["end_of_turn_ids"] if "end_of_turn_ids" in acts else _end_of_turn_ids(str(acts["model"]))
        lengths = end_of_turn_lengths(acts["tokens"], eot)
        keep = lengths >= MIN_STEPS
        X, lengths = X[keep], lengths[keep]
    head_layer, n_layers = np.asarray(acts["head_layer"]), int(acts["n_layers"])
    labels = dg.head_labels(head_layer, acts["head_index"])
    observed = _rank_diff(X, lengths, head_layer, n_layers, labels)
    null_r, null_score = [], []
    for k in range(n_surrogates):
        u = np.random.default_rng([seed, k]).random(X.shape[:2])
        shifted = _surrogate(X, lengths, u, null_kind)
        s = _rank_diff(shifted, lengths, head_layer, n_layers, labels)
        null_r.append(stats.spearmanr(s.syn, s.red)[0])
        null_score.append(s.score)
    steps = str(X.shape[2]) if np.all(lengths == X.shape[2]) else \
        f"{lengths.min()}-{lengths.max()} (median {int(np.median(lengths))})"
    return HeadEvidence(tag, observed.syn, observed.red, observed.score, np.array(null_r), np.array(null_score),
                        head_layer, n_layers, int(X.shape[0]), steps, series_correlation(X))


def series_correlation(X) -> np.ndarray:
    """[prompts, heads, steps] -> [heads, heads] median over prompts of the Pearson r between head series
    (a constant series counts as r = 0)."""
    Z = X - X.mean(-1, keepdims=True)
    sd = np.sqrt((Z ** 2).sum(-1, keepdims=True))
    Z = np.divide(Z, sd, out=np.zeros_like(Z), where=sd > 0)
    return np.median(np.einsum("pht,pgt->phg", Z, Z), axis=0)


def _surrogate(X, lengths, u, null_kind: str):
    """One surrogate of X [prompts, heads, steps]: every series shifted by offset floor(u x length); "trend" keeps
    each series' least-squares line (lib.experiments.diagnostics.shift_keeping_trend; full-length series only)."""
    from lib.experiments import diagnostics as dg
    if null_kind not in NULL_KINDS:
        raise ValueError(f"null_kind must be one of {NULL_KINDS}; got {null_kind!r}")
    full = np.all(lengths == X.shape[2])
    if null_kind == "trend" and not full:
        raise ValueError("the trend-keeping null needs full-length series (truncate_at_eos=False)")
    if not full:
        return _shift_within(X, lengths, u)
    offsets = np.floor(u * lengths[:, None]).astype(np.int64) % X.shape[2]
    return dg.shift_keeping_trend(X, offsets) if null_kind == "trend" else dg.shift_series(X, offsets)


def _shift_within(X, lengths, u):
    """Circular shift of every (prompt, head) series within its first lengths[p] steps."""
    out = X.copy()
    for p, L in enumerate(lengths):
        off = np.floor(u[p] * L).astype(np.int64)
        idx = (np.arange(L)[None, :] + off[:, None]) % L
        out[p, :, :L] = np.take_along_axis(X[p, :, :L], idx, axis=-1)
    return out


def _end_of_turn_ids(model_spec: str) -> list[int]:
    """From the model's tokenizer, for an activations file written before notebook 01 stored them."""
    from lib.model.loading import spec_tokenizer
    from lib.model.prompts import end_of_turn_ids
    return end_of_turn_ids(spec_tokenizer(model_spec))


def profile_verdicts(ev: HeadEvidence, n_boot: int = 1000, seed: int = 0) -> dict:
    """Inverted-U test of the rank_diff profile, raw and beyond the evidence's surrogates."""
    from lib.experiments.diagnostics import inverted_u_test
    raw = inverted_u_test(ev.score, ev.head_layer, ev.n_layers, n_boot, seed).as_row()
    beyond = inverted_u_test(ev.score - ev.null_score.mean(0), ev.head_layer, ev.n_layers, n_boot, seed).as_row()
    return {"raw": raw, "beyond_null": beyond}


def _c1_numbers(ev: HeadEvidence, n_boot: int, seed: int) -> dict:
    ci = bootstrap_spearman(ev.syn, ev.red, n_boot, seed)
    band = ev.null_band()
    verdict, why = decide(evidence_c1(ci, band, float(ev.null_r.mean())))
    return {"r": ev.r, "ci95": list(ci), "null_mean": float(ev.null_r.mean()), "null_ci95": list(band),
            "verdict": verdict, "why": why, "n_heads": len(ev.syn), "n_prompts": ev.n_prompts,
            "steps": ev.steps, "n_surrogates": len(ev.null_r)}


def c1_against_null(evidence: dict, n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """C1's numbers for each copy of the model (evidence: tag -> HeadEvidence; "" is the trained model), as the
    scorecard computes them -> one row per copy: r (Spearman, per-prompt PhiID) with its bootstrap 95% CI over heads,
    the circular-shift null's mean and 95% band, r minus the null mean, and where r's CI lies against the band."""
    rows = []
    for tag, ev in evidence.items():
        c = _c1_numbers(ev, n_boot, seed)
        (lo, hi), (n_lo, n_hi) = c["ci95"], c["null_ci95"]
        where = "below the band" if hi < n_lo else "above the band" if lo > n_hi else "overlaps the band"
        rows.append({"copy": tag or "trained", "r": c["r"], "ci_low": lo, "ci_high": hi, "null_mean": c["null_mean"],
                     "null_low": n_lo, "null_high": n_hi, "r_minus_null": c["r"] - c["null_mean"],
                     "r_vs_null": where, "heads": c["n_heads"], "surrogates": c["n_surrogates"]})
    return rows


def _sizes(ev: HeadEvidence) -> dict:
    return {"heads": len(ev.syn), "prompts": ev.n_prompts, "steps": ev.steps, "surrogates": len(ev.null_r)}


NULL_TEXT = ("circular-shift surrogates ({n}): every (prompt, head) series shifted by its own random offset (keeps "
             "each head's values and circular autocorrelation; breaks the timing between heads; a trend is cut "
             "at the shift point)")


def claim_c1(ev: HeadEvidence, random_init: HeadEvidence | None = None, eos: HeadEvidence | None = None,
             n_boot: int = 1000, seed: int = 0) -> Claim:
    c = new_claim("C1")
    main = _c1_numbers(ev, n_boot, seed)
    c.statistic = "Spearman r between per-head synergy (mean sts) and redundancy (mean rtr), per-prompt PhiID"
    c.value, c.ci95, c.n = main["r"], main["ci95"], main["n_heads"]
    c.null = {"name": NULL_TEXT.format(n=main["n_surrogates"]), "value": main["null_mean"], "ci95": main["null_ci95"]}
    c.source = ["activations", "phiid"]
    c.details = {"trained": main}
    if random_init is not None:
        c.details["random_init"] = _c1_numbers(random_init, n_boot, seed)
        c.details["random_init"]["near_duplicate_heads"] = near_duplicates(random_init.series_r)
    if eos is not None:
        c.details["before_end_of_turn"] = _c1_numbers(eos, n_boot, seed)
    c.reason = too_few(_sizes(ev))
    if c.reason:
        c.verdict = "underpowered"
        return c
    return judge(c, evidence_c1(main["ci95"], main["null_ci95"], main["null_mean"]), _sizes(ev))


def _profile_row(row: dict) -> dict:
    return {"value": row["mid_minus_early"], "lo": row["mid_minus_early_lo"], "hi": row["mid_minus_early_hi"],
            "mid_minus_late_lo": row.get("mid_minus_late_lo"), "verdict": row["verdict"]}


def claim_c2(ev: HeadEvidence, eos: HeadEvidence | None = None, n_boot: int = 1000, seed: int = 0) -> Claim:
    """C2 from the claims' own surrogates (the same set as C1 and C3): raw shape and beyond-null shape."""
    c = new_claim("C2")
    pv = profile_verdicts(ev, n_boot, seed)
    raw, beyond = _profile_row(pv["raw"]), _profile_row(pv["beyond_null"])
    c.statistic = (f"middle-third minus early-third mean of the '{PRIMARY_VARIANT}' layer profile beyond the null "
                   f"(score minus mean surrogate score); score units in [0, 1]")
    c.value, c.ci95, c.n = beyond["value"], [beyond["lo"], beyond["hi"]], len(ev.score)
    c.null = {"name": NULL_TEXT.format(n=len(ev.null_r)) + "; no depth difference = 0", "value": 0.0, "ci95": None}
    c.source = ["activations", "phiid"]
    c.details = {"variant": PRIMARY_VARIANT, "raw": {**raw, "shape": raw["verdict"]},
                 "beyond_null": {**beyond, "shape": beyond["verdict"]}, "n_surrogates": len(ev.null_r)}
    if eos is not None:
        pe = profile_verdicts(eos, n_boot, seed)
        c.details["before_end_of_turn"] = {"raw": pe["raw"]["verdict"], "beyond_null": pe["beyond_null"]["verdict"],
                                           "steps": eos.steps, "n_prompts": eos.n_prompts}
    ok = beyond["verdict"] == "inverted U"
    return judge(c, evidence_profile(beyond, PAPER_EFFECTS["C2"][0], ok, f"beyond the null the shape is "
                                     f"'{beyond['verdict']}', not an inverted U"), _sizes(ev))


def claim_c3(trained: HeadEvidence, random_init: HeadEvidence | None, checkpoints: dict, n_boot: int = 1000,
             seed: int = 0) -> Claim:
    if random_init is None:
        return not_tested("C3", f"no random-init copy in this run ({NB.EXTRACT} baseline_random_init "
                                f"and {NB.PHIID} on it)", ["activations", "phiid"])
    c = new_claim("C3")
    t, r = profile_verdicts(trained, n_boot, seed), profile_verdicts(random_init, n_boot, seed)
    tb, rb = _profile_row(t["beyond_null"]), _profile_row(r["beyond_null"])
    se = np.hypot(*[(x["hi"] - x["lo"]) / (2 * 1.959964) for x in (tb, rb)])
    diff = {"value": tb["value"] - rb["value"]}
    diff.update(lo=diff["value"] - 1.959964 * se, hi=diff["value"] + 1.959964 * se)
    c.statistic = ("beyond-null middle minus early third of the rank_diff profile, trained minus randomly "
                   "initialised copy (score units; the same statistic and surrogates as C2)")
    c.value, c.ci95 = diff["value"], [diff["lo"], diff["hi"]]
    c.null = {"name": "no difference between the trained model and its random-init copy", "value": 0.0,
              "ci95": None}
    c.n, c.source = len(trained.score), ["activations", "phiid"]
    c.details = {"trained": {k: v["verdict"] for k, v in t.items()}, "trained_beyond_null": tb,
                 "random_init": {k: v["verdict"] for k, v in r.items()}, "random_init_beyond_null": rb,
                 "n_surrogates": len(trained.null_r), "ci_note": "normal CI from the two bootstrap CIs' widths",
                 "random_init_near_duplicate_heads": near_duplicates(random_init.series_r),
                 "checkpoints": {tag: {k: v["verdict"] for k, v in profile_verdicts(ev, n_boot, seed).items()}
                                 for tag, ev in checkpoints.items()}}
    ok = tb["verdict"] == "inverted U" and rb["verdict"] != "inverted U"
    return judge(c, Evidence(diff["value"], (diff["lo"], diff["hi"]), 0.0, None, "greater", PAPER_EFFECTS["C3"][0],
                             se=float(se), extra_ok=ok, extra_note=f"trained '{tb['verdict']}', random-init "
                             f"'{rb['verdict']}' beyond the null"), _sizes(trained))


def near_duplicates(series_r: np.ndarray | None, threshold: float = 0.95) -> dict:
    """Heads whose norm series are near copies of another head's (median over prompts of the Pearson r of their
    series >= threshold): in an untrained GQA model, query heads sharing a KV head attend near-uniformly over the
    same values. Such pairs have near-zero synergy and maximal redundancy by construction, so they pull r(syn,
    red) and the profile toward what the copy structure dictates, not what training did."""
    if series_r is None:
        return {}
    H = series_r.shape[0]
    iu = np.triu_indices(H, 1)
    dup = series_r[iu] >= threshold
    heads = np.unique(np.concatenate([iu[0][dup], iu[1][dup]]))
    return {"threshold": threshold, "pairs": int(dup.sum()), "heads": int(len(heads)), "of_heads": H,
            "degenerate": bool(len(heads) > H / 2),
            "note": "more than half of the heads have a near copy: the random-init baseline is degenerate"
                    if len(heads) > H / 2 else "few near copies: the baseline is usable"}


def add_trend_null(c1: Claim, c2: Claim, trend: HeadEvidence, n_boot: int, seed: int) -> None:
    """C1 and C2 again with the null that keeps each series' linear trend: how the verdicts move."""
    c1.details["trend_kept_null"] = _c1_numbers(trend, n_boot, seed)
    c2.details["trend_kept_null"] = {"verdict": claim_c2(trend, None, n_boot, seed).verdict,
                                     "beyond_null": _profile_row(profile_verdicts(trend, n_boot, seed)["beyond_null"])}
