"""The cluster examples' head layouts rehearsed on CPU: every notebook on a tiny random model with the exact layers,
query heads and KV heads of Pythia-1B, Gemma-3-4B and Qwen3-8B (heads 8 wide, lib.models' random:<arch>:<L>x<H>kv<K>),
with small prompt and token counts; per notebook the measured model forwards, wall seconds and peak memory beside
lib.cost's estimate for the same settings.

    .venv/bin/python benchmarks/cluster_shapes.py [--layouts qwen3-8b ...] [--only 08_topology ...] [--markdown]
        [--write PATH] [--json PATH] [--keep DIR] [--report-only] [--defaults]

Each layout: a params file written into a temporary folder (out_dir inside it), `python -m lib.run --params` on it
with --jobs 1 (one kernel at a time per layout; --jobs N here runs N layouts at once, default 2: one kernel per core,
so that a notebook's wall seconds are its work on one core, what lib.pipeline.cost estimates). --only reruns some
notebooks of the layouts already run in a --keep folder.
Measured, per notebook kernel:
  - forwards: calls of the model's last transformer block (every forward pass, full or partial as in notebook 06's
    incremental forwards, goes through it once; the random-init baseline and revisions included), counted by a
    forward hook a probe module installs in the kernel (this folder's `_probe/sitecustomize.py`, activated by
    $HEADINFO_PROBE; nothing in lib is changed);
  - peak memory: the kernel's peak resident set (getrusage ru_maxrss), written by the same probe at exit and
    every 2 s before (a kernel stopped before its exit handlers run keeps the figure of its last 2 s);
  - seconds: the runner's own record in manifest.json (kernel start to report written); the kernel's CPU seconds
    (getrusage, all its threads) beside them: on a loaded machine the wall seconds inflate, the CPU seconds less.
Estimated: lib.pipeline.cost.estimates on the same steps, every notebook's forwards on the CPU: forwards; seconds =
the fixed cost of a notebook + forwards at a CPU rate measured per layout (gpu_check.forward_rate, one thread) + the
notebook's CPU work (PhiID pair-segments, graph passes: lib.pipeline.cost.HOST_UNITS x seconds per unit); host GiB =
a kernel's base RSS + the notebook's large arrays + weights and K/V (lib.pipeline.cost.host_gib). The fixed seconds,
base RSS and seconds per unit are measured once per invocation on this machine (gpu_check.notebook_overhead and
host_rates, what --save-rate records), or with --defaults taken from lib.pipeline.cost.DEFAULT_CALIBRATION.

Timings are only comparable on an idle machine: the load average before and after each layout is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROBE_DIR = Path(__file__).resolve().parent / "_probe"
# cluster example -> (params file, random model with its head layout)
# (the largest first: with --jobs 2 it runs beside the two others in turn)
LAYOUTS = {
    "qwen3-8b": ("params/qwen3-8b.yaml", "random:qwen3:36x32kv8"),
    "pythia-1b": ("params/pythia-1b.yaml", "random:gpt_neox:16x8"),
    "gemma-3-4b": ("params/gemma3-4b.yaml", "random:gemma3_multimodal:34x8kv4"),
}
N_PROMPTS, N_TOKENS = 6, 8            # one prompt per category, 8 generated tokens


def sections(model: str) -> dict:
    """The run's params: every notebook with the smallest counts its checks accept (cf. params/tiny.yaml)."""
    return {
        "model": model, "dtype": "float32", "device": "cpu", "seed": 0,
        "01_extract_activations": dict(n_prompts=N_PROMPTS, n_tokens=N_TOKENS, batch_size=N_PROMPTS,
                                       chat_template=True, baseline_random_init=True, revisions=[], n_single_check=1),
        "02_phiid": dict(modes=["per_prompt", "concat", "pooled"], tau=1, redundancy="MMI", backend="numpy"),
        "03_phiid_diagnostics": dict(mode="per_prompt"),
        "04_ranking_variants": dict(variants=["rank_diff", "balance", "tdmi_normalized", "concat", "pooled",
                                              "detrended", "first_difference", "autocorr_residualized"],
                                    n_splits=2, n_surrogates=2),
        "05_ablation": dict(variants=["rank_diff", "balance"], n_random=2, n_matched=1, fractions=[0.25, 1.0],
                            step_size=None, batch_size=16, shard=""),
        "06_neuron_effects": dict(n_prompts=2, n_neurons=16, shard=""),
        "07_qkov_interference": dict(min_samples_for_fisher=1),
        "08_topology": dict(mode="per_prompt", n_louvain=2, n_null=2, n_boot=5),
        "11_local_synergy": dict(tags=["", "random_init"], tau=1, redundancy="MMI", mode="per_prompt", n_null=2,
                                 n_boot=10),
        "09_task_behaviour": dict(variants=["rank_diff"], n_random=1, perturbations=["zero"], calibrate=False,
                                  n_problems=4, difficulty=0, max_new_tokens=4, batch_size=16),
        "10_head_finetuning": dict(variant="rank_diff", fraction=0.5, methods=["sft"], n_random=1, seeds=[0],
                                   n_train=4, n_test=4, max_new_tokens=4, n_steps=1, eval_every=1),
    }


def load() -> str:
    """The 1, 5 and 15 minute load averages."""
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def run_layout(name: str, model: str, root: Path, only: list[str] | None = None) -> float:
    """Run every notebook (or `only` these) on `model` into root/name, one kernel at a time (probe records in
    root/name-probe) -> wall seconds."""
    params = sections(model)
    params["out_dir"] = str(root / name)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    probes = root / f"{name}-probe"
    probes.mkdir(exist_ok=True)
    env = {**os.environ, "HEADINFO_PROBE": str(probes), "PYTHONPATH": f"{PROBE_DIR}:{REPO}",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "lib.run", "--params", str(path), "--quiet", "--force", "--jobs", "1",
                           *(["--only", *only] if only else [])],
                          cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"{name}: lib.run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return wall


def probe_records(name: str, root: Path) -> dict:
    """notebook -> the probe's record {forwards, maxrss_kb} of its kernel (the newest, after reruns)."""
    records = {}
    for f in sorted((root / f"{name}-probe").glob("*.json"), key=lambda f: f.stat().st_mtime):
        rec = json.loads(f.read_text())
        if rec.get("notebook"):
            records[rec["notebook"]] = rec
    return records


def cpu_rate(model: str, rows: int = N_PROMPTS, seq_len: int = 64 + N_TOKENS) -> dict:
    """lib.cost's calibration on this machine: benchmarks/gpu_check.py's forward_rate of `model` on the CPU with
    one thread (as the kernels run), [rows, seq_len] tokens: {"flop_per_s", "n_params", ...}."""
    import importlib.util

    import torch
    spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).resolve().parent / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    from lib.model.loading import load_model
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        m, _, _ = load_model(model, device="cpu")
        return gpu_check.forward_rate(m, torch.device("cpu"), rows, seq_len)
    finally:
        torch.set_num_threads(threads)


def base_rss_kb() -> int:
    """Resident set of a kernel-like process that imported lib, torch and transformers but holds no model."""
    code = ("import resource, lib.model.loading, lib.experiments.extract, transformers, numpy, pandas;"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    return int(out.stdout.strip().splitlines()[-1])


def estimates(name: str, root: Path, rate: dict) -> dict:
    """notebook -> lib.cost's row (forwards, tokens, seconds, host_gib, pairs) for the layout's params file, with
    `rate` (the CPU rate and the host calibration) as the rate file and every notebook's forwards on this CPU."""
    from lib.pipeline import cost, stages
    from lib.pipeline.runner import check_run
    env = {cost.RATE_ENV: None, "HEADINFO_GPU_NOTEBOOKS": " ".join(stages.stages())}
    with tempfile.TemporaryDirectory(prefix="rate-") as tmp:
        env[cost.RATE_ENV] = str(Path(tmp) / "rate.json")
        Path(env[cost.RATE_ENV]).write_text(json.dumps(rate))
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            rows, _, _ = cost.estimates(check_run(root / f"{name}.yaml", None, []))
        finally:
            for k, v in old.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return {r["notebook"]: r for r in rows}


def host_calibration(use_defaults: bool) -> dict:
    """notebook_fixed_s, base_rss_gib, model_rss_gib and the seconds per unit of lib.pipeline.cost.HOST_UNITS
    measured here (gpu_check.notebook_overhead and host_rates), or lib.pipeline.cost.DEFAULT_CALIBRATION."""
    from lib.pipeline.cost import DEFAULT_CALIBRATION
    if use_defaults:
        return dict(DEFAULT_CALIBRATION)
    import importlib.util
    spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).resolve().parent / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    return {**gpu_check.notebook_overhead(), **gpu_check.host_rates()}


def seconds_of(out_dir: Path) -> dict:
    manifest = json.loads((out_dir / "manifest.json").read_text())
    return {k: v.get("seconds") for k, v in manifest.get("notebooks", {}).items()}


def ratio(est, meas) -> str:
    if not est or not meas:
        return "–"
    return f"{est / meas:.2f}"


def worst(rows: list[dict], est: str, meas: str) -> tuple[float, float]:
    """(smallest, largest) estimate / measured over the rows where both are positive."""
    r = [row[est] / row[meas] for row in rows if row[est] and row[meas]]
    return (min(r), max(r)) if r else (float("nan"), float("nan"))


def table(name: str, est: dict, meas: dict, secs: dict) -> list[dict]:
    """One row per notebook run: estimates (forwards, seconds, host GiB, pairs) beside the measured forwards,
    seconds and peak RSS."""
    rows = []
    for nb in sorted(set(est) & set(secs)):
        e, m = est[nb], meas.get(nb, {})
        rss_gib = m["maxrss_kb"] / 2 ** 20 if m else None
        rows.append(dict(layout=name, notebook=nb, est_forwards=e["forwards"] or 0, forwards=m.get("forwards"),
                         tokens=e["tokens"] or 0, est_seconds=e["seconds"], seconds=secs.get(nb),
                         est_gib=e["host_gib"], rss_gib=rss_gib, pairs=e["pairs"] or 0, cpu_s=m.get("cpu_s")))
    return rows


def fmt(v, digits=4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return f"{v:,}"


TITLE = "cluster layout x notebook: estimate vs measured (forwards, seconds, peak memory)"
COLUMNS = (("forwards", "est_forwards", "forwards"), ("seconds", "est_seconds", "seconds"),
           ("peak memory", "est_gib", "rss_gib"))


def summary(rows: list[dict]) -> str:
    """Per column: the range of estimate / measured and whether every ratio lies within 2x."""
    parts = []
    for label, est, meas in COLUMNS:
        lo, hi = worst(rows, est, meas)
        parts.append(f"{label} {lo:.2f}-{hi:.2f}" + (" (within 2x)" if 0.5 <= lo and hi <= 2 else " (NOT within 2x)"))
    return "estimate / measured: " + "; ".join(parts)


def markdown(rows: list[dict]) -> str:
    head = ("| layout | notebook | forwards est. | forwards meas. | ratio | seconds est. | seconds meas. "
            "| ratio | kernel CPU s | host GiB est. | peak RSS GiB | ratio | PhiID pairs est. |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        lines.append(f"| {r['layout']} | {r['notebook']} | {fmt(r['est_forwards'])} | {fmt(r['forwards'])} | "
                     f"{ratio(r['est_forwards'], r['forwards'])} | {fmt(r['est_seconds'], 3)} | {fmt(r['seconds'])} | "
                     f"{ratio(r['est_seconds'], r['seconds'])} | {fmt(r.get('cpu_s'), 3)} | {fmt(r['est_gib'], 3)} | "
                     f"{fmt(r['rss_gib'], 3)} | "
                     f"{ratio(r['est_gib'], r['rss_gib'])} | {fmt(r['pairs'])} |")
    return "\n".join(lines)


def report(name: str, root: Path, host: dict) -> tuple[list[dict], str]:
    """Table rows and the one-line summary of a layout already run in root/name; `host`: the calibration
    (calibrate)."""
    model = LAYOUTS[name][1]
    rate = {**cpu_rate(model), **host}
    rows = table(name, estimates(name, root, rate), probe_records(name, root), seconds_of(root / name))
    off = max((max(r["est_forwards"], r["forwards"]) / max(1, min(r["est_forwards"], r["forwards"]))
               for r in rows if r["forwards"] is not None), default=1.0)
    peak = max((r["rss_gib"] or 0) for r in rows)
    line = (f"[cluster_shapes] {name} ({model}): {len(rows)} notebooks, {sum(r['seconds'] or 0 for r in rows):.0f} s "
            f"of notebooks, forwards {sum(r['forwards'] or 0 for r in rows):,} measured / "
            f"{sum(r['est_forwards'] for r in rows):,} estimated (worst notebook {off:.2f}x), peak RSS {peak:.2f} GiB; "
            f"CPU rate {rate['flop_per_s']:.3g} FLOP/s, one-token forward {1e3 * rate['forward_latency_s']:.1f} ms (1 thread)")
    return rows, line


def one_layout(name: str, root: Path, only: list[str] | None = None) -> str:
    """Run one layout -> a line with its wall time and the load before and after."""
    before = load()
    wall = run_layout(name, LAYOUTS[name][1], root, only)
    line = f"[cluster_shapes] {name}: lib.run {wall:.0f} s wall; load before {before}, after {load()}"
    print(line, flush=True)
    return line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--only", nargs="+", default=None, metavar="NOTEBOOK",
                        help="rerun only these notebooks of layouts already run in the --keep folder")
    parser.add_argument("--markdown", action="store_true", help="(the markdown table is always printed now)")
    parser.add_argument("--write", type=Path, help="write the markdown table (with its title, summary and loads) here")
    parser.add_argument("--json", type=Path, help="write every row as JSON")
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a temporary one)")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the table of a --keep folder")
    parser.add_argument("--jobs", type=int, default=2, help="layouts run at the same time, each one kernel at a time "
                                                            "(default 2: one kernel per core)")
    parser.add_argument("--defaults", action="store_true", help="estimate with lib.pipeline.cost's default fixed "
                                                                "seconds and base RSS instead of measuring them here")
    args = parser.parse_args(argv)
    if (args.only or args.report_only) and not args.keep:
        parser.error("--only and --report-only need --keep DIR (the folder of an earlier run)")
    with tempfile.TemporaryDirectory(prefix="cluster-shapes-") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        host = calibrate(root, args.defaults, reuse=args.report_only)
        loads = [f"start {load()}"]
        if not args.report_only:
            t0 = time.perf_counter()
            with ThreadPoolExecutor(max_workers=args.jobs) as pool:
                loads += [line.removeprefix("[cluster_shapes] ")
                          for line in pool.map(lambda name: one_layout(name, root, args.only), args.layouts)]
            loads.append(f"all {len(args.layouts)} layouts in {time.perf_counter() - t0:.0f} s wall ({args.jobs} at a "
                         f"time); load at the end {load()}")
            print(f"[cluster_shapes] {loads[-1]}", flush=True)
        reports = [report(name, root, host) for name in args.layouts]
    rows = [r for layout_rows, _ in reports for r in layout_rows]
    text = "\n".join([f"### {TITLE}", "", summary(rows), "", *[line for _, line in reports], "",
                      *[f"load: {x}" for x in loads], "", markdown(rows)])
    print(text)
    if args.write:
        args.write.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


def calibrate(root: Path, use_defaults: bool, reuse: bool) -> dict:
    """The host calibration (host_calibration), written to root/calibration.json; with reuse, read from there
    when present (a --report-only table keeps the calibration of its run)."""
    from lib.pipeline.cost import calibration
    path = root / "calibration.json"
    if reuse and path.exists():
        host = json.loads(path.read_text())
    else:
        host = {**host_calibration(use_defaults), "device": "this machine" if not use_defaults else "defaults",
                "date": time.strftime("%Y-%m-%d"), "load": load()}
        path.write_text(json.dumps(host, indent=1))
    fixed, base, _ = calibration(host)
    units = ", ".join(f"{k} {v:.3g}" for k, v in host.items() if k.endswith("_s") and k != "notebook_fixed_s")
    print(f"[cluster_shapes] calibration ({host['device']}, load {host.get('load', '?')}): notebook fixed {fixed:.1f} s, "
          f"kernel base RSS {base:.3f} GiB, with a model {host.get('model_rss_gib', base):.3f} GiB; {units}; "
          f"bare-import RSS {base_rss_kb() / 2 ** 20:.3f} GiB", flush=True)
    return host


if __name__ == "__main__":
    sys.exit(main())
