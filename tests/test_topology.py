"""lib.experiments.topology against bctpy (the Brain Connectivity Toolbox port), networkx and hand computations."""
import json

import bct
import networkx as nx
import numpy as np
import pytest
from scipy.sparse import csgraph

from lib.storage import artifacts
from lib.estimators import networks as nw
from lib.experiments import topology as tp
from lib.estimators.phiid import ATOM_NAMES


def _sym(A):
    W = np.triu(A, 1)
    return W + W.T


def _lognormal(n, seed=0, sigma=1.0):
    rng = np.random.default_rng(seed)
    hub = np.exp(0.5 * rng.normal(size=n))
    return _sym(rng.lognormal(sigma=sigma, size=(n, n)) * hub[:, None] * hub[None, :])


def _blocks(sizes, inside=(0.5, 1.0), between=(0.0, 0.1), seed=0):
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(len(sizes)), sizes)
    same = truth[:, None] == truth[None, :]
    W = np.where(same, rng.uniform(*inside, (len(truth),) * 2), rng.uniform(*between, (len(truth),) * 2))
    return _sym(W), truth


def _networkx_efficiency(W):
    G = nx.Graph()
    G.add_nodes_from(range(len(W)))
    i, j = np.nonzero(np.triu(W, 1))
    G.add_weighted_edges_from((a, b, W.max() / W[a, b]) for a, b in zip(i, j))
    total = sum(1 / d for s, dist in nx.all_pairs_dijkstra_path_length(G) for t, d in dist.items() if s != t)
    return total / (len(W) * (len(W) - 1))


# ------------------------------------------------------------------------------------------------ efficiency

@pytest.mark.parametrize("n,keep", [(8, 1.0), (40, 1.0), (40, 0.1), (60, 0.05)])
def test_efficiency_equals_bctpy_and_networkx_dijkstra(n, keep):
    W = nw.threshold_proportional(_lognormal(n, seed=n), keep)      # 5%: several components
    ours = nw.global_efficiency(W)
    assert abs(ours - bct.efficiency_wei(W / W.max())) < 1e-10
    assert abs(ours - _networkx_efficiency(W)) < 1e-10


def test_pruned_shortest_paths_equal_dense_dijkstra():
    W = _lognormal(120, seed=3, sigma=2.0)
    L = nw._lengths(W)
    np.testing.assert_allclose(nw.shortest_paths(L), csgraph.dijkstra(L, directed=False), rtol=1e-13, atol=0)


def test_efficiency_by_hand_on_a_path():
    # 0 -1- 1 -0.5- 2: lengths 1 and 2 (on W / max W), d02 = 3: E = (2 (1 + 1/2 + 1/3)) / 6
    W = np.array([[0, 1, 0], [1, 0, 0.5], [0, 0.5, 0]], float)
    assert nw.global_efficiency(W) == pytest.approx(2 * (1 + 0.5 + 1 / 3) / 6, abs=1e-15)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.2, 0.5, 1.0])
def test_threshold_proportional_equals_bctpy(p):
    W = _lognormal(50, seed=1)
    np.testing.assert_array_equal(nw.threshold_proportional(W, p), bct.threshold_proportional(W, p))


# ------------------------------------------------------------------------------------------------ modularity

def test_modularity_formula_equals_networkx():
    W, _ = _blocks([7, 9, 5])
    labels = np.random.default_rng(0).integers(0, 3, len(W))
    G = nx.from_numpy_array(W)
    comms = [set(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    assert tp.modularity(W, labels) == pytest.approx(nx.community.modularity(G, comms, weight="weight"), abs=1e-12)


def test_louvain_recovers_a_planted_two_block_network():
    W, truth = _blocks([20, 20], seed=2)
    modules, q = tp.louvain(W, n_seeds=5, seed=0)
    assert nw.nmi(modules, truth) == pytest.approx(1.0)
    assert q == pytest.approx(tp.modularity(W, truth), abs=1e-12)
    ci, q_bct = bct.community_louvain(W, gamma=1, seed=0)
    assert q == pytest.approx(q_bct, abs=1e-9)


def test_louvain_matches_bctpy_and_networkx_on_noisy_blocks():
    W, truth = _blocks([15, 25, 20, 10], inside=(0.2, 1.0), between=(0.0, 0.5), seed=4)
    modules, q = tp.louvain(W, n_seeds=10, seed=1)
    assert q == pytest.approx(tp.modularity(W, modules), abs=1e-12)
    q_bct = max(bct.community_louvain(W, gamma=1, seed=s)[1] for s in range(10))
    G = nx.from_numpy_array(W)
    q_nx = max(nx.community.modularity(G, nx.community.louvain_communities(G, weight="weight", seed=s))
               for s in range(10))
    assert q >= max(q_bct, q_nx) - 2e-3
    assert nw.nmi(modules, truth) > 0.9


def test_louvain_q_is_the_networkx_modularity_of_its_partition_with_an_isolated_node():
    W = _lognormal(50, seed=9)
    W[3, :] = W[:, 3] = 0.0
    modules, q = tp.louvain(W, n_seeds=3, seed=2)
    G = nx.from_numpy_array(W)
    comms = [set(np.flatnonzero(modules == c)) for c in np.unique(modules)]
    assert q == pytest.approx(nx.community.modularity(G, comms, weight="weight"), abs=1e-12)
    assert sorted(np.unique(modules)) == list(range(modules.max() + 1))


def test_louvain_batch_is_best_of_seeds_per_network():
    Ws = np.stack([_blocks([10, 12], seed=s)[0] for s in range(3)])
    modules, q, q_all = tp.louvain_batch(Ws, n_seeds=4, seed=0)
    np.testing.assert_allclose(q, q_all.max(1))
    for g in range(3):
        assert q[g] == pytest.approx(tp.modularity(Ws[g], modules[g]), abs=1e-12)


def test_nmi_equals_bctpy_partition_distance():
    rng = np.random.default_rng(5)
    a, b = rng.integers(0, 4, 60), rng.integers(0, 3, 60)
    assert nw.nmi(a, b) == pytest.approx(bct.partition_distance(a + 1, b + 1)[1], abs=1e-12)
    assert nw.nmi(a, a) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------------ null

def test_null_keeps_weight_distribution_and_strengths_within_one_percent():
    W = _lognormal(100, seed=6)
    W[7, :] = W[:, 7] = 0.0                                      # an isolated node stays isolated
    null, err = nw.strength_null(W, np.random.default_rng(0))
    iu = np.triu_indices(100, 1)
    live = np.delete(np.arange(100), 7)
    np.testing.assert_array_equal(np.sort(null[iu]), np.sort(W[iu]))
    s0, s1 = W.sum(1)[live], null.sum(1)[live]
    assert np.max(np.abs(s1 - s0) / s0) < 0.01 and err == pytest.approx(np.max(np.abs(s1 - s0) / s0))
    assert np.all(null[7] == 0) and np.allclose(null, null.T) and np.all(np.diag(null) == 0)
    assert np.corrcoef(null[iu], W[iu])[0, 1] < 0.9               # randomised, not a copy


def test_null_of_a_heavy_tailed_network_reaches_one_percent():
    rng = np.random.default_rng(3)
    hub = rng.lognormal(sigma=0.9, size=300)                      # strengths spread over ~two decades
    W = _sym(np.outer(hub, hub) * rng.lognormal(sigma=0.6, size=(300, 300)))
    null, err = nw.strength_null(W, np.random.default_rng(1))
    iu = np.triu_indices(300, 1)
    np.testing.assert_array_equal(np.sort(null[iu]), np.sort(W[iu]))
    assert err == pytest.approx(np.max(np.abs(null.sum(1) - W.sum(1)) / W.sum(1))) and err < 0.01


def test_ranking_is_a_stable_argsort():
    rng = np.random.default_rng(8)
    y = np.concatenate([rng.random(3000), np.repeat(rng.random(50), 20), np.zeros(10)])  # ties and zeros
    y = y[rng.permutation(y.size)]
    np.testing.assert_array_equal(nw._ranking(y), np.argsort(y, kind="stable"))


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")  # inside bctpy's null
def test_null_destroys_planted_modules_like_bctpy_null():
    W, truth = _blocks([15, 15], seed=7)
    ours = [tp.louvain(nw.strength_null(W, np.random.default_rng(s))[0], 3, s)[1] for s in range(5)]
    theirs = [tp.louvain(bct.null_model_und_sign(W, seed=s)[0], 3, s)[1] for s in range(3)]
    q = tp.louvain(W, 3, 0)[1]
    assert max(ours) < q / 2 and max(theirs) < q / 2
    assert abs(np.mean(ours) - np.mean(theirs)) < 0.05


def test_versus_null_by_hand():
    r = tp.versus_null(3.0, [1.0, 2.0, 3.0, 0.0])
    assert r["p"] == pytest.approx(2 / 5)
    assert r["z"] == pytest.approx((3.0 - 1.5) / np.std([1, 2, 3, 0], ddof=1))
    assert r["null"]["ci95"] == pytest.approx([np.percentile([1, 2, 3, 0], 2.5), np.percentile([1, 2, 3, 0], 97.5)])


def test_pair_weights_by_hand():
    sts = np.array([[0, 2, -1], [4, 0, 5], [-3, 7, 0]], float)
    degenerate = np.zeros((3, 3), bool)
    degenerate[1, 2] = True                                      # only 2 -> 1 defined
    W = nw.pair_weights(sts, degenerate)
    np.testing.assert_array_equal(W, [[0, 3, 0], [3, 0, 7], [0, 7, 0]])


# ----------------------------------------------------------------------------------------- run folder, errors

def _phiid_file(out_dir, tag="", n_layers=4, n_heads=6, seed=0, sts=None, degenerate=None, **extra):
    rng = np.random.default_rng(seed)
    n = n_layers * n_heads
    layer = np.repeat(np.arange(n_layers), n_heads)
    same_band = (layer[:, None] // 2) == (layer[None, :] // 2)
    atoms = {a: rng.uniform(0, 0.01, (n, n)) for a in ATOM_NAMES}
    atoms["rtr"] = np.where(same_band, rng.uniform(0.5, 1, (n, n)), rng.uniform(0, 0.1, (n, n)))
    atoms["sts"] = rng.lognormal(sigma=0.5, size=(n, n)) if sts is None else sts
    data = {**atoms, "atom_names": np.array(list(ATOM_NAMES)), "head_layer": layer,
            "head_index": np.tile(np.arange(n_heads), n_layers),
            "degenerate": np.eye(n, dtype=bool) if degenerate is None else degenerate,
            "n_valid": np.full((n, n), 3), "seconds": 0.1, "tau": 1, "redundancy": np.str_("MMI"),
            "mode": np.str_("per_prompt"), "backend": np.str_("numpy"), "model": np.str_("random:llama"),
            "activations_file": np.str_(artifacts.path("activations", out_dir, tag=tag).name), **extra}
    return artifacts.save("phiid", out_dir, data, tag=tag, mode="per_prompt")


def _written(out_dir):
    return [p.name for p in (artifacts.path("topology", out_dir), artifacts.path("modules", out_dir)) if p.exists()]


def test_run_writes_topology_json_with_the_claim_block_and_modules_csv(tmp_path):
    _phiid_file(tmp_path)
    _phiid_file(tmp_path, tag="random_init", seed=1)
    out = tp.run_topology(tmp_path, n_null=6, n_louvain=3, thresholds=[0.2, 1.0], n_bands=2)
    summary = json.loads(artifacts.path("topology", tmp_path).read_text())
    claim = summary["claim"]
    assert set(claim) == {"id", "statistic", "value", "ci95", "null", "direction", "paper", "n", "details"}
    assert claim["id"] == "C4" and claim["direction"] == "greater" and claim["n"] == 24
    assert set(claim["null"]) == {"name", "value", "ci95"} and len(claim["null"]["ci95"]) == 2
    assert set(claim["paper"]) == {"value", "text"}
    t = summary["tags"][""]
    assert claim["value"] == pytest.approx(t["syn"]["efficiency"]["observed"] - t["red"]["efficiency"]["observed"])
    assert "random_init" in claim["details"]["baselines"] and "modularity_red_minus_syn" in claim["details"]["trained"]
    assert summary["thresholds"] == [0.1, 0.2, 1.0]
    assert max(t["syn"]["null_strength_error_max"], t["red"]["null_strength_error_max"]) < 0.01
    # the planted redundancy bands: red modules follow the two layer bands, red is more modular than syn
    assert t["red"]["nmi_layers"]["observed"] == pytest.approx(1.0)
    assert t["modularity_red_minus_syn"]["observed"] > t["modularity_red_minus_syn"]["null"]["ci95"][1]
    modules = artifacts.load("modules", tmp_path)
    assert len(modules) == 2 * 2 * 24 and set(modules["tag"]) == {"trained", "random_init"}
    assert set(out["summary"]["measure"]) == {"efficiency", "modularity", "nmi_layers"}


def test_no_null_networks_is_allowed(tmp_path):
    _phiid_file(tmp_path)
    out = tp.run_topology(tmp_path, n_null=0, n_louvain=2, baselines=False)
    assert out["json"]["claim"]["null"]["ci95"] is None and out["json"]["claim"]["value"] is not None


@pytest.mark.parametrize("bad,match", [
    ({"thresholds": [0.0, 1.0]}, "outside"), ({"thresholds": [1.5]}, "outside"), ({"n_null": -1}, "n_null"),
    ({"n_boot": -5}, "n_boot"),
])
def test_bad_settings_fail_before_writing(tmp_path, bad, match):
    _phiid_file(tmp_path)
    with pytest.raises(nw.TopologyError, match=match):
        tp.run_topology(tmp_path, **{"n_louvain": 2, "n_null": 2, **bad})
    assert _written(tmp_path) == []


def test_every_pair_undefined_fails(tmp_path):
    _phiid_file(tmp_path, degenerate=np.ones((24, 24), bool))
    with pytest.raises(nw.TopologyError, match="every head pair is undefined"):
        tp.run_topology(tmp_path, n_null=2, n_louvain=2)
    assert _written(tmp_path) == []


def test_no_positive_weight_fails(tmp_path):
    _phiid_file(tmp_path, sts=-np.ones((24, 24)))
    with pytest.raises(nw.TopologyError, match="no positive weight"):
        tp.run_topology(tmp_path, n_null=2, n_louvain=2)
    assert _written(tmp_path) == []


def test_a_file_of_another_run_fails(tmp_path):
    _phiid_file(tmp_path, model=np.str_("random:gpt2"))
    acts = {"activations": np.zeros((2, 24, 5), np.float32), "tokens": np.zeros((2, 5), int),
            "prompt_input_ids": np.zeros((2, 3), int), "prompt_lengths": np.ones(2, int), "prompt_ids": np.arange(2),
            "prompt_category": np.array(["a", "b"]), "prompt_text": np.array(["a", "b"]),
            "head_layer": np.repeat(np.arange(4), 6), "head_index": np.tile(np.arange(6), 4), "n_layers": 4,
            "n_heads": 6, "n_kv_heads": 6, "pad_token_id": 0, "model": np.str_("random:llama"),
            "chat_template": False, "seconds": 0.0}
    artifacts.save("activations", tmp_path, acts)
    with pytest.raises(nw.TopologyError, match="computed for model 'random:gpt2'"):
        tp.run_topology(tmp_path, n_null=2, n_louvain=2)
    assert _written(tmp_path) == []


def test_a_baseline_file_copied_from_another_tag_fails(tmp_path):
    _phiid_file(tmp_path)
    p = _phiid_file(tmp_path, tag="random_init")
    p.write_bytes(artifacts.path("phiid", tmp_path, mode="per_prompt").read_bytes())   # the trained file, renamed
    with pytest.raises(nw.TopologyError, match="file of another run or tag"):
        tp.run_topology(tmp_path, n_null=2, n_louvain=2)
    assert _written(tmp_path) == []


def test_results_do_not_depend_on_n_jobs(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        _phiid_file(d)
        _phiid_file(d, tag="random_init", seed=1)
    one = tp.run_topology(a, n_null=3, n_louvain=2, n_jobs=1)["json"]
    two = tp.run_topology(b, n_null=3, n_louvain=2, n_jobs=2)["json"]
    assert json.dumps(one["tags"], sort_keys=True) == json.dumps(two["tags"], sort_keys=True)


def test_a_threshold_that_keeps_no_pair_gives_no_modularity():
    W = _lognormal(5, seed=2)                                   # 10 pairs: 5% keeps round(0.5) = 1, 1% keeps 0
    rows, modules = tp.observed_measures(W, (0.01, 1.0), n_louvain=2, seed=0)
    assert rows[0]["edges"] == 0 and rows[0]["efficiency"] == 0.0 and np.isnan(rows[0]["modularity"])
    assert rows[1]["edges"] == 10 and np.isfinite(rows[1]["modularity"])
    np.testing.assert_array_equal(modules[0], np.arange(5))


# ------------------------------------------------------------------------------- C4 CI: bootstrap over prompts

def test_resampled_weights_by_hand():
    values = np.array([[1.0, np.nan, -2.0], [3.0, 4.0, -1.0], [5.0, 6.0, 9.0]])    # [prompts, pairs of 3 heads]
    valid = np.isfinite(values).astype(float)
    W = tp._resampled_weights(values, valid, np.array([2.0, 0.0, 1.0]), 3)          # prompt 0 twice, 2 once
    assert W[0, 1] == pytest.approx((2 * 1 + 5) / 3) and W[1, 0] == W[0, 1]
    assert W[0, 2] == pytest.approx(6.0)                                              # NaN of prompt 0 skipped
    assert W[1, 2] == pytest.approx(max((2 * -2 + 9) / 3, 0.0)) and np.all(np.diag(W) == 0)


def test_c4_ci_is_a_bootstrap_over_prompts_of_the_phiid_files_values(tmp_path):
    import warnings

    from lib.estimators.phiid import DegeneratePairWarning, run_phiid_for_run
    from tests.test_artifacts import activation_arrays
    arrays = activation_arrays(0, n_heads=12)
    rng = np.random.default_rng(1)
    arrays["activations"] = rng.normal(5, 1, (8, 12, 40)).cumsum(2).astype(np.float32)   # 8 prompts, autocorrelated
    arrays.update(tokens=np.zeros((8, 40), int), prompt_input_ids=np.zeros((8, 7), int), prompt_lengths=np.full(8, 7),
                  prompt_ids=np.arange(8), prompt_category=np.array(["a"] * 8),
                  prompt_text=np.array([f"p{i}" for i in range(8)]))
    artifacts.save("activations", tmp_path, arrays)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegeneratePairWarning)
        run_phiid_for_run(tmp_path, modes=["per_prompt"])
    out = tp.run_topology(tmp_path, n_null=4, n_louvain=2, thresholds=[0.2, 1.0], n_bands=2, n_boot=40)
    diff = out["json"]["tags"][""]["efficiency_syn_minus_red"]
    boot, claim = diff["bootstrap"], out["json"]["claim"]
    assert boot["observed"] == pytest.approx(diff["observed"], abs=1e-9)     # per-prompt values = the file's means
    assert claim["ci95"] == boot["ci95"] and boot["ci95"][0] < boot["ci95"][1] and boot["n_prompts"] == 8
    assert "bootstrap over the 8 prompts" in claim["details"]["ci_note"]


def test_without_activations_the_c4_claim_says_why_it_has_no_ci(tmp_path):
    _phiid_file(tmp_path)
    claim = tp.run_topology(tmp_path, n_null=2, n_louvain=2, baselines=False, n_boot=10)["json"]["claim"]
    assert claim["ci95"] is None and "activations.npz is absent" in claim["details"]["ci_note"]
