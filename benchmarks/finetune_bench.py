"""Head-restricted fine-tuning on the bundled SmolLM2-135M: seconds per SFT step and per GRPO step, and the
optimiser memory of training half of the heads vs full fine-tuning.

    python benchmarks/finetune_bench.py [--json PATH] [--model bundled:smollm2-135m] [--steps 3] [--batch-size 8]

SFT step: one MaskedAdamW step on `batch_size` arithmetic problems (prompt through the chat template, loss on the
answer tokens). GRPO step: TRL's GRPOTrainer with `n_generations` completions of up to `max_completion_length`
tokens per prompt. Optimiser memory: AdamW state bytes (exp_avg + exp_avg_sq) after one step, for the masked
optimiser (only the attention tensors that hold a selected head) and for AdamW over every parameter.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lib.experiments import tasks  # noqa: E402
from lib.experiments.finetune.grpo import GRPOSettings, run_grpo  # noqa: E402
from lib.experiments.finetune.masks import MaskedAdamW, head_masks  # noqa: E402
from lib.experiments.finetune.run import sft_examples  # noqa: E402
from lib.experiments.finetune.sft import train_step  # noqa: E402
from lib.model.loading import load_model  # noqa: E402


def adam_state_bytes(optimiser) -> int:
    return sum(t.numel() * t.element_size() for s in optimiser.state.values() for t in s.values() if torch.is_tensor(t))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="bundled:smollm2-135m")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--fraction", type=float, default=0.5)
    ap.add_argument("--grpo-steps", type=int, default=2)
    ap.add_argument("--n-generations", type=int, default=4)
    ap.add_argument("--max-completion-length", type=int, default=32)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model, tokenizer, arch = load_model(args.model)
    heads = sorted(np.random.default_rng(0).permutation(arch.total_heads)[:round(args.fraction * arch.total_heads)])
    problems = tasks.generate_problems(64, split="train", difficulty=2)
    examples = sft_examples(tokenizer, problems, chat_template=bool(getattr(tokenizer, "chat_template", None)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    optimiser = MaskedAdamW(head_masks(arch, [int(h) for h in heads]), lr=1e-5)
    times = []
    with torch.enable_grad():
        for step in range(args.steps + 1):                                   # first step is a warm-up
            t0 = time.perf_counter()
            train_step(model, optimiser, examples, np.arange(step * args.batch_size, (step + 1) * args.batch_size) % 64,
                       1, pad)
            times.append(time.perf_counter() - t0)
    masked_bytes = adam_state_bytes(optimiser)
    optimiser.release()

    for p in model.parameters():
        p.requires_grad_(True)
    full = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model(**{k: v for k, v in _batch(tokenizer, examples[:2]).items()}).loss.backward()
    full.step()
    full_bytes = adam_state_bytes(full)
    del full
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(before[n])
            p.requires_grad_(False)
            p.grad = None

    t0 = time.perf_counter()
    prompts = [tokenizer.decode(tasks.encode_problem(tokenizer, p)) for p in problems[:8]]
    run_grpo(model, tokenizer, arch, [int(h) for h in heads], prompts, [p.answer for p in problems[:8]],
             lambda text, gold: tasks.check_answer(text, gold).correct,
             GRPOSettings(n_steps=args.grpo_steps, n_generations=args.n_generations, batch_size=args.n_generations,
                          max_completion_length=args.max_completion_length))
    grpo_s = (time.perf_counter() - t0) / args.grpo_steps
    figures = {"model": args.model, "threads": torch.get_num_threads(), "heads_trained": len(heads),
               "sft_batch_size": args.batch_size, "sft_step_s": round(float(np.median(times[1:])), 3),
               "sft_step_all_s": [round(t, 3) for t in times[1:]],
               "grpo_step_s (incl. setup, per step)": round(grpo_s, 2), "grpo_n_generations": args.n_generations,
               "grpo_max_completion_length": args.max_completion_length,
               "optimiser_state_mb_masked": round(masked_bytes / 2 ** 20, 1),
               "optimiser_state_mb_full": round(full_bytes / 2 ** 20, 1),
               "optimiser_state_ratio": round(masked_bytes / full_bytes, 3)}
    print(json.dumps(figures, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return 0


def _batch(tokenizer, examples):
    from lib.experiments.finetune.sft import collate
    return collate(examples, tokenizer.pad_token_id or 0, "cpu")


if __name__ == "__main__":
    sys.exit(main())
