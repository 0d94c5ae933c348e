"""Benchmark of notebooks 03 (PhiID diagnostics) and 04 (ranking variants) on one run folder.

Stages are timed in-process (wall and CPU seconds, CPU including finished child processes) on the run's
activations.npz and phiid_<mode>.npz (computed first with lib.estimators.phiid when missing; that is notebook 02's cost and
is not counted). --notebooks also runs both notebooks end to end with papermill (kernel start, figures, files).

Example (SmolLM2, 270 heads, 60 prompts; activations from notebook 01 or lib.experiments.extract):
    .venv/bin/python benchmarks/diagnostics_bench.py --out-dir /tmp/smol_run --n-splits 20 --n-surrogates 100 \\
        --n-jobs 2 --notebooks --json /tmp/diagnostics_bench.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def cpu_seconds() -> float:
    self_, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return self_.ru_utime + self_.ru_stime + children.ru_utime + children.ru_stime


class Timer:
    def __init__(self):
        self.rows = []

    def __call__(self, name, fn, *args, **kwargs):
        w, c = time.perf_counter(), cpu_seconds()
        out = fn(*args, **kwargs)
        self.rows.append({"stage": name, "wall_s": time.perf_counter() - w, "cpu_s": cpu_seconds() - c})
        return out


def link_inputs(out_dir: Path, scratch: Path):
    """Symlink the run's inputs (activations*, phiid_*) into a scratch folder: the benchmark writes its own
    outputs there and never reuses a surrogate checkpoint."""
    for f in list(out_dir.glob("activations*.npz")) + list(out_dir.glob("phiid_*.npz")):
        os.symlink(f.resolve(), scratch / f.name)


def ensure_phiid(out_dir: Path, modes=("per_prompt", "concat", "pooled")):
    from lib.estimators import phiid
    missing = [m for m in modes if not phiid.phiid_path(out_dir, m).exists()]
    if missing:
        print(f"computing {missing} with lib.estimators.phiid (notebook 02's work; not timed)")
        phiid.run_phiid_for_run(out_dir, modes=list(modes), tags=[""])


def run_stages(out_dir: Path, n_splits: int, n_surrogates: int, n_jobs: int, n_boot: int, seed: int) -> list[dict]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lib.experiments import diagnostics as dg
    from lib.experiments import ranking as rk
    from lib.plots import diagnostics as pd_plots
    from lib.plots import ranking as rk_plots

    t = Timer()
    scratch = Path(tempfile.mkdtemp(prefix="diag-bench-"))
    link_inputs(out_dir, scratch)
    d, _ = t("03: load + diagnose + diagnostics.json", dg.run_diagnostics, scratch)
    t("03: figures", lambda: [plt.close(f) for f in (
        pd_plots.syn_red_scatter(d.heads, d.summary["syn_red"], d.summary["n_layers"]),
        pd_plots.pair_hexbin(d.pairs, d.summary["syn_red"]),
        pd_plots.autocorr_vs_atoms(d.heads, d.summary, d.summary["n_layers"]),
        pd_plots.layer_profiles(d.profiles),
        pd_plots.pair_matrix(d.sts, d.heads["layer"], "sts"))])
    inputs = t("04: load + verify files", rk.load_inputs, scratch, rk.DEFAULT_VARIANTS)
    scores = t("04: scores (8 variants)", inputs.scores)
    t("04: per-prompt arrays (raw, detrended, differenced)", lambda: [inputs.per_prompt(h) for h in (None, "detrend", "diff")])
    rel, _ = t(f"04: split halves x {n_splits}", rk.split_half_reliability, inputs, n_splits, seed)
    null = t(f"04: surrogates x {n_surrogates} (n_jobs={n_jobs})", rk.surrogate_scores, inputs, n_surrogates, seed,
             None, 10, n_jobs)
    table = t("04: null tables", rk.null_tables, scores, null, inputs.head_layer, inputs.n_layers)
    verdicts = t(f"04: inverted-U tests (bootstrap {n_boot})", rk.inverted_u_table, scores, inputs.head_layer,
                 inputs.n_layers, n_boot, seed)
    t("04: inverted-U beyond null", rk.inverted_u_table, scores, inputs.head_layer, inputs.n_layers, n_boot, seed, null)
    t("04: baselines", rk.baseline_profiles, scratch, rk.DEFAULT_VARIANTS, 1, "MMI", n_boot, seed)
    t("04: figures", lambda: [plt.close(f) for f in (
        rk_plots.variant_heatmaps(scores, inputs.head_layer, inputs.head_index, inputs.n_layers, inputs.n_heads),
        rk_plots.variant_profiles(table, verdicts))])
    t("04: save rankings.csv", rk.save_rankings, scratch, inputs, scores, rel, verdicts, table)
    shutil.rmtree(scratch, ignore_errors=True)
    return t.rows


def run_notebooks(out_dir: Path, n_splits: int, n_surrogates: int, n_jobs: int, n_boot: int) -> list[dict]:
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="diag-bench-nb-"))
    link_inputs(out_dir, scratch)
    papermill = str(Path(sys.executable).parent / "papermill")
    for nb, params in (("03_phiid_diagnostics", []),
                       ("04_ranking_variants", ["-p", "n_splits", str(n_splits), "-p", "n_surrogates", str(n_surrogates),
                                                "-p", "n_jobs", str(n_jobs), "-p", "n_bootstrap", str(n_boot)])):
        w, c = time.perf_counter(), cpu_seconds()
        subprocess.run([papermill, f"notebooks/{nb}.ipynb", str(scratch / f"{nb}.ipynb"), "-p", "out_dir", str(scratch),
                        *params, "--cwd", str(REPO)], check=True, cwd=REPO, capture_output=True)
        rows.append({"stage": f"papermill {nb}", "wall_s": time.perf_counter() - w, "cpu_s": cpu_seconds() - c})
    shutil.rmtree(scratch, ignore_errors=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", required=True, help="run folder with activations.npz (+ phiid files, computed if missing)")
    ap.add_argument("--n-splits", type=int, default=20)
    ap.add_argument("--n-surrogates", type=int, default=100)
    ap.add_argument("--n-jobs", type=int, default=2)
    ap.add_argument("--n-bootstrap", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--notebooks", action="store_true", help="also time both notebooks end to end with papermill")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out_dir = Path(args.out_dir)
    ensure_phiid(out_dir)
    import numpy as np
    X = np.load(out_dir / "activations.npz")["activations"]
    load_before = os.getloadavg()
    rows = run_stages(out_dir, args.n_splits, args.n_surrogates, args.n_jobs, args.n_bootstrap, args.seed)
    total = {"stage": "TOTAL in-process (03 + 04)", "wall_s": sum(r["wall_s"] for r in rows),
             "cpu_s": sum(r["cpu_s"] for r in rows)}
    rows.append(total)
    if args.notebooks:
        nb_rows = run_notebooks(out_dir, args.n_splits, args.n_surrogates, args.n_jobs, args.n_bootstrap)
        rows += nb_rows + [{"stage": "TOTAL papermill (03 + 04)", "wall_s": sum(r["wall_s"] for r in nb_rows),
                            "cpu_s": sum(r["cpu_s"] for r in nb_rows)}]
    load_after = os.getloadavg()
    print(f"\nrun {out_dir}: activations {X.shape} [prompts, heads, steps]; {os.cpu_count()} cores; "
          f"load average (1 min) before {load_before[0]:.1f}, after {load_after[0]:.1f}")
    width = max(len(r["stage"]) for r in rows)
    print(f"{'stage':<{width}}  {'wall s':>8}  {'cpu s':>8}")
    for r in rows:
        print(f"{r['stage']:<{width}}  {r['wall_s']:8.2f}  {r['cpu_s']:8.2f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"shape": list(X.shape), "cores": os.cpu_count(),
                                               "loadavg_before": load_before, "loadavg_after": load_after,
                                               "params": vars(args), "stages": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
