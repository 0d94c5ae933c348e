"""lib/pipeline/cost.py's host work (Work.host, HOST_UNITS) against what the library really computes: counters on the
three PhiID kernels' pair loops (pairs evaluated in each segment, samples of each segment) and on 08's graph
functions, around the library calls of notebooks 02, 03, 04, 08 and 11, on a run folder of AR(1) series with a
random-init copy."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from lib.estimators.phiid import DegeneratePairWarning, engine, fast, run_phiid_for_run
from lib.estimators.phiid import local as local_kernel
from lib.pipeline import cost
from lib.storage.store import save_npz

P, LAYERS, PER_LAYER, T = 5, 3, 4, 12
H = LAYERS * PER_LAYER
PAIRS = H * (H - 1) // 2
RUN = {"01_extract_activations": {"n_prompts": P, "n_tokens": T, "baseline_random_init": True, "revisions": []}}
DIMS = type("Dims", (), {"total_heads": H})()


def _series(seed):
    """[P, H, T] AR(1) heads with a shared drive between neighbours (defined PhiID for every pair)."""
    rng = np.random.default_rng(seed)
    phi, e = np.linspace(0.1, 0.8, H), rng.normal(size=(P, H, T))
    X = np.zeros((P, H, T))
    for t in range(1, T):
        X[:, :, t] = phi * X[:, :, t - 1] + e[:, :, t]
        X[:, 1::2, t] += 0.5 * X[:, 0::2, t - 1]
    return X + 3.0


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Activations of the model and of its random-init copy, and 02's three modes for both (not counted)."""
    folder = tmp_path_factory.mktemp("hostrun")
    for seed, name in ((0, "activations.npz"), (1, "activations__random_init.npz")):
        save_npz(folder / name, activations=_series(seed).astype(np.float32), tokens=np.ones((P, T), dtype=np.int64),
                 head_layer=np.repeat(np.arange(LAYERS), PER_LAYER), head_index=np.tile(np.arange(PER_LAYER), LAYERS),
                 n_layers=LAYERS, n_heads=PER_LAYER, model="synthetic")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegeneratePairWarning)
        run_phiid_for_run(folder, modes=["per_prompt", "concat", "pooled"])
    return folder


@pytest.fixture
def counted(monkeypatch):
    """units: HOST_UNITS name -> units the kernels evaluated since the fixture started (pairs x segments per
    kernel; local: also pairs x samples)."""
    units = dict.fromkeys(cost.HOST_UNITS, 0)
    for module, unit in ((engine, "phiid_pair_s"), (fast, "fast_pair_s"), (local_kernel, "local_pair_s")):
        original = module._for_each_chunk

        def wrapped(X, mode, tau, lengths, be, local, chunk_of, workers, work, *rest, _o=original, _u=unit):
            def counting(s, seg, pc):
                n = pc.sl.stop - pc.sl.start
                units[_u] += n
                if _u == "local_pair_s":
                    units["local_sample_s"] += n * seg.z.shape[1]
                return work(s, seg, pc)
            return _o(X, mode, tau, lengths, be, local, chunk_of, workers, counting, *rest)
        monkeypatch.setattr(module, "_for_each_chunk", wrapped)
    return units


def test_phiid_pair_segments_equal_the_engine_loops(tmp_path, run_dir, counted):
    import shutil
    for f in run_dir.glob("activations*.npz"):
        shutil.copy(f, tmp_path / f.name)
    run_phiid_for_run(tmp_path, modes=["per_prompt", "concat", "pooled"])
    work = cost.phiid({"modes": ["per_prompt", "concat", "pooled"], "tags": None}, RUN, DIMS)
    # by hand: 66 pairs x (5 prompts + concat + pooled) x 2 files; written: 66 pairs in each of 3 modes x 2 files
    assert counted["phiid_pair_s"] == work.host["phiid_pair_s"] == 66 * 7 * 2
    assert work.host["phiid_file_pair_s"] == 66 * len(list(tmp_path.glob("phiid_*.npz"))) == 66 * 6


def test_diagnostics_c1_fast_segments_equal_the_engine_loops(run_dir, counted):
    from lib.pipeline import claims
    for tag in ("", "random_init"):
        claims.head_evidence(run_dir, tag, n_surrogates=3)
    work = cost.diagnostics({"c1_surrogates": 3}, RUN, DIMS)
    # by hand: 2 copies x (data + 3 surrogates) x 5 prompts x 66 pairs
    assert counted["fast_pair_s"] == work.host["fast_pair_s"] == 2 * 4 * 5 * 66


def test_ranking_fast_segments_equal_the_notebook_calls(run_dir, counted):
    from lib.experiments import ranking as rk
    variants = ["rank_diff", "balance", "tdmi_normalized", "concat", "pooled", "detrended", "first_difference",
                "autocorr_residualized"]
    inputs = rk.load_inputs(run_dir, variants)                       # as notebook 04, in its order
    scores = inputs.scores()
    rk.split_half_reliability(inputs, n_splits=2, seed=0)
    rk.surrogate_scores(inputs, n_surrogates=2, seed=0, n_jobs=1)
    rk.baseline_profiles(run_dir, variants, n_boot=10, seed=0)
    assert set(scores) == set(variants)
    p = {"variants": variants, "n_splits": 2, "n_surrogates": 2, "n_jobs": 1, "baselines": True}
    # by hand: sources per_prompt raw, detrended, first_difference (5 segments each), concat, pooled (1 each) = 17
    # segments a pass; passes: the data, 2 surrogates, the random-init file; halves: 2 x 2 splits x (concat, pooled)
    assert counted["fast_pair_s"] == cost.ranking(p, RUN, DIMS).host["fast_pair_s"] == 66 * (4 * 17 + 8)


def test_local_units_equal_the_kernel_loops(run_dir, counted):
    from lib.estimators.phiid import phiid_local_head_means
    from lib.storage import artifacts
    for tag in ("", "random_init"):
        phiid_local_head_means(artifacts.load("activations", run_dir, tag=tag, keys=["activations"])["activations"], tau=1)
    work = cost.local({"tags": ["", "random_init"], "tau": 1, "mode": "per_prompt", "batch_size": 8}, RUN, DIMS)
    # by hand: 2 tags x 5 prompts x 66 pairs; samples: x (12 steps - tau 1)
    assert (counted["local_pair_s"], counted["local_sample_s"]) == (2 * 5 * 66, 2 * 5 * 66 * 11)
    assert (work.host["local_pair_s"], work.host["local_sample_s"]) == (2 * 5 * 66, 2 * 5 * 66 * 11)


def test_topology_graph_units_bound_the_real_calls(run_dir, counted, monkeypatch):
    """08's calls counted: nodes x edges of every efficiency, pairs of every null, pairs x runs of every Louvain
    batch. The estimate counts every pair of a full network as an edge and round(p x pairs) at threshold p; pairs
    whose weight is clipped to 0 (negative sts or rtr) have no edge, so the real node x edge count is at most the
    estimate's (and here not below 60% of it); the null and Louvain counts are exact."""
    from lib.experiments import topology as tp
    graph = {"efficiency": [], "null": 0, "louvain": 0}
    efficiency, null, louvain = tp.global_efficiency, tp.strength_null, tp.louvain_batch

    def count_efficiency(W):
        graph["efficiency"].append(len(W) * int((np.triu(W, 1) > 0).sum()))
        return efficiency(W)

    def count_null(W, rng, *a, **k):
        graph["null"] += len(W) * (len(W) - 1) // 2
        return null(W, rng, *a, **k)

    def count_louvain(Ws, n_seeds=20, *a, **k):
        graph["louvain"] += n_seeds * sum(int((np.triu(W, 1) > 0).sum()) for W in Ws)
        return louvain(Ws, n_seeds, *a, **k)
    for name, f in (("global_efficiency", count_efficiency), ("strength_null", count_null),
                    ("louvain_batch", count_louvain)):
        monkeypatch.setattr(tp, name, f)
    p = {"thresholds": [0.05, 0.1, 0.2, 0.5, 1.0], "n_louvain": 2, "n_null": 3, "n_boot": 4, "mode": "per_prompt",
         "n_jobs": 1, "baselines": True}
    tp.run_topology(run_dir, mode="per_prompt", thresholds=p["thresholds"], n_louvain=2, n_null=3, n_boot=4, n_jobs=1)
    host = cost.topology(p, RUN, DIMS).host
    # by hand: per file and network 5 thresholds + 3 nulls efficiencies, per file 2 x (4 + 1) bootstrap ones
    assert len(graph["efficiency"]) == 2 * 2 * (5 + 3) + 2 * 2 * 5
    assert graph["null"] == host["null_s"] == 2 * 2 * 3 * PAIRS
    # node x edge units: thresholds keep round(p x 66) pairs (3 + 7 + 13 + 33 + 66 = 122), nulls and bootstrap
    # networks all 66; Louvain: n_louvain runs of each threshold's network and of each null
    assert host["efficiency_s"] == H * (2 * 2 * (122 + 3 * 66) + 2 * 2 * 5 * 66)
    assert host["louvain_s"] == 2 * 2 * 2 * (122 + 3 * 66)
    for real, estimate in ((sum(graph["efficiency"]), host["efficiency_s"]), (graph["louvain"], host["louvain_s"])):
        assert 0.6 * estimate <= real <= estimate, (real, estimate)
    assert counted["fast_pair_s"] == host["fast_pair_s"] == 2 * 5 * PAIRS      # the bootstrap's per-prompt PhiID
