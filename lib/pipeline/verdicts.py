"""Verdicts a reviewer accepts: one table of rules, the paper's effect as the smallest effect of interest, the
minimum detectable effect at 80% power, and the equivalence test that rules an effect out.

Every claim of lib/pipeline/claims/ reduces to an `Evidence`: an estimate with its 95% CI, a null (a value n0 and the band
[n_lo, n_hi] of what the null gives: the null value itself when it has no spread), the claimed direction and the
paper's effect P in the same units. Turned so that the claimed direction is positive (x -> s * x with s = +1 for
"greater", -1 for "less"), with CI [lo, hi]:

  invalid        the design cannot answer (a floor or a ceiling, conditions that do not differ): reason given
  supported      lo > n_hi (beyond the null in the claimed direction) and the claim's extra condition holds
  opposite       hi < n_lo (beyond the null in the other direction): the reason says which way
  ruled out      hi < P and lo > n0 - (P - n0): two one-sided tests (TOST), each at alpha 0.025 through the 95% CI,
                 put the effect inside +-(P - n0) of the null; so the paper's effect is excluded. A claim that is
                 beyond the null but fails its extra condition (C1: r must also stay below 0.5) and excludes
                 the paper's effect is ruled out too.
  underpowered   otherwise: the CI spans the null and the paper's effect
  not tested     no input (the notebook did not run, failed, or its inputs are stale): decided by lib/pipeline/claims/

Minimum detectable effect (80% power, two-sided alpha 0.05): with se the estimate's standard error (given, or
(hi - lo) / (2 x 1.96) from the CI), the test detects a true effect m when m - 1.96 se > n_hi with probability
0.8, i.e. m = n_hi + (1.96 + 0.8416) se. `power()` reports m in the statistic's units, its distance from the null,
and whether the paper's effect is at least that large. tests/test_verdicts.py checks the 80% by simulation.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = ["VERDICTS", "VERDICT_TABLE", "Evidence", "decide", "power", "settle_factor", "tost",
           "Z_ALPHA", "Z_POWER"]

VERDICTS = ("supported", "opposite", "ruled out", "underpowered", "invalid", "not tested")
Z_ALPHA = float(stats.norm.ppf(0.975))     # 1.96: two-sided alpha 0.05
Z_POWER = float(stats.norm.ppf(0.80))      # 0.8416: 80% power

VERDICT_TABLE = {
    "supported": "95% CI beyond the null band in the claimed direction (lo > null band high), extra condition met",
    "opposite": "95% CI beyond the null band in the other direction (hi < null band low)",
    "ruled out": "not supported, and the 95% CI lies within +-(paper effect - null) of the null (two one-sided "
                 "tests at alpha 0.025 each): the paper's effect is excluded",
    "underpowered": "the 95% CI spans both the null and the paper's effect",
    "invalid": "the design cannot answer (floor, ceiling, or conditions that do not differ): the reason is given",
    "not tested": "no current input (the notebook did not run or failed, or its inputs changed since)",
}


@dataclass
class Evidence:
    """One claim's numbers. direction: "greater" or "less" (the paper's claim); paper_effect: the paper's value of
    the statistic (the smallest effect of interest); se: standard error of value (None: from the CI)."""
    value: float
    ci: tuple
    null_value: float
    null_band: tuple | None
    direction: str
    paper_effect: float | None
    se: float | None = None
    valid: bool = True
    invalid_reason: str = ""
    extra_ok: bool = True             # a claim's own extra condition for `supported` (C1 r < 0.5, C5 percentile)
    extra_note: str = ""

    def __post_init__(self):
        if self.direction not in ("greater", "less"):
            raise ValueError(f"direction must be 'greater' or 'less'; got {self.direction!r}")

    @property
    def sign(self) -> float:
        return 1.0 if self.direction == "greater" else -1.0

    def turned(self) -> tuple:
        """(lo, hi, n_lo, n0, n_hi, P) with the claimed direction positive (P None when the paper gives none)."""
        s = self.sign
        lo, hi = sorted((s * self.ci[0], s * self.ci[1]))
        band = self.null_band if self.null_band is not None else (self.null_value, self.null_value)
        n_lo, n_hi = sorted((s * band[0], s * band[1]))
        P = None if self.paper_effect is None else s * self.paper_effect
        return lo, hi, n_lo, s * self.null_value, n_hi, P

    def standard_error(self) -> float:
        if self.se is not None and np.isfinite(self.se):
            return float(self.se)
        return float(abs(self.ci[1] - self.ci[0]) / (2 * Z_ALPHA))


def _finite(*xs) -> bool:
    return all(x is not None and np.isfinite(x) for x in xs)


def decide(ev: Evidence) -> tuple[str, str]:
    """(verdict, reason) by VERDICT_TABLE."""
    if not ev.valid:
        return "invalid", ev.invalid_reason
    if ev.ci is None or not _finite(*ev.ci):
        return "underpowered", "no finite confidence interval"
    lo, hi, n_lo, n0, n_hi, P = ev.turned()
    if lo > n_hi and ev.extra_ok:
        small = P is not None and hi < P
        return "supported", "beyond the null" + (", but smaller than the paper's effect" if small else "")
    if hi < n_lo:
        return "opposite", "beyond the null in the direction opposite to the claim"
    if P is not None and hi < P and lo > n0 - (P - n0):
        why = ev.extra_note if lo > n_hi else "not beyond the null"
        return "ruled out", f"{why}; the CI excludes the paper's effect"
    if lo > n_hi:
        return "underpowered", ev.extra_note or "beyond the null, extra condition not met"
    return "underpowered", "the CI spans the null" + (" and the paper's effect" if P is not None else "")


def power(ev: Evidence) -> dict:
    """Minimum detectable effect at 80% power (see the module docstring), in the statistic's units."""
    se = ev.standard_error()
    lo, hi, n_lo, n0, n_hi, P = ev.turned()
    m = n_hi + (Z_ALPHA + Z_POWER) * se
    out = {"se": se, "mde": ev.sign * m, "mde_from_null": m - n0, "alpha": 0.05, "power": 0.8}
    if P is not None:
        out["paper_from_null"] = P - n0
        out["paper_detectable"] = bool(P >= m)
    return out


def settle_factor(ev: Evidence) -> float | None:
    """How many times the run's sample size brings the minimum detectable effect down to the paper's effect
    (se scales as 1 / sqrt(n), the null band is kept): ((se) / (se needed))^2; None when no sample size can (the
    null band alone reaches past the paper's effect, or the paper gives no effect)."""
    lo, hi, n_lo, n0, n_hi, P = ev.turned()
    if P is None or P <= n_hi:
        return None
    needed = (P - n_hi) / (Z_ALPHA + Z_POWER)
    return float(max(1.0, (ev.standard_error() / needed) ** 2))


def tost(diff: np.ndarray, margin: float, alpha: float = 0.05) -> dict:
    """Two one-sided t-tests that the mean of paired differences lies within (-margin, +margin).
    -> p (the larger of the two one-sided p values), equivalent (p < alpha), lower/upper p."""
    d = np.asarray(diff, float)
    p_low = stats.ttest_1samp(d, -margin, alternative="greater").pvalue
    p_up = stats.ttest_1samp(d, margin, alternative="less").pvalue
    p = float(max(p_low, p_up))
    return {"p": p, "p_lower": float(p_low), "p_upper": float(p_up), "margin": margin, "equivalent": p < alpha}
