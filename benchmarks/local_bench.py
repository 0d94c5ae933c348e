"""Benchmark of the local (per step) PhiID engine: per-head local sts and rtr over all partners, streamed
(lib.estimators.phiid.phiid_local_head_means), and local atoms of an explicit pair list (phiid_local_pairs).

    python benchmarks/local_bench.py                              # 270 heads x 60 prompts x 100 steps (SmolLM2)
    python benchmarks/local_bench.py --heads 24 --prompts 4 --steps 30 --pairs 50   # smoke test, seconds
    python benchmarks/local_bench.py --json local.json

Target (main job, MMI, per_prompt): <= 20 s on 2 cores and peak RSS <= 2 GB for 270 heads x 60 x 100. Every case
runs in a fresh Python process so its peak RSS (resource.getrusage ru_maxrss, including the input) is its own.
Inputs: seeded synthetic coupled AR(1) heads [prompts, heads, steps] in float32, like notebook 01's activations.
The load average before and after each case is recorded (the machine may be shared).
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CASE_CODE = r"""
import json, resource, sys, time
import numpy as np
from lib.estimators import phiid
case = json.loads(sys.argv[1])
rng = np.random.default_rng(0)
P, H, T = case["prompts"], case["heads"], case["steps"]
e = rng.standard_normal((P, H, T)).astype(np.float32)
X = np.zeros_like(e)
for t in range(1, T):
    X[..., t] = 0.5 * X[..., t - 1] + 0.3 * np.roll(X[..., t - 1], 1, axis=1) + e[..., t]
cpu0, t0 = time.process_time(), time.perf_counter()
if case["kind"] == "head_means":
    out = phiid.phiid_local_head_means(X, redundancy=case["redundancy"], mode=case["mode"], workers=case["workers"])
    finite = float(np.isfinite(out["sts"]).mean())
else:
    pairs = np.stack(np.triu_indices(H, 1), 1)[:case["pairs"]]
    out = phiid.phiid_local_pairs(X, pairs, redundancy=case["redundancy"], mode=case["mode"])
    finite = float(np.isfinite(out["sts"]).mean())
seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
print(json.dumps({**case, "seconds": seconds, "cpu_seconds": cpu, "finite_fraction": finite,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_case(case, timeout):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    load0 = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, "-c", CASE_CODE, json.dumps(case)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"case {case} failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "load_before": load0,
            "load_after": os.getloadavg()[0]}


def cases(args):
    out = []
    for red in args.redundancy:
        for mode in args.mode:
            out.append({"kind": "head_means", "redundancy": red, "mode": mode, "heads": args.heads,
                        "prompts": args.prompts, "steps": args.steps, "workers": args.workers})
            out.append({"kind": "pairs", "redundancy": red, "mode": mode, "heads": args.heads,
                        "prompts": args.prompts, "steps": args.steps, "pairs": args.pairs, "workers": None})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", type=int, default=270)
    parser.add_argument("--prompts", type=int, default=60)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--pairs", type=int, default=1000, help="explicit pairs for the pair-list case")
    parser.add_argument("--workers", type=int, default=None, help="threads (default: usable CPUs up to 4)")
    parser.add_argument("--redundancy", nargs="+", default=["MMI"], choices=["MMI", "CCS"])
    parser.add_argument("--mode", nargs="+", default=["per_prompt"], choices=["per_prompt", "pooled"])
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = parser.parse_args()
    rows = []
    print(f"{'kind':>10} {'red':>4} {'mode':>10} {'shape':>14} {'wall s':>8} {'cpu s':>8} {'RSS MB':>8} {'load':>9}",
          file=sys.stderr)
    for case in cases(args):
        r = run_case(case, args.timeout)
        rows.append(r)
        print(f"{r['kind']:>10} {r['redundancy']:>4} {r['mode']:>10} {r['heads']}x{r['prompts']}x{r['steps']:>4} "
              f"{r['seconds']:8.2f} {r['cpu_seconds']:8.2f} {r['peak_rss_mb']:8.0f} "
              f"{r['load_before']:4.1f}/{r['load_after']:4.1f}", file=sys.stderr, flush=True)
    result = {"machine": platform.platform(), "cpus": os.cpu_count(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
              "cases": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
