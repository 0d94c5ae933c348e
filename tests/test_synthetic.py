"""Network-free activations (lib.experiments.synthetic): the planted-core VAR(1) positive control against its closed-form PhiID,
imported activation files and their validation, and both synthetic runs end to end to the claims scorecard."""
import json
import subprocess
import sys

import numpy as np
import pytest

from lib import REPO_ROOT
from lib.pipeline import claims as C, verdicts
from lib.experiments import synthetic as sy
from lib.pipeline.params import problems
from lib.estimators.phiid import ATOM_NAMES, phiid_all_pairs, phiid_pair

SMALL = "synthetic:{}:3x3"          # 9 heads: early, core and late groups of 3


def small(kind="planted-core"):
    return sy.process_for(sy.parse_spec(SMALL.format(kind)))


# ----------------------------------------------------------------------------- the process

def test_stationary_covariance_solves_the_lyapunov_equation_and_matches_a_simulation():
    """Sigma = A Sigma A' + Q, and the covariance and lag-1 cross covariance of simulated series agree with Sigma
    and A Sigma within 5 standard errors (SE from the spread over 20 independent series)."""
    p = small()
    S = p.covariance()
    assert np.allclose(p.A @ S @ p.A.T + p.Q, S, atol=1e-10)
    X = sy.simulate(p, 20, 10_000, np.random.default_rng(3))
    X = X - X.mean(-1, keepdims=True)
    cov = np.einsum("rit,rjt->rij", X, X) / X.shape[2]
    lag = np.einsum("rit,rjt->rij", X[:, :, 1:], X[:, :, :-1]) / (X.shape[2] - 1)     # Cov(x_t, x_{t-1})
    for emp, truth in ((cov, S), (lag, p.lag1())):
        se = emp.std(0, ddof=1) / np.sqrt(len(emp))
        assert np.all(np.abs(emp.mean(0) - truth) <= 5 * se + 1e-12)


def test_no_core_twin_keeps_variance_and_lag1_autocorrelation_and_drops_every_coupling():
    p, q = small(), small("no-core")
    Sp, Sq = p.covariance(), q.covariance()
    assert np.allclose(np.diag(Sp), np.diag(Sq))
    assert np.allclose(np.diag(p.lag1()) / np.diag(Sp), np.diag(q.lag1()) / np.diag(Sq))
    off = ~np.eye(9, dtype=bool)
    assert np.all(Sq[off] == 0) and np.all(q.lag1()[off] == 0)
    assert np.abs(Sp[off]).max() > 0.1                        # the planted one is coupled


def test_independent_heads_have_zero_redundancy_and_mmi_synergy_twice_the_smaller_self_information():
    """Hand derivation for independent x, y under MMI: every cross MI is 0, so D = rtr = 0 and the lattice gives
    sts = 2 min(I(x;a), I(y;b)), with I = -0.5 log(1 - rho^2) of each AR(1)."""
    q = small("no-core")
    rho = np.diag(q.lag1()) / np.diag(q.covariance())
    self_mi = -0.5 * np.log(1 - rho ** 2)
    for i, j in [(0, 4), (3, 8), (1, 2)]:
        atoms = sy.population_atoms(q, i, j)
        assert atoms["rtr"] == pytest.approx(0, abs=1e-12)
        assert atoms["sts"] == pytest.approx(2 * min(self_mi[i], self_mi[j]), rel=1e-10)


def test_closed_form_head_means_show_the_planted_profile():
    """Per-head mean sts / rtr over partners (what rank_diff ranks), in closed form on the default 12 x 4 layout."""
    spec = sy.parse_spec("synthetic:planted-core")
    groups = sy.depth_groups(spec.n_layers, spec.n_heads)
    planted = sy.population_head_means(sy.process_for(spec))
    for atom, core_higher in (("sts", True), ("rtr", False)):
        core, ends = planted[atom][groups == "core"], planted[atom][groups != "core"]
        assert (core.min() > ends.max()) if core_higher else (core.max() < ends.min())
    twin = sy.population_head_means(sy.process_for(spec, planted=False))
    assert np.abs(twin["rtr"]).max() < 1e-12                  # no between-head structure: no redundancy at all
    assert twin["sts"][groups == "core"].mean() <= twin["sts"][groups != "core"].mean()   # no core in synergy


def asymmetric_process(n=4, seed=2):
    """A VAR(1) with random, asymmetric coupling and correlated noise (spectral radius 0.8): A Sigma is not
    symmetric here, unlike in the planted processes, so the closed form's past/future orientation is tested."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, n))
    A *= 0.8 / np.abs(np.linalg.eigvals(A)).max()
    B = rng.standard_normal((n, n))
    layer, index = sy.head_map(n, 1)
    return sy.VarProcess(A, B @ B.T + np.eye(n), layer, index, n, 1)


PROCESSES = {"planted-core": lambda: small("planted-core"), "no-core": lambda: small("no-core"),
             "asymmetric": asymmetric_process}


@pytest.fixture(scope="module")
def replicates():
    """20 independent T = 100,000 series of each process, the engine's atoms of every pair on each."""
    out = {}
    for kind, make in PROCESSES.items():
        p = make()
        X = sy.simulate(p, 20, 100_000, np.random.default_rng(11))
        est = [phiid_all_pairs(X[r:r + 1]) for r in range(len(X))]
        out[kind] = (p, X, {a: np.array([e[a] for e in est]) for a in ATOM_NAMES})
    return out


@pytest.mark.parametrize("kind", list(PROCESSES))
def test_engine_atoms_on_a_long_series_equal_the_population_within_sampling_error(replicates, kind):
    """Every atom of every ordered pair, estimated on one T = 100,000 series, lies within 5 sampling sds of the
    closed form; the sd is the spread over 20 independent series. (Not the SE of the replicate mean: MMI takes
    minima of estimated MIs, and where two population MIs tie (exchangeable heads) the minimum of two estimates
    is biased low by up to ~0.8 of their sd, a bias of the estimator itself that averaging does not remove.)"""
    p, _, est = replicates[kind]
    truth = sy.population_matrices(p, ATOM_NAMES)
    off = ~np.eye(len(p.A), dtype=bool)
    for a in ATOM_NAMES:
        sd = est[a].std(0, ddof=1)[off]
        err = np.abs(est[a][:, off] - truth[a][off])
        assert np.all(err <= 5 * np.maximum(sd, 1e-12)), f"{a}: worst {np.max(err / np.maximum(sd, 1e-12)):.1f} sd"


@pytest.mark.parametrize("kind", list(PROCESSES))
def test_mutual_informations_from_the_atoms_are_unbiased_to_five_standard_errors(replicates, kind):
    """Sums of atoms that are MIs (smooth in the covariance, no minimum): the mean over 20 series lies within 5 SE
    of the closed form plus the O(1/T) bias of a Gaussian MI estimate, d_A d_B / (2 (T - 1))."""
    p, X, est = replicates[kind]
    truth = sy.population_matrices(p, ATOM_NAMES)
    T, off = X.shape[2], ~np.eye(len(p.A), dtype=bool)
    for dims, names in ((1, ("rtr", "rtx", "xtr", "xtx")), (1, ("rtr", "rty", "xtr", "xty")), (4, ATOM_NAMES)):
        E, tr = sum(est[a] for a in names)[:, off], sum(truth[a] for a in names)[off]
        se = E.std(0, ddof=1) / np.sqrt(len(E))
        assert np.all(np.abs(E.mean(0) - tr) <= 5 * se + dims / (2 * (T - 1)))


def test_one_pair_engine_matches_all_pairs_on_the_synthetic_series(replicates):
    _, X, est = replicates["planted-core"]
    got = phiid_pair(X[0, 3], X[0, 4])
    assert all(got[a] == pytest.approx(est[a][0, 3, 4], abs=1e-9) for a in ATOM_NAMES)


def test_affine_shift_to_positive_norms_leaves_phiid_unchanged():
    spec = sy.parse_spec(SMALL.format("planted-core"))
    acts = sy.synthetic_activations(spec, 3, 200, seed=1).astype(np.float64)
    assert acts.min() > 0
    raw = acts - sy.positive_offset(sy.process_for(spec))
    a, b = phiid_all_pairs(acts), phiid_all_pairs(3.0 * raw - 7.0)
    for name in ("sts", "rtr", "xtx"):
        off = ~np.eye(9, dtype=bool)
        assert np.allclose(a[name][off], b[name][off], atol=1e-6)      # float32 storage of the shifted values


def test_spec_parsing_and_params_rule():
    assert sy.parse_spec("synthetic:no-core") == sy.SyntheticSpec("no-core", 12, 4)
    assert sy.parse_spec("synthetic:planted-core:6x2") == sy.SyntheticSpec("planted-core", 6, 2)
    assert not problems("01_extract_activations", {"model": "synthetic:planted-core:6x2"})
    for bad in ("synthetic:core", "synthetic:planted-core:2x4", "synthetic:planted-core:12-4"):
        (msg,) = problems("01_extract_activations", {"model": bad})
        assert "synthetic:" in msg and "\n" not in msg


def test_notebooks_that_run_the_model_refuse_a_network_free_spec_before_running(tmp_path):
    from lib.pipeline.params import NEEDS_NETWORK
    for notebook in NEEDS_NETWORK:
        (msg,) = problems(notebook, {"model": "synthetic:planted-core"})
        assert "no network" in msg and notebook in msg
    assert not problems("05_ablation", {"model": "random:llama"})
    from lib.model.loading import ModelSpecError, load_model
    with pytest.raises(ModelSpecError, match="no network"):
        load_model("synthetic:no-core")


def test_seeds_and_the_random_init_copy_give_other_series():
    spec = sy.parse_spec(SMALL.format("planted-core"))
    a = sy.synthetic_activations(spec, 2, 30, seed=0)
    assert np.array_equal(a, sy.synthetic_activations(spec, 2, 30, seed=0))
    assert not np.array_equal(a, sy.synthetic_activations(spec, 2, 30, seed=1))
    assert not np.array_equal(a, sy.synthetic_activations(spec, 2, 30, seed=0, stream=1))


# ----------------------------------------------------------------------------- imported files

def write_npz(path, **over):
    """A valid file (3 prompts, 3 layers x 2 heads, 40 steps) with the keys in `over` replaced (None: dropped)."""
    arrays = {"activations": 5 + np.random.default_rng(0).random((3, 6, 40)), "n_layers": np.int64(3),
              "n_heads": np.int64(2), **over}
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def _bad_activations():
    good = 5 + np.random.default_rng(0).random((3, 6, 40))
    nan, neg = good.copy(), good.copy()
    nan[1, 2, 3] = np.nan
    neg[0, 0, 0] = -0.5
    return {"wrong shape": dict(activations=good[0]), "NaN": dict(activations=nan), "negative": dict(activations=neg),
            "too few steps": dict(activations=good[:, :, :6]), "heads != n_layers x n_heads": dict(n_heads=np.int64(3)),
            "one prompt": dict(activations=good[:1]), "no n_layers": dict(n_layers=None),
            "tokens shape": dict(tokens=np.zeros((3, 5), np.int64))}


@pytest.mark.parametrize("case", list(_bad_activations()))
def test_malformed_file_is_a_one_line_error_naming_the_file(tmp_path, case):
    path = write_npz(tmp_path / "acts.npz", **_bad_activations()[case])
    with pytest.raises(sy.ActivationsFileError) as e:
        sy.read_file(path)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg and ";" in msg                  # the file; the problem; the fix
    (rule,) = problems("01_extract_activations", {"model": f"file:{path}"})
    assert msg in rule


def test_good_file_is_read_with_its_checksum(tmp_path):
    path = write_npz(tmp_path / "acts.npz", tokens=np.ones((3, 40), np.int64), prompt_ids=np.array([7, 8, 9]))
    f = sy.read_file(path)
    assert f.activations.shape == (3, 6, 40) and f.activations.dtype == np.float32 and (f.n_layers, f.n_heads) == (3, 2)
    import hashlib
    assert f.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    run, arch, info = sy.build_run(f"file:{path}", 1, 1)
    assert list(run.tokens[0]) == [1] * 40 and [p.prompt_id for p in run.prompts] == [7, 8, 9]
    assert info["sha256"] == f.sha256 and arch.head_map() == ([0, 0, 1, 1, 2, 2], [0, 1, 0, 1, 0, 1])


def test_runner_refuses_a_malformed_file_before_writing_anything(tmp_path):
    bad = write_npz(tmp_path / "bad.npz", n_heads=np.int64(5))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "lib.run", "--params", "params/synthetic.yaml", "--set",
                           f"model=file:{bad}", "--set", f"out_dir={out}", "--quiet"], cwd=REPO_ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and "n_layers x n_heads" in lines[0]
    assert not out.exists()


# ----------------------------------------------------------------------------- end to end (slow)

def run_pipeline(params, out, *extra):
    proc = subprocess.run([sys.executable, "-m", "lib.run", "--params", params, "--set", f"out_dir={out}", "--quiet",
                           *extra], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {c["id"]: c for c in json.loads((out / "claims.json").read_text())["claims"]}


@pytest.mark.slow
def test_planted_core_run_supports_c1_c2_c3(tmp_path):
    claims = run_pipeline("params/synthetic.yaml", tmp_path / "synthetic")
    assert [claims[c]["verdict"] for c in ("C1", "C2", "C3")] == ["supported"] * 3
    assert claims["C1"]["value"] < 0 and claims["C2"]["value"] > 0
    assert all(claims[c]["verdict"] == "not tested" for c in ("C5", "C6", "C7"))    # no network: nothing errors


@pytest.mark.slow
def test_no_core_run_supports_none_of_c1_c2_c3(tmp_path):
    claims = run_pipeline("params/synthetic-no-core.yaml", tmp_path / "no-core")
    assert all(claims[c]["verdict"] != "supported" for c in ("C1", "C2", "C3"))
    assert claims["C2"]["details"]["beyond_null"]["shape"] != "inverted U"


@pytest.mark.slow
def test_imported_numpy_file_runs_through_phiid_ranking_and_claims(tmp_path):
    """An npz written with plain numpy (a VAR(1) pair structure by hand, not lib): 02-04 and the claims run."""
    rng = np.random.default_rng(5)
    n_layers, n_heads, prompts, steps = 6, 2, 8, 60
    X = np.zeros((prompts, n_layers * n_heads, steps))
    for t in range(1, steps):
        X[:, :, t] = 0.6 * X[:, :, t - 1] + rng.standard_normal((prompts, n_layers * n_heads))
    path = tmp_path / "mine.npz"
    np.savez(path, activations=(20 + X).astype(np.float32), n_layers=n_layers, n_heads=n_heads)
    out = tmp_path / "imported"
    claims = run_pipeline("params/synthetic.yaml", out, "--set", f"model=file:{path}", "--set",
                          "01_extract_activations.baseline_random_init=false", "--only", "01_extract_activations",
                          "02_phiid", "03_phiid_diagnostics", "04_ranking_variants")
    assert claims["C1"]["verdict"] in verdicts.VERDICTS and claims["C1"]["n"] == 12
    assert claims["C3"]["verdict"] == "not tested"
    manifest = json.loads((out / "manifest.json").read_text())
    import hashlib
    section = manifest["sections"]["01_extract_activations"]
    assert section["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    acts = np.load(out / "activations.npz")
    assert np.array_equal(acts["activations"], (20 + X).astype(np.float32))
