"""QK-OV interference: how much a sample of task A stresses the attention parameters a sample of task B would update.

For layer l, query/KV head h and block B in {Q, K, V, O} (the head's slice of that projection weight):

    M^B_{ij,l,h} = sum_{k in slice} C_{i,k} / (F_k + eps) * |g_{j,k}|

g_i: per-sample gradient of task-A sample i; C_i = g_i**2 (elementwise); F = mean over task-A samples of C_i (the
diagonal empirical Fisher of task A); g_j: per-sample gradient of task-B sample j. Diagonal, asymmetric (M_ij != M_ji),
magnitude-weighted. The per-sample loss is the mean next-token negative log-likelihood over the sample's
continuation tokens; the prompt tokens are context only. Gradients are taken of the attention projection weights
only (no biases), per sample, and are held and reduced in float32 whatever the model dtype.

Regularisation: the denominator is max(F_k, eps) + ridge. With ridge = 0 the factor C_i / F is invariant to a
rescaling of the parameterisation (it is at most n_A for a task-A sample and task-A Fisher: no blow-up); eps only
turns 0/0 (parameters no task-A sample moves) into 0. ridge > 0 damps directions with tiny Fisher (useful for the
`signed` and `symmetric` variants, whose g_i / F factor is unbounded) at the price of that invariance.

Variants (all computed with the same slices, all pairs at once, one matrix product per block-head):
    magnitude  C_i / F_A        @ |g_j|       the score above ("stress")
    signed     g_i / F_A        @  g_j        > 0 synergy (same direction), < 0 conflict
    symmetric  |g_i| / F_A      @ |g_j|       = sum sqrt(C_i C_j) / F_A
    pooled     C_i / F_pool     @ |g_j|       F_pool = (F_A + F_B) / 2

Slices come from ArchInfo.block_param_slices: Q by query head, K and V by KV head (reported per KV head, never
copied to the query heads that share it under grouped-query attention), O by query head (columns).

    A, B = load_task_samples(model, tokenizer, arch, out_dir="outputs/dev", task_a=..., task_b=...)
    result = compute_interference(model, arch, A, B, min_samples_for_fisher=10)
    result.save(out_dir)   # interference.npz, top_conflicts.csv, interference_summary.csv, manifest section

Modules: samples (task samples), gradients (per-sample gradients), scores (Fisher and pair scores), result
(InterferenceResult: tables, artifacts, figures).
"""
from lib.experiments.interference.gradients import (METHODS, SampleGradients, continuation_nll, per_sample_gradients,
                                        projection_sites, projection_weights, torch_threads)
from lib.experiments.interference.result import BLOCKS, DEFAULT_EPS, KV_BLOCKS, VARIANT_UNITS, VARIANTS, InterferenceResult
from lib.experiments.interference.samples import (MIN_SAMPLES_FOR_FISHER, SOURCES, TEXT_SEPARATOR, Sample, TaskSamples,
                                      load_task_samples, sample_from_text, samples_from_activations,
                                      samples_from_file, samples_from_generation, samples_from_texts)
from lib.experiments.interference.scores import (check_block_slices, compute_interference, fisher_denominator,
                                     interference_from_gradients, normalised_contributions, pair_scores)
from lib.model.architectures import ArchInfo

__all__ = ["METHODS", "SampleGradients", "continuation_nll", "per_sample_gradients", "projection_sites",
           "projection_weights", "torch_threads", "BLOCKS", "DEFAULT_EPS", "KV_BLOCKS", "VARIANT_UNITS", "VARIANTS",
           "InterferenceResult", "MIN_SAMPLES_FOR_FISHER", "SOURCES", "TEXT_SEPARATOR", "Sample", "TaskSamples",
           "load_task_samples", "sample_from_text", "samples_from_activations", "samples_from_file",
           "samples_from_generation", "samples_from_texts", "check_block_slices", "compute_interference",
           "fisher_denominator", "interference_from_gradients", "normalised_contributions", "pair_scores"]
