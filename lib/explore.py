"""Explore a finished run (notebooks/00_explore.ipynb): one head at a time, one ranking variant at a time.

`load_run(out_dir)` reads whatever the run folder has (activations from 01, PhiID per mode from 02, rankings
from 04; lib.artifacts names the files) and records what is missing instead of failing, so the explorer opens on
a partial run.
The tables below are plain pandas; the figures are in lib/plots/explore.py; `explorer(...)` wires both to
ipywidgets (JupyterLab). Head index = layer * n_heads + head, as everywhere in the project.
Synergy is PhiID atom `sts`, redundancy atom `rtr` (nats); a head's "row" is the atom with the head as source
and every other head as target.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from lib import artifacts

SYNERGY_ATOM, REDUNDANCY_ATOM = "sts", "rtr"
PHIID_MODES = ("per_prompt", "concat", "pooled")
NOT_VARIANTS = {"head_idx", "layer", "head", "syn", "red"}     # rankings.csv columns that are not variant scores


@dataclass
class RunData:
    out_dir: Path
    n_layers: int = 0
    n_heads: int = 0
    model: str = ""
    activations: np.ndarray | None = None           # [prompts, heads, steps]
    prompt_text: list[str] = field(default_factory=list)
    phiid: dict = field(default_factory=dict)        # mode -> {"syn": [H, H], "red": [H, H], "degenerate": [H, H]}
    rankings: pd.DataFrame | None = None
    missing: list[str] = field(default_factory=list)

    @property
    def n_total(self) -> int:
        return self.n_layers * self.n_heads

    @property
    def modes(self) -> list[str]:
        return list(self.phiid)

    @property
    def variants(self) -> list[str]:
        if self.rankings is None:
            return []
        return [c for c in self.rankings.columns
                if c not in NOT_VARIANTS and pd.api.types.is_numeric_dtype(self.rankings[c])]

    # the tables of this module as methods, so that lib.plots.explore draws a RunData without importing lib.explore
    def head_ranks(self, idx: int) -> pd.DataFrame:
        return head_ranks(self, idx)

    def phiid_row(self, idx: int, mode: str) -> pd.DataFrame:
        return phiid_row(self, idx, mode)

    def variant_grid(self, variant: str) -> np.ndarray:
        return variant_grid(self, variant)

    def variant_profile(self, variant: str) -> pd.DataFrame:
        return variant_profile(self, variant)


def load_run(out_dir: str | Path) -> RunData:
    """Everything the explorer shows, from a run folder; missing pieces are listed in `.missing`."""
    out_dir = Path(out_dir)
    run = RunData(out_dir=out_dir)
    _load_activations(run)
    for mode in PHIID_MODES:
        if artifacts.path("phiid", out_dir, mode=mode).exists():
            _load_phiid(run, mode)
    if not run.phiid:
        run.missing.append(_absent("phiid"))
    if artifacts.path("rankings", out_dir).exists():
        run.rankings = artifacts.load("rankings", out_dir).sort_values("head_idx").reset_index(drop=True)
        if not run.n_layers:
            run.n_layers, run.n_heads = int(run.rankings["layer"].max()) + 1, int(run.rankings["head"].max()) + 1
    else:
        run.missing.append(_absent("rankings", out_dir))
    for what, n in [("phiid", next((len(v["syn"]) for v in run.phiid.values()), None)),
                    ("rankings", None if run.rankings is None else len(run.rankings)),
                    ("activations", None if run.activations is None else run.activations.shape[1])]:
        if n is not None and n != run.n_total:
            raise ValueError(f"{what} in {str(out_dir)!r} has {n} heads but the run has {run.n_layers} layers x "
                             f"{run.n_heads} heads: the files come from different runs; rerun the pipeline")
    return run


def _absent(name: str, out_dir=None) -> str:
    a = artifacts.artifact(name)
    return f"{artifacts.shown_name(a, with_tag=False)} (notebook {a.producer})" + (f" is not in {str(out_dir)!r}" if out_dir else "")


def _load_activations(run: RunData) -> None:
    if not artifacts.path("activations", run.out_dir).exists():
        run.missing.append(_absent("activations", run.out_dir))
        return
    a = artifacts.load("activations", run.out_dir, require=["activations", "head_layer", "head_index"])
    run.activations = a["activations"]
    run.n_layers = int(a["n_layers"]) if "n_layers" in a else int(a["head_layer"].max()) + 1
    run.n_heads = int(a["n_heads"]) if "n_heads" in a else int(a["head_index"].max()) + 1
    run.model = str(a["model"]) if "model" in a else ""
    run.prompt_text = [str(t) for t in a["prompt_text"]] if "prompt_text" in a else []


def _load_phiid(run: RunData, mode: str) -> None:
    p = artifacts.load("phiid", run.out_dir, mode=mode, require=[SYNERGY_ATOM, REDUNDANCY_ATOM])
    deg = p["degenerate"].astype(bool) if "degenerate" in p else np.zeros_like(p[SYNERGY_ATOM], bool)
    run.phiid[mode] = {"syn": p[SYNERGY_ATOM], "red": p[REDUNDANCY_ATOM], "degenerate": deg}
    if not run.n_layers and "head_layer" in p:
        run.n_layers, run.n_heads = int(p["head_layer"].max()) + 1, int(p["head_index"].max()) + 1


def summary(run: RunData) -> pd.DataFrame:
    """What the run folder holds (one row per artifact)."""
    acts = run.activations
    rows = [{"artifact": artifacts.path("activations", "").name, "present": acts is not None,
             "details": (f"{run.model}: {acts.shape[0]} prompts x {acts.shape[1]} heads x "
                         f"{acts.shape[2]} steps") if acts is not None else ""}]
    for mode in PHIID_MODES:
        rows.append({"artifact": artifacts.path("phiid", "", mode=mode).name, "present": mode in run.phiid,
                     "details": f"{run.n_total} x {run.n_total} sts and rtr (nats)" if mode in run.phiid else ""})
    rows.append({"artifact": artifacts.path("rankings", "").name, "present": run.rankings is not None,
                 "details": f"variants: {', '.join(run.variants)}" if run.rankings is not None else ""})
    return pd.DataFrame(rows)


def head_id(run: RunData, layer: int, head: int) -> int:
    if not (0 <= layer < run.n_layers and 0 <= head < run.n_heads):
        raise ValueError(f"layer {layer}, head {head} is outside the model ({run.n_layers} layers x "
                         f"{run.n_heads} heads)")
    return int(layer) * run.n_heads + int(head)


def label(run: RunData, idx: int) -> str:
    return f"L{idx // run.n_heads}H{idx % run.n_heads}"


def default_mode(run: RunData, mode: str = "per_prompt") -> str | None:
    return mode if mode in run.phiid else (run.modes[0] if run.modes else None)


def default_variant(run: RunData, variant: str = "") -> str | None:
    return variant if variant in run.variants else (run.variants[0] if run.variants else None)


def head_ranks(run: RunData, idx: int) -> pd.DataFrame:
    """The head's score and rank under every variant: rank 1 = most synergistic (highest score; ties share the
    best rank), percentile = share of heads ranked below it."""
    if run.rankings is None:
        return pd.DataFrame(columns=["variant", "score", "rank", "of", "percentile"])
    rows = []
    for v in run.variants:
        scores = run.rankings[v].to_numpy(float)
        s = scores[idx]
        finite = np.isfinite(scores)
        rank = int((scores[finite] > s).sum()) + 1 if np.isfinite(s) else None
        rows.append({"variant": v, "score": s, "rank": rank, "of": int(finite.sum()),
                     "percentile": 100.0 * (scores[finite] < s).sum() / max(finite.sum() - 1, 1) if rank else np.nan})
    return pd.DataFrame(rows)


def phiid_row(run: RunData, idx: int, mode: str) -> pd.DataFrame:
    """Synergy and redundancy of the head (as source) with every other head (target), nats; undefined pairs NaN."""
    p = run.phiid[mode]
    syn, red = p["syn"][idx].astype(float), p["red"][idx].astype(float)
    bad = p["degenerate"][idx]
    syn[bad], red[bad] = np.nan, np.nan
    targets = np.arange(run.n_total)
    return pd.DataFrame({"target": [label(run, t) for t in targets], "layer": targets // run.n_heads,
                         "head": targets % run.n_heads, "synergy": syn, "redundancy": red})


def variant_grid(run: RunData, variant: str) -> np.ndarray:
    """[layers, heads] grid of a variant's score."""
    grid = np.full((run.n_layers, run.n_heads), np.nan)
    r = run.rankings
    grid[r["layer"].to_numpy(int), r["head"].to_numpy(int)] = r[variant].to_numpy(float)
    return grid


def variant_profile(run: RunData, variant: str) -> pd.DataFrame:
    """Per-layer mean, sd and count of a variant's head scores."""
    g = run.rankings.groupby("layer")[variant]
    return pd.DataFrame({"layer": g.mean().index, "mean": g.mean().to_numpy(), "sd": g.std(ddof=0).to_numpy(),
                         "heads": g.count().to_numpy()})


def top_heads(run: RunData, variant: str, k: int = 10) -> pd.DataFrame:
    r = run.rankings[["head_idx", "layer", "head", variant]].sort_values(variant, ascending=False).head(k)
    return r.reset_index(drop=True)


# ----------------------------------------------------------------------------- widgets

def explorer(run: RunData, layer: int = 0, head: int = 0, variant: str = "", mode: str = "per_prompt"):
    """An ipywidgets panel: layer / head / PhiID mode -> the head's time series, synergy and redundancy rows and
    ranks; variant -> its layer profile, head heatmap and top heads. Returns the panel (display it)."""
    import ipywidgets as W
    import matplotlib.pyplot as plt
    from IPython.display import display

    from lib.plots import explore as plots

    if not run.n_layers:
        return W.HTML(f"<b>Nothing to explore in {run.out_dir}</b>: " + "; ".join(run.missing))
    layer_w = W.Dropdown(options=list(range(run.n_layers)), value=min(layer, run.n_layers - 1), description="layer")
    head_w = W.Dropdown(options=list(range(run.n_heads)), value=min(head, run.n_heads - 1), description="head")
    mode_w = W.Dropdown(options=run.modes or ["(no PhiID)"], value=default_mode(run, mode) or "(no PhiID)",
                        description="PhiID mode")
    variant_w = W.Dropdown(options=run.variants or ["(no rankings)"],
                           value=default_variant(run, variant) or "(no rankings)", description="variant")
    head_out, variant_out = W.Output(), W.Output()

    def show(fig):
        display(fig)
        plt.close(fig)

    def draw_head(*_):
        idx = head_id(run, layer_w.value, head_w.value)
        with head_out:
            head_out.clear_output(wait=True)
            show(plots.head_panel(run, idx, mode_w.value if run.modes else None))
            if run.rankings is not None:
                display(head_ranks(run, idx).round(4))

    def draw_variant(*_):
        with variant_out:
            variant_out.clear_output(wait=True)
            if run.rankings is None:
                print(f"{_absent('rankings')} is missing: run it")
                return
            show(plots.variant_panel(run, variant_w.value))
            display(top_heads(run, variant_w.value))

    for w in (layer_w, head_w, mode_w):
        w.observe(draw_head, names="value")
    variant_w.observe(draw_variant, names="value")
    draw_head()
    draw_variant()
    panel = W.VBox([W.HTML("<b>Head</b>"), W.HBox([layer_w, head_w, mode_w]), head_out,
                    W.HTML("<b>Ranking variant</b>"), variant_w, variant_out])
    panel.controls = {"layer": layer_w, "head": head_w, "mode": mode_w, "variant": variant_w}
    panel.outputs = {"head": head_out, "variant": variant_out}
    return panel
