"""Diagnostics over time and depth: circular-shift surrogates of the head time series, per-layer profiles
and split-half reliability."""
from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["lag_autocorrelation", "circular_autocorrelation", "head_autocorrelation", "drift", "linear_detrend",
           "first_difference", "shift_series", "shift_keeping_trend", "circular_shift", "normalized_depth",
           "layer_means", "layer_profile", "heads_grid", "spearman_brown", "random_halves", "null_band"]


# ------------------------------------------------------------------------------------------- time series

def _check_X(X):
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 3:
        raise ValueError(f"activations must be [prompts, heads, steps]; got shape {X.shape}")
    return X


def lag_autocorrelation(X, lag: int = 1) -> np.ndarray:
    """[prompts, heads, steps] -> [prompts, heads]: Pearson correlation of x[:-lag] and x[lag:] (each piece
    centred and scaled by itself: the correlation PhiID sees between a head's past and future).
    NaN where a piece is constant."""
    X = _check_X(X)
    if not 1 <= lag <= X.shape[2] - 3:
        raise ValueError(f"lag must be in [1, steps - 3]; got {lag} for {X.shape[2]} steps")
    p, f = X[..., :-lag], X[..., lag:]
    p = p - p.mean(-1, keepdims=True)
    f = f - f.mean(-1, keepdims=True)
    den = np.sqrt((p * p).sum(-1) * (f * f).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (p * f).sum(-1) / np.where(den > 0, den, 1.0), np.nan)


def circular_autocorrelation(X, lag: int = 1) -> np.ndarray:
    """[prompts, heads, steps] -> [prompts, heads]: sum_t (x_t - m)(x_{(t+lag) mod T} - m) / sum_t (x_t - m)^2.
    Invariant under any circular shift of the series (the surrogate null keeps it exactly)."""
    X = _check_X(X)
    c = X - X.mean(-1, keepdims=True)
    den = (c * c).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (c * np.roll(c, -lag, axis=-1)).sum(-1) / np.where(den > 0, den, 1.0), np.nan)


def head_autocorrelation(X, lag: int = 1) -> np.ndarray:
    """Per-head lag autocorrelation: per prompt, then the mean over prompts where it is defined -> [heads]."""
    r = lag_autocorrelation(X, lag)
    ok = np.isfinite(r)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, r, 0.0).sum(0) / ok.sum(0)


def drift(X) -> np.ndarray:
    """[prompts, heads, steps] -> [prompts, heads]: least-squares slope of the norm over steps times
    (steps - 1), divided by the mean norm (fractional change of the fitted line across the generation)."""
    X = _check_X(X)
    T = X.shape[2]
    t = np.arange(T, dtype=np.float64) - (T - 1) / 2
    slope = (X * t).sum(-1) / (t * t).sum()
    mean = X.mean(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(np.abs(mean) > 0, slope * (T - 1) / np.where(mean != 0, mean, 1.0), np.nan)


def head_drift(X) -> np.ndarray:
    """Per-head drift: per prompt, then the mean over prompts where it is defined -> [heads]."""
    d = drift(X)
    ok = np.isfinite(d)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, d, 0.0).sum(0) / ok.sum(0)


def linear_detrend(X) -> np.ndarray:
    """Remove the least-squares line from every series (per prompt and head) -> same shape, float64."""
    X = _check_X(X)
    T = X.shape[2]
    t = np.arange(T, dtype=np.float64) - (T - 1) / 2
    slope = (X * t).sum(-1, keepdims=True) / (t * t).sum()
    return X - X.mean(-1, keepdims=True) - slope * t


def first_difference(X) -> np.ndarray:
    """x[t] - x[t-1] along steps -> [prompts, heads, steps - 1]."""
    return np.diff(_check_X(X), axis=-1)


def shift_series(X, offsets) -> np.ndarray:
    """Circularly shift series X[p, h] left by offsets[p, h] steps: out[p, h, t] = X[p, h, (t + offset) mod T]."""
    X = np.asarray(X)
    T = X.shape[2]
    idx = (np.arange(T)[None, None, :] + np.asarray(offsets)[:, :, None]) % T
    return np.take_along_axis(X, idx, axis=-1)


def shift_keeping_trend(X, offsets) -> np.ndarray:
    """Surrogate that keeps each series' least-squares line: line + the residuals shifted circularly by offsets
    [prompts, heads]. A drift shared by every head stays aligned (it counts as null, not as redundancy), the
    residuals' circular autocorrelation is kept, their timing between heads is broken."""
    X = np.asarray(X, np.float64)
    resid = linear_detrend(X)
    return X - resid + shift_series(resid, offsets)


def circular_shift(X, rng, return_offsets: bool = False):
    """Surrogate: shift each head's series within each prompt circularly by an independent uniform random
    offset in [0, steps). Keeps every series' values and its circular autocorrelation exactly; breaks the
    timing between heads. rng: numpy Generator or seed."""
    X = np.asarray(X)
    rng = np.random.default_rng(rng)
    offsets = rng.integers(0, X.shape[2], size=X.shape[:2])
    out = shift_series(X, offsets)
    return (out, offsets) if return_offsets else out


# ------------------------------------------------------------------------------------------- layers

def normalized_depth(n_layers: int) -> np.ndarray:
    """[n_layers]: layer / (n_layers - 1), 0 = first layer, 1 = last."""
    return np.arange(n_layers) / max(n_layers - 1, 1)


def layer_means(values, head_layer, n_layers: int) -> np.ndarray:
    """[..., heads] -> [..., n_layers]: mean over the heads of each layer (NaN-aware)."""
    values = np.asarray(values, dtype=np.float64)
    head_layer = np.asarray(head_layer)
    out = np.full(values.shape[:-1] + (n_layers,), np.nan)
    for layer in range(n_layers):
        sel = values[..., head_layer == layer]
        if sel.shape[-1]:
            with np.errstate(invalid="ignore"):
                out[..., layer] = np.nanmean(sel, axis=-1) if np.isfinite(sel).any() else np.nan
    return out


def layer_profile(values, head_layer, n_layers: int) -> pd.DataFrame:
    """Per-layer mean, sd, standard error and count of a per-head quantity, with normalised depth."""
    values = np.asarray(values, dtype=np.float64)
    head_layer = np.asarray(head_layer)
    rows = []
    for layer, depth in zip(range(n_layers), normalized_depth(n_layers)):
        v = values[(head_layer == layer) & np.isfinite(values)]
        sd = float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")
        rows.append({"layer": layer, "depth": float(depth), "mean": float(v.mean()) if len(v) else float("nan"),
                     "sd": sd, "sem": sd / np.sqrt(len(v)) if len(v) > 1 else float("nan"), "n": len(v)})
    return pd.DataFrame(rows)


def heads_grid(values, head_layer, head_index, n_layers: int, n_heads: int) -> np.ndarray:
    """[heads] -> [n_layers, n_heads] (NaN where a head is absent)."""
    grid = np.full((n_layers, n_heads), np.nan)
    grid[np.asarray(head_layer), np.asarray(head_index)] = values
    return grid


# ------------------------------------------------------------------------------------------- reliability

def spearman_brown(r, factor: float = 2.0):
    """Reliability of a measure `factor` times as long as one with reliability r: k r / (1 + (k - 1) r)."""
    r = np.asarray(r, dtype=np.float64)
    return factor * r / (1 + (factor - 1) * r)


def random_halves(n_items: int, n_splits: int, rng) -> list[tuple[np.ndarray, np.ndarray]]:
    """n_splits random splits of range(n_items) into two disjoint halves of n_items // 2 (sorted indices;
    with an odd count one item is left out of each split)."""
    if n_items < 2:
        raise ValueError(f"split halves need at least 2 prompts; got {n_items}")
    rng = np.random.default_rng(rng)
    half = n_items // 2
    out = []
    for _ in range(n_splits):
        perm = rng.permutation(n_items)
        out.append((np.sort(perm[:half]), np.sort(perm[half:2 * half])))
    return out


def null_band(null_profiles, observed, level: float = 0.95) -> pd.DataFrame:
    """null_profiles [surrogates, layers], observed [layers] -> per layer: null mean, sd, lower/upper
    quantiles of the central `level` band, z = (observed - null mean) / null sd."""
    null = np.asarray(null_profiles, dtype=np.float64)
    observed = np.asarray(observed, dtype=np.float64)
    a = (1 - level) / 2
    mean = null.mean(0) if len(null) else np.full(observed.shape, np.nan)
    sd = null.std(0, ddof=1) if len(null) > 1 else np.full(observed.shape, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (observed - mean) / sd
    lo = np.quantile(null, a, axis=0) if len(null) else mean
    hi = np.quantile(null, 1 - a, axis=0) if len(null) else mean
    n_layers = len(observed)
    return pd.DataFrame({"layer": np.arange(n_layers), "depth": normalized_depth(n_layers), "observed": observed,
                         "null_mean": mean, "null_sd": sd, "null_lo": lo, "null_hi": hi, "z": z})
