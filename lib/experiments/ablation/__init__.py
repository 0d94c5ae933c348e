"""Iterative head ablation: how far behaviour moves when heads are removed cumulatively in a given order.

The paper's causal test (notebook 05). For every prompt q the clean model's greedy tokens x_1..x_T (from
activations.npz) are teacher-forced through the clean and the ablated model alike, and

    divergence(q) = (1/T) sum_t KL( p_clean(. | prompt, x_<t) || p_ablated(. | prompt, x_<t) )   [nats/token]

over the full vocabulary. The input sequence is prompt + x_1..x_{T-1}; the T predicting positions are the last
prompt position and the positions of x_1..x_{T-1}, i.e. the last T positions of every (left-padded) row.

Orderings (each a permutation of all heads; heads are removed cumulatively along it):
- "ranking" for each chosen variant of rankings.csv: descending score (most synergistic first), ties broken by
  the lower head index;
- "random" with seeds seed, seed+1, ..., seed+n_random-1: numpy default_rng(seed_k).permutation(total_heads);
- "reverse" for each chosen variant: the exact reverse of that variant's ranking order (most redundant first);
- "matched" / "matched_reverse" for each chosen variant: n_matched layer-matched random orders of its ranking /
  of its reverse, each matched to ITS OWN layer sequence (position i removes a random not yet removed head of the
  layer the matched ordering removes at position i), so every ordering has its own layer-matched control.
The variant "oracle" (lib.experiments.oracle, a column of rankings.csv when notebook 01 computed it) is a variant like the
others; when it is among the variants, the prompts the oracle was computed from (oracle.npz prompt_ids) are left
out of this notebook's prompt selection, so the oracle is never scored on its own data.
Points: n_removed = 0, s, 2s, ... (+ all heads) for step_size s, or round(f * total_heads) for a list of
fractions f (0 is always included).

Perturbations: "zero" = the head's slice of the output projection's input is multiplied by 0 (lib.model.heads mask);
"noise" = Gaussian noise N(0, sigma^2) (sigma absolute, in weight units) added to the head's query-projection
rows and output-projection columns (ArchInfo.head_weight_slices, lib.model.hooks.patched_weights); the noise of head h is fixed by (seed, h), so
every ordering perturbs a given head identically; weights are restored exactly after every forward.

Efficiency: for "zero" all orderings of one point share batched forwards (one row per distinct head mask x prompt;
identical masks, e.g. at 0 and at all heads removed, are computed once); only the base model runs on all
positions, the unembedding and log-softmax run on the T predicting positions in chunks of rows, so no
[rows, positions, vocab] tensor of a whole batch exists; the clean log-probs of a prompt chunk are computed once
(through the very same code path, so the divergence at 0 heads removed is exactly 0) and cached.

Resumable and shardable: the work units are (group, point) with group = all orderings for "zero" and one ordering
for "noise"; a run (or shard i/n, which takes every n-th unit) checkpoints after every unit and prompt chunk
(atomic rewrite of a small .npz: ablation_checkpoint_<settings hash>.npz, or ablation_shards/shard-i-of-n.npz);
a rerun with the same settings continues where it stopped with identical results. A run with shard ""
merges shard files when they exist (refusing incomplete or mismatched sets), else computes everything.

    inputs, plan = prepare("outputs/run", model="bundled:smollm2-135m", variants=["rank_diff"], step_size=9)
    result = run_ablation(model, arch, inputs, plan)     # AblationResult
    result.save("outputs/run")                           # ablation.csv, ablation_kl.npz
"""
from __future__ import annotations

from lib.experiments.ablation.plan import (PERTURBATIONS, RANDOM_VARIANT, ORACLE, Ordering, AblationInputs,
                                           make_points, make_orderings, load_inputs, select_prompt_rows, prepare)
from lib.experiments.ablation.engine import DivergenceEngine, removal_masks, perturbed_heads
from lib.experiments.ablation.resume import fingerprint, Checkpoint
from lib.experiments.ablation.results import (AblationResult, manifest_entry, run_ablation, plan_table, verify,
                                              shard_summary)

from lib.experiments.ablation.results import AblationResult
from lib.experiments.ablation.plan import make_points, RANDOM_VARIANT
__all__ = ["PERTURBATIONS", "RANDOM_VARIANT", "ORACLE", "Ordering", "AblationInputs", "make_points", "make_orderings",
           "load_inputs", "select_prompt_rows", "prepare", "DivergenceEngine", "removal_masks", "perturbed_heads",
           "fingerprint", "Checkpoint", "AblationResult", "manifest_entry", "run_ablation", "plan_table", "verify",
           "shard_summary", "AblationResult", "make_points", "RANDOM_VARIANT"]
