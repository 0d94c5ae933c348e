"""Cost estimate of a run before it is submitted: per notebook, model forwards, forward tokens, GPU-hours and peak
memory; PhiID pair evaluations for the CPU notebooks.

    python -m lib.run --params P --check       (and slurm/pipeline.sh P --dry-run) print cost_table(steps)

Counts come from each notebook's parameters (declared defaults filled in) and the library's own planning
(lib.experiments.ablation.make_points, the condition lists of lib.experiments.behaviour and lib.experiments.finetune.run). Tokens are forward-token
equivalents: a backward pass counts as two forwards. Approximations, stated where they are made:
  - a prompt (a paper prompt or a task problem, chat template included) is PROMPT_TOKENS tokens long;
  - FLOP per forward token = 2 x n_params (every stored weight, embeddings and a vision tower included; attention
    over the context is not counted);
  - peak memory = weights (n_params x dtype bytes) + the K and V of every layer for the longest sequence of one
    batch; activations, gradients and optimiser states are not counted.
GPU-hours need a measured forward throughput: benchmarks/gpu_check.py --save-rate slurm/rate.json on a GPU node
writes it; the file named by $HEADINFO_RATE, else slurm/rate.json, is read. Time = tokens x 2 n_params / the
measured FLOP/s + forwards x the measured latency of a one-token forward (forward_latency_s in the rate file, when
present): greedy steps of one token per row are latency-bound, not FLOP-bound.

Host side (the machine a notebook's kernel runs on), from the same rate file or, without one, DEFAULT_CALIBRATION:
  - seconds = notebook_fixed_s (kernel start, imports, a random model loaded and run once, figures, the HTML report:
    measured by benchmarks/gpu_check.py notebook_overhead as such a notebook run through papermill and exported)
    + the forward time above + the notebook's CPU work: its units (Work.host: PhiID pair-segments of the three
    kernels, local pair-samples, graph node x edge passes, null and Louvain pairs) x the seconds per unit in
    HOST_UNITS (measured by gpu_check host_rates on small inputs; one core; MMI redundancy);
  - host GiB = the kernel's resident set after its imports (base_rss_gib; model_rss_gib for a notebook that runs
    the model on the CPU: the same kernel after a small model's load and forward) + the notebook's large arrays
    (host_arrays_gib: pair tables, 03's heads^2 + resamples x heads bootstrap, 04's per-job pair x sample arrays
    x n_jobs, 08's networks) + weights and K/V when the model runs on the CPU.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from lib import REPO_ROOT
from lib.pipeline import stages
from lib.storage.notebooks import NB

__all__ = ["Work", "NO_RATE", "HOST_UNITS", "DEFAULT_CALIBRATION", "calibration", "host_rates", "host_seconds", "gpu_hours",
           "host_gib", "PROMPT_TOKENS", "RATE_ENV", "read_rate", "estimates", "cost_table", "extraction",
           "phiid", "diagnostics", "ranking", "ablation", "neurons", "interference", "topology", "behaviour",
           "finetune", "local"]

PROMPT_TOKENS = 64                    # approximate prompt length in tokens (chat template included)
N_CATEGORIES = 6                      # prompt categories of lib.model.prompts (07 takes the prompts of two of them)
RATE_FILE = REPO_ROOT / "slurm" / "rate.json"
RATE_ENV = "HEADINFO_RATE"
GPU_NOTEBOOKS = stages.gpu_stages()          # declared device "GPU" (lib/pipeline/stages.py): slurm/pipeline.sh's GPU jobs
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Seconds per unit of a notebook's CPU work (Work.host), by unit: what one unit is. Measured by
# benchmarks/gpu_check.py host_rates (CPU seconds of the timed call, all its threads: the wall time on one core).
HOST_UNITS = {
    "phiid_pair_s": "one head pair in one segment of lib.estimators.phiid.phiid_all_pairs (16 MMI atoms; 02)",
    "phiid_file_pair_s": "one head pair of one (mode, file) table of 02 written, read back and drawn as heatmaps",
    "fast_pair_s": "one head pair in one segment of phiid_fast_stats (MMI sts, rtr, TDMI; 03's C1, 04, 08)",
    "local_pair_s": "one head pair in one segment of phiid_local_head_means (its geometry; 11)",
    "local_sample_s": "one head pair x one sample of phiid_local_head_means (the local values; 11)",
    "efficiency_s": "one node x one edge of a global efficiency (Dijkstra from every node; 08)",
    "null_s": "one head pair of a strength-preserving null network (lib.estimators.networks.strength_null; 08)",
    "louvain_s": "one head pair x one Louvain run (lib.estimators.louvain.louvain_batch; 08)",
}
# Without a calibration: this 2-core development machine. notebook_fixed_s IDLE (a notebook of the tiny run doing
# almost no work took 5.2-7.5 s at load ~1: PhiID, diagnostics); base_rss_gib: the cluster layouts'
# CPU-notebook kernels (0.49-0.60 GiB, 02-08 on the Pythia layout), model_rss_gib: their model notebooks' (0.67-0.91);
# the units' seconds: gpu_check host_rates (see HOST_UNITS; 512 heads x 6 prompts x 9 steps, a 640-node network)
# as CPU seconds, December 4 at load 1.2 (a second measurement at load 8 within 25%, local_sample_s within 70%: it
# is small beside local_pair_s at these lengths). Under load the fixed term grows several-fold (34 s at load ~10):
# calibrate on the machine that runs (gpu_check --save-rate).
DEFAULT_CALIBRATION = {"notebook_fixed_s": 7.0, "base_rss_gib": 0.5, "model_rss_gib": 0.68,
                       "phiid_pair_s": 3.2e-7, "phiid_file_pair_s": 2.4e-6, "fast_pair_s": 1.3e-7, "local_pair_s": 1.13e-6,
                       "local_sample_s": 7.3e-10, "efficiency_s": 1.9e-9, "null_s": 1.4e-7, "louvain_s": 2.2e-8}
PAIR_ROW_BYTES = 128                  # one head pair's row in a PhiID table: ~16 float64 columns (atoms, i, j, ...)
ATOMS = 16                            # PhiID atoms: a phiid file holds one float64 [heads, heads] array of each
PAIR_BOOT = 500                       # lib.diagnostics.pair_bootstrap_correlation's default n_boot (notebook 03)
BOOT_ARRAYS = (5, 3)                  # its peak: ~5 float64 [heads, heads] + ~3 [n_boot, heads] (tracemalloc fit at
                                      # 96 and 192 heads; tests/test_cost.py checks 256)
PAIR_SAMPLE_ARRAYS = 8                # 04: float64 [pairs, samples] arrays one surrogate job holds (fitted to the
                                      # Qwen3-8B layout's 2.5 GiB peak, benchmarks/RESULTS.md)
NO_RATE = "GPU-hours: no measured rate (run benchmarks/gpu_check.py --save-rate slurm/rate.json on a GPU node)"


@dataclass
class Work:
    """What one notebook computes: model forwards, forward-token equivalents, PhiID pair evaluations, the
    largest batch (rows x sequence length in tokens) that sizes the K/V memory, and its CPU work in HOST_UNITS."""
    forwards: int = 0
    tokens: int = 0
    pairs: int = 0
    batch_rows: int = 0
    seq_len: int = 0
    host: dict = field(default_factory=dict)     # CPU work: HOST_UNITS name -> number of units


# ----------------------------------------------------------------------------- per-notebook counts

def _batches(rows: int, batch_size: int) -> int:
    return math.ceil(rows / max(1, int(batch_size))) if rows else 0


def _pairs(dims) -> int | None:
    """Head pairs of one PhiID evaluation over all heads: H (H - 1) / 2."""
    return None if dims is None else dims.total_heads * (dims.total_heads - 1) // 2


def _extract_models(p01: dict) -> int:
    """Models notebook 01 extracts: the run's model, its random-init copy, each revision."""
    return 1 + bool(p01.get("baseline_random_init")) + len(p01.get("revisions") or [])


def extraction(p: dict, run: dict, dims) -> Work:
    """01: greedy generation with a KV cache, n_tokens steps per batch (prefill + one token per step), for every
    extracted model, plus n_single_check prompts regenerated one at a time (the run's model only), plus the oracle's
    teacher-forced forward and backward over oracle_prompts prompts (batches of oracle_batch_size)."""
    from lib.experiments.synthetic import is_network_free
    if is_network_free(p.get("model", "")):
        return Work()                                   # series generated or read, no forward pass
    n, steps, models = p["n_prompts"], p["n_tokens"], _extract_models(p)
    seq = PROMPT_TOKENS + steps
    oracle = min(p["oracle_prompts"], n) if p.get("oracle") else 0        # lib.oracle: forward + backward, 3x
    forwards = models * _batches(n, p["batch_size"]) * steps + p["n_single_check"] * steps \
        + _batches(oracle, p.get("oracle_batch_size", 8))
    tokens = (models * n + p["n_single_check"]) * seq + 3 * oracle * (seq - 1)
    return Work(forwards, tokens, 0, min(n, p["batch_size"]), seq)


def _tags(p: dict, run: dict) -> int:
    """Activation files PhiID runs on: an explicit tag list, else every file notebook 01 writes."""
    return len(p["tags"]) if p.get("tags") is not None else _extract_models(run[NB.EXTRACT])


def _segments(mode: str, n_prompts: int) -> int:
    """Segments a PhiID kernel evaluates every pair in: one per prompt (per_prompt), else one (concat, pooled)."""
    return n_prompts if mode == "per_prompt" else 1


def phiid(p: dict, run: dict, dims) -> Work:
    """02: every head pair, per mode, per activations file (CPU); host: pairs x the modes' segments x files
    evaluations of the 16-atom kernel (MMI: CCS's local redundancies are slower and not modelled), and each
    (mode, file) table's pairs written, read back and drawn."""
    pairs = _pairs(dims)
    if pairs is None:
        return Work(pairs=None)
    segments = sum(_segments(m, _n_prompts(run)) for m in p["modes"])
    files = len(p["modes"]) * _tags(p, run)
    return Work(pairs=pairs * files, host={"phiid_pair_s": pairs * segments * _tags(p, run), "phiid_file_pair_s": pairs * files})


def diagnostics(p: dict, run: dict, dims) -> Work:
    """03: one mode's pair table (read, not recomputed; approximately one pass over the pairs), plus claim C1's
    per-prompt PhiID of the data and of c1_surrogates circular-shift surrogates, for the model and its random-init
    copy when 01 extracts one."""
    pairs = _pairs(dims)
    if pairs is None:
        return Work(pairs=None)
    copies = 1 + bool(run[NB.EXTRACT].get("baseline_random_init"))
    runs = copies * (1 + p.get("c1_surrogates", 20))                  # per-prompt fast PhiID of each
    return Work(pairs=pairs * (1 + runs), host={"fast_pair_s": pairs * runs * _n_prompts(run)})


def _ranking_segments(p: dict, n_prompts: int) -> tuple[int, int]:
    """04's fast-PhiID segments (lib.experiments.ranking): (one pass over every source (mode, preprocessing) the
    variants need: the data's check against 02's files and its preprocessed sources, each surrogate, each baseline
    file; the split halves' concat / pooled recomputations: 2 halves x n_splits per such source)."""
    from lib.experiments.ranking import VARIANTS
    sources = {VARIANTS[v].source for v in p["variants"]}
    one_pass = sum(_segments(mode, n_prompts) for mode, _ in sources)
    return one_pass, 2 * p["n_splits"] * sum(mode != "per_prompt" for mode, _ in sources)


def ranking(p: dict, run: dict, dims) -> Work:
    """04: pair statistics for the data and every circular-shift surrogate, for each preprocessing the variants
    need (raw, detrended, first_difference); split halves reuse per-prompt statistics. host: fast-PhiID pair-segments
    of the data, its baselines (random-init, revisions: when baselines is true), the split halves and the
    surrogates, these spread over n_jobs processes (wall time)."""
    pairs = _pairs(dims)
    if pairs is None:
        return Work(pairs=None)
    sources = 1 + sum(v in p["variants"] for v in ("detrended", "first_difference"))
    one_pass, halves = _ranking_segments(p, _n_prompts(run))
    files = 1 + (_extract_models(run[NB.EXTRACT]) - 1 if p.get("baselines", True) else 0)
    segments = files * one_pass + halves + p["n_surrogates"] * one_pass / max(1, p.get("n_jobs", 1))
    return Work(pairs=pairs * (1 + p["n_surrogates"]) * sources, host={"fast_pair_s": pairs * segments})


def _n_prompts(run: dict) -> int:
    """Notebook 01's prompts (0 when the run has no 01 parameters: estimates() always fills them in)."""
    return run.get(NB.EXTRACT, {}).get("n_prompts", 0)


def _orderings(p: dict) -> int:
    """Removal orders of 05 (lib.ablation.make_orderings): the ranking (and its reverse) per variant, the random
    ones, and n_matched layer-matched orders of every ranking and of every reverse."""
    rankings = len(p["variants"]) * (1 + bool(p["include_reverse"]))
    return rankings + p["n_random"] + p["n_matched"] * rankings


def _ablation_units(points: int, orders: int, n_prompts: int, p: dict) -> int:
    """Forwards of the curves: lib.ablation.run_ablation batches each unit (point x group of orderings) on its own.
    zero: one group; its distinct masks are 1 at the first point (nothing removed) and the last (all removed) and
    every ordering at the others (an upper bound: coinciding masks are computed once). noise: one ordering a group."""
    if p["perturbation"] == "zero":
        per_point = [1, *[orders] * (points - 2), 1] if points > 1 else [1]
        return sum(_batches(m * n_prompts, p["batch_size"]) for m in per_point)
    return points * orders * _batches(n_prompts, p["batch_size"])


def _ablation_checks(points: int, orders: int, n_prompts: int) -> int:
    """lib.ablation.verify with its defaults (3 checks x 2 prompts): per check and prompt an ablated and a clean
    forward of one prompt; points with nothing removed are not checked."""
    return min(3, (points - 1) * orders) * min(2, n_prompts) * 2


CLEAN_CACHE_GIB = 2.0                 # lib.experiments.ablation.run_ablation's max_cache_gb (its default)


def _prompt_chunks(n_prompts: int, n_tokens: int, dims) -> list[int]:
    """Prompts per chunk of lib.experiments.ablation.run_ablation: one chunk, except for a model that soft-caps
    its logits, whose clean cache holds log p and p [n_tokens, vocab] float32 per prompt (DivergenceEngine
    "direct"): CLEAN_CACHE_GIB of them per chunk."""
    if not getattr(dims, "logit_softcap", False) or not dims.vocab_size:
        return [n_prompts]
    size = max(1, int(CLEAN_CACHE_GIB * 2 ** 30 // (2 * n_tokens * dims.vocab_size * 4)))
    return [min(size, n_prompts - s) for s in range(0, n_prompts, size)]


def ablation(p: dict, run: dict, dims) -> Work | None:
    """05: teacher-forced forwards over prompt + generated tokens, per prompt chunk (_prompt_chunks): one clean
    pass over the chunk's prompts and every unit's (head mask, prompt) rows (_ablation_units); then the slow
    check's one-prompt forwards (_ablation_checks)."""
    from lib.experiments.ablation import make_points
    if dims is None:
        return None
    n_prompts = p["n_prompts"] or _n_prompts(run)
    points = len(make_points(dims.total_heads, p["step_size"], p["fractions"]))
    orders = _orderings(p)
    masks = (points - 2) * orders + 2 if p["perturbation"] == "zero" else points * orders
    checks = _ablation_checks(points, orders, n_prompts)
    rows = (masks + 1) * n_prompts + checks
    seq = PROMPT_TOKENS + run[NB.EXTRACT]["n_tokens"] - 1
    forwards = checks + sum(_batches(n, p["batch_size"]) + _ablation_units(points, orders, n, p)
                            for n in _prompt_chunks(n_prompts, run[NB.EXTRACT]["n_tokens"], dims))
    return Work(forwards, rows * seq, 0, p["batch_size"], seq)


def neurons(p: dict, run: dict, dims) -> Work:
    """06 (lib.neurons): per prompt a clean pass (the prompt but its last token, then the last token on that cache:
    2 forwards), then batches of batch_size - 1 neurons plus a clean row, each an incremental forward of the last
    position on the cached prompt; the check (lib.neurons.verify) on min(n_prompts, 2) prompts: one incremental
    forward of the n_check neurons, then per neuron a whole-prompt forward and the two of the frozen reference
    (each of 2 rows: clean and treated)."""
    n_neurons = len(p["neurons"]) if p.get("neurons") else p["n_neurons"]
    n_batches = _batches(n_neurons, max(1, p["batch_size"] - 1))
    checked, check_prompts = min(p["n_check"], n_neurons), min(2, p["n_prompts"])
    forwards = p["n_prompts"] * (2 + n_batches) + check_prompts * (1 + 3 * checked)
    tokens = (p["n_prompts"] * (PROMPT_TOKENS + n_neurons + n_batches)
              + check_prompts * (checked + 1 + 5 * checked * PROMPT_TOKENS))
    return Work(forwards, tokens, 0, min(p["batch_size"], n_neurons + 1), PROMPT_TOKENS)


def _interference_samples(p: dict, run: dict) -> tuple[int, int]:
    """(samples of both tasks, sequence length): the prompts of the two categories in activations.npz with their
    generated continuation, or the given texts (PROMPT_TOKENS + n_new_tokens each, approximation)."""
    if p["sample_source"] == "texts":
        n = len(p["task_a_texts"]) + len(p["task_b_texts"])
        return n, PROMPT_TOKENS + p["n_new_tokens"]
    per_task = math.ceil(_n_prompts(run) / N_CATEGORIES) if NB.EXTRACT in run else 10
    if p["max_samples"]:
        per_task = min(per_task, p["max_samples"])
    cont = run.get(NB.EXTRACT, {}).get("n_tokens", p["n_new_tokens"])
    if p["max_continuation_tokens"]:
        cont = min(cont, p["max_continuation_tokens"])
    return 2 * per_task, PROMPT_TOKENS + cont


def interference(p: dict, run: dict, dims) -> Work:
    """07: one forward and one backward (2 forwards) per sample batch, the two tasks batched apart (grad_method
    "loop": one sample a batch): 3 forward-token equivalents."""
    n, seq = _interference_samples(p, run)
    size = 1 if p.get("grad_method") == "loop" else p["batch_size"]
    if p["sample_source"] == "texts":
        per_task = [len(p["task_a_texts"]), len(p["task_b_texts"])]
    else:
        per_task = [n // 2, n - n // 2]
    return Work(sum(_batches(k, size) for k in per_task), 3 * n * seq, 0, min(n, size), seq)


def _behaviour_conditions(p: dict) -> int:
    """lib.experiments.behaviour.make_conditions: baseline + (synergistic, redundant, layer-matched per variant + random sets)
    under each perturbation (noise: each sigma, or the one calibrated sigma)."""
    sets = 3 * len(p["variants"]) + p["n_random"]
    n_sigmas = 1 if p.get("calibrate") else len(p["sigmas"])
    per_set = sum(n_sigmas if kind == "noise" else 1 for kind in p["perturbations"])
    return 1 + sets * per_set


def _calibration_rows(p: dict) -> int:
    """lib.experiments.behaviour.calibration_plan: baseline + calibration sets x sigmas, on the first calibration problems."""
    if not p.get("calibrate"):
        return 0
    return min(p["calibration_problems"], p["n_problems"]) * (1 + len(p["calibration_sigmas"]) * p["calibration_sets"])


def behaviour(p: dict, run: dict, dims) -> Work:
    """09: greedy replies of max_new_tokens (KV cache) for every problem under every condition (and the dose
    calibration's, when calibrate is true)."""
    rows = p["n_problems"] * _behaviour_conditions(p) + _calibration_rows(p)
    seq = PROMPT_TOKENS + p["max_new_tokens"]
    return Work(_batches(rows, p["batch_size"]) * p["max_new_tokens"], rows * seq, 0, p["batch_size"], seq)


def _evaluation(p: dict, n_steps: int) -> Work:
    """Test-set generations of one training run: every eval_every steps and after the last step (the evaluation
    before training is shared by every run: finetune counts it once, as _evaluation(p, 0))."""
    every = max(1, p["eval_every"])
    evals = n_steps // every + (1 if n_steps % every else 0) if n_steps else 1
    seq = PROMPT_TOKENS + p["max_new_tokens"]
    return Work(evals * _batches(p["n_test"], p["eval_batch_size"]) * p["max_new_tokens"], evals * p["n_test"] * seq)


def _grpo(g: dict | None) -> tuple[Work, int]:
    """One GRPO run -> (its work, its steps): per step batch_size x grad_accum completions generated
    (max_completion_length steps, KV cache) and trained on (forward + backward): 4 forward-token equivalents."""
    from dataclasses import asdict
    from lib.experiments.finetune.grpo import GRPOSettings
    s = {**asdict(GRPOSettings()), **(g or {})}
    rows, seq = s["batch_size"] * s["grad_accum"], PROMPT_TOKENS + s["max_completion_length"]
    forwards = s["n_steps"] * s["grad_accum"] * (s["max_completion_length"] + 1)
    return Work(forwards, 4 * s["n_steps"] * rows * seq, 0, s["batch_size"], seq), s["n_steps"]


def finetune(p: dict, run: dict, dims) -> Work:
    """10: for every method x condition (synergistic, redundant, layer-matched, random sets) x seed: SFT steps of
    batch_size x grad_accum examples (prompt + answer of max_new_tokens, forward + backward: 3x), or a GRPO run
    (_grpo), plus the test evaluations of each run. SFT runs over sft_seeds when given, else seeds."""
    seq = PROMPT_TOKENS + p["max_new_tokens"]
    total = Work(batch_rows=p["batch_size"], seq_len=seq)
    for method in p["methods"]:
        seeds = (p.get("sft_seeds") or p["seeds"]) if method == "sft" else p["seeds"]      # sft_seeds: SFT's own
        runs_per_method = (3 + p["n_random"]) * len(seeds)
        if method == "sft":
            steps, accum = p["n_steps"], p.get("grad_accum", 1)      # grad_accum: lib.experiments.finetune.SFTSettings only
            one = Work(steps * accum, 3 * steps * accum * p["batch_size"] * seq)
        else:
            one, steps = _grpo(p["grpo"])
            total.batch_rows, total.seq_len = max(total.batch_rows, one.batch_rows), max(total.seq_len, one.seq_len)
        ev = _evaluation(p, steps)
        total.forwards += runs_per_method * (one.forwards + ev.forwards)
        total.tokens += runs_per_method * (one.tokens + ev.tokens)
    baseline = _evaluation(p, 0)
    total.forwards, total.tokens = total.forwards + baseline.forwards, total.tokens + baseline.tokens
    return total


def _topology_units(p: dict, heads: int, pairs: int) -> dict:
    """HOST_UNITS of one network of 08 (lib.experiments.topology): efficiency and n_louvain Louvain runs at each
    threshold (edges = the kept pairs), and n_null strength-preserving nulls of all pairs, each with its
    efficiency and Louvain runs, spread over n_jobs processes."""
    kept = sum(round(t * pairs) for t in set(p["thresholds"]) | {0.1, 1.0})
    edges = kept + p["n_null"] * pairs
    jobs = max(1, p.get("n_jobs", 1))
    return {"efficiency_s": heads * edges / jobs, "louvain_s": p["n_louvain"] * edges / jobs,
            "null_s": p["n_null"] * pairs / jobs}


def topology(p: dict, run: dict, dims) -> Work:
    """08: networks over the head pairs (edges = pairs) of the model and its baselines; pairs: counted as pairs x
    (1 + n_null) x thresholds x tags (approximation). host: two networks (sts, rtr) per activations file
    (_topology_units), plus per file the prompt bootstrap (per-prompt fast PhiID once, then n_boot + 1 pairs of
    full-network efficiencies; mode per_prompt only)."""
    pairs = _pairs(dims)
    p01 = run.get(NB.EXTRACT, {})
    tags = _extract_models(p01) if p.get("baselines", True) else 1
    if pairs is None:
        return Work(pairs=None)
    host = {k: 2 * tags * v for k, v in _topology_units(p, dims.total_heads, pairs).items()}
    if p.get("n_boot") and p.get("mode", "per_prompt") == "per_prompt":
        host["efficiency_s"] += tags * 2 * (p["n_boot"] + 1) * dims.total_heads * pairs
        host["fast_pair_s"] = tags * pairs * p01.get("n_prompts", 0)
    n = (1 + p["n_null"]) * len(set(p["thresholds"]) | {0.1, 1.0}) * _extract_models(p01)
    return Work(pairs=pairs * n, host=host)


def local(p: dict, run: dict, dims) -> Work:
    """11: a teacher-forced forward over prompt + generated tokens per prompt and tag, then local PhiID of every
    pair per tag (pairs: pairs x tags; the n_null circular shifts move head and layer means, no pair). host: per
    tag, the pairs' geometry in each segment and their local values at each of prompts x (steps - tau) samples."""
    n = _n_prompts(run) if NB.EXTRACT in run else 12
    steps = run.get(NB.EXTRACT, {}).get("n_tokens", 24)
    seq = PROMPT_TOKENS + steps
    tags = len(p["tags"])
    pairs = _pairs(dims)
    work = Work(tags * _batches(n, p["batch_size"]), tags * n * seq, None, min(n, p["batch_size"]), seq)
    if pairs is not None:
        work.pairs = pairs * tags
        work.host = {"local_pair_s": pairs * tags * _segments(p.get("mode", "per_prompt"), n),
                     "local_sample_s": pairs * tags * n * max(0, steps - p.get("tau", 1))}
    return work


def estimator(name: str):
    """The cost estimator of a stage (its declaration's `cost`: a function of this module, or "module:function"),
    or None."""
    return stages.pointed(name, "cost", __name__)


# ----------------------------------------------------------------------------- rate, memory, table

def read_rate(path: str | os.PathLike | None = None) -> dict | None:
    """The measured forward throughput {"flop_per_s", "device", "dtype", "date", ...} (benchmarks/gpu_check.py
    --save-rate) from `path`, else $HEADINFO_RATE, else slurm/rate.json; None when there is no such file."""
    path = Path(path or os.environ.get(RATE_ENV) or RATE_FILE)
    if not path.is_file():
        return None
    rate = json.loads(path.read_text())
    if not isinstance(rate.get("flop_per_s"), (int, float)) or rate["flop_per_s"] <= 0:
        raise ValueError(f"{path}: 'flop_per_s' must be a positive number; rewrite it with benchmarks/gpu_check.py --save-rate")
    return rate


def gpu_hours(tokens: int, n_params: int, flop_per_s: float, forwards: int = 0, latency_s: float = 0.0) -> float:
    """tokens x 2 n_params FLOP at flop_per_s, plus forwards x latency_s (the fixed time of one forward call: a
    greedy step of one token per row costs about this, far more than its FLOP), in hours."""
    return (tokens * 2 * n_params / flop_per_s + forwards * latency_s) / 3600


def memory_gib(dims, dtype: str, work: Work) -> float:
    """Weights (n_params x dtype bytes) + K and V of every layer for batch_rows x seq_len tokens, GiB."""
    size = DTYPE_BYTES.get(dtype, 4)
    kv = 2 * dims.n_layers * dims.n_kv_heads * dims.head_dim * work.batch_rows * work.seq_len * size
    return (dims.n_params * size + kv) / 2 ** 30


def calibration(rate: dict | None) -> tuple[float, float, str]:
    """(fixed seconds per notebook, base kernel RSS GiB, where they come from): the rate file's notebook_fixed_s and
    base_rss_gib (gpu_check --save-rate), else DEFAULT_CALIBRATION."""
    if rate and isinstance(rate.get("notebook_fixed_s"), (int, float)) and isinstance(rate.get("base_rss_gib"), (int, float)):
        return rate["notebook_fixed_s"], rate["base_rss_gib"], f"measured on {rate.get('device', '?')} {rate.get('date', '?')}"
    d = DEFAULT_CALIBRATION
    return d["notebook_fixed_s"], d["base_rss_gib"], "defaults (no calibration: benchmarks/gpu_check.py --save-rate)"


def host_rates(rate: dict | None) -> dict:
    """Seconds per unit of every HOST_UNITS entry and model_rss_gib: the rate file's (gpu_check --save-rate), else
    DEFAULT_CALIBRATION's; model_rss_gib falls back to the file's base_rss_gib (a file from before it existed)."""
    measured = {k: v for k, v in (rate or {}).items() if isinstance(v, (int, float))}
    out = {k: measured.get(k, DEFAULT_CALIBRATION[k]) for k in HOST_UNITS}
    out["model_rss_gib"] = measured.get("model_rss_gib", measured.get("base_rss_gib", DEFAULT_CALIBRATION["model_rss_gib"]))
    return out


def host_seconds(work: Work | None, rates: dict) -> float:
    """Seconds of a notebook's CPU work: its HOST_UNITS counts x the seconds per unit (0 without work)."""
    return float(sum(n * rates[k] for k, n in work.host.items())) if work is not None else 0.0


def host_arrays_gib(name: str, p: dict, run: dict, dims) -> float:
    """Large host arrays of a notebook beyond the model, GiB: PhiID pair tables (pairs x PAIR_ROW_BYTES each);
    02 and 11 one per mode (11: per tag) and activations file; 03 one table + the cluster bootstrap's float64
    [heads, heads] and [PAIR_BOOT, heads] arrays (BOOT_ARRAYS of each); 04 the tables of its sources + per surrogate job PAIR_SAMPLE_ARRAYS
    float64 [pairs, samples] (samples = prompts x tokens), x n_jobs; 08 one table + float64 [heads, heads] per
    network (model and nulls) of each activations file. 0 for the others or an unknown model. 03 also holds the
    mode's phiid file as read (ATOMS float64 [heads, heads]: 0.47 GiB of 03's 0.97 GiB peak at 1,152 heads beyond
    the other terms, benchmarks/cluster_shapes.py)."""
    if dims is None:
        return 0.0
    heads, pairs = dims.total_heads, _pairs(dims)
    table = pairs * PAIR_ROW_BYTES
    p01 = run.get(NB.EXTRACT, {})
    if name == NB.PHIID:
        size = table * len(p["modes"]) * _tags(p, run)
    elif name == NB.LOCAL:
        size = table * len(p["tags"])
    elif name == NB.DIAGNOSTICS:                 # + the mode's file as read: 16 float64 [heads, heads] atoms
        size = table + 8 * (ATOMS * heads * heads + BOOT_ARRAYS[0] * heads * heads + BOOT_ARRAYS[1] * PAIR_BOOT * heads)
    elif name == NB.RANKING:
        samples = p01.get("n_prompts", 0) * p01.get("n_tokens", 0)
        sources = 1 + sum(v in p["variants"] for v in ("detrended", "first_difference"))
        size = table * sources + max(1, p.get("n_jobs", 1)) * PAIR_SAMPLE_ARRAYS * 8 * pairs * samples
    elif name == NB.TOPOLOGY:
        size = table + 8 * heads * heads * (1 + p["n_null"]) * _extract_models(p01)
    else:
        size = 0
    return size / 2 ** 30


def host_gib(name: str, p: dict, run: dict, dims, work: Work | None, base_gib: float,
             model_base_gib: float | None = None) -> float | None:
    """Peak host memory of a notebook's kernel: base_gib (model_base_gib, default base_gib, when the model runs on
    the CPU: device "cpu") + host_arrays_gib + then weights and K/V (memory_gib); None when the model is unknown
    and the notebook runs it."""
    on_cpu = p.get("device", "auto") == "cpu" and work is not None and work.tokens
    if on_cpu and dims is None:
        return None
    model = memory_gib(dims, p.get("dtype", "float32"), work) if on_cpu else 0.0
    base = (base_gib if model_base_gib is None else model_base_gib) if on_cpu else base_gib
    return base + host_arrays_gib(name, p, run, dims) + model


def with_defaults(path, params: dict) -> dict:
    """A notebook's parameters with its declared defaults filled in."""
    from lib.pipeline.notebook_params import declared_parameters, default_value
    declared = declared_parameters(path)
    return {**{k: default_value(v["default"]) for k, v in declared.items()}, **params}


def _run_params(steps) -> dict:
    """notebook -> parameters with defaults, 01 always present (its defaults when not in the run)."""
    run = {s.name: with_defaults(s.path, s.params) for s in steps}
    if NB.EXTRACT not in run:
        run[NB.EXTRACT] = with_defaults(stages.stages()[NB.EXTRACT].path, {})
    return run


def _dims_of(specs: set[str]) -> tuple[dict, list[str]]:
    """spec -> ModelDims for each model spec that can be read here; and what is missing for the others."""
    from lib.model.loading import ModelSpecError, model_dims
    dims, missing = {}, []
    for spec in sorted(specs):
        try:
            dims[spec] = _network_free_dims(spec) if spec.startswith(("synthetic:", "file:")) else model_dims(spec)
        except ModelSpecError as e:
            missing.append(str(e))
    return dims, missing


def _network_free_dims(spec: str):
    """ModelDims of a synthetic: or file: spec: its heads and layers, no network (no parameters, no MLP)."""
    from lib.experiments.synthetic import network_free_shape
    from lib.model.loading import ModelDims
    n_layers, n_heads = network_free_shape(spec)
    return ModelDims(0, n_layers, n_heads, n_heads, 0, "no network (lib.experiments.synthetic)")


def _cell(value) -> str:
    """Table cell: None -> "?" (unknown, see the notes), 0 -> "-" (none), numbers readable."""
    if value is None:
        return "?"
    if isinstance(value, str):
        return value
    if value == 0:
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else f"{value:,}"


def _row(step, p: dict, work: Work | None, dims, rate: dict | None, on_gpu: bool) -> dict:
    """One table row; None marks what cannot be computed (model size unknown, no measured rate)."""
    if work is None:
        return dict(notebook=step.name, device="GPU" if on_gpu else "CPU", forwards=None, tokens=None,
                    gpu_hours=None if on_gpu else "CPU", memory_gib=None, pairs=None, seconds=None, host_gib=None)
    hours = "CPU"
    if on_gpu:
        hours = 0 if not work.tokens else (gpu_hours(work.tokens, dims.n_params, rate["flop_per_s"], work.forwards,
                                                     rate.get("forward_latency_s", 0.0))
                                          if dims is not None and rate else None)
    memory = 0 if not work.tokens else memory_gib(dims, p.get("dtype", "float32"), work) if dims else None
    return dict(notebook=step.name, device="GPU" if on_gpu else "CPU", forwards=work.forwards, tokens=work.tokens,
                gpu_hours=hours, memory_gib=memory, pairs=work.pairs)


def _host_terms(row: dict, name: str, p: dict, run: dict, dims, work: Work | None, rate: dict | None) -> dict:
    """row + seconds (fixed per notebook + the forward time + the CPU work's, None when the forward time is
    unknown) and host_gib."""
    fixed, base, _ = calibration(rate)
    rates, hours = host_rates(rate), row["gpu_hours"]
    forward = 3600 * hours if isinstance(hours, (int, float)) else 0
    seconds = fixed + forward + host_seconds(work, rates) if hours is not None else None
    return {**row, "seconds": seconds, "host_gib": host_gib(name, p, run, dims, work, base, rates["model_rss_gib"])}


def estimates(steps) -> tuple[list[dict], list[str], dict | None]:
    """-> (one row per step: notebook, device, forwards, tokens, gpu_hours, memory_gib, pairs; notes; rate)."""
    run = _run_params(steps)
    model_of = lambda name: run[name].get("model") or run[NB.EXTRACT]["model"]      # noqa: E731
    dims, notes = _dims_of({model_of(s.name) for s in steps})
    rate = read_rate()
    gpu = os.environ.get("HEADINFO_GPU_NOTEBOOKS", " ".join(GPU_NOTEBOOKS)).split()
    rows = []
    for s in steps:
        d, p = dims.get(model_of(s.name)), run[s.name]
        estimate = estimator(s.name)
        work = estimate(p, run, d) if estimate else None
        rows.append(_host_terms(_row(s, p, work, d, rate, s.name in gpu), s.name, p, run, d, work, rate))
    notes.append("seconds and host GiB: fixed %.3g s per notebook, kernel base %.3g GiB, %s" % calibration(rate))
    notes += [f"{spec}: {d.n_params:,} parameters ({d.source})" for spec, d in dims.items()]
    return rows, notes, rate


COLUMNS = (("notebook", "<24"), ("device", "<6"), ("forwards", ">12"), ("tokens", ">16"), ("gpu_hours", ">10"),
           ("memory_gib", ">9"), ("pairs", ">14"), ("seconds", ">9"), ("host_gib", ">9"))
HEADERS = {"gpu_hours": "GPU-hours", "memory_gib": "peak GiB", "pairs": "PhiID pairs", "seconds": "seconds",
           "host_gib": "host GiB"}


def cost_table(steps) -> str:
    """The printed estimate: one line per notebook, then the rate used (or why there are no GPU-hours) and notes."""
    rows, notes, rate = estimates(steps)
    lines = ["cost estimate (approximate, see lib/pipeline/cost.py; ? = unknown, see below)",
             " ".join(f"{HEADERS.get(k, k):{f}}" for k, f in COLUMNS)]
    lines += [" ".join(f"{_cell(r[k]):{f}}" for k, f in COLUMNS) for r in rows]
    if rate:
        total = sum(r["gpu_hours"] for r in rows if isinstance(r["gpu_hours"], float))
        lines.append(f"GPU-hours at {rate['flop_per_s']:.3g} FLOP/s measured on {rate.get('device', '?')} "
                     f"({rate.get('model', '?')}, {rate.get('dtype', '?')}, {rate.get('date', '?')}); total {total:.3g}")
    else:
        lines.append(NO_RATE)
    return "\n".join(lines + [f"  {n}" for n in notes])
