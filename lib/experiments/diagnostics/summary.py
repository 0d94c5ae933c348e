"""The inverted-U test over depth thirds against its null, and the one-call summary notebook 03 writes
(diagnostics.json)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from lib.storage import artifacts
from lib.storage.artifacts import check_same_run  # noqa: F401  (re-exported: activations vs PhiID of one run)
from lib.estimators.phiid import load_phiid  # noqa: F401  (re-exported: the one PhiID reader)
from lib.storage.store import ArtifactError
from lib.experiments.diagnostics.pairs import (DegenerateHeadError, PHIID_MODES, REDUNDANCY_ATOM, SYNERGY_ATOM, THIRDS,
                                               _EPS, bootstrap_correlation, correlation, correlation_ci_table,
                                               head_labels, load_activations, pair_index, per_head_mean,
                                               syn_red_correlations, tdmi_matrix, upper)
from lib.experiments.diagnostics.series import (head_autocorrelation, head_drift, layer_means, layer_profile,
                                                normalized_depth)
from lib.storage.notebooks import NB

__all__ = ["inverted_u_test", "diagnose", "run_diagnostics", "summary_table"]


# ------------------------------------------------------------------------------------------- inverted U

@dataclass
class InvertedU:
    """Shape of a per-layer profile against normalised depth (see inverted_u_test for the rule)."""
    quadratic: float
    linear: float
    peak_depth: float
    mid_minus_early: float
    mid_minus_late: float
    late_minus_early: float
    ci: dict
    verdict: str
    n_boot: int

    def as_row(self) -> dict:
        row = {"verdict": self.verdict, "quadratic": self.quadratic, "peak_depth": self.peak_depth,
               "mid_minus_early": self.mid_minus_early, "mid_minus_late": self.mid_minus_late,
               "late_minus_early": self.late_minus_early}
        for k, (lo, hi) in self.ci.items():
            row[f"{k}_lo"], row[f"{k}_hi"] = lo, hi
        return row


def _thirds(depth):
    early = depth < THIRDS[0] - _EPS
    late = depth > THIRDS[1] + _EPS
    return early, ~early & ~late, late


def _shape_stats(profile, depth):
    """profile [..., layers] -> quadratic coefficient, linear coefficient, vertex, thirds differences."""
    ok = np.isfinite(profile)
    if not ok.all():
        profile = np.where(ok, profile, np.nanmean(profile, axis=-1, keepdims=True))
    V = np.stack([np.ones_like(depth), depth, depth ** 2], 1)
    coef = np.linalg.lstsq(V, np.moveaxis(profile, -1, 0).reshape(len(depth), -1), rcond=None)[0]
    b, c = coef[1].reshape(profile.shape[:-1]), coef[2].reshape(profile.shape[:-1])
    with np.errstate(invalid="ignore", divide="ignore"):
        peak = np.where(c < 0, np.clip(-b / (2 * c), 0.0, 1.0), np.nan)
    early, mid, late = _thirds(depth)
    e, m, l = (profile[..., s].mean(-1) for s in (early, mid, late))
    return {"quadratic": c, "linear": b, "peak_depth": peak, "mid_minus_early": m - e, "mid_minus_late": m - l,
            "late_minus_early": l - e}


def _sign(lo, hi):
    return 1 if lo > 0 else (-1 if hi < 0 else 0)


def inverted_u_test(scores, head_layer, n_layers: int, n_boot: int = 1000, seed=0, level: float = 0.95) -> InvertedU:
    """Shape test of the per-layer mean of a per-head score against normalised depth d = layer / (L - 1).

    Statistics on the per-layer profile: quadratic coefficient c of a least-squares fit a + b d + c d^2,
    its peak (vertex -b / 2c, clipped to [0, 1]; NaN when c >= 0), and the differences between the mean
    profile over the middle third (1/3 <= d <= 2/3) and the early (d < 1/3) and late (d > 2/3) thirds.
    Confidence intervals: percentile bootstrap over heads, resampled with replacement within each layer.

    Verdict (in this order, "CI > 0" = the whole interval above 0):
      "inverted U"            mid - early CI > 0 and mid - late CI > 0
      "U shape"               mid - early CI < 0 and mid - late CI < 0
      "monotone increasing"   late - early CI > 0 (and not the above)
      "monotone decreasing"   late - early CI < 0
      "no depth trend"        otherwise (every difference compatible with 0)
    Needs at least 3 layers (one per third)."""
    scores = np.asarray(scores, dtype=np.float64)
    head_layer = np.asarray(head_layer)
    depth = normalized_depth(n_layers)
    if n_layers < 3:
        raise ValueError(f"the inverted-U test needs at least 3 layers (early, middle, late); got {n_layers}")
    obs = _shape_stats(layer_means(scores, head_layer, n_layers), depth)
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(head_layer == l) for l in range(n_layers)]
    boot = np.full((n_boot, n_layers), np.nan)
    for l, idx in enumerate(members):
        if len(idx):
            boot[:, l] = np.nanmean(scores[rng.choice(idx, size=(n_boot, len(idx)))], axis=1)
    bs = _shape_stats(boot, depth)
    a = (1 - level) / 2
    ci = {}
    for k, v in bs.items():
        if k == "linear":
            continue
        v = v[np.isfinite(v)]
        ci[k] = (float(np.quantile(v, a)), float(np.quantile(v, 1 - a))) if len(v) else (np.nan, np.nan)
    me, ml, le = (_sign(*ci[k]) for k in ("mid_minus_early", "mid_minus_late", "late_minus_early"))
    if me > 0 and ml > 0:
        verdict = "inverted U"
    elif me < 0 and ml < 0:
        verdict = "U shape"
    elif le > 0:
        verdict = "monotone increasing"
    elif le < 0:
        verdict = "monotone decreasing"
    else:
        verdict = "no depth trend"
    return InvertedU(quadratic=float(obs["quadratic"]), linear=float(obs["linear"]),
                     peak_depth=float(obs["peak_depth"]), mid_minus_early=float(obs["mid_minus_early"]),
                     mid_minus_late=float(obs["mid_minus_late"]), late_minus_early=float(obs["late_minus_early"]),
                     ci=ci, verdict=verdict, n_boot=n_boot)


# ------------------------------------------------------------------------------------------- one-call summary

@dataclass
class Diagnostics:
    """Everything notebook 03 shows. heads: per-head table; pairs: per-pair table (unordered pairs, valid
    only); summary: the numbers written to diagnostics.json."""
    heads: pd.DataFrame
    pairs: pd.DataFrame
    profiles: dict
    summary: dict
    sts: np.ndarray
    tdmi: np.ndarray | None


def diagnose(acts: dict, ph: dict, lag: int = 1) -> Diagnostics:
    """Per-head and per-pair diagnostics of one run (activations dict + PhiID dict of one mode)."""
    check_same_run(acts, ph)
    X = np.asarray(acts["activations"], dtype=np.float64)
    head_layer, head_index = np.asarray(acts["head_layer"]), np.asarray(acts["head_index"])
    n_layers, n_heads = int(acts["n_layers"]), int(acts["n_heads"])
    labels = head_labels(head_layer, head_index)
    deg = np.asarray(ph["degenerate"], bool)
    sts, rtr = np.asarray(ph[SYNERGY_ATOM], float), np.asarray(ph[REDUNDANCY_ATOM], float)
    try:
        tdmi = tdmi_matrix(ph)
    except ArtifactError:
        tdmi = None
    syn, red = per_head_mean(sts, deg, labels), per_head_mean(rtr, deg, labels)
    heads = pd.DataFrame({"head_idx": np.arange(len(head_layer)), "layer": head_layer, "head": head_index,
                          "depth": head_layer / max(n_layers - 1, 1), "synergy": syn, "redundancy": red,
                          "autocorr": head_autocorrelation(X, lag), "drift": head_drift(X),
                          "mean_norm": X.mean(axis=(0, 2))})
    ok = ~upper(deg)
    i, j = pair_index(len(head_layer))
    pairs = pd.DataFrame({"i": i[ok], "j": j[ok], "sts": upper(sts)[ok], "rtr": upper(rtr)[ok]})
    if tdmi is not None:
        heads["tdmi"] = per_head_mean(tdmi, deg, labels)
        pairs["tdmi"] = upper(tdmi)[ok]
    corr = syn_red_correlations(sts, rtr, deg, labels)
    summary = {
        "model": str(artifacts.scalar(acts, "model")) if "model" in acts else None,
        "n_prompts": int(X.shape[0]), "n_heads": int(X.shape[1]), "n_steps": int(X.shape[2]),
        "n_layers": n_layers, "heads_per_layer": n_heads, "lag": lag,
        "n_degenerate_pairs": int(upper(deg).sum()), "n_pairs": int(len(i)),
        "syn_red": corr,
        "autocorr_vs_synergy": correlation(heads["autocorr"], syn),
        "autocorr_vs_redundancy": correlation(heads["autocorr"], red),
        "drift_vs_synergy": correlation(heads["drift"], syn),
        "mean_autocorr": float(np.nanmean(heads["autocorr"])),
        "mean_drift": float(np.nanmean(heads["drift"])),
    }
    if tdmi is not None:
        summary["tdmi_vs_synergy"] = correlation(heads["tdmi"], syn)
        summary["tdmi_vs_redundancy"] = correlation(heads["tdmi"], red)
        summary["autocorr_vs_tdmi"] = correlation(heads["autocorr"], heads["tdmi"])
        summary["pair_tdmi_vs_sts"] = correlation(pairs["tdmi"], pairs["sts"])
        summary["pair_tdmi_vs_rtr"] = correlation(pairs["tdmi"], pairs["rtr"])
    cols = [c for c in ("synergy", "redundancy", "autocorr", "drift", "tdmi", "mean_norm") if c in heads]
    profiles = {c: layer_profile(heads[c].to_numpy(), head_layer, n_layers) for c in cols}
    summary["layer_profiles"] = {c: profiles[c]["mean"].tolist() for c in cols}
    summary["correlation_ci"] = correlation_ci_table(heads, pairs).to_dict(orient="records")
    return Diagnostics(heads=heads, pairs=pairs, profiles=profiles, summary=summary, sts=sts, tdmi=tdmi)


def correlation_table(out_dir, lag: int = 1) -> pd.DataFrame:
    """Syn-red correlations (head and pair level) and autocorrelation-synergy correlation for every PhiID
    file in out_dir: every mode, the run's model and each baseline tag. One row per (tag, mode)."""
    rows = []
    for tag in artifacts.tags("activations", out_dir):
        acts = load_activations(out_dir, tag)
        ac = head_autocorrelation(acts["activations"], lag)
        labels = head_labels(acts["head_layer"], acts["head_index"])
        for mode in PHIID_MODES:
            if not artifacts.path("phiid", out_dir, tag, mode=mode).exists():
                continue
            ph = load_phiid(out_dir, mode, tag, activations=acts, atoms=(SYNERGY_ATOM, REDUNDANCY_ATOM))
            try:
                c = syn_red_correlations(ph[SYNERGY_ATOM], ph[REDUNDANCY_ATOM], ph["degenerate"], labels)
                syn = per_head_mean(ph[SYNERGY_ATOM], ph["degenerate"], labels)
            except DegenerateHeadError as e:
                rows.append({"tag": tag or "(model)", "mode": mode, "error": str(e)})
                continue
            lo, hi = bootstrap_correlation(syn, per_head_mean(ph[REDUNDANCY_ATOM], ph["degenerate"], labels))[
                "spearman_ci"]
            rows.append({"tag": tag or "(model)", "mode": mode, "head_pearson": c["head_pearson"],
                         "head_spearman": c["head_spearman"], "head_spearman_lo": lo, "head_spearman_hi": hi,
                         "pair_pearson": c["pair_pearson"],
                         "pair_spearman": c["pair_spearman"],
                         "autocorr_vs_synergy_spearman": correlation(ac, syn)["spearman"]})
    return pd.DataFrame(rows)


def run_diagnostics(out_dir, mode: str = "per_prompt", lag: int = 1, tag: str = "") -> tuple[Diagnostics, pd.DataFrame]:
    """Notebook 03: diagnostics of one PhiID file plus the correlation table over every file of the run;
    writes diagnostics.json (diagnostics__<tag>.json for a baseline) and a manifest entry."""
    import time

    from lib.storage.store import update_manifest
    t0 = time.perf_counter()
    acts = load_activations(out_dir, tag)
    ph = load_phiid(out_dir, mode, tag, activations=acts, needed_by=NB.DIAGNOSTICS)
    d = diagnose(acts, ph, lag)
    table = correlation_table(out_dir, lag)
    d.summary.update(mode=mode, tag=tag, phiid_tau=artifacts.scalar(ph, "tau"),
                     phiid_redundancy=artifacts.scalar(ph, "redundancy"),
                     all_files=table.to_dict(orient="records"))
    d.summary["per_head"] = d.heads.to_dict(orient="list")
    name = artifacts.save("diagnostics", out_dir, d.summary, tag=tag).name
    update_manifest(out_dir, NB.DIAGNOSTICS, {"mode": mode, "lag": lag, "tag": tag, "file": name,
                                                      "seconds": round(time.perf_counter() - t0, 3)})
    return d, table


def summary_table(summary: dict) -> pd.DataFrame:
    """The headline numbers of diagnostics.json as a two-column table."""
    s = summary
    rows = [
        ("syn-red Pearson r, head level", s["syn_red"]["head_pearson"]),
        ("syn-red Spearman ρ, head level", s["syn_red"]["head_spearman"]),
        ("syn-red Pearson r, pair level", s["syn_red"]["pair_pearson"]),
        ("syn-red Spearman ρ, pair level", s["syn_red"]["pair_spearman"]),
        ("lag-1 autocorrelation vs synergy, Pearson r", s["autocorr_vs_synergy"]["pearson"]),
        ("lag-1 autocorrelation vs synergy, Spearman ρ", s["autocorr_vs_synergy"]["spearman"]),
        ("lag-1 autocorrelation vs redundancy, Spearman ρ", s["autocorr_vs_redundancy"]["spearman"]),
        ("drift vs synergy, Spearman ρ", s["drift_vs_synergy"]["spearman"]),
        ("mean lag-1 autocorrelation over heads", s["mean_autocorr"]),
        ("mean drift over heads (fraction of mean norm)", s["mean_drift"]),
    ]
    if "tdmi_vs_synergy" in s:
        rows += [("TDMI vs synergy (head), Spearman ρ", s["tdmi_vs_synergy"]["spearman"]),
                 ("TDMI vs redundancy (head), Spearman ρ", s["tdmi_vs_redundancy"]["spearman"]),
                 ("autocorrelation vs TDMI (head), Spearman ρ", s["autocorr_vs_tdmi"]["spearman"])]
    rows += [("degenerate pairs", s["n_degenerate_pairs"]), ("pairs", s["n_pairs"])]
    return pd.DataFrame(rows, columns=["quantity", "value"])
