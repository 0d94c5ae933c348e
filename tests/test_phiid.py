"""Accuracy and behaviour of lib.estimators.phiid against independent truth.

Truth comes from (1) the phyid golden cases (tests/data, see its README), (2) `spec_phiid` below, written from
the specification in tests/data/README.md's source: local Gaussian log-densities from scipy (log space, so no
underflow), MMI picking whole local arrays, CCS sign tests with np.sign, and the 16 atoms obtained by *solving*
the PhiID lattice equations (each MI / redundancy = sum of the atoms it contains), not from closed formulas.
"""
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import multivariate_normal

from lib.estimators import phiid
from lib.estimators.phiid import ATOM_NAMES, DegeneratePairWarning, phiid_all_pairs, phiid_pair

DATA = Path(__file__).parent / "data"
GOLDEN = {red: np.load(DATA / f"phyid_gaussian_{red.lower()}.npz") for red in ("MMI", "CCS")}
N_CASES = int(GOLDEN["MMI"]["n_cases"])
ATOL = 1e-9


def golden_case(red, c):
    g = GOLDEN[red]
    return g[f"src_{c:03d}"], g[f"trg_{c:03d}"], int(g["tau"][c])


def as_vector(atoms):
    return np.array([atoms[name] for name in ATOM_NAMES])


# ---------------------------------------------------------------------------------------------------------------
# independent reference, from the specification

def _lattice_matrix():
    """[16 quantities, 16 atoms]: 1 where the atom is part of the MI / redundancy (PhiID lattice)."""
    contains = {"x": "rx", "y": "ry", "xy": "rxys", "a": "rx", "b": "ry", "ab": "rxys"}
    rows = []
    for past, fut in [("x", "a"), ("x", "b"), ("y", "a"), ("y", "b"), ("xy", "a"), ("xy", "b"),
                      ("x", "ab"), ("y", "ab"), ("xy", "ab")]:  # the nine MIs
        rows.append([a[0] in contains[past] and a[2] in contains[fut] for a in ATOM_NAMES])
    for past_atoms, fut_atoms in [("r", "rx"), ("r", "ry"), ("r", "rxys"),      # R_xyta, R_xytb, R_xytab
                                  ("rx", "r"), ("ry", "r"), ("rxys", "r")]:      # R_abtx, R_abty, R_abtxy
        rows.append([a[0] in past_atoms and a[2] in fut_atoms for a in ATOM_NAMES])
    rows.append([a == "rtr" for a in ATOM_NAMES])                                 # double redundancy
    return np.array(rows, dtype=float)


LATTICE = _lattice_matrix()


def spec_local_mi(rows):
    """rows [4, N] = (x, y, a, b) -> [9, N] local MIs, phyid's recipe in log space."""
    scaled = rows / rows.std(axis=1, ddof=1, keepdims=True)
    mu, cov = scaled.mean(axis=1), np.cov(scaled)

    def h(idx):
        return -multivariate_normal.logpdf(scaled[idx].T, mu[idx], cov[np.ix_(idx, idx)])

    sets = [([0], [2]), ([0], [3]), ([1], [2]), ([1], [3]), ([0, 1], [2]), ([0, 1], [3]),
            ([0], [2, 3]), ([1], [2, 3]), ([0, 1], [2, 3])]
    return np.array([h(A) + h(B) - h(A + B) for A, B in sets])


def spec_phiid(rows, redundancy):
    """rows [4, N] -> 16 atom means from local values (independent of lib.estimators.phiid)."""
    I = spec_local_mi(rows)
    pairs = [(0, 2, 4), (1, 3, 5), (6, 7, 8), (0, 1, 6), (2, 3, 7), (4, 5, 8)]  # (first, second, joint)
    if redundancy == "MMI":
        R = [I[a] if I[a].mean() < I[b].mean() else I[b] for a, b, _ in pairs]
        D = I[np.argmin(I[:4].mean(axis=1))]
    else:
        R = []
        for a, b, ab in pairs:
            c = I[a] + I[b] - I[ab]
            same = (np.sign(I[a]) == np.sign(I[b])) & (np.sign(I[a]) == np.sign(I[ab])) & (np.sign(I[a]) == np.sign(c))
            R.append(np.where(same, c, 0.0))
        q = (-I[:4].sum(0) + I[6] + I[7] + I[4] + I[5] - I[8] + R[0] + R[1] - R[2] + R[3] + R[4] - R[5])
        same = np.all([np.sign(I[k]) == np.sign(q) for k in range(4)], axis=0)
        D = np.where(same, q, 0.0)
    quantities = np.concatenate([I, np.array(R), D[None]])          # [16, N]
    return np.linalg.solve(LATTICE, quantities).mean(axis=1)       # atoms in ATOM_NAMES order


def spec_pair(src, trg, tau, redundancy):
    return spec_phiid(np.stack([src[:-tau], trg[:-tau], src[tau:], trg[tau:]]), redundancy)


def coupled_heads(prompts, heads, steps, seed):
    """[prompts, heads, steps] AR(1) heads, each driven by the previous head (non-trivial atoms)."""
    rng = np.random.default_rng(seed)
    e = rng.standard_normal((prompts, heads, steps))
    X = np.zeros_like(e)
    X[..., 0] = e[..., 0]
    for t in range(1, steps):
        X[..., t] = 0.5 * X[..., t - 1] + 0.4 * np.roll(X[..., t - 1], 1, axis=1) + e[..., t]
    return X + rng.uniform(-3, 3, (1, heads, 1))  # per-head offsets


# ---------------------------------------------------------------------------------------------------------------
# the reference itself is right (so it can stand in for phyid where phyid has no golden values)

@pytest.mark.parametrize("red", ["MMI", "CCS"])
def test_spec_reference_reproduces_golden(red):
    for c in (0, 9, 20, 36, 42, 48):
        src, trg, tau = golden_case(red, c)
        np.testing.assert_allclose(spec_pair(src, trg, tau, red), GOLDEN[red]["atom_means"][c], rtol=0, atol=ATOL)


# ---------------------------------------------------------------------------------------------------------------
# phiid_pair against phyid

@pytest.mark.parametrize("red", ["MMI", "CCS"])
@pytest.mark.parametrize("c", range(N_CASES))
def test_phiid_pair_matches_golden(red, c):
    src, trg, tau = golden_case(red, c)
    got = phiid_pair(src, trg, tau=tau, redundancy=red)
    assert tuple(got) == ATOM_NAMES
    np.testing.assert_allclose(as_vector(got), GOLDEN[red]["atom_means"][c], rtol=0, atol=ATOL)


@pytest.mark.parametrize("red", ["MMI", "CCS"])
def test_local_atoms_match_golden_local_arrays(red):
    g = GOLDEN[red]
    for c in g["local_case_indices"]:
        src, trg, tau = golden_case(red, int(c))
        local = phiid.phiid_pair_local(src, trg, tau=tau, redundancy=red)
        np.testing.assert_allclose(np.stack([local[n] for n in ATOM_NAMES]), g[f"local_atoms_{int(c):03d}"],
                                   rtol=0, atol=ATOL)


@pytest.mark.parametrize("red", ["MMI", "CCS"])
def test_swapping_source_and_target_relabels_atoms(red):
    for c in (9, 18, 33, 36, 48):
        src, trg, tau = golden_case(red, c)
        forward, backward = phiid_pair(src, trg, tau, red), phiid_pair(trg, src, tau, red)
        for name in ATOM_NAMES:
            assert backward[phiid.SWAPPED_ATOM[name]] == pytest.approx(forward[name], abs=1e-8)


def test_near_singular_golden_case_is_computed_not_refused():
    src, trg, tau = golden_case("MMI", 48)  # y = x + 1e-3 noise, condition number ~5e6
    with warnings.catch_warnings():
        warnings.simplefilter("error", DegeneratePairWarning)
        result = phiid_all_pairs(np.stack([src, trg])[None], tau=tau)
    assert not result.degenerate[0, 1]
    np.testing.assert_allclose([result[n][0, 1] for n in ATOM_NAMES], GOLDEN["MMI"]["atom_means"][48], atol=ATOL)


@pytest.mark.parametrize("red", ["MMI", "CCS"])
def test_spike_edge_case_is_finite_and_correct(red):
    """phyid returns NaN (density underflow at a 60 SD sample, T = 6000); the log-space value is finite."""
    g = GOLDEN[red]
    src, trg, tau = g["edge_src_000"], g["edge_trg_000"], int(g["edge_tau"][0])
    assert np.isnan(g["edge_atom_means"]).all()
    truth = spec_pair(src, trg, tau, red)  # scipy logpdf: never exponentiates
    got = as_vector(phiid_pair(src, trg, tau, red))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, truth, rtol=0, atol=ATOL)
    local = phiid.phiid_pair_local(src, trg, tau, red)
    assert all(np.isfinite(local[n]).all() for n in ATOM_NAMES)
    result = phiid_all_pairs(np.stack([src, trg])[None], tau=tau, redundancy=red)
    np.testing.assert_allclose([result[n][0, 1] for n in ATOM_NAMES], truth, rtol=0, atol=ATOL)


def test_mmi_closed_form_equals_mean_of_local_log_densities():
    """MMI atom means from log-determinants only == time means of local atoms from log densities."""
    X = coupled_heads(1, 2, 300, seed=5)[0]
    for tau in (1, 3):
        local = phiid.phiid_pair_local(X[0], X[1], tau, "MMI")
        closed = phiid_pair(X[0], X[1], tau, "MMI")
        np.testing.assert_allclose([local[n].mean() for n in ATOM_NAMES], as_vector(closed), atol=1e-12)


def test_against_phyid_when_installed():
    """Optional (phyid is not on PyPI): all pairs, per prompt, both redundancies, tau 1 and 2, vs phyid loops."""
    calc = pytest.importorskip("phyid.calculate")
    X = coupled_heads(2, 4, 60, seed=9)
    for red in ("MMI", "CCS"):
        for tau in (1, 2):
            result = phiid_all_pairs(X, tau=tau, redundancy=red)
            for i, j in ordered_pairs(4):
                runs = [calc.calc_PhiID(p[i], p[j], tau, kind="gaussian", redundancy=red)[0] for p in X]
                want = [np.mean([np.mean(atoms[n]) for atoms in runs]) for n in ATOM_NAMES]
                np.testing.assert_allclose([result[n][i, j] for n in ATOM_NAMES], want, rtol=0, atol=ATOL)


# ---------------------------------------------------------------------------------------------------------------
# phiid_all_pairs against phiid_pair and the reference

@pytest.mark.parametrize("red", ["MMI", "CCS"])
def test_all_pairs_reproduces_golden_cases(red):
    for c in range(N_CASES):
        src, trg, tau = golden_case(red, c)
        result = phiid_all_pairs(np.stack([src, trg])[None], tau=tau, redundancy=red)
        want = GOLDEN[red]["atom_means"][c]
        np.testing.assert_allclose([result[n][0, 1] for n in ATOM_NAMES], want, rtol=0, atol=ATOL)
        np.testing.assert_allclose([result[phiid.SWAPPED_ATOM[n]][1, 0] for n in ATOM_NAMES], want, rtol=0, atol=ATOL)


def ordered_pairs(heads):
    return [(i, j) for i in range(heads) for j in range(heads) if i != j]


@pytest.mark.parametrize("red", ["MMI", "CCS"])
@pytest.mark.parametrize("tau", [1, 2])
def test_per_prompt_is_mean_of_phiid_pair(red, tau):
    X = coupled_heads(3, 5, 40, seed=tau)
    result = phiid_all_pairs(X, tau=tau, redundancy=red, mode="per_prompt")
    for i, j in ordered_pairs(5):
        want = np.mean([as_vector(phiid_pair(p[i], p[j], tau, red)) for p in X], axis=0)
        np.testing.assert_allclose([result[n][i, j] for n in ATOM_NAMES], want, rtol=0, atol=1e-11)
    assert np.isnan(np.diagonal(result["sts"])).all() and result.degenerate.diagonal().all()
    assert (result.n_valid[~np.eye(5, dtype=bool)] == 3).all()


@pytest.mark.parametrize("red", ["MMI", "CCS"])
def test_concat_is_phiid_pair_on_joined_series(red):
    X = coupled_heads(3, 4, 30, seed=3)
    joined = X.transpose(1, 0, 2).reshape(4, -1)
    result = phiid_all_pairs(X, tau=1, redundancy=red, mode="concat")
    for i, j in ordered_pairs(4):
        want = as_vector(phiid_pair(joined[i], joined[j], 1, red))
        np.testing.assert_allclose([result[n][i, j] for n in ATOM_NAMES], want, rtol=0, atol=1e-11)


@pytest.mark.parametrize("red", ["MMI", "CCS"])
@pytest.mark.parametrize("tau", [1, 2])
def test_pooled_is_one_correlation_over_within_prompt_transitions(red, tau):
    X = coupled_heads(4, 4, 25, seed=7 + tau)
    result = phiid_all_pairs(X, tau=tau, redundancy=red, mode="pooled")
    for i, j in ordered_pairs(4):
        # (x, y, a, b) samples: every (t, t + tau) inside each prompt, prompts stacked; no junctions
        rows = np.stack([np.concatenate([p[h, :-tau] for p in X]) for h in (i, j)]
                        + [np.concatenate([p[h, tau:] for p in X]) for h in (i, j)])
        np.testing.assert_allclose([result[n][i, j] for n in ATOM_NAMES], spec_phiid(rows, red), rtol=0, atol=1e-10)


def test_modes_differ_on_prompts_with_different_offsets():
    """Guards against modes silently computing the same thing: with per-prompt offsets they cannot agree."""
    X = coupled_heads(4, 3, 30, seed=11) + np.arange(4)[:, None, None] * 5.0
    sts = {mode: phiid_all_pairs(X, mode=mode)["sts"] for mode in phiid.MODES}
    assert not np.allclose(sts["per_prompt"], sts["concat"], equal_nan=True)
    assert not np.allclose(sts["concat"], sts["pooled"], equal_nan=True)


@pytest.mark.parametrize("red", ["MMI", "CCS"])
def test_swap_symmetry_of_all_pairs(red):
    X = coupled_heads(2, 6, 35, seed=4)
    result = phiid_all_pairs(X, redundancy=red)
    for name in ATOM_NAMES:
        np.testing.assert_array_equal(result[name], result[phiid.SWAPPED_ATOM[name]].T)
    for name in ("rtr", "rts", "str", "sts"):
        np.testing.assert_array_equal(result[name], result[name].T)


def test_batch_size_and_threads_do_not_change_results():
    X = coupled_heads(2, 7, 30, seed=12)
    for red in ("MMI", "CCS"):
        a = phiid_all_pairs(X, redundancy=red, workers=1)
        for kwargs in ({"chunk_pairs": 4, "workers": 3}, {"chunk_pairs": 1, "workers": 2}):
            b = phiid_all_pairs(X, redundancy=red, **kwargs)
            for name in ATOM_NAMES:
                np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-14)


def test_atoms_subset_and_result_access():
    X = coupled_heads(2, 4, 30, seed=13)
    full = phiid_all_pairs(X)
    part = phiid_all_pairs(X, atoms=["sts", "rtr"])
    assert list(part.keys()) == ["sts", "rtr"] and "sts" in part and "xty" not in part
    np.testing.assert_array_equal(part["sts"], full.atoms["sts"])
    assert part.mode == "per_prompt" and part.tau == 1 and part.redundancy == "MMI" and part.seconds > 0
    assert part["sts"].dtype == np.float64 and part["sts"].shape == (4, 4)


def test_float32_input_is_computed_in_float64():
    X = coupled_heads(2, 4, 30, seed=14).astype(np.float32)
    a, b = phiid_all_pairs(X), phiid_all_pairs(X.astype(np.float64))
    for name in ATOM_NAMES:
        np.testing.assert_array_equal(a[name], b[name])


@pytest.mark.parametrize("mode", phiid.MODES)
@pytest.mark.parametrize("red", ["MMI", "CCS"])
def test_torch_backend_agrees_with_numpy(mode, red):
    pytest.importorskip("torch")
    X = coupled_heads(3, 6, 30, seed=15)
    X[1, 2] = 1.5  # a degenerate head in one prompt: masks must agree too
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegeneratePairWarning)
        a = phiid_all_pairs(X, redundancy=red, mode=mode)
        b = phiid_all_pairs(X, redundancy=red, mode=mode, backend="torch")
    np.testing.assert_array_equal(a.degenerate, b.degenerate)
    np.testing.assert_array_equal(a.n_valid, b.n_valid)
    for name in ATOM_NAMES:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-12)


def test_imports_and_runs_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import numpy as np, lib.estimators.phiid as p\n"
            "r = p.phiid_all_pairs(np.random.default_rng(0).standard_normal((2, 3, 20)))\n"
            "assert np.isfinite(r['sts'][0, 1])\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("mode", phiid.MODES)
@pytest.mark.parametrize("red", ["MMI", "CCS"])
def test_lengths_equal_truncating_each_prompt_by_hand(mode, red):
    X = coupled_heads(4, 4, 30, seed=24)
    lengths = np.array([30, 12, 21, 3])      # the last prompt is too short for a per-prompt PhiID
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegeneratePairWarning)
        got = phiid_all_pairs(X, redundancy=red, mode=mode, lengths=lengths)
    off = ~np.eye(4, dtype=bool)
    if mode == "per_prompt":     # mean of each usable prompt's own PhiID on its first lengths[p] steps
        parts = [phiid_all_pairs(X[p:p + 1, :, :n], redundancy=red) for p, n in enumerate(lengths[:3])]
        want = {name: np.mean([r[name] for r in parts], axis=0) for name in ATOM_NAMES}
        assert (got.n_valid[off] == 3).all()
    else:                        # the truncated prompts, joined (concat) or their transitions pooled (pooled)
        series = [X[p, :, :n] for p, n in enumerate(lengths)]
        for i, j in ordered_pairs(4):
            if mode == "concat":
                joined = np.concatenate(series, axis=1)
                rows = np.stack([joined[i, :-1], joined[j, :-1], joined[i, 1:], joined[j, 1:]])
            else:
                rows = np.stack([np.concatenate([s[h, :-1] for s in series]) for h in (i, j)]
                                + [np.concatenate([s[h, 1:] for s in series]) for h in (i, j)])
            np.testing.assert_allclose([got[n][i, j] for n in ATOM_NAMES], spec_phiid(rows, red), rtol=0, atol=1e-10)
        return
    for name in ATOM_NAMES:
        np.testing.assert_allclose(got[name][off], want[name][off], rtol=0, atol=1e-12)


def test_full_lengths_change_nothing_and_fast_stats_accept_lengths():
    X = coupled_heads(3, 5, 25, seed=25)
    for mode in phiid.MODES:
        a, b = phiid_all_pairs(X, mode=mode), phiid_all_pairs(X, mode=mode, lengths=[25, 25, 25])
        np.testing.assert_array_equal(a["sts"], b["sts"])
    lengths = [25, 9, 17]
    fast = phiid.phiid_fast_stats(X, lengths=lengths, per_segment=True)
    for p, n in enumerate(lengths):
        ref = phiid_all_pairs(X[p:p + 1, :, :n], atoms=["sts", "rtr"])
        np.testing.assert_allclose(fast.sts[p], ref["sts"][np.triu_indices(5, 1)], rtol=0, atol=1e-12)
        np.testing.assert_allclose(fast.rtr[p], ref["rtr"][np.triu_indices(5, 1)], rtol=0, atol=1e-12)


@pytest.mark.parametrize("lengths, match", [
    ([20, 20, 20], r"one integer per prompt \(\[2\]\)"),
    ([20.0, 20.0], "one integer per prompt"),
    ([21, 20], r"lengths must lie in \[0, 20\]"),
    ([-1, 20], r"lengths must lie in \[0, 20\]"),
])
def test_bad_lengths_raise_one_clear_value_error(lengths, match):
    with pytest.raises(ValueError, match=match):
        phiid_all_pairs(GOOD, lengths=lengths)


def test_lengths_too_short_for_pooled_raise():
    with pytest.raises(ValueError, match="lengths leave 4 past/future samples in mode 'pooled'"):
        phiid_all_pairs(GOOD, mode="pooled", lengths=[3, 3])


# ---------------------------------------------------------------------------------------------------------------
# degenerate heads

def _make_degenerate(kind, X, h):
    """Make head h of X [prompts, heads, steps] degenerate in every prompt; returns the partner head or None."""
    other = (h + 1) % X.shape[1]
    if kind == "constant":
        X[:, h] = 2.5
    elif kind == "duplicate":
        X[:, h] = X[:, other]
        return other
    elif kind == "affine":
        X[:, h] = -3.0 * X[:, other] + 7.0
        return other
    elif kind == "lag_copy":  # h is other delayed by one step: trg future == src past
        X[:, h, 1:] = X[:, other, :-1]
        return other
    elif kind == "nan":
        X[:, h, 3] = np.nan
    elif kind == "inf":
        X[:, h, 3] = np.inf
    elif kind == "deterministic_trend":  # future an affine map of the past: singular with any partner
        X[:, h] = np.arange(X.shape[2]) * 0.3 - 1.0
    return None


KINDS = ["constant", "duplicate", "affine", "lag_copy", "nan", "inf", "deterministic_trend"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["per_prompt", "pooled"])
@pytest.mark.parametrize("red", ["MMI", "CCS"])
def test_degenerate_heads_give_nan_mask_and_warning(kind, mode, red):
    X = coupled_heads(2, 5, 30, seed=16)
    bad = 2
    partner = _make_degenerate(kind, X, bad)
    with pytest.warns(DegeneratePairWarning, match=rf"heads {bad}\b|heads {partner}\b"):
        result = phiid_all_pairs(X, redundancy=red, mode=mode)
    expected = np.eye(5, dtype=bool)
    if partner is None:
        expected[bad, :] = expected[:, bad] = True
    else:
        expected[bad, partner] = expected[partner, bad] = True
    np.testing.assert_array_equal(result.degenerate, expected)
    for name in ATOM_NAMES:
        np.testing.assert_array_equal(np.isnan(result[name]), expected)
    # the other pairs are unaffected: same numbers as without the bad head
    keep = [h for h in range(5) if h != bad]
    clean = phiid_all_pairs(X[:, keep], redundancy=red, mode=mode)
    for name in ATOM_NAMES:
        sub = result[name][np.ix_(keep, keep)]
        ok = ~expected[np.ix_(keep, keep)]
        np.testing.assert_allclose(sub[ok], clean[name][ok], rtol=0, atol=1e-13)


@pytest.mark.parametrize("kind", KINDS)
def test_phiid_pair_degenerate_gives_nan_and_warning(kind):
    X = coupled_heads(1, 2, 30, seed=17)
    partner = _make_degenerate(kind, X, 1)
    src, trg = X[0, 0], X[0, 1]
    for red in ("MMI", "CCS"):
        with pytest.warns(DegeneratePairWarning):
            atoms = phiid_pair(src, trg, 1, red)
        assert np.isnan(as_vector(atoms)).all(), (kind, partner)


def test_near_duplicate_far_below_threshold_is_degenerate_but_moderate_noise_is_not():
    rng = np.random.default_rng(18)
    x = rng.standard_normal(200)
    with pytest.warns(DegeneratePairWarning):
        assert np.isnan(phiid_pair(x, x + 1e-9 * rng.standard_normal(200))["sts"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", DegeneratePairWarning)
        assert np.isfinite(phiid_pair(x, x + 1e-4 * rng.standard_normal(200))["sts"])  # phyid computes this too


@pytest.mark.parametrize("red", ["MMI", "CCS"])
def test_per_prompt_averages_only_prompts_where_the_pair_is_defined(red):
    X = coupled_heads(4, 4, 30, seed=19)
    X[1, 3] = 0.0          # head 3 constant in prompt 1 only
    X[2, 0, 5] = np.nan    # head 0 broken in prompt 2 only
    with pytest.warns(DegeneratePairWarning, match="undefined in some prompts"):
        result = phiid_all_pairs(X, redundancy=red)
    for i, j in ordered_pairs(4):
        prompts = [p for p in range(4) if not (p == 1 and 3 in (i, j)) and not (p == 2 and 0 in (i, j))]
        assert result.n_valid[i, j] == len(prompts)
        assert not result.degenerate[i, j]
        want = np.mean([as_vector(phiid_pair(X[p, i], X[p, j], 1, red)) for p in prompts], axis=0)
        np.testing.assert_allclose([result[n][i, j] for n in ATOM_NAMES], want, rtol=0, atol=1e-11)


def test_pair_undefined_in_every_prompt_is_nan():
    X = coupled_heads(3, 3, 30, seed=20)
    X[:, 1] = 4.0
    with pytest.warns(DegeneratePairWarning, match="undefined for 2 of 3 head pairs"):
        result = phiid_all_pairs(X)
    assert result.n_valid[0, 1] == 0 and result.degenerate[0, 1] and np.isnan(result["rtr"][0, 1])
    assert np.isfinite(result["rtr"][0, 2]) and result.n_valid[0, 2] == 3


# ---------------------------------------------------------------------------------------------------------------
# bad input

GOOD = np.random.default_rng(21).standard_normal((2, 3, 20))


@pytest.mark.parametrize("kwargs, match", [
    ({"X": GOOD[0]}, "3-D"),
    ({"X": GOOD[..., None]}, "3-D"),
    ({"X": GOOD[:, :1]}, "at least 2 heads"),
    ({"X": GOOD[:0]}, "no prompts"),
    ({"tau": 0}, "tau must be an integer >= 1"),
    ({"tau": -2}, "tau must be an integer >= 1"),
    ({"tau": 1.5}, "tau must be an integer >= 1"),
    ({"tau": 16}, r"steps >= tau \+ 5"),
    ({"X": GOOD[..., :5]}, r"steps >= tau \+ 5"),
    ({"mode": "joint"}, "unknown mode"),
    ({"redundancy": "mmi"}, "unknown redundancy"),
    ({"redundancy": "PhiR"}, "unknown redundancy"),
    ({"backend": "jax"}, "unknown backend"),
    ({"atoms": ["sts", "syn"]}, "unknown atom"),
    ({"atoms": []}, "unknown atom"),
])
def test_bad_input_raises_one_clear_value_error(kwargs, match):
    kwargs = {"X": GOOD, **kwargs}
    with pytest.raises(ValueError, match=match):
        phiid_all_pairs(**kwargs)


@pytest.mark.parametrize("src, trg, tau, match", [
    (np.zeros(20), np.zeros(21), 1, "same length"),
    (np.zeros((20, 2)), np.zeros((20, 2)), 1, "1-D series"),
    (np.arange(5.0), np.arange(5.0), 1, r"steps >= tau \+ 5"),
    (np.arange(20.0), np.arange(20.0), 0, "tau must be"),
])
def test_phiid_pair_bad_input(src, trg, tau, match):
    with pytest.raises(ValueError, match=match):
        phiid_pair(src, trg, tau)
    with pytest.raises(ValueError, match="unknown redundancy"):
        phiid_pair(np.arange(20.0), np.arange(20.0) ** 2, 1, "MIN")


def test_phiid_pair_accepts_column_vectors_and_lists():
    X = coupled_heads(1, 2, 40, seed=22)[0]
    want = as_vector(phiid_pair(X[0], X[1]))
    np.testing.assert_array_equal(as_vector(phiid_pair(X[0][:, None], X[1][:, None])), want)
    np.testing.assert_array_equal(as_vector(phiid_pair(list(X[0]), list(X[1]))), want)


# ---------------------------------------------------------------------------------------------------------------
# artifacts

def test_run_phiid_for_run_writes_every_file_and_mode(tmp_path):
    rng = np.random.default_rng(23)
    head_layer, head_index = np.repeat(np.arange(2), 3), np.tile(np.arange(3), 2)
    for name in ("activations.npz", "activations__random_init.npz"):
        np.savez(tmp_path / name, activations=rng.standard_normal((3, 6, 20)).astype(np.float32),
                 head_layer=head_layer, head_index=head_index, n_layers=2, n_heads=3)
    table = phiid.run_phiid_for_run(tmp_path, modes=["per_prompt", "pooled"])
    assert len(table) == 4 and set(table["file"]) == {"phiid_per_prompt.npz", "phiid_pooled.npz",
                                                      "phiid_per_prompt__random_init.npz",
                                                      "phiid_pooled__random_init.npz"}
    saved = phiid.load_phiid(tmp_path / "phiid_pooled__random_init.npz")
    assert saved["atom_names"] == list(ATOM_NAMES) and saved["mode"] == "pooled" and saved["tau"] == 1
    assert saved["n_prompts"] == 3 and saved["activations_file"] == "activations__random_init.npz"
    np.testing.assert_array_equal(saved["head_layer"], head_layer)
    X = np.load(tmp_path / "activations__random_init.npz")["activations"]
    np.testing.assert_array_equal(saved["sts"], phiid_all_pairs(X, mode="pooled")["sts"])
    only = phiid.run_phiid_for_run(tmp_path, modes="concat", tags=["random_init"])
    assert list(only["file"]) == ["phiid_concat__random_init.npz"]
    with pytest.raises(FileNotFoundError, match="rev-step1000"):
        phiid.run_phiid_for_run(tmp_path, tags=["rev-step1000"])


# ---------------------------------------------------------------------------------------------------------------
# local (per step) atoms for many pairs

@pytest.mark.parametrize("red", ["MMI", "CCS"])
def test_local_pairs_match_golden_local_arrays(red):
    g = GOLDEN[red]
    for c in g["local_case_indices"]:
        src, trg, tau = golden_case(red, int(c))
        X = np.stack([src, trg])[None]
        got = phiid.phiid_local_pairs(X, [(0, 1)], tau=tau, redundancy=red, atoms=None)
        np.testing.assert_allclose(np.stack([got[n][0, 0] for n in ATOM_NAMES]), g[f"local_atoms_{int(c):03d}"],
                                   rtol=0, atol=ATOL)
        swapped = phiid.phiid_local_pairs(X, [(1, 0)], tau=tau, redundancy=red, atoms=None)  # target as source
        np.testing.assert_allclose(np.stack([swapped[phiid.SWAPPED_ATOM[n]][0, 0] for n in ATOM_NAMES]),
                                   g[f"local_atoms_{int(c):03d}"], rtol=0, atol=ATOL)


@pytest.mark.parametrize("mode", phiid.LOCAL_MODES)
@pytest.mark.parametrize("red", ["MMI", "CCS"])
def test_local_pairs_time_mean_equals_all_pairs(mode, red):
    X = coupled_heads(4, 5, 30, seed=26)
    X[2, 3] = 1.0                                  # head 3 undefined in prompt 2
    pairs = [(i, j) for i, j in ordered_pairs(5)]
    local = phiid.phiid_local_pairs(X, pairs, redundancy=red, mode=mode, atoms=None, block_values=200)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegeneratePairWarning)
        ref = phiid_all_pairs(X, redundancy=red, mode=mode)
    for k, (i, j) in enumerate(pairs):
        assert local.defined[k].sum() == (ref.n_valid[i, j] if mode == "per_prompt" else 4 * ref.n_valid[i, j])
        for name in ATOM_NAMES:
            values = local[name][k]
            assert np.isnan(values[~local.defined[k]]).all()
            if local.defined[k].any():
                np.testing.assert_allclose(values[local.defined[k]].mean(axis=-1).mean(), ref[name][i, j],
                                           rtol=0, atol=1e-12)
            else:
                assert np.isnan(ref[name][i, j])


def test_local_pairs_equal_phiid_pair_local_per_prompt():
    X = coupled_heads(3, 4, 25, seed=27)
    local = phiid.phiid_local_pairs(X, [(0, 2), (3, 1)], redundancy="CCS", atoms=["sts", "xty"])
    for k, (i, j) in enumerate([(0, 2), (3, 1)]):
        for p in range(3):
            one = phiid.phiid_pair_local(X[p, i], X[p, j], redundancy="CCS")
            np.testing.assert_allclose(local["xty"][k, p], one["xty"], rtol=0, atol=1e-12)
            np.testing.assert_allclose(local["sts"][k, p], one["sts"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", phiid.LOCAL_MODES)
@pytest.mark.parametrize("red", ["MMI", "CCS"])
def test_streamed_head_means_equal_a_brute_force_loop(mode, red):
    X = coupled_heads(3, 6, 22, seed=28)
    X[1, 4] = 2.0                                  # head 4 undefined in prompt 1
    got = phiid.phiid_local_head_means(X, redundancy=red, mode=mode, atoms=("sts", "rtr"), workers=2,
                                       block_values=50)
    pairs = ordered_pairs(6)
    local = phiid.phiid_local_pairs(X, pairs, redundancy=red, mode=mode, atoms=("sts", "rtr"))
    for h in range(6):
        rows = [k for k, (i, _) in enumerate(pairs) if i == h]     # h as source with every partner
        for name in ("sts", "rtr"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)   # all-NaN slices: head 4 in prompt 1
                want = np.nanmean(local[name][rows], axis=0)
            np.testing.assert_allclose(got[name][h], want, rtol=0, atol=1e-12)
        np.testing.assert_array_equal(got.n_partners[h], local.defined[rows].sum(axis=0))
    one = phiid.phiid_local_head_means(X, redundancy=red, mode=mode, workers=1)
    np.testing.assert_allclose(one["sts"], got["sts"], rtol=0, atol=1e-13)


def test_head_means_time_mean_equals_all_pairs_head_mean():
    X = coupled_heads(3, 5, 30, seed=29)
    got = phiid.phiid_local_head_means(X, atoms=["sts"])
    ref = phiid_all_pairs(X)["sts"]
    np.testing.assert_allclose(got["sts"].mean(axis=(1, 2)), np.nanmean(ref, axis=1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kwargs, match", [
    ({"pairs": [(0, 3)]}, r"out of range: head indices must lie in \[0, 2\]"),
    ({"pairs": [(-1, 2)]}, "out of range"),
    ({"pairs": [(0, 1), (0, 1)]}, r"\[\[0, 1\]\] are listed more than once"),
    ({"pairs": [(1, 1)]}, "pair a head with itself"),
    ({"pairs": [0, 1]}, r"integer array \[pairs, 2\]"),
    ({"pairs": [(0.0, 1.0)]}, r"integer array \[pairs, 2\]"),
    ({"atoms": ["sts", "syn"]}, "unknown atom"),
    ({"tau": 16}, r"steps >= tau \+ 5"),
    ({"tau": 0}, "tau must be an integer >= 1"),
    ({"mode": "concat"}, "unknown mode 'concat' for local PhiID"),
    ({"redundancy": "mmi"}, "unknown redundancy"),
])
def test_local_pairs_bad_input_raises_one_clear_error(kwargs, match):
    kwargs = {"X": GOOD, "pairs": [(0, 1)], **kwargs}
    with pytest.raises(ValueError, match=match):
        phiid.phiid_local_pairs(**kwargs)


def test_head_means_refuse_atoms_that_change_under_swap():
    with pytest.raises(ValueError, match="change when source and target swap"):
        phiid.phiid_local_head_means(GOOD, atoms=["xty"])
    with pytest.raises(ValueError, match=r"steps >= tau \+ 5"):
        phiid.phiid_local_head_means(GOOD, tau=20)
