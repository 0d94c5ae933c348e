"""Do two run folders hold the same artifacts? For checking that a refactoring changed no result.

    python benchmarks/same_artifacts.py outputs/tiny /path/to/reference/tiny [--rtol 1e-6] [--atol 1e-9]

Compares every .npz (same keys, arrays np.allclose with equal_nan, non-numeric arrays equal), every .csv (pandas:
same columns and rows, numeric columns allclose, the others equal), every .json and .jsonl (numbers within the same
tolerance, everything else equal; keys and npz arrays that record when, where or how long something ran are
skipped: IGNORED_KEYS, and --ignore KEY...)
and, for claims.json, lists every claim whose verdict differs. The manifest (timings, hosts, paths) and the
executed notebooks and figures are left out. Prints one line per difference; exit status 1 when there is one.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

IGNORED_KEYS = {"inputs", "timings", "seconds", "elapsed", "elapsed_s", "wall_s", "started", "finished", "host",
                "hostname", "out_dir", "path", "paths", "created", "time", "duration_s"}
SKIPPED_FILES = {"manifest.json"}


def compare_values(a, b, where: str, rtol: float, atol: float) -> list[str]:
    """Differences between two JSON values (numbers within tolerance, NaN equal to NaN)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}: keys only in one run: {sorted(set(a) ^ set(b))}"] if set(a) != set(b) else []
        for k in sorted(set(a) & set(b) - IGNORED_KEYS):
            out += compare_values(a[k], b[k], f"{where}.{k}", rtol, atol)
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in compare_values(x, y, f"{where}[{i}]", rtol, atol)]
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        same = (math.isnan(a) and math.isnan(b)) if (math.isnan(a) or math.isnan(b)) else \
            math.isclose(a, b, rel_tol=rtol, abs_tol=atol)
        return [] if same else [f"{where}: {a!r} != {b!r}"]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"[:300]]


def compare_npz(a: Path, b: Path, rtol: float, atol: float) -> list[str]:
    with np.load(a, allow_pickle=False) as x, np.load(b, allow_pickle=False) as y:
        if set(x.files) != set(y.files):
            return [f"{a.name}: keys only in one run: {sorted(set(x.files) ^ set(y.files))}"]
        out = []
        for k in sorted(set(x.files) - IGNORED_KEYS):
            u, v = x[k], y[k]
            if u.shape != v.shape:
                out.append(f"{a.name}[{k}]: shape {u.shape} != {v.shape}")
            elif np.issubdtype(u.dtype, np.number) and np.issubdtype(v.dtype, np.number):
                if not np.allclose(u, v, rtol=rtol, atol=atol, equal_nan=True):
                    worst = np.nanmax(np.abs(u.astype(float) - v.astype(float)))
                    out.append(f"{a.name}[{k}]: arrays differ (max |difference| {worst:.3g})")
            elif not np.array_equal(u, v):
                out.append(f"{a.name}[{k}]: values differ")
        return out


def compare_csv(a: Path, b: Path, rtol: float, atol: float) -> list[str]:
    x, y = pd.read_csv(a), pd.read_csv(b)
    if list(x.columns) != list(y.columns) or len(x) != len(y):
        return [f"{a.name}: columns or rows differ ({list(x.columns)} x {len(x)} vs {list(y.columns)} x {len(y)})"]
    out = []
    for col in x.columns:
        u, v = x[col], y[col]
        if pd.api.types.is_numeric_dtype(u) and pd.api.types.is_numeric_dtype(v):
            if not np.allclose(u.to_numpy(float), v.to_numpy(float), rtol=rtol, atol=atol, equal_nan=True):
                out.append(f"{a.name}[{col}]: numbers differ")
        elif not u.fillna("").astype(str).equals(v.fillna("").astype(str)):
            out.append(f"{a.name}[{col}]: values differ")
    return out


def compare_json(a: Path, b: Path, rtol: float, atol: float) -> list[str]:
    if a.suffix == ".jsonl":
        x = [json.loads(line) for line in a.read_text().splitlines() if line.strip()]
        y = [json.loads(line) for line in b.read_text().splitlines() if line.strip()]
    else:
        x, y = json.loads(a.read_text()), json.loads(b.read_text())
    return compare_values(x, y, a.name, rtol, atol)


def claim_verdicts(run: Path) -> dict[str, str]:
    claims = json.loads((run / "claims.json").read_text()).get("claims", [])
    return {c["id"]: c.get("verdict") for c in claims}


COMPARERS = {".npz": compare_npz, ".csv": compare_csv, ".json": compare_json, ".jsonl": compare_json}


def compare_runs(a: Path, b: Path, rtol: float = 1e-6, atol: float = 1e-9) -> tuple[list[str], int]:
    """(differences, number of files compared) between run folders a and b."""
    names = lambda run: {p.name for p in run.iterdir() if p.suffix in COMPARERS and p.name not in SKIPPED_FILES}
    out = [f"{n}: only in {a if n in names(a) else b}" for n in sorted(names(a) ^ names(b))]
    common = sorted(names(a) & names(b))
    for n in common:
        out += COMPARERS[Path(n).suffix](a / n, b / n, rtol, atol)
    if "claims.json" in common:
        va, vb = claim_verdicts(a), claim_verdicts(b)
        out += [f"claims.json: {c} verdict {va.get(c)!r} != {vb.get(c)!r}" for c in sorted(set(va) | set(vb))
                if va.get(c) != vb.get(c)]
    return out, len(common)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--rtol", type=float, default=1e-6)
    parser.add_argument("--atol", type=float, default=1e-9)
    parser.add_argument("--ignore", nargs="+", default=[], metavar="KEY",
                        help="more keys to skip (JSON keys, npz arrays), e.g. rule when only module paths changed")
    args = parser.parse_args(argv)
    IGNORED_KEYS.update(args.ignore)
    diffs, n = compare_runs(args.run_a, args.run_b, args.rtol, args.atol)
    print("\n".join(diffs))
    print(f"{n} files compared (npz, csv, json, jsonl; rtol {args.rtol:g}, atol {args.atol:g}): "
          f"{len(diffs)} difference(s)")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
