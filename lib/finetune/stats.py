"""Effect sizes and tests between fine-tuning conditions, as the paper reports them (Hedges' g, permutation test),
plus a paired bootstrap over test problems for runs with one seed per condition."""
from __future__ import annotations

from itertools import combinations
from math import comb

import numpy as np


def hedges_g(a, b) -> float:
    """Hedges' g of a vs b: (mean a - mean b) / pooled sd, times the small-sample correction 1 - 3 / (4(na+nb) - 9).
    NaN when either group has fewer than 2 values or the pooled sd is 0."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        return float("nan")
    pooled = np.sqrt(((na - 1) * a.var(ddof=1) + (nb - 1) * b.var(ddof=1)) / (na + nb - 2))
    if pooled == 0:
        return float("nan")
    return float((a.mean() - b.mean()) / pooled * (1 - 3 / (4 * (na + nb) - 9)))


def permutation_null(a, b, n_perm: int = 10000, seed: int = 0) -> np.ndarray:
    """Differences of means (a - b) over relabellings of the pooled values: every split when there are at most
    n_perm of them (exact), else n_perm seeded random splits."""
    pooled = np.concatenate([np.asarray(a, float), np.asarray(b, float)])
    na, n = len(a), len(pooled)
    if comb(n, na) <= n_perm:
        splits = [np.array(s) for s in combinations(range(n), na)]
    else:
        rng = np.random.default_rng(seed)
        splits = [rng.permutation(n)[:na] for _ in range(n_perm)]
    out = np.empty(len(splits))
    for k, idx in enumerate(splits):
        mask = np.zeros(n, bool)
        mask[idx] = True
        out[k] = pooled[mask].mean() - pooled[~mask].mean()
    return out


def permutation_p(a, b, n_perm: int = 10000, seed: int = 0, alternative: str = "greater") -> float:
    """p-value of mean(a) - mean(b) under the permutation null ('greater', 'less' or 'two-sided')."""
    observed = float(np.mean(a) - np.mean(b))
    null = permutation_null(a, b, n_perm, seed)
    tol = 1e-12 * max(1.0, abs(observed))
    if alternative == "greater":
        return float(np.mean(null >= observed - tol))
    if alternative == "less":
        return float(np.mean(null <= observed + tol))
    return float(np.mean(np.abs(null) >= abs(observed) - tol))


def paired_bootstrap(correct_a, correct_b, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Accuracy difference a - b on the same problems ([problems] of 0/1 each) and its 95% bootstrap CI."""
    a, b = np.asarray(correct_a, float), np.asarray(correct_b, float)
    diff = a - b
    rng = np.random.default_rng(seed)
    boots = diff[rng.integers(0, len(diff), size=(n_boot, len(diff)))].mean(axis=1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return float(diff.mean()), float(lo), float(hi)
