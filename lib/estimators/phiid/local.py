"""Local (per time step) PhiID atoms for many pairs: the pointwise terms whose mean over steps is the
average atom."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from lib.estimators.phiid.atoms import (ATOM_NAMES, MI_NAMES, REDUNDANCIES, atoms_from_parts, ccs_local_redundancies,
                                        mmi_local_redundancies)
from lib.estimators.phiid.engine import (_Backend, _check_X, _check_atoms, _chunk_geometry, _default_workers,
                                         _for_each_chunk, _identity_where_undefined, _mean_mi_batched, _nonsingular,
                                         _one_minus_sq, _pair_geometry, _segments, _twice_local_mi, _two_variable_quad)
from lib.estimators.phiid.reference import _check_choice, _check_tau, _zscore

__all__ = ["LOCAL_MODES", "phiid_local_pairs", "phiid_local_head_means"]


# ----------------------------------------------------------------------------------------------------------------
# local (per step) atoms for many pairs
#
# Segments are stacked ([segments, 2 heads, samples]: every prompt in per_prompt mode, one pooled segment
# otherwise) so that a block of pairs is evaluated for every prompt at once: correlations and geometry
# [segments, pairs], local values [segments, pairs, samples]. Same z-scores, geometry, degeneracy rule and local
# MIs as the all-pairs engine; MMI picks whole local arrays by their means within each segment (phyid's rule).

LOCAL_MODES = ("per_prompt", "pooled")
SYMMETRIC_ATOMS = ("rtr", "rts", "str", "sts")   # unchanged when source and target swap


@dataclass
class _Stacked:
    """Every segment at once. z: [segments, 2 heads, samples] z-scored pasts then futures; corr: [segments,
    2 heads, 2 heads]; lag: [segments, heads] corr(past_h, future_h); ok: [segments, heads] usable heads;
    self_quad: [segments, heads, samples] local I(past_h; future_h) quadratic part."""
    heads: int
    z: np.ndarray
    corr: np.ndarray
    lag: np.ndarray
    ok: np.ndarray
    self_quad: np.ndarray


def _stacked_segments(X, mode, tau):
    """X [prompts, heads, steps] -> _Stacked of the mode's segments (per_prompt or pooled)."""
    from threadpoolctl import threadpool_limits
    past = np.stack([p for p, _ in _segments(X, mode, tau)])
    future = np.stack([f for _, f in _segments(X, mode, tau)])
    S, H, N = past.shape
    zp, ok_p = _zscore(past.reshape(S * H, N))
    zf, ok_f = _zscore(future.reshape(S * H, N))
    z = np.concatenate([zp.reshape(S, H, N), zf.reshape(S, H, N)], axis=1)
    with threadpool_limits(limits=1, user_api="blas"):
        corr = z @ z.transpose(0, 2, 1) / (N - 1)
    lag = corr[:, np.arange(H), H + np.arange(H)]
    with np.errstate(divide="ignore", invalid="ignore"):
        r = lag[..., None]
        self_quad = _two_variable_quad(z[:, :H], z[:, H:], r, _one_minus_sq(r))
    return _Stacked(H, z, corr, lag, (ok_p & ok_f).reshape(S, H), self_quad)


def _local_block(st, i, j, redundancy, names):
    """Local atoms of pairs (source i, target j) in every segment -> (dict name -> [segments, pairs, samples],
    defined [segments, pairs]); values where undefined are finite garbage (callers mask them)."""
    H, C = st.heads, st.corr
    r = {"xy": C[:, i, j], "ab": C[:, H + i, H + j], "xb": C[:, i, H + j], "ya": C[:, j, H + i],
         "xa": st.lag[:, i], "yb": st.lag[:, j]}
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        g = _pair_geometry(r, np)
        defined = _nonsingular(g, np) & st.ok[:, i] & st.ok[:, j]
    g = _identity_where_undefined(g, defined, np)
    expand = lambda d: {k: v[..., None] for k, v in d.items()}  # noqa: E731  [S, pairs] -> [S, pairs, 1]
    rows = (st.z[:, i], st.z[:, j], st.z[:, H + i], st.z[:, H + j])
    twice = _twice_local_mi(rows, (st.self_quad[:, i], st.self_quad[:, j]), expand(r), expand(g),
                            expand(_mean_mi_batched(g, np)))
    # both redundancy rules and the atoms are linear in the MIs (MMI compares means): halve only the atoms
    red = mmi_local_redundancies(twice) if redundancy == "MMI" else ccs_local_redundancies(twice)
    return {name: 0.5 * v for name, v in atoms_from_parts({**twice, **red}, names).items()}, defined


def _per_prompt_axis(values, prompts):
    """[segments, pairs, samples] -> [pairs, prompts, steps - tau] (pooled: the pooled samples split back into
    prompts)."""
    return values.transpose(1, 0, 2).reshape(values.shape[1], prompts, -1)


def _check_local(X, tau, redundancy, mode, atoms, allowed=ATOM_NAMES):
    _check_choice(redundancy, REDUNDANCIES, "redundancy")
    if mode not in LOCAL_MODES:
        raise ValueError(f"unknown mode {mode!r} for local PhiID: use one of {LOCAL_MODES} (concat has no "
                         f"per-prompt steps)")
    names = _check_atoms(atoms)
    wrong = [a for a in names if a not in allowed]
    if wrong:
        raise ValueError(f"atoms {wrong} change when source and target swap, so a per-head mean over partners "
                         f"is not defined for them: use atoms from {allowed}, or phiid_local_pairs")
    X = _check_X(X)
    _check_tau(tau, X.shape[2])
    return X, names


def _check_pairs(pairs, heads):
    """pairs: [pairs, 2] (source, target) head indices -> int64 array; out of range, self or repeated pairs
    raise."""
    arr = np.asarray(pairs)
    if arr.ndim != 2 or arr.shape[1] != 2 or len(arr) == 0 or arr.dtype.kind not in "iu":
        raise ValueError(f"pairs must be a non-empty list of (source, target) head indices, an integer array "
                         f"[pairs, 2]; got a {arr.dtype} array of shape {arr.shape}")
    bad = np.flatnonzero(((arr < 0) | (arr >= heads)).any(axis=1))
    if len(bad):
        raise ValueError(f"pairs {arr[bad[:5]].tolist()} are out of range: head indices must lie in "
                         f"[0, {heads - 1}] (axis 1 of X has {heads} heads)")
    same = np.flatnonzero(arr[:, 0] == arr[:, 1])
    if len(same):
        raise ValueError(f"pairs {arr[same[:5]].tolist()} pair a head with itself: PhiID needs two different "
                         f"heads")
    unique, counts = np.unique(arr, axis=0, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"pairs {unique[counts > 1][:5].tolist()} are listed more than once: list each "
                         f"(source, target) pair once")
    return arr.astype(np.int64)


@dataclass
class LocalPairs:
    """Local PhiID of explicit pairs. atoms: name -> [pairs, prompts, steps - tau] (nats), entry [k, p, t] = the
    atom of pair k at the transition t -> t + tau of prompt p; NaN where the pair is undefined (per_prompt: in
    that prompt; pooled: everywhere). defined: [pairs, prompts]. pairs: [pairs, 2] (source, target)."""
    atoms: dict
    defined: np.ndarray
    pairs: np.ndarray
    mode: str
    tau: int
    redundancy: str

    def __getitem__(self, name):
        return self.atoms[name]


def _block_size(segments, samples, block_values):
    """Pairs per block so that one local array [segments, pairs, samples] holds about block_values values."""
    return max(1, block_values // (segments * samples))


def phiid_local_pairs(X, pairs, tau=1, redundancy="MMI", mode="per_prompt", atoms=("sts", "rtr"),
                      block_values=1 << 17):
    """Local (per step) PhiID atoms of an explicit list of pairs -> LocalPairs.

    X: [prompts, heads, steps]; pairs: [pairs, 2] (source, target) head indices, each pair once, no head with
    itself; mode: "per_prompt" (each prompt's own correlation matrix) or "pooled" (one correlation matrix from
    all within-prompt transitions, evaluated on each prompt's steps); atoms: names among ATOM_NAMES.
    The values are phyid's local atoms (calc_PhiID's local arrays); their time mean is phiid_all_pairs."""
    X, names = _check_local(X, tau, redundancy, mode, atoms)
    pairs = _check_pairs(pairs, X.shape[1])
    P = X.shape[0]
    st = _stacked_segments(X, mode, tau)
    out = {name: np.empty((len(pairs), P, X.shape[2] - tau)) for name in names}
    defined = np.empty((len(pairs), P), dtype=bool)
    step = _block_size(*st.z.shape[::2], block_values)
    for start in range(0, len(pairs), step):
        sl = slice(start, start + step)
        values, ok = _local_block(st, pairs[sl, 0], pairs[sl, 1], redundancy, names)
        ok = np.broadcast_to(ok.T, (ok.shape[1], P))
        for name in names:
            out[name][sl] = np.where(ok[..., None], _per_prompt_axis(values[name], P), np.nan)
        defined[sl] = ok
    return LocalPairs(out, defined, pairs, mode, int(tau), redundancy)


@dataclass
class LocalHeadMeans:
    """Per head, the local atoms averaged over all its partners. atoms: name -> [heads, prompts, steps - tau]
    (nats), entry [h, p, t] = mean over the heads k defined with h in prompt p of the atom of pair (h, k) at
    transition t -> t + tau; NaN where no partner is defined. n_partners: [heads, prompts]."""
    atoms: dict
    n_partners: np.ndarray
    mode: str
    tau: int
    redundancy: str
    seconds: float

    def __getitem__(self, name):
        return self.atoms[name]


def _head_blocks(heads, block):
    """(source h, partners k > h in blocks of at most `block`) covering every unordered pair once."""
    return [(h, np.arange(k, min(k + block, heads))) for h in range(heads - 1) for k in range(h + 1, heads, block)]


def _accumulate_head_block(st, h, ks, redundancy, names, sums, counts):
    """Add the local atoms of pairs (h, k) for k in ks to the running sums of h and of every k."""
    values, ok = _local_block(st, np.full(len(ks), h), ks, redundancy, names)
    for name in names:
        v = np.where(ok[..., None], values[name], 0.0)                 # [segments, pairs, samples]
        sums[name][h] += v.sum(axis=1)
        sums[name][ks] += v.transpose(1, 0, 2)
    counts[h] += ok.sum(axis=1)
    counts[ks] += ok.T


def phiid_local_head_means(X, tau=1, redundancy="MMI", mode="per_prompt", atoms=("sts", "rtr"), workers=None,
                           block_values=1 << 17, progress=False):
    """Per-head local atoms averaged over all partners, streamed -> LocalHeadMeans.

    Memory O(heads x prompts x steps): no pair-level local array is kept. atoms: swap-invariant atoms only
    (SYMMETRIC_ATOMS: rtr, rts, str, sts), so each unordered pair is computed once and added to both heads.
    MMI: per-pair quadratic forms summed over partners with per-segment matrix products (_HeadSums); pairs in
    chunks on `workers` threads. CCS: local values of blocks of pairs (about block_values values each), each
    of `workers` threads with its own running sums (progress: a tqdm bar over the blocks). The result depends
    on workers only through the order of floating-point additions (~1e-15)."""
    t0 = time.perf_counter()
    X, names = _check_local(X, tau, redundancy, mode, atoms, allowed=SYMMETRIC_ATOMS)
    P, H = X.shape[:2]
    workers = workers or _default_workers("numpy")
    if redundancy == "MMI":
        sums, counts = _mmi_head_means(X, tau, mode, names, workers)
    else:
        sums, counts = _ccs_head_sums(X, tau, mode, names, workers, block_values, progress)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = {name: _head_axis(sums[name] / counts[..., None], P) for name in names}
    n_partners = np.broadcast_to(counts, (H, P)) if counts.shape[1] == 1 else counts
    return LocalHeadMeans(means, np.ascontiguousarray(n_partners), mode, int(tau), redundancy,
                          time.perf_counter() - t0)


# MMI per-head means without pair-level local arrays. Every local MI is its closed-form mean plus half a quadratic
# form of the pair's z-scored (x, y, a, b)(t) (the residual terms of _twice_local_mi, as squared linear forms), and
# under MMI every atom is a fixed (per pair) linear combination of the nine MIs. So a pair's local atom is
# mean + 1/2 w(t)^T M w(t), and the sum over all partners k of head h expands into per-segment matrix products
# [heads, heads] @ [heads, samples] of per-pair coefficients with x, a, x^2, a^2 and x a. Rounding grows like
# 1e-16 / (smallest residual variance of the pair): ~1e-12 for well-conditioned pairs.

_SWAP = (1, 0, 3, 2)                     # (x, y, a, b) seen from the target: (y, x, b, a)
_QUAD_TERMS = [(p, q) for p in range(4) for q in range(p, 4)]


def _quadratic_terms(r, g):
    """Quadratic parts of the nine local MIs as sums of squared linear forms: dict MI name -> list of
    (u, weight) with q_A(t) + q_B(t) - q_AB(t) = sum weight * (u . w(t))^2, w = (x, y, a, b)(t); u: dict
    position -> coefficient ([pairs] arrays or 1.0). The same residuals as _twice_local_mi."""
    def minus(u, v, c):                                   # u - c * v
        out = dict(u)
        for k, value in v.items():
            out[k] = out.get(k, 0.0) - c * value
        return out

    def two(k, m, rr, det):                               # v^2 - (v - r u)^2 / det, u = w_k, v = w_m
        return [({m: 1.0}, 1.0), ({k: -rr, m: 1.0}, -1 / det)]

    w_y = {0: -r["xy"] / g["sd_xy"], 1: 1 / g["sd_xy"]}
    e_a = minus({0: -r["xa"], 2: 1.0}, w_y, g["l_ya"])
    e_b = minus({0: -r["xb"], 3: 1.0}, w_y, g["l_yb"])
    w_b = {2: -r["ab"] / g["sd_ab"], 3: 1 / g["sd_ab"]}
    e_x = minus({0: 1.0, 2: -r["xa"]}, w_b, g["l_bx"])
    e_y = minus({1: 1.0, 2: -r["ya"]}, w_b, g["l_by"])
    e_b_xya = minus(e_b, e_a, g["cov_ab_xy"] / g["var_a_xy"])
    return {"I_xta": two(0, 2, r["xa"], g["det_xa"]), "I_xtb": two(0, 3, r["xb"], g["det_xb"]),
            "I_yta": two(1, 2, r["ya"], g["det_ya"]), "I_ytb": two(1, 3, r["yb"], g["det_yb"]),
            "I_xyta": [({2: 1.0}, 1.0), (e_a, -1 / g["var_a_xy"])],
            "I_xytb": [({3: 1.0}, 1.0), (e_b, -1 / g["var_b_xy"])],
            "I_xtab": [({0: 1.0}, 1.0), (e_x, -1 / g["var_x_ab"])],
            "I_ytab": [({1: 1.0}, 1.0), (e_y, -1 / g["var_y_ab"])],
            "I_xytab": [({2: 1.0}, 1.0), (w_b, 1.0), (e_a, -1 / g["var_a_xy"]),
                        (e_b_xya, -g["var_a_xy"] / g["schur_ab_xy"])]}


def _atom_form(coef, terms):
    """coef: [pairs, 9] coefficients of one atom over MI_NAMES; terms: _quadratic_terms -> dict (p, q), p <= q ->
    [pairs] entries of the atom's symmetric form M (w^T M w = its quadratic part)."""
    M = {}
    for k, name in enumerate(MI_NAMES):
        c = coef[:, k]
        if not c.any():
            continue
        for u, weight in terms[name]:
            cw = c * weight
            for p in u:
                for q in u:
                    if p <= q:
                        M[p, q] = M.get((p, q), 0.0) + cw * u[p] * u[q]
    return M


def _mmi_coefficients(mean_mi, names):
    """Each atom of `names` under MMI (picks made on the closed-form means, phyid's rule) as coefficients over
    MI_NAMES -> dict name -> [pairs, 9]."""
    n = len(mean_mi["I_xta"])
    onehot = {name: np.broadcast_to(np.eye(len(MI_NAMES))[k], (n, len(MI_NAMES))) for k, name in enumerate(MI_NAMES)}
    red = mmi_local_redundancies(onehot, means={k: v[:, None] for k, v in mean_mi.items()})
    return atoms_from_parts({**onehot, **red}, names)


class _HeadSums:
    """Running per-head sums of local atoms for one atom under MMI: per-segment [heads, heads] coefficient
    matrices (one per entry of the symmetric 4x4 form, from head h's point of view: (x_h, x_k, a_h, a_k)) and
    the per-pair means, turned into [heads, samples] sums by segment_sums."""

    def __init__(self, heads, segments, samples):
        self.A = np.zeros((len(_QUAD_TERMS), heads, heads))
        self.mean = np.zeros((heads, heads))
        self.sums = np.zeros((heads, segments, samples))

    def add_pairs(self, i, j, M, mean, defined):
        """Pairs (i, j) (source i): M (p, q) -> [pairs] form entries in (x_i, x_j, a_i, a_j) order, mean [pairs],
        defined [pairs]."""
        for t, (p, q) in enumerate(_QUAD_TERMS):
            factor = 1.0 if p == q else 2.0
            swapped = tuple(sorted((_SWAP[p], _SWAP[q])))
            self.A[t, i, j] = np.where(defined, factor * M.get((p, q), 0.0), 0.0)
            self.A[t, j, i] = np.where(defined, factor * M.get(swapped, 0.0), 0.0)
        self.mean[i, j] = self.mean[j, i] = np.where(defined, mean, 0.0)

    def segment_sums(self, s, x, a):
        """Sum over partners of the local atom for every head of segment s: x, a [heads, samples] z-scored
        pasts and futures."""
        w = {0: x, 2: a}                                  # head h's own rows; partners' rows enter through A @ .
        out = self.mean.sum(1)[:, None] * np.ones_like(x)
        for t, (p, q) in enumerate(_QUAD_TERMS):
            A = self.A[t]
            own = [k for k in (p, q) if k in w]
            other = [{1: x, 3: a}[k] for k in (p, q) if k not in w]
            if not other:                                 # both factors are head h's own rows
                term = A.sum(1)[:, None] * w[own[0]] * w[own[1]]
            elif not own:                                 # both factors are the partner's rows
                term = A @ (other[0] * other[1])
            else:
                term = w[own[0]] * (A @ other[0])
            out += 0.5 * term
        self.sums[:, s] = out
        self.A[:] = 0.0
        self.mean[:] = 0.0


def _mmi_head_means(X, tau, mode, names, workers):
    """MMI per-head local atoms averaged over partners via _HeadSums -> (dict name -> [heads, segments, samples]
    sums, counts [heads, segments])."""
    heads = X.shape[1]
    n_seg = X.shape[0] if mode == "per_prompt" else 1
    samples = X.shape[2] - tau if mode == "per_prompt" else X.shape[0] * (X.shape[2] - tau)
    acc = {name: _HeadSums(heads, n_seg, samples) for name in names}
    counts = np.zeros((heads, n_seg), dtype=np.int64)
    pair_defined = np.zeros((heads, heads), dtype=bool)
    be = _Backend("numpy")

    def work(_, seg, pc):
        r, g, defined, _ = _chunk_geometry(seg, pc, np)
        terms = _quadratic_terms(r, g)
        mean_mi = _mean_mi_batched(g, np)
        coef = _mmi_coefficients(mean_mi, names)
        means = np.stack([mean_mi[k] for k in MI_NAMES], axis=1)                 # [pairs, 9]
        for name in names:
            acc[name].add_pairs(pc.i, pc.j, _atom_form(coef[name], terms), (coef[name] * means).sum(1), defined)
        pair_defined[pc.i, pc.j] = pair_defined[pc.j, pc.i] = defined

    def segment_done(s, seg):
        H = seg.heads
        for name in names:
            acc[name].segment_sums(s, seg.z[:H], seg.z[H:])
        counts[:, s] = pair_defined.sum(1)
        pair_defined[:] = False

    from threadpoolctl import threadpool_limits
    with threadpool_limits(limits=1, user_api="blas"):
        _for_each_chunk(X, mode, tau, None, be, False, lambda _: 4096, workers, work, segment_done)
    return {name: acc[name].sums for name in names}, counts


def _ccs_head_sums(X, tau, mode, names, workers, block_values, progress):
    """Per-head sums of local atoms over partners from pair blocks (CCS has no closed form: its sign tests act
    on every local value) -> (dict name -> [heads, segments, samples], counts [heads, segments]). Each worker
    keeps its own sums."""
    H = X.shape[1]
    st = _stacked_segments(X, mode, tau)
    S, _, N = st.z.shape
    blocks = _head_blocks(H, _block_size(S, N, block_values))
    shares = [blocks[w::workers] for w in range(workers)]
    bar = _progress_bar(len(blocks), progress)

    def run(share):
        sums, counts = {name: np.zeros((H, S, N)) for name in names}, np.zeros((H, S), dtype=np.int64)
        for h, ks in share:
            _accumulate_head_block(st, h, ks, "CCS", names, sums, counts)
            bar.update(1)
        return sums, counts

    with ThreadPoolExecutor(workers) as pool:
        parts = list(pool.map(run, shares))
    bar.close()
    return {name: sum(s[name] for s, _ in parts) for name in names}, sum(c for _, c in parts)


def _head_axis(values, prompts):
    """[heads, segments, samples] -> [heads, prompts, steps - tau] (NaN where no partner was defined)."""
    return values.reshape(values.shape[0], prompts, -1)


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def _progress_bar(total, on):
    if not on:
        return _NoBar()
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="local PhiID", unit="block")
