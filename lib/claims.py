"""The claims scorecard: what a run says about each claim of the paper, with its CI, its null and a verdict.

The paper: "A Brain-like Synergistic Core in LLMs Drives Behaviour and Learning" (arXiv 2601.06851).

    python -m lib.claims outputs/<run>          # (re)write outputs/<run>/claims.json from the run's artifacts
    write_claims(out_dir)                       # what the runner calls at the end of every run (recomputes only
                                                # when an input file, a setting or these rules changed)

One entry per claim (C1-C7), each with: the claim in one sentence, the test, the statistic with its 95% CI, the
null or baseline it is compared with, the paper's own figure (read off the paper's plots: approximate), the
verdict, the rule that gave it, and the artifacts it was computed from. A claim whose inputs are absent (its
notebook did not run, or is not part of this version) is `not tested`, with the reason.

Verdict rules (VERDICT_RULES holds the same text; every entry of claims.json carries its rule):

C1  synergy and redundancy are distinct properties of heads. Statistic: Spearman r between per-head synergy
    (mean sts) and redundancy (mean rtr) of the per-prompt PhiID, 95% percentile bootstrap CI over heads. Null:
    the same r after circularly shifting every (prompt, head) series by its own random offset (keeps each head's
    autocorrelation, drift and level, breaks the timing between heads); band = 2.5/97.5 percentiles.
      supported      CI high < 0.5 (less than a quarter of shared rank variance) and CI high < null band low
      not supported  CI low >= 0.5, or CI low >= null band low (the null's per-head properties explain r)
      inconclusive   otherwise
C2  the synergy-minus-redundancy profile over depth is an inverted U. Test: lib.diagnostics.inverted_u_test on the
    paper's ranking (rank_diff) raw and on its excess over the circular-shift null (notebook 04's surrogates).
      supported      raw verdict "inverted U" and beyond-null verdict "inverted U"
      not supported  raw verdict not "inverted U", or beyond-null verdict not "inverted U" (the shape comes from
                     per-head properties that survive the shift)
      inconclusive   raw "inverted U" but no beyond-null test in the run
C3  the pattern emerges with training. The same beyond-null test on the trained model and on the randomly
    initialised copy (surrogates computed here).
      supported      trained beyond-null "inverted U" and random-init beyond-null not "inverted U"
      not supported  trained beyond-null not "inverted U" (nothing to emerge), or random-init also "inverted U"
      not tested     no random-init activations / PhiID in the run
C4, C6, C7 (from the experiment's JSON "claim" block, see CLAIM_INPUTS): value with CI against a null band,
    direction "greater" (value > null) or "less". With lo/hi the value's CI (the value itself when the CI is
    missing and n >= 3) and the null band [n_lo, n_hi] (the null value when it has no band):
      supported      greater: lo > n_hi and lo > 0;   less: hi < n_lo and hi < 0
      not supported  greater: hi <= n_hi or hi <= 0;  less: lo >= n_lo or lo >= 0   (the CI does not leave the
                     null band, or the effect has the opposite sign of the claim: a difference beyond what the
                     weight distributions give, but syn LESS efficient than red, does not support C4)
      inconclusive   otherwise, or no CI with n < 3
C5  removing synergistic heads first diverges behaviour faster than random. Statistic: AUC(ranking) / mean AUC(random
    orders) over 0-40% of heads (the paper's x-range), CI resampling prompts and random orders together; the
    ranking's percentile among the random orders; the same against layer-matched random orders.
      supported      ratio CI low > 1, percentile >= 95, and (when layer-matched orders exist) their ratio CI low > 1
      not supported  ratio CI high < 1, or percentile <= 5
      inconclusive   otherwise (e.g. a ranking that behaves like one more random order)
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

from lib import artifacts
from lib.store import ArtifactError

PAPER = ('"A Brain-like Synergistic Core in LLMs Drives Behaviour and Learning" (arXiv 2601.06851)')
VERDICTS = ("supported", "not supported", "inconclusive", "not tested")
PRIMARY_VARIANT = "rank_diff"          # the paper's ranking
C1_MAX_R = 0.5
C5_RANGE = 0.4                         # the paper's Fig 4a x-range: 0-40% of heads removed
C5_PERCENTILE = 95.0
MIN_STEPS = 10                         # shortest series kept when truncating at the end of turn

VERDICT_RULES = {
    "C1": "supported: CI high < 0.5 and CI high < null band low; not supported: CI low >= 0.5 or CI low >= null "
          "band low; else inconclusive",
    "C2": "supported: raw and beyond-null verdicts both 'inverted U'; not supported: either is not; inconclusive: "
          "raw 'inverted U' without a beyond-null test",
    "C3": "supported: trained beyond-null 'inverted U' and random-init beyond-null not; not supported: trained not "
          "'inverted U' beyond the null, or random-init also; not tested: no random-init copy",
    "C4": "greater: supported if CI low > null band high and > 0, not supported if CI high <= null band high or <= 0, "
          "else inconclusive",
    "C5": "supported: AUC ratio (0-40%) CI low > 1, percentile among random orders >= 95 and layer-matched ratio CI "
          "low > 1; not supported: ratio CI high < 1 or percentile <= 5; else inconclusive",
    "C6": "less: supported if CI high < null band low and < 0, not supported if CI low >= null band low or >= 0, else "
          "inconclusive",
    "C7": "greater: supported if CI low > null band high and > 0, not supported if CI high <= null band high or <= 0, "
          "else inconclusive",
}

CLAIMS = {   # id -> (claim sentence, notebook that tests it, test)
    "C1": ("Synergy and redundancy are distinct properties of attention heads (as in the brain, where they are "
           "anti-correlated).", "03_phiid_diagnostics",
           "per-head Spearman r(synergy, redundancy) with a bootstrap CI over heads, against circular-shift surrogates"),
    "C2": ("The synergy-minus-redundancy profile over depth is an inverted U (a synergistic core in the middle "
           "layers).", "04_ranking_variants",
           "middle third vs early and late thirds of the rank_diff layer profile, raw and beyond the circular-shift null"),
    "C3": ("The synergistic core emerges with training: it is absent in the randomly initialised model.",
           "04_ranking_variants", "the beyond-null inverted-U test on the trained model vs the random-init copy"),
    "C4": ("The synergistic network is more globally efficient, the redundant one more modular.", "08_topology",
           "efficiency(syn) - efficiency(red) against strength-preserving randomised networks"),
    "C5": ("Removing synergistic heads first diverges behaviour faster than removing random heads (Fig 4a).",
           "05_ablation", "AUC of KL vs fraction removed, ranking / random orders, over 0-40% and 0-100% of heads"),
    "C6": ("Perturbing the most synergistic heads hurts task accuracy most (Fig 4b).", "09_task_behaviour",
           "accuracy(synergistic perturbed) - mean accuracy(random sets), paired problems"),
    "C7": ("Updating only synergistic heads helps learning most (Fig 5).", "10_head_finetuning",
           "Hedges' g of final accuracy, synergistic vs random heads, over seeds"),
}

PAPER_FIGURES = {   # read off the paper's plots: approximate
    "C1": (-0.4, "brain (Luppi et al., cited by the paper): r ~ -0.4 (approximate)"),
    "C2": (None, "inverted U of the syn-red rank over depth in every model shown (Fig 2-3, qualitative)"),
    "C3": (None, "flat profile at initialisation, inverted U after training (Fig 3a-b, qualitative)"),
    "C4": (0.045, "Gemma-3-4B efficiency syn 0.052 vs red 0.007, modularity 0.030 vs 0.100 (read off Fig 3c, "
                  "approximate)"),
    "C5": (4.1 / 2.1, "Gemma-3-4B KL 4.1 vs 2.1 random at 30% removed, ratio ~1.95 (read off Fig 4a, approximate)"),
    "C6": (-0.16, "MATH accuracy Gemma-3-4B baseline 58, redundant 52, random 44, synergistic 28 with the top 25% "
                  "heads perturbed: synergistic - random ~ -16 points (read off Fig 4b, approximate)"),
    "C7": (None, "synergistic-head updates learn faster than random or redundant ones (Fig 5, qualitative)"),
}

EXPERIMENT_ARTIFACTS = {"C4": "topology", "C6": "behaviour_summary", "C7": "finetune_summary"}


@dataclass
class Claim:
    id: str
    claim: str
    notebook: str
    test: str
    verdict: str = "not tested"
    reason: str = ""
    statistic: str = ""
    value: float | None = None
    ci95: list | None = None
    null: dict = field(default_factory=dict)          # name, value, ci95
    paper: dict = field(default_factory=dict)         # value, text
    rule: str = ""
    source: list = field(default_factory=list)        # artifact names
    n: int | None = None
    details: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return _jsonable(asdict(self))


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not np.isfinite(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    return x


def new_claim(cid: str) -> Claim:
    sentence, notebook, test = CLAIMS[cid]
    value, text = PAPER_FIGURES[cid]
    return Claim(cid, sentence, notebook, test, rule=VERDICT_RULES[cid], paper={"value": value, "text": text})


def not_tested(cid: str, reason: str, source=()) -> Claim:
    c = new_claim(cid)
    c.reason, c.source = reason, list(source)
    return c


# ----------------------------------------------------------------------------- verdict rules (pure functions)

def verdict_distinct(ci, null_band) -> str:
    """C1: ci = (lo, hi) of r(syn, red); null_band = (lo, hi) of r under the circular-shift null."""
    lo, hi = ci
    if hi < C1_MAX_R and hi < null_band[0]:
        return "supported"
    if lo >= C1_MAX_R or lo >= null_band[0]:
        return "not supported"
    return "inconclusive"


def verdict_inverted_u(raw: str, beyond_null: str | None) -> str:
    """C2: verdicts of lib.diagnostics.inverted_u_test on the profile and on its excess over the null."""
    if raw != "inverted U":
        return "not supported"
    if beyond_null is None:
        return "inconclusive"
    return "supported" if beyond_null == "inverted U" else "not supported"


def verdict_emerges(trained_beyond: str | None, random_beyond: str | None) -> str:
    """C3: beyond-null inverted-U verdicts of the trained model and of the random-init copy."""
    if random_beyond is None:
        return "not tested"
    if trained_beyond is None:
        return "inconclusive"
    if trained_beyond != "inverted U" or random_beyond == "inverted U":
        return "not supported"
    return "supported"


def verdict_vs_null(value, ci, null_value, null_ci, direction: str, n: int | None = None) -> str:
    """C4, C6, C7: a value (and its CI) against a null band, in the claimed direction ("greater" / "less")."""
    if direction not in ("greater", "less"):
        raise ValueError(f"direction must be 'greater' or 'less'; got {direction!r}")
    if ci is None and (n is None or n < 3):
        return "inconclusive"
    lo, hi = ci if ci is not None else (value, value)
    n_lo, n_hi = null_ci if null_ci is not None else (null_value, null_value)
    if direction == "greater":
        return "supported" if lo > max(n_hi, 0) else "not supported" if hi <= n_hi or hi <= 0 else "inconclusive"
    return "supported" if hi < min(n_lo, 0) else "not supported" if lo >= n_lo or lo >= 0 else "inconclusive"


def verdict_ablation(ratio_ci, percentile: float, matched_ratio_ci=None) -> str:
    """C5: AUC ratio CI vs random orders, percentile among random orders, optional layer-matched ratio CI."""
    lo, hi = ratio_ci
    if hi < 1 or percentile <= 100 - C5_PERCENTILE:
        return "not supported"
    matched_ok = matched_ratio_ci is None or not np.isfinite(matched_ratio_ci[0]) or matched_ratio_ci[0] > 1
    if lo > 1 and percentile >= C5_PERCENTILE and matched_ok:
        return "supported"
    return "inconclusive"


# ----------------------------------------------------------------------------- C1-C3: head-level evidence

def bootstrap_spearman(a, b, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of Spearman r(a, b), resampling items (heads) with replacement."""
    from lib.diagnostics import bootstrap_correlation
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

    @property
    def r(self) -> float:
        return float(stats.spearmanr(self.syn, self.red)[0])

    def null_band(self) -> tuple[float, float]:
        return float(np.quantile(self.null_r, 0.025)), float(np.quantile(self.null_r, 0.975))


def _rank_diff(X, lengths, head_layer, n_layers, labels):
    """rank_diff VariantScore of series X [prompts, heads, steps], prompt p using its first lengths[p] steps
    (per-prompt MMI PhiID, the engine's fast option: sts, rtr and TDMI means over prompts)."""
    from lib import ranking as rk
    from lib.phiid import phiid_fast_stats
    full = lengths is None or np.all(lengths == X.shape[2])
    s = phiid_fast_stats(X, mode="per_prompt", lengths=None if full else [int(n) for n in lengths])
    pairs = rk.PairStats(sts=s.sts, rtr=s.rtr, tdmi=s.tdmi, valid=s.valid, n_heads=s.n_heads)
    return rk.variant_score(PRIMARY_VARIANT, pairs, head_layer, n_layers, labels=labels)


def head_evidence(out_dir, tag: str = "", truncate_at_eos: bool = False, n_surrogates: int = 20,
                  seed: int = 0) -> HeadEvidence:
    """Synergy, redundancy and rank_diff of every head from the per-prompt PhiID of the activations (the same
    numbers as phiid_per_prompt.npz, which 04 checks), plus circular-shift surrogates of both. With
    truncate_at_eos only the steps up to each prompt's first end-of-turn token are used (prompts with fewer
    than MIN_STEPS such steps are left out)."""
    from lib import diagnostics as dg
    artifacts.load("phiid", out_dir, tag=tag, mode="per_prompt", keys=["sts"])     # 02 must have run
    acts = artifacts.load("activations", out_dir, tag=tag, keys=["activations", "tokens", "head_layer",
                                                                  "head_index", "n_layers", "model"])
    X = np.asarray(acts["activations"], np.float64)
    lengths = np.full(X.shape[0], X.shape[2])
    if truncate_at_eos:
        from lib.prompts import end_of_turn_lengths
        lengths = end_of_turn_lengths(acts["tokens"], _end_of_turn_ids(str(acts["model"])))
        keep = lengths >= MIN_STEPS
        X, lengths = X[keep], lengths[keep]
    head_layer, n_layers = np.asarray(acts["head_layer"]), int(acts["n_layers"])
    labels = dg.head_labels(head_layer, acts["head_index"])
    observed = _rank_diff(X, lengths, head_layer, n_layers, labels)
    null_r, null_score = [], []
    for k in range(n_surrogates):
        u = np.random.default_rng([seed, k]).random(X.shape[:2])
        shifted = dg.shift_series(X, np.floor(u * lengths[:, None]).astype(np.int64) % X.shape[2]) \
            if np.all(lengths == X.shape[2]) else _shift_within(X, lengths, u)
        s = _rank_diff(shifted, lengths, head_layer, n_layers, labels)
        null_r.append(stats.spearmanr(s.syn, s.red)[0])
        null_score.append(s.score)
    steps = str(X.shape[2]) if np.all(lengths == X.shape[2]) else \
        f"{lengths.min()}-{lengths.max()} (median {int(np.median(lengths))})"
    return HeadEvidence(tag, observed.syn, observed.red, observed.score, np.array(null_r), np.array(null_score),
                        head_layer, n_layers, int(X.shape[0]), steps)


def _shift_within(X, lengths, u):
    """Circular shift of every (prompt, head) series within its first lengths[p] steps."""
    out = X.copy()
    for p, L in enumerate(lengths):
        off = np.floor(u[p] * L).astype(np.int64)
        idx = (np.arange(L)[None, :] + off[:, None]) % L
        out[p, :, :L] = np.take_along_axis(X[p, :, :L], idx, axis=-1)
    return out


def _end_of_turn_ids(model_spec: str) -> list[int]:
    from lib.models import bundled_tokenizer
    from lib.prompts import end_of_turn_ids
    if model_spec.startswith(("random:", "bundled:")):
        return end_of_turn_ids(bundled_tokenizer())
    from transformers import AutoTokenizer
    return end_of_turn_ids(AutoTokenizer.from_pretrained(model_spec))


def profile_verdicts(ev: HeadEvidence, n_boot: int = 1000, seed: int = 0) -> dict:
    """Inverted-U test of the rank_diff profile, raw and beyond the evidence's surrogates."""
    from lib.diagnostics import inverted_u_test
    raw = inverted_u_test(ev.score, ev.head_layer, ev.n_layers, n_boot, seed).as_row()
    beyond = inverted_u_test(ev.score - ev.null_score.mean(0), ev.head_layer, ev.n_layers, n_boot, seed).as_row()
    return {"raw": raw, "beyond_null": beyond}


def _c1_numbers(ev: HeadEvidence, n_boot: int, seed: int) -> dict:
    ci = bootstrap_spearman(ev.syn, ev.red, n_boot, seed)
    band = ev.null_band()
    return {"r": ev.r, "ci95": list(ci), "null_mean": float(ev.null_r.mean()), "null_ci95": list(band),
            "verdict": verdict_distinct(ci, band), "n_heads": len(ev.syn), "n_prompts": ev.n_prompts,
            "steps": ev.steps, "n_surrogates": len(ev.null_r)}


def claim_c1(ev: HeadEvidence, random_init: HeadEvidence | None = None, eos: HeadEvidence | None = None,
             n_boot: int = 1000, seed: int = 0) -> Claim:
    c = new_claim("C1")
    main = _c1_numbers(ev, n_boot, seed)
    c.statistic = "Spearman r between per-head synergy (mean sts) and redundancy (mean rtr), per-prompt PhiID"
    c.value, c.ci95, c.n, c.verdict = main["r"], main["ci95"], main["n_heads"], main["verdict"]
    c.null = {"name": f"circular-shift surrogates ({main['n_surrogates']}): r after shifting every series in time "
                      f"(keeps each head's autocorrelation)", "value": main["null_mean"], "ci95": main["null_ci95"]}
    c.source = ["activations", "phiid"]
    c.details = {"trained": main}
    if random_init is not None:
        c.details["random_init"] = _c1_numbers(random_init, n_boot, seed)
    if eos is not None:
        c.details["before_end_of_turn"] = _c1_numbers(eos, n_boot, seed)
    return c


def claim_c2(out_dir, eos: HeadEvidence | None = None, n_boot: int = 1000, seed: int = 0) -> Claim:
    c = new_claim("C2")
    summary = artifacts.load("ranking_summary", out_dir)
    raw = {r["variant"]: r for r in summary.get("inverted_u", [])}
    beyond = {r["variant"]: r for r in summary.get("inverted_u_beyond_null", [])}
    if not raw:
        return not_tested("C2", "ranking_summary.json has no inverted-U table (rerun 04_ranking_variants)",
                          ["ranking_summary"])
    variant = PRIMARY_VARIANT if PRIMARY_VARIANT in raw else next(iter(raw))
    b = beyond.get(variant)
    c.verdict = verdict_inverted_u(raw[variant]["verdict"], b["verdict"] if b else None)
    row = b or raw[variant]
    c.statistic = (f"middle-third minus early-third mean of the '{variant}' layer profile"
                   f"{' beyond the null (score minus mean surrogate score)' if b else ' (raw)'}; score units in [0, 1]")
    c.value, c.ci95 = row["mid_minus_early"], [row.get("mid_minus_early_lo"), row.get("mid_minus_early_hi")]
    c.null = {"name": "circular-shift surrogates of notebook 04 (the profile's excess over them); no depth "
                      "difference = 0", "value": 0.0, "ci95": None}
    c.n = summary.get("n_heads")
    c.source = ["ranking_summary"]
    c.details = {"variant": variant, "raw_verdict": raw[variant]["verdict"],
                 "beyond_null_verdict": b["verdict"] if b else None,
                 "per_variant": {v: {"raw": raw[v]["verdict"], "beyond_null": beyond.get(v, {}).get("verdict")}
                                 for v in raw}}
    if eos is not None:
        pv = profile_verdicts(eos, n_boot, seed)
        c.details["before_end_of_turn"] = {"raw": pv["raw"]["verdict"], "beyond_null": pv["beyond_null"]["verdict"],
                                           "steps": eos.steps, "n_prompts": eos.n_prompts,
                                           "verdict": verdict_inverted_u(pv["raw"]["verdict"],
                                                                         pv["beyond_null"]["verdict"])}
    return c


def claim_c3(trained: HeadEvidence, random_init: HeadEvidence | None, checkpoints: dict, n_boot: int = 1000,
             seed: int = 0) -> Claim:
    if random_init is None:
        return not_tested("C3", "no random-init copy in this run (01_extract_activations baseline_random_init "
                                "and 02_phiid on it)", ["activations", "phiid"])
    c = new_claim("C3")
    t, r = profile_verdicts(trained, n_boot, seed), profile_verdicts(random_init, n_boot, seed)
    c.verdict = verdict_emerges(t["beyond_null"]["verdict"], r["beyond_null"]["verdict"])
    c.statistic = "middle minus early third of the rank_diff profile beyond the null, trained model (score units)"
    c.value = t["beyond_null"]["mid_minus_early"]
    c.ci95 = [t["beyond_null"]["mid_minus_early_lo"], t["beyond_null"]["mid_minus_early_hi"]]
    rb = r["beyond_null"]
    c.null = {"name": "the randomly initialised copy, same test", "value": rb["mid_minus_early"],
              "ci95": [rb["mid_minus_early_lo"], rb["mid_minus_early_hi"]]}
    c.n, c.source = len(trained.score), ["activations", "phiid"]
    c.details = {"trained": {k: v["verdict"] for k, v in t.items()},
                 "random_init": {k: v["verdict"] for k, v in r.items()},
                 "n_surrogates": len(trained.null_r),
                 "checkpoints": {tag: {k: v["verdict"] for k, v in profile_verdicts(ev, n_boot, seed).items()}
                                 for tag, ev in checkpoints.items()}}
    return c


# ----------------------------------------------------------------------------- C5: ablation

def claim_c5(out_dir, n_boot: int = 2000, seed: int = 0) -> Claim:
    from lib.ablation import AblationResult
    if not artifacts.path("ablation_kl", out_dir).exists():
        return not_tested("C5", "no ablation_kl.npz (05_ablation did not run)", ["ablation_kl"])
    result = AblationResult.load(out_dir)
    if not result.variants or not result.index("random"):
        return not_tested("C5", "the ablation has no ranking or no random orders (n_random = 0)", ["ablation_kl"])
    variant = PRIMARY_VARIANT if PRIMARY_VARIANT in result.variants else result.variants[0]
    upto = min(C5_RANGE, float(result.fractions[-1]))
    part = result.auc_table(n_boot=n_boot, seed=seed, max_fraction=upto)
    full = result.auc_table(n_boot=n_boot, seed=seed) if result.fractions[-1] >= 1 - 1e-9 else None
    row = part[(part.variant == variant) & (part.ordering == "ranking")].iloc[0]
    matched = (row.matched_ci_low, row.matched_ci_high) if row.n_matched else None
    c = new_claim("C5")
    c.verdict = verdict_ablation((row.ci_low, row.ci_high), row.percentile, matched)
    c.statistic = (f"AUC('{variant}' ranking) / mean AUC(random orders) of KL vs fraction removed, 0-{upto:.0%} "
                   f"of heads; CI resamples prompts and random orders")
    c.value, c.ci95, c.n = row.auc_ratio, [row.ci_low, row.ci_high], int(result.kl.shape[2])
    c.null = {"name": f"{int(row.n_random)} random removal orders (ratio 1); band = their spread",
              "value": 1.0, "ci95": _random_ratio_band(result, upto)}
    c.source = ["ablation_kl"]
    at30 = result.fraction_table(fractions=[0.3]) if result.fractions[-1] >= 0.3 else None
    c.details = {"variant": variant, "percentile_among_random": row.percentile, "n_random": int(row.n_random),
                 "layer_matched": {"n": int(row.n_matched), "ratio": row.matched_ratio,
                                   "ci95": [row.matched_ci_low, row.matched_ci_high],
                                   "percentile": row.matched_percentile},
                 "range": f"0-{upto:.0%}", "n_prompts": int(result.kl.shape[2]),
                 "per_variant": _per_variant(part, full)}
    if at30 is not None:
        r30 = at30[at30.variant == variant].iloc[0]
        c.details["kl_at_30pct"] = {"ranking": r30.ranking_kl, "random_mean": r30.random_mean, "ratio": r30.ratio}
    return c


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


# ----------------------------------------------------------------------------- C4, C6, C7: experiment blocks

def claim_from_block(cid: str, out_dir) -> Claim:
    """C4 / C6 / C7 from the "claim" block of the experiment's JSON summary (see the module docstring)."""
    name = EXPERIMENT_ARTIFACTS[cid]
    if name not in artifacts.ARTIFACTS:
        return not_tested(cid, f"artifact kind {name!r} is not declared in lib/artifacts.py (notebook "
                               f"{CLAIMS[cid][1]} is not part of this version)", [name])
    p = artifacts.path(name, out_dir)
    if not p.exists():
        return not_tested(cid, f"no {p.name} ({CLAIMS[cid][1]} did not run)", [name])
    block = (artifacts.load(name, out_dir) or {}).get("claim")
    missing = [k for k in ("value", "null", "direction") if not isinstance(block, dict) or k not in block]
    if missing:
        return not_tested(cid, f"{p.name} has no valid 'claim' block (missing {missing})", [name])
    c = new_claim(cid)
    null = block["null"] or {}
    c.verdict = verdict_vs_null(block["value"], block.get("ci95"), null.get("value"), null.get("ci95"),
                                block["direction"], block.get("n"))
    c.statistic, c.value, c.ci95 = block.get("statistic", ""), block["value"], block.get("ci95")
    c.null, c.n, c.details, c.source = null, block.get("n"), block.get("details", {}), [name]
    if block.get("paper", {}).get("text"):
        c.paper = {"value": block["paper"].get("value"), "text": block["paper"]["text"]}
    if c.verdict == "inconclusive" and block.get("ci95") is None:
        c.reason = f"no CI (n = {block.get('n')})"
    return c


# ----------------------------------------------------------------------------- the scorecard

def _guard(cid: str, fn, *args, **kwargs) -> Claim:
    """A claim that cannot be evaluated is `not tested` with the reason; the scorecard never stops a run."""
    try:
        return fn(*args, **kwargs)
    except (ArtifactError, FileNotFoundError) as e:
        return not_tested(cid, str(e))
    except Exception as e:                                      # noqa: BLE001  (reported in claims.json)
        return not_tested(cid, f"could not evaluate: {type(e).__name__}: {e}")


def _evidence(out_dir, tag, truncate, n_surrogates, seed):
    try:
        return head_evidence(out_dir, tag, truncate, n_surrogates, seed), None
    except Exception as e:                                      # noqa: BLE001  (reported in claims.json)
        return None, f"{type(e).__name__}: {e}"


def evaluate(out_dir, n_surrogates: int = 20, n_boot: int = 1000, seed: int = 0) -> list[Claim]:
    """Every claim C1-C7 from the artifacts of out_dir (absent inputs -> not tested)."""
    tags = [t for t in artifacts.tags("activations", out_dir)]
    trained, why = _evidence(out_dir, "", False, n_surrogates, seed) if "" in tags else (None, "no activations.npz")
    rand = _evidence(out_dir, "random_init", False, n_surrogates, seed)[0] if "random_init" in tags else None
    eos = _evidence(out_dir, "", True, n_surrogates, seed)[0] if trained is not None else None
    if eos is not None and eos.steps == trained.steps:
        eos = None                                      # no prompt ends its turn early: nothing to add
    checkpoints = {t: e for t in tags if t.startswith("rev-")
                   for e in [_evidence(out_dir, t, False, n_surrogates, seed)[0]] if e is not None}
    c1 = claim_c1(trained, rand, eos, n_boot, seed) if trained else not_tested("C1", why, ["activations", "phiid"])
    c3 = claim_c3(trained, rand, checkpoints, n_boot, seed) if trained else not_tested("C3", why)
    return [c1, _guard("C2", claim_c2, out_dir, eos, n_boot, seed), c3,
            _guard("C4", claim_from_block, "C4", out_dir), _guard("C5", claim_c5, out_dir, seed=seed),
            _guard("C6", claim_from_block, "C6", out_dir), _guard("C7", claim_from_block, "C7", out_dir)]


def write_claims(out_dir, n_surrogates: int = 20, n_boot: int = 1000, seed: int = 0) -> Path:
    """Evaluate every claim and write <out_dir>/claims.json atomically; -> its path."""
    from lib.store import update_manifest
    signature = inputs_signature(out_dir, n_surrogates, n_boot, seed)
    previous = artifacts.path("claims", out_dir)
    if previous.exists() and _saved_signature(out_dir) == signature:
        return previous                                   # same inputs, settings and rules: nothing to redo
    claims = evaluate(out_dir, n_surrogates, n_boot, seed)
    data = {"paper": PAPER, "verdicts": list(VERDICTS), "rules_doc": "lib/claims.py (module docstring)",
            "model": _run_model(out_dir), "inputs": signature, "claims": [c.as_dict() for c in claims]}
    note = weights_note(data["model"])
    if note:
        data["weights"] = note
    path = artifacts.save("claims", out_dir, data)
    update_manifest(out_dir, "claims", {"file": path.name, "paper": PAPER, "model": data["model"],
                                        **({"weights": note} if note else {}),
                                        "verdicts": {c.id: c.verdict for c in claims}})
    return path


def inputs_signature(out_dir, *settings) -> dict:
    """What claims.json was computed from: size and modification time of every input file, the settings and a
    hash of this module (a rerun of any notebook, or changed rules, recomputes the scorecard)."""
    import hashlib
    tags = artifacts.tags("activations", out_dir)
    files = [artifacts.path("activations", out_dir, tag=t) for t in tags]
    files += [artifacts.path("phiid", out_dir, tag=t, mode="per_prompt") for t in tags]
    files += [artifacts.path(n, out_dir) for n in ("ranking_summary", "ablation_kl", *EXPERIMENT_ARTIFACTS.values())
              if n in artifacts.ARTIFACTS]
    return {"files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files if p.exists()},
            "settings": list(settings), "rules": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]}


def _saved_signature(out_dir):
    try:
        return artifacts.load("claims", out_dir).get("inputs")
    except ArtifactError:
        return None


def _run_model(out_dir) -> str:
    if not artifacts.path("activations", out_dir).exists():
        return ""
    return str(artifacts.load("activations", out_dir, keys=["model"]).get("model", ""))


def weights_note(model_spec: str) -> str:
    """What the weights of a bundled model are (stated in claims.json, the manifest and the index)."""
    from lib.report import BUNDLED_WEIGHTS_NOTE
    return BUNDLED_WEIGHTS_NOTE if model_spec.startswith("bundled:smollm2") else ""


def load_claims(out_dir) -> list[dict]:
    """The claims of a run ([] when claims.json is absent)."""
    p = artifacts.path("claims", out_dir)
    return artifacts.load("claims", out_dir)["claims"] if p.exists() else []


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib.claims", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="a run folder, e.g. outputs/smollm2-135m")
    parser.add_argument("--surrogates", type=int, default=20, help="circular-shift surrogates for C1-C3")
    args = parser.parse_args(argv)
    if not Path(args.out_dir).is_dir():
        print(f"error: run folder {args.out_dir!r} does not exist", file=sys.stderr)
        return 2
    path = write_claims(args.out_dir, args.surrogates)
    for c in load_claims(args.out_dir):
        print(f"{c['id']}  {c['verdict']:<14} {c['statistic'][:60]}  {c['value']}")
    print(f"[claims] {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
