"""The claims of the paper and their rules: the claim sentences, the paper's figures and effects, the
verdict rule of each claim, the `Claim` record of claims.json and the pure functions that turn evidence into a
verdict (see the package docstring for the tests)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from lib.pipeline import stages
from lib.pipeline.verdicts import Evidence, decide, power, settle_factor
from lib.storage.store import jsonable
from lib.storage.notebooks import NB

__all__ = ["PAPER", "VERDICT_RULES", "CLAIMS", "PAPER_FIGURES", "PAPER_EFFECTS", "EXPERIMENT_ARTIFACTS", "Claim",
           "new_claim", "not_tested", "evidence_c1", "evidence_profile", "TABLE_TEXT", "PRIMARY_VARIANT",
           "ORACLE_VARIANT", "C1_MAX_R", "C5_RANGE", "C5_PERCENTILE", "MIN_STEPS", "MIN_PROMPTS", "MIN_HEADS",
           "C4_MODULARITY_EFFECT", "judge", "settle_plan", "too_few", "oracle_check"]


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


def oracle_check(c: Claim, oracle: dict | None) -> Claim:
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
