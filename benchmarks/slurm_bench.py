"""SLURM overheads on a real single-node cluster started on this machine (tests/tools/local_slurm.py).

    python benchmarks/slurm_bench.py [--params params/tiny.yaml] [--shards 2] [--no-pipeline] [--json PATH]

Measures: installing slurm-wlm + munge when missing and starting the daemons; submit-to-start latency and wall
time of an empty job; one job running the runner's --check (interpreter + env.sh + params validation, the fixed
cost of every notebook job); and the whole pipeline of a params file through slurm/pipeline.sh, from submission
to the report job's end, with each job's wall time and the scheduling gaps between dependent jobs.
"From nothing" = install (if needed) + start + pipeline. Needs root; without it prints why and exits 0.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.tools.local_slurm import LocalSlurm, SlurmUnavailable  # noqa: E402


def ts(value: str) -> float | None:
    try:
        return dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%S").timestamp()
    except (TypeError, ValueError):
        return None


def job_seconds(job: dict) -> float | None:
    a, b = ts(job.get("StartTime")), ts(job.get("EndTime"))
    return b - a if a and b else None


def sbatch(cluster: LocalSlurm, *args: str) -> str:
    return cluster.run("sbatch", "--parsable", *args).stdout.strip().split(";")[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params/tiny.yaml")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--no-pipeline", action="store_true", help="only the cluster and single-job overheads")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()

    results: dict = {"params": args.params, "shards": args.shards}
    t0 = time.perf_counter()
    cluster = LocalSlurm(cpus=16, gpus=4)
    try:
        results["start_s"] = round(cluster.start(), 2)
        results["installed_now"] = cluster.installed_now
    except SlurmUnavailable as e:
        print(f"skipped: SLURM unavailable: {e}")
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"skipped": str(e)}, indent=2))
        return 0
    rows = [("install + start daemons" if results["installed_now"] else "start daemons (installed)", results["start_s"])]
    try:
        logs = Path(tempfile.mkdtemp(prefix="hi-slurm-bench-"))
        t = time.perf_counter()
        jid = sbatch(cluster, f"--output={logs}/empty-%j.out", "--wrap", "true")
        job = cluster.wait(jid, timeout=120)[0]
        rows.append(("empty job: submit -> finished (polled)", round(time.perf_counter() - t, 2)))
        t = time.perf_counter()
        script = logs / "check.sh"
        script.write_text(f"#!/usr/bin/env bash\nsource slurm/env.sh && \"$PY\" -m lib.run --params {args.params} --check\n")
        jid = sbatch(cluster, f"--output={logs}/check-%j.out", f"--chdir={REPO}", str(script))
        job = cluster.wait(jid, timeout=300)[0]
        rows.append((f"runner --check job ({job['JobState']})", round(time.perf_counter() - t, 2)))
        if not args.no_pipeline:
            out = Path(tempfile.mkdtemp(prefix="hi-slurm-bench-run-"))
            t = time.perf_counter()
            sub = cluster.run(str(REPO / "slurm" / "pipeline.sh"), args.params, "--shards", str(args.shards),
                              "--set", f"out_dir={out}", timeout=300)
            rows.append(("pipeline.sh (validate + submit)", round(time.perf_counter() - t, 2)))
            ids = sub.stdout.split("JOBS", 1)[1].split("\n")[0].split()
            jobs = cluster.wait(ids, timeout=3600)
            total = time.perf_counter() - t
            ok = all(j["JobState"] == "COMPLETED" and j["ExitCode"] == "0:0" for j in jobs)
            rows.append((f"pipeline: submit -> report done ({'all ok' if ok else 'FAILED'})", round(total, 1)))
            starts = [ts(j["StartTime"]) for j in jobs if ts(j.get("StartTime"))]
            ends = [ts(j["EndTime"]) for j in jobs if ts(j.get("EndTime"))]
            busy = sum(job_seconds(j) or 0 for j in jobs)
            results["jobs"] = [{"name": j["JobName"], "task": j.get("ArrayTaskId", ""), "state": j["JobState"],
                                "seconds": job_seconds(j)} for j in jobs]
            for j in results["jobs"]:
                rows.append((f"  job {j['name']}{'_' + j['task'] if j['task'] else ''}", j["seconds"]))
            if starts and ends:
                rows.append(("  sum of job wall times", round(busy, 1)))
                rows.append(("  first start -> last end", round(max(ends) - min(starts), 1)))
            results["pipeline_ok"] = ok
            results["pipeline_s"] = round(total, 1)
            results["from_nothing_s"] = round(time.perf_counter() - t0, 1)
            rows.append(("from nothing to finished pipeline", results["from_nothing_s"]))
            subprocess.run(["rm", "-rf", str(out)])
        subprocess.run(["rm", "-rf", str(logs)])
    finally:
        alive = cluster.stop()
        results["daemons_left"] = alive
    results["rows"] = rows
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  seconds")
    for name, value in rows:
        print(f"{name:<{width}}  {value if value is not None else '-'}")
    if alive:
        print(f"WARNING: daemons still alive: {alive}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0 if not alive and results.get("pipeline_ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
