"""Benchmark of lib.experiments.interference (QK-OV interference, notebook 07).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/interference_bench.py [--model bundled:smollm2-135m] [--n 32]
        [--methods hooks,vmap,loop] [--json results.json]

1. Per-sample gradients of every attention projection weight for n samples: hooks / vmap / a backward pass per
   sample (loop); wall time and peak resident memory above the level before the phase; agreement with the loop.
2. All scores for n x n samples (every layer, head, block and variant), hooks: time and peak memory.
3. The main job's section (n_main x n_main samples, the notebook defaults for params/smollm2-135m.yaml).
The machine is shared: besides wall time each row reports the process's CPU time (all threads; on an idle
2-core machine wall time is about cpu_seconds / 2) and the load average before the phase.
Samples: the paper's prompts (chat template) + a continuation of --cont-len tokens of paper text (no generation,
so that only the interference computation is timed). Peak memory = max RSS sampled every 5 ms (CPU) or
torch.cuda.max_memory_allocated (GPU).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from lib.experiments import interference as I  # noqa: E402
from lib.model.loading import load_model  # noqa: E402
from lib.model.prompts import all_prompts  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak RSS above the level at entry (sampled in a thread), or CUDA peak allocation."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.005)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes())
        self.delta_mb = (self.peak - self.base) / 2**20


def make_task(tokenizer, name: str, n: int, cont_len: int, offset: int) -> I.TaskSamples:
    prompts = all_prompts()
    filler = tokenizer(" ".join(p.text for p in prompts))["input_ids"]
    samples = []
    for i in range(n):
        p = prompts[(offset + i) % len(prompts)]
        ids = I._prompt_ids(tokenizer, p.text, True)
        start = (7 * (offset + i)) % (len(filler) - cont_len)
        samples.append(I.Sample(f"{name}-{i:03d}", tuple(ids), tuple(filler[start:start + cont_len]), p.text))
    return I.TaskSamples(name, samples, source="benchmark")


def run_phase(phase: str, args) -> dict:
    """One phase in this process (the parent runs each phase in a fresh process so peak memory is its own)."""
    t0 = time.perf_counter()
    model, tok, arch = load_model(args.model)
    load_seconds = time.perf_counter() - t0
    device = next(model.parameters()).device
    n = args.n_main if phase == "main" else args.n
    task_a = make_task(tok, "A", n, args.cont_len, 0)
    task_b = make_task(tok, "B", n, args.cont_len, 30)
    lengths = [len(s.prompt_ids) + len(s.continuation_ids) for s in task_a.samples]
    row = {"phase": phase, "threads": args.threads or torch.get_num_threads(), "samples_per_task": n, "tokens_per_sample": f"{min(lengths)}-{max(lengths)}",
           "load_seconds": load_seconds, "rss_before_mb": rss_bytes() / 2**20}
    cpu0 = time.process_time()
    with PeakMemory(device) as mem:
        t = time.perf_counter()
        if phase.startswith("grads:"):
            method = phase.split(":", 1)[1]
            with I.torch_threads(args.threads):
                g = I.per_sample_gradients(model, arch, task_a, method, args.batch_size)
            row["seconds"] = time.perf_counter() - t
            t = time.perf_counter()
            check = {l: g.layer(l) for l in (0, arch.n_layers - 1)}
            for l in range(1, arch.n_layers - 1):
                g.layer(l)                                  # materialise every layer once, as the scores do
            row["materialise_all_layers_seconds"] = time.perf_counter() - t
            row["stored_mb"] = g.stored_bytes() / 2**20
            if args.check_dir:
                torch.save(check, os.path.join(args.check_dir, f"{method}.pt"))
        else:
            r = I.compute_interference(model, arch, task_a, task_b, method="hooks", batch_size=args.batch_size,
                                       min_samples_for_fisher=min(10, n), num_threads=args.threads, progress=False)
            row["seconds"] = time.perf_counter() - t
            row.update({f"{k}_seconds": v for k, v in r.seconds.items()})
            row["variants"] = len(r.variants)
    row["cpu_seconds"] = time.process_time() - cpu0          # all threads: ~ wall time x cores on an idle machine
    row["peak_mb"] = mem.delta_mb
    row["peak_rss_mb"] = mem.peak / 2**20
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bundled:smollm2-135m")
    ap.add_argument("--n", type=int, default=32, help="samples per task")
    ap.add_argument("--n-main", type=int, default=10, help="samples per task of the main job's section")
    ap.add_argument("--cont-len", type=int, default=100, help="continuation tokens per sample")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads for the gradient passes (0: default)")
    ap.add_argument("--phases", default="grads:hooks,grads:vmap,grads:loop,scores,main",
                    help="comma list from grads:<hooks|vmap|loop>, scores, main")
    ap.add_argument("--json", default="")
    ap.add_argument("--phase", default="", help=argparse.SUPPRESS)          # internal: run one phase, print JSON
    ap.add_argument("--check-dir", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.phase:
        print("RESULT " + json.dumps(run_phase(args.phase, args)), flush=True)
        return 0
    import subprocess
    import tempfile
    rows = []
    check_dir = tempfile.mkdtemp(prefix="interference-bench-")
    base = [sys.executable, __file__, "--model", args.model, "--n", str(args.n), "--n-main", str(args.n_main),
            "--cont-len", str(args.cont_len), "--batch-size", str(args.batch_size), "--threads", str(args.threads),
            "--check-dir", check_dir]
    for phase in args.phases.split(","):
        load = os.getloadavg()[0]
        proc = subprocess.run(base + ["--phase", phase], capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"phase {phase} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            return 1
        row = json.loads(lines[-1][7:])
        row["load_average_before"] = load
        rows.append(row)
        print(row, flush=True)
    done = {r["phase"].split(":", 1)[1] for r in rows if r["phase"].startswith("grads:")}
    if "loop" in done:
        ref = torch.load(os.path.join(check_dir, "loop.pt"))
        for row in rows:
            method = row["phase"].split(":", 1)[-1]
            if row["phase"].startswith("grads:") and method != "loop":
                got = torch.load(os.path.join(check_dir, f"{method}.pt"))
                row["max_rel_diff_vs_loop"] = max(float((got[l][k] - ref[l][k]).abs().max() / ref[l][k].abs().max())
                                                  for l in ref for k in ref[l])
    print(f"\n{args.model}, {args.threads or torch.get_num_threads()} threads for gradients, batch {args.batch_size}, "
          f"continuations of {args.cont_len} tokens")
    print(f"{'phase':12s} {'n/task':>6s} {'tokens':>8s} {'seconds':>8s} {'peak MB':>8s} {'load':>5s}  extra")
    for row in rows:
        extra = {k: (float(f"{v:.3g}") if isinstance(v, float) else v) for k, v in row.items()
                 if k not in ("phase", "threads", "samples_per_task", "tokens_per_sample", "seconds", "peak_mb",
                              "load_average_before", "rss_before_mb", "peak_rss_mb")}
        print(f"{row['phase']:12s} {row['samples_per_task']:6d} {row['tokens_per_sample']:>8s} {row['seconds']:8.1f} "
              f"{row['peak_mb']:8.0f} {row['load_average_before']:5.1f}  {extra}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "threads": torch.get_num_threads(), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
