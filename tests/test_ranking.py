"""lib.experiments.ranking against independent truth: lib.estimators.phiid itself, explicit loops, seeded reruns, bad inputs."""
import warnings

import numpy as np
import pytest

from lib.experiments import diagnostics as dg
from lib.experiments import ranking as rk
from lib.estimators.phiid import DegeneratePairWarning, phiid_all_pairs, run_phiid_for_run
from lib.storage.store import ArtifactError, save_npz


def _ar_heads(P=10, layers=4, per_layer=3, T=40, seed=0, identity=True):
    """[P, heads, T] AR(1) heads. identity=True: each head has its own coefficient and a shared drive with
    its neighbour, the same in every prompt (a stable head ranking); False: every head the same process."""
    rng = np.random.default_rng(seed)
    H = layers * per_layer
    phi = np.linspace(0.05, 0.9, H) if identity else np.full(H, 0.5)
    rng.shuffle(phi) if identity else None
    X = np.zeros((P, H, T))
    e = rng.normal(size=(P, H, T))
    for t in range(1, T):
        X[:, :, t] = phi * X[:, :, t - 1] + e[:, :, t]
        if identity:
            X[:, 1::2, t] += 0.5 * X[:, 0::2, t - 1]
    return X + 5.0


def _write_run(folder, X, layers, per_layer, modes=("per_prompt", "concat", "pooled"), model="synthetic"):
    H = X.shape[1]
    save_npz(folder / "activations.npz", activations=X.astype(np.float32),
             head_layer=np.repeat(np.arange(layers), per_layer), head_index=np.tile(np.arange(per_layer), layers),
             n_layers=layers, n_heads=per_layer, model=model)
    assert H == layers * per_layer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegeneratePairWarning)
        run_phiid_for_run(folder, modes=list(modes))
    return folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return _write_run(tmp_path_factory.mktemp("run"), _ar_heads(), 4, 3)


# ------------------------------------------------------------------------------------------- fast kernel

@pytest.mark.parametrize("mode", ["per_prompt", "concat", "pooled"])
@pytest.mark.parametrize("tau", [1, 2])
def test_fast_kernel_equals_lib_phiid_including_degenerate_pairs(mode, tau):
    rng = np.random.default_rng(tau)
    X = _ar_heads(P=5, layers=2, per_layer=4, T=30, seed=tau)
    X[:, 3] = 2 * X[:, 1] + 1                # affine copy: singular pair (1, 3)
    X[2, 5] = 7.0                            # constant head in one prompt
    X[:, 6] = X[:, 0] + 1e-3 * rng.normal(size=X[:, 0].shape)  # near-singular but defined
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegeneratePairWarning)
        ref = phiid_all_pairs(X, tau=tau, mode=mode)
    fast = rk.mmi_segment_stats(X, mode, tau).mean()
    want = rk.PairStats.from_atoms(ref, ref.degenerate)
    np.testing.assert_array_equal(fast.valid, want.valid)
    assert not fast.valid.all()
    for name in ("sts", "rtr", "tdmi"):  # the near-singular pair (condition ~1e6) loses ~1e-10 either way
        np.testing.assert_allclose(getattr(fast, name)[fast.valid], getattr(want, name)[want.valid],
                                   rtol=1e-9, atol=1e-8)
    running = rk.mmi_pair_means(X, mode, tau)  # running sums instead of per-segment arrays
    np.testing.assert_array_equal(running.valid, fast.valid)
    np.testing.assert_allclose(running.sts, fast.sts, rtol=1e-13, atol=1e-15)


def _degenerate_heads(kind, X):
    """Head 2 of X [prompts, heads, steps] made degenerate in every prompt (constant, a duplicate of head 0,
    or one NaN sample)."""
    if kind == "constant":
        X[:, 2] = 4.0
    elif kind == "duplicate":
        X[:, 2] = X[:, 0]
    else:
        X[:, 2, 7] = np.nan
    return X


@pytest.mark.parametrize("kind", ["constant", "duplicate", "nan"])
@pytest.mark.parametrize("mode", ["per_prompt", "concat", "pooled"])
def test_fast_path_equals_phiid_all_pairs_on_degenerate_heads(kind, mode):
    X = _degenerate_heads(kind, _ar_heads(P=4, layers=2, per_layer=3, T=30, seed=5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegeneratePairWarning)
        ref = phiid_all_pairs(X, mode=mode)
    want = rk.PairStats.from_atoms(ref, ref.degenerate)
    iu, ju = dg.pair_index(6)
    bad = (iu == 2) & (ju == 0) | (iu == 0) & (ju == 2) if kind == "duplicate" else (iu == 2) | (ju == 2)
    np.testing.assert_array_equal(~want.valid, bad)            # the engine's rule, as documented
    for got in (rk.mmi_segment_stats(X, mode).mean(), rk.mmi_pair_means(X, mode), rk.phiid_pair_stats(X, mode)):
        np.testing.assert_array_equal(got.valid, want.valid)
        for name in ("sts", "rtr", "tdmi"):
            np.testing.assert_array_equal(np.isnan(getattr(got, name)), bad)
            np.testing.assert_allclose(getattr(got, name)[~bad], getattr(want, name)[~bad], rtol=1e-10, atol=1e-12)


def test_per_prompt_stats_subset_mean_equals_phiid_on_the_subset():
    X = _ar_heads(P=8, T=25, seed=3)
    X[1, 4] = 3.0  # head 4 undefined in prompt 1: the mean uses the other prompts
    pp = rk.per_prompt_stats(X)
    subset = [1, 2, 5]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegeneratePairWarning)
        ref = phiid_all_pairs(X[subset])
    got, want = pp.mean(subset), rk.PairStats.from_atoms(ref, ref.degenerate)
    for name in ("sts", "rtr", "tdmi"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-9, atol=1e-12)


def test_ccs_path_uses_the_engine():
    X = _ar_heads(P=2, layers=1, per_layer=4, T=30)
    got = rk.phiid_pair_stats(X, "per_prompt", redundancy="CCS")
    ref = phiid_all_pairs(X, redundancy="CCS", warn=False)
    np.testing.assert_allclose(got.sts, dg.upper(ref["sts"]))
    np.testing.assert_allclose(rk.per_prompt_stats(X, redundancy="CCS").mean().rtr, dg.upper(ref["rtr"]), rtol=1e-12)


# ------------------------------------------------------------------------------------------- scores

def _pairs(seed=0, H=7):
    rng = np.random.default_rng(seed)
    sym = lambda A: A + A.T  # noqa: E731
    sts, rtr = sym(rng.random((H, H))), sym(rng.random((H, H)))
    tdmi = sts + rtr + sym(rng.random((H, H)))
    deg = np.zeros((H, H), bool)
    deg[0, 4] = deg[4, 0] = True
    pairs = rk.PairStats(sts=dg.upper(sts), rtr=dg.upper(rtr), tdmi=dg.upper(tdmi), valid=~dg.upper(deg), n_heads=H)
    return pairs, sts, rtr, tdmi, deg


def _loop_mean(M, deg):
    H = len(M)
    return np.array([np.mean([M[h, j] for j in range(H) if j != h and not deg[h, j]]) for h in range(H)])


def _rank(v):  # 1-based ranks of distinct values
    return np.argsort(np.argsort(v)) + 1.0


def test_rank_diff_score_by_hand():
    pairs, sts, rtr, _, deg = _pairs()
    layer = np.array([0, 0, 1, 1, 2, 2, 2])
    s = rk.variant_score("rank_diff", pairs, layer, 3)
    raw = _rank(_loop_mean(sts, deg)) - _rank(_loop_mean(rtr, deg))
    np.testing.assert_allclose(s.raw, raw)
    np.testing.assert_allclose(s.score, (raw - raw.min()) / (raw.max() - raw.min()))
    assert s.rank[np.argmax(s.score)] == 1
    np.testing.assert_allclose(s.layer_mean, [s.score[layer == l].mean() for l in range(3)])


def test_balance_and_tdmi_normalized_by_hand():
    pairs, sts, rtr, tdmi, deg = _pairs(1)
    layer = np.zeros(7, int)
    b = rk.variant_score("balance", pairs, layer, 1)
    np.testing.assert_allclose(b.raw, _loop_mean(sts / (sts + rtr), deg))
    t = rk.variant_score("tdmi_normalized", pairs, layer, 1)
    np.testing.assert_allclose(t.syn, _loop_mean(sts / tdmi, deg))
    np.testing.assert_allclose(t.raw, _rank(_loop_mean(sts / tdmi, deg)) - _rank(_loop_mean(rtr / tdmi, deg)))


def test_autocorr_residualized_removes_the_autocorrelation():
    pairs, sts, rtr, _, deg = _pairs(2)
    ac = np.random.default_rng(5).random(7)
    s = rk.variant_score("autocorr_residualized", pairs, np.zeros(7, int), 1, autocorr=ac)
    syn = _loop_mean(sts, deg)
    slope, icpt = np.polyfit(ac, syn, 1)
    np.testing.assert_allclose(s.syn, syn - (slope * ac + icpt), atol=1e-12)
    assert abs(np.corrcoef(s.syn, ac)[0, 1]) < 1e-10 and abs(np.corrcoef(s.red, ac)[0, 1]) < 1e-10


def test_scores_are_in_unit_interval_and_use_the_phiid_files(run_dir):
    inp = rk.load_inputs(run_dir)
    sc = inp.scores()
    assert set(sc) == set(rk.DEFAULT_VARIANTS)
    for s in sc.values():
        assert s.score.min() == 0 and s.score.max() == 1 and len(s.layer_mean) == 4
    # rank_diff on the per_prompt file equals a direct computation on lib.estimators.phiid
    ref = phiid_all_pairs(inp.X, warn=False)
    raw = _rank(_loop_mean(ref["sts"], ref.degenerate)) - _rank(_loop_mean(ref["rtr"], ref.degenerate))
    np.testing.assert_allclose(sc["rank_diff"].raw, raw)
    # detrended recomputes PhiID on detrended series
    det = phiid_all_pairs(dg.linear_detrend(inp.X), warn=False)
    raw = _rank(_loop_mean(det["sts"], det.degenerate)) - _rank(_loop_mean(det["rtr"], det.degenerate))
    np.testing.assert_allclose(sc["detrended"].raw, raw)


# ------------------------------------------------------------------------------------------- signal or not

def test_split_half_reliability_high_for_stable_heads_and_near_zero_for_exchangeable_heads(tmp_path):
    X = _ar_heads(P=40, layers=4, per_layer=4, T=60, seed=1)
    inp = rk.RankingInputs(X=X, head_layer=np.repeat(np.arange(4), 4), head_index=np.tile(np.arange(4), 4),
                           n_layers=4, n_heads=4, variants=("rank_diff", "concat"))
    rel, per_split = rk.split_half_reliability(inp, n_splits=6, seed=0)
    assert (rel["r_mean"] > 0.6).all()
    np.testing.assert_allclose(rel["spearman_brown"], 2 * rel["r_mean"] / (1 + rel["r_mean"]))
    np.testing.assert_allclose(rel["r_mean"], per_split.groupby("variant", sort=False)["spearman"].mean()[rel["variant"]])
    noise = _ar_heads(P=40, layers=4, per_layer=4, T=60, seed=1, identity=False)
    inp0 = rk.RankingInputs(X=noise, head_layer=inp.head_layer, head_index=inp.head_index, n_layers=4, n_heads=4,
                            variants=("rank_diff",))
    rel0, _ = rk.split_half_reliability(inp0, n_splits=6, seed=0)
    assert abs(rel0["r_mean"].iloc[0]) < 0.35


def test_split_half_by_hand_for_one_split():
    X = _ar_heads(P=10, seed=4)
    inp = rk.RankingInputs(X=X, head_layer=np.repeat(np.arange(4), 3), head_index=np.tile(np.arange(3), 4),
                           n_layers=4, n_heads=3, variants=("rank_diff",))
    _, per_split = rk.split_half_reliability(inp, n_splits=1, seed=3)
    (a, b), = dg.random_halves(10, 1, 3)
    sa, sb = (phiid_all_pairs(X[h], warn=False) for h in (a, b))
    ra, rb = (_rank(_loop_mean(s["sts"], s.degenerate)) - _rank(_loop_mean(s["rtr"], s.degenerate)) for s in (sa, sb))
    from scipy.stats import spearmanr
    assert per_split["spearman"].iloc[0] == pytest.approx(spearmanr(ra, rb)[0])


def test_surrogates_are_seeded_resumable_and_parallel_safe(tmp_path):
    X = _ar_heads(P=6, T=30, seed=5)
    make = lambda: rk.RankingInputs(X=X, head_layer=np.repeat(np.arange(4), 3),  # noqa: E731
                                    head_index=np.tile(np.arange(3), 4), n_layers=4, n_heads=3,
                                    variants=("rank_diff", "first_difference", "autocorr_residualized"))
    full = rk.surrogate_scores(make(), 4, seed=11)
    assert full["rank_diff"].shape == (4, 12)
    ck = tmp_path / "surr.npz"
    part = rk.surrogate_scores(make(), 2, seed=11, checkpoint=ck, checkpoint_every=1)
    np.testing.assert_array_equal(part["rank_diff"], full["rank_diff"][:2])
    resumed = rk.surrogate_scores(make(), 4, seed=11, checkpoint=ck, checkpoint_every=1)
    parallel = rk.surrogate_scores(make(), 4, seed=11, n_jobs=2)
    for n in full:
        np.testing.assert_array_equal(resumed[n], full[n])
        np.testing.assert_array_equal(parallel[n], full[n])
    other = rk.surrogate_scores(make(), 2, seed=12)
    assert not np.array_equal(other["rank_diff"], full["rank_diff"][:2])


def test_surrogate_null_destroys_cross_head_structure_but_keeps_autocorrelation_ranking():
    # heads whose synergy comes from cross-head coupling lose it under the shift; the autocorrelation
    # (per-head) part stays, so the surrogate autocorrelations equal the circular ones of the data
    X = _ar_heads(P=8, T=50, seed=6)
    inp = rk.RankingInputs(X=X, head_layer=np.repeat(np.arange(4), 3), head_index=np.tile(np.arange(3), 4),
                           n_layers=4, n_heads=3, variants=("rank_diff",))
    fr = np.random.default_rng(0).random(size=X.shape[:2])
    Y = rk.signal._shift(X, fr)
    np.testing.assert_allclose(dg.circular_autocorrelation(Y), dg.circular_autocorrelation(X), atol=1e-12)
    coupled = np.mean([np.corrcoef(X[p, 0, :-1], X[p, 1, 1:])[0, 1] for p in range(8)])
    shifted = np.mean([np.corrcoef(Y[p, 0, :-1], Y[p, 1, 1:])[0, 1] for p in range(8)])
    assert coupled > 0.3 and abs(shifted) < coupled / 2
    null = rk.surrogate_scores(inp, 3, seed=0)
    table = rk.null_tables(inp.scores(), null, inp.head_layer, 4)
    assert list(table.columns[:3]) == ["variant", "layer", "depth"] and len(table) == 4


def test_inverted_u_table_on_planted_variant_scores():
    layer = np.repeat(np.arange(9), 6)
    d = layer / 8
    rng = np.random.default_rng(0)
    planted = rk.VariantScore("p", 0.5 - (d - 0.5) ** 2 + 0.03 * rng.normal(size=54), None, None, None, None, None)
    flat = rk.VariantScore("f", 0.5 + 0.03 * rng.normal(size=54), None, None, None, None, None)
    t = rk.inverted_u_table({"planted": planted, "flat": flat}, layer, 9, n_boot=300)
    assert t.set_index("variant")["verdict"].to_dict() == {"planted": "inverted U", "flat": "no depth trend"}


def test_agreement_and_rankings_frame(run_dir):
    inp = rk.load_inputs(run_dir, ("rank_diff", "balance", "concat"))
    sc = inp.scores()
    A = rk.agreement(sc)
    assert A.shape == (3, 3) and np.allclose(np.diag(A), 1)
    df = rk.rankings_frame(inp, sc)
    assert list(df.columns) == ["head_idx", "layer", "head", "rank_diff", "balance", "concat", "syn", "red"]
    np.testing.assert_allclose(df["syn"], sc["rank_diff"].syn)


def test_oracle_column_in_rankings_and_its_agreement(tmp_path):
    """oracle.npz present: rankings.csv gets `oracle` = minmax(score) after the variants; absent: no column."""
    from lib.storage import artifacts
    X = _ar_heads(P=4, T=20, seed=3)
    _write_run(tmp_path, X, 4, 3, modes=("per_prompt",))
    inp = rk.load_inputs(tmp_path, ("rank_diff", "balance"))
    sc = inp.scores()
    assert rk.oracle_score(tmp_path, inp) is None
    assert rk.oracle_agreement(sc, None).empty
    raw = np.arange(12.0)[::-1] * 2 + 3                                        # head 0 most important
    artifacts.save("oracle", tmp_path, dict(score=raw, signed=-raw, per_prompt=raw[None], nll=np.ones(1),
                                            prompt_ids=np.array([3]), rows=np.array([3]),
                                            head_layer=np.repeat(np.arange(4), 3), head_index=np.tile(np.arange(3), 4),
                                            model="m", extraction_key="", seconds=0.0))
    oracle = rk.oracle_score(tmp_path, inp)
    np.testing.assert_allclose(oracle, (raw - 3) / 22)
    df = rk.save_rankings(tmp_path, inp, sc, oracle=oracle)
    assert list(df.columns) == ["head_idx", "layer", "head", "rank_diff", "balance", "oracle", "syn", "red"]
    back = artifacts.load("rankings", tmp_path)
    np.testing.assert_allclose(back["oracle"], oracle)
    agree = rk.oracle_agreement(sc, oracle).set_index("variant")
    from scipy import stats
    assert agree.loc["balance", "spearman"] == pytest.approx(stats.spearmanr(sc["balance"].score, oracle)[0])


def test_baseline_profiles_for_tags(tmp_path):
    X = _ar_heads(P=6, T=30, seed=8)
    _write_run(tmp_path, X, 4, 3, modes=("per_prompt",))
    for tag, seed in (("random_init", 1), ("rev-step10", 2)):
        save_npz(tmp_path / f"activations__{tag}.npz", activations=_ar_heads(P=6, T=30, seed=seed),
                 head_layer=np.repeat(np.arange(4), 3), head_index=np.tile(np.arange(3), 4), n_layers=4, n_heads=3)
    run_phiid_for_run(tmp_path, modes=["per_prompt"], tags=["random_init", "rev-step10"])
    prof, verdicts, skipped = rk.baseline_profiles(tmp_path, ("rank_diff", "concat"), n_boot=50)
    assert list(prof["tag"].unique()) == ["random_init", "rev-step10"]
    assert set(prof["variant"]) == {"rank_diff"} and len(verdicts) == 2
    assert any("phiid_concat__random_init.npz" in why for _, why in skipped)


# ------------------------------------------------------------------------------------------- bad input

def test_unknown_variant():
    with pytest.raises(ValueError, match="unknown ranking variant"):
        rk.check_variants(["rank_diff", "entropy"])


def test_variant_whose_mode_was_not_computed(tmp_path):
    _write_run(tmp_path, _ar_heads(P=4, T=20), 4, 3, modes=("per_prompt",))
    with pytest.raises(ArtifactError, match=r"variant\(s\) pooled needs phiid_pooled\.npz.*02_phiid.*modes"):
        rk.load_inputs(tmp_path, ("rank_diff", "pooled"))


def test_phiid_file_from_another_run_with_the_same_heads(tmp_path):
    _write_run(tmp_path, _ar_heads(P=4, T=20, seed=0), 4, 3, modes=("per_prompt",))
    # activations replaced by another run of the same model: same heads, different series
    save_npz(tmp_path / "activations.npz", activations=_ar_heads(P=4, T=20, seed=9).astype(np.float32),
             head_layer=np.repeat(np.arange(4), 3), head_index=np.tile(np.arange(3), 4), n_layers=4, n_heads=3,
             model="synthetic")
    with pytest.raises(ArtifactError, match="different runs"):
        rk.load_inputs(tmp_path, ("rank_diff",))
    rk.load_inputs(tmp_path, ("rank_diff",), verify=False)  # the check can be turned off


def test_head_count_mismatch(tmp_path):
    _write_run(tmp_path, _ar_heads(P=4, T=20), 4, 3, modes=("per_prompt",))
    save_npz(tmp_path / "activations.npz", activations=np.random.default_rng(0).normal(size=(4, 8, 20)),
             head_layer=np.repeat(np.arange(4), 2), head_index=np.tile(np.arange(2), 4), n_layers=4, n_heads=2)
    with pytest.raises(ArtifactError, match="different models or runs"):
        rk.load_inputs(tmp_path, ("rank_diff",))


def test_tau_mismatch(tmp_path):
    _write_run(tmp_path, _ar_heads(P=4, T=20), 4, 3, modes=("per_prompt",))
    with pytest.raises(ArtifactError, match="tau=1.*tau=2|tau=2.*tau=1"):
        rk.load_inputs(tmp_path, ("rank_diff",), tau=2)


def test_head_with_all_pairs_degenerate(tmp_path):
    X = _ar_heads(P=4, T=20)
    X[:, 5] = 1.0   # a dead head: constant in every prompt
    _write_run(tmp_path, X, 4, 3, modes=("per_prompt",))
    inp = rk.load_inputs(tmp_path, ("rank_diff",))
    with pytest.raises(dg.DegenerateHeadError, match="L1H2"):
        inp.scores()


def test_inverted_u_beyond_the_null_removes_a_profile_the_null_already_has():
    # the observed scores and the surrogates share the same inverted U: nothing is left beyond the null
    layer = np.repeat(np.arange(9), 6)
    d = layer / 8
    rng = np.random.default_rng(1)
    shape = 0.5 - (d - 0.5) ** 2
    observed = rk.VariantScore("x", shape + 0.02 * rng.normal(size=54), None, None, None, None, None)
    null = {"x": shape + 0.02 * rng.normal(size=(30, 54))}
    plain = rk.inverted_u_table({"x": observed}, layer, 9, n_boot=300)
    beyond = rk.inverted_u_table({"x": observed}, layer, 9, n_boot=300, null=null)
    assert plain["verdict"].iloc[0] == "inverted U" and beyond["verdict"].iloc[0] == "no depth trend"
    np.testing.assert_allclose(beyond["mid_minus_early"].iloc[0],
                               dg.inverted_u_test(observed.score - null["x"].mean(0), layer, 9, 10).mid_minus_early)
