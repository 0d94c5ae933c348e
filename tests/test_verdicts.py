"""lib.pipeline.verdicts: every verdict of the table from planted inputs, the equivalence test against scipy, and the minimum
detectable effect against a simulation with a known effect (detection rate 80% +- 10% over 300 runs)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from lib.pipeline.verdicts import Evidence, VERDICTS, decide, power, settle_factor, tost


def ev(ci, direction="greater", paper=1.0, null=0.0, band=None, **kw):
    return Evidence(value=float(np.mean(ci)), ci=ci, null_value=null, null_band=band, direction=direction,
                    paper_effect=paper, **kw)


@pytest.mark.parametrize("evidence, verdict", [
    (ev((0.4, 1.6)), "supported"),                                      # beyond the null
    (ev((0.1, 0.5)), "supported"),                                      # beyond, smaller than the paper's
    (ev((-0.9, -0.2)), "opposite"),
    (ev((-0.3, 0.4)), "ruled out"),                                     # inside +-1 of 0: excludes 1
    (ev((-0.5, 1.5)), "underpowered"),                                  # spans 0 and 1
    (ev((-1.4, 0.3)), "underpowered"),                                  # could be as large the other way
    (ev((0.4, 1.6), valid=False, invalid_reason="floor"), "invalid"),
    # a null band: beyond 0 but inside the band is not beyond the null
    (ev((0.05, 0.25), band=(-0.3, 0.3)), "ruled out"),
    (ev((0.05, 1.2), band=(-0.3, 0.3)), "underpowered"),
    (ev((0.35, 1.2), band=(-0.3, 0.3)), "supported"),
    # direction "less" (C6-like: a drop of 0.276 of baseline)
    (ev((-0.45, -0.1), "less", paper=-0.276), "supported"),
    (ev((0.1, 0.3), "less", paper=-0.276), "opposite"),
    (ev((-0.1, 0.12), "less", paper=-0.276), "ruled out"),
    (ev((-0.4, 0.2), "less", paper=-0.276), "underpowered"),
    # C1-like: beyond the null but the extra condition (r < 0.5) fails and the paper's -0.4 is excluded
    (ev((0.6, 0.78), "less", paper=-0.4, null=0.94, band=(0.9, 0.97), extra_ok=False), "ruled out"),
    # the paper's effect inside a wide null band: the CI still excludes it (TOST at the paper's size)
    (ev((0.1, 0.2), paper=0.25, band=(-0.5, 0.5)), "ruled out"),
])
def test_each_verdict_from_planted_inputs(evidence, verdict):
    assert decide(evidence)[0] == verdict
    assert verdict in VERDICTS


def test_opposite_and_ruled_out_say_why():
    assert "opposite" in decide(ev((-0.9, -0.2)))[1]
    assert "excludes the paper's effect" in decide(ev((-0.3, 0.4)))[1]
    assert "smaller than the paper's effect" in decide(ev((0.1, 0.5)))[1]
    with pytest.raises(ValueError, match="direction"):
        ev((0, 1), direction="bigger")


def test_minimum_detectable_effect_by_hand():
    # se from the CI: (hi - lo) / 3.92; mde = n_hi + 2.8016 se
    p = power(ev((-0.3919928, 0.3919928)))
    assert p["se"] == pytest.approx(0.2) and p["mde"] == pytest.approx(0.2 * (1.959964 + 0.841621), rel=1e-5)
    assert p["paper_detectable"] is True                        # the paper's 1.0 is above the MDE of 0.56
    assert power(ev((-0.3919928, 0.3919928), paper=0.3))["paper_detectable"] is False
    p = power(ev((-0.3919928, 0.3919928), direction="less", paper=-1.0, band=(-0.1, 0.1)))
    assert p["mde"] == pytest.approx(-(0.1 + 0.2 * 2.801585), rel=1e-5)


def test_settle_factor_is_the_square_of_the_se_ratio():
    e = ev((-0.7839856, 0.7839856), paper=0.56)                  # se 0.4; needed se = 0.56 / 2.8016 = 0.2
    assert settle_factor(e) == pytest.approx((0.4 / (0.56 / 2.801585)) ** 2, rel=1e-6)
    assert settle_factor(ev((-1, 1), paper=0.2, band=(-0.3, 0.3))) is None      # the band alone is wider


def test_tost_against_two_scipy_one_sided_tests():
    d = np.random.default_rng(3).normal(0.02, 0.1, 30)
    out = tost(d, 0.1)
    lo = stats.ttest_1samp(d + 0.1, 0, alternative="greater").pvalue
    hi = stats.ttest_1samp(d - 0.1, 0, alternative="less").pvalue
    assert out["p"] == pytest.approx(max(lo, hi)) and out["equivalent"] == (max(lo, hi) < 0.05)
    assert tost(np.random.default_rng(4).normal(0.5, 0.1, 30), 0.1)["equivalent"] is False


def _bootstrap_mean_ci(x, rng, n_boot=400):
    """[runs, n] -> percentile bootstrap 95% CI of each run's mean: ([runs], [runs])."""
    idx = rng.integers(0, x.shape[1], (n_boot, x.shape[1]))
    means = x[:, idx].mean(-1)                                  # [runs, n_boot]
    return np.quantile(means, 0.025, axis=1), np.quantile(means, 0.975, axis=1)


@pytest.mark.parametrize("band", [None, (-0.1, 0.1)])
def test_power_at_the_reported_mde_is_80_percent_by_simulation(band):
    """A pilot run gives se and the MDE; 300 runs with the true effect at that MDE detect it (verdict `supported`)
    80% +- 10% of the time."""
    rng = np.random.default_rng(11)
    n, sd = 200, 1.0                                            # the pilot's se within ~5%
    pilot = rng.normal(0.0, sd, (1, n))
    lo, hi = _bootstrap_mean_ci(pilot, rng)
    mde = power(Evidence(float(pilot.mean()), (lo[0], hi[0]), 0.0, band, "greater", 1.0))["mde"]
    runs = rng.normal(mde, sd, (300, n))
    lo, hi = _bootstrap_mean_ci(runs, rng)
    found = [decide(Evidence(float(m), (a, b), 0.0, band, "greater", 10.0))[0] == "supported"
             for m, a, b in zip(runs.mean(1), lo, hi)]
    assert 0.7 <= np.mean(found) <= 0.9
