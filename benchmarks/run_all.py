"""Run every benchmark script in this folder, one after the other, saving JSON results to benchmarks/results/.

    python benchmarks/run_all.py [--only phiid extract ...]

Benchmarks are timed on whatever machine runs them: run them on an otherwise idle machine. The figures measured
for this repository's reference machine (2 CPU cores, no GPU) are in benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=None, help="benchmark names (file stems without _bench)")
    args = parser.parse_args()
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    failed = []
    for script in sorted(HERE.glob("*_bench.py")):
        name = script.stem.removesuffix("_bench")
        if args.only and name not in args.only:
            continue
        print(f"=== {name}", flush=True)
        proc = subprocess.run([sys.executable, str(script), "--json", str(results / f"{name}.json")], cwd=HERE.parent)
        if proc.returncode:
            failed.append(name)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
