"""Benchmark: total effects of many MLP neurons, batched last-position-only with the clean KV cache, vs the naive
plan (one whole-prompt forward through all layers per neuron and prompt, injection by hook).

    python benchmarks/neurons_bench.py                       # 1,024 neurons x 8 prompts on SmolLM2
    python benchmarks/neurons_bench.py --naive-neurons 16 --json /tmp/neurons_bench.json
    python benchmarks/neurons_bench.py --section             # also time the main-job section end to end

The naive plan is timed on a subset (--naive-neurons neurons x all prompts) and extrapolated linearly (each of
its forwards costs the same); the same subset gives the max |difference| between the two plans over the whole
vocabulary. Also timed: the fast path without skipping the lower blocks, whole-prompt forwards batched over
neurons (to separate the gain of batching from the gain of computing one position), and the full per-row pipeline
(total + direct + metrics). Wall-clock and process CPU times are both reported: on a shared machine the CPU time
(with --threads 1) is the steadier measure of the work.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lib.experiments import neurons as N  # noqa: E402
from lib.model.loading import load_model  # noqa: E402


def _fast_totals(model, arch, clean, neurons, dirs, scale, batch_size, skip, keep: set[int]):
    """Time the fast path over all (neuron, prompt); return seconds and the effects of rows in `keep`."""
    layers = torch.tensor([n.layer for n in neurons])
    kept = {}
    t0, c0 = time.perf_counter(), time.process_time()
    for p in range(clean.resid.shape[0]):
        vec = dirs * scale[:, p, None].to(dirs.dtype)
        for s in range(0, len(neurons), batch_size - 1):
            e = min(s + batch_size - 1, len(neurons))
            vb = torch.cat([torch.zeros_like(vec[:1]), vec[s:e]])
            lb = torch.cat([layers[s:e].min()[None], layers[s:e]])
            logits = N.total_logits_incremental(model, arch, clean, p, lb, vb, skip)
            for j in range(s, e):
                if j in keep:
                    kept[(j, p)] = logits[j - s + 1] - logits[0]
    return time.perf_counter() - t0, time.process_time() - c0, kept


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bundled:smollm2-135m")
    ap.add_argument("--n-neurons", type=int, default=1024)
    ap.add_argument("--n-prompts", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--naive-neurons", type=int, default=16, help="neurons (x all prompts) timed for the naive plan")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    ap.add_argument("--skip-compare", action="store_true", help="only time the fast path")
    ap.add_argument("--section", action="store_true", help="also time prepare + run + verify of the main-job section")
    ap.add_argument("--section-neurons", type=int, default=256)
    ap.add_argument("--section-prompts", type=int, default=12)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    res = {"model": args.model, "n_neurons": args.n_neurons, "n_prompts": args.n_prompts,
           "batch_size": args.batch_size, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "load_average_at_start": os.getloadavg()[0]}

    t0 = time.perf_counter()
    model, tokenizer, arch = load_model(args.model)
    res["load_s"] = time.perf_counter() - t0
    prompts = N.load_prompts(tempfile.mkdtemp(), tokenizer, arch, args.n_prompts, chat_template=True)
    res["prompt_tokens"] = [len(i) for i in prompts.input_ids]
    t0 = time.perf_counter()
    clean = N.clean_pass(model, arch, prompts)
    res["clean_pass_s"] = time.perf_counter() - t0
    neurons = N.select_neurons(arch, "random", args.n_neurons, seed=0)
    dirs = N.neuron_directions(arch, neurons)
    _, scale = N.neuron_scales(clean, neurons, "actual")
    subset = [int(i) for i in np.linspace(0, len(neurons) - 1, args.naive_neurons).round()]

    res["fast_s"], res["fast_cpu_s"], fast = _fast_totals(model, arch, clean, neurons, dirs, scale, args.batch_size,
                                                          True, set(subset))
    res["fast_no_skip_s"], res["fast_no_skip_cpu_s"], _ = _fast_totals(model, arch, clean, neurons, dirs, scale,
                                                                       args.batch_size, False, set())
    rows = len(neurons) * len(prompts)
    res["fast_ms_per_row"] = 1000 * res["fast_s"] / rows

    # full pipeline per row: total + direct + all metrics (what notebook 06 runs), no checkpoint files
    with tempfile.TemporaryDirectory() as tmp:
        setup = N.prepare(model, tokenizer, arch, out_dir=tmp, n_prompts=args.n_prompts, neurons=[n.id for n in neurons],
                          batch_size=args.batch_size, progress=False)
        t0, c0 = time.perf_counter(), time.process_time()
        N.compute_effects(setup, setup.neurons, None, progress=False)
        res["pipeline_s"], res["pipeline_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0

    if not args.skip_compare:
        # naive: one whole-prompt, all-layer forward per (neuron, prompt), plus one clean forward per prompt
        t0, c0 = time.perf_counter(), time.process_time()
        naive, clean_full = {}, {}
        for p in range(len(prompts)):
            ids = prompts.input_ids[p]
            clean_full[p] = N.total_logits_full(model, arch, ids, torch.tensor([0]), torch.zeros_like(dirs[:1]))[0]
            for j in subset:
                v = (dirs[j] * scale[j, p].to(dirs.dtype))[None]
                naive[(j, p)] = N.total_logits_full(model, arch, ids, torch.tensor([neurons[j].layer]), v)[0] - clean_full[p]
        sub_s, sub_cpu = time.perf_counter() - t0, time.process_time() - c0
        res["naive_subset_forwards"] = len(subset) * len(prompts)
        res["naive_subset_s"] = sub_s
        res["naive_extrapolated_s"] = sub_s * len(neurons) / len(subset)
        res["naive_extrapolated_cpu_s"] = sub_cpu * len(neurons) / len(subset)
        res["speedup_vs_naive"] = res["naive_extrapolated_s"] / res["fast_s"]
        res["speedup_vs_naive_cpu"] = res["naive_extrapolated_cpu_s"] / res["fast_cpu_s"]
        diffs = [float((fast[k] - naive[k]).abs().max()) for k in naive]
        res["max_abs_diff_fast_vs_naive"] = max(diffs)
        res["max_abs_total_effect_in_subset"] = max(float(naive[k].abs().max()) for k in naive)
        # whole prompt, all layers, but batched over neurons (rows = neurons, each its own injection)
        t0 = time.perf_counter()
        sub_layers = torch.tensor([neurons[j].layer for j in subset])
        for p in range(len(prompts)):
            vec = dirs[subset] * scale[subset, p, None].to(dirs.dtype)
            N.total_logits_full(model, arch, prompts.input_ids[p], sub_layers, vec)
        res["batched_full_prompt_extrapolated_s"] = (time.perf_counter() - t0) * len(neurons) / len(subset)

    if args.section:
        with tempfile.TemporaryDirectory() as tmp:
            t0, c0 = time.perf_counter(), time.process_time()
            setup = N.prepare(model, tokenizer, arch, out_dir=tmp, n_prompts=args.section_prompts,
                              n_neurons=args.section_neurons, batch_size=args.batch_size, progress=False)
            result = N.run(setup, progress=False)
            check = N.verify(setup)
            res["section"] = {"n_neurons": args.section_neurons, "n_prompts": args.section_prompts,
                              "prepare_run_verify_s": time.perf_counter() - t0,
                              "prepare_run_verify_cpu_s": time.process_time() - c0, "run_s": result.seconds,
                              "check_ok": bool(check["ok"].all()),
                              "check_max_diff_total": float(check["batched_vs_full_max_abs_diff"].max()),
                              "check_max_diff_direct": float(check["algebraic_vs_frozen_max_abs_diff"].max())}

    width = max(map(len, res))
    res["load_average_at_end"] = os.getloadavg()[0]
    for k, v in res.items():
        print(f"{k:<{width}}  {json.dumps(v) if not isinstance(v, float) else f'{v:.6g}'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
