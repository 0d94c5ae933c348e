"""Exact Gaussian Integrated Information Decomposition (PhiID) for one pair and for all pairs of heads.

Conventions (those of the reference library `phyid`, Imperial-MIND-lab/integrated-info-decomp):
for a source series `src` and a target series `trg` and a lag `tau`,
    x = src[:-tau] (source past)    y = trg[:-tau] (target past)
    a = src[tau:]  (source future)  b = trg[tau:]  (target future)
and atom "AtB" is the information carried by past atom A that ends up in future atom B, each side one of
r (redundant), x (unique to source), y (unique to target), s (synergistic). Units: nats.

What is computed (identical to phyid's Gaussian estimator, `kind="gaussian"`):
each of the four rows is z-scored (mean, sd with ddof=1), C is their 4x4 correlation matrix, and the local
entropy of a subset S at time t is h_S(t) = -log N(z_S(t); 0, C_SS). Local mutual informations are
I(A;B)(t) = h_A + h_B - h_AB; there are nine of them (MI_NAMES). Six single-sided redundancies (RED_NAMES)
and one double redundancy D are built from them, and the 16 atoms solve a fixed linear system
(`atoms_from_parts`, explicit solution).

Closed form for MMI (the fast path). The same correlation matrix is used to fit and to evaluate, so the time
mean of every local MI is exactly
    mean I(A;B) = 0.5 * [logdet C_AA + logdet C_BB - logdet C_AB,AB]
(the mean quadratic form is |S| (N-1)/N and cancels). MMI picks whole local arrays (the first MI of a
redundancy if its time mean is strictly smaller, else the second; the double redundancy is the argmin of
I_xta, I_xtb, I_yta, I_ytb), so atom means are the linear atom formulas applied to these mean MIs, and they
depend only on the 4x4 correlation matrix. For all pairs of H heads we build one [2H, 2H] correlation matrix
of (all pasts, all futures) per segment, gather the six correlations of every unordered pair, and evaluate the
needed log-determinants for all pairs at once in closed form, as products of conditional variances from the
pair's Cholesky factors (e.g. I(xy; a) = -0.5 log var(a | x, y)); this keeps every subtraction at unit scale.
A sample far from the mean (which makes phyid's density underflow to 0 and every atom NaN) is no problem here:
nothing is exponentiated.

CCS has no closed form: local values are needed because its redundancy keeps the local co-information only
where the signs of the MIs agree. We evaluate local MIs in log space from the quadratic forms (regression
residuals of the Gaussian, never a density), vectorised over batches of pairs, and only the time means of the
seven redundancy terms are accumulated (atoms are linear in the MIs, the redundancies and D).

Fast option (`phiid_fast_stats`): MMI sts, rtr and TDMI only, per segment or averaged, from the same segments,
geometry and degeneracy rule (what rankings, split halves and surrogates need).

Local atoms (`phiid_local_pairs` for explicit pairs, `phiid_local_head_means` for per-head means over all
partners, streamed): phyid's local arrays, evaluated for every prompt at once per block of pairs, in per_prompt
and pooled modes; their time means are phiid_all_pairs.

Batches of pairs are processed by a few threads at once (numpy releases the GIL in its loops); each batch
writes its own slice of the accumulators, so results do not depend on the number of threads or batch size.
On a small shared machine, OPENBLAS_NUM_THREADS=1 (set before numpy is imported) avoids BLAS threads competing
with these; the per-segment matrix products are small.

Modes of `phiid_all_pairs` (X has shape [prompts, heads, steps]):
    per_prompt  PhiID of each prompt separately (its own correlation matrix), then the mean over prompts.
                This is the paper's protocol.
    concat      the prompts are joined end to end into one series per head ([heads, prompts*steps]) and
                PhiID is computed on it once; the transitions across prompt junctions are included.
    pooled      one correlation matrix from all within-prompt transitions: the past samples are
                X[p, h, t] and the future samples X[p, h, t + tau] for every prompt p and t < steps - tau,
                stacked over prompts ([heads, prompts*(steps - tau)] each). Each past row and each future row is
                standardised over these pooled samples (its own mean and sd, ddof=1) and C is the correlation
                matrix of the stacked (pasts, futures). No junction transition enters. Local values (CCS)
                are evaluated at every pooled transition. Equivalent to phyid fed with these pooled
                (x, y, a, b) rows.

Degenerate pairs (policy). A pair is undefined in a segment (a prompt, or the whole series) when
    * a head's past or future row contains NaN or inf, or is constant (sd <= CONSTANT_RTOL * max|value|), or
    * the pair's 4x4 correlation matrix is (numerically) singular: min_k (1 - R^2_k) < SINGULAR_RTOL, where
      R^2_k is the squared multiple correlation of variable k on the other three. This minimum residual
      variance equals det C / max(det of the 3x3 principal minors) and lies within a factor 4 of the smallest
      eigenvalue of C. It catches duplicate heads, affine copies, pure-lag copies and heads whose future is an
      affine map of their past. With SINGULAR_RTOL = 1e-10 every pair that phyid computes (it refuses
      eigenvalues below ~2.2e-10 of the largest) is computed here too, e.g. y = x + 1e-3 noise (condition
      number 5e6) is computed and matches phyid to 4e-11. Rounding error grows like 1e-16 / (min residual
      variance): against 50-digit arithmetic on the same correlation matrix, 2e-11 nats at 1e-6 and 4e-8 nats
      at 1e-9, so atoms near the threshold are still good to ~1e-7 nats.
Undefined pairs never become 0. In `concat` and `pooled` modes they get NaN atoms. In `per_prompt` mode a pair's
atoms are the mean over the prompts in which it is defined, `result.n_valid[i, j]` counts those prompts, and a
pair defined in no prompt gets NaN. `result.degenerate` is True exactly where the atoms are NaN (the diagonal
included: a head with itself is singular). A `DegeneratePairWarning` names the heads involved, both for
undefined pairs and (per_prompt) for pairs dropped from some prompts.
"""
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["ATOM_NAMES", "MODES", "SWAPPED_ATOM", "DegeneratePairWarning", "mmi_atoms_from_correlation",
           "phiid_pair", "phiid_pair_local", "phiid_all_pairs", "phiid_fast_stats", "LOCAL_MODES",
           "phiid_local_pairs", "phiid_local_head_means", "phiid_path", "save_phiid", "load_phiid",
           "run_phiid_for_run"]

ATOM_NAMES = ("rtr", "rtx", "rty", "rts", "xtr", "xtx", "xty", "xts",
              "ytr", "ytx", "yty", "yts", "str", "stx", "sty", "sts")
MI_NAMES = ("I_xta", "I_xtb", "I_yta", "I_ytb", "I_xyta", "I_xytb", "I_xtab", "I_ytab", "I_xytab")
RED_NAMES = ("R_xyta", "R_xytb", "R_xytab", "R_abtx", "R_abty", "R_abtxy")
PART_NAMES = MI_NAMES + RED_NAMES + ("D",)  # everything the atoms are a linear function of
MODES = ("per_prompt", "concat", "pooled")
REDUNDANCIES = ("MMI", "CCS")
BACKENDS = ("numpy", "torch")

# each redundancy: (first MI, second MI, joint MI); MMI picks first or second, CCS uses all three
REDUNDANCY_ARGS = {
    "R_xyta": ("I_xta", "I_yta", "I_xyta"),
    "R_xytb": ("I_xtb", "I_ytb", "I_xytb"),
    "R_xytab": ("I_xtab", "I_ytab", "I_xytab"),
    "R_abtx": ("I_xta", "I_xtb", "I_xtab"),
    "R_abty": ("I_yta", "I_ytb", "I_ytab"),
    "R_abtxy": ("I_xyta", "I_xytb", "I_xytab"),
}
DOUBLE_ARGS = ("I_xta", "I_xtb", "I_yta", "I_ytb")  # MMI double redundancy: argmin of these

# swapping source and target relabels x <-> y and a <-> b
SWAPPED_ATOM = {"rtr": "rtr", "rtx": "rty", "rty": "rtx", "rts": "rts",
                "xtr": "ytr", "ytr": "xtr", "xtx": "yty", "yty": "xtx",
                "xty": "ytx", "ytx": "xty", "xts": "yts", "yts": "xts",
                "str": "str", "stx": "sty", "sty": "stx", "sts": "sts"}

MIN_SAMPLES = 5          # phyid needs steps - tau >= 5 for an invertible 4x4 covariance
CONSTANT_RTOL = 1e-12    # a row is constant when sd <= CONSTANT_RTOL * max|value|
SINGULAR_RTOL = 1e-10    # a pair is singular when its minimum residual variance is below this

# the 4x4 correlation matrix is ordered (x, y, a, b); index subsets of each MI (A, B)
_ROW = {"x": 0, "y": 1, "a": 2, "b": 3}
_MI_SETS = {name: ([_ROW[c] for c in name[2:].split("t")[0]], [_ROW[c] for c in name[2:].split("t")[1]])
            for name in MI_NAMES}


class DegeneratePairWarning(UserWarning):
    """Some head pairs are undefined (constant, non-finite or collinear series); see the module docstring."""


# ----------------------------------------------------------------------------------------------------------------
# atoms from MIs and redundancies (shared by every path; works on floats, numpy arrays and torch tensors)

_ATOM_FORMULAS = {
    "rtr": lambda p: p["D"],
    "rtx": lambda p: p["R_xyta"] - p["D"],
    "rty": lambda p: p["R_xytb"] - p["D"],
    "rts": lambda p: p["R_xytab"] - p["R_xyta"] - p["R_xytb"] + p["D"],
    "xtr": lambda p: p["R_abtx"] - p["D"],
    "xtx": lambda p: p["I_xta"] - p["R_xyta"] - p["R_abtx"] + p["D"],
    "xty": lambda p: p["I_xtb"] - p["R_xytb"] - p["R_abtx"] + p["D"],
    "xts": lambda p: (p["I_xtab"] - p["I_xta"] - p["I_xtb"] + p["R_xyta"] + p["R_xytb"] - p["R_xytab"]
                      + p["R_abtx"] - p["D"]),
    "ytr": lambda p: p["R_abty"] - p["D"],
    "ytx": lambda p: p["I_yta"] - p["R_xyta"] - p["R_abty"] + p["D"],
    "yty": lambda p: p["I_ytb"] - p["R_xytb"] - p["R_abty"] + p["D"],
    "yts": lambda p: (p["I_ytab"] - p["I_yta"] - p["I_ytb"] + p["R_xyta"] + p["R_xytb"] - p["R_xytab"]
                      + p["R_abty"] - p["D"]),
    "str": lambda p: p["R_abtxy"] - p["R_abtx"] - p["R_abty"] + p["D"],
    "stx": lambda p: (p["I_xyta"] - p["I_xta"] - p["I_yta"] + p["R_xyta"] + p["R_abtx"] + p["R_abty"]
                      - p["R_abtxy"] - p["D"]),
    "sty": lambda p: (p["I_xytb"] - p["I_xtb"] - p["I_ytb"] + p["R_xytb"] + p["R_abtx"] + p["R_abty"]
                      - p["R_abtxy"] - p["D"]),
    "sts": lambda p: (p["I_xytab"] - p["I_xyta"] - p["I_xytb"] - p["I_xtab"] - p["I_ytab"]
                      + p["I_xta"] + p["I_xtb"] + p["I_yta"] + p["I_ytb"]
                      + p["R_xytab"] - p["R_xyta"] - p["R_xytb"] + p["R_abtxy"] - p["R_abtx"] - p["R_abty"] + p["D"]),
}


def atoms_from_parts(p, names=ATOM_NAMES):
    """dict of the 16 PART_NAMES (MIs, redundancies, double redundancy D) -> dict of the atoms `names`
    (default all 16): the explicit solution of the PhiID lattice equations."""
    return {name: _ATOM_FORMULAS[name](p) for name in names}


def mmi_parts(mi, xp=np):
    """MMI on time means. mi: dict MI name -> mean (any shape) -> dict of the 16 parts (means).
    phyid keeps the whole local array of the first MI when its mean is strictly smaller, else the second, and
    takes the argmin of DOUBLE_ARGS for D; the mean of the kept array is therefore min(first, second) and
    min(DOUBLE_ARGS) whichever way ties are broken, so means need only minimum (NaN never reaches here:
    undefined pairs are masked before)."""
    parts = dict(mi)
    for red, (first, second, _) in REDUNDANCY_ARGS.items():
        parts[red] = xp.minimum(mi[first], mi[second])
    parts["D"] = xp.minimum(xp.minimum(mi["I_xta"], mi["I_xtb"]), xp.minimum(mi["I_yta"], mi["I_ytb"]))
    return parts


def _keep_if_signs_agree(signs, value, xp):
    """value where every array in signs equals sign(value), else 0 (phyid: all np.sign equal)."""
    value_sign = xp.sign(value)
    agree = signs[0] == value_sign
    for other in signs[1:]:
        agree &= other == value_sign
    return xp.where(agree, value, 0.0)


def ccs_local_redundancies(mi, xp=np):
    """CCS on local values. mi: dict MI name -> local MI [..., time] -> dict RED_NAMES + "D" -> local values.
    A redundancy is the local co-information m1 + m2 - m12 where sign(m1), sign(m2), sign(m12) and its own sign
    agree, else 0; D likewise from q (below) and the four single-variable MIs. Linear in mi: scaling every
    MI by a constant scales the result by it."""
    sign = {name: xp.sign(v) for name, v in mi.items()}
    red = {}
    for name, (first, second, joint) in REDUNDANCY_ARGS.items():
        coinfo = mi[first] + mi[second] - mi[joint]
        red[name] = _keep_if_signs_agree((sign[first], sign[second], sign[joint]), coinfo, xp)
    q = (-(mi["I_xta"] + mi["I_xtb"] + mi["I_yta"] + mi["I_ytb"])
         + mi["I_xtab"] + mi["I_ytab"] + mi["I_xyta"] + mi["I_xytb"] - mi["I_xytab"]
         + red["R_xyta"] + red["R_xytb"] - red["R_xytab"] + red["R_abtx"] + red["R_abty"] - red["R_abtxy"])
    red["D"] = _keep_if_signs_agree(tuple(sign[n] for n in DOUBLE_ARGS), q, xp)
    return red


def mmi_local_redundancies(mi, xp=np, means=None):
    """MMI on local arrays (phyid's exact rule, needed only for local atoms). mi: MI name -> [..., time]
    (any leading batch axes). Each redundancy keeps the whole local array of its first MI where that array's
    time mean is strictly smaller, else the second; D keeps the DOUBLE_ARGS array with the smallest mean (the
    first one on ties: argmin semantics). means: MI name -> [..., 1] to compare instead of the arrays' own
    time means (e.g. closed-form means when mi holds linear coefficients rather than local values)."""
    means = means or {name: v.mean(-1, keepdims=True) for name, v in mi.items()}
    red = {name: xp.where(means[first] < means[second], mi[first], mi[second])
           for name, (first, second, _) in REDUNDANCY_ARGS.items()}
    best, best_mean = mi[DOUBLE_ARGS[0]], means[DOUBLE_ARGS[0]]
    for name in DOUBLE_ARGS[1:]:
        smaller = means[name] < best_mean
        best, best_mean = xp.where(smaller, mi[name], best), xp.where(smaller, means[name], best_mean)
    red["D"] = best
    return red


# ----------------------------------------------------------------------------------------------------------------
# one pair: a plain, readable implementation (slogdet and solve on the 4x4 matrix)

def _check_choice(value, allowed, what):
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}: use one of {', '.join(map(repr, allowed))}")


def _check_tau(tau, steps):
    if isinstance(tau, bool) or not isinstance(tau, (int, np.integer)) or tau < 1:
        raise ValueError(f"tau must be an integer >= 1 (the lag between past and future); got {tau!r}")
    if steps < tau + MIN_SAMPLES:
        raise ValueError(f"series of {steps} steps are too short for tau={tau}: PhiID needs steps >= tau + "
                         f"{MIN_SAMPLES} (at least {MIN_SAMPLES} past/future samples); use longer series or "
                         f"a smaller tau")


def _as_series(s, name):
    s = np.asarray(s, dtype=np.float64)
    if s.ndim == 2 and s.shape[1] == 1:
        s = s[:, 0]
    if s.ndim != 1:
        raise ValueError(f"{name} must be a 1-D series (or shape (T, 1)); got shape {s.shape}. "
                         f"For many heads use phiid_all_pairs(X) with X [prompts, heads, steps].")
    return s


def _pair_rows(src, trg, tau):
    """(src [T], trg [T]) -> rows [4, T - tau] ordered (x, y, a, b), after checking the inputs."""
    src, trg = _as_series(src, "src"), _as_series(trg, "trg")
    if src.shape != trg.shape:
        raise ValueError(f"src and trg must have the same length; got {len(src)} and {len(trg)}")
    _check_tau(tau, len(src))
    return np.stack([src[:-tau], trg[:-tau], src[tau:], trg[tau:]])


def _row_ok(rows):
    """rows [n, N] -> bool [n]: finite and not constant."""
    with np.errstate(invalid="ignore", over="ignore"):
        finite = np.isfinite(rows).all(axis=-1)
        sd = np.std(rows, axis=-1, ddof=1)
        scale = np.max(np.abs(rows), axis=-1)
        return finite & (sd > CONSTANT_RTOL * scale)


def _zscore(rows):
    """rows [n, N] -> centred rows with unit sd (ddof=1); non-finite or constant rows become 0."""
    ok = _row_ok(rows)
    z = np.where(ok[:, None], rows, 0.0)
    z = z - z.mean(axis=-1, keepdims=True)
    sd = np.sqrt((z * z).sum(axis=-1) / (z.shape[-1] - 1))
    return z / np.where(ok, sd, 1.0)[:, None], ok


def _is_singular(C):
    """C [4, 4] correlation matrix -> True when min_k (1 - R^2_k) = det C / max det(3x3 minor) < SINGULAR_RTOL."""
    det4 = np.linalg.det(C)
    det3 = max(np.linalg.det(np.delete(np.delete(C, k, 0), k, 1)) for k in range(4))
    return not (np.isfinite(det4) and det4 > SINGULAR_RTOL * det3)


def _rows_correlation(rows):
    """rows [4, N] -> (z [4, N], C [4, 4]) or None when the pair is degenerate."""
    z, ok = _zscore(rows)
    if not ok.all():
        return None
    C = z @ z.T / (z.shape[1] - 1)
    return None if _is_singular(C) else (z, C)


def _logdet(C, idx):
    sign, value = np.linalg.slogdet(C[np.ix_(idx, idx)])
    return value if sign > 0 else -np.inf


def _local_quadratic(z, C, idx):
    """z_S(t)^T C_SS^-1 z_S(t) for every t -> [N]."""
    zs = z[idx]
    return np.sum(zs * np.linalg.solve(C[np.ix_(idx, idx)], zs), axis=0)


def _local_mi(z, C):
    """Local MIs in log space: dict MI name -> [N]."""
    mi = {}
    for name, (A, B) in _MI_SETS.items():
        AB = A + B
        const = 0.5 * (_logdet(C, A) + _logdet(C, B) - _logdet(C, AB))
        mi[name] = const + 0.5 * (_local_quadratic(z, C, A) + _local_quadratic(z, C, B) - _local_quadratic(z, C, AB))
    return mi


def _mean_mi_closed_form(C):
    """Time means of the nine local MIs from the correlation matrix alone: dict MI name -> float."""
    return {name: 0.5 * (_logdet(C, A) + _logdet(C, B) - _logdet(C, A + B)) for name, (A, B) in _MI_SETS.items()}


def mmi_atoms_from_correlation(C):
    """The 16 MMI atom means (tau as in C) of a pair from its 4x4 covariance or correlation matrix of
    (x past, y past, x future, y future): the closed form phiid_pair uses on a fitted matrix, here applied to any
    matrix (e.g. a process's population covariance, lib.experiments.synthetic). -> dict atom name -> float (nats)."""
    C = np.asarray(C, dtype=np.float64)
    if C.shape != (4, 4) or not np.allclose(C, C.T) or np.any(np.diag(C) <= 0):
        raise ValueError(f"C must be a symmetric 4x4 covariance matrix with a positive diagonal; got shape {C.shape}")
    d = np.sqrt(np.diag(C))
    atoms = atoms_from_parts(mmi_parts(_mean_mi_closed_form(C / np.outer(d, d))))
    return {name: float(atoms[name]) for name in ATOM_NAMES}


def _warn_pair_degenerate(tau):
    warnings.warn(f"PhiID is undefined for this pair at tau={tau} (a constant, non-finite or collinear series: "
                  f"singular 4x4 correlation matrix); returning NaN atoms", DegeneratePairWarning, stacklevel=3)


def phiid_pair(src, trg, tau=1, redundancy="MMI"):
    """PhiID of one source -> target pair. src, trg: [T] series (same length, T >= tau + 5).
    Returns dict atom name -> time mean of the local atom (nats), in ATOM_NAMES order.
    MMI uses the closed form (log-determinants of the correlation matrix); CCS evaluates local values in log
    space. Degenerate pairs give NaN atoms and a DegeneratePairWarning."""
    _check_choice(redundancy, REDUNDANCIES, "redundancy")
    rows = _pair_rows(src, trg, tau)
    fitted = _rows_correlation(rows)
    if fitted is None:
        _warn_pair_degenerate(tau)
        return {name: float("nan") for name in ATOM_NAMES}
    z, C = fitted
    if redundancy == "MMI":
        parts = mmi_parts(_mean_mi_closed_form(C))
    else:
        mi = _local_mi(z, C)
        parts = {name: np.mean(v) for name, v in {**mi, **ccs_local_redundancies(mi)}.items()}
    atoms = atoms_from_parts(parts)
    return {name: float(atoms[name]) for name in ATOM_NAMES}


def phiid_pair_local(src, trg, tau=1, redundancy="MMI"):
    """Local (per time point) PhiID of one pair: dict atom name -> [T - tau] (nats), phyid's local atoms.
    Evaluated in log space, so samples far from the mean stay finite. NaN arrays for a degenerate pair."""
    _check_choice(redundancy, REDUNDANCIES, "redundancy")
    rows = _pair_rows(src, trg, tau)
    fitted = _rows_correlation(rows)
    if fitted is None:
        _warn_pair_degenerate(tau)
        return {name: np.full(rows.shape[1], np.nan) for name in ATOM_NAMES}
    mi = _local_mi(*fitted)
    red = mmi_local_redundancies(mi) if redundancy == "MMI" else ccs_local_redundancies(mi)
    atoms = atoms_from_parts({**mi, **red})
    return {name: np.asarray(atoms[name], dtype=np.float64) for name in ATOM_NAMES}


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


# ----------------------------------------------------------------------------------------------------------------
# fast path: MMI sts, rtr and TDMI only, per segment or averaged (what rankings, halves and surrogates need)

FAST_QUANTITIES = ("sts", "rtr", "tdmi")


def _fast_quantities(g, xp):
    """MMI sts, rtr and TDMI (= I(xy; ab), the sum of the 16 atoms) of a chunk's pairs from its geometry, each
    [pairs]. With m_uv = 1 - r_uv^2, every MI is -1/2 log of a conditional variance and each MMI minimum of two
    MIs is -1/2 log of the larger variance, so the sts atom formula collapses to one logarithm:
        sts = 1/2 log[ det_ab min(var_a|xy, var_b|xy) min(var_x|ab, var_y|ab) max(m_xa, m_xb) max(m_ya, m_yb)
                       / (det(ab | xy) min(m_xa, m_ya) min(m_xb, m_yb) max(m_xa, m_xb, m_ya, m_yb)) ]
        rtr = D = -1/2 log max(m_xa, m_xb, m_ya, m_yb);   TDMI = 1/2 log(det_ab / det(ab | xy))."""
    m_xa, m_xb, m_ya, m_yb = g["det_xa"], g["det_xb"], g["det_ya"], g["det_yb"]
    max_x, max_y = xp.maximum(m_xa, m_xb), xp.maximum(m_ya, m_yb)
    m_max = xp.maximum(max_x, max_y)
    ratio = g["det_ab"] / g["schur_ab_xy"]
    q = (ratio * xp.minimum(g["var_a_xy"], g["var_b_xy"]) * xp.minimum(g["var_x_ab"], g["var_y_ab"])
         * max_x * max_y / (xp.minimum(m_xa, m_ya) * xp.minimum(m_xb, m_yb) * m_max))
    return {"sts": 0.5 * xp.log(q), "rtr": -0.5 * xp.log(m_max), "tdmi": 0.5 * xp.log(ratio)}


@dataclass
class FastPairStats:
    """MMI sts, rtr and TDMI (nats) of every unordered pair i < j (np.triu_indices order), source i.
    per_segment=True: sts, rtr, tdmi, valid are [segments, pairs] (one segment per prompt in per_prompt mode,
    else one), NaN where undefined. per_segment=False: [pairs] means over the segments where the pair is
    defined, valid = defined in at least one, NaN elsewhere. n_valid [pairs]: segments where defined."""
    sts: np.ndarray
    rtr: np.ndarray
    tdmi: np.ndarray
    valid: np.ndarray
    n_valid: np.ndarray
    n_heads: int
    mode: str
    tau: int


def phiid_fast_stats(X, tau=1, mode="per_prompt", lengths=None, per_segment=False, chunk_pairs=8192,
                     workers=None):
    """The fast option of the engine: MMI sts, rtr and TDMI only, for every unordered pair -> FastPairStats.
    Same segments, z-scores, pair geometry and degeneracy rule as phiid_all_pairs (so the same pairs are
    undefined and the values agree to rounding, ~1e-12); X, tau, mode, lengths as there. BLAS is limited to
    one thread for the per-segment correlation products (they are small; a multithreaded BLAS on a shared
    machine makes them much slower). No DegeneratePairWarning: valid / n_valid say which pairs are defined."""
    from threadpoolctl import threadpool_limits
    X, lengths = _check_inputs(X, tau, mode, lengths)
    be = _Backend("numpy")
    n_pairs = X.shape[1] * (X.shape[1] - 1) // 2
    n_seg = X.shape[0] if mode == "per_prompt" else 1
    rows = n_seg if per_segment else 1
    out = {k: np.full((rows, n_pairs), np.nan if per_segment else 0.0) for k in FAST_QUANTITIES}
    valid = np.zeros((n_seg if per_segment else 1, n_pairs), dtype=np.int64)

    def work(s, seg, pc):
        _, g, defined, all_defined = _chunk_geometry(seg, pc, np)
        values = _fast_quantities(g, np)
        row = s if per_segment else 0
        for k in FAST_QUANTITIES:
            if per_segment:
                out[k][row, pc.sl] = np.where(defined, values[k], np.nan)
            else:
                out[k][row, pc.sl] += values[k] if all_defined else np.where(defined, values[k], 0.0)
        valid[row, pc.sl] += defined

    with threadpool_limits(limits=1, user_api="blas"):
        _for_each_chunk(X, mode, tau, lengths, be, False, lambda _: chunk_pairs,
                        workers or _default_workers("numpy"), work)
    if per_segment:
        return FastPairStats(**out, valid=valid.astype(bool), n_valid=valid.sum(0), n_heads=X.shape[1],
                             mode=mode, tau=int(tau))
    n_valid = valid[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        means = {k: np.where(n_valid > 0, v[0] / n_valid, np.nan) for k, v in out.items()}
    return FastPairStats(**means, valid=n_valid > 0, n_valid=n_valid, n_heads=X.shape[1], mode=mode, tau=int(tau))


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


# ----------------------------------------------------------------------------------------------------------------
# artifacts: phiid_<mode>[__<tag>].npz next to activations[__<tag>].npz

def activations_files(out_dir, tags=None):
    """-> list of (tag, path) for the activation files of a run folder (lib.storage.artifacts "activations"). Tag "" is
    the run's model; tag "random_init" the re-initialised copy, "rev-<revision>" a checkpoint. tags=None: every
    file present (in lib.storage.artifacts.tag_sort_key order); else the listed tags ("" or None for the main file), each
    of which must exist."""
    from lib.storage import artifacts
    names = artifacts.shown_name(artifacts.artifact("activations"))
    if tags is None:
        found = [(tag, artifacts.path("activations", out_dir, tag)) for tag in artifacts.tags("activations", out_dir)]
        if not found:
            raise FileNotFoundError(f"no {names} in {str(out_dir)!r}: run notebook 01_extract_activations with "
                                    f"out_dir={str(out_dir)!r} first")
        return found
    tags = [tags] if isinstance(tags, str) else list(tags)
    found = [(tag or "", artifacts.path("activations", out_dir, tag or "")) for tag in tags]
    missing = [str(path) for _, path in found if not path.exists()]
    if missing:
        raise FileNotFoundError(f"activation file(s) {missing} not found for tags {tags}; available: "
                                f"{[t for t, _ in activations_files(out_dir)]} (tag '' is the run's own model)")
    return found


def phiid_path(out_dir, mode, tag=""):
    """The PhiID file of one mode: for the run's model (tag "") or a baseline tag (lib.storage.artifacts "phiid")."""
    from lib.storage import artifacts
    return artifacts.path("phiid", out_dir, tag, mode=mode)


def save_phiid(path, result, head_layer, head_index, **extra):
    """Write a PhiIDResult atomically (lib.storage.artifacts "phiid", keys checked before writing): one [heads, heads]
    array per atom name, atom_names, head_layer, head_index [heads], degenerate, n_valid [heads, heads], seconds,
    tau, redundancy, mode, backend, plus any extra arrays (run_phiid_for_run adds n_prompts, n_steps,
    activations_file and model)."""
    from lib.storage import artifacts
    heads = result.degenerate.shape[0]
    if len(head_layer) != heads or len(head_index) != heads:
        raise ValueError(f"head_layer/head_index have {len(head_layer)}/{len(head_index)} entries but the result "
                         f"has {heads} heads: pass the head map of the activations the result was computed from")
    return artifacts.save_file("phiid", path, dict(
        **result.atoms, atom_names=np.array(list(result.atoms)), head_layer=np.asarray(head_layer, np.int64),
        head_index=np.asarray(head_index, np.int64), degenerate=result.degenerate, n_valid=result.n_valid,
        seconds=np.float64(result.seconds), tau=np.int64(result.tau), redundancy=np.str_(result.redundancy),
        mode=np.str_(result.mode), backend=np.str_(result.backend), **extra))


def _missing_mode(out_dir, path, mode, needed_by):
    from lib.storage import artifacts
    who = f"{needed_by} needs" if needed_by else "this analysis needs"
    spec = artifacts.artifact("phiid")
    return artifacts.ArtifactError(
        f"{who} {path.name} in {str(Path(out_dir))!r}, which does not exist. Notebook {spec.producer} writes "
        f"{artifacts.shown_name(spec)} for every mode in its `modes` parameter: add {mode!r} to `modes` (params "
        f"YAML, section of {spec.producer}) and rerun it (python -m lib.run --params <run>.yaml --only "
        f"{spec.producer}), or drop the variants that need it")


def load_phiid(source, mode="per_prompt", tag="", activations=None, atoms=None, needed_by=""):
    """Read a PhiID file (written by save_phiid) -> dict: atom name -> [heads, heads], atom_names (list of str),
    head_layer, head_index [heads], degenerate [heads, heads] bool, n_valid, the scalars seconds, tau,
    redundancy, mode, backend (and n_prompts, n_steps, activations_file, model when recorded) as plain Python
    values, and path.

    source: a run folder (mode and tag choose the file; a missing mode names notebook 02's `modes` parameter and
    `needed_by`) or the path of the file itself. atoms: those that must be present (default: all 16).
    activations: a loaded activations dict; the file must come from the same run (lib.storage.artifacts.check_same_run)."""
    from lib.storage import artifacts
    if Path(source).suffix == ".npz":
        path = Path(source)
    else:
        _check_choice(mode, MODES, "PhiID mode")
        path = phiid_path(source, mode, tag)
        if not path.exists():
            raise _missing_mode(source, path, mode, needed_by)
    atoms = ATOM_NAMES if atoms is None else tuple(atoms)
    data = artifacts.load_file("phiid", path, require=[*atoms, "atom_names", "head_layer", "head_index", "degenerate"])
    data["atom_names"] = [str(a) for a in data["atom_names"]]
    data["degenerate"] = data["degenerate"].astype(bool)
    for key in ("seconds", "tau", "redundancy", "mode", "backend", "n_prompts", "n_steps", "activations_file", "model"):
        if key in data:
            data[key] = data[key].item()
    data["path"] = path
    if activations is not None:
        artifacts.check_same_run(activations, data)
    return data


def _mean_defined(values):
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def run_phiid_for_run(out_dir, modes=MODES, tau=1, redundancy="MMI", backend="numpy", tags=None):
    """Notebook 02: PhiID for every activations file of a run folder (or the given tags) and every mode.
    Writes phiid_<mode>[__<tag>].npz (see save_phiid) and a manifest entry; returns a pandas DataFrame with one
    row per (file, mode): tag ("" = activations.npz), mode, heads, prompts, steps, seconds, undefined and
    partially defined pairs (unordered), mean sts and rtr over defined ordered pairs (nats), output file."""
    import pandas as pd
    from lib.storage import artifacts, store
    modes = [modes] if isinstance(modes, str) else list(modes)
    for mode in modes:
        _check_choice(mode, MODES, "mode")
    _check_choice(redundancy, REDUNDANCIES, "redundancy")
    rows = []
    for tag, path in activations_files(out_dir, tags):
        run = artifacts.load_file("activations", path, require=["activations", "head_layer", "head_index"])
        X = run["activations"]
        for mode in modes:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", DegeneratePairWarning)
                result = phiid_all_pairs(X, tau=tau, redundancy=redundancy, mode=mode, backend=backend,
                                         head_names=[f"L{l}H{h}" for l, h in zip(run["head_layer"], run["head_index"])])
            for w in caught:  # re-emit, naming the file
                warnings.warn(f"{path.name}: {w.message}", DegeneratePairWarning, stacklevel=2)
            provenance = {"n_prompts": np.int64(X.shape[0]), "n_steps": np.int64(X.shape[2]),
                          "activations_file": np.str_(path.name)}
            if "model" in run:
                provenance["model"] = run["model"]
            out = save_phiid(phiid_path(out_dir, mode, tag), result, run["head_layer"], run["head_index"],
                             **provenance)
            off_diagonal = ~np.eye(X.shape[1], dtype=bool)
            rows.append({"tag": tag, "activations": path.name, "mode": mode, "redundancy": redundancy, "tau": tau,
                         "backend": backend, "prompts": X.shape[0], "heads": X.shape[1], "steps": X.shape[2],
                         "seconds": round(result.seconds, 3),
                         "undefined_pairs": int((result.degenerate & off_diagonal).sum()) // 2,
                         "partially_defined_pairs": int(((result.n_valid > 0) & (result.n_valid < X.shape[0])
                                                         & off_diagonal).sum()) // 2 if mode == "per_prompt" else 0,
                         "mean_sts": _mean_defined(result["sts"]), "mean_rtr": _mean_defined(result["rtr"]),
                         "file": out.name})
    table = pd.DataFrame(rows)
    store.update_manifest(out_dir, "02_phiid", {"tau": tau, "redundancy": redundancy, "backend": backend,
                                                "modes": modes, "runs": rows})
    return table
