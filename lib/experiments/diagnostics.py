"""Is the PhiID head ranking measuring integration, or each head's own autocorrelation? Diagnostics.

The paper ranks heads by rank(synergy) - rank(redundancy), with synergy = the `sts` atom and redundancy = the
`rtr` atom, each averaged over all pairs a head takes part in. That ranking is informative only if synergy
and redundancy carry different information. This module measures what they share:

* per-head synergy and redundancy: the mean of `sts` (resp. `rtr`) over every pair involving the head, as
  source or as target, degenerate pairs excluded (`per_head_mean`);
* their Pearson and Spearman correlation at head level and at pair level (`syn_red_correlations`);
* the time-delayed mutual information of each pair, TDMI = I(past_i, past_j; future_i, future_j) = the sum of
  the 16 atoms (`tdmi_matrix`), which both atoms scale with;
* each head's lag-1 autocorrelation (Pearson of x[:-lag] with x[lag:], per prompt, then the mean over
  prompts; `lag_autocorrelation`), which the TDMI tracks;
* each head's within-generation drift (`drift`): the least-squares slope of its norm over the generated steps
  times (steps - 1), divided by its mean norm, per prompt, then the mean over prompts. -0.4 means the
  fitted line falls by 40% of the head's mean level from the first to the last step;
* per-layer profiles (`layer_profile`) on normalised depth (layer / (n_layers - 1)).

It also holds the generic statistics used to decide whether a ranking is signal at all (used by
lib.experiments.ranking): Spearman-Brown (`spearman_brown`), random prompt halves (`random_halves`), circular-shift
surrogates (`circular_shift`), and the inverted-U test on a per-layer profile (`inverted_u_test`), and the
loader of the activations (`load_activations`; PhiID files are read by lib.estimators.phiid's `load_phiid`, re-exported here).

Units: atoms and TDMI in nats; autocorrelation and correlations dimensionless; drift a fraction.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from lib.storage import artifacts
from lib.storage.artifacts import check_same_run  # noqa: F401  (re-exported: activations vs PhiID of one run)
from lib.estimators.phiid import load_phiid  # noqa: F401  (re-exported: the one PhiID reader)
from lib.storage.store import ArtifactError, check_same_heads

__all__ = ["DegenerateHeadError", "load_activations", "available_tags", "head_labels", "per_head_mean", "pair_index",
           "upper", "per_head_mean_pairs", "tdmi_matrix", "correlation", "bootstrap_correlation",
           "pair_bootstrap_correlation", "correlation_ci_table", "syn_red_correlations", "lag_autocorrelation",
           "circular_autocorrelation", "head_autocorrelation", "drift", "linear_detrend", "first_difference",
           "shift_series", "shift_keeping_trend", "circular_shift", "normalized_depth", "layer_means",
           "layer_profile", "heads_grid", "spearman_brown", "random_halves", "null_band", "inverted_u_test",
           "diagnose", "run_diagnostics", "summary_table"]

SYNERGY_ATOM = "sts"
REDUNDANCY_ATOM = "rtr"
PHIID_MODES = ("per_prompt", "concat", "pooled")

# inverted-U rule: depth thirds [0, 1/3), [1/3, 2/3], (2/3, 1]
THIRDS = (1.0 / 3.0, 2.0 / 3.0)
_EPS = 1e-9


class DegenerateHeadError(ValueError):
    """Every pair involving some head is degenerate, so the head has no synergy or redundancy."""


# ------------------------------------------------------------------------------------------- artifacts

def load_activations(out_dir, tag: str = "") -> dict:
    """The activations file of the run's model (tag "") or of a baseline tag, as a dict, checked: activations
    [prompts, heads, steps] and the head map; n_layers / n_heads filled in from the head map when not recorded."""
    acts = artifacts.load("activations", out_dir, tag, require=["activations", "head_layer", "head_index"])
    path = artifacts.path("activations", out_dir, tag)
    check_same_heads(f"{path.name} activations", acts["activations"].shape[1], f"{path.name} head_layer",
                     len(acts["head_layer"]))
    acts["n_layers"] = int(acts["n_layers"]) if "n_layers" in acts else int(acts["head_layer"].max()) + 1
    acts["n_heads"] = int(acts["n_heads"]) if "n_heads" in acts else int(acts["head_index"].max()) + 1
    acts["path"] = path
    return acts


def available_tags(out_dir) -> list[str]:
    """Baseline tags with an activations file in out_dir: random_init first, then checkpoints in training order
    (the number in the revision, e.g. rev-step1000), then anything else (lib.storage.artifacts.tag_sort_key)."""
    return [tag for tag in artifacts.tags("activations", out_dir) if tag]


# ------------------------------------------------------------------------------------------- per head / pair

def head_labels(head_layer, head_index) -> list[str]:
    return [f"L{int(l)}H{int(h)}" for l, h in zip(head_layer, head_index)]


def _raise_degenerate_heads(bad, labels, what):
    names = [labels[k] if labels is not None else str(k) for k in np.flatnonzero(bad)]
    raise DegenerateHeadError(
        f"all pairs involving head(s) {', '.join(names[:10])}{' ...' if len(names) > 10 else ''} are degenerate "
        f"({what}): the head's series is constant, non-finite, or a copy of another head's in every prompt, so "
        f"it has no synergy or redundancy. Inspect activations[:, head, :] (notebook 01); such a head cannot be "
        f"ranked")


def per_head_mean(M, degenerate=None, labels=None) -> np.ndarray:
    """[heads, heads] pair matrix (entry [i, j]: i source, j target) -> [heads]: for head h the mean of
    M[h, j] and M[j, h] over all j != h whose pair is not degenerate (NaN entries count as degenerate).
    Raises DegenerateHeadError when a head has no usable pair."""
    M = np.asarray(M, dtype=np.float64)
    n = M.shape[0]
    if M.shape != (n, n):
        raise ValueError(f"expected a square [heads, heads] matrix, got shape {M.shape}")
    ok = np.isfinite(M) & ~np.eye(n, dtype=bool)
    if degenerate is not None:
        ok &= ~np.asarray(degenerate, dtype=bool)
    V = np.where(ok, M, 0.0)
    counts = ok.sum(0) + ok.sum(1)
    if (counts == 0).any():
        _raise_degenerate_heads(counts == 0, labels, "pair matrix")
    return (V.sum(0) + V.sum(1)) / counts


def pair_index(n_heads: int) -> tuple[np.ndarray, np.ndarray]:
    """Unordered pairs i < j (row-major upper triangle)."""
    return np.triu_indices(n_heads, 1)


def upper(M) -> np.ndarray:
    """[heads, heads] -> [pairs] values of the unordered pairs i < j."""
    M = np.asarray(M)
    return M[pair_index(M.shape[0])]


def per_head_mean_pairs(values, valid, n_heads: int, labels=None) -> np.ndarray:
    """Symmetric pair values [pairs] (order of pair_index) -> per-head mean over valid pairs [heads].
    Same as per_head_mean on the symmetric matrix (for a symmetric atom, source and target entries agree)."""
    i, j = pair_index(n_heads)
    ok = np.asarray(valid, bool) & np.isfinite(values)
    w = np.where(ok, values, 0.0)
    sums = np.bincount(i, w, n_heads) + np.bincount(j, w, n_heads)
    counts = np.bincount(i, ok, n_heads) + np.bincount(j, ok, n_heads)
    if (counts == 0).any():
        _raise_degenerate_heads(counts == 0, labels, "pair vectors")
    return sums / counts


def tdmi_matrix(atoms) -> np.ndarray:
    """Sum of the 16 atoms = mean I(x, y; a, b), the time-delayed mutual information of each pair (nats)."""
    from lib.estimators.phiid import ATOM_NAMES
    missing = [a for a in ATOM_NAMES if a not in atoms]
    if missing:
        raise ArtifactError(f"TDMI needs all 16 atoms; missing {missing}. Rerun 02_phiid with all atoms")
    return sum(np.asarray(atoms[a], dtype=np.float64) for a in ATOM_NAMES)


def correlation(a, b) -> dict:
    """Pearson and Spearman correlation over the entries where both are finite."""
    a, b = np.asarray(a, float).ravel(), np.asarray(b, float).ravel()
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return {"pearson": float("nan"), "spearman": float("nan"), "n": int(len(a))}
    return {"pearson": float(stats.pearsonr(a, b)[0]), "spearman": float(stats.spearmanr(a, b)[0]),
            "n": int(len(a))}


def _rows_pearson(a, b, w=None) -> np.ndarray:
    """Pearson r of every row pair of a, b [resamples, items] (optionally weighted by w [resamples, items])."""
    w = np.ones_like(a) if w is None else w
    sw = w.sum(1, keepdims=True)
    da, db = a - (w * a).sum(1, keepdims=True) / sw, b - (w * b).sum(1, keepdims=True) / sw
    with np.errstate(invalid="ignore", divide="ignore"):
        return (w * da * db).sum(1) / np.sqrt((w * da ** 2).sum(1) * (w * db ** 2).sum(1))


def _interval(r, level) -> list[float]:
    r = r[np.isfinite(r)]
    q = (1 - level) / 2
    return [float(np.quantile(r, q)), float(np.quantile(r, 1 - q))] if len(r) else [float("nan")] * 2


def bootstrap_correlation(a, b, n_boot: int = 1000, seed=0, level: float = 0.95) -> dict:
    """Pearson and Spearman r of a and b (entries where both are finite) with percentile bootstrap CIs, items
    (heads) resampled with replacement: keys pearson, pearson_ci, spearman, spearman_ci, n."""
    a, b = np.asarray(a, float).ravel(), np.asarray(b, float).ravel()
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    point = correlation(a, b)
    if point["n"] < 3 or not np.isfinite(point["pearson"]):
        return {**point, "pearson_ci": [float("nan")] * 2, "spearman_ci": [float("nan")] * 2}
    idx = np.random.default_rng(seed).integers(0, len(a), size=(n_boot, len(a)))
    ra, rb = stats.rankdata(a[idx], axis=1), stats.rankdata(b[idx], axis=1)
    return {**point, "pearson_ci": _interval(_rows_pearson(a[idx], b[idx]), level),
            "spearman_ci": _interval(_rows_pearson(ra, rb), level)}


def pair_bootstrap_correlation(i, j, a, b, n_heads: int, n_boot: int = 500, seed=0, level: float = 0.95) -> dict:
    """Pair-level correlation of a, b [pairs] (pairs (i, j) of heads) with a head-cluster bootstrap: heads are
    resampled with replacement and each pair weighted by the product of its heads' counts, so pairs that share a
    head are not treated as independent. The Spearman CI uses the full-data ranks (weighted Pearson of ranks).
    Memory n_heads^2 + n_boot x n_heads (_cluster_pearson), not n_boot x pairs."""
    i, j = np.asarray(i), np.asarray(j)
    a, b = np.asarray(a, float), np.asarray(b, float)
    point = correlation(a, b)
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(rng.integers(0, n_heads, n_heads), minlength=n_heads) for _ in range(n_boot)])
    ra, rb = stats.rankdata(a), stats.rankdata(b)
    return {**point, "pearson_ci": _interval(_cluster_pearson(counts, i, j, a, b, n_heads), level),
            "spearman_ci": _interval(_cluster_pearson(counts, i, j, ra, rb, n_heads), level)}


def _quadratic_sums(counts: np.ndarray, index: np.ndarray, values: np.ndarray, n_heads: int) -> np.ndarray:
    """sum_p counts[r, i_p] counts[r, j_p] values_p for every resample r -> [resamples]: the pair values summed into
    a [heads, heads] matrix M (flat index i * n_heads + j), then counts M counts^T row by row."""
    M = np.bincount(index, weights=values, minlength=n_heads * n_heads).reshape(n_heads, n_heads)
    return ((counts @ M) * counts).sum(1)


def _cluster_pearson(counts, i, j, a, b, n_heads: int) -> np.ndarray:
    """Pearson r of a, b [pairs] weighted by w_p = counts[r, i_p] counts[r, j_p], one per resample r (counts
    [resamples, heads]): (S_w S_ab - S_a S_b) / sqrt((S_w S_aa - S_a^2)(S_w S_bb - S_b^2)) with S_x = sum_p w_p x_p
    (_quadratic_sums), the same r as the centred weighted formula of _rows_pearson; a and b are centred on their
    plain means first, which leaves r unchanged and keeps the moments small."""
    counts, index = counts.astype(np.float64), i.astype(np.int64) * n_heads + j.astype(np.int64)
    a, b = a - a.mean(), b - b.mean()
    sw, sa, sb, saa, sbb, sab = (_quadratic_sums(counts, index, v, n_heads)
                                 for v in (np.ones_like(a), a, b, a * a, b * b, a * b))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sw * sab - sa * sb) / np.sqrt((sw * saa - sa ** 2) * (sw * sbb - sb ** 2))


HEAD_CORRELATIONS = (("synergy", "redundancy"), ("autocorr", "synergy"), ("autocorr", "redundancy"),
                     ("drift", "synergy"), ("tdmi", "synergy"), ("tdmi", "redundancy"), ("autocorr", "tdmi"))
PAIR_CORRELATIONS = (("sts", "rtr"), ("tdmi", "sts"), ("tdmi", "rtr"))


def correlation_ci_table(heads: pd.DataFrame, pairs: pd.DataFrame, n_boot: int = 1000, seed=0) -> pd.DataFrame:
    """Every correlation notebook 03 shows, with 95% bootstrap CIs: head level (heads resampled) and pair level
    (head-cluster bootstrap, see pair_bootstrap_correlation). One row per (level, x, y)."""
    rows = []
    for x, y in HEAD_CORRELATIONS:
        if x in heads and y in heads:
            rows.append({"level": "head", "x": x, "y": y,
                         **bootstrap_correlation(heads[x], heads[y], n_boot, seed)})
    for x, y in PAIR_CORRELATIONS:
        if x in pairs and y in pairs:
            rows.append({"level": "pair", "x": x, "y": y, **pair_bootstrap_correlation(
                pairs["i"], pairs["j"], pairs[x], pairs[y], len(heads), max(n_boot // 2, 1), seed)})
    out = pd.DataFrame(rows)
    for k in ("pearson", "spearman"):
        out[f"{k}_lo"], out[f"{k}_hi"] = out[f"{k}_ci"].str[0], out[f"{k}_ci"].str[1]
    return out.drop(columns=["pearson_ci", "spearman_ci"])


def syn_red_correlations(sts, rtr, degenerate=None, labels=None) -> dict:
    """Correlation of synergy and redundancy: at head level (per-head means) and at pair level (unordered
    pairs i < j, degenerate pairs excluded). Keys head_pearson, head_spearman, pair_pearson, pair_spearman,
    n_heads, n_pairs."""
    n = np.asarray(sts).shape[0]
    deg = np.zeros((n, n), bool) if degenerate is None else np.asarray(degenerate, bool)
    head = correlation(per_head_mean(sts, deg, labels), per_head_mean(rtr, deg, labels))
    ok = ~upper(deg)
    pair = correlation(upper(sts)[ok], upper(rtr)[ok])
    return {"head_pearson": head["pearson"], "head_spearman": head["spearman"], "n_heads": head["n"],
            "pair_pearson": pair["pearson"], "pair_spearman": pair["spearman"], "n_pairs": pair["n"]}


# ------------------------------------------------------------------------------------------- time series

def _check_X(X):
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 3:
        raise ValueError(f"activations must be [prompts, heads, steps]; got shape {X.shape}")
    return X


def lag_autocorrelation(X, lag: int = 1) -> np.ndarray:
    """[prompts, heads, steps] -> [prompts, heads]: Pearson correlation of x[:-lag] and x[lag:] (each piece
    centred and scaled by itself: the correlation PhiID sees between a head's past and future).
    NaN where a piece is constant."""
    X = _check_X(X)
    if not 1 <= lag <= X.shape[2] - 3:
        raise ValueError(f"lag must be in [1, steps - 3]; got {lag} for {X.shape[2]} steps")
    p, f = X[..., :-lag], X[..., lag:]
    p = p - p.mean(-1, keepdims=True)
    f = f - f.mean(-1, keepdims=True)
    den = np.sqrt((p * p).sum(-1) * (f * f).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (p * f).sum(-1) / np.where(den > 0, den, 1.0), np.nan)


def circular_autocorrelation(X, lag: int = 1) -> np.ndarray:
    """[prompts, heads, steps] -> [prompts, heads]: sum_t (x_t - m)(x_{(t+lag) mod T} - m) / sum_t (x_t - m)^2.
    Invariant under any circular shift of the series (the surrogate null keeps it exactly)."""
    X = _check_X(X)
    c = X - X.mean(-1, keepdims=True)
    den = (c * c).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (c * np.roll(c, -lag, axis=-1)).sum(-1) / np.where(den > 0, den, 1.0), np.nan)


def head_autocorrelation(X, lag: int = 1) -> np.ndarray:
    """Per-head lag autocorrelation: per prompt, then the mean over prompts where it is defined -> [heads]."""
    r = lag_autocorrelation(X, lag)
    ok = np.isfinite(r)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, r, 0.0).sum(0) / ok.sum(0)


def drift(X) -> np.ndarray:
    """[prompts, heads, steps] -> [prompts, heads]: least-squares slope of the norm over steps times
    (steps - 1), divided by the mean norm (fractional change of the fitted line across the generation)."""
    X = _check_X(X)
    T = X.shape[2]
    t = np.arange(T, dtype=np.float64) - (T - 1) / 2
    slope = (X * t).sum(-1) / (t * t).sum()
    mean = X.mean(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(np.abs(mean) > 0, slope * (T - 1) / np.where(mean != 0, mean, 1.0), np.nan)


def head_drift(X) -> np.ndarray:
    """Per-head drift: per prompt, then the mean over prompts where it is defined -> [heads]."""
    d = drift(X)
    ok = np.isfinite(d)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, d, 0.0).sum(0) / ok.sum(0)


def linear_detrend(X) -> np.ndarray:
    """Remove the least-squares line from every series (per prompt and head) -> same shape, float64."""
    X = _check_X(X)
    T = X.shape[2]
    t = np.arange(T, dtype=np.float64) - (T - 1) / 2
    slope = (X * t).sum(-1, keepdims=True) / (t * t).sum()
    return X - X.mean(-1, keepdims=True) - slope * t


def first_difference(X) -> np.ndarray:
    """x[t] - x[t-1] along steps -> [prompts, heads, steps - 1]."""
    return np.diff(_check_X(X), axis=-1)


def shift_series(X, offsets) -> np.ndarray:
    """Circularly shift series X[p, h] left by offsets[p, h] steps: out[p, h, t] = X[p, h, (t + offset) mod T]."""
    X = np.asarray(X)
    T = X.shape[2]
    idx = (np.arange(T)[None, None, :] + np.asarray(offsets)[:, :, None]) % T
    return np.take_along_axis(X, idx, axis=-1)


def shift_keeping_trend(X, offsets) -> np.ndarray:
    """Surrogate that keeps each series' least-squares line: line + the residuals shifted circularly by offsets
    [prompts, heads]. A drift shared by every head stays aligned (it counts as null, not as redundancy), the
    residuals' circular autocorrelation is kept, their timing between heads is broken."""
    X = np.asarray(X, np.float64)
    resid = linear_detrend(X)
    return X - resid + shift_series(resid, offsets)


def circular_shift(X, rng, return_offsets: bool = False):
    """Surrogate: shift each head's series within each prompt circularly by an independent uniform random
    offset in [0, steps). Keeps every series' values and its circular autocorrelation exactly; breaks the
    timing between heads. rng: numpy Generator or seed."""
    X = np.asarray(X)
    rng = np.random.default_rng(rng)
    offsets = rng.integers(0, X.shape[2], size=X.shape[:2])
    out = shift_series(X, offsets)
    return (out, offsets) if return_offsets else out


# ------------------------------------------------------------------------------------------- layers

def normalized_depth(n_layers: int) -> np.ndarray:
    """[n_layers]: layer / (n_layers - 1), 0 = first layer, 1 = last."""
    return np.arange(n_layers) / max(n_layers - 1, 1)


def layer_means(values, head_layer, n_layers: int) -> np.ndarray:
    """[..., heads] -> [..., n_layers]: mean over the heads of each layer (NaN-aware)."""
    values = np.asarray(values, dtype=np.float64)
    head_layer = np.asarray(head_layer)
    out = np.full(values.shape[:-1] + (n_layers,), np.nan)
    for layer in range(n_layers):
        sel = values[..., head_layer == layer]
        if sel.shape[-1]:
            with np.errstate(invalid="ignore"):
                out[..., layer] = np.nanmean(sel, axis=-1) if np.isfinite(sel).any() else np.nan
    return out


def layer_profile(values, head_layer, n_layers: int) -> pd.DataFrame:
    """Per-layer mean, sd, standard error and count of a per-head quantity, with normalised depth."""
    values = np.asarray(values, dtype=np.float64)
    head_layer = np.asarray(head_layer)
    rows = []
    for layer, depth in zip(range(n_layers), normalized_depth(n_layers)):
        v = values[(head_layer == layer) & np.isfinite(values)]
        sd = float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")
        rows.append({"layer": layer, "depth": float(depth), "mean": float(v.mean()) if len(v) else float("nan"),
                     "sd": sd, "sem": sd / np.sqrt(len(v)) if len(v) > 1 else float("nan"), "n": len(v)})
    return pd.DataFrame(rows)


def heads_grid(values, head_layer, head_index, n_layers: int, n_heads: int) -> np.ndarray:
    """[heads] -> [n_layers, n_heads] (NaN where a head is absent)."""
    grid = np.full((n_layers, n_heads), np.nan)
    grid[np.asarray(head_layer), np.asarray(head_index)] = values
    return grid


# ------------------------------------------------------------------------------------------- reliability

def spearman_brown(r, factor: float = 2.0):
    """Reliability of a measure `factor` times as long as one with reliability r: k r / (1 + (k - 1) r)."""
    r = np.asarray(r, dtype=np.float64)
    return factor * r / (1 + (factor - 1) * r)


def random_halves(n_items: int, n_splits: int, rng) -> list[tuple[np.ndarray, np.ndarray]]:
    """n_splits random splits of range(n_items) into two disjoint halves of n_items // 2 (sorted indices;
    with an odd count one item is left out of each split)."""
    if n_items < 2:
        raise ValueError(f"split halves need at least 2 prompts; got {n_items}")
    rng = np.random.default_rng(rng)
    half = n_items // 2
    out = []
    for _ in range(n_splits):
        perm = rng.permutation(n_items)
        out.append((np.sort(perm[:half]), np.sort(perm[half:2 * half])))
    return out


def null_band(null_profiles, observed, level: float = 0.95) -> pd.DataFrame:
    """null_profiles [surrogates, layers], observed [layers] -> per layer: null mean, sd, lower/upper
    quantiles of the central `level` band, z = (observed - null mean) / null sd."""
    null = np.asarray(null_profiles, dtype=np.float64)
    observed = np.asarray(observed, dtype=np.float64)
    a = (1 - level) / 2
    mean = null.mean(0) if len(null) else np.full(observed.shape, np.nan)
    sd = null.std(0, ddof=1) if len(null) > 1 else np.full(observed.shape, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (observed - mean) / sd
    lo = np.quantile(null, a, axis=0) if len(null) else mean
    hi = np.quantile(null, 1 - a, axis=0) if len(null) else mean
    n_layers = len(observed)
    return pd.DataFrame({"layer": np.arange(n_layers), "depth": normalized_depth(n_layers), "observed": observed,
                         "null_mean": mean, "null_sd": sd, "null_lo": lo, "null_hi": hi, "z": z})


# ------------------------------------------------------------------------------------------- inverted U

@dataclass
class InvertedU:
    """Shape of a per-layer profile against normalised depth (see inverted_u_test for the rule)."""
    quadratic: float
    linear: float
    peak_depth: float
    mid_minus_early: float
    mid_minus_late: float
    late_minus_early: float
    ci: dict
    verdict: str
    n_boot: int

    def as_row(self) -> dict:
        row = {"verdict": self.verdict, "quadratic": self.quadratic, "peak_depth": self.peak_depth,
               "mid_minus_early": self.mid_minus_early, "mid_minus_late": self.mid_minus_late,
               "late_minus_early": self.late_minus_early}
        for k, (lo, hi) in self.ci.items():
            row[f"{k}_lo"], row[f"{k}_hi"] = lo, hi
        return row


def _thirds(depth):
    early = depth < THIRDS[0] - _EPS
    late = depth > THIRDS[1] + _EPS
    return early, ~early & ~late, late


def _shape_stats(profile, depth):
    """profile [..., layers] -> quadratic coefficient, linear coefficient, vertex, thirds differences."""
    ok = np.isfinite(profile)
    if not ok.all():
        profile = np.where(ok, profile, np.nanmean(profile, axis=-1, keepdims=True))
    V = np.stack([np.ones_like(depth), depth, depth ** 2], 1)
    coef = np.linalg.lstsq(V, np.moveaxis(profile, -1, 0).reshape(len(depth), -1), rcond=None)[0]
    b, c = coef[1].reshape(profile.shape[:-1]), coef[2].reshape(profile.shape[:-1])
    with np.errstate(invalid="ignore", divide="ignore"):
        peak = np.where(c < 0, np.clip(-b / (2 * c), 0.0, 1.0), np.nan)
    early, mid, late = _thirds(depth)
    e, m, l = (profile[..., s].mean(-1) for s in (early, mid, late))
    return {"quadratic": c, "linear": b, "peak_depth": peak, "mid_minus_early": m - e, "mid_minus_late": m - l,
            "late_minus_early": l - e}


def _sign(lo, hi):
    return 1 if lo > 0 else (-1 if hi < 0 else 0)


def inverted_u_test(scores, head_layer, n_layers: int, n_boot: int = 1000, seed=0, level: float = 0.95) -> InvertedU:
    """Shape test of the per-layer mean of a per-head score against normalised depth d = layer / (L - 1).

    Statistics on the per-layer profile: quadratic coefficient c of a least-squares fit a + b d + c d^2,
    its peak (vertex -b / 2c, clipped to [0, 1]; NaN when c >= 0), and the differences between the mean
    profile over the middle third (1/3 <= d <= 2/3) and the early (d < 1/3) and late (d > 2/3) thirds.
    Confidence intervals: percentile bootstrap over heads, resampled with replacement within each layer.

    Verdict (in this order, "CI > 0" = the whole interval above 0):
      "inverted U"            mid - early CI > 0 and mid - late CI > 0
      "U shape"               mid - early CI < 0 and mid - late CI < 0
      "monotone increasing"   late - early CI > 0 (and not the above)
      "monotone decreasing"   late - early CI < 0
      "no depth trend"        otherwise (every difference compatible with 0)
    Needs at least 3 layers (one per third)."""
    scores = np.asarray(scores, dtype=np.float64)
    head_layer = np.asarray(head_layer)
    depth = normalized_depth(n_layers)
    if n_layers < 3:
        raise ValueError(f"the inverted-U test needs at least 3 layers (early, middle, late); got {n_layers}")
    obs = _shape_stats(layer_means(scores, head_layer, n_layers), depth)
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(head_layer == l) for l in range(n_layers)]
    boot = np.full((n_boot, n_layers), np.nan)
    for l, idx in enumerate(members):
        if len(idx):
            boot[:, l] = np.nanmean(scores[rng.choice(idx, size=(n_boot, len(idx)))], axis=1)
    bs = _shape_stats(boot, depth)
    a = (1 - level) / 2
    ci = {}
    for k, v in bs.items():
        if k == "linear":
            continue
        v = v[np.isfinite(v)]
        ci[k] = (float(np.quantile(v, a)), float(np.quantile(v, 1 - a))) if len(v) else (np.nan, np.nan)
    me, ml, le = (_sign(*ci[k]) for k in ("mid_minus_early", "mid_minus_late", "late_minus_early"))
    if me > 0 and ml > 0:
        verdict = "inverted U"
    elif me < 0 and ml < 0:
        verdict = "U shape"
    elif le > 0:
        verdict = "monotone increasing"
    elif le < 0:
        verdict = "monotone decreasing"
    else:
        verdict = "no depth trend"
    return InvertedU(quadratic=float(obs["quadratic"]), linear=float(obs["linear"]),
                     peak_depth=float(obs["peak_depth"]), mid_minus_early=float(obs["mid_minus_early"]),
                     mid_minus_late=float(obs["mid_minus_late"]), late_minus_early=float(obs["late_minus_early"]),
                     ci=ci, verdict=verdict, n_boot=n_boot)


# ------------------------------------------------------------------------------------------- one-call summary

@dataclass
class Diagnostics:
    """Everything notebook 03 shows. heads: per-head table; pairs: per-pair table (unordered pairs, valid
    only); summary: the numbers written to diagnostics.json."""
    heads: pd.DataFrame
    pairs: pd.DataFrame
    profiles: dict
    summary: dict
    sts: np.ndarray
    tdmi: np.ndarray | None


def diagnose(acts: dict, ph: dict, lag: int = 1) -> Diagnostics:
    """Per-head and per-pair diagnostics of one run (activations dict + PhiID dict of one mode)."""
    check_same_run(acts, ph)
    X = np.asarray(acts["activations"], dtype=np.float64)
    head_layer, head_index = np.asarray(acts["head_layer"]), np.asarray(acts["head_index"])
    n_layers, n_heads = int(acts["n_layers"]), int(acts["n_heads"])
    labels = head_labels(head_layer, head_index)
    deg = np.asarray(ph["degenerate"], bool)
    sts, rtr = np.asarray(ph[SYNERGY_ATOM], float), np.asarray(ph[REDUNDANCY_ATOM], float)
    try:
        tdmi = tdmi_matrix(ph)
    except ArtifactError:
        tdmi = None
    syn, red = per_head_mean(sts, deg, labels), per_head_mean(rtr, deg, labels)
    heads = pd.DataFrame({"head_idx": np.arange(len(head_layer)), "layer": head_layer, "head": head_index,
                          "depth": head_layer / max(n_layers - 1, 1), "synergy": syn, "redundancy": red,
                          "autocorr": head_autocorrelation(X, lag), "drift": head_drift(X),
                          "mean_norm": X.mean(axis=(0, 2))})
    ok = ~upper(deg)
    i, j = pair_index(len(head_layer))
    pairs = pd.DataFrame({"i": i[ok], "j": j[ok], "sts": upper(sts)[ok], "rtr": upper(rtr)[ok]})
    if tdmi is not None:
        heads["tdmi"] = per_head_mean(tdmi, deg, labels)
        pairs["tdmi"] = upper(tdmi)[ok]
    corr = syn_red_correlations(sts, rtr, deg, labels)
    summary = {
        "model": str(artifacts.scalar(acts, "model")) if "model" in acts else None,
        "n_prompts": int(X.shape[0]), "n_heads": int(X.shape[1]), "n_steps": int(X.shape[2]),
        "n_layers": n_layers, "heads_per_layer": n_heads, "lag": lag,
        "n_degenerate_pairs": int(upper(deg).sum()), "n_pairs": int(len(i)),
        "syn_red": corr,
        "autocorr_vs_synergy": correlation(heads["autocorr"], syn),
        "autocorr_vs_redundancy": correlation(heads["autocorr"], red),
        "drift_vs_synergy": correlation(heads["drift"], syn),
        "mean_autocorr": float(np.nanmean(heads["autocorr"])),
        "mean_drift": float(np.nanmean(heads["drift"])),
    }
    if tdmi is not None:
        summary["tdmi_vs_synergy"] = correlation(heads["tdmi"], syn)
        summary["tdmi_vs_redundancy"] = correlation(heads["tdmi"], red)
        summary["autocorr_vs_tdmi"] = correlation(heads["autocorr"], heads["tdmi"])
        summary["pair_tdmi_vs_sts"] = correlation(pairs["tdmi"], pairs["sts"])
        summary["pair_tdmi_vs_rtr"] = correlation(pairs["tdmi"], pairs["rtr"])
    cols = [c for c in ("synergy", "redundancy", "autocorr", "drift", "tdmi", "mean_norm") if c in heads]
    profiles = {c: layer_profile(heads[c].to_numpy(), head_layer, n_layers) for c in cols}
    summary["layer_profiles"] = {c: profiles[c]["mean"].tolist() for c in cols}
    summary["correlation_ci"] = correlation_ci_table(heads, pairs).to_dict(orient="records")
    return Diagnostics(heads=heads, pairs=pairs, profiles=profiles, summary=summary, sts=sts, tdmi=tdmi)


def correlation_table(out_dir, lag: int = 1) -> pd.DataFrame:
    """Syn-red correlations (head and pair level) and autocorrelation-synergy correlation for every PhiID
    file in out_dir: every mode, the run's model and each baseline tag. One row per (tag, mode)."""
    rows = []
    for tag in artifacts.tags("activations", out_dir):
        acts = load_activations(out_dir, tag)
        ac = head_autocorrelation(acts["activations"], lag)
        labels = head_labels(acts["head_layer"], acts["head_index"])
        for mode in PHIID_MODES:
            if not artifacts.path("phiid", out_dir, tag, mode=mode).exists():
                continue
            ph = load_phiid(out_dir, mode, tag, activations=acts, atoms=(SYNERGY_ATOM, REDUNDANCY_ATOM))
            try:
                c = syn_red_correlations(ph[SYNERGY_ATOM], ph[REDUNDANCY_ATOM], ph["degenerate"], labels)
                syn = per_head_mean(ph[SYNERGY_ATOM], ph["degenerate"], labels)
            except DegenerateHeadError as e:
                rows.append({"tag": tag or "(model)", "mode": mode, "error": str(e)})
                continue
            lo, hi = bootstrap_correlation(syn, per_head_mean(ph[REDUNDANCY_ATOM], ph["degenerate"], labels))[
                "spearman_ci"]
            rows.append({"tag": tag or "(model)", "mode": mode, "head_pearson": c["head_pearson"],
                         "head_spearman": c["head_spearman"], "head_spearman_lo": lo, "head_spearman_hi": hi,
                         "pair_pearson": c["pair_pearson"],
                         "pair_spearman": c["pair_spearman"],
                         "autocorr_vs_synergy_spearman": correlation(ac, syn)["spearman"]})
    return pd.DataFrame(rows)


def run_diagnostics(out_dir, mode: str = "per_prompt", lag: int = 1, tag: str = "") -> tuple[Diagnostics, pd.DataFrame]:
    """Notebook 03: diagnostics of one PhiID file plus the correlation table over every file of the run;
    writes diagnostics.json (diagnostics__<tag>.json for a baseline) and a manifest entry."""
    import time

    from lib.storage.store import update_manifest
    t0 = time.perf_counter()
    acts = load_activations(out_dir, tag)
    ph = load_phiid(out_dir, mode, tag, activations=acts, needed_by="03_phiid_diagnostics")
    d = diagnose(acts, ph, lag)
    table = correlation_table(out_dir, lag)
    d.summary.update(mode=mode, tag=tag, phiid_tau=artifacts.scalar(ph, "tau"),
                     phiid_redundancy=artifacts.scalar(ph, "redundancy"),
                     all_files=table.to_dict(orient="records"))
    d.summary["per_head"] = d.heads.to_dict(orient="list")
    name = artifacts.save("diagnostics", out_dir, d.summary, tag=tag).name
    update_manifest(out_dir, "03_phiid_diagnostics", {"mode": mode, "lag": lag, "tag": tag, "file": name,
                                                      "seconds": round(time.perf_counter() - t0, 3)})
    return d, table


def summary_table(summary: dict) -> pd.DataFrame:
    """The headline numbers of diagnostics.json as a two-column table."""
    s = summary
    rows = [
        ("syn-red Pearson r, head level", s["syn_red"]["head_pearson"]),
        ("syn-red Spearman ρ, head level", s["syn_red"]["head_spearman"]),
        ("syn-red Pearson r, pair level", s["syn_red"]["pair_pearson"]),
        ("syn-red Spearman ρ, pair level", s["syn_red"]["pair_spearman"]),
        ("lag-1 autocorrelation vs synergy, Pearson r", s["autocorr_vs_synergy"]["pearson"]),
        ("lag-1 autocorrelation vs synergy, Spearman ρ", s["autocorr_vs_synergy"]["spearman"]),
        ("lag-1 autocorrelation vs redundancy, Spearman ρ", s["autocorr_vs_redundancy"]["spearman"]),
        ("drift vs synergy, Spearman ρ", s["drift_vs_synergy"]["spearman"]),
        ("mean lag-1 autocorrelation over heads", s["mean_autocorr"]),
        ("mean drift over heads (fraction of mean norm)", s["mean_drift"]),
    ]
    if "tdmi_vs_synergy" in s:
        rows += [("TDMI vs synergy (head), Spearman ρ", s["tdmi_vs_synergy"]["spearman"]),
                 ("TDMI vs redundancy (head), Spearman ρ", s["tdmi_vs_redundancy"]["spearman"]),
                 ("autocorrelation vs TDMI (head), Spearman ρ", s["autocorr_vs_tdmi"]["spearman"])]
    rows += [("degenerate pairs", s["n_degenerate_pairs"]), ("pairs", s["n_pairs"])]
    return pd.DataFrame(rows, columns=["quantity", "value"])
