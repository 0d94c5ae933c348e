"""Task-behaviour throughput (notebook 09) on a real model: the main-job section and its parts.

    .venv/bin/python benchmarks/behaviour_bench.py [--model bundled:smollm2-135m] [--n-problems 100] [--n-random 10]
        [--variants rank_diff balance] [--sigma 1.0] [--max-new-tokens 4] [--batch-size 100] [--threads 2]
        [--json out.json]

Works in a temporary run folder with a synthetic rankings.csv (seeded uniform scores per variant). Figures:
- one baseline pass (all problems, greedy, the reply started with "The answer is"): seconds and new tokens/s;
- one noise condition (the same batches under perturbed weights): its seconds, i.e. the cost of one condition;
- one zero-mask group of n_random conditions sharing forwards;
- the whole main-job section (run_behaviour with the given settings) end to end.
Wall and process CPU time are printed: on a shared machine CPU time / threads estimates the unloaded wall time.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lib.storage import artifacts
from lib.experiments import behaviour
from lib.model.loading import load_model
from timing import Timer  # noqa: E402  (benchmarks/timing.py)


def synthetic_rankings(folder: Path, arch, variants: list[str]) -> None:
    layer, head = arch.head_map()
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"head_idx": np.arange(arch.total_heads), "layer": layer, "head": head})
    for v in variants:
        frame[v] = rng.random(arch.total_heads)
    artifacts.save("rankings", folder, frame)


def timed_plan(folder, args, **overrides):
    settings = dict(model=args.model, variants=args.variants, n_random=args.n_random, perturbations=["noise"],
                    sigmas=[args.sigma], n_problems=args.n_problems, difficulty=args.difficulty,
                    max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    return behaviour.prepare(folder, **{**settings, **overrides})


def run_part(model, tok, arch, plan, keep) -> tuple[Timer, int]:
    plan.conditions = [c for c in plan.conditions if keep(c)]
    with Timer() as t:
        result = behaviour.run_behaviour(model, tok, arch, plan, progress=False)
    return t, sum(r["n_tokens"] for r in result.rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bundled:smollm2-135m")
    p.add_argument("--n-problems", type=int, default=100)
    p.add_argument("--n-random", type=int, default=10)
    p.add_argument("--variants", nargs="+", default=["rank_diff", "balance"])
    p.add_argument("--sigma", type=float, default=1.0)
    p.add_argument("--difficulty", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok, arch = load_model(args.model, device="cpu")
    out = {"model": args.model, "threads": args.threads, **{k: v for k, v in vars(args).items() if k != "json"}}
    folder = Path(tempfile.mkdtemp(prefix="behaviour-bench-"))
    try:
        parts = {"baseline": lambda c: c.kind == "baseline",
                 "one_noise_condition": lambda c: c.kind == "baseline" or c.key.endswith("random:seed=0"),
                 "zero_group": lambda c: c.kind in ("baseline", "random")}
        for name, keep in parts.items():
            sub = folder / name
            synthetic_rankings(sub, arch, args.variants)
            plan = timed_plan(sub, args, perturbations=["zero"] if name == "zero_group" else ["noise"])
            t, tokens = run_part(model, tok, arch, plan, keep)
            out[name] = {"wall_s": round(t.wall, 2), "cpu_s": round(t.cpu, 2), "new_tokens": tokens,
                         "conditions": len(plan.conditions)}
            print(f"{name:22s} {len(plan.conditions):3d} conditions  wall {t.wall:7.2f} s  cpu {t.cpu:7.2f} s  "
                  f"{tokens} new tokens", flush=True)
        sub = folder / "main_job"
        synthetic_rankings(sub, arch, args.variants)
        plan = timed_plan(sub, args)
        t, tokens = run_part(model, tok, arch, plan, lambda c: True)
        out["main_job"] = {"wall_s": round(t.wall, 2), "cpu_s": round(t.cpu, 2), "conditions": len(plan.conditions)}
        print(f"{'main-job section':22s} {len(plan.conditions):3d} conditions  wall {t.wall:7.2f} s  cpu {t.cpu:7.2f} s "
              f"(goal <= 240 s on 2 idle cores)", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
