"""PhiID of all pairs of heads at once: Gaussian mutual informations from batched covariances, the 16 atoms
per ordered pair, per prompt, concatenated or pooled (MODES), numpy or torch backend."""
from __future__ import annotations

import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from lib.estimators.phiid.atoms import (ATOM_NAMES, BACKENDS, DegeneratePairWarning, MIN_SAMPLES, MI_NAMES, MODES,
                                        PART_NAMES, REDUNDANCIES, SINGULAR_RTOL, SWAPPED_ATOM, atoms_from_parts,
                                        ccs_local_redundancies, mmi_parts)
from lib.estimators.phiid.reference import _check_choice, _check_tau, _zscore

__all__ = ["phiid_all_pairs"]


# ----------------------------------------------------------------------------------------------------------------
# all pairs at once

class _Backend:
    """Array namespace for the batched kernels: numpy float64, or torch float64 (cuda when available)."""

    def __init__(self, name):
        _check_choice(name, BACKENDS, "backend")
        self.name = name
        if name == "numpy":
            self.xp, self.device = np, None
        else:
            import torch  # lazy: lib.estimators.phiid imports without torch
            self.xp = torch
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def _dtype(self, kind):
        table = {"float": "float64", "int": "int64", "bool": "bool"}
        return getattr(self.xp, table[kind])

    def asarray(self, a, dtype="float"):
        if self.name == "numpy":
            return np.asarray(a, dtype=self._dtype(dtype))
        return self.xp.as_tensor(np.asarray(a), dtype=self._dtype(dtype), device=self.device)

    def zeros(self, n, dtype="float"):
        if self.name == "numpy":
            return np.zeros(n, dtype=self._dtype(dtype))
        return self.xp.zeros(n, dtype=self._dtype(dtype), device=self.device)

    def numpy(self, a):
        return a if self.name == "numpy" else a.detach().cpu().numpy()


@dataclass
class _Segment:
    """Lagged correlations of one segment (a prompt, or all of X), on the backend.
    z: [2 * heads, samples] z-scored pasts (rows 0..heads-1) then futures; corr: [(2 * heads)^2] the flattened
    correlation matrix of z; lag: [heads] corr(past_h, future_h); ok: [heads] usable heads (finite, not constant);
    self_quad: [heads, samples] q_x + q_a - q_xa of each head with itself (local I(past; future) part), CCS only."""
    heads: int
    z: object
    corr: object
    lag: object
    ok: object
    all_ok: bool
    self_quad: object = None


def _segment(past, future, be, local=False):
    """past, future: [heads, samples] numpy -> _Segment (one [2H, 2H] correlation matrix on the backend)."""
    zp, ok_p = _zscore(past)
    zf, ok_f = _zscore(future)
    z = be.asarray(np.concatenate([zp, zf]))
    heads = past.shape[0]
    corr = ((z @ z.T) / (past.shape[1] - 1)).reshape(-1)
    lag = corr[heads: 2 * heads * heads: 2 * heads + 1]  # corr[h, heads + h]
    ok = ok_p & ok_f
    seg = _Segment(heads, z, corr, lag, be.asarray(ok, dtype="bool"), bool(ok.all()))
    if local:
        with np.errstate(divide="ignore", invalid="ignore"):
            r = lag[:, None]
            seg.self_quad = _two_variable_quad(z[:heads], z[heads:], r, _one_minus_sq(r))
    return seg


def _segment_groups(X, mode, tau, be, local, lengths=None, budget_bytes=1 << 28):
    """Lists of _Segment (None for a prompt too short to use) whose correlation matrices (each (2H)^2 float64)
    fit in budget_bytes together. Computing a group's matrix products back to back, then its pair batches, keeps
    BLAS worker threads from spin-waiting while the pair-batch threads run (on 2 cores that contention costs more
    than the products)."""
    segments = list(_segments(X, mode, tau, lengths))
    per_group = max(1, budget_bytes // (8 * (2 * X.shape[1]) ** 2))
    for start in range(0, len(segments), per_group):
        yield [None if pf is None else _segment(*pf, be, local) for pf in segments[start:start + per_group]]


def _two_variable_quad(u, v, r, det):
    """q_u + q_v - q_uv for unit-variance u, v with correlation r (det = 1 - r^2) = v^2 - (v - r u)^2 / det."""
    return v * v - (v - r * u) ** 2 / det


def _prompt_slices(X, lengths):
    """[prompts, heads, steps] -> list of [heads, steps_p]: prompt p truncated to its first lengths[p] steps."""
    return list(X) if lengths is None else [prompt[:, :n] for prompt, n in zip(X, lengths)]


def _segments(X, mode, tau, lengths=None):
    """X [prompts, heads, steps] -> iterator of (past, future), each [heads, samples] (see module docstring);
    lengths [prompts] (optional): prompt p uses steps [:lengths[p]]. per_prompt yields None for a prompt with
    fewer than tau + MIN_SAMPLES steps (undefined in that prompt)."""
    prompts = _prompt_slices(X, lengths)
    if mode == "per_prompt":
        for prompt in prompts:
            usable = prompt.shape[1] >= tau + MIN_SAMPLES
            yield (prompt[:, :-tau], prompt[:, tau:]) if usable else None
    elif mode == "concat":
        joined = np.concatenate(prompts, axis=1)
        yield joined[:, :-tau], joined[:, tau:]
    else:  # pooled
        n = [max(prompt.shape[1] - tau, 0) for prompt in prompts]
        yield (np.concatenate([prompt[:, :k] for prompt, k in zip(prompts, n)], axis=1),
               np.concatenate([prompt[:, tau:tau + k] for prompt, k in zip(prompts, n)], axis=1))


def _check_lengths(lengths, X, mode, tau):
    """lengths: None or [prompts] ints in [0, steps] -> int64 array; concat / pooled need tau + MIN_SAMPLES
    samples in total."""
    if lengths is None:
        return None
    prompts, _, steps = X.shape
    arr = np.asarray(lengths)
    if arr.shape != (prompts,) or arr.dtype.kind not in "iu":
        raise ValueError(f"lengths must be one integer per prompt ([{prompts}]); got {arr.dtype} array of shape "
                         f"{arr.shape}")
    if arr.min() < 0 or arr.max() > steps:
        raise ValueError(f"lengths must lie in [0, {steps}] (the steps of X); got min {arr.min()}, max {arr.max()}")
    samples = {"concat": int(arr.sum()) - tau, "pooled": int(np.maximum(arr - tau, 0).sum())}.get(mode)
    if samples is not None and samples < MIN_SAMPLES:
        raise ValueError(f"lengths leave {samples} past/future samples in mode {mode!r}; PhiID needs at least "
                         f"{MIN_SAMPLES}: use longer prompts or a smaller tau")
    return arr.astype(np.int64)


def _one_minus_sq(r):
    return (1 - r) * (1 + r)


@dataclass
class _PairChunk:
    """A batch of unordered pairs (source i < target j) with flat indices into a segment's [2H, 2H] correlation
    matrix; all index arrays [pairs] on the backend. sl: the batch's slice of the full pair list."""
    sl: slice
    i: object
    j: object
    xy: object
    ab: object
    xb: object
    ya: object


def _make_pair_chunks(heads, chunk_pairs, be):
    """All unordered pairs of `heads` heads, split into batches of at most chunk_pairs -> list of _PairChunk."""
    i_all, j_all = np.triu_indices(heads, 1)
    width = 2 * heads
    chunks = []
    for start in range(0, len(i_all), chunk_pairs):
        sl = slice(start, min(start + chunk_pairs, len(i_all)))
        i, j = i_all[sl], j_all[sl]
        flat = {"xy": i * width + j, "ab": (i + heads) * width + (j + heads),
                "xb": i * width + (j + heads), "ya": j * width + (i + heads)}
        chunks.append(_PairChunk(sl, be.asarray(i, "int"), be.asarray(j, "int"),
                                 **{k: be.asarray(v, "int") for k, v in flat.items()}))
    return chunks


def _pair_correlations(seg, pc):
    """Six correlations of the pairs of chunk pc, each [pairs]: (x, y, a, b) = (past_i, past_j, future_i,
    future_j)."""
    return {"xy": seg.corr[pc.xy], "ab": seg.corr[pc.ab], "xb": seg.corr[pc.xb], "ya": seg.corr[pc.ya],
            "xa": seg.lag[pc.i], "yb": seg.lag[pc.j]}


def _pair_geometry(r, xp):
    """Conditional (co)variances of each pair's 4x4 correlation matrix, from its Cholesky factors in two orders,
    (x, y | a, b) and (a, b | x, y). r: six [pairs] correlations -> dict of [pairs] arrays.
    Every determinant is a product of these: det C_xya = det_xy * var_a_xy, det C_xab = det_ab * var_x_ab,
    det C = det_xy * schur_ab_xy with schur_ab_xy = det cov(a, b | x, y). Cholesky keeps every subtraction at
    unit scale, so they are accurate to ~eps * condition number (a cofactor formula loses ~1e-7 at 5e6)."""
    g = {f"det_{k}": _one_minus_sq(r[k]) for k in ("xy", "ab", "xa", "xb", "ya", "yb")}
    g["sd_xy"], g["sd_ab"] = xp.sqrt(g["det_xy"]), xp.sqrt(g["det_ab"])
    # (x, y) first: a and b on the direction of y orthogonal to x, then their covariance given (x, y)
    g["l_ya"] = (r["ya"] - r["xy"] * r["xa"]) / g["sd_xy"]
    g["l_yb"] = (r["yb"] - r["xy"] * r["xb"]) / g["sd_xy"]
    g["var_a_xy"] = g["det_xa"] - g["l_ya"] * g["l_ya"]
    g["var_b_xy"] = g["det_xb"] - g["l_yb"] * g["l_yb"]
    g["cov_ab_xy"] = r["ab"] - r["xa"] * r["xb"] - g["l_ya"] * g["l_yb"]
    g["schur_ab_xy"] = g["var_a_xy"] * g["var_b_xy"] - g["cov_ab_xy"] * g["cov_ab_xy"]
    # (a, b) first: x and y on the direction of b orthogonal to a, then their variances given (a, b)
    g["l_bx"] = (r["xb"] - r["ab"] * r["xa"]) / g["sd_ab"]
    g["l_by"] = (r["yb"] - r["ab"] * r["ya"]) / g["sd_ab"]
    g["var_x_ab"] = g["det_xa"] - g["l_bx"] * g["l_bx"]
    g["var_y_ab"] = g["det_ya"] - g["l_by"] * g["l_by"]
    return g


_IDENTITY_GEOMETRY = {"l_ya": 0.0, "l_yb": 0.0, "cov_ab_xy": 0.0, "l_bx": 0.0, "l_by": 0.0}  # others: 1.0


def _nonsingular(g, xp):
    """[...] bool: min_k (1 - R^2_k) = det C / max det(3x3 minor) >= SINGULAR_RTOL (False for NaN)."""
    det3_max = xp.maximum(g["det_xy"] * xp.maximum(g["var_a_xy"], g["var_b_xy"]),
                          g["det_ab"] * xp.maximum(g["var_x_ab"], g["var_y_ab"]))
    det4 = g["det_xy"] * g["schur_ab_xy"]
    return det4 > SINGULAR_RTOL * det3_max


def _defined_pairs(g, seg, pc, xp):
    """[pairs] bool: both heads usable (finite, not constant) and the pair's correlation matrix nonsingular."""
    defined = _nonsingular(g, xp)
    return defined if seg.all_ok else defined & seg.ok[pc.i] & seg.ok[pc.j]


def _identity_where_undefined(g, defined, xp):
    """Geometry with the identity's values where a pair is undefined (keeps logs and divisions finite)."""
    return {k: xp.where(defined, v, _IDENTITY_GEOMETRY.get(k, 1.0)) for k, v in g.items()}


def _mean_mi_batched(g, xp):
    """Closed-form mean MIs (nats): dict MI name -> [pairs]. 0.5 [logdet C_A + logdet C_B - logdet C_AB]
    written with conditional variances, e.g. I(xy; a) = -0.5 log var(a | x, y)."""
    return {
        "I_xta": -0.5 * xp.log(g["det_xa"]), "I_xtb": -0.5 * xp.log(g["det_xb"]),
        "I_yta": -0.5 * xp.log(g["det_ya"]), "I_ytb": -0.5 * xp.log(g["det_yb"]),
        "I_xyta": -0.5 * xp.log(g["var_a_xy"]), "I_xytb": -0.5 * xp.log(g["var_b_xy"]),
        "I_xtab": -0.5 * xp.log(g["var_x_ab"]), "I_ytab": -0.5 * xp.log(g["var_y_ab"]),
        "I_xytab": 0.5 * (xp.log(g["det_ab"]) - xp.log(g["schur_ab_xy"])),
    }


def _local_mi_batched(seg, i, j, r, g, mean_mi):
    """Twice the local MIs, in log space, for pairs (i, j) of one segment: dict MI name -> [pairs, samples]
    (see _twice_local_mi)."""
    H = seg.heads
    expand = lambda d: {k: v[:, None] for k, v in d.items()}  # noqa: E731  [pairs] -> [pairs, 1]
    return _twice_local_mi((seg.z[i], seg.z[j], seg.z[i + H], seg.z[j + H]), (seg.self_quad[i], seg.self_quad[j]),
                           expand(r), expand(g), expand(mean_mi))


def _twice_local_mi(rows, self_quad, r, g, mean_mi):
    """Twice the local MIs, in log space: dict MI name -> [..., samples].
    rows: z-scored (x, y, a, b), each [..., samples]; self_quad: (q_x + q_a - q_xa, q_y + q_b - q_yb) of the
    two heads, [..., samples]; r, g, mean_mi: correlations, geometry and closed-form mean MIs broadcastable
    against the rows ([..., 1]).
    2 I(A;B)(t) = [logdet C_A + logdet C_B - logdet C_AB] + [q_A(t) + q_B(t) - q_AB(t)] with
    q_S(t) = z_S(t)^T C_SS^-1 z_S(t). The first term is twice the closed-form mean; the quadratic forms come
    from Cholesky residuals, e.g. q_xy + q_a - q_xya = z_a^2 - e_a|xy^2 / var(a | x, y). (Doubling saves a
    multiplication per value; the redundancy rules are linear, so callers halve the results.)"""
    zx, zy, za, zb = rows
    w_y = (zy - r["xy"] * zx) / g["sd_xy"]                      # y whitened against x
    e_a = za - r["xa"] * zx - g["l_ya"] * w_y                    # residual of a given (x, y)
    e_b = zb - r["xb"] * zx - g["l_yb"] * w_y                    # residual of b given (x, y)
    w_b = (zb - r["ab"] * za) / g["sd_ab"]                       # b whitened against a
    e_x = zx - r["xa"] * za - g["l_bx"] * w_b                    # residual of x given (a, b)
    e_y = zy - r["ya"] * za - g["l_by"] * w_b                    # residual of y given (a, b)
    e_b_xya = e_b - g["cov_ab_xy"] / g["var_a_xy"] * e_a         # residual of b given (x, y, a)
    var_b_xya = g["schur_ab_xy"] / g["var_a_xy"]
    q_a_xy = e_a * e_a / g["var_a_xy"]
    quad = {
        "I_xta": self_quad[0], "I_ytb": self_quad[1],
        "I_xtb": _two_variable_quad(zx, zb, r["xb"], g["det_xb"]),
        "I_yta": _two_variable_quad(zy, za, r["ya"], g["det_ya"]),
        "I_xyta": za * za - q_a_xy,
        "I_xytb": zb * zb - e_b * e_b / g["var_b_xy"],
        "I_xtab": zx * zx - e_x * e_x / g["var_x_ab"],
        "I_ytab": zy * zy - e_y * e_y / g["var_y_ab"],
        "I_xytab": za * za + w_b * w_b - q_a_xy - e_b_xya * e_b_xya / var_b_xya,
    }
    return {name: 2 * mean_mi[name] + quad[name] for name in MI_NAMES}


def _chunk_geometry(seg, pc, xp):
    """Correlations, geometry and the one degeneracy rule for the pairs of chunk pc -> (r, g, defined [pairs],
    all_defined). Where a pair is undefined its geometry is replaced by the identity's, which keeps logs and
    divisions finite (finite garbage that every caller masks)."""
    r = _pair_correlations(seg, pc)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        g = _pair_geometry(r, xp)
        defined = _defined_pairs(g, seg, pc, xp)
    all_defined = bool(defined.all())
    if not all_defined:
        g = _identity_where_undefined(g, defined, xp)
    return r, g, defined, all_defined


def _chunk_parts(seg, pc, redundancy, be):
    """Time means of the parts for the pairs of chunk pc -> (dict PART_NAMES -> [pairs], defined [pairs] bool,
    all_defined bool). Values of undefined pairs are finite garbage; the caller masks them."""
    xp = be.xp
    r, g, defined, all_defined = _chunk_geometry(seg, pc, xp)
    mean_mi = _mean_mi_batched(g, xp)
    if redundancy == "MMI":
        return mmi_parts(mean_mi, xp), defined, all_defined
    twice_local_mi = _local_mi_batched(seg, pc.i, pc.j, r, g, mean_mi)
    twice_red = ccs_local_redundancies(twice_local_mi, xp)
    samples = twice_local_mi["I_xta"].shape[1]
    return {**mean_mi, **{name: v.sum(-1) / (2 * samples) for name, v in twice_red.items()}}, defined, all_defined


def _default_chunk(redundancy, samples, backend):
    """Pairs per batch. numpy: 8192 keeps every temporary at 64 KB, below glibc's mmap threshold (128 KB:
    larger temporaries are mapped and faulted in on every operation, ~5x slower); torch caches its memory."""
    if redundancy == "MMI":
        return 8192 if backend == "numpy" else 1 << 16
    return max(16, (16000 if backend == "numpy" else 1 << 20) // samples)


@dataclass
class PhiIDResult:
    """All-pairs PhiID. atoms: name -> [heads, heads] float64, entry [i, j] = head i source, head j target
    (nats; NaN where degenerate, and on the diagonal). degenerate: [heads, heads] bool, True exactly where the
    atoms are NaN. n_valid: [heads, heads] int, segments (prompts in per_prompt mode, else 1) in which the pair
    was defined and averaged. result["sts"] is result.atoms["sts"]."""
    atoms: dict
    degenerate: np.ndarray
    n_valid: np.ndarray
    mode: str
    tau: int
    redundancy: str
    backend: str
    seconds: float
    shape: tuple = field(default=())

    def __getitem__(self, name):
        return self.atoms[name]

    def __contains__(self, name):
        return name in self.atoms

    def __iter__(self):
        return iter(self.atoms)

    def keys(self):
        return self.atoms.keys()

    def items(self):
        return self.atoms.items()


def _check_X(X):
    X = np.asarray(X)
    if X.ndim != 3:
        raise ValueError(f"X must be a 3-D array [prompts, heads, steps]; got shape {X.shape}. "
                         f"For one prompt pass X[None]; for one pair use phiid_pair(src, trg).")
    if X.shape[0] < 1:
        raise ValueError("X has no prompts (shape[0] == 0): pass at least one prompt [prompts, heads, steps]")
    if X.shape[1] < 2:
        raise ValueError(f"X has {X.shape[1]} head(s) (axis 1 of [prompts, heads, steps]); PhiID needs at "
                         f"least 2 heads to form a pair")
    return np.asarray(X, dtype=np.float64)


def _check_atoms(atoms):
    if atoms is None:
        return ATOM_NAMES
    atoms = (atoms,) if isinstance(atoms, str) else tuple(atoms)
    unknown = [a for a in atoms if a not in ATOM_NAMES]
    if unknown or not atoms:
        raise ValueError(f"unknown atom name(s) {unknown}: atoms must be a non-empty subset of {ATOM_NAMES}")
    return atoms


def _describe_pairs(i, j, names, limit=8):
    """The heads that explain pairs (i, j) (greedy: the head in most pairs, then the next one among the pairs
    left, ...) and the first pairs; names: label per head."""
    left, culprits = np.ones(len(i), dtype=bool), []
    while left.any() and len(culprits) < limit:
        heads, counts = np.unique(np.concatenate([i[left], j[left]]), return_counts=True)
        head = heads[np.argmax(counts)]
        culprits.append(f"{names[head]} ({counts.max()} pair{'s' if counts.max() > 1 else ''})")
        left &= (i != head) & (j != head)
    more = f" and others ({int(left.sum())} pairs)" if left.any() else ""
    pairs = ", ".join(f"({names[a]}, {names[b]})" for a, b in list(zip(i.tolist(), j.tolist()))[:limit])
    return f"heads {', '.join(culprits)}{more}; first pairs {pairs}"


def _warn_all_pairs(i, j, n_valid, n_segments, mode, names):
    undefined = n_valid == 0
    if undefined.any():
        warnings.warn(f"PhiID ({mode}) is undefined for {int(undefined.sum())} of {len(i)} head pairs "
                      f"(constant, non-finite or collinear series): their atoms are NaN and "
                      f"result.degenerate marks them; {_describe_pairs(i[undefined], j[undefined], names)}",
                      DegeneratePairWarning, stacklevel=3)
    partial = (n_valid > 0) & (n_valid < n_segments)
    if partial.any():
        warnings.warn(f"{int(partial.sum())} head pairs are undefined in some prompts: their atoms average "
                      f"only the prompts where they are defined (result.n_valid counts them); "
                      f"{_describe_pairs(i[partial], j[partial], names)}", DegeneratePairWarning, stacklevel=3)


def _fill_square(values, i, j, heads, swapped_values):
    """[pairs] values for (i, j) and [pairs] values of the swapped atom -> [heads, heads], NaN diagonal."""
    out = np.full((heads, heads), np.nan)
    out[i, j] = values
    out[j, i] = swapped_values
    return out


def _default_workers(backend):
    """numpy: one thread per usable CPU (at most 4): numpy releases the GIL inside its loops, so pair batches
    run in parallel. torch: 1 (torch parallelises each operation itself)."""
    if backend != "numpy":
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, 4))


def _accumulate(seg, pc, redundancy, be, sums, n_valid):
    """Add the chunk's part means (where defined) to sums[name][pc.sl] and its defined mask to n_valid."""
    parts, defined, all_defined = _chunk_parts(seg, pc, redundancy, be)
    for name in PART_NAMES:
        sums[name][pc.sl] += parts[name] if all_defined else be.xp.where(defined, parts[name], 0.0)
    n_valid[pc.sl] += defined


def _for_each_chunk(X, mode, tau, lengths, be, local, chunk_of, workers, work, segment_done=None):
    """Call work(segment_index, seg, pc) for every usable segment of `mode` and every pair chunk, the chunks of a
    segment on `workers` threads (they write disjoint slices), then segment_done(segment_index, seg) if given.
    chunk_of(samples) -> pairs per chunk. Returns the number of segments (unusable ones included)."""
    n_segments, chunks = 0, None
    with ThreadPoolExecutor(workers) as pool:
        for group in _segment_groups(X, mode, tau, be, local, lengths):
            for seg in group:
                if seg is not None:
                    if chunks is None:
                        chunks = _make_pair_chunks(X.shape[1], chunk_of(seg.z.shape[1]), be)
                    index = n_segments
                    # list() waits for every chunk and re-raises any error
                    list(pool.map(lambda pc: work(index, seg, pc), chunks))
                    if segment_done is not None:
                        segment_done(index, seg)
                n_segments += 1
    return n_segments


def _check_inputs(X, tau, mode, lengths):
    """Shared checks of the all-pairs functions -> (X float64, lengths or None)."""
    _check_choice(mode, MODES, "mode")
    X = _check_X(X)
    _check_tau(tau, X.shape[2])
    return X, _check_lengths(lengths, X, mode, tau)


def phiid_all_pairs(X, tau=1, redundancy="MMI", mode="per_prompt", atoms=None, backend="numpy",
                    chunk_pairs=None, workers=None, warn=True, head_names=None, lengths=None):
    """PhiID for every ordered pair of heads.

    X: [prompts, heads, steps] (any float dtype; computed in float64), steps >= tau + 5.
    tau: lag >= 1. redundancy: "MMI" (closed form) or "CCS" (local values, slower).
    mode: "per_prompt" | "concat" | "pooled" (defined in the module docstring).
    atoms: subset of ATOM_NAMES to return (default all 16). backend: "numpy" or "torch" (float64; cuda if
    available). chunk_pairs: pairs per batch (default: see _default_chunk). workers: threads working on
    different pair batches at once (default: usable CPUs up to 4 for numpy, 1 for torch).
    warn: emit DegeneratePairWarning for undefined pairs. head_names: label per head for the warning
    (default: the head's position on axis 1).
    lengths: optional [prompts] ints; prompt p then uses only steps [:lengths[p]] (e.g. the steps before its
    first end-of-turn token), in every mode. In per_prompt mode a prompt shorter than tau + 5 steps leaves
    every pair undefined in that prompt (n_valid does not count it).

    Each unordered pair i < j is computed once with i as source; [j, i] is filled by relabeling
    (SWAPPED_ATOM). Returns a PhiIDResult; result["sts"] is a [heads, heads] array, [i, j] = i -> j.
    """
    t0 = time.perf_counter()
    _check_choice(redundancy, REDUNDANCIES, "redundancy")
    be = _Backend(backend)
    names = _check_atoms(atoms)
    X, lengths = _check_inputs(X, tau, mode, lengths)
    heads = X.shape[1]
    i_np, j_np = np.triu_indices(heads, 1)
    sums = {name: be.zeros(len(i_np)) for name in PART_NAMES}
    n_valid = be.zeros(len(i_np), dtype="int")
    n_segments = _for_each_chunk(
        X, mode, tau, lengths, be, redundancy == "CCS",
        lambda samples: chunk_pairs or _default_chunk(redundancy, samples, backend),
        workers or _default_workers(backend),
        lambda _, seg, pc: _accumulate(seg, pc, redundancy, be, sums, n_valid))
    n_valid = be.numpy(n_valid)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = {name: np.where(n_valid > 0, be.numpy(v) / n_valid, np.nan) for name, v in sums.items()}
    pair_atoms = atoms_from_parts(means)
    out = {name: _fill_square(pair_atoms[name], i_np, j_np, heads, pair_atoms[SWAPPED_ATOM[name]])
           for name in names}
    counts = np.zeros((heads, heads), dtype=np.int64)
    counts[i_np, j_np] = counts[j_np, i_np] = n_valid
    if warn:
        _warn_all_pairs(i_np, j_np, n_valid, n_segments, mode,
                        list(range(heads)) if head_names is None else list(head_names))
    return PhiIDResult(atoms=out, degenerate=counts == 0, n_valid=counts, mode=mode, tau=int(tau),
                       redundancy=redundancy, backend=backend, seconds=time.perf_counter() - t0,
                       shape=tuple(X.shape))
