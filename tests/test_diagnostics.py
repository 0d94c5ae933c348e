"""lib.experiments.diagnostics against independent truth: explicit loops, closed forms, simulations."""
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from lib.experiments import diagnostics as dg
from lib.storage.store import ArtifactError, save_npz
from lib.experiments.diagnostics.pairs import _cluster_pearson


def _loop_head_mean(M, deg):
    H = M.shape[0]
    out = []
    for h in range(H):
        vals = [M[h, j] for j in range(H) if j != h and not deg[h, j] and np.isfinite(M[h, j])]
        vals += [M[j, h] for j in range(H) if j != h and not deg[j, h] and np.isfinite(M[j, h])]
        out.append(np.mean(vals))
    return np.array(out)


def test_per_head_mean_matches_explicit_loop_asymmetric_with_degenerate_pairs():
    rng = np.random.default_rng(1)
    H = 9
    M = rng.normal(size=(H, H))
    deg = rng.random((H, H)) < 0.2
    deg = deg | deg.T
    np.fill_diagonal(deg, True)
    M[2, 5] = np.nan  # NaN counts as degenerate
    np.testing.assert_allclose(dg.per_head_mean(M, deg), _loop_head_mean(M, deg), rtol=1e-13)


def test_pair_vector_head_mean_equals_matrix_version_for_symmetric_atoms():
    rng = np.random.default_rng(2)
    H = 11
    A = rng.normal(size=(H, H))
    S = A + A.T
    deg = np.zeros((H, H), bool)
    deg[3, 7] = deg[7, 3] = True
    valid = ~dg.upper(deg)
    np.testing.assert_allclose(dg.per_head_mean_pairs(dg.upper(S), valid, H), dg.per_head_mean(S, deg), rtol=1e-13)


def test_head_with_all_pairs_degenerate_is_a_clear_error():
    H = 5
    M = np.ones((H, H))
    deg = np.zeros((H, H), bool)
    deg[2, :] = deg[:, 2] = True
    labels = dg.head_labels([0, 0, 1, 1, 2], [0, 1, 0, 1, 0])
    with pytest.raises(dg.DegenerateHeadError, match="L1H0"):
        dg.per_head_mean(M, deg, labels)
    with pytest.raises(dg.DegenerateHeadError, match="L1H0"):
        dg.per_head_mean_pairs(dg.upper(M), ~dg.upper(deg), H, labels)


def test_syn_red_correlation_of_a_constructed_case():
    # sts[i, j] = a_i + a_j, rtr[i, j] = b_i + b_j: each head mean is affine in a_i (resp. b_i) with the same
    # positive slope for every head, so the head-level correlations equal those of a and b themselves.
    rng = np.random.default_rng(3)
    H = 40
    a = rng.normal(size=H)
    b = -0.6 * a + rng.normal(size=H)
    sts, rtr = a[:, None] + a[None, :], b[:, None] + b[None, :]
    out = dg.syn_red_correlations(sts, rtr)
    assert out["head_pearson"] == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-12)
    ranks = lambda v: np.argsort(np.argsort(v))  # noqa: E731 (values are distinct)
    assert out["head_spearman"] == pytest.approx(np.corrcoef(ranks(a), ranks(b))[0, 1], abs=1e-12)
    iu = np.triu_indices(H, 1)
    assert out["pair_pearson"] == pytest.approx(np.corrcoef(sts[iu], rtr[iu])[0, 1], abs=1e-12)
    assert out["n_pairs"] == H * (H - 1) // 2
    assert out["head_pearson"] < -0.3


def test_lag_autocorrelation_matches_corrcoef_and_ar1_coefficient():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(3, 4, 50))
    r = dg.lag_autocorrelation(X, 2)
    for p in range(3):
        for h in range(4):
            assert r[p, h] == pytest.approx(np.corrcoef(X[p, h, :-2], X[p, h, 2:])[0, 1], abs=1e-12)
    # AR(1) with coefficient 0.8: long series recover it
    e = rng.normal(size=20000)
    x = np.zeros_like(e)
    for t in range(1, len(e)):
        x[t] = 0.8 * x[t - 1] + e[t]
    assert dg.lag_autocorrelation(x[None, None])[0, 0] == pytest.approx(0.8, abs=0.02)
    # a constant series has no autocorrelation
    assert np.isnan(dg.lag_autocorrelation(np.ones((1, 1, 10)))[0, 0])


def test_circular_shift_keeps_each_series_and_its_circular_autocorrelation_exactly():
    rng = np.random.default_rng(5)
    X = np.cumsum(rng.normal(size=(6, 5, 64)), axis=-1)
    Y, offsets = dg.circular_shift(X, 7, return_offsets=True)
    assert offsets.shape == (6, 5) and (offsets > 0).any()
    np.testing.assert_array_equal(np.sort(Y, -1), np.sort(X, -1))
    for lag in (1, 3):
        np.testing.assert_allclose(dg.circular_autocorrelation(Y, lag), dg.circular_autocorrelation(X, lag),
                                   rtol=0, atol=1e-12)
    # explicit roll
    p, h = 2, 3
    np.testing.assert_array_equal(Y[p, h], np.roll(X[p, h], -offsets[p, h]))


def test_circular_shift_breaks_cross_head_timing():
    rng = np.random.default_rng(6)
    base = rng.normal(size=(40, 1, 100))
    X = np.concatenate([base, base + 0.1 * rng.normal(size=base.shape)], axis=1)  # two coupled heads
    before = np.mean([np.corrcoef(X[p, 0], X[p, 1])[0, 1] for p in range(40)])
    Y = dg.circular_shift(X, 0)
    after = np.mean([np.corrcoef(Y[p, 0], Y[p, 1])[0, 1] for p in range(40)])
    assert before > 0.95 and abs(after) < 0.15


def test_drift_of_a_linear_series():
    T, c, g = 100, 3.0, -0.4
    t = np.arange(T)
    x = c * (1 + g * t / (T - 1))        # falls by 40% of its starting level
    d = dg.drift(x[None, None])[0, 0]
    assert d == pytest.approx(g / (1 + g / 2), rel=1e-12)  # fitted change / mean level
    assert dg.drift(np.full((1, 1, T), 2.0))[0, 0] == pytest.approx(0.0, abs=1e-15)


def test_linear_detrend_and_first_difference():
    rng = np.random.default_rng(8)
    T = 30
    t = np.arange(T)
    noise = rng.normal(size=(2, 3, T))
    X = 5 + 0.3 * t + noise
    D = dg.linear_detrend(X)
    np.testing.assert_allclose(D, dg.linear_detrend(noise), atol=1e-12)
    np.testing.assert_allclose(D.sum(-1), 0, atol=1e-10)
    np.testing.assert_allclose((D * t).sum(-1), 0, atol=1e-9)
    np.testing.assert_allclose(dg.first_difference(X)[..., 4], X[..., 5] - X[..., 4])


def test_spearman_brown_formula_and_simulated_parallel_forms():
    assert dg.spearman_brown(0.5) == pytest.approx(2 / 3)
    assert dg.spearman_brown(0.2, factor=3) == pytest.approx(0.6 / 1.4)
    # simulation: a score measured with 20 noisy prompts; the correlation of two independent 20-prompt
    # measurements is what the formula predicts from the correlation of two 10-prompt halves
    rng = np.random.default_rng(9)
    n, prompts = 20000, 20
    true = rng.normal(size=n)
    m1 = true[:, None] + 3.0 * rng.normal(size=(n, prompts))
    m2 = true[:, None] + 3.0 * rng.normal(size=(n, prompts))
    r_half = np.corrcoef(m1[:, :10].mean(1), m1[:, 10:].mean(1))[0, 1]
    r_full = np.corrcoef(m1.mean(1), m2.mean(1))[0, 1]
    assert dg.spearman_brown(r_half) == pytest.approx(r_full, abs=0.02)


def test_random_halves_are_disjoint_and_seeded():
    halves = dg.random_halves(11, 5, 0)
    assert len(halves) == 5
    for a, b in halves:
        assert len(a) == len(b) == 5 and not set(a) & set(b)
    again = dg.random_halves(11, 5, 0)
    assert all(np.array_equal(a, c) and np.array_equal(b, d) for (a, b), (c, d) in zip(halves, again))


def test_layer_means_and_profile_match_loops():
    rng = np.random.default_rng(10)
    layer = np.repeat(np.arange(4), 3)
    v = rng.normal(size=12)
    prof = dg.layer_profile(v, layer, 4)
    for l in range(4):
        assert prof["mean"][l] == pytest.approx(v[layer == l].mean())
        assert prof["sem"][l] == pytest.approx(v[layer == l].std(ddof=1) / np.sqrt(3))
    np.testing.assert_allclose(dg.layer_means(v, layer, 4), prof["mean"])
    np.testing.assert_allclose(prof["depth"], [0, 1 / 3, 2 / 3, 1])


def test_null_band_z_scores():
    rng = np.random.default_rng(11)
    null = rng.normal(size=(50, 3))
    obs = np.array([0.0, 3.0, -1.0])
    t = dg.null_band(null, obs)
    np.testing.assert_allclose(t["z"], (obs - null.mean(0)) / null.std(0, ddof=1))
    np.testing.assert_allclose(t["null_lo"], np.quantile(null, 0.025, axis=0))


def _planted(profile_fn, n_layers=12, per_layer=8, noise=0.05, seed=0):
    rng = np.random.default_rng(seed)
    layer = np.repeat(np.arange(n_layers), per_layer)
    depth = layer / (n_layers - 1)
    return profile_fn(depth) + noise * rng.normal(size=len(layer)), layer


@pytest.mark.parametrize("fn, verdict", [
    (lambda d: 0.5 - (d - 0.5) ** 2, "inverted U"),
    (lambda d: 0.0 * d, "no depth trend"),
    (lambda d: 0.3 * d, "monotone increasing"),
    (lambda d: -0.3 * d, "monotone decreasing"),
    (lambda d: (d - 0.5) ** 2, "U shape"),
])
def test_inverted_u_verdicts_on_planted_layer_profiles(fn, verdict):
    scores, layer = _planted(fn)
    res = dg.inverted_u_test(scores, layer, 12, n_boot=500, seed=1)
    assert res.verdict == verdict
    if verdict == "inverted U":
        assert res.quadratic < 0 and res.peak_depth == pytest.approx(0.5, abs=0.1)
        assert res.ci["mid_minus_early"][0] > 0 and res.ci["mid_minus_late"][0] > 0


def test_inverted_u_quadratic_coefficient_is_exact_on_a_noise_free_parabola():
    scores, layer = _planted(lambda d: 1 + 2 * d - 3 * d ** 2, noise=0.0)
    res = dg.inverted_u_test(scores, layer, 12, n_boot=50)
    assert res.quadratic == pytest.approx(-3.0, abs=1e-10)
    assert res.peak_depth == pytest.approx(1 / 3, abs=1e-10)


def test_tdmi_is_the_joint_mutual_information_of_past_and_future():
    from lib.estimators.phiid import ATOM_NAMES, phiid_all_pairs
    rng = np.random.default_rng(12)
    X = np.cumsum(rng.normal(size=(1, 3, 80)), -1) + rng.normal(size=(1, 3, 80))
    res = phiid_all_pairs(X, warn=False)
    tdmi = dg.tdmi_matrix(res)
    i, j = 0, 2
    rows = np.stack([X[0, i, :-1], X[0, j, :-1], X[0, i, 1:], X[0, j, 1:]])
    C = np.corrcoef(rows)
    expected = 0.5 * (np.log(np.linalg.det(C[:2, :2])) + np.log(np.linalg.det(C[2:, 2:])) - np.log(np.linalg.det(C)))
    assert tdmi[i, j] == pytest.approx(expected, abs=1e-10)
    with pytest.raises(ArtifactError, match="16 atoms"):
        dg.tdmi_matrix({a: res[a] for a in ATOM_NAMES[:3]})


# ------------------------------------------------------------------------------------------- artifacts

def _write_run(tmp_path, H=6, model="m1"):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(4, H, 20)).astype(np.float32)
    save_npz(tmp_path / "activations.npz", activations=X, head_layer=np.repeat(np.arange(H // 2), 2),
             head_index=np.tile([0, 1], H // 2), n_layers=H // 2, n_heads=2, model=model)
    return X


def test_missing_phiid_mode_names_the_notebook_and_parameter(tmp_path):
    _write_run(tmp_path)
    acts = dg.load_activations(tmp_path)
    with pytest.raises(ArtifactError, match=r"phiid_concat\.npz.*02_phiid.*modes"):
        dg.load_phiid(tmp_path, "concat", activations=acts, needed_by="variant concat")


def test_phiid_from_another_model_is_refused(tmp_path):
    from lib.estimators.phiid import phiid_all_pairs, save_phiid
    _write_run(tmp_path, H=6)
    other = np.random.default_rng(1).normal(size=(4, 8, 20))
    res = phiid_all_pairs(other, warn=False)
    save_phiid(tmp_path / "phiid_per_prompt.npz", res, np.repeat(np.arange(4), 2), np.tile([0, 1], 4))
    acts = dg.load_activations(tmp_path)
    with pytest.raises(ArtifactError, match="6 heads.*8|8 heads.*6"):
        dg.load_phiid(tmp_path, "per_prompt", activations=acts)


def test_phiid_with_a_different_model_name_is_refused(tmp_path):
    from lib.estimators.phiid import phiid_all_pairs, save_phiid
    X = _write_run(tmp_path, H=6)
    res = phiid_all_pairs(X, warn=False)
    save_phiid(tmp_path / "phiid_per_prompt.npz", res, np.repeat(np.arange(3), 2), np.tile([0, 1], 3), model="m2")
    with pytest.raises(ArtifactError, match="model 'm2'"):
        dg.load_phiid(tmp_path, "per_prompt", activations=dg.load_activations(tmp_path))


def test_diagnose_summary_on_a_small_run(tmp_path):
    from lib.estimators.phiid import phiid_all_pairs, save_phiid
    X = _write_run(tmp_path, H=6)
    res = phiid_all_pairs(X, warn=False)
    save_phiid(tmp_path / "phiid_per_prompt.npz", res, np.repeat(np.arange(3), 2), np.tile([0, 1], 3))
    acts = dg.load_activations(tmp_path)
    d = dg.diagnose(acts, dg.load_phiid(tmp_path, activations=acts, atoms=("sts", "rtr")))
    syn = _loop_head_mean(res["sts"], res.degenerate)
    np.testing.assert_allclose(d.heads["synergy"], syn, rtol=1e-12)
    assert d.summary["syn_red"]["head_spearman"] == pytest.approx(
        stats.spearmanr(syn, _loop_head_mean(res["rtr"], res.degenerate))[0])
    assert d.summary["n_pairs"] == 15 and len(d.profiles["autocorr"]) == 3


def test_available_tags_order(tmp_path):
    for tag in ("rev-step1000", "random_init", "rev-step20", "other"):
        save_npz(tmp_path / f"activations__{tag}.npz", x=np.zeros(1))
    assert dg.available_tags(tmp_path) == ["random_init", "rev-step20", "rev-step1000", "other"]


# ----------------------------------------------------------------------------- bootstrap CIs of the correlations

def test_bootstrap_correlation_matches_scipy_bootstrap():
    from scipy import stats as st
    rng = np.random.default_rng(0)
    a = rng.standard_normal(150)
    b = a + rng.standard_normal(150)
    got = dg.bootstrap_correlation(a, b, n_boot=3000)
    for key, fn in (("pearson", lambda x, y: st.pearsonr(x, y)[0]), ("spearman", lambda x, y: st.spearmanr(x, y)[0])):
        ref = st.bootstrap((a, b), fn, paired=True, n_resamples=3000, method="percentile", random_state=2,
                           vectorized=False).confidence_interval
        assert abs(got[f"{key}_ci"][0] - ref.low) < 0.03 and abs(got[f"{key}_ci"][1] - ref.high) < 0.03
        assert got[f"{key}_ci"][0] < got[key] < got[f"{key}_ci"][1]


def test_pair_bootstrap_accounts_for_pairs_sharing_heads():
    rng = np.random.default_rng(1)
    n = 40
    i, j = dg.pair_index(n)
    u = rng.standard_normal(n)                                   # the only shared signal comes through the heads
    x = u[i] + u[j] + 0.5 * rng.standard_normal(len(i))
    y = u[i] + u[j] + 0.5 * rng.standard_normal(len(i))
    cluster = dg.pair_bootstrap_correlation(i, j, x, y, n, n_boot=400)
    naive = dg.bootstrap_correlation(x, y, n_boot=400)
    width = lambda r: r["pearson_ci"][1] - r["pearson_ci"][0]    # noqa: E731
    assert cluster["pearson"] == pytest.approx(naive["pearson"]) and width(cluster) > 2 * width(naive)
    table = dg.correlation_ci_table(pd.DataFrame({"synergy": u, "redundancy": u + rng.standard_normal(n)}),
                                    pd.DataFrame({"i": i, "j": j, "sts": x, "rtr": y}), n_boot=200)
    assert list(table["level"]) == ["head", "pair"] and (table["spearman_lo"] <= table["spearman"]).all()


def test_cluster_pearson_equals_the_dense_weighted_pearson_per_resample():
    """The head-cluster bootstrap's r per resample, computed from [heads, heads] quadratic forms, equals the
    weighted Pearson written out pair by pair (w_p = c_i c_j, a [resamples, pairs] weight array)."""
    rng = np.random.default_rng(3)
    n, n_boot = 17, 25
    i, j = dg.pair_index(n)
    a, b = rng.standard_normal(len(i)) + 5.0, rng.standard_normal(len(i)) * 1e-3 + 0.3 * rng.standard_normal(len(i))
    counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(n_boot)])
    w = (counts[:, i] * counts[:, j]).astype(float)
    for r, wr in zip(_cluster_pearson(counts, i, j, a, b, n), w):
        ma, mb = (wr * a).sum() / wr.sum(), (wr * b).sum() / wr.sum()
        ref = (wr * (a - ma) * (b - mb)).sum() / np.sqrt((wr * (a - ma) ** 2).sum() * (wr * (b - mb) ** 2).sum())
        assert r == pytest.approx(ref, rel=1e-10, abs=1e-12)


def test_pair_bootstrap_memory_does_not_grow_with_resamples_times_pairs():
    """1,152 heads (663k pairs, the Qwen3-8B layout) with 500 resamples: a [resamples, pairs] float array would
    be 2.65 GB; the peak of traced numpy allocations stays under 0.3 GB."""
    import tracemalloc
    n = 1152
    i, j = dg.pair_index(n)
    x = np.random.default_rng(0).standard_normal(len(i))
    tracemalloc.start()
    try:
        out = dg.pair_bootstrap_correlation(i, j, x, x + 1.0, n, n_boot=500)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out["pearson_ci"] == pytest.approx([1.0, 1.0]) and peak < 0.3e9


def test_shift_keeping_trend_keeps_the_line_and_shifts_the_residuals():
    from lib.experiments.diagnostics import linear_detrend, shift_keeping_trend, shift_series
    rng = np.random.default_rng(5)
    T = 50
    t = np.arange(T)
    X = 10 - 5.0 * t[None, None, :] / T + rng.standard_normal((2, 3, T))     # a shared linear decline
    offsets = rng.integers(0, T, (2, 3))
    S = shift_keeping_trend(X, offsets)
    line = X - linear_detrend(X)
    assert np.allclose(S - line, shift_series(linear_detrend(X), offsets))      # residuals shifted by hand
    slope = lambda Y: np.polyfit(t, Y.reshape(-1, T).T, 1)[0]                  # noqa: E731
    assert np.allclose(slope(S - shift_series(linear_detrend(X), offsets)), slope(X), atol=1e-12)
    assert abs(slope(S).mean() - slope(X).mean()) < 0.02                        # the shared trend survives...
    assert abs(slope(shift_series(X, offsets)).mean()) < abs(slope(X).mean()) / 2  # ...a plain shift cuts it
