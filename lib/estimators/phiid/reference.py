"""PhiID of one pair of heads: a plain, readable implementation (slogdet and solve on the 4x4 covariance
matrix of x_t, y_t, x_{t+tau}, y_{t+tau}); the reference the all-pairs engine is tested against."""
from __future__ import annotations

import warnings

import numpy as np

from lib.estimators.phiid.atoms import (ATOM_NAMES, CONSTANT_RTOL, DegeneratePairWarning, MIN_SAMPLES, REDUNDANCIES,
                                        SINGULAR_RTOL, _MI_SETS, atoms_from_parts, ccs_local_redundancies,
                                        mmi_local_redundancies, mmi_parts)

__all__ = ["mmi_atoms_from_correlation", "phiid_pair", "phiid_pair_local"]


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
