"""The claims scorecard: what a run says about each claim of the paper, with its CI, its null and a verdict.

The paper: "A Brain-like Synergistic Core in LLMs Drives Behaviour and Learning" (arXiv 2601.06851).

    python -m lib.claims outputs/<run>          # (re)write outputs/<run>/claims.json from the run's artifacts
    write_claims(out_dir)                       # what the runner calls at the end of every run (recomputes only
                                                # when an input file, a setting or these rules changed)

One entry per claim (C1-C7), each with: the claim in one sentence, the test, the statistic with its 95% CI, the
null or baseline it is compared with, the paper's own figure (read off the paper's plots: approximate), the
verdict, the rule that gave it, and the artifacts it was computed from. A claim whose inputs are absent (its
notebook did not run, or is not part of this version) is `not tested`, with the reason.

Verdicts (lib/pipeline/verdicts.py holds the table: supported, opposite, ruled out, underpowered, invalid, not tested). Each
claim reduces to an estimate with its 95% CI, a null, the claimed direction and the paper's effect in the same units
(PAPER_EFFECTS: the smallest effect of interest, with the conversion). Every entry also carries the minimum
detectable effect at 80% power from the run's own variance (`power`), the sample sizes it rests on, and, when
underpowered, the factor on the sample size that would settle it (`settle`; lib/plan.py writes the params file).

C1  synergy and redundancy are distinct. Spearman r between per-head synergy (mean sts) and redundancy (mean rtr)
    of the per-prompt PhiID, bootstrap CI over heads; null: circular-shift surrogates (each (prompt, head) series
    shifted by its own offset: keeps each head's CIRCULAR autocorrelation and its values, breaks the timing between
    heads; a trend is cut at the shift point, so a drift shared by all heads is not kept). Direction "less"; extra
    condition for supported: CI high < 0.5 (less than a quarter of shared rank variance). Paper: r ~ -0.4.
C2  the syn-minus-red profile over depth is an inverted U. Two results: the raw shape and the shape beyond the null
    (score minus mean surrogate score); the verdict rests on the beyond-null one: middle minus early third of
    the rank_diff profile, CI over heads, direction "greater", extra condition: mid minus late CI > 0 too.
C3  the pattern emerges with training: beyond-null mid-minus-early of the trained model minus that of the
    randomly initialised copy (same surrogates, same statistic as C2); extra: trained inverted U, random-init not.
C4  the synergistic network is more efficient (efficiency syn - red) AND the redundant one more modular (modularity
    red - syn), each against its own strength-preserving null; supported when both halves are.
C5  removing synergistic heads first diverges behaviour faster: AUC ratio to random orders over 0-40%, CI over
    prompts and random orders; extra: percentile among random orders >= 95 and the layer-matched ratio CI > 1.
    Every variant, its reverse order and the oracle ordering are reported with their own verdicts; the claim rests
    on rank_diff, and is `underpowered` (never `ruled out`) when the oracle ordering is not detected either.
C6  perturbing synergistic heads hurts accuracy most: (acc(synergistic) - mean acc(random sets)) / acc(baseline),
    `invalid` when the random sets sit at a floor or ceiling.
C7  updating only synergistic heads helps RL (GRPO) learning most: Hedges' g synergistic vs random over seeds; SFT is
    reported as the paper's control (no difference expected, equivalence test); an SFT-only run is `invalid` for C7.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

from lib.storage import artifacts
from lib.pipeline import stages
from lib.storage.store import ArtifactError, jsonable
from lib.pipeline.verdicts import VERDICTS, Evidence, decide, power, settle_factor
from lib.storage.notebooks import NB

__all__ = ["PAPER", "VERDICT_RULES", "CLAIMS", "PAPER_FIGURES", "PAPER_EFFECTS", "EXPERIMENT_ARTIFACTS", "Claim",
           "new_claim", "not_tested", "evidence_c1", "evidence_profile", "bootstrap_spearman", "HeadEvidence",
           "head_evidence", "series_correlation", "profile_verdicts", "c1_against_null", "claim_c1", "claim_c2", "claim_c3",
           "near_duplicates", "claim_c5", "block_evidence", "claim_from_block", "recentred", "claim_c6", "claim_c7",
           "write_claims", "weights_note", "main"]

TABLE_TEXT = ("supported: CI beyond the null band in the claimed direction; opposite: beyond it the other way; "
              "ruled out: CI within +-(paper - null) of the null (TOST), paper's effect excluded; underpowered: CI "
              "spans null and paper; invalid: floor/ceiling or wrong design (lib/pipeline/verdicts.py)")

PAPER = ('"A Brain-like Synergistic Core in LLMs Drives Behaviour and Learning" (arXiv 2601.06851)')
PRIMARY_VARIANT = "rank_diff"          # the paper's ranking
ORACLE_VARIANT = "oracle"              # heads ordered by measured importance (attribution patching): positive control
C1_MAX_R = 0.5
C5_RANGE = 0.4                         # the paper's Fig 4a x-range: 0-40% of heads removed
C5_PERCENTILE = 95.0
MIN_STEPS = 10                         # shortest series kept when truncating at the end of turn
MIN_PROMPTS = 3                        # no verdict from a bootstrap over fewer prompts
MIN_HEADS = 6                          # ... or over fewer heads

VERDICT_RULES = {
    "C1": "direction less than the circular-shift null band; supported also needs CI high < 0.5; " + TABLE_TEXT,
    "C2": "beyond-null mid - early third > 0 (extra: beyond-null mid - late > 0 too, i.e. 'inverted U'); "
          + TABLE_TEXT,
    "C3": "trained minus random-init beyond-null mid - early > 0 (extra: trained 'inverted U', random-init not); "
          + TABLE_TEXT,
    "C4": "efficiency(syn - red) and modularity(red - syn) each beyond its strength-preserving null band; supported "
          "when both are, opposite when either is opposite; " + TABLE_TEXT,
    "C5": "AUC ratio (0-40%) CI > 1 (extra: percentile among random orders >= 95 and layer-matched ratio CI > 1); "
          "underpowered instead of ruled out when the oracle ordering is not detected; " + TABLE_TEXT,
    "C6": "relative accuracy drop (synergistic - random) / baseline below the random sets' null; invalid at a floor "
          "or ceiling; " + TABLE_TEXT,
    "C7": "GRPO Hedges' g (synergistic vs random) > 0; invalid when only SFT ran (the paper claims C7 for RL) or at "
          "a floor or ceiling; " + TABLE_TEXT,
}

_CLAIM_TEXT = {   # id -> (claim sentence, test); the notebook that tests it is declared in lib/pipeline/stages.py
    "C1": ("Synergy and redundancy are distinct properties of attention heads (as in the brain, where they are "
           "anti-correlated).",
           "per-head Spearman r(synergy, redundancy) with a bootstrap CI over heads, against circular-shift surrogates"),
    "C2": ("The synergy-minus-redundancy profile over depth is an inverted U (a synergistic core in the middle "
           "layers).",
           "middle third vs early and late thirds of the rank_diff layer profile, raw and beyond the circular-shift null"),
    "C3": ("The synergistic core emerges with training: it is absent in the randomly initialised model.",
           "the beyond-null inverted-U test on the trained model vs the random-init copy"),
    "C4": ("The synergistic network is more globally efficient, the redundant one more modular.",
           "efficiency(syn) - efficiency(red) against strength-preserving randomised networks"),
    "C5": ("Removing synergistic heads first diverges behaviour faster than removing random heads (Fig 4a).",
           "AUC of KL vs fraction removed, ranking / random orders, over 0-40% and 0-100% of heads"),
    "C6": ("Perturbing the most synergistic heads hurts task accuracy most (Fig 4b).",
           "accuracy(synergistic perturbed) - mean accuracy(random sets), paired problems"),
    "C7": ("Updating only synergistic heads helps learning most (Fig 5).",
           "Hedges' g of final accuracy, synergistic vs random heads, over seeds"),
}
CLAIMS = {cid: (sentence, stages.stage_testing(cid), test) for cid, (sentence, test) in _CLAIM_TEXT.items()}

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

# The paper's effect in each claim's own statistic (the smallest effect of interest) and how it was converted.
PAPER_EFFECTS = {
    "C1": (-0.4, "r = -0.4, the brain's synergy-redundancy anti-correlation the paper compares with"),
    "C2": (0.1, "documented smallest effect: the middle third 0.1 above the early third on the [0, 1] rank scale "
                "(10 percentile points of heads); the paper's profiles (Fig 2-3) are qualitative, and a smaller "
                "bump would not show as an inverted U in its figures"),
    "C3": (0.1, "the same 0.1 as C2: the paper shows a flat profile at initialisation and an inverted U after "
                "training (Fig 3a-b, qualitative)"),
    "C4": (0.045, "efficiency syn 0.052 - red 0.007 = 0.045 (Gemma-3-4B, Fig 3c); modularity red 0.100 - syn 0.030 "
                  "= 0.07 for the other half"),
    "C5": (1.95, "KL 4.1 vs 2.1 for random at 30% removed (Gemma-3-4B, Fig 4a): ratio ~1.95, taken as the AUC ratio "
                 "over 0-40%"),
    "C6": (-0.276, "(28 - 44) / 58: synergistic minus random accuracy as a fraction of the baseline (Gemma-3-4B "
                   "MATH, Fig 4b)"),
    "C7": (1.4, "GRPO Hedges' g synergistic vs random ~1.4 (vs redundant ~5.0), Fig 5; SFT: no difference"),
}
C4_MODULARITY_EFFECT = 0.07

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
    paper_effect: dict = field(default_factory=dict)  # value (in the statistic's units), note
    power: dict = field(default_factory=dict)         # se, mde, mde_from_null, paper_detectable
    sample_sizes: dict = field(default_factory=dict)
    settle: dict = field(default_factory=dict)        # factor, params {key: value} when underpowered

    def as_dict(self) -> dict:
        return jsonable(asdict(self))


def new_claim(cid: str) -> Claim:
    sentence, notebook, test = CLAIMS[cid]
    value, text = PAPER_FIGURES[cid]
    effect, note = PAPER_EFFECTS[cid]
    return Claim(cid, sentence, notebook, test, rule=VERDICT_RULES[cid], paper={"value": value, "text": text},
                 paper_effect={"value": effect, "note": note})


def judge(c: Claim, ev: Evidence, sample_sizes: dict, scale: dict | None = None) -> Claim:
    """Set c's verdict, reason, power and settle plan from ev. scale: {params key: current value} of the sample
    sizes that narrow the CI (the settle plan multiplies them)."""
    c.verdict, why = decide(ev)
    c.reason = "; ".join(x for x in (why, c.reason) if x)
    c.power, c.sample_sizes = power(ev), dict(sample_sizes)
    if c.verdict == "underpowered":
        c.settle = settle_plan(ev, scale)
    return c


def settle_plan(ev: Evidence, scale: dict | None) -> dict:
    """What would settle an underpowered claim: the sample-size factor and the params values it gives."""
    factor = settle_factor(ev)
    if factor is None:
        return {"factor": None, "why": "no sample size brings the minimum detectable effect to the paper's effect "
                                      "(the null band alone reaches past it, or the paper gives no effect)"}
    out = {"factor": factor, "params": {k: int(np.ceil(v * factor)) for k, v in (scale or {}).items()}}
    if not scale:
        out["why"] = "the CI is over the model's heads: a model with more heads (or more layers) narrows it"
    return out


def too_few(sample_sizes: dict) -> str:
    """The reason no verdict is given (below the documented minimum sizes), or ''."""
    if sample_sizes.get("prompts", MIN_PROMPTS) < MIN_PROMPTS:
        return f"{sample_sizes['prompts']} prompt(s): a CI needs at least {MIN_PROMPTS}"
    if sample_sizes.get("heads", MIN_HEADS) < MIN_HEADS:
        return f"{sample_sizes['heads']} heads: a CI needs at least {MIN_HEADS}"
    return ""


def not_tested(cid: str, reason: str, source=()) -> Claim:
    c = new_claim(cid)
    c.reason, c.source = reason, list(source)
    return c


# ----------------------------------------------------------------------------- verdict rules (pure functions)

def evidence_c1(r_ci, null_band, null_mean) -> Evidence:
    """C1: r's CI against the circular-shift null band; supported also needs CI high < C1_MAX_R."""
    extra = r_ci[1] < C1_MAX_R
    return Evidence(float(np.mean(r_ci)), tuple(r_ci), null_mean, tuple(null_band), "less", PAPER_EFFECTS["C1"][0],
                    extra_ok=extra, extra_note="" if extra else
                    f"less correlated than the null, but r's CI reaches {r_ci[1]:.2f} >= {C1_MAX_R}")


def evidence_profile(row: dict, paper: float, extra_ok: bool, note: str) -> Evidence:
    """C2 / C3: a mid-minus-early difference (row: value, lo, hi) against 0, direction greater."""
    return Evidence(row["value"], (row["lo"], row["hi"]), 0.0, None, "greater", paper, extra_ok=extra_ok,
                    extra_note=note)


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
    acts = artifacts.load("activations", out_dir, tag=tag, keys=["activations", "tokens", "head_layer",
                                                                  "head_index", "n_layers", "model"])
    X = np.asarray(acts["activations"], np.float64)
    lengths = np.full(X.shape[0], X.shape[2])
    if truncate_at_eos:
        from lib.model.prompts import end_of_turn_lengths
        lengths = end_of_turn_lengths(acts["tokens"], _end_of_turn_ids(str(acts["model"])))
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
    return _oracle_check(c, orderings.get(f"ranking:{ORACLE_VARIANT}"))


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


def _oracle_check(c: Claim, oracle: dict | None) -> Claim:
    """Without a detected oracle the budget cannot show the claim: `ruled out` becomes `underpowered`."""
    if oracle is None:
        c.details["oracle"] = f"no oracle ordering in this run ({NB.EXTRACT} oracle, variant 'oracle')"
        return c
    c.details["oracle"] = oracle
    if oracle.get("verdict") != "supported" and c.verdict == "ruled out":
        c.verdict, c.reason = "underpowered", f"the oracle is not detected ({oracle.get('verdict')}); {c.reason}"
        c.settle = {"factor": None, "why": "the budget does not detect the oracle ordering: more prompts and random "
                                           "orders first, until the oracle is supported"}
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

def read_block(cid: str, out_dir) -> tuple[Claim | None, dict]:
    """(a not-tested Claim, {}) when the experiment's JSON or its claim block is absent; else (None, block)."""
    name = EXPERIMENT_ARTIFACTS[cid]
    if name not in artifacts.ARTIFACTS:
        return not_tested(cid, f"artifact kind {name!r} is not declared in lib/storage/artifacts/ (notebook "
                               f"{CLAIMS[cid][1]} is not part of this version)", [name]), {}
    p = artifacts.path(name, out_dir)
    if not p.exists():
        return not_tested(cid, f"no {p.name} ({CLAIMS[cid][1]} did not run)", [name]), {}
    block = (artifacts.load(name, out_dir) or {}).get("claim")
    missing = [k for k in ("value", "null", "direction") if not isinstance(block, dict) or k not in block]
    if missing:
        return not_tested(cid, f"{p.name} has no valid 'claim' block (missing {missing})", [name]), {}
    return None, block


def block_evidence(block: dict, paper_effect: float | None) -> Evidence:
    """An experiment's claim block as Evidence (a missing CI: the value itself, i.e. a point against the band)."""
    null = block["null"] or {}
    ci = block.get("ci95") or (block["value"], block["value"])
    validity = block.get("validity") or {}
    return Evidence(block["value"], tuple(ci), null.get("value") or 0.0,
                    tuple(null["ci95"]) if null.get("ci95") else None, block["direction"],
                    block.get("paper_effect", paper_effect), se=block.get("se"),
                    valid=validity.get("valid", True), invalid_reason=validity.get("reason", ""))


def claim_from_block(cid: str, out_dir, transform=None) -> Claim:
    """C4 / C6 / C7 from the "claim" block of the experiment's JSON summary (see the module docstring);
    transform: block -> block applied first."""
    missing, block = read_block(cid, out_dir)
    if missing is not None:
        return missing
    block = transform(block) if transform else block
    c = new_claim(cid)
    c.statistic, c.value, c.ci95 = block.get("statistic", ""), block["value"], block.get("ci95")
    c.null, c.n, c.details, c.source = block["null"] or {}, block.get("n"), block.get("details", {}), \
        [EXPERIMENT_ARTIFACTS[cid]]
    if block.get("paper", {}).get("text"):
        c.paper = {"value": block["paper"].get("value"), "text": block["paper"]["text"]}
    if "paper_effect" in block:
        c.paper_effect = {"value": block["paper_effect"], "note": block.get("paper_effect_note", "")}
    for key in ("by_variant", "calibration", "sft_control", "vs_redundant", "overlap", "validity"):
        if key in block:
            c.details[key] = block[key]
    sizes = block.get("sample_sizes") or {"n": block.get("n")}
    if block["value"] is None or not np.isfinite(block["value"]):
        c.verdict = "invalid"
        c.reason = (block.get("validity") or {}).get("reason") or \
            "the statistic is undefined in this run (e.g. a baseline of 0 correct or no variance between seeds)"
        c.sample_sizes = dict(sizes)
        return c
    if block.get("ci95") is None:
        c.reason = f"no CI of the observed value (n = {block.get('n')}): the point against the null band"
    return judge(c, block_evidence(block, c.paper_effect["value"]), sizes, SCALE.get(cid, lambda s: None)(sizes))


SCALE = {   # claim -> sample sizes -> {params key: current value}: what the settle plan multiplies
    "C4": lambda s: {f"{NB.EXTRACT}.n_prompts": s["prompts"]} if "prompts" in s else None,
    "C6": lambda s: {f"{NB.BEHAVIOUR}.n_problems": s["problems"]} if "problems" in s else None,
    "C7": lambda s: {f"{NB.FINETUNE}.seeds": s["seeds"]} if "seeds" in s else None,
}


def recentred(block: dict) -> dict:
    """The block with its CI re-centred on the observed value (value +- half the percentile interval's width).
    The prompt bootstrap of a network measure is biased: a resample repeats prompts, and a network averaged over
    fewer distinct prompts is less noisy, so its efficiency shifts (seen on the no-core positive control: observed
    0.308, percentile CI [0.340, 0.470], which does not contain it)."""
    ci = block.get("ci95")
    if not ci or None in ci:
        return block
    half = (ci[1] - ci[0]) / 2
    return {**block, "ci95": [block["value"] - half, block["value"] + half], "se": half / 1.959964,
            "details": {**(block.get("details") or {}), "percentile_ci95": list(ci),
                        "ci_recentred": "value +- half the percentile bootstrap interval (the bootstrap is biased)"}}


def claim_c4(out_dir) -> Claim:
    """C4: both halves, efficiency (the block, CI re-centred) and modularity (details), each against its own null."""
    c = claim_from_block("C4", out_dir, transform=recentred)
    if c.verdict == "not tested":
        return c
    mod = (c.details.get("trained") or {}).get("modularity_red_minus_syn")
    if not mod:
        return c
    null = mod.get("null") or {}
    obs = mod["observed"]
    mev = Evidence(obs, (obs, obs), null.get("mean") or 0.0, tuple(null["ci95"]) if null.get("ci95") else None,
                   "greater", C4_MODULARITY_EFFECT)
    mverdict, mwhy = decide(mev)
    c.details["halves"] = {"efficiency": {"verdict": c.verdict, "value": c.value, "ci95": c.ci95},
                           "modularity": {"verdict": mverdict, "value": obs, "null_ci95": null.get("ci95"),
                                          "z": mod.get("z"), "paper_effect": C4_MODULARITY_EFFECT,
                                          "note": "observed vs its null band (no CI over prompts)"}}
    c.verdict, c.reason = _combine_halves(c.verdict, mverdict, c.reason)
    if c.verdict == "underpowered" and not c.settle:
        c.settle = {"factor": None, "why": f"{c.reason}: the halves disagree; more prompts narrow the efficiency CI "
                                           f"(see the efficiency half's minimum detectable effect)"}
    return c


def _combine_halves(eff: str, mod: str, reason: str) -> tuple[str, str]:
    if eff == mod:
        return eff, reason
    if "opposite" in (eff, mod):
        return "opposite", f"efficiency {eff}, modularity {mod}"
    if "supported" in (eff, mod):
        return "underpowered", f"one half only: efficiency {eff}, modularity {mod}"
    return (eff if eff == "underpowered" or mod != "underpowered" else mod), f"efficiency {eff}, modularity {mod}"


def claim_c6(out_dir) -> Claim:
    c = claim_from_block("C6", out_dir)
    oracle = (c.details.get("by_variant") or {}).get(ORACLE_VARIANT, {}).get("synergistic")
    if c.verdict not in ("not tested", "invalid"):
        _, block = read_block("C6", out_dir)
        _oracle_check(c, None if oracle is None else {
            **oracle, "verdict": decide(block_evidence({**block, "value": oracle["value"], "ci95": oracle["ci95"],
                                                        "se": oracle.get("se")}, PAPER_EFFECTS["C6"][0]))[0]})
    c.details["also"] = [f"{v}: {k} set {x['value']:+.3f} [{x['ci95'][0]:+.3f}, {x['ci95'][1]:+.3f}] of baseline"
                         for v, d in (c.details.get("by_variant") or {}).items() for k, x in d.items()
                         if isinstance(x, dict) and x.get("ci95") and None not in x["ci95"]
                         and (x["ci95"][0] > 0 or x["ci95"][1] < 0)]
    return c


def claim_c7(out_dir) -> Claim:
    c = claim_from_block("C7", out_dir)
    if c.verdict != "not tested" and c.details.get("arm", "grpo") == "sft":
        c.verdict = "invalid"
        c.reason = ("the run fine-tuned with SFT only: the paper claims C7 for RL (GRPO) and reports no difference "
                    f"for SFT (add grpo to {NB.FINETUNE}.methods)")
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


def _evidence(out_dir, tag, truncate, n_surrogates, seed, null_kind="circular"):
    try:
        return head_evidence(out_dir, tag, truncate, n_surrogates, seed, null_kind), None
    except Exception as e:                                      # noqa: BLE001  (reported in claims.json)
        return None, f"{type(e).__name__}: {e}"


def evaluate(out_dir, n_surrogates: int = 20, n_boot: int = 1000, seed: int = 0,
             stale: dict | None = None) -> list[Claim]:
    """Every claim C1-C7 from the artifacts of out_dir (absent inputs -> not tested). stale: notebook -> why its
    results are not current (lib.run.stale_notebooks; None: the notebooks whose last run failed, from the
    manifest)."""
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
    c2 = _guard("C2", claim_c2, trained, eos, n_boot, seed) if trained else not_tested("C2", why)
    trend = _evidence(out_dir, "", False, n_surrogates, seed, "trend")[0] if trained is not None else None
    if trend is not None:
        add_trend_null(c1, c2, trend, n_boot, seed)
    return current_only(stale if stale is not None else failed_notebooks(out_dir), [c1, c2, c3,
                                  _guard("C4", claim_c4, out_dir), _guard("C5", claim_c5, out_dir, seed=seed),
                                  _guard("C6", claim_c6, out_dir), _guard("C7", claim_c7, out_dir)])


def failed_notebooks(out_dir) -> dict[str, str]:
    """notebook -> why its results are not current, from the manifest alone: its last run failed or did not
    finish (lib.run.stale_notebooks adds code, package and input changes)."""
    from lib.storage.store import read_manifest
    entries = read_manifest(out_dir).get("notebooks", {})
    return {stem: f"its last run {e.get('status', 'did not finish')}" + (f" ({e['error']})" if e.get("error") else "")
            for stem, e in sorted(entries.items()) if e.get("status") != "ok"}


def current_only(stale: dict, claims: list[Claim]) -> list[Claim]:
    """A claim resting on a notebook whose last run failed, or whose results are stale (lib.run.stale_notebooks:
    code, packages, inputs changed), is `not tested` with the reason: no verdict from a previous run's files."""
    from lib.pipeline.provenance import claim_notebooks
    for i, c in enumerate(claims):
        why = [f"{nb}: {stale[nb]}" for nb in claim_notebooks(c.source, c.notebook) if nb in stale]
        if why:
            claims[i] = not_tested(c.id, "not from current results: " + "; ".join(why), c.source)
    return claims


def add_trend_null(c1: Claim, c2: Claim, trend: HeadEvidence, n_boot: int, seed: int) -> None:
    """C1 and C2 again with the null that keeps each series' linear trend: how the verdicts move."""
    c1.details["trend_kept_null"] = _c1_numbers(trend, n_boot, seed)
    c2.details["trend_kept_null"] = {"verdict": claim_c2(trend, None, n_boot, seed).verdict,
                                     "beyond_null": _profile_row(profile_verdicts(trend, n_boot, seed)["beyond_null"])}


def write_claims(out_dir, n_surrogates: int = 20, n_boot: int = 1000, seed: int = 0,
                 stale: dict | None = None) -> Path:
    """Evaluate every claim and write <out_dir>/claims.json atomically; -> its path. stale: see evaluate."""
    from lib.storage.store import update_manifest
    stale = stale if stale is not None else failed_notebooks(out_dir)
    signature = inputs_signature(out_dir, stale, n_surrogates, n_boot, seed)
    previous = artifacts.path("claims", out_dir)
    if previous.exists() and _saved_signature(out_dir) == signature:
        return previous                                   # same inputs, settings and rules: nothing to redo
    claims = evaluate(out_dir, n_surrogates, n_boot, seed, stale)
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


def inputs_signature(out_dir, stale: dict, *settings) -> dict:
    """What claims.json was computed from: size and modification time of every input file, the settings and a
    hash of this module (a rerun of any notebook, or changed rules, recomputes the scorecard)."""
    import hashlib
    tags = artifacts.tags("activations", out_dir)
    files = [artifacts.path("activations", out_dir, tag=t) for t in tags]
    files += [artifacts.path("phiid", out_dir, tag=t, mode="per_prompt") for t in tags]
    files += [artifacts.path(n, out_dir) for n in ("ablation_kl", *EXPERIMENT_ARTIFACTS.values())
              if n in artifacts.ARTIFACTS]
    return {"files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files if p.exists()},
            "settings": list(settings), "rules": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16],
            "not_current": stale}


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
    from lib.model.loading import bundled_note
    return bundled_note(model_spec)


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
    from lib.run import stale_notebooks          # the command-line entry (top of the stack) may use the runner
    path = write_claims(args.out_dir, args.surrogates, stale=stale_notebooks(args.out_dir))
    for c in load_claims(args.out_dir):
        print(f"{c['id']}  {c['verdict']:<14} {c['statistic'][:60]}  {c['value']}")
    print(f"[claims] {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
