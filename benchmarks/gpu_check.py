"""Check every engine on a device against the CPU in float32; print timings and peak memory. Run this first on a
GPU node (before a cluster run):

    .venv/bin/python benchmarks/gpu_check.py --device cuda [--model random:llama] [--dtype bfloat16]
    .venv/bin/python benchmarks/gpu_check.py --device cpu --dtype bfloat16        # the bfloat16 path on CPU

Engines: extraction (greedy generation with the head hook; head norms and tokens), ablation (DivergenceEngine KL
for two head masks), PhiID (torch backend, float64, on the device the backend picks: cuda when available, against
the numpy backend). Each line: engine, max relative difference to the CPU float32 reference, the tolerance it is
held to, seconds on the device and on the CPU, peak memory on the device (CUDA: torch.cuda.max_memory_allocated;
CPU: the process's peak resident set). Exit status 1 when an engine is outside its tolerance.

--save-rate PATH also measures the forward throughput of --model on the device in --dtype (FLOP/s = 2 x parameters
x tokens / seconds, the best of a few timed batched forwards after a warm-up), the one-token forward latency, and
this machine's fixed cost of one notebook (notebook_fixed_s: an import-only notebook through papermill and the HTML
export; base_rss_gib: its kernel's resident set) and writes them as JSON; the cost
estimate of `python -m lib.run --check` and `slurm/pipeline.sh --dry-run` reads slurm/rate.json (or $HEADINFO_RATE).
Measure with the run's model on the cluster's GPU:

    .venv/bin/python benchmarks/gpu_check.py --device cuda --dtype bfloat16 --model google/gemma-3-4b-it \
        --save-rate slurm/rate.json
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lib.experiments import ablation as A
from lib.experiments.extract import extract_activations
from lib.model.architectures import arch_info
from lib.model.loading import load_model, resolve_device, resolve_dtype
from lib.estimators.phiid import phiid_all_pairs
from lib.model.prompts import select_prompts

# float32 on another device: summation order only; bfloat16: ~3 significant digits (see tests/test_dtypes.py)
TOLERANCE = {"float32": {"extract": 1e-3, "ablation": 1e-3}, "bfloat16": {"extract": 3e-2, "ablation": 1e-1},
             "float16": {"extract": 1e-2, "ablation": 5e-2}}
PHIID_TOLERANCE = 1e-7                # float64 on both sides


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024          # Linux: kilobytes


def timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0


def relative(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b| (relative to the reference's scale, so values near 0 do not dominate)."""
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def ablation_inputs(run, model_spec: str) -> A.AblationInputs:
    """The engine's inputs straight from an extraction run (no run folder)."""
    prompts = [ids[-n:] for ids, n in zip(run.prompt_input_ids, run.prompt_lengths)]
    return A.AblationInputs(out_dir=Path("."), model=model_spec, prompts=prompts, tokens=run.tokens,
                            prompt_ids=np.array([p.prompt_id for p in run.prompts]),
                            prompt_category=np.array([p.category for p in run.prompts]), rankings=pd.DataFrame(),
                            total_heads=run.activations.shape[1], n_heads=run.n_heads,
                            pad_token_id=run.pad_token_id, tokens_checksum="")


def kl(model, arch, inputs) -> np.ndarray:
    masks = torch.ones(2, arch.total_heads)
    masks[0, [1, arch.n_heads + 1]] = 0.0
    masks[1, ::2] = 0.0
    engine = A.DivergenceEngine(model, arch, inputs, batch_size=8)
    prompts = list(range(len(inputs.prompts)))
    return engine.divergence(prompts, masks, engine.clean(prompts))


def check(args) -> list[dict]:
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    model, tokenizer, arch = load_model(args.model, device="cpu")
    other = copy.deepcopy(model).to(device=device, dtype=dtype)
    other_arch = arch_info(other, source=args.model)
    prompts = select_prompts(args.n_prompts)
    extract = lambda m, a: extract_activations(m, tokenizer, a, prompts, n_tokens=args.n_tokens,
                                               batch_size=args.n_prompts, progress=False)
    ref_run, cpu_s = timed(lambda: extract(model, arch), torch.device("cpu"))
    run, dev_s = timed(lambda: extract(other, other_arch), device)
    same = run.tokens == ref_run.tokens
    rows = [dict(engine="extract", max_rel_diff=relative(run.activations[same.all(1)], ref_run.activations[same.all(1)]),
                 tolerance=TOLERANCE[args.dtype]["extract"], same_tokens=f"{same.mean():.0%}", device_s=dev_s,
                 cpu_s=cpu_s, peak_mb=peak_memory_mb(device))]
    inputs = ablation_inputs(ref_run, args.model)
    ref_kl, cpu_s = timed(lambda: kl(model, arch, inputs), torch.device("cpu"))
    dev_kl, dev_s = timed(lambda: kl(other, other_arch, inputs), device)
    rows.append(dict(engine="ablation", max_rel_diff=relative(dev_kl, ref_kl), tolerance=TOLERANCE[args.dtype]["ablation"],
                     device_s=dev_s, cpu_s=cpu_s, peak_mb=peak_memory_mb(device)))
    X = ref_run.activations[:, : args.phiid_heads]
    ref_phi, cpu_s = timed(lambda: phiid_all_pairs(X, backend="numpy", warn=False), torch.device("cpu"))
    phi, dev_s = timed(lambda: phiid_all_pairs(X, backend="torch", warn=False), device)
    rows.append(dict(engine=f"phiid torch ({'cuda' if torch.cuda.is_available() else 'cpu'})",
                     max_rel_diff=relative(np.nan_to_num(phi["sts"]), np.nan_to_num(ref_phi["sts"])),
                     tolerance=PHIID_TOLERANCE, device_s=dev_s, cpu_s=cpu_s, peak_mb=peak_memory_mb(device)))
    return rows


def forward_rate(model, device: torch.device, rows: int, seq_len: int, repeats: int = 3) -> dict:
    """Measured forward throughput of `model` on [rows, seq_len] random token ids: FLOP/s = 2 x n_params x
    rows x seq_len / seconds (fastest of `repeats` timed forwards after one warm-up), and forward_latency_s: the
    fastest of 3 x `repeats` forwards of one token (the fixed cost of a forward call, lib.cost.gpu_hours)."""
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (rows, seq_len), device=device)
    one = ids[:1, :1]
    with torch.inference_mode():
        model(input_ids=ids)
        seconds = min(timed(lambda: model(input_ids=ids), device)[1] for _ in range(repeats))
        model(input_ids=one)
        latency = min(timed(lambda: model(input_ids=one), device)[1] for _ in range(3 * repeats))
    return {"flop_per_s": 2 * n_params * rows * seq_len / seconds, "n_params": n_params, "tokens": rows * seq_len,
            "seconds": seconds, "forward_latency_s": latency}


OVERHEAD_CELL = """import resource, time
import matplotlib.pyplot as plt, numpy as np, pandas as pd, torch, transformers
import lib.experiments.extract, lib.experiments.ablation, lib.estimators.phiid, lib.plots, lib.storage
fig, ax = plt.subplots(); ax.plot(np.arange(10), np.arange(10), marker="o"); ax.set_xlabel("x"); plt.show()
print("RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"""


def notebook_overhead(kernel: str = "python3") -> dict:
    """The fixed cost of one notebook on this machine, as lib.run pays it: a one-cell notebook (the notebooks'
    imports and one figure) executed by papermill in a fresh kernel and exported to HTML without code ->
    {"notebook_fixed_s": wall seconds, "base_rss_gib": the kernel's peak resident set after the imports}."""
    import tempfile

    import nbformat
    import papermill as pm
    from nbconvert import HTMLExporter
    with tempfile.TemporaryDirectory(prefix="overhead-") as tmp:
        src, out = Path(tmp) / "in.ipynb", Path(tmp) / "out.ipynb"
        nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(OVERHEAD_CELL)]), src)
        t0 = time.perf_counter()
        pm.execute_notebook(str(src), str(out), kernel_name=kernel, progress_bar=False, cwd=str(Path.cwd()))
        nb = nbformat.read(out, as_version=4)
        HTMLExporter(exclude_input=True).from_notebook_node(nb)
        seconds = time.perf_counter() - t0
    text = "".join(o.get("text", "") for o in nb.cells[0].outputs if o.get("output_type") == "stream")
    rss_kb = int(text.split("RSS_KB")[1].split()[0])
    return {"notebook_fixed_s": seconds, "base_rss_gib": rss_kb / 2 ** 20}


def save_rate(args, path: Path) -> dict:
    """forward_rate of --model on --device in --dtype, written to `path` as JSON (device name, dtype, date)."""
    device = resolve_device(args.device)
    model, _, _ = load_model(args.model, dtype=args.dtype, device=str(device))
    rate = forward_rate(model, device, args.rate_rows, args.rate_seq_len)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    rate.update(notebook_overhead())                      # host side: fixed seconds and base RSS of a notebook
    rate.update(device=name, dtype=args.dtype, model=args.model, date=time.strftime("%Y-%m-%d"),
                torch=torch.__version__)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(rate, indent=1) + "\n")
    tmp.replace(path)
    return rate


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cpu | cuda | cuda:N (default cuda)")
    parser.add_argument("--dtype", default="float32", choices=sorted(TOLERANCE))
    parser.add_argument("--model", default="random:llama", help="model spec (default random:llama)")
    parser.add_argument("--n-prompts", type=int, default=4)
    parser.add_argument("--n-tokens", type=int, default=20, help="generated tokens (>= 6 for PhiID)")
    parser.add_argument("--phiid-heads", type=int, default=16, help="heads in the PhiID check")
    parser.add_argument("--save-rate", type=Path, default=None, metavar="PATH",
                        help="also measure the forward FLOP/s of --model and write it as JSON (slurm/rate.json)")
    parser.add_argument("--rate-rows", type=int, default=16, help="batch rows of the rate measurement")
    parser.add_argument("--rate-seq-len", type=int, default=256, help="tokens per row of the rate measurement")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {args.device} but torch.cuda.is_available() is False (torch {torch.__version__}); "
              f"run on a GPU node with a CUDA build of torch, or use --device cpu", file=sys.stderr)
        return 2
    print(f"[gpu_check] {args.model} on {args.device} ({args.dtype}) against cpu float32; torch {torch.__version__}")
    rows = check(args)
    table = pd.DataFrame(rows)
    table["ok"] = table.max_rel_diff <= table.tolerance
    with pd.option_context("display.width", 200, "display.float_format", "{:.3g}".format):
        print(table.to_string(index=False))
    if args.save_rate:
        rate = save_rate(args, args.save_rate)
        print(f"[gpu_check] forward rate {rate['flop_per_s']:.3g} FLOP/s on {rate['device']} ({args.dtype}, "
              f"{rate['tokens']} tokens in {rate['seconds']:.3g} s) -> {args.save_rate}")
    return 0 if table.ok.all() else 1


if __name__ == "__main__":
    sys.exit(main())
