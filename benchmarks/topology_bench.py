"""Benchmark of notebook 08 (network topology): lib.experiments.topology.run_topology end to end (load, both networks, the
threshold sweep, Louvain, the strength-preserving nulls, topology.json and modules.csv), one process per size.

Targets (2 cores): 270 heads (SmolLM2) with 100 nulls <= 60 s; 1,152 heads (Qwen-3-8B shape) <= 5 min and peak RSS
<= 4 GB. Without --out-dir the PhiID files are synthetic (per-head log-normal scales, layer-banded redundancy), written
into a scratch folder; with --out-dir the run's own phiid files are used (read only; outputs go to a scratch copy).

    .venv/bin/python benchmarks/topology_bench.py --json /tmp/topology_bench.json          # 270 and 1152 heads
    .venv/bin/python benchmarks/topology_bench.py --heads 24 --n-null 3 --n-louvain 2      # a smoke check
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHAPES = {270: (30, 9), 1152: (36, 32)}         # heads -> (layers, heads per layer)


def synthetic_run(folder: Path, n_heads: int, tags=("", "random_init"), seed: int = 0) -> None:
    """phiid_per_prompt(__tag).npz with [heads, heads] sts / rtr shaped like real runs."""
    import numpy as np

    from lib.storage import artifacts
    from lib.estimators.phiid import ATOM_NAMES
    layers, per_layer = SHAPES.get(n_heads, (max(n_heads // 8, 1), min(n_heads, 8)))
    n = layers * per_layer
    layer = np.repeat(np.arange(layers), per_layer)
    for k, tag in enumerate(tags):
        rng = np.random.default_rng([seed, k])
        scale = rng.lognormal(sigma=0.7, size=n)
        atoms = {a: np.abs(rng.normal(0, 1e-3, (n, n))) for a in ATOM_NAMES}
        atoms["sts"] = 0.01 * np.outer(scale, scale) * rng.lognormal(sigma=0.5, size=(n, n))
        near = np.exp(-np.abs(layer[:, None] - layer[None, :]) / 3.0)
        atoms["rtr"] = 0.02 * np.outer(scale, scale) * near * rng.lognormal(sigma=0.5, size=(n, n))
        artifacts.save("phiid", folder, {
            **atoms, "atom_names": np.array(list(ATOM_NAMES)), "head_layer": layer,
            "head_index": np.tile(np.arange(per_layer), layers), "degenerate": np.eye(n, dtype=bool),
            "n_valid": np.full((n, n), 60), "seconds": 0.0, "tau": 1, "redundancy": np.str_("MMI"),
            "mode": np.str_("per_prompt"), "backend": np.str_("numpy"),
            "activations_file": np.str_(artifacts.path("activations", folder, tag=tag).name)},
            tag=tag, mode="per_prompt")


def one_size(args) -> dict:
    """Run in a child process: time run_topology on one size, report wall, CPU and peak RSS."""
    from lib.experiments import topology as tp
    scratch = Path(tempfile.mkdtemp(prefix="topology-bench-"))
    if args.out_dir:
        for f in Path(args.out_dir).glob("phiid_per_prompt*.npz"):
            os.symlink(f.resolve(), scratch / f.name)
    else:
        synthetic_run(scratch, args.heads[0], tags=("", "random_init")[:args.tags])
    wall, cpu = time.perf_counter(), time.process_time()
    out = tp.run_topology(scratch, n_null=args.n_null, n_louvain=args.n_louvain, seed=0, baselines=args.tags > 1,
                          n_jobs=args.n_jobs)
    claim = out["json"]["claim"]
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"heads": claim["n"], "tags": len(out["json"]["tags"]), "n_null": args.n_null, "n_louvain": args.n_louvain,
            "n_jobs": args.n_jobs, "children_cpu_s": round(children.ru_utime + children.ru_stime, 2),
            "children_peak_rss_gb": round(children.ru_maxrss / 2 ** 20, 3),
            "wall_s": round(time.perf_counter() - wall, 2), "cpu_s": round(time.process_time() - cpu, 2),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 3),
            "efficiency_syn_minus_red": claim["value"], "null_ci95": claim["null"]["ci95"],
            "null_strength_error_max": max(t[n]["null_strength_error_max"] or 0.0
                                           for t in out["json"]["tags"].values() for n in ("syn", "red")),
            "load": os.getloadavg()[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, nargs="*", default=[270, 1152], help="network sizes (synthetic runs)")
    parser.add_argument("--out-dir", default=None, help="a run folder with phiid_per_prompt*.npz instead")
    parser.add_argument("--n-null", type=int, default=100)
    parser.add_argument("--n-louvain", type=int, default=20)
    parser.add_argument("--tags", type=int, default=1, help="1: trained only (the target); 2: + random_init")
    parser.add_argument("--n-jobs", type=int, default=2, help="processes (one per tag and network)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_size(args)))
        return 0
    rows = []
    for heads in ([0] if args.out_dir else args.heads):
        cmd = [sys.executable, __file__, "--child", "--heads", str(heads), "--n-null", str(args.n_null),
               "--n-louvain", str(args.n_louvain), "--tags", str(args.tags), "--n-jobs", str(args.n_jobs)]
        cmd += ["--out-dir", args.out_dir] if args.out_dir else []
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
