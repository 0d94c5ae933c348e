"""PhiID diagnostics per head and pair (notebook 03): the activations and PhiID files of a run, per-head
synergy and redundancy, their correlation with a bootstrap CI."""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from lib.storage import artifacts
from lib.storage.store import ArtifactError, check_same_heads
from lib.storage.notebooks import NB

__all__ = ["DegenerateHeadError", "load_activations", "available_tags", "head_labels", "per_head_mean", "pair_index",
           "upper", "per_head_mean_pairs", "tdmi_matrix", "correlation", "bootstrap_correlation",
           "pair_bootstrap_correlation", "correlation_ci_table", "syn_red_correlations"]


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
        raise ArtifactError(f"TDMI needs all 16 atoms; missing {missing}. Rerun {NB.PHIID} with all atoms")
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
