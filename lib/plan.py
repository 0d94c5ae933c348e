"""What to run to settle each underpowered claim: sample sizes, cost, and a params file the runner accepts.

    python -m lib.plan outputs/<run>        # prints the table, writes params/<run>-settle.yaml

For every claim of claims.json whose verdict is `underpowered`, lib/pipeline/claims/ stored a settle plan: the factor on
the sample size that brings the minimum detectable effect (80% power) down to the paper's effect (se ~ 1/sqrt(n))
and the params values it gives (e.g. NB.BEHAVIOUR's n_problems). This module merges those values into the run's
own params file (the largest value wins when two claims ask for the same key), validates the result with the
runner's --check, and prints, per notebook, lib/pipeline/cost.py's forwards and GPU-hours (with a rate file) and CPU hours
here: the run's measured seconds scaled by the ratio of estimated tokens (forwards for notebooks without tokens).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from lib import REPO_ROOT
from lib.storage import artifacts
from lib.storage.notebooks import NB

__all__ = ["settle_values", "settle_params", "write_settle", "cpu_hours", "main"]


def settle_values(claims: list[dict]) -> dict:
    """{params key "NN_notebook.key": value} over every underpowered claim's plan (max per key)."""
    out = {}
    for c in claims:
        plan = c.get("settle") or {}
        if c.get("verdict") != "underpowered" or not plan.get("params"):
            continue
        for key, value in plan["params"].items():
            out[key] = max(out.get(key, 0), int(value))
    return out


def settle_params(raw: dict, values: dict) -> dict:
    """The run's params (raw YAML mapping) with the settle values set; `seeds` become [0, ..., n-1]; 01's prompts
    raised when a later notebook is to use more of them than 01 extracts (see `_enough_prompts`)."""
    out = json.loads(json.dumps(raw))
    for key, value in values.items():
        section, name = key.split(".", 1)
        out.setdefault(section, {})[name] = list(range(value)) if name == "seeds" else value
    return _enough_prompts(out)


def _enough_prompts(params: dict) -> dict:
    """05 ablates prompts of 01's activations that the oracle did not use: 01.n_prompts must cover 05.n_prompts plus
    01.oracle_prompts (when the oracle runs), else 05 fails on the node. Raises 01.n_prompts in place."""
    extract, ablation = params.get(NB.EXTRACT) or {}, params.get(NB.ABLATION) or {}
    wanted = ablation.get("n_prompts")
    if not isinstance(wanted, int) or "n_prompts" not in extract:
        return params
    need = wanted + (int(extract.get("oracle_prompts") or 0) if extract.get("oracle") else 0)
    extract["n_prompts"] = max(int(extract["n_prompts"]), need)
    return params


def _run_params_file(out_dir: Path) -> Path:
    manifest = json.loads((out_dir / "manifest.json").read_text()) if (out_dir / "manifest.json").exists() else {}
    path = ((manifest.get("sections") or {}).get("run") or {}).get("params_file")
    if not path:
        raise SystemExit(f"error: {out_dir}/manifest.json names no params file: run the pipeline with "
                         f"python -m lib.run --params params/<run>.yaml first")
    return Path(path) if Path(path).is_absolute() else REPO_ROOT / path


def write_settle(out_dir, target: Path | None = None) -> tuple[Path | None, list[dict]]:
    """Write params/<run>-settle.yaml (checked with the runner) -> (its path or None when nothing is
    underpowered, the table rows)."""
    from lib.pipeline.runner import check_run
    out_dir = Path(out_dir)
    claims = artifacts.load("claims", out_dir)["claims"]
    values = settle_values(claims)
    rows = [{"claim": c["id"], "verdict": c["verdict"], "paper": (c.get("paper_effect") or {}).get("value"),
             "mde": (c.get("power") or {}).get("mde"), "factor": (c.get("settle") or {}).get("factor"),
             "params": (c.get("settle") or {}).get("params") or (c.get("settle") or {}).get("why", "")}
            for c in claims if c.get("verdict") == "underpowered"]
    if not values:
        return None, rows
    source = _run_params_file(out_dir)
    target = target or source.with_name(f"{source.stem}-settle.yaml")
    text = yaml.safe_dump(settle_params(yaml.safe_load(source.read_text()), values), sort_keys=False)
    header = (f"# Settles the underpowered claims of {out_dir.name} (python -m lib.plan {out_dir}): sample sizes at\n"
              f"# which the minimum detectable effect (80% power) reaches the paper's effect.\n"
              + "".join(f"#   {k} = {v}\n" for k, v in values.items()))
    tmp = target.with_suffix(".tmp")
    tmp.write_text(header + text)
    try:
        check_run(str(tmp), require_cache=False)
    except Exception:
        tmp.unlink()
        raise
    tmp.replace(target)
    return target, rows


def cpu_hours(out_dir: Path, original: Path, settle: Path) -> dict:
    """notebook -> (CPU hours here for the settle run, GPU-hours or None): measured seconds of the run times the
    ratio of lib/pipeline/cost.py's token (or forward) estimates."""
    from lib.pipeline.cost import estimates
    from lib.pipeline.runner import check_run
    manifest = json.loads((out_dir / "manifest.json").read_text())
    seconds = {k: v.get("seconds") for k, v in (manifest.get("notebooks") or {}).items()}
    before = {r["notebook"]: r for r in estimates(check_run(str(original), require_cache=False))[0]}
    out = {}
    for r in estimates(check_run(str(settle), require_cache=False))[0]:
        b, s = before.get(r["notebook"], {}), seconds.get(r["notebook"])
        key = "tokens" if r.get("tokens") and b.get("tokens") else "forwards"
        ratio = (r[key] / b[key]) if r.get(key) and b.get(key) else 1.0
        out[r["notebook"]] = {"cpu_hours": None if s is None else s * ratio / 3600, "forwards": r["forwards"],
                              "gpu_hours": r["gpu_hours"] if isinstance(r["gpu_hours"], float) else None}
    return out


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3g}" if isinstance(x, float) else str(x)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="a finished run folder with claims.json, e.g. outputs/smollm2-135m")
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir)
    if not artifacts.path("claims", out_dir).exists():
        print(f"error: {out_dir}/claims.json not found: run the pipeline (python -m lib.run) or python -m lib.claims "
              f"{out_dir} first", file=sys.stderr)
        return 2
    target, rows = write_settle(out_dir)
    print(f"{'claim':<6}{'paper':>9}{'min. det.':>11}{'factor':>8}  what settles it")
    for r in rows:
        print(f"{r['claim']:<6}{_fmt(r['paper']):>9}{_fmt(r['mde']):>11}{_fmt(r['factor']):>8}  {r['params']}")
    if target is None:
        print("nothing to settle: no claim is underpowered with a sample-size plan")
        return 0
    cost = cpu_hours(out_dir, _run_params_file(out_dir), target)
    print(f"\n{'notebook':<24}{'forwards':>12}{'CPU hours here':>16}{'GPU-hours':>11}")
    for name, c in cost.items():
        print(f"{name:<24}{_fmt(c['forwards']):>12}{_fmt(c['cpu_hours']):>16}{_fmt(c['gpu_hours']):>11}")
    total = sum(c["cpu_hours"] or 0 for c in cost.values())
    print(f"total CPU hours here: {total:.3g}\n[plan] {target} (passes python -m lib.run --params {target} --check)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
