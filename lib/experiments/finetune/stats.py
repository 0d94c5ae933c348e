"""Effect sizes and tests between fine-tuning conditions, as the paper reports them (Hedges' g, permutation test),
the analytic CI of g (Hedges & Olkin variance), a paired bootstrap over test problems for runs with one seed per
condition, and an equivalence test (TOST) for the SFT control's "no difference"."""
from __future__ import annotations

from itertools import combinations
from math import comb

import numpy as np

__all__ = ["hedges_g", "permutation_null", "permutation_p", "paired_bootstrap", "hedges_g_ci", "tost_paired",
           "equivalence_verdict"]


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


Z95 = 1.959963984540054                 # the 97.5th percentile of the standard normal


def hedges_g_se(g: float, na: int, nb: int) -> float:
    """Large-sample standard error of Hedges' g (Hedges & Olkin 1985, eq. 5.15):
    sqrt((na + nb) / (na nb) + g^2 / (2 (na + nb))). NaN when g is NaN."""
    return float(np.sqrt((na + nb) / (na * nb) + g ** 2 / (2 * (na + nb))))


def hedges_g_ci(a, b) -> dict:
    """Hedges' g of a vs b with its analytic 95% CI g +- 1.96 se (Hedges & Olkin variance; no bootstrap, which is
    meaningless with 2-3 values per group). -> {"g", "se", "ci95": [lo, hi], "n_a", "n_b"}; NaN when g is NaN."""
    na, nb = len(a), len(b)
    g = hedges_g(a, b)
    se = hedges_g_se(g, na, nb) if na and nb else float("nan")
    return {"g": g, "se": se, "ci95": [g - Z95 * se, g + Z95 * se], "n_a": na, "n_b": nb}


def tost_paired(diff, margin: float) -> dict:
    """Equivalence of a paired mean difference with 0 within +-margin: two one-sided one-sample t-tests
    (H0 mean <= -margin, H0 mean >= +margin) on diff [units]; p = the larger of the two. Also the mean, its 90% CI
    (the TOST's own interval: equivalence at 5% <=> it lies inside +-margin) and its 95% t CI.
    All differences equal (se 0): p is 0 when that value lies strictly inside the margin, else 1."""
    from scipy import stats
    d = np.asarray(diff, float)
    n, mean = len(d), float(np.mean(d))
    if n < 2:
        raise ValueError(f"the equivalence test needs at least 2 paired differences; got {n}")
    se = float(np.std(d, ddof=1) / np.sqrt(n))
    if se == 0:
        p_low = p_high = 0.0 if abs(mean) < margin else 1.0
    else:
        p_low = float(stats.t.sf((mean + margin) / se, n - 1))
        p_high = float(stats.t.cdf((mean - margin) / se, n - 1))
    t90, t95 = stats.t.ppf(0.95, n - 1), stats.t.ppf(0.975, n - 1)
    return {"mean": mean, "se": se, "n": n, "margin": float(margin), "p_lower": p_low, "p_upper": p_high,
            "p": max(p_low, p_high), "ci90": [mean - t90 * se, mean + t90 * se],
            "ci95": [mean - t95 * se, mean + t95 * se]}


def equivalence_verdict(test: dict, alpha: float = 0.05) -> str:
    """'consistent with no difference' (TOST p < alpha: the difference lies within the margin), else
    'inconsistent with no difference' (the 95% CI excludes 0), else 'inconclusive'."""
    if test["p"] < alpha:
        return "consistent with no difference"
    lo, hi = test["ci95"]
    return "inconsistent with no difference" if lo > 0 or hi < 0 else "inconclusive"
