"""Extraction benchmarks on the bundled SmolLM2-135M (2 CPU cores here; reports whatever device is used).

    python benchmarks/extract_bench.py [--json PATH] [--prompts 60] [--tokens 100]

Measures: (1) model load from the float32 cache (after the first conversion), (2) extraction of all prompts x
tokens batched with the head hook, (3) hook overhead: the same batched generation with and without the hook,
(4) single-stream generation speed (tokens/s of one prompt), for the batching speed-up.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lib.experiments.extract import encode_prompts, generate_batch  # noqa: E402
from lib.model.bundled import prepare_bundled  # noqa: E402
from lib.model.loading import load_model
from lib.model.prompts import select_prompts  # noqa: E402


def timed(fn, repeats=1):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), times


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=60)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    prepare_bundled("smollm2-135m")
    load_s, load_all = timed(lambda: load_model("bundled:smollm2-135m"), repeats=3)
    model, tokenizer, arch = load_model("bundled:smollm2-135m")
    encoded = encode_prompts(tokenizer, [p.text for p in select_prompts(args.prompts)], chat_template=True)
    pad = tokenizer.pad_token_id
    generate_batch(model, arch, encoded[:4], 4, pad)                                     # warm-up
    with_hook, with_all = timed(lambda: generate_batch(model, arch, encoded, args.tokens, pad, record=True), args.repeats)
    without, without_all = timed(lambda: generate_batch(model, arch, encoded, args.tokens, pad, record=False), args.repeats)
    single_tokens = 30
    single, _ = timed(lambda: generate_batch(model, arch, encoded[:1], single_tokens, pad, record=True))
    single_tok_s = single_tokens / single
    results = {
        "device": str(next(model.parameters()).device), "threads": torch.get_num_threads(),
        "model_load_s": round(load_s, 3), "model_load_all_s": [round(t, 3) for t in load_all],
        "extraction_s": round(with_hook, 2), "extraction_all_s": [round(t, 2) for t in with_all],
        "plain_generation_s": round(without, 2), "plain_all_s": [round(t, 2) for t in without_all],
        "hook_overhead_pct": round(100 * (with_hook / without - 1), 1),
        "single_stream_tok_s": round(single_tok_s, 1),
        "single_stream_estimate_s": round(args.prompts * args.tokens / single_tok_s, 1),
        "batching_speedup": round(args.prompts * args.tokens / single_tok_s / with_hook, 1),
        "prompts": args.prompts, "tokens": args.tokens,
    }
    width = max(map(len, results))
    for k, v in results.items():
        print(f"{k:<{width}}  {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
