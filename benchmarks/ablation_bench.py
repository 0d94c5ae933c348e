"""Ablation throughput and the main-job ablation section (notebook 05) on a real model.

    .venv/bin/python benchmarks/ablation_bench.py --data /tmp/abl/smol [--full] [--json out.json]

--data: a folder with activations.npz (+ rankings.csv); when activations.npz is missing it is produced here with
lib.experiments.extract (greedy, chat template, lib.model.prompts.select_prompts(n_prompts)) and a synthetic rankings.csv (seeded
uniform scores, column `rank_diff`) is written when rankings.csv is missing.

Figures (tokens = prompt + teacher-forced generated tokens, i.e. the real, unpadded input tokens):
- plain forward: the full model, no hooks, logits of the last position only, on the same rows (orderings x
  prompts) and the same batches as the ablation;
- ablation: one point (n_orderings distinct head masks x prompts): masked body + unembedding of the T predicting
  positions + KL against the cached clean model; its ratio to the plain forward (goal >= 0.75);
- breakdown: masked body alone, and unembedding + KL alone;
- --full: the main-job section (step_size, 5 random + ranking + reverse) end to end, wall and CPU time.
Both wall time and process CPU time are printed: on a machine shared with other jobs, CPU time / threads is the
better estimate of the unloaded wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lib.experiments import ablation as A
from lib.experiments.extract import extract_activations, left_pad
from lib.model.loading import load_model
from lib.model.prompts import select_prompts
from lib.storage.store import save_npz
from timing import Timer, best_of  # noqa: E402  (benchmarks/timing.py)


def ensure_data(folder: Path, model, tokenizer, arch, n_prompts: int, chat_template: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "activations.npz").exists():
        print(f"[bench] generating greedy tokens for {n_prompts} prompts into {folder}", file=sys.stderr)
        run = extract_activations(model, tokenizer, arch, select_prompts(n_prompts), n_tokens=100,
                                  chat_template=chat_template, progress=False)
        save_npz(folder / "activations.npz", **run.to_arrays())
    if not (folder / "rankings.csv").exists():
        layer, head = arch.head_map()
        rng = np.random.default_rng(0)
        pd.DataFrame({"head_idx": np.arange(arch.total_heads), "layer": layer, "head": head,
                      "rank_diff": rng.random(arch.total_heads)}).to_csv(folder / "rankings.csv", index=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bundled:smollm2-135m")
    ap.add_argument("--data", default="/tmp/ablation_bench", help="folder with activations.npz / rankings.csv")
    ap.add_argument("--n-prompts", type=int, default=12)
    ap.add_argument("--n-random", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32, help="rows per forward pass")
    ap.add_argument("--logit-chunk-mb", type=float, default=32.0)
    ap.add_argument("--step-size", type=int, default=9, help="main-job points: 270 heads / 9 = 31 points")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default). On a shared machine "
                    "1 thread gives a CPU time free of OpenMP spin-waiting; unloaded 2-core wall ~ that / 2")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--full", action="store_true", help="also time the whole main-job section")
    ap.add_argument("--json", help="write the figures to this JSON file")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, arch = load_model(args.model, dtype=args.dtype)
    data = Path(args.data)
    ensure_data(data, model, tokenizer, arch, args.n_prompts, chat_template=args.model.startswith("bundled:"))
    inputs, plan = A.prepare(data, model=args.model, variants=["rank_diff"], n_random=args.n_random,
                             step_size=args.step_size, n_prompts=args.n_prompts)
    engine = A.DivergenceEngine(model, arch, inputs, batch_size=args.batch_size, logit_chunk_mb=args.logit_chunk_mb)
    prompts = list(range(len(inputs.prompts)))
    n_orderings = len(plan.orderings)
    mid = len(plan.n_removed) // 2
    masks, _ = A.removal_masks(plan, plan.groups()[0], mid)                 # distinct masks at a middle point
    rows = engine._rows(prompts, len(masks))
    tokens = sum(len(engine.seqs[p]) for _, p in rows)
    padded = sum(len(engine.seqs[batch[-1][1]]) * len(batch)
                 for batch in (rows[s:s + args.batch_size] for s in range(0, len(rows), args.batch_size)))

    def plain():
        with torch.inference_mode():
            for s in range(0, len(rows), args.batch_size):
                batch = rows[s:s + args.batch_size]
                ids, attn = left_pad([engine.seqs[p].tolist() for _, p in batch], inputs.pad_token_id)
                pos = (attn.cumsum(-1) - 1).clamp(min=0)
                model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False, logits_to_keep=1)

    clean = engine.clean(prompts)
    body = lambda: [None for _ in engine.hidden_chunks(prompts, masks)]
    hidden = [(b, h.clone()) for b, h in engine.hidden_chunks(prompts, masks)]

    def unembed_kl():
        with torch.inference_mode():
            for batch, h in hidden:
                z = engine.logits(h)
                engine._exp_lse(z)

    t_plain = best_of(plain, args.repeats)
    t_abl = best_of(lambda: engine.divergence(prompts, masks, clean), args.repeats)
    t_body = best_of(body, args.repeats)
    t_kl = best_of(unembed_kl, args.repeats)
    threads = torch.get_num_threads()
    figures = {
        "model": args.model, "dtype": args.dtype, "prompts": len(prompts), "distinct_masks": len(masks), "rows": len(rows),
        "tokens_per_point": tokens, "padded_tokens_per_point": padded, "batch_size": args.batch_size,
        "threads": threads, "method": engine.method, "logit_rows": engine.logit_rows,
        "plain_wall_s": t_plain.wall, "plain_cpu_s": t_plain.cpu,
        "ablation_wall_s": t_abl.wall, "ablation_cpu_s": t_abl.cpu,
        "body_cpu_s": t_body.cpu, "unembed_kl_cpu_s": t_kl.cpu,
        "plain_tok_s_cpu": tokens / (t_plain.cpu / threads), "ablation_tok_s_cpu": tokens / (t_abl.cpu / threads),
        "plain_tok_s_wall": tokens / t_plain.wall, "ablation_tok_s_wall": tokens / t_abl.wall,
        "ratio_cpu": t_plain.cpu / t_abl.cpu, "ratio_wall": t_plain.wall / t_abl.wall,
    }
    if args.full:
        with tempfile.TemporaryDirectory() as tmp:
            for name in ("activations.npz", "rankings.csv"):
                shutil.copy(data / name, Path(tmp) / name)
            inputs_f, plan_f = A.prepare(tmp, model=args.model, variants=["rank_diff"], n_random=args.n_random,
                                         step_size=args.step_size, n_prompts=args.n_prompts)
            with Timer() as t_full:
                result = A.run_ablation(model, arch, inputs_f, plan_f, batch_size=args.batch_size,
                                        logit_chunk_mb=args.logit_chunk_mb, progress=False)
        figures.update(full_points=len(plan_f.n_removed), full_orderings=len(plan_f.orderings),
                       full_wall_s=t_full.wall, full_cpu_s=t_full.cpu,
                       full_kl_at_all_removed=float(result.kl[:, -1].mean()))
    width = max(len(k) for k in figures)
    for k, v in figures.items():
        print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
