"""The fast path: MMI sts, rtr and TDMI only, per segment or averaged (what rankings, split halves and
surrogates need), without the full 16-atom lattice."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lib.estimators.phiid.engine import _Backend, _check_inputs, _chunk_geometry, _default_workers, _for_each_chunk

__all__ = ["phiid_fast_stats"]


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
