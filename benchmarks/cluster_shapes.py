"""The cluster examples' head layouts rehearsed on CPU: every notebook on a tiny random model with the exact layers,
query heads and KV heads of Pythia-1B, Gemma-3-4B and Qwen3-8B (heads 8 wide, lib.models' random:<arch>:<L>x<H>kv<K>),
with small prompt and token counts; per notebook the measured model forwards, wall seconds and peak memory beside
lib.cost's estimate for the same settings.

    .venv/bin/python benchmarks/cluster_shapes.py [--layouts qwen3-8b ...] [--markdown] [--json PATH] [--keep DIR]

Each layout: a params file written into a temporary folder (out_dir inside it), `python -m lib.run --params` on it.
Measured, per notebook kernel:
  - forwards: calls of the model's last transformer block (every forward pass, full or partial as in notebook 06's
    incremental forwards, goes through it once; the random-init baseline and revisions included), counted by a
    forward hook a probe module installs in the kernel (this folder's `_probe/sitecustomize.py`, activated by
    $HEADINFO_PROBE; nothing in lib is changed);
  - peak memory: the kernel's peak resident set (getrusage ru_maxrss), written by the same probe at exit and
    every 2 s before (a kernel stopped before its exit handlers run keeps the figure of its last 2 s);
  - seconds: the runner's own record in manifest.json (kernel start to report written).
Estimated: lib.pipeline.cost.estimates on the same steps: forwards; seconds = the fixed cost of a notebook +
forwards at a CPU rate measured per layout (gpu_check.forward_rate, one thread; CPU notebooks: the fixed cost only);
host GiB = a kernel's base RSS + the notebook's large arrays + weights and K/V (lib.pipeline.cost.host_gib). The
fixed seconds and base RSS are measured once per invocation on this machine (gpu_check.notebook_overhead, what
--save-rate records), or with --defaults taken from lib.pipeline.cost.DEFAULT_CALIBRATION. PhiID pairs are
estimated for the CPU notebooks and not measured.

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


def run_layout(name: str, model: str, root: Path) -> float:
    """Run every notebook on `model` into root/name (probe records in root/name-probe) -> wall seconds."""
    params = sections(model)
    params["out_dir"] = str(root / name)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    probes = root / f"{name}-probe"
    probes.mkdir()
    env = {**os.environ, "HEADINFO_PROBE": str(probes), "PYTHONPATH": f"{PROBE_DIR}:{REPO}",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "lib.run", "--params", str(path), "--quiet", "--force"],
                          cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"{name}: lib.run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return wall


def probe_records(name: str, root: Path) -> dict:
    """notebook -> the probe's record {forwards, maxrss_kb} of its kernel."""
    records = {}
    for f in (root / f"{name}-probe").glob("*.json"):
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
    """notebook -> lib.cost's row (forwards, tokens, host_gib, pairs) for the layout's params file, with `rate`
    (its host calibration) as the rate file."""
    from lib.pipeline import cost
    from lib.pipeline.runner import check_run
    with tempfile.TemporaryDirectory(prefix="rate-") as tmp:
        path = Path(tmp) / "rate.json"
        path.write_text(json.dumps({**rate, "flop_per_s": rate["flop_per_s"]}))
        old = os.environ.get(cost.RATE_ENV)
        os.environ[cost.RATE_ENV] = str(path)
        try:
            rows, _, _ = cost.estimates(check_run(root / f"{name}.yaml", None, []))
        finally:
            os.environ.pop(cost.RATE_ENV) if old is None else os.environ.__setitem__(cost.RATE_ENV, old)
    return {r["notebook"]: r for r in rows}


def host_calibration(use_defaults: bool) -> dict:
    """notebook_fixed_s and base_rss_gib measured here (gpu_check.notebook_overhead), or {} (the defaults)."""
    if use_defaults:
        return {}
    import importlib.util
    spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).resolve().parent / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    return gpu_check.notebook_overhead()


def seconds_of(out_dir: Path) -> dict:
    manifest = json.loads((out_dir / "manifest.json").read_text())
    return {k: v.get("seconds") for k, v in manifest.get("notebooks", {}).items()}


def ratio(est, meas) -> str:
    if not est or not meas:
        return "–"
    return f"{est / meas:.2f}"


def table(name: str, est: dict, meas: dict, secs: dict, rate: dict) -> list[dict]:
    """One row per notebook: estimates (forwards, seconds = fixed + forwards at the CPU rate, host GiB, pairs)
    beside the measured forwards, seconds and peak RSS. `rate`: the CPU rate with the host calibration."""
    from lib.pipeline.cost import calibration, gpu_hours
    fixed, _, _ = calibration(rate)
    rows = []
    for nb in sorted(est):
        e, m = est[nb], meas.get(nb, {})
        rss_gib = m["maxrss_kb"] / 2 ** 20 if m else None
        forward_s = gpu_hours(e["tokens"], rate["n_params"], rate["flop_per_s"], e["forwards"] or 0,
                              rate["forward_latency_s"]) * 3600 if e["tokens"] else 0.0
        rows.append(dict(layout=name, notebook=nb, est_forwards=e["forwards"] or 0, forwards=m.get("forwards"),
                         tokens=e["tokens"] or 0, est_seconds=fixed + forward_s, seconds=secs.get(nb),
                         est_gib=e["host_gib"], rss_gib=rss_gib, pairs=e["pairs"] or 0))
    return rows


def fmt(v, digits=4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return f"{v:,}"


def markdown(rows: list[dict]) -> str:
    head = ("| layout | notebook | forwards est. | forwards meas. | ratio | seconds est. (fixed + CPU rate) | seconds meas. "
            "| ratio | host GiB est. | peak RSS GiB | ratio | PhiID pairs est. |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['layout']} | {r['notebook']} | {fmt(r['est_forwards'])} | {fmt(r['forwards'])} | "
                     f"{ratio(r['est_forwards'], r['forwards'])} | {fmt(r['est_seconds'], 3)} | {fmt(r['seconds'])} | "
                     f"{ratio(r['est_seconds'], r['seconds'])} | {fmt(r['est_gib'], 3)} | {fmt(r['rss_gib'], 3)} | "
                     f"{ratio(r['est_gib'], r['rss_gib'])} | {fmt(r['pairs'])} |")
    return "\n".join(lines)


def report(name: str, root: Path, host: dict) -> tuple[list[dict], str]:
    """Table rows and the one-line summary of a layout already run in root/name; `host`: the calibration's
    notebook_fixed_s and base_rss_gib ({} for lib.pipeline.cost's defaults)."""
    model = LAYOUTS[name][1]
    rate = {**cpu_rate(model), **host}
    rows = table(name, estimates(name, root, rate), probe_records(name, root), seconds_of(root / name), rate)
    worst = max((max(r["est_forwards"], r["forwards"]) / max(1, min(r["est_forwards"], r["forwards"]))
                 for r in rows if r["forwards"] is not None), default=1.0)
    peak = max((r["rss_gib"] or 0) for r in rows)
    line = (f"[cluster_shapes] {name} ({model}): {len(rows)} notebooks, {sum(r['seconds'] or 0 for r in rows):.0f} s "
            f"of notebooks, forwards {sum(r['forwards'] or 0 for r in rows):,} measured / "
            f"{sum(r['est_forwards'] for r in rows):,} estimated (worst notebook {worst:.2f}x), peak RSS {peak:.2f} GiB; "
            f"CPU rate {rate['flop_per_s']:.3g} FLOP/s, one-token forward {1e3 * rate['forward_latency_s']:.1f} ms (1 thread)")
    return rows, line


def one_layout(name: str, root: Path) -> str:
    """Run one layout -> a line with its wall time and the load before and after."""
    before = load()
    wall = run_layout(name, LAYOUTS[name][1], root)
    line = f"[cluster_shapes] {name}: lib.run {wall:.0f} s wall; load before {before}, after {load()}"
    print(line, flush=True)
    return line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--markdown", action="store_true", help="print the RESULTS.md table")
    parser.add_argument("--json", type=Path, help="write every row as JSON")
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a temporary one)")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the table of a --keep folder")
    parser.add_argument("--jobs", type=int, default=2, help="layouts run at the same time (default 2: one per core, "
                                                            "each kernel single-threaded)")
    parser.add_argument("--defaults", action="store_true", help="estimate with lib.pipeline.cost's default fixed "
                                                                "seconds and base RSS instead of measuring them here")
    args = parser.parse_args(argv)
    from lib.pipeline.cost import calibration
    host = host_calibration(args.defaults)
    fixed, base, source = calibration({**host, "device": "this machine", "date": time.strftime("%Y-%m-%d")} if host else None)
    print(f"[cluster_shapes] notebook fixed cost {fixed:.1f} s, kernel base RSS {base:.3f} GiB ({source}); "
          f"bare-import RSS {base_rss_kb() / 2 ** 20:.3f} GiB; load {load()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="cluster-shapes-") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        if not args.report_only:
            t0 = time.perf_counter()
            with ThreadPoolExecutor(max_workers=args.jobs) as pool:
                list(pool.map(lambda name: one_layout(name, root), args.layouts))
            print(f"[cluster_shapes] all {len(args.layouts)} layouts in {time.perf_counter() - t0:.0f} s wall "
                  f"({args.jobs} at a time); load at the end {load()}", flush=True)
        reports = [report(name, root, host) for name in args.layouts]
    all_rows = [r for rows, _ in reports for r in rows]
    for _, line in reports:
        print(line)
    if args.markdown:
        print(markdown(all_rows))
    if args.json:
        args.json.write_text(json.dumps(all_rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
