"""Per-neuron and per-layer summaries of the effects table, the layer-trend test and the top neurons."""
from __future__ import annotations

import numpy as np
import pandas as pd

from lib.experiments.neurons.effects import CLASSES, classify

__all__ = ["summarize_neurons", "summaries_frame", "layer_summary", "layer_trend", "top_neurons"]


# ----------------------------------------------------------------------------- summaries

def summarize_neurons(effects: pd.DataFrame, thresholds=(0.3, 0.7)) -> list[dict]:
    """One entry per neuron (see module docstring); classification from the mean direct_ratio over prompts,
    consistency = fraction of prompts whose own class agrees; reading 'reinforcing' when direct and indirect have
    the same sign on at least half of the prompts, else 'opposing'."""
    out = []
    for (layer, neuron), g in effects.groupby(["layer", "neuron"], sort=True):
        ratio = g["direct_ratio"].to_numpy(float)
        mean_ratio = float(ratio.mean())
        cls = str(classify(mean_ratio, thresholds))
        per_class = classify(ratio, thresholds)
        aligned = g["aligned"].to_numpy(bool)
        tokens: dict[int, list[float]] = {}
        for ids, effs in zip(g["top_total_ids"], g["top_total_effects"]):
            for i, e in zip(str(ids).split(), str(effs).split()):
                tokens.setdefault(int(i), []).append(float(e))
        top = sorted(tokens.items(), key=lambda kv: (-len(kv[1]), -abs(np.mean(kv[1]))))[:10]
        out.append({
            "id": f"L{int(layer)}/N{int(neuron)}", "layer": int(layer), "neuron": int(neuron), "n_prompts": len(g),
            "effect_summary": {
                "direct_ratio_mean": mean_ratio, "direct_ratio_std": float(ratio.std()),
                "direct_ratio_median": float(np.median(ratio)), "classification": cls,
                "consistency": float((per_class == cls).mean()),
                "mean_direct": float(g["direct"].mean()), "mean_indirect": float(g["indirect"].mean()),
                "mean_total": float(g["total"].mean()), "mean_abs_direct": float(g["direct"].abs().mean()),
                "mean_abs_indirect": float(g["indirect"].abs().mean()),
                "mean_abs_total": float(g["total"].abs().mean()), "mean_diff_total": float(g["diff_total"].mean()),
                "mean_dprob_total": float(g["dprob_total"].mean()), "mean_activation": float(g["activation"].mean()),
                "top_tokens": [{"id": i, "n_prompts": len(v), "mean_effect": float(np.mean(v))} for i, v in top]},
            "sign_alignment": {"aligned_fraction": float(aligned.mean()), "n_aligned": int(aligned.sum()),
                               "reading": "reinforcing" if aligned.mean() >= 0.5 else "opposing"},
            "per_prompt_breakdown": [
                {"prompt": int(r.prompt), "prompt_id": int(r.prompt_id), "target_id": int(r.target_id),
                 "direct": float(r.direct), "indirect": float(r.indirect), "total": float(r.total),
                 "diff_total": float(r.diff_total), "dprob_total": float(r.dprob_total),
                 "direct_ratio": float(r.direct_ratio), "class": str(c), "aligned": bool(r.aligned)}
                for r, c in zip(g.itertuples(), per_class)]})
    return out


def summaries_frame(summaries: list[dict]) -> pd.DataFrame:
    """One row per neuron with the scalar summary fields (for tables and figures)."""
    rows = []
    for s in summaries:
        e = {k: v for k, v in s["effect_summary"].items() if k != "top_tokens"}
        rows.append({"id": s["id"], "layer": s["layer"], "neuron": s["neuron"], "n_prompts": s["n_prompts"], **e,
                     "aligned_fraction": s["sign_alignment"]["aligned_fraction"],
                     "reading": s["sign_alignment"]["reading"]})
    return pd.DataFrame(rows)


def layer_summary(summaries: list[dict], n_layers: int) -> pd.DataFrame:
    """Per layer: class counts and fractions, mean / median direct_ratio, mean |effects|, aligned fraction."""
    frame = summaries_frame(summaries)
    rows = []
    for l in range(n_layers):
        g = frame[frame["layer"] == l] if len(frame) else frame
        row = {"layer": l, "n_neurons": len(g)}
        for c in CLASSES:
            k = int((g["classification"] == c).sum()) if len(g) else 0
            row[f"n_{c}"] = k
            row[f"frac_{c}"] = k / len(g) if len(g) else np.nan
        for col in ("direct_ratio_mean", "mean_abs_direct", "mean_abs_indirect", "mean_abs_total", "aligned_fraction"):
            row[col if col != "direct_ratio_mean" else "mean_direct_ratio"] = float(g[col].mean()) if len(g) else np.nan
        row["median_direct_ratio"] = float(g["direct_ratio_mean"].median()) if len(g) else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def layer_trend(summaries: list[dict], n_layers: int) -> dict:
    """Does 'early layers routing-dominant, late layers logit-dominant' hold? Two readings:
    trend_holds: the neurons' mean direct_ratio rises with the layer (Spearman rho > 0, p < 0.05) and the first third
    of the layers has a lower mean ratio than the last third; classes_hold (the strong claim): the most common class
    in the first third of the layers is routing-dominant AND in the last third logit-dominant."""
    from scipy.stats import spearmanr
    frame = summaries_frame(summaries)
    third = max(1, n_layers // 3)
    early = frame[frame["layer"] < third]
    late = frame[frame["layer"] >= n_layers - third]
    rho, p = (spearmanr(frame["layer"], frame["direct_ratio_mean"]) if frame["layer"].nunique() > 1
              else (np.nan, np.nan))
    major = lambda g: g["classification"].value_counts().idxmax() if len(g) else "none"
    e_mean = float(early["direct_ratio_mean"].mean()) if len(early) else np.nan
    l_mean = float(late["direct_ratio_mean"].mean()) if len(late) else np.nan
    return {"spearman_rho_layer_vs_direct_ratio": float(rho), "p_value": float(p), "n_neurons": len(frame),
            f"mean_direct_ratio_layers_0-{third - 1}": e_mean,
            f"mean_direct_ratio_layers_{n_layers - third}-{n_layers - 1}": l_mean,
            f"most_common_class_layers_0-{third - 1}": major(early),
            f"most_common_class_layers_{n_layers - third}-{n_layers - 1}": major(late),
            "trend_holds": bool(np.isfinite(rho) and rho > 0 and p < 0.05 and e_mean < l_mean),
            "classes_hold": bool(major(early) == CLASSES[0] and major(late) == CLASSES[2])}


def top_neurons(summaries: list[dict], tokenizer, k: int = 10) -> pd.DataFrame:
    """The k neurons with the largest mean |total| target-logit effect, with their most affected tokens decoded."""
    frame = summaries_frame(summaries).sort_values("mean_abs_total", ascending=False).head(k)
    by_id = {s["id"]: s for s in summaries}
    frame["top_tokens"] = [", ".join(f"{tokenizer.decode([t['id']])!r} ({t['mean_effect']:+.3g})"
                                     for t in by_id[i]["effect_summary"]["top_tokens"][:5]) for i in frame["id"]]
    cols = ["id", "layer", "mean_total", "mean_direct", "mean_indirect", "mean_abs_total", "direct_ratio_mean",
            "classification", "consistency", "reading", "top_tokens"]
    return frame[cols].reset_index(drop=True)

