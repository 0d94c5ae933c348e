"""Task accuracy under head perturbation (notebook 09, the paper's Fig 4b).

For every condition the model answers every problem of a task set (lib.experiments.tasks) by greedy generation of up to
`max_new_tokens` (a row stops at an end-of-sequence token); the reply is checked with lib.experiments.tasks.check_answer.

Conditions (k = max(1, round(fraction * total heads)) heads each):
- baseline: no perturbation;
- synergistic: the top k heads of each ranking variant (rankings.csv, descending score, ties by lower index);
- redundant: the k heads at the other end of the same order (most redundant first);
- random: `n_random` random sets, default_rng(seed + i).permutation(heads)[:k] (lib.experiments.ablation's random orders);
- layer_matched: per variant, a random set with as many heads in each layer as that variant's synergistic set
  (the first k heads of lib.experiments.ablation's layer-matched random order).
Perturbations (lib.experiments.ablation's, reused): "zero" multiplies the heads' outputs by 0 (lib.model.heads.HeadHooks mask, one
row per (condition, problem)); "noise" adds N(0, (sigma * s)^2) to the heads' query-projection rows and
output-projection columns (lib.experiments.ablation.perturbed_heads, noise of head h fixed by (seed, h), so a head is perturbed
identically in every condition), where s is the standard deviation of all query rows and output columns of the
model's heads (`weight_scale`): sigma is in units of the weights' standard deviation.

Batching. Problems are sorted by prompt length and cut into problem batches of `batch_size`; every forward pass
of a problem batch is left-padded to that batch's longest prompt, so a row's numbers do not depend on which other
rows share its forward (checked bitwise in the tests) and a condition that perturbs nothing reproduces the baseline
exactly. Zero conditions of a problem batch share forwards: their rows (conditions x problems) are cut into
forwards of up to `batch_size` rows, each with its own head-mask row. Noise conditions cannot share: the weights
differ per condition, so each (noise condition, problem batch) is its own forward, with the weights perturbed on
entry and restored bit-exactly on exit, around every batch. Rows that finished are dropped from the batch (and
from the KV cache) while the others continue.

Dose calibration (`calibrate=True`, before the main measurement). A fixed sigma can put every condition at the
floor (SmolLM2-135M at sigma 1: 0-3 of 60 problems for every head set), where "synergistic hurts more than random"
cannot be seen. The calibration sweeps `calibration_sigmas` (a log grid) on `calibration_sets` random head sets of k
heads (seeds seed + 1000, seed + 1001, ...: not the main random sets) and the baseline, over the first
`calibration_problems` problems, and picks the sigma at which the random sets keep `target_relative_accuracy` of
the baseline's accuracy (default 0.76 = 44 / 58, the paper's random / baseline in Fig 4b): pick_sigma interpolates
linearly in log sigma between the last grid point at or above the target and the first one below it. The main
measurement then runs at that one sigma (`sigmas` is used only when calibrate is false).

Validity (floor / ceiling). A comparison is invalid when the random sets' mean number of correct problems lies
within max(2, 5 % of n) problems of 0 (floor: everything is broken) or of the baseline's (ceiling: the dose does
nothing), for every perturbation setting (noise sigmas and zero).

C6 statistic. value = (acc(synergistic) - mean acc(random sets)) / acc(baseline), all on the same problems: the
relative accuracy difference, comparable across models of different baseline skill (the paper: (28 - 44) / 58 =
-0.276). Its 95 % CI is a paired bootstrap over problems: each replicate resamples the problems once (the same
indices for the synergistic set, every random set and the baseline) and divides that replicate's difference by
that replicate's baseline accuracy (replicates with baseline 0 dropped); se is the replicates' sd.

Resumable: the work units are (condition group, problem batch), with group = all zero conditions of one
perturbation, or one baseline / noise condition; after every unit its rows are appended to
behaviour_checkpoint_<settings hash>.jsonl (lib.storage.artifacts), so a rerun with the same settings continues where it
stopped with identical results.

    plan = prepare("outputs/run", model="bundled:smollm2-135m", variants=["rank_diff"], sigmas=[1.0])
    calibration = calibrate(model, tokenizer, arch, plan)    # the dose sweep (nothing runs when calibrate=False)
    plan = calibration.apply(plan)                           # main conditions at the chosen sigma
    result = run_behaviour(model, tokenizer, arch, plan)     # BehaviourResult
    result.save("outputs/run")           # behaviour.csv, behaviour_calibration.csv, generations, summary
"""
from __future__ import annotations

from lib.experiments.behaviour.plan import (Calibration, PERTURBATIONS, KINDS, PAPER_EFFECT, PAPER_EFFECT_NOTE, PAPER, Condition,
                                            head_sets, make_conditions, check_settings, load_rankings,
                                            check_rankings_model, prepare, plan_table)
from lib.experiments.behaviour.running import (eos_ids, greedy_generate, problem_batches, fingerprint, Checkpoint,
                                               run_behaviour)
from lib.experiments.behaviour.calibration import pick_sigma, calibration_plan, calibrate
from lib.experiments.behaviour.statistics import (clopper_pearson, mcnemar, percentile_among, paired_difference_ci,
                                                  relative_difference, relative_accuracy, floor_margin, floor_ceiling)

__all__ = ["PERTURBATIONS", "KINDS", "PAPER_EFFECT", "PAPER_EFFECT_NOTE", "PAPER", "Condition", "head_sets",
           "make_conditions", "check_settings", "load_rankings", "check_rankings_model", "prepare", "plan_table",
           "eos_ids", "greedy_generate", "problem_batches", "fingerprint", "Checkpoint", "run_behaviour", "pick_sigma",
           "calibration_plan", "Calibration", "calibrate", "clopper_pearson", "mcnemar", "percentile_among",
           "paired_difference_ci", "relative_difference", "relative_accuracy", "floor_margin", "floor_ceiling"]
