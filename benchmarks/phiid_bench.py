"""Benchmark of lib.estimators.phiid.phiid_all_pairs: wall time, CPU time and peak memory per configuration.

    python benchmarks/phiid_bench.py                 # full set, table on stderr, JSON on stdout
    python benchmarks/phiid_bench.py --json bench.json
    python benchmarks/phiid_bench.py --quick         # small shapes (smoke test, a few seconds)

Every case runs in a fresh Python process, so its peak RSS (resource.getrusage ru_maxrss, which includes the
float32 input and the float64 copy lib.estimators.phiid makes) is its own. Inputs are seeded synthetic coupled AR(1) heads
[prompts, heads, steps] in float32, like notebook 01's activations.

Comparison with the reference library phyid: it is not installable from PyPI, so it is NOT run here. The ratio
uses its documented per-call timing (shared reference README: median 1.58 ms per calc_PhiID call for MMI,
1.56 ms for CCS, T = 100, tau = 1, one thread, 2-core AMD EPYC VM, quietest run) times the number of calls the
same computation needs (one call per unordered pair and prompt for per_prompt; per pair for concat/pooled at the
longer length, where only the T = 6000 timing, 5.39 / 6.1 ms, is documented). It is a documented reference
timing, not a fresh measurement. Optionally (--phyid-path DIR, a local checkout of phyid used only for
measuring) phyid is also timed live on a few hundred pairs at T = 100 in the same conditions, and the per_prompt
cases get a second, live ratio. The machine is shared: the load average before and after each case is recorded.
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# documented reference timings (seconds per calc_PhiID call), see the module docstring
REFERENCE_SECONDS_PER_CALL = {("MMI", 100): 1.58e-3, ("CCS", 100): 1.56e-3, ("MMI", 6000): 5.39e-3, ("CCS", 6000): 6.1e-3}


def full_cases(heads, large_heads, prompts, steps):
    cases = []
    for h in (heads, large_heads):
        for mode in ("per_prompt", "concat", "pooled"):
            cases.append({"redundancy": "MMI", "mode": mode, "backend": "numpy", "heads": h})
        cases.append({"redundancy": "MMI", "mode": "per_prompt", "backend": "torch", "heads": h})
    cases.append({"redundancy": "CCS", "mode": "per_prompt", "backend": "numpy", "heads": heads})
    cases.append({"redundancy": "CCS", "mode": "per_prompt", "backend": "torch", "heads": heads})
    for case in cases:
        case.update(prompts=prompts, steps=steps)
    return cases


def synthetic_activations(prompts, heads, steps, seed=0):
    """[prompts, heads, steps] float32: AR(1) heads, each also driven by its neighbour, positive like norms."""
    import numpy as np
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((prompts, heads, steps)).astype(np.float32)
    X = np.empty_like(noise)
    X[..., 0] = noise[..., 0]
    for t in range(1, steps):
        X[..., t] = 0.5 * X[..., t - 1] + 0.3 * np.roll(X[..., t - 1], 1, axis=1) + noise[..., t]
    return np.abs(X) + 1.0


def run_case(case):
    """Runs in the child process: time one phiid_all_pairs call, report JSON."""
    import warnings

    import numpy as np
    from lib.estimators.phiid import phiid_all_pairs
    X = synthetic_activations(case["prompts"], case["heads"], case["steps"])
    phiid_all_pairs(X[:2, :8], redundancy=case["redundancy"], mode=case["mode"], backend=case["backend"])  # warm-up
    load_before = os.getloadavg()[0]
    cpu0, t0 = time.process_time(), time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = phiid_all_pairs(X, redundancy=case["redundancy"], mode=case["mode"], backend=case["backend"])
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finite = np.isfinite(result["sts"][~np.eye(case["heads"], dtype=bool)]).mean()
    return {**case, "seconds": seconds, "cpu_seconds": cpu,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "input_mb": X.nbytes / 2 ** 20, "finite_fraction": float(finite),
            "load_before": load_before, "load_after": os.getloadavg()[0]}


def time_phyid(calls, steps, redundancy):
    """Runs in the child process: median seconds per phyid calc_PhiID call on synthetic pairs (only when
    phyid is importable, e.g. via --phyid-path; it is never installed or stored by this project)."""
    import statistics

    from phyid.calculate import calc_PhiID
    X = synthetic_activations(1, 2 * calls, steps, seed=1)[0].astype(float)
    for k in range(5):  # warm-up
        calc_PhiID(X[2 * k], X[2 * k + 1], 1, kind="gaussian", redundancy=redundancy)
    times = []
    for k in range(calls):
        t0 = time.perf_counter()
        calc_PhiID(X[2 * k], X[2 * k + 1], 1, kind="gaussian", redundancy=redundancy)
        times.append(time.perf_counter() - t0)
    return {"redundancy": redundancy, "steps": steps, "calls": calls, "median": statistics.median(times),
            "min": min(times), "mean": statistics.fmean(times), "load": os.getloadavg()[0]}


def reference_estimate(case):
    """Seconds phyid would need by its documented per-call timing, and the number of calls."""
    pairs = case["heads"] * (case["heads"] - 1) // 2
    if case["mode"] == "per_prompt":
        calls, length = pairs * case["prompts"], 100
    else:  # one call per pair on prompts * steps samples; only the T = 6000 timing is documented
        calls, length = pairs, 6000
    per_call = REFERENCE_SECONDS_PER_CALL[(case["redundancy"], length)]
    return calls * per_call, calls, per_call, length


def spawn(case, timeout, blas_threads=None, phyid_path=None):
    """Run one case in a fresh process; blas_threads sets OPENBLAS/OMP/MKL_NUM_THREADS for it."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one-case", json.dumps(case)]
    env = dict(os.environ)
    if blas_threads:
        env.update({k: str(blas_threads) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")})
    if phyid_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(phyid_path), env.get("PYTHONPATH")]))
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        return {**case, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows):
    """Text table; 'speedup' uses phyid's documented timing, 'live x' the live phyid timing (if measured)."""
    head = (f"{'redundancy':10} {'mode':10} {'backend':7} {'heads':>5} {'prompts':>7} {'steps':>5} {'seconds':>8} "
            f"{'cpu s':>7} {'peak RSS MB':>11} {'phyid est. s':>12} {'speedup':>8} {'live x':>7} {'blas':>7} {'load':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['redundancy']:10} {r['mode']:10} {r['backend']:7} {r['heads']:5} ERROR {r['error']}")
            continue
        lines.append(f"{r['redundancy']:10} {r['mode']:10} {r['backend']:7} {r['heads']:5} {r['prompts']:7} "
                     f"{r['steps']:5} {r['seconds']:8.3f} {r['cpu_seconds']:7.2f} {r['peak_rss_mb']:11.0f} "
                     f"{r['reference_seconds']:12.0f} {r['speedup_vs_reference']:8.0f} "
                     f"{r.get('speedup_vs_phyid_live', float('nan')):7.0f} {str(r['blas_threads']):>7} "
                     f"{r['load_before']:4.1f}>{r['load_after']:4.1f}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default="-", help="write the JSON report here ('-' = stdout)")
    parser.add_argument("--heads", type=int, default=256)
    parser.add_argument("--large-heads", type=int, default=1152)
    parser.add_argument("--prompts", type=int, default=60)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=1, help="run each case this many times (all are reported)")
    parser.add_argument("--only", default="", help="comma list of filters, e.g. MMI,numpy,per_prompt")
    parser.add_argument("--quick", action="store_true", help="small shapes: 32 / 96 heads, 6 prompts")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per case")
    parser.add_argument("--blas-threads", type=int, default=None,
                        help="OPENBLAS_NUM_THREADS for the cases (default: inherited). On a shared machine 1 avoids "
                             "BLAS threads spin-waiting; lib.estimators.phiid parallelises the pair batches itself")
    parser.add_argument("--phyid-path", default=None,
                        help="folder containing the phyid package (a checkout of Imperial-MIND-lab/"
                             "integrated-info-decomp): also time phyid live on --phyid-calls pairs")
    parser.add_argument("--phyid-calls", type=int, default=300)
    parser.add_argument("--one-case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_case:
        case = json.loads(args.one_case)
        print(json.dumps(time_phyid(**case["phyid"]) if "phyid" in case else run_case(case)))
        return
    if args.quick:
        args.heads, args.large_heads, args.prompts = 32, 96, 6
    cases = full_cases(args.heads, args.large_heads, args.prompts, args.steps)
    filters = [f for f in args.only.split(",") if f]
    cases = [c for c in cases if all(f in (c["redundancy"], c["mode"], c["backend"], str(c["heads"])) for f in filters)]
    rows = []
    for case in cases:
        for _ in range(args.repeats):
            row = {**spawn(case, args.timeout, args.blas_threads), "blas_threads": args.blas_threads or "default"}
            if "error" not in row:
                ref, calls, per_call, length = reference_estimate(row)
                row.update(reference_seconds=ref, reference_calls=calls, reference_seconds_per_call=per_call,
                           reference_length=length, speedup_vs_reference=ref / row["seconds"])
            rows.append(row)
            print(table([row]).splitlines()[-1], file=sys.stderr, flush=True)
    live = {}
    if args.phyid_path:
        for red in sorted({r["redundancy"] for r in rows}):
            got = spawn({"phyid": {"calls": args.phyid_calls, "steps": 100, "redundancy": red}}, args.timeout,
                        args.blas_threads or 1, args.phyid_path)
            live[red] = got
            print(f"phyid live ({red}, T=100): {got}", file=sys.stderr)
        for r in rows:
            if "error" not in r and r["mode"] == "per_prompt" and "median" in live.get(r["redundancy"], {}):
                r["phyid_live_seconds_estimate"] = r["reference_calls"] * live[r["redundancy"]]["median"]
                r["speedup_vs_phyid_live"] = r["phyid_live_seconds_estimate"] / r["seconds"]
    import numpy
    report = {
        "reference_timing_note": "phyid is not run: speedups use its documented per-call timing (median 1.58 ms "
                                 "MMI / 1.56 ms CCS at T=100; 5.39 / 6.1 ms at T=6000), not a fresh measurement",
        "command": " ".join(sys.argv),
        "machine": {"python": platform.python_version(), "numpy": numpy.__version__, "cpus": os.cpu_count(),
                    "platform": platform.platform(), "processor": platform.processor()},
        "results": rows,
        "phyid_live": live or "not measured (pass --phyid-path to time phyid on a subset of pairs)",
    }
    print("\n" + table(rows), file=sys.stderr)
    text = json.dumps(report, indent=2)
    if args.json == "-":
        print(text)
    else:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
