"""lib.plan's cost estimate against a measured settle run: does "CPU hours here" hold within 2x?

    python benchmarks/plan_bench.py [--run outputs/tiny] [--json PATH]

Takes a finished run (default the tiny run), writes its settle params (lib.plan.write_settle) to a temporary file,
and reads lib.plan.cpu_hours' estimate per notebook (the run's measured seconds x the ratio of lib/pipeline/cost.py's token or
forward estimates). Then runs the settle params file (every notebook, --force: a settle plan that raises 01's
prompts changes every input) and compares each notebook's measured seconds with the estimate. The original params
are rerun the same way just before, so a second estimate (today's seconds x the same ratio) separates the
estimator's scaling from a change of machine load since the run was measured.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lib.plan import _run_params_file, cpu_hours, write_settle  # noqa: E402


def _seconds(run_dir: Path) -> dict:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return {k: v.get("seconds") for k, v in manifest["notebooks"].items()}


def _rerun(params: Path, run_dir: Path) -> dict:
    """Run every notebook of `params` into run_dir -> {notebook: measured seconds}."""
    cmd = [sys.executable, "-m", "lib.run", "--params", str(params), "--set", f"out_dir={run_dir}", "--quiet",
           "--force"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return _seconds(run_dir)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="outputs/tiny")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    run = Path(args.run).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        settle, _ = write_settle(run, tmp / "settle.yaml")
        if settle is None:
            print(f"{run}: nothing underpowered with a sample-size plan: no settle run to measure")
            return 1
        original = _run_params_file(run)
        estimate = cpu_hours(run, original, settle)
        recorded = _seconds(run)
        today = _rerun(original, tmp / "baseline-run")
        measured = _rerun(settle, tmp / "settle-run")
    rows = []
    for name in [k for k, v in estimate.items() if v["cpu_hours"] and k in measured and k in today]:
        est = estimate[name]["cpu_hours"] * 3600
        scale = est / recorded[name]
        rows.append({"notebook": name, "recorded_s": recorded[name], "estimate_s": est, "measured_s": measured[name],
                     "ratio": measured[name] / est, "baseline_today_s": today[name],
                     "ratio_same_load": measured[name] / (today[name] * scale)})
    print(f"{'notebook':<22}{'run (s)':>9}{'estimate':>10}{'measured':>10}{'ratio':>7}{'same-load ratio':>17}")
    for r in rows:
        print(f"{r['notebook']:<22}{r['recorded_s']:>9.1f}{r['estimate_s']:>10.1f}{r['measured_s']:>10.1f}"
              f"{r['ratio']:>7.2f}{r['ratio_same_load']:>17.2f}")
    total = {k: sum(r[k] for r in rows) for k in ("estimate_s", "measured_s")}
    same = sum(r["baseline_today_s"] * r["estimate_s"] / r["recorded_s"] for r in rows)
    print(f"{'total':<22}{'':>9}{total['estimate_s']:>10.1f}{total['measured_s']:>10.1f}"
          f"{total['measured_s'] / total['estimate_s']:>7.2f}{total['measured_s'] / same:>17.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if all(0.5 <= r["ratio_same_load"] <= 2 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
