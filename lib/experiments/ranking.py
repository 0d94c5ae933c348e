"""Head rankings by synergy vs redundancy: the paper's variant and the fixes tried since, and whether each is
signal.

Every variant turns pair-level PhiID into one score per head in [0, 1] (min-max of its raw score; higher =
more synergistic), ranks (1 = most synergistic) and a per-layer mean. Synergy = atom `sts`, redundancy =
atom `rtr`, TDMI = the sum of the 16 atoms; a head's value is the mean over all its non-degenerate pairs.

    rank_diff              rank(syn) - rank(red) on per-prompt PhiID (the paper)
    balance                per pair sts / (sts + rtr), then the mean per head (pairs with sts + rtr <= 0
                           are left out)
    tdmi_normalized        per pair sts / TDMI and rtr / TDMI (pairs with TDMI <= 0 left out), per-head
                           means, then rank_diff
    concat                 rank_diff on PhiID of the prompts joined end to end (phiid mode "concat")
    pooled                 rank_diff on PhiID of the pooled within-prompt transitions (mode "pooled")
    detrended              rank_diff on per-prompt PhiID of the series with its least-squares line removed
                           (per prompt and head)
    first_difference       rank_diff on per-prompt PhiID of x[t] - x[t-1]
    autocorr_residualized  per-head syn and red each regressed (least squares with intercept) on the head's
                           lag-1 autocorrelation; rank(residual syn) - rank(residual red)

Oracle (not a PhiID variant): when notebook 01 wrote oracle.npz (lib.experiments.oracle: attribution patching, each head's
measured first-order effect on the greedy tokens' NLL), rankings.csv gets a column `oracle` = minmax of that
score (higher = more important, removed first by 05), a positive control that 05 and 09 take like any variant.
Only the run's own model has one (never a random-init or checkpoint tag).

Is it signal?
  split-half reliability  random halves of the prompts; PhiID recomputed on each half (per-prompt modes: mean
                          of the per-prompt values over the half; concat / pooled: the mode on the half's prompts);
                          Spearman between the halves' head scores; mean +- sd over splits and the
                          Spearman-Brown estimate for the full prompt set, 2 r / (1 + r), of the mean r.
  surrogate null          each head's series circularly shifted within each prompt by an independent random
                          offset (after the variant's preprocessing); PhiID recomputed; the per-layer profile of
                          every surrogate gives the null band and per-layer z-scores.
  inverted-U test         lib.experiments.diagnostics.inverted_u_test on the per-layer profile, and on the excess of each
                          head's score over its mean surrogate score (what cross-head timing adds).

Speed: with MMI, sts, rtr and TDMI come from the engine's fast option (lib.estimators.phiid.phiid_fast_stats, a closed
form of each pair's correlation matrix), so 100 surrogates x 5 PhiID sources stay cheap; with
CCS every recomputation calls lib.estimators.phiid.phiid_all_pairs.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from lib.storage import artifacts
from lib.experiments import diagnostics as dg
from lib.estimators.phiid import load_phiid
from lib.storage.store import ArtifactError

__all__ = ["VARIANTS", "DEFAULT_VARIANTS", "check_variants", "PairStats", "mmi_segment_stats", "mmi_pair_means",
           "phiid_pair_stats", "per_prompt_stats", "VariantScore", "minmax", "variant_score", "RankingInputs",
           "load_inputs", "split_half_reliability", "surrogate_scores", "null_tables", "inverted_u_table",
           "signal_summary", "agreement", "rankings_frame", "profiles_frame", "baseline_profiles", "ORACLE",
           "oracle_score", "oracle_agreement", "save_rankings"]


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
                                "some: rerun 02_phiid with all atoms")
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


# ------------------------------------------------------------------------------------------- inputs of a run

@dataclass
class RankingInputs:
    """Activations of one run plus the PhiID each selected variant needs (lazy, cached).

    files: PhiID mode -> loaded phiid_<mode>.npz dict; for the variants without preprocessing these are used
    for the full-data scores (checked against a recomputation from the activations when per-prompt arrays
    are computed). Everything else is computed with lib.estimators.phiid."""
    X: np.ndarray
    head_layer: np.ndarray
    head_index: np.ndarray
    n_layers: int
    n_heads: int
    variants: tuple
    tau: int = 1
    redundancy: str = "MMI"
    backend: str = "numpy"
    files: dict = field(default_factory=dict)
    progress: bool = False
    _full: dict = field(default_factory=dict, repr=False)
    _per_prompt: dict = field(default_factory=dict, repr=False)
    _prepared: dict = field(default_factory=dict, repr=False)
    _autocorr: np.ndarray | None = field(default=None, repr=False)

    @property
    def labels(self):
        return dg.head_labels(self.head_layer, self.head_index)

    @property
    def sources(self) -> list[tuple]:
        return sorted({VARIANTS[v].source for v in self.variants}, key=str)

    def autocorr_per_prompt(self) -> np.ndarray:
        if self._autocorr is None:
            self._autocorr = dg.lag_autocorrelation(self.X, 1)
        return self._autocorr

    def autocorr(self, prompts=None) -> np.ndarray:
        """Per-head lag-1 autocorrelation: mean over the (given) prompts where it is defined."""
        r = self.autocorr_per_prompt() if prompts is None else self.autocorr_per_prompt()[np.asarray(prompts)]
        ok = np.isfinite(r)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(ok, r, 0.0).sum(0) / ok.sum(0)

    def prepared(self, how) -> np.ndarray:
        if how not in self._prepared:
            self._prepared[how] = preprocess(self.X, how)
        return self._prepared[how]

    def per_prompt(self, how) -> PerPromptStats:
        """Per-prompt sts, rtr, TDMI of the (preprocessed) series [prompts, pairs], computed once."""
        if how not in self._per_prompt:
            self._per_prompt[how] = per_prompt_stats(self.prepared(how), self.tau, self.redundancy, self.backend,
                                                     progress=self.progress)
        return self._per_prompt[how]

    def full(self, source) -> PairStats:
        mode, how = source
        if source not in self._full:
            if how is None and mode in self.files:
                f = self.files[mode]
                self._full[source] = PairStats.from_atoms(f, f["degenerate"])
            else:
                self._full[source] = self.half(source, np.arange(self.X.shape[0]))
        return self._full[source]

    def half(self, source, prompts) -> PairStats:
        """PhiID of a prompt subset: the mean of per-prompt values (per_prompt mode), or the mode computed on
        the subset's prompts (concat, pooled)."""
        mode, how = source
        prompts = np.asarray(prompts)
        if mode == "per_prompt":
            return self.per_prompt(how).mean(prompts)
        return phiid_pair_stats(self.prepared(how)[prompts], mode, self.tau, self.redundancy, self.backend)

    def scores(self, stats_of=None, autocorr=None) -> dict[str, VariantScore]:
        """Scores of every selected variant; stats_of(source) -> PairStats (default: full data)."""
        stats_of = stats_of or self.full
        autocorr = self.autocorr() if autocorr is None else autocorr
        cache = {}
        out = {}
        for name in self.variants:
            src = VARIANTS[name].source
            if src not in cache:
                cache[src] = stats_of(src)
            out[name] = variant_score(name, cache[src], self.head_layer, self.n_layers, autocorr, self.labels)
        return out


def check_file_matches(ph: dict, computed: PairStats, rtol=1e-6, atol=1e-8) -> None:
    """A phiid_<mode>.npz must equal the PhiID recomputed from the activations (same mode)."""
    f = PairStats.from_atoms(ph, ph["degenerate"])
    name = Path(ph.get("path", "phiid.npz")).name
    fix = (f"{name} and the activations come from different runs (or another tau / redundancy): rerun "
           f"02_phiid on this run (python -m lib.run --params <run>.yaml --only 02_phiid --force)")
    if not np.array_equal(f.valid, computed.valid):
        raise ArtifactError(f"{name} marks {int((~f.valid).sum())} degenerate pairs but the activations give "
                            f"{int((~computed.valid).sum())}: {fix}")
    for atom in ("sts", "rtr"):
        a, b = getattr(f, atom)[f.valid], getattr(computed, atom)[f.valid]
        if not np.allclose(a, b, rtol=rtol, atol=atol):
            raise ArtifactError(f"{name}: atom {atom} differs from the PhiID recomputed from the activations "
                                f"(max |diff| {np.max(np.abs(a - b)):.3g} nats): {fix}")


def load_inputs(out_dir, variants=DEFAULT_VARIANTS, tag: str = "", tau: int = 1, redundancy: str = "MMI",
                backend: str = "numpy", progress: bool = False, verify: bool = True) -> RankingInputs:
    """Activations and PhiID files of a run (or of a baseline `tag`), checked, for the chosen variants.

    Fails before any score is computed when a variant needs a phiid_<mode>.npz that notebook 02 did not
    write, when the files come from different runs (head count, head map, model; with verify=True (MMI) each
    file is also compared with the PhiID recomputed from the activations), or when tau / redundancy differ
    from those of the files."""
    variants = check_variants(variants)
    acts = dg.load_activations(out_dir, tag)
    files = {}
    for mode in sorted({VARIANTS[v].mode for v in variants if VARIANTS[v].preprocess is None}):
        users = [v for v in variants if VARIANTS[v].mode == mode and VARIANTS[v].preprocess is None]
        atoms = tuple(_atom_names()) if mode == "per_prompt" else ("sts", "rtr")
        if mode == "per_prompt" and not NEEDS_TDMI & set(users):
            atoms = ("sts", "rtr")
        ph = load_phiid(out_dir, mode, tag, activations=acts, atoms=atoms,
                        needed_by=f"ranking variant(s) {', '.join(users)}")
        for key, want in (("tau", tau), ("redundancy", redundancy)):
            got = artifacts.scalar(ph, key)
            if got is not None and str(got) != str(want):
                raise ArtifactError(f"{ph['path'].name} was computed with {key}={got!r} but this notebook has "
                                    f"{key}={want!r}: set {key}: {got!r} in its parameters (or rerun 02_phiid "
                                    f"with {key}={want!r})")
        files[mode] = ph
    inputs = RankingInputs(X=np.asarray(acts["activations"], dtype=np.float64), head_layer=acts["head_layer"],
                           head_index=acts["head_index"], n_layers=acts["n_layers"], n_heads=acts["n_heads"],
                           variants=variants, tau=tau, redundancy=redundancy, backend=backend, files=files,
                           progress=progress)
    if verify and redundancy == "MMI":
        for mode, ph in files.items():
            computed = inputs.per_prompt(None).mean() if mode == "per_prompt" else mmi_pair_means(inputs.X, mode, tau)
            check_file_matches(ph, computed)
    return inputs


# ------------------------------------------------------------------------------------------- is it signal?

def split_half_reliability(inputs: RankingInputs, n_splits: int = 20, seed=0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Spearman between the head scores of two random prompt halves, per variant and split.
    -> (summary [variant, r_mean, r_sd, spearman_brown, n_splits, prompts_per_half], per-split values)."""
    halves = dg.random_halves(inputs.X.shape[0], n_splits, seed)
    rows = []
    for k, (a, b) in enumerate(_progress(halves, inputs.progress, "split halves")):
        sa = inputs.scores(lambda src: inputs.half(src, a), inputs.autocorr(a))
        sb = inputs.scores(lambda src: inputs.half(src, b), inputs.autocorr(b))
        for name in inputs.variants:
            rows.append({"variant": name, "split": k, "spearman": dg.correlation(sa[name].score, sb[name].score)["spearman"]})
    per_split = pd.DataFrame(rows)
    g = per_split.groupby("variant", sort=False)["spearman"]
    summary = pd.DataFrame({"variant": list(inputs.variants)})
    summary["r_mean"] = summary["variant"].map(g.mean())
    summary["r_sd"] = summary["variant"].map(g.std(ddof=1))
    summary["spearman_brown"] = dg.spearman_brown(summary["r_mean"].to_numpy())
    summary["n_splits"] = n_splits
    summary["prompts_per_half"] = inputs.X.shape[0] // 2
    return summary, per_split


def _progress(it, on, desc):
    if not on:
        return it
    from tqdm.auto import tqdm
    return tqdm(it, desc=desc)


def _signature(inputs: RankingInputs, seed) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(inputs.X).tobytes())
    h.update(repr((inputs.variants, inputs.tau, inputs.redundancy, seed)).encode())
    return h.hexdigest()[:16]


def surrogate_scores(inputs: RankingInputs, n_surrogates: int = 100, seed=0, checkpoint=None,
                     checkpoint_every: int = 10, n_jobs: int = 1, out_dir=None) -> dict[str, np.ndarray]:
    """Circular-shift surrogates: -> variant -> [n_surrogates, heads] scores.

    Surrogate k shifts every (prompt, head) series by its own random offset (seeded by (seed, k), so a resumed
    or parallel run gives the same numbers), after the variant's preprocessing (offset = floor(u * length) with
    one u per prompt and head, shared by every preprocessing), and recomputes PhiID for every source the
    variants need. checkpoint: an .npz path (default with out_dir: the run's lib.storage.artifacts "ranking_surrogates"
    file); finished surrogates are saved there every `checkpoint_every` and reused by a rerun with the same data
    and settings. n_jobs > 1: surrogates run in that many forked processes (Linux; falls back to 1 elsewhere)."""
    names = inputs.variants
    H = len(inputs.head_layer)
    sig = _signature(inputs, seed)
    results = {n: [] for n in names}
    if checkpoint is None and out_dir is not None:
        checkpoint = artifacts.path("ranking_surrogates", out_dir)
    if checkpoint and Path(checkpoint).exists():
        ck = artifacts.load_file("ranking_surrogates", checkpoint, require=[])
        if str(ck.get("signature")) == sig and all(n in ck for n in names):
            results = {n: list(ck[n][:n_surrogates]) for n in names}
    start = len(results[names[0]])
    children = np.random.SeedSequence(int(seed)).spawn(n_surrogates)
    prepared = {how: inputs.prepared(how) for _, how in inputs.sources}
    todo = list(range(start, n_surrogates))

    def save(done):
        if checkpoint and (done % checkpoint_every == 0 or done == n_surrogates):
            artifacts.save_file("ranking_surrogates", checkpoint,
                                {"signature": sig, **{n: np.array(results[n]).reshape(-1, H) for n in names}})

    for k, sc in _map_surrogates(inputs, prepared, [children[k] for k in todo], n_jobs, todo):
        for n in names:
            results[n].append(sc[n])
        save(k + 1)
    return {n: np.array(results[n]).reshape(-1, H) for n in names}


def _one_surrogate(inputs: RankingInputs, prepared: dict, child) -> dict[str, np.ndarray]:
    fractions = np.random.default_rng(child).random(size=inputs.X.shape[:2])
    shifted = {how: _shift(Y, fractions) for how, Y in prepared.items()}
    raw = shifted[None] if None in shifted else _shift(inputs.X, fractions)
    ac = dg.head_autocorrelation(raw)
    stats_ = source_stats(shifted, inputs.sources, inputs.tau, inputs.redundancy, inputs.backend)
    sc = inputs.scores(stats_.__getitem__, ac)
    return {n: v.score for n, v in sc.items()}


_FORKED = {}


def _forked_surrogate(child):
    from threadpoolctl import threadpool_limits
    with threadpool_limits(limits=1, user_api="blas"):
        return _one_surrogate(_FORKED["inputs"], _FORKED["prepared"], child)


def _map_surrogates(inputs, prepared, children, n_jobs, indices):
    """Yield (index, scores) in index order, sequentially or from a pool of forked processes."""
    import multiprocessing as mp
    it = _progress(range(len(children)), inputs.progress, "surrogates")
    if n_jobs <= 1 or len(children) < 2 or "fork" not in mp.get_all_start_methods():
        for n in it:
            yield indices[n], _one_surrogate(inputs, prepared, children[n])
        return
    from concurrent.futures import ProcessPoolExecutor
    _FORKED.update(inputs=inputs, prepared=prepared)
    try:
        with ProcessPoolExecutor(max_workers=int(n_jobs), mp_context=mp.get_context("fork")) as pool:
            results = pool.map(_forked_surrogate, children, chunksize=1)
            for n, sc in zip(it, results):
                yield indices[n], sc
    finally:
        _FORKED.clear()


def _shift(Y, fractions):
    """Circular shift of every [prompt, head] series by floor(fraction * steps) (uniform offsets for any
    series length, so detrended and differenced series get matching offsets)."""
    return dg.shift_series(Y, np.floor(fractions * Y.shape[2]).astype(np.int64))


def null_tables(scores: dict[str, VariantScore], null: dict[str, np.ndarray], head_layer, n_layers) -> pd.DataFrame:
    """Per variant and layer: observed layer mean, null mean / sd / 95% band, z-score."""
    frames = []
    for name, s in scores.items():
        prof = dg.layer_means(null[name], head_layer, n_layers) if len(null[name]) else np.empty((0, n_layers))
        t = dg.null_band(prof, s.layer_mean)
        t.insert(0, "variant", name)
        frames.append(t)
    return pd.concat(frames, ignore_index=True)


def inverted_u_table(scores: dict[str, VariantScore], head_layer, n_layers, n_boot=1000, seed=0,
                     null: dict | None = None) -> pd.DataFrame:
    """lib.experiments.diagnostics.inverted_u_test of every variant's head scores. With `null` (surrogate_scores) the test
    runs on the excess over the null instead: score - the head's mean surrogate score, i.e. only what the
    timing between heads adds to what each head's own values and circular autocorrelation already give (a shift
    does not keep a trend: see lib.experiments.diagnostics.shift_keeping_trend)."""
    rows = []
    for name, s in scores.items():
        values = s.score if null is None else s.score - np.asarray(null[name]).mean(0)
        rows.append({"variant": name, **dg.inverted_u_test(values, head_layer, n_layers, n_boot, seed).as_row()})
    return pd.DataFrame(rows)


def signal_summary(reliability: pd.DataFrame, verdicts: pd.DataFrame, verdicts_beyond_null: pd.DataFrame | None,
                   null_table: pd.DataFrame | None) -> pd.DataFrame:
    """One row per variant: split-half reliability, inverted-U verdict of the profile, verdict of the excess
    over the surrogate null, and how far the profile leaves the null band (layers with |z| > 3)."""
    out = reliability[["variant", "r_mean", "r_sd", "spearman_brown"]].merge(
        verdicts[["variant", "verdict", "peak_depth"]], on="variant", how="outer")
    if verdicts_beyond_null is not None:
        out = out.merge(verdicts_beyond_null[["variant", "verdict", "mid_minus_early", "mid_minus_late"]].rename(
            columns={"verdict": "verdict_beyond_null", "mid_minus_early": "beyond_null_mid_minus_early",
                     "mid_minus_late": "beyond_null_mid_minus_late"}), on="variant", how="left")
    if null_table is not None:
        g = null_table.groupby("variant", sort=False)["z"]
        out["layers_abs_z_gt_3"] = out["variant"].map(g.apply(lambda z: int((np.abs(z) > 3).sum())))
        out["max_abs_z"] = out["variant"].map(g.apply(lambda z: float(np.nanmax(np.abs(z))) if np.isfinite(z).any()
                                                      else np.nan))
    return out


def agreement(scores: dict[str, VariantScore]) -> pd.DataFrame:
    """Spearman correlation between the head scores of every two variants."""
    names = list(scores)
    M = np.array([[dg.correlation(scores[a].score, scores[b].score)["spearman"] for b in names] for a in names])
    return pd.DataFrame(M, index=names, columns=names)


def rankings_frame(inputs: RankingInputs, scores: dict[str, VariantScore]) -> pd.DataFrame:
    """rankings.csv: head_idx, layer, head, one score column per variant in [0, 1] (higher = more
    synergistic), and syn / red = per-head mean sts / rtr of the per-prompt PhiID (nats)."""
    df = pd.DataFrame({"head_idx": np.arange(len(inputs.head_layer)), "layer": inputs.head_layer,
                       "head": inputs.head_index})
    for name, s in scores.items():
        df[name] = s.score
    base = inputs.full(("per_prompt", None))
    df["syn"] = dg.per_head_mean_pairs(base.sts, base.valid, base.n_heads, inputs.labels)
    df["red"] = dg.per_head_mean_pairs(base.rtr, base.valid, base.n_heads, inputs.labels)
    return df


def profiles_frame(scores: dict[str, VariantScore], n_layers: int, tag: str = "trained") -> pd.DataFrame:
    depth = dg.normalized_depth(n_layers)
    return pd.DataFrame([{"tag": tag, "variant": n, "layer": l, "depth": depth[l], "mean": s.layer_mean[l]}
                         for n, s in scores.items() for l in range(n_layers)])


def baseline_profiles(out_dir, variants=DEFAULT_VARIANTS, tau=1, redundancy="MMI", n_boot=1000, seed=0,
                      backend="numpy"):
    """Layer profiles and inverted-U verdicts of every baseline tag in out_dir (random_init, rev-<rev>),
    for the variants whose inputs the tag has. -> (profiles DataFrame, verdicts DataFrame, skipped
    [(tag, reason)])."""
    profiles, verdicts, skipped = [], [], []
    for tag in dg.available_tags(out_dir):
        usable = []
        for v in check_variants(variants):
            var = VARIANTS[v]
            needed = artifacts.path("phiid", out_dir, tag, mode=var.mode)
            if var.preprocess is None and not needed.exists():
                skipped.append((tag, f"variant {v} skipped: no {needed.name} (02_phiid modes)"))
            else:
                usable.append(v)
        if not usable:
            continue
        try:
            inp = load_inputs(out_dir, usable, tag=tag, tau=tau, redundancy=redundancy, backend=backend)
            sc = inp.scores()
        except (ValueError, ArtifactError) as e:
            skipped.append((tag, f"skipped entirely: {e}"))
            continue
        profiles.append(profiles_frame(sc, inp.n_layers, tag))
        t = inverted_u_table(sc, inp.head_layer, inp.n_layers, n_boot, seed)
        t.insert(0, "tag", tag)
        verdicts.append(t)
    cat = lambda fs: pd.concat(fs, ignore_index=True) if fs else pd.DataFrame()  # noqa: E731
    return cat(profiles), cat(verdicts), skipped


ORACLE = "oracle"             # rankings.csv column of the oracle (lib.experiments.oracle), when oracle.npz exists


def oracle_score(out_dir, inputs: RankingInputs) -> np.ndarray | None:
    """[heads] the oracle's score min-maxed to [0, 1] (higher = more important), or None when the run has no
    oracle.npz (notebook 01 ran with oracle: false). Checked against the run's head map and extraction."""
    from lib.experiments.oracle import load_oracle
    key = artifacts.load("activations", out_dir, keys=["extraction_key"]).get("extraction_key")
    d = load_oracle(out_dir, inputs.head_layer, inputs.head_index, None if key is None else str(key))
    return None if d is None else minmax(d["score"])


def oracle_agreement(scores: dict[str, VariantScore], oracle: np.ndarray | None) -> pd.DataFrame:
    """Spearman and Pearson correlation of each variant's head scores with the oracle's (empty without oracle)."""
    if oracle is None:
        return pd.DataFrame(columns=["variant", "spearman", "pearson"])
    return pd.DataFrame([{"variant": n, **{k: dg.correlation(s.score, oracle)[k] for k in ("spearman", "pearson")}}
                         for n, s in scores.items()])


def save_rankings(out_dir, inputs: RankingInputs, scores: dict, reliability=None, verdicts=None, null_table=None,
                  agreement_matrix=None, params: dict | None = None, seconds: float | None = None,
                  verdicts_beyond_null=None, oracle: np.ndarray | None = None) -> pd.DataFrame:
    """Write rankings.csv (see rankings_frame; plus the `oracle` column when `oracle` [heads] is given, see
    oracle_score) and ranking_summary.json (reliability, inverted-U verdicts, null z-scores, agreement), and a
    manifest entry for notebook 04. Returns the rankings frame."""
    from lib.storage.store import update_manifest
    df = rankings_frame(inputs, scores)
    if oracle is not None:
        if len(oracle) != len(df):
            raise ValueError(f"oracle has {len(oracle)} scores but the run has {len(df)} heads")
        df.insert(3 + len(scores), ORACLE, np.asarray(oracle, dtype=np.float64))
    summary = {"variants": list(scores), "n_prompts": int(inputs.X.shape[0]), "n_heads": int(inputs.X.shape[1]),
               "tau": inputs.tau, "redundancy": inputs.redundancy, "descriptions":
               {n: VARIANTS[n].description for n in scores},
               "layer_profiles": {n: s.layer_mean.tolist() for n, s in scores.items()},
               "oracle": oracle is not None}
    for key, frame in (("reliability", reliability), ("inverted_u", verdicts),
                       ("inverted_u_beyond_null", verdicts_beyond_null)):
        if frame is not None:
            summary[key] = frame.to_dict(orient="records")
    if null_table is not None:
        summary["null_z"] = {n: g["z"].tolist() for n, g in null_table.groupby("variant", sort=False)}
    if agreement_matrix is not None:
        summary["agreement"] = agreement_matrix.to_dict()
    files = [artifacts.save("rankings", out_dir, df).name, artifacts.save("ranking_summary", out_dir, summary).name]
    update_manifest(out_dir, "04_ranking_variants", {**(params or {}), "files": files,
                                                     **({"seconds": round(seconds, 3)} if seconds is not None else {})})
    return df
