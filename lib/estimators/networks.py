"""Weighted undirected networks over heads, and the graph measures of the topology analysis (notebook 08,
lib.experiments.topology): pair weights from a PhiID atom, proportional thresholding (as bctpy's
`threshold_proportional`), weighted global efficiency (as bctpy's `efficiency_wei`, Dijkstra on a hub-pruned graph),
the strength-preserving null (weights exact, strengths within STRENGTH_TOL), NMI of modules against layer bands and
node strength by layer. Shapes: W [heads, heads] symmetric, non-negative, zero diagonal.
"""
from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.sparse import csgraph

from lib.storage.store import ArtifactError

__all__ = ["NETWORKS", "STRENGTH_TOL", "TopologyError", "pair_weights", "check_network", "check_threshold",
           "threshold_proportional", "shortest_paths", "global_efficiency", "strength_error", "strength_null", "nmi",
           "layer_bands", "strength_by_layer", "symmetric_weights"]

NETWORKS = {"syn": "sts", "red": "rtr"}          # network name -> PhiID atom
STRENGTH_TOL = 0.01                              # null strengths within 1% of the observed ones
_PRUNE_HUBS = 16                                 # hubs whose two-step paths bound the shortest paths


class TopologyError(ArtifactError):
    """Bad input to the topology analysis (raised before anything is written)."""


# ---------------------------------------------------------------------------------------------------- weights

def pair_weights(atom: np.ndarray, degenerate: np.ndarray) -> np.ndarray:
    """[heads, heads] ordered-pair atom values and degenerate mask -> [heads, heads] symmetric weights W:
    the mean over the defined directions of each unordered pair, negatives clipped to 0, diagonal 0."""
    values = np.where(degenerate | ~np.isfinite(atom), np.nan, atom).astype(np.float64)
    both = np.stack([values, values.T])
    defined = np.isfinite(both).sum(0)
    total = np.nansum(both, axis=0)
    W = np.divide(total, defined, out=np.zeros_like(total), where=defined > 0)
    W = np.clip(W, 0.0, None)
    np.fill_diagonal(W, 0.0)
    return W


def check_network(W: np.ndarray, name: str) -> None:
    """A network must have at least one positive weight."""
    if not np.any(W > 0):
        raise TopologyError(f"the {name} network has no positive weight (every pair is undefined, negative or 0): "
                            f"there is nothing to measure; check the PhiID file (notebook 02) of this run")


def check_threshold(p) -> float:
    if not isinstance(p, (int, float, np.floating)) or isinstance(p, bool) or not 0 < float(p) <= 1:
        raise TopologyError(f"threshold {p!r} is outside (0, 1]: give the fraction of pairs to keep, e.g. 0.1 "
                            f"for the strongest 10% (1.0 = the full network)")
    return float(p)


def threshold_proportional(W: np.ndarray, p: float) -> np.ndarray:
    """[n, n] symmetric -> copy keeping the round(p n (n - 1) / 2) strongest positive pairs (bctpy
    threshold_proportional: half-up rounding, ties in stable order of the upper triangle)."""
    p = check_threshold(p)
    n = len(W)
    i, j = np.triu_indices(n, 1)
    w = W[i, j]
    pos = np.flatnonzero(w > 0)
    keep = int(np.floor(n * (n - 1) / 2 * p + 0.5))
    order = pos[np.argsort(-w[pos], kind="stable")][:keep]
    out = np.zeros_like(W)
    out[i[order], j[order]] = w[order]
    return out + out.T


# ------------------------------------------------------------------------------------------------- efficiency

def _lengths(W: np.ndarray) -> np.ndarray:
    """[n, n] weights -> connection lengths max(W) / W (0 where there is no edge, as csgraph reads it)."""
    L = np.zeros_like(W, dtype=np.float64)
    pos = W > 0
    L[pos] = W.max() / W[pos]
    return L


def _hub_bound(L: np.ndarray, hubs: int) -> np.ndarray:
    """[n, n] lengths (0 = no edge) -> an upper bound of every shortest path: the direct edge or the two-step
    path through one of the `hubs` nodes of largest strength (sum of 1 / length)."""
    Lm = np.where(L > 0, L, np.inf)
    strength = np.divide(1.0, L, out=np.zeros_like(L), where=L > 0).sum(1)
    bound = Lm.copy()
    for h in np.argsort(-strength)[:hubs]:
        np.minimum(bound, Lm[:, h][:, None] + Lm[h][None, :], out=bound)
    return bound


def shortest_paths(L: np.ndarray) -> np.ndarray:
    """[n, n] symmetric lengths (0 = no edge) -> [n, n] shortest path lengths (inf if unreachable), exact.
    Two-step paths through the strongest hubs bound the distances from above; an edge longer than that bound is
    on no shortest path (a shorter path joins its ends) and is dropped before Dijkstra."""
    useful = (L > 0) & (L <= _hub_bound(L, _PRUNE_HUBS) * (1 + 1e-12))
    return csgraph.dijkstra(sparse.csr_matrix(np.where(useful, L, 0.0)), directed=True)   # both directions kept


def global_efficiency(W: np.ndarray) -> float:
    """Weighted global efficiency of an undirected network, as bctpy efficiency_wei(W / max(W)):
    mean over ordered pairs i != j of 1 / d_ij, d on lengths 1 / w (unreachable pairs count 0)."""
    n = len(W)
    if n < 2 or not np.any(W > 0):
        return 0.0
    D = shortest_paths(_lengths(W))
    np.fill_diagonal(D, np.inf)
    return float((1.0 / D).sum() / (n * n - n))


# ------------------------------------------------------------------------------------------------------- null

def _scaling(W: np.ndarray, s: np.ndarray, x: np.ndarray, iters: int = 200, rtol: float = 1e-8) -> np.ndarray:
    """Symmetric Sinkhorn from start factors x [n]: factors x with row sums of W_ij x_i x_j equal to s
    (nodes with s = 0 get x = 0)."""
    x = np.where(s > 0, x, 0.0)
    for _ in range(iters):
        row = W @ x
        if np.max(np.abs(x * row - s)) <= rtol * s.max():
            break
        x = np.sqrt(x * np.divide(s, row, out=np.zeros_like(s), where=row > 0))
    return x


def symmetric_weights(n: int, flat: np.ndarray, flat_t: np.ndarray, w: np.ndarray) -> np.ndarray:
    """[n, n] symmetric matrix with the edge weights w [E] at flat indices flat (upper) and flat_t (lower)."""
    out = np.zeros(n * n)
    out[flat] = w
    out[flat_t] = w
    return out.reshape(n, n)


def _relative_error(strength: np.ndarray, s: np.ndarray) -> float:
    """Max |strength - s| / s over nodes with s > 0 (0 when there is none)."""
    pos = s > 0
    return float(np.max(np.abs(strength[pos] - s[pos]) / s[pos])) if pos.any() else 0.0


def strength_error(W0: np.ndarray, W1: np.ndarray) -> float:
    """Max relative difference of node strengths, over nodes with positive strength in W0."""
    return _relative_error(W1.sum(1), W0.sum(1))


def _swap_gains(r, inv_s, a, b, x, y, d):
    """Change of sum((strength error / strength)^2) when edges (a, b) [m] and (x, y) [E] swap weights
    (d [m, E] = weight(x, y) - weight(a, b)); edges sharing a node are excluded (inf)."""
    def change(node, delta):
        return (r[node] + delta * inv_s[node]) ** 2 - r[node] ** 2
    total = change(a[:, None], d) + change(b[:, None], d) + change(x[None, :], -d) + change(y[None, :], -d)
    shared = (x[None, :] == a[:, None]) | (x[None, :] == b[:, None]) | (y[None, :] == a[:, None]) | \
             (y[None, :] == b[:, None])
    return np.where(shared, np.inf, total)


def _refine_by_swaps(w, i, j, s, tol, rng, max_steps, candidates=16, partners=4096):
    """Greedy weight swaps between edges (keeps the distribution) that shrink the largest relative strength
    error: the worst node's edges (a random `candidates` of them) against `partners` random edges.
    w [E] edge weights, i, j [E] their ends, s [n] target strengths -> w (updated in place)."""
    inv_s = np.divide(1.0, s, out=np.zeros_like(s), where=s > 0)
    r = (np.bincount(i, w, len(s)) + np.bincount(j, w, len(s)) - s) * inv_s
    failures = 0
    for _ in range(max_steps):
        u = int(np.argmax(np.abs(r)))
        if abs(r[u]) <= tol:
            break
        mine = np.flatnonzero((i == u) | (j == u))
        mine = rng.choice(mine, min(candidates, mine.size), replace=False)
        other = rng.choice(w.size, min(partners, w.size), replace=False)
        gains = _swap_gains(r, inv_s, i[mine], j[mine], i[other], j[other], w[None, other] - w[mine, None])
        k, best = np.unravel_index(np.argmin(gains), gains.shape)
        if not gains[k, best] < -1e-15:
            failures += 1
            if failures > 20:
                break
            continue
        failures = 0
        e1, e2 = mine[k], other[best]
        d = w[e2] - w[e1]
        w[e1], w[e2] = w[e2], w[e1]
        for node, delta in ((i[e1], d), (j[e1], d), (i[e2], -d), (j[e2], -d)):
            r[node] += delta * inv_s[node]
    return w


def _ranking(y: np.ndarray) -> np.ndarray:
    """Indices that sort y [E] (non-negative floats) ascending, as argsort up to ties at 2^-(52 - log2 E) relative
    precision: the index is packed into the low bits of each value's bit pattern and one int64 sort (a SIMD sort,
    about 3x faster than argsort) orders both."""
    bits = max(int(y.size - 1).bit_length(), 1)
    key = (y.view(np.int64) >> bits << bits) | np.arange(y.size)
    key.sort()
    return key & ((1 << bits) - 1)


def _alternate(w, s, values, i, j, tol, max_rounds, overshoot: float = 0.5):
    """Alternate strength scaling and exact-distribution rank replacement from edge weights w [E] (a permutation of
    the sorted values [E]) on edges (i, j) -> (edge weights, max relative strength error), the best round's.
    Each scaling aims past the target by (s / strength) ** overshoot (the rank replacement undoes part of every
    scaling; 0.5 needs about a third fewer rounds than aiming at s, and the fixed point is the same)."""
    n = len(s)
    flat, flat_t = i * n + j, j * n + i
    dense = symmetric_weights(n, flat, flat_t, w)
    error, x, target = _relative_error(dense.sum(1), s), np.where(s > 0, 1.0, 0.0), s
    for _ in range(max_rounds):
        if error <= tol:
            break
        x = _scaling(dense, target, x)
        ranked = np.empty_like(w)
        ranked[_ranking(w * x[i] * x[j])] = values
        dense = symmetric_weights(n, flat, flat_t, ranked)
        strength = dense.sum(1)
        new_error = _relative_error(strength, s)
        if new_error >= error * 0.999:
            break
        w, error = ranked, new_error
        target = s * np.divide(s, strength, out=np.ones_like(s), where=strength > 0) ** overshoot
    return w, error


def strength_null(W: np.ndarray, rng, tol: float = STRENGTH_TOL / 2, max_rounds: int = 30):
    """One randomised network keeping the weight distribution of W [n, n] exactly and its node strengths within
    `tol` when reachable (alternating Sinkhorn scaling and rank-for-rank weight replacement, then greedy weight
    swaps, see the module doc) -> (null [n, n], max relative strength error)."""
    s = W.sum(1)
    live = np.flatnonzero(s > 0)
    i, j = np.triu_indices(len(live), 1)
    i, j = live[i], live[j]
    values = np.sort(W[i, j])
    w, error = _alternate(rng.permutation(values), s, values, i, j, tol, max_rounds)
    if error > tol:
        w = _refine_by_swaps(w.copy(), i, j, s, tol, rng, max_steps=min(20 * len(live), 2000))
    null = symmetric_weights(len(W), i * len(W) + j, j * len(W) + i, w)
    return null, strength_error(W, null)


# ---------------------------------------------------------------------------------------------- modules/layers

def nmi(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised mutual information 2 I(a; b) / (H(a) + H(b)) of two labelings [n] (1 when both are one
    block)."""
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    joint = np.zeros((ia.max() + 1, ib.max() + 1))
    np.add.at(joint, (ia, ib), 1.0)
    p = joint / joint.sum()
    pa, pb = p.sum(1), p.sum(0)

    def entropy(q):
        q = q[q > 0]
        return float(-(q * np.log(q)).sum())
    ha, hb = entropy(pa), entropy(pb)
    if ha + hb == 0:
        return 1.0
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / np.outer(pa, pb)[nz])).sum())
    return 2 * mi / (ha + hb)


def layer_bands(head_layer: np.ndarray, n_bands: int) -> np.ndarray:
    """[heads] layer of each head -> [heads] band 0..n_bands-1 of contiguous, equally wide layer ranges."""
    n_layers = int(head_layer.max()) + 1
    return np.minimum(head_layer * n_bands // n_layers, n_bands - 1)


def strength_by_layer(W: np.ndarray, head_layer: np.ndarray):
    """Mean node strength (nats, summed over a head's pairs) per layer with a normal 95% CI over its heads ->
    DataFrame layer, heads, strength, ci_lo, ci_hi."""
    import pandas as pd
    s = W.sum(1)
    rows = []
    for layer in np.unique(head_layer):
        v = s[head_layer == layer]
        half = 1.96 * v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else np.nan
        rows.append({"layer": int(layer), "heads": len(v), "strength": float(v.mean()),
                     "ci_lo": float(v.mean() - half), "ci_hi": float(v.mean() + half)})
    return pd.DataFrame(rows)
