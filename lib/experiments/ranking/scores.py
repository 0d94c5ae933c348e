"""Head scores of the ranking variants (notebook 04): pair statistics, the PhiID inputs of each variant and
the per-head synergy-minus-redundancy scores and ranks."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from lib.experiments import diagnostics as dg
from lib.storage.store import ArtifactError
from lib.storage.notebooks import NB

__all__ = ["VARIANTS", "DEFAULT_VARIANTS", "check_variants", "PairStats", "mmi_segment_stats", "mmi_pair_means",
           "phiid_pair_stats", "per_prompt_stats", "VariantScore", "minmax", "variant_score"]


@dataclass(frozen=True)
class Variant:
    name: str
    mode: str               # PhiID mode
    preprocess: str | None  # None, "detrend", "diff"
    score: str              # "rank_diff", "balance", "tdmi_normalized", "autocorr_residualized"
    description: str

    @property
    def source(self) -> tuple[str, str | None]:
        return (self.mode, self.preprocess)
VARIANTS = {v.name: v for v in (
    Variant("rank_diff", "per_prompt", None, "rank_diff", "rank(syn) - rank(red), per-prompt PhiID (paper)"),
    Variant("balance", "per_prompt", None, "balance", "per-pair sts / (sts + rtr), mean per head"),
    Variant("tdmi_normalized", "per_prompt", None, "tdmi_normalized", "sts / TDMI and rtr / TDMI per pair, rank diff"),
    Variant("concat", "concat", None, "rank_diff", "rank diff on PhiID of concatenated prompts"),
    Variant("pooled", "pooled", None, "rank_diff", "rank diff on PhiID of pooled transitions"),
    Variant("detrended", "per_prompt", "detrend", "rank_diff", "rank diff after linear detrend per prompt and head"),
    Variant("first_difference", "per_prompt", "diff", "rank_diff", "rank diff on first differences"),
    Variant("autocorr_residualized", "per_prompt", None, "autocorr_residualized",
            "rank diff of syn and red with lag-1 autocorrelation regressed out"),
)}
DEFAULT_VARIANTS = tuple(VARIANTS)
NEEDS_TDMI = {"tdmi_normalized"}
def check_variants(variants) -> tuple[str, ...]:
    variants = (variants,) if isinstance(variants, str) else tuple(variants)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ValueError(f"unknown ranking variant(s) {unknown}: choose from {list(VARIANTS)}")
    if len(set(variants)) != len(variants):
        raise ValueError(f"variants listed twice: {variants}")
    return variants
def preprocess(X, how: str | None) -> np.ndarray:
    """Series preprocessing of a variant: None (as is), "detrend" (least-squares line removed per prompt
    and head), "diff" (first difference)."""
    if how is None:
        return np.asarray(X, dtype=np.float64)
    if how == "detrend":
        return dg.linear_detrend(X)
    if how == "diff":
        return dg.first_difference(X)
    raise ValueError(f"unknown preprocessing {how!r}")


# ------------------------------------------------------------------------------------------- pair statistics

@dataclass
class PairStats:
    """Symmetric pair quantities over unordered pairs i < j (lib.experiments.diagnostics.pair_index order):
    sts, rtr, tdmi [pairs] (tdmi may be None) and valid [pairs] (not degenerate)."""
    sts: np.ndarray
    rtr: np.ndarray
    tdmi: np.ndarray | None
    valid: np.ndarray
    n_heads: int

    @classmethod
    def from_atoms(cls, atoms, degenerate) -> "PairStats":
        """From a PhiID result or a loaded phiid_<mode>.npz dict ([heads, heads] atoms + degenerate)."""
        deg = np.asarray(degenerate, bool)
        has_all = all(a in atoms for a in _atom_names())
        tdmi = dg.upper(dg.tdmi_matrix(atoms)) if has_all else None
        return cls(sts=dg.upper(np.asarray(atoms["sts"], float)), rtr=dg.upper(np.asarray(atoms["rtr"], float)),
                   tdmi=tdmi, valid=~dg.upper(deg), n_heads=deg.shape[0])


def _atom_names():
    from lib.estimators.phiid import ATOM_NAMES
    return ATOM_NAMES


@dataclass
class PerPromptStats:
    """Per-prompt pair quantities [prompts, pairs] (per_prompt mode keeps one PhiID per prompt), so that the
    PhiID of any prompt subset is a masked mean (exactly what phiid_all_pairs(mode="per_prompt") does)."""
    sts: np.ndarray
    rtr: np.ndarray
    tdmi: np.ndarray
    valid: np.ndarray
    n_heads: int

    def mean(self, prompts=None) -> PairStats:
        sel = slice(None) if prompts is None else np.asarray(prompts)
        valid = self.valid[sel]
        count = valid.sum(0)
        out = {}
        for name in ("sts", "rtr", "tdmi"):
            v = getattr(self, name)[sel]
            with np.errstate(invalid="ignore", divide="ignore"):
                out[name] = np.where(count > 0, np.where(valid, v, 0.0).sum(0) / count, np.nan)
        return PairStats(valid=count > 0, n_heads=self.n_heads, **out)


# ------------------------------------------------------------------------------------------- PhiID inputs
#
# Split halves and 100 surrogates need the per-prompt PhiID of every pair many times, but only sts, rtr and the
# TDMI: lib.estimators.phiid.phiid_fast_stats gives these (MMI, closed form; the engine's own geometry and degeneracy rule).
# CCS has no closed form: phiid_all_pairs is used.

def mmi_segment_stats(X, mode="per_prompt", tau=1) -> PerPromptStats:
    """MMI sts, rtr, TDMI for every unordered pair and every segment (one per prompt in per_prompt mode, else
    one) -> PerPromptStats [segments, pairs] (NaN values and valid False where degenerate)."""
    from lib.estimators.phiid import phiid_fast_stats
    s = phiid_fast_stats(X, tau=tau, mode=mode, per_segment=True)
    return PerPromptStats(sts=s.sts, rtr=s.rtr, tdmi=s.tdmi, valid=s.valid, n_heads=s.n_heads)


def mmi_pair_means(X, mode="per_prompt", tau=1) -> PairStats:
    """mmi_segment_stats(...).mean() with running sums (memory O(pairs), not O(prompts x pairs))."""
    from lib.estimators.phiid import phiid_fast_stats
    s = phiid_fast_stats(X, tau=tau, mode=mode)
    return PairStats(sts=s.sts, rtr=s.rtr, tdmi=s.tdmi, valid=s.valid, n_heads=s.n_heads)


def mmi_mode_stats(X, modes=("per_prompt",), tau=1) -> dict:
    """mmi_pair_means for several modes: mode -> PairStats."""
    return {mode: mmi_pair_means(X, mode, tau) for mode in modes}


def _engine(X, mode, tau, redundancy, backend):
    from lib.estimators.phiid import phiid_all_pairs
    return phiid_all_pairs(X, tau=tau, redundancy=redundancy, mode=mode, backend=backend, warn=False)


def phiid_pair_stats(X, mode="per_prompt", tau=1, redundancy="MMI", backend="numpy") -> PairStats:
    """PhiID (mode) of X -> PairStats: the fast kernel for MMI, lib.estimators.phiid.phiid_all_pairs for CCS."""
    if redundancy == "MMI":
        return mmi_pair_means(X, mode, tau)
    res = _engine(X, mode, tau, redundancy, backend)
    return PairStats.from_atoms(res, res.degenerate)


def per_prompt_stats(X, tau=1, redundancy="MMI", backend="numpy", progress=False) -> PerPromptStats:
    """PhiID of every prompt on its own (one engine call per prompt) -> PerPromptStats."""
    if redundancy == "MMI":
        return mmi_segment_stats(X, "per_prompt", tau)
    X = np.asarray(X, dtype=np.float64)
    P, H = X.shape[:2]
    n_pairs = H * (H - 1) // 2
    arrays = {k: np.empty((P, n_pairs)) for k in ("sts", "rtr", "tdmi")}
    valid = np.empty((P, n_pairs), bool)
    it = range(P)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="per-prompt PhiID", unit="prompt")
    for p in it:
        s = phiid_pair_stats(X[p:p + 1], "per_prompt", tau, redundancy, backend)
        arrays["sts"][p], arrays["rtr"][p], arrays["tdmi"][p], valid[p] = s.sts, s.rtr, s.tdmi, s.valid
    return PerPromptStats(valid=valid, n_heads=H, **arrays)


def source_stats(X_by_preprocess: dict, sources, tau=1, redundancy="MMI", backend="numpy") -> dict:
    """Full-data PairStats of every source (mode, preprocess). X_by_preprocess: preprocess -> series.
    MMI: the fast kernel (mmi_mode_stats); CCS: one lib.estimators.phiid engine call per source."""
    out = {}
    for how in dict.fromkeys(h for _, h in sources):
        modes = tuple(m for m, h in sources if h == how)
        if redundancy == "MMI":
            for mode, st in mmi_mode_stats(X_by_preprocess[how], modes, tau).items():
                out[(mode, how)] = st
        else:
            for mode in modes:
                out[(mode, how)] = phiid_pair_stats(X_by_preprocess[how], mode, tau, redundancy, backend)
    return out


# ------------------------------------------------------------------------------------------- scores

@dataclass
class VariantScore:
    """One variant's ranking. score [heads] in [0, 1] (higher = more synergistic); rank [heads] (1 = most
    synergistic); raw [heads] before min-max; syn, red [heads] (what the variant ranks); layer_mean [layers]."""
    name: str
    score: np.ndarray
    rank: np.ndarray
    raw: np.ndarray
    syn: np.ndarray
    red: np.ndarray
    layer_mean: np.ndarray


def minmax(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    lo, hi = np.nanmin(x), np.nanmax(x)
    return np.full_like(x, 0.5) if hi - lo <= 0 else (x - lo) / (hi - lo)


def residualize(y, x) -> np.ndarray:
    """Residuals of the least-squares fit y ~ a + b x."""
    y, x = np.asarray(y, float), np.asarray(x, float)
    V = np.stack([np.ones_like(x), x], 1)
    coef = np.linalg.lstsq(V, y, rcond=None)[0]
    return y - V @ coef


def _ratio(num, den, valid):
    ok = valid & np.isfinite(num) & np.isfinite(den) & (den > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, num / np.where(ok, den, 1.0), np.nan), ok


def raw_scores(kind: str, pairs: PairStats, autocorr=None, labels=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(raw score, syn, red) per head for a scoring rule (Variant.score)."""
    H = pairs.n_heads
    if kind == "balance":
        b, ok = _ratio(pairs.sts, pairs.sts + pairs.rtr, pairs.valid)
        raw = dg.per_head_mean_pairs(b, ok, H, labels)
        return raw, raw, 1 - raw
    if kind == "tdmi_normalized":
        if pairs.tdmi is None:
            raise ArtifactError("tdmi_normalized needs all 16 atoms (TDMI = their sum); the PhiID file has only "
                                f"some: rerun {NB.PHIID} with all atoms")
        s, ok_s = _ratio(pairs.sts, pairs.tdmi, pairs.valid)
        r, ok_r = _ratio(pairs.rtr, pairs.tdmi, pairs.valid)
        syn, red = dg.per_head_mean_pairs(s, ok_s, H, labels), dg.per_head_mean_pairs(r, ok_r, H, labels)
    else:
        syn = dg.per_head_mean_pairs(pairs.sts, pairs.valid, H, labels)
        red = dg.per_head_mean_pairs(pairs.rtr, pairs.valid, H, labels)
    if kind == "autocorr_residualized":
        if autocorr is None:
            raise ValueError("autocorr_residualized needs the per-head lag-1 autocorrelation")
        syn, red = residualize(syn, autocorr), residualize(red, autocorr)
    elif kind not in ("rank_diff", "tdmi_normalized"):
        raise ValueError(f"unknown scoring rule {kind!r}")
    return stats.rankdata(syn) - stats.rankdata(red), syn, red


def variant_score(name: str, pairs: PairStats, head_layer, n_layers: int, autocorr=None, labels=None) -> VariantScore:
    v = VARIANTS[name]
    raw, syn, red = raw_scores(v.score, pairs, autocorr, labels)
    score = minmax(raw)
    return VariantScore(name=name, score=score, rank=stats.rankdata(-score, method="min").astype(int), raw=raw,
                        syn=syn, red=red, layer_mean=dg.layer_means(score, head_layer, n_layers))
