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

import hashlib
import inspect
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from lib.storage import artifacts
from lib.experiments import tasks
from lib.experiments.ablation import make_orderings, perturbed_heads
from lib.experiments.extract import left_pad
from lib.model.heads import HeadHooks
from lib.model.loading import ArchInfo
from lib.storage.store import ArtifactError

__all__ = ["PERTURBATIONS", "KINDS", "PAPER_EFFECT", "PAPER_EFFECT_NOTE", "PAPER", "Condition", "head_sets",
           "make_conditions", "check_settings", "load_rankings", "check_rankings_model", "prepare", "plan_table",
           "eos_ids", "greedy_generate", "problem_batches", "fingerprint", "Checkpoint", "run_behaviour",
           "pick_sigma", "calibration_plan", "Calibration", "calibrate", "clopper_pearson", "mcnemar",
           "percentile_among", "paired_difference_ci", "relative_difference", "relative_accuracy", "floor_ceiling"]

PERTURBATIONS = ("zero", "noise")
KINDS = ("baseline", "synergistic", "redundant", "random", "layer_matched")
PAPER_EFFECT = round((28 - 44) / 58, 3)          # -0.276: (synergistic - random) / baseline, Fig 4b
PAPER_EFFECT_NOTE = ("Gemma-3-4B MATH accuracy read off Fig 4b (approximate): baseline 58 %, random 44 %, synergistic "
                     "28 %; the relative difference (synergistic - random) / baseline = (28 - 44) / 58 = -0.276 "
                     "(-16 accuracy points out of the baseline's 58)")
PAPER = {"value": PAPER_EFFECT,
         "text": "Gemma-3-4B MATH accuracy: baseline 58, redundant 52, random 44, synergistic 28 (%; read off "
                 "Fig 4b, approximate; sigma not stated): (synergistic - random) / baseline = -16 / 58 = -0.276"}
TARGET_RELATIVE_ACCURACY = 0.76                   # 44 / 58: the paper's random sets keep 76 % of the baseline
CALIBRATION_SIGMAS = (0.05, 0.1, 0.2, 0.5, 1.0)
CALIBRATION_SEED_OFFSET = 1000                    # calibration random sets: seeds seed + 1000 + i

# ----------------------------------------------------------------------------- conditions

@dataclass(frozen=True)
class Condition:
    kind: str                  # one of KINDS
    variant: str               # ranking variant ("" for baseline and random sets)
    seed: int                  # random / layer-matched seed, -1 otherwise
    heads: tuple[int, ...]     # perturbed head indices (layer-major)
    perturbation: str          # "none" (baseline), "zero" or "noise"
    sigma: float = 0.0         # noise sigma in units of the weights' standard deviation

    @property
    def key(self) -> str:
        """Unique name: perturbation[/sigma]:kind[:variant][:seed=s]."""
        where = self.perturbation + (f"/{self.sigma:g}" if self.perturbation == "noise" else "")
        parts = [where, self.kind] + ([self.variant] if self.variant else []) + \
                ([f"seed={self.seed}"] if self.seed >= 0 else [])
        return "baseline" if self.kind == "baseline" else ":".join(parts)


def head_sets(rankings: pd.DataFrame, variants: list[str], fraction: float, n_random: int, seed: int,
              n_heads: int) -> list[tuple[str, str, int, tuple[int, ...]]]:
    """(kind, variant, seed, heads) for every perturbed set: synergistic / redundant / layer-matched per variant,
    then the random sets: lib.experiments.ablation.make_orderings' ranking, reverse, layer-matched and random orders, cut after
    the first k heads."""
    k = max(1, int(round(fraction * len(rankings))))
    orders = make_orderings(rankings, variants, n_random, include_reverse=True, seed=seed, n_matched=1)
    first = lambda kind, v: [o for o in orders if o.kind == kind and o.variant == v][0]     # noqa: E731
    out = []
    for v in variants:
        matched = first("matched", v)
        out += [("synergistic", v, -1, tuple(sorted(first("ranking", v).order[:k]))),
                ("redundant", v, -1, tuple(sorted(first("reverse", v).order[:k]))),
                ("layer_matched", v, matched.seed, tuple(sorted(matched.order[:k])))]
    out += [("random", "", o.seed, tuple(sorted(o.order[:k]))) for o in orders if o.kind == "random"]
    return out


def make_conditions(sets, perturbations: list[str], sigmas: list[float]) -> list[Condition]:
    """Baseline, then every head set under every perturbation (noise: every sigma)."""
    out = [Condition("baseline", "", -1, (), "none")]
    for p in perturbations:
        for sigma in (sigmas if p == "noise" else [0.0]):
            out += [Condition(kind, v, s, heads, p, float(sigma)) for kind, v, s, heads in sets]
    return out


# ----------------------------------------------------------------------------- plan and validation

@dataclass
class BehaviourPlan:
    out_dir: Path
    model: str
    problems: list[tasks.Problem]
    conditions: list[Condition]
    variants: list[str]
    fraction: float
    n_random: int
    perturbations: list[str]
    sigmas: list[float]
    seed: int = 0
    max_new_tokens: int = 48
    batch_size: int = 32
    chat_template: bool = True
    answer_prefix: str = tasks.ANSWER_PREFIX
    task: str = "arithmetic"
    n_heads_total: int = 0
    sets: list = field(default_factory=list)              # head_sets(...): (kind, variant, seed, heads)
    calibration: "CalibrationSettings | None" = None      # None: calibrate=False
    calibrated: "Calibration | None" = None               # set by Calibration.apply

    @property
    def k(self) -> int:
        return max(1, int(round(self.fraction * self.n_heads_total)))


@dataclass(frozen=True)
class CalibrationSettings:
    sigmas: tuple[float, ...]      # ascending, > 0 (a log grid)
    n_problems: int                # the first n_problems of the plan's problems
    n_sets: int                    # random head sets
    target: float                  # relative accuracy of the random sets to aim at, in (0, 1)


def _positive_int(name: str, value, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer ({hint}); got {value!r}")


def check_settings(variants, fraction, n_random, perturbations, sigmas, max_new_tokens, batch_size, seed) -> None:
    """Raise ValueError naming the first bad setting (nothing is read or written)."""
    if isinstance(variants, str) or not isinstance(variants, (list, tuple)) or not variants:
        raise ValueError(f"variants must be a non-empty list of ranking variants (columns of rankings.csv), e.g. "
                         f"['rank_diff']; got {variants!r}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"fraction (share of heads perturbed per condition) must lie in (0, 1], e.g. 0.25 as in "
                         f"the paper; got {fraction!r}")
    if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 1:
        raise ValueError(f"n_random (random head sets) must be an integer >= 1, e.g. 10; got {n_random!r}")
    bad = [p for p in (perturbations if isinstance(perturbations, (list, tuple)) else [perturbations])
           if p not in PERTURBATIONS]
    if not isinstance(perturbations, (list, tuple)) or not perturbations or bad:
        raise ValueError(f"perturbations must be a non-empty list of {list(PERTURBATIONS)}; got {perturbations!r}")
    if "noise" in perturbations and sigmas is not None:        # None: the sigma comes from the calibration
        if not isinstance(sigmas, (list, tuple)) or not sigmas:
            raise ValueError(f"sigmas must be a non-empty list of noise levels >= 0 (units of the weights' "
                             f"standard deviation), e.g. [1.0]; got {sigmas!r}")
        neg = [s for s in sigmas if isinstance(s, bool) or not isinstance(s, (int, float)) or not s >= 0]
        if neg:
            raise ValueError(f"sigma must be >= 0 (noise standard deviation in units of the weights' standard "
                             f"deviation; 0 = no noise); bad values: {neg}")
    _positive_int("max_new_tokens", max_new_tokens, "tokens generated per answer at most, e.g. 48")
    _positive_int("batch_size", batch_size, "rows per forward pass")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer; got {seed!r}")


def check_calibration(calibrate, sigmas, n_problems, n_sets, target, perturbations) -> None:
    """Raise ValueError naming the first bad calibration setting."""
    if not isinstance(calibrate, bool):
        raise ValueError(f"calibrate must be true or false; got {calibrate!r}")
    if not calibrate:
        return
    if "noise" not in perturbations:
        raise ValueError(f"calibrate: true tunes the noise sigma, but perturbations={list(perturbations)} has no "
                         f"'noise': add 'noise' or set calibrate: false")
    bad = [s for s in (sigmas if isinstance(sigmas, (list, tuple)) else [sigmas])
           if isinstance(s, bool) or not isinstance(s, (int, float)) or not s > 0]
    if not isinstance(sigmas, (list, tuple)) or not sigmas or bad:
        raise ValueError(f"calibration_sigmas must be a non-empty list of noise levels > 0 (a log grid in units of "
                         f"the weights' sd, e.g. [0.05, 0.1, 0.2, 0.5, 1.0]); got {sigmas!r}")
    _positive_int("calibration_problems", n_problems, "problems of the dose sweep, e.g. 30")
    _positive_int("calibration_sets", n_sets, "random head sets of the dose sweep, e.g. 3")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target < 1:
        raise ValueError(f"target_relative_accuracy must lie in (0, 1) (random sets' accuracy / baseline accuracy "
                         f"to aim at; the paper's 44 / 58 = 0.76); got {target!r}")


def load_rankings(out_dir: Path, variants: list[str], model: str | None) -> pd.DataFrame:
    """rankings.csv (through lib.storage.artifacts), checked: every head once, the variants present and numeric, and (when
    activations.npz is there) produced from the same model."""
    rankings = artifacts.load("rankings", out_dir)
    p = artifacts.path("rankings", out_dir)
    if "head_idx" not in rankings.columns or sorted(rankings["head_idx"]) != list(range(len(rankings))):
        raise ArtifactError(f"{p}: head_idx must list every head 0..n-1 once; regenerate it with 04_ranking_variants")
    available = [c for c in rankings.columns if c not in ("head_idx", "layer", "head")]
    unknown = [v for v in variants if v not in available]
    if unknown:
        raise ValueError(f"unknown ranking variant(s) {unknown}: not columns of {p}; available: {available} (add the "
                         f"variant to 04_ranking_variants' `variants` and rerun 04, or pick an available one)")
    for v in variants:
        if not np.isfinite(pd.to_numeric(rankings[v], errors="coerce")).all():
            raise ArtifactError(f"{p}: column {v!r} has missing or non-numeric scores; regenerate it with 04")
    act_path = artifacts.path("activations", out_dir)
    if model is not None and act_path.exists():
        act = artifacts.load("activations", out_dir, keys=["model"])
        if "model" in act and str(act["model"]) != model:
            raise ArtifactError(f"{p} ranks the heads of model {str(act['model'])!r} (see {act_path.name}) but this "
                                f"notebook runs model={model!r}: set model to {str(act['model'])!r} or rerun "
                                f"notebooks 01-04 with {model!r}")
    return rankings


def check_rankings_model(rankings: pd.DataFrame, arch: ArchInfo, where: str = "rankings.csv") -> None:
    """The rankings' head map must be the model's (same layers x heads, layer-major)."""
    layer, head = arch.head_map()
    by_head = rankings.set_index("head_idx").sort_index()
    if len(rankings) != arch.total_heads or not (np.array_equal(by_head["layer"], layer)
                                                 and np.array_equal(by_head["head"], head)):
        raise ArtifactError(f"{where} has {len(rankings)} heads ({by_head['layer'].max() + 1} layers) but model "
                            f"{arch.source!r} has {arch.n_layers} layers x {arch.n_heads} heads: the rankings come "
                            f"from another model; rerun notebooks 01-04 with this model")


def prepare(out_dir, model: str | None = None, variants=("rank_diff",), fraction: float = 0.25, n_random: int = 10,
            perturbations=("noise",), sigmas=(1.0,), task: str = "arithmetic", n_problems: int | None = 100,
            difficulty: int = 2, task_seed: int = 0, seed: int = 0, max_new_tokens: int = 48, batch_size: int = 32,
            chat_template: bool = True, answer_prefix: str = tasks.ANSWER_PREFIX, calibrate: bool = False,
            calibration_sigmas=CALIBRATION_SIGMAS, calibration_problems: int = 30, calibration_sets: int = 3,
            target_relative_accuracy: float = TARGET_RELATIVE_ACCURACY) -> BehaviourPlan:
    """Validate every setting, the task set and rankings.csv (nothing is written) -> BehaviourPlan. With
    calibrate=True the plan must go through calibrate(...).apply(plan) before run_behaviour."""
    variants, perturbations = _as_list(variants), _as_list(perturbations)
    calibration_sigmas = _as_list(calibration_sigmas)
    sigmas = _as_list(sigmas) if "noise" in perturbations and calibrate is not True else []
    check_settings(variants, fraction, n_random, perturbations, None if calibrate is True else sigmas,
                   max_new_tokens, batch_size, seed)
    check_calibration(calibrate, calibration_sigmas, calibration_problems, calibration_sets,
                      target_relative_accuracy, perturbations)
    problems = tasks.load_task(task, n_problems, "test", difficulty, task_seed)
    out_dir = Path(out_dir)
    rankings = load_rankings(out_dir, variants, model)
    n_heads = int(rankings["head"].max()) + 1
    sets = head_sets(rankings, variants, float(fraction), n_random, seed, n_heads)
    cal = CalibrationSettings(tuple(sorted(float(s) for s in calibration_sigmas)),
                              min(int(calibration_problems), len(problems)), int(calibration_sets),
                              float(target_relative_accuracy)) if calibrate else None
    return BehaviourPlan(out_dir, model or "", problems, make_conditions(sets, perturbations, sigmas), variants,
                         float(fraction), n_random, perturbations, [float(s) for s in sigmas], seed, max_new_tokens,
                         batch_size, bool(chat_template), str(answer_prefix), task, len(rankings), sets, cal)


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def plan_table(plan: BehaviourPlan, n_heads: int) -> pd.DataFrame:
    """One row per head set: kind, variant, seed, number of heads and the first heads (layer.head)."""
    seen, rows = set(), []
    for c in plan.conditions:
        if (c.kind, c.variant, c.seed) in seen:
            continue
        seen.add((c.kind, c.variant, c.seed))
        rows.append({"kind": c.kind, "variant": c.variant, "seed": c.seed if c.seed >= 0 else "",
                     "n_heads": len(c.heads),
                     "heads (layer.head)": " ".join(f"{h // n_heads}.{h % n_heads}" for h in c.heads[:8])
                     + (" ..." if len(c.heads) > 8 else "")})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- generation

def weight_scale(arch: ArchInfo) -> float:
    """Standard deviation of all heads' query-projection rows and output-projection columns together (the unit
    of sigma)."""
    total, sq, count = 0.0, 0.0, 0
    for layer in range(arch.n_layers):
        slices = arch.block_param_slices(layer)
        for part in ("Q", "O"):
            weight, index = slices[part]
            for h in range(arch.n_heads):
                w = weight[index(h)].double()
                total, sq, count = total + float(w.sum()), sq + float((w * w).sum()), count + w.numel()
    mean = total / count
    return math.sqrt(max(sq / count - mean * mean, 0.0))


def eos_ids(model, tokenizer) -> set[int]:
    """End-of-sequence token ids: the generation config's and the tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(ids if isinstance(ids, (list, tuple)) else ([] if ids is None else [ids]))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def cache_kwarg(model) -> str:
    """Name of the forward's KV-cache argument: `cache` (newer transformers 5.x) or `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def greedy_generate(model, arch: ArchInfo, prompts: list[list[int]], width: int, max_new_tokens: int, pad_id: int,
                    stop: set[int], mask: torch.Tensor | None = None) -> list[list[int]]:
    """Greedy continuation of each prompt (left-padded to `width`) until a token of `stop` (not kept) or
    max_new_tokens; mask: [rows, total_heads] head mask or None. Finished rows leave the batch. -> ids per row."""
    device = next(model.parameters()).device
    ids, attn = (t.to(device) for t in left_pad(prompts, pad_id, width))
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    active = torch.arange(len(prompts), device=device)
    out_ids: list[list[int]] = [[] for _ in prompts]
    stop_t = torch.tensor(sorted(stop), device=device, dtype=torch.long)
    cache = DynamicCache(config=model.config)
    kw = {cache_kwarg(model): cache, "use_cache": True, "logits_to_keep": 1}
    with HeadHooks(arch, mask=None if mask is None else mask.to(device)) as hooks:
        out = model(input_ids=ids, attention_mask=attn, position_ids=pos, **kw)
        for step in range(max_new_tokens):
            token = out.logits[:, -1].argmax(-1)                                   # [active]
            done = torch.isin(token, stop_t)
            for r, t, d in zip(active.tolist(), token.tolist(), done.tolist()):
                if not d:
                    out_ids[r].append(t)
            keep = (~done).nonzero()[:, 0]
            if step == max_new_tokens - 1 or len(keep) == 0:
                break
            if len(keep) < len(active):
                active, token, attn, pos = active[keep], token[keep], attn[keep], pos[keep]
                cache.batch_select_indices(keep)
                if mask is not None:
                    hooks.mask = mask.to(device)[active]
            attn = torch.cat([attn, attn.new_ones(len(active), 1)], dim=1)
            pos = pos[:, -1:] + 1
            out = model(input_ids=token[:, None], attention_mask=attn, position_ids=pos, **kw)
    return out_ids


# ----------------------------------------------------------------------------- work units and checkpoint

@dataclass
class Unit:
    group: list[int]           # condition indices
    batch: int                 # problem batch index

    @property
    def name(self) -> str:
        return f"{self.group[0]}-{self.group[-1]}:{self.batch}"


def problem_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Problem indices sorted by prompt length (stable), cut into batches of batch_size."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def condition_groups(conditions: list[Condition]) -> list[list[int]]:
    """Conditions sharing forwards: baseline alone, all zero conditions together, each noise condition alone."""
    zero = [i for i, c in enumerate(conditions) if c.perturbation == "zero"]
    single = [[i] for i, c in enumerate(conditions) if c.perturbation != "zero"]
    return single[:1] + ([zero] if zero else []) + single[1:]


def fingerprint(plan: BehaviourPlan, arch: ArchInfo, dtype, tokenizer_name: str) -> dict:
    """Everything the generations depend on."""
    problems = hashlib.sha256(json.dumps([(p.id, p.question, p.answer) for p in plan.problems]).encode()).hexdigest()
    conds = hashlib.sha256(json.dumps([(c.key, c.heads) for c in plan.conditions]).encode()).hexdigest()
    return {"model": plan.model or arch.source, "weights_id": arch.weights_id, "dtype": str(dtype),
            "tokenizer": tokenizer_name, "problems_sha256": problems, "conditions_sha256": conds,
            "max_new_tokens": plan.max_new_tokens, "batch_size": plan.batch_size,
            "chat_template": plan.chat_template, "answer_prefix": plan.answer_prefix, "seed": plan.seed}


class Checkpoint:
    """Finished units of one run: a jsonl artifact, a header line then one line per unit (appended)."""

    def __init__(self, out_dir: Path, fp: dict):
        self.out_dir, self.fp = out_dir, fp
        self.key = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:12]
        self.rows: dict[str, list[dict]] = {}

    @property
    def path(self) -> Path:
        return artifacts.path("behaviour_checkpoint", self.out_dir, key=self.key)

    def open(self) -> "Checkpoint":
        if self.path.exists():
            lines = artifacts.load("behaviour_checkpoint", self.out_dir, key=self.key, torn_tail_ok=True)
            if not lines or lines[0].get("fingerprint") != self.fp:
                raise ArtifactError(f"{self.path} was written with other settings; delete it to start afresh")
            self.rows = {line["unit"]: line["rows"] for line in lines[1:]}
        artifacts.save("behaviour_checkpoint", self.out_dir,
                       [{"fingerprint": self.fp}] + [{"unit": u, "rows": r} for u, r in self.rows.items()],
                       key=self.key)
        return self

    def add(self, unit: str, rows: list[dict]) -> None:
        self.rows[unit] = rows
        artifacts.append("behaviour_checkpoint", self.out_dir, [{"unit": unit, "rows": rows}], key=self.key)


# ----------------------------------------------------------------------------- running

@dataclass
class Runner:
    """Generation state shared by the units of one run."""
    model: object
    tokenizer: object
    arch: ArchInfo
    plan: BehaviourPlan
    prompts: list[list[int]]
    batches: list[list[int]]
    scale: float
    stop: set[int]
    pad_id: int

    def generate(self, rows: list[tuple[int, int]], batch: int) -> list[list[int]]:
        """Rows [(condition, problem)] of one problem batch, all under the same weights."""
        width = max(len(self.prompts[p]) for p in self.batches[batch])
        conds = self.plan.conditions
        masks = None
        if any(conds[c].perturbation == "zero" for c, _ in rows):
            masks = torch.ones(len(rows), self.arch.total_heads)
            for r, (c, _) in enumerate(rows):
                if conds[c].perturbation == "zero" and conds[c].heads:
                    masks[r, list(conds[c].heads)] = 0.0
        return greedy_generate(self.model, self.arch, [self.prompts[p] for _, p in rows], width,
                               self.plan.max_new_tokens, self.pad_id, self.stop, masks)

    def run_unit(self, unit: Unit) -> list[dict]:
        plan, cond = self.plan, self.plan.conditions[unit.group[0]]
        rows = [(c, p) for c in unit.group for p in self.batches[unit.batch]]
        if cond.perturbation == "noise":
            with perturbed_heads(self.arch, cond.heads, cond.sigma * self.scale, plan.seed):
                generated = self.generate(rows, unit.batch)
        else:
            generated = []
            for s in range(0, len(rows), plan.batch_size):
                generated += self.generate(rows[s:s + plan.batch_size], unit.batch)
        return [self.record(c, p, ids) for (c, p), ids in zip(rows, generated)]

    def record(self, c: int, p: int, ids: list[int]) -> dict:
        cond, prob = self.plan.conditions[c], self.plan.problems[p]
        text = tasks.reply_text(self.tokenizer.decode(ids, skip_special_tokens=True), self.plan.answer_prefix)
        check = tasks.check_answer(text, prob.answer)
        return {"condition": cond.key, "kind": cond.kind, "variant": cond.variant, "seed": cond.seed,
                "perturbation": cond.perturbation, "sigma": cond.sigma, "problem": prob.id,
                "question": prob.question, "gold": prob.answer, "text": text, "n_tokens": len(ids),
                "extracted": check.extracted, "correct": check.correct, "method": check.method}


def check_model(plan: BehaviourPlan, arch: ArchInfo, tokenizer) -> None:
    if plan.model and arch.source and plan.model != arch.source:
        raise ValueError(f"the plan was prepared for model {plan.model!r} but the loaded model is {arch.source!r}")
    check_rankings_model(artifacts.load("rankings", plan.out_dir), arch, str(artifacts.path("rankings", plan.out_dir)))
    if plan.chat_template and not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat_template=True but this tokenizer has no chat template; set chat_template: false")


def run_behaviour(model, tokenizer, arch: ArchInfo, plan: BehaviourPlan, progress: bool = True,
                  on_unit: Callable[[Unit], None] | None = None) -> "BehaviourResult":
    """Generate and check every (condition, problem), resuming from the checkpoint; see the module docstring.
    on_unit(unit) is called after each unit computed in this process (tests check the weights there)."""
    t0 = time.perf_counter()
    if plan.calibration is not None and plan.calibrated is None:
        raise ValueError("this plan has calibrate=True: run calibration = calibrate(model, tokenizer, arch, plan) and "
                         "plan = calibration.apply(plan) before run_behaviour")
    check_model(plan, arch, tokenizer)
    prompts = [tasks.encode_problem(tokenizer, p, plan.chat_template, plan.answer_prefix) for p in plan.problems]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    runner = Runner(model, tokenizer, arch, plan, prompts, problem_batches([len(p) for p in prompts], plan.batch_size),
                    weight_scale(arch) if "noise" in plan.perturbations else 0.0, eos_ids(model, tokenizer), int(pad))
    ckpt = Checkpoint(plan.out_dir, fingerprint(plan, arch, next(model.parameters()).dtype,
                                                getattr(tokenizer, "name_or_path", ""))).open()
    units = [Unit(g, b) for g in condition_groups(plan.conditions) for b in range(len(runner.batches))]
    todo = [u for u in units if u.name not in ckpt.rows]
    bar = tqdm(total=len(units), initial=len(units) - len(todo), desc="behaviour", unit="batch", disable=not progress)
    for unit in todo:
        ckpt.add(unit.name, runner.run_unit(unit))
        bar.update(1)
        bar.set_postfix(condition=plan.conditions[unit.group[0]].key[:40])
        if on_unit is not None:
            on_unit(unit)
    bar.close()
    rows = [r for u in units for r in ckpt.rows[u.name]]
    return BehaviourResult.from_rows(plan, rows, runner.scale, time.perf_counter() - t0, len(todo), ckpt.path)


# ----------------------------------------------------------------------------- dose calibration

CALIBRATION_COLUMNS = ["kind", "seed", "sigma", "n_problems", "n_correct", "accuracy", "ci_low", "ci_high",
                       "relative_accuracy", "relative_ci_low", "relative_ci_high", "target", "chosen_sigma"]


def pick_sigma(sigmas, relative, target: float) -> tuple[float, float, str]:
    """The sigma at which the random sets' relative accuracy (mean accuracy / baseline accuracy) first falls below
    `target`: linear interpolation in log sigma between the last grid point at or above the target and the first one
    below it, rounded to 3 significant digits. sigmas [grid] ascending > 0, relative [grid] ->
    (sigma, relative accuracy there (interpolated: the target), how it was chosen). Off the grid's range: the
    smallest sigma (already below the target) or the largest (never below), said in the note."""
    s, r = np.asarray(sigmas, dtype=float), np.asarray(relative, dtype=float)
    if not np.isfinite(r).all():
        return float(s[0]), math.nan, (f"baseline accuracy 0 on the calibration problems: relative accuracy is "
                                       f"undefined; smallest sigma {s[0]:g} used (use an easier task or more problems)")
    below = np.nonzero(r < target)[0]
    if len(below) == 0:
        return float(s[-1]), float(r[-1]), (f"random sets keep {r[-1]:.2f} of the baseline even at the largest sigma "
                                            f"{s[-1]:g} (target {target:g}): largest sigma used; extend "
                                            f"calibration_sigmas upwards")
    i = int(below[0])
    if i == 0:
        return float(s[0]), float(r[0]), (f"random sets keep only {r[0]:.2f} of the baseline at the smallest sigma "
                                          f"{s[0]:g} (target {target:g}): smallest sigma used; extend "
                                          f"calibration_sigmas downwards")
    t = (r[i - 1] - target) / (r[i - 1] - r[i])
    sigma = float(f"{math.exp(math.log(s[i - 1]) + t * (math.log(s[i]) - math.log(s[i - 1]))):.3g}")
    return sigma, float(target), (f"interpolated in log sigma between {s[i - 1]:g} (random sets keep {r[i - 1]:.2f} "
                                  f"of the baseline) and {s[i]:g} ({r[i]:.2f}) to the target {target:g}")


def calibration_head_sets(plan: BehaviourPlan) -> list[tuple[int, tuple[int, ...]]]:
    """(seed, heads) of the calibration's random sets: the first k heads of default_rng(seed + 1000 + i)'s
    permutation of the heads (as lib.experiments.ablation's random orders), so they are not the main random sets."""
    seeds = [plan.seed + CALIBRATION_SEED_OFFSET + i for i in range(plan.calibration.n_sets)]
    return [(s, tuple(sorted(int(h) for h in np.random.default_rng(s).permutation(plan.n_heads_total)[:plan.k])))
            for s in seeds]


def calibration_plan(plan: BehaviourPlan) -> BehaviourPlan:
    """The sweep as a plan of its own: baseline + every calibration set at every calibration sigma, on the first
    calibration.n_problems problems (its own checkpoint, resumable like the main run)."""
    cal = plan.calibration
    conds = [Condition("baseline", "", -1, (), "none")] + [
        Condition("random", "", seed, heads, "noise", sigma) for sigma in cal.sigmas
        for seed, heads in calibration_head_sets(plan)]
    return replace(plan, problems=plan.problems[:cal.n_problems], conditions=conds, perturbations=["noise"],
                   sigmas=list(cal.sigmas), n_random=cal.n_sets, calibration=None, calibrated=None)


@dataclass
class Calibration:
    """The dose sweep's outcome (settings None: calibrate=False, nothing was run)."""
    settings: CalibrationSettings | None
    sigma: float | None            # the chosen sigma
    relative_at_sigma: float       # the sweep's relative accuracy of the random sets there (interpolated)
    note: str                      # how the sigma was chosen
    table: pd.DataFrame            # behaviour_calibration.csv: CALIBRATION_COLUMNS
    seconds: float = 0.0

    @classmethod
    def off(cls) -> "Calibration":
        return cls(None, None, math.nan, "calibrate: false: the given sigmas are used",
                   pd.DataFrame(columns=CALIBRATION_COLUMNS))

    @classmethod
    def from_result(cls, settings: CalibrationSettings, result: "BehaviourResult") -> "Calibration":
        """Pick the sigma from the sweep's generations (result of calibration_plan)."""
        base, sigmas = result.correct[0], list(settings.sigmas)
        # [sigmas, sets, problems]
        rnd = np.stack([result.correct[result.index("random", "noise", s)] for s in sigmas])
        seeds = [c.seed for c in result.plan.conditions if c.kind == "random" and c.sigma == sigmas[0]]
        relative = [relative_accuracy(r, base, seed=result.plan.seed)[0] for r in rnd]
        sigma, at, note = pick_sigma(sigmas, relative, settings.target)
        table = calibration_table(base, rnd, sigmas, seeds, settings.target, sigma, result.plan.seed)
        return cls(settings, sigma, at, note, table, result.seconds)

    def apply(self, plan: BehaviourPlan) -> BehaviourPlan:
        """The plan's main conditions at the chosen sigma (the plan itself when calibration is off)."""
        if self.settings is None:
            return plan
        if plan.calibration != self.settings:
            raise ValueError("this calibration was made with other calibration settings than the plan's; rerun "
                             "calibrate(model, tokenizer, arch, plan) on this plan")
        return replace(plan, sigmas=[self.sigma], calibrated=self,
                       conditions=make_conditions(plan.sets, plan.perturbations, [self.sigma]))


def calibrate(model, tokenizer, arch: ArchInfo, plan: BehaviourPlan, progress: bool = True) -> Calibration:
    """Run the dose sweep of a plan prepared with calibrate=True and pick the sigma (Calibration.off() otherwise)."""
    if plan.calibration is None:
        return Calibration.off()
    return Calibration.from_result(plan.calibration, run_behaviour(model, tokenizer, arch, calibration_plan(plan),
                                                                   progress))


def calibration_table(base: np.ndarray, rnd: np.ndarray, sigmas: list[float], seeds: list[int], target: float,
                      chosen: float, seed: int = 0) -> pd.DataFrame:
    """behaviour_calibration.csv. base [problems] bool, rnd [sigmas, sets, problems] bool. Rows: the baseline
    (sigma 0), every random set at every sigma (Clopper-Pearson CI), and per sigma the sets' mean ("random_mean":
    accuracy and relative accuracy with paired bootstrap CIs over problems)."""
    n = len(base)
    rows = [_cal_row("baseline", -1, 0.0, base[None], base, seed)]
    for sigma, block in zip(sigmas, rnd):
        rows += [_cal_row("random", s, sigma, block[j:j + 1], base, seed) for j, s in enumerate(seeds)]
        rows.append(_cal_row("random_mean", -1, sigma, block, base, seed))
    frame = pd.DataFrame(rows)
    frame.insert(3, "n_problems", n)
    return frame.assign(target=target, chosen_sigma=chosen)[CALIBRATION_COLUMNS]


def _cal_row(kind: str, seed: int, sigma: float, sets: np.ndarray, base: np.ndarray, boot_seed: int) -> dict:
    """One calibration row: sets [sets, problems] bool (one set: Clopper-Pearson CI; several: bootstrap CI of the
    mean over sets)."""
    acc = float(sets.mean())
    lo, hi = clopper_pearson(int(sets[0].sum()), sets.shape[1]) if len(sets) == 1 else \
        _quantiles(_boot_indices(sets.shape[1], 2000, boot_seed), lambda idx: sets[:, idx].mean(-1).mean(0))
    rel, rel_lo, rel_hi = relative_accuracy(sets, base, seed=boot_seed)
    return {"kind": kind, "seed": seed, "sigma": float(sigma), "n_correct": float(sets.sum(-1).mean()),
            "accuracy": acc, "ci_low": lo, "ci_high": hi, "relative_accuracy": rel, "relative_ci_low": rel_lo,
            "relative_ci_high": rel_hi}


# ----------------------------------------------------------------------------- statistics

def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact binomial CI of k successes out of n."""
    from scipy.stats import beta
    if n == 0:
        return (math.nan, math.nan)
    lo = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def mcnemar(a: np.ndarray, b: np.ndarray) -> float:
    """Exact (binomial) McNemar p-value, two-sided, of paired correctness vectors a, b (same problems)."""
    from scipy.stats import binomtest
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    return 1.0 if only_a + only_b == 0 else float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def percentile_among(value: float, others: np.ndarray) -> float:
    """Percent of `others` below `value` (ties count half): 0 = worse than every random set."""
    return float(100 * (np.sum(others < value) + 0.5 * np.sum(others == value)) / len(others))


def _boot_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n] problem indices drawn with replacement (the same draw for every paired statistic)."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _quantiles(idx: np.ndarray, stat) -> tuple[float, float]:
    values = stat(idx)
    return float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))


def paired_difference_ci(cond: np.ndarray, random: np.ndarray, n_boot: int = 2000, seed: int = 0) -> list[float]:
    """95% bootstrap CI (problems resampled, paired) of accuracy(cond) - mean accuracy of the random sets.
    cond [problems] bool, random [sets, problems] bool."""
    idx = _boot_indices(len(cond), n_boot, seed)
    return list(_quantiles(idx, lambda i: cond[i].mean(-1) - random[:, i].mean(-1).mean(0)))


def relative_difference(cond: np.ndarray, random: np.ndarray, base: np.ndarray, n_boot: int = 2000,
                        seed: int = 0) -> dict:
    """(accuracy(cond) - mean accuracy(random sets)) / accuracy(baseline) with its paired bootstrap: the problems
    of each replicate are drawn once (paired_difference_ci's draw) for cond, every random set and the baseline,
    and the replicate's difference is divided by the replicate's baseline accuracy (replicates with baseline 0
    dropped). cond [problems] bool, random [sets, problems] bool, base [problems] bool ->
    {value, ci95, se (sd of the replicates), n_boot (replicates kept)}; NaN when the baseline has no correct answer."""
    idx = _boot_indices(len(cond), n_boot, seed)
    diff, b = cond[idx].mean(-1) - random[:, idx].mean(-1).mean(0), base[idx].mean(-1)
    rel = diff[b > 0] / b[b > 0]
    value = (cond.mean() - random.mean(-1).mean()) / base.mean() if base.any() else math.nan
    ci = [float(np.quantile(rel, 0.025)), float(np.quantile(rel, 0.975))] if len(rel) else [math.nan, math.nan]
    return {"value": float(value), "ci95": ci, "se": float(rel.std(ddof=1)) if len(rel) > 1 else math.nan,
            "n_boot": int(len(rel))}


def relative_accuracy(random: np.ndarray, base: np.ndarray, n_boot: int = 2000,
                      seed: int = 0) -> tuple[float, float, float]:
    """Mean accuracy of the random sets / baseline accuracy, with the paired bootstrap CI of relative_difference
    (random [sets, problems] bool, base [problems] bool) -> (value, ci low, ci high); NaN without baseline."""
    zero = np.zeros(random.shape[1], dtype=bool)
    r = relative_difference(zero, random, base, n_boot, seed)         # (0 - mean random) / baseline
    return 0.0 - r["value"], 0.0 - r["ci95"][1], 0.0 - r["ci95"][0]          # 0.0 - x: no "-0.0"


def floor_ceiling(baseline_correct: int, random_correct, n: int) -> dict:
    """Validity of a synergistic-vs-random comparison: invalid when the random sets' mean number of correct problems
    lies within margin = max(2, 5 % of n) problems of 0 (floor) or of the baseline's number correct (ceiling).
    random_correct [sets] -> {valid, reason, margin, random_mean_correct, baseline_correct, n}."""
    mean, margin = float(np.mean(random_correct)), max(2.0, 0.05 * n)
    where = f"random sets at {mean:.1f}/{n} problems, baseline {baseline_correct}/{n}"
    floor, ceiling = mean <= margin, mean >= baseline_correct - margin
    problems = [f"floor (within {margin:g} problems of 0)"] * floor + \
               [f"ceiling (within {margin:g} problems of the baseline)"] * ceiling
    reason = (" and ".join(problems) + ": " + where) if problems else \
        f"{where}: more than {margin:g} problems from 0 and from the baseline"
    return {"valid": not problems, "reason": reason, "margin": margin, "random_mean_correct": mean,
            "baseline_correct": int(baseline_correct), "n": int(n)}


@dataclass
class BehaviourResult:
    plan: BehaviourPlan
    rows: list[dict]                 # one per (condition, problem), the generations
    correct: np.ndarray              # bool [conditions, problems]
    scale: float                     # weight standard deviation (unit of sigma)
    seconds: float = 0.0
    units_computed: int = 0
    checkpoint: Path | None = None
    table: pd.DataFrame = field(default_factory=pd.DataFrame)

    @classmethod
    def from_rows(cls, plan, rows, scale, seconds=0.0, computed=0, checkpoint=None) -> "BehaviourResult":
        ci = {c.key: i for i, c in enumerate(plan.conditions)}
        pi = {p.id: j for j, p in enumerate(plan.problems)}
        correct = np.zeros((len(plan.conditions), len(plan.problems)), dtype=bool)
        for r in rows:
            correct[ci[r["condition"]], pi[r["problem"]]] = r["correct"]
        order = sorted(rows, key=lambda r: (ci[r["condition"]], pi[r["problem"]]))
        result = cls(plan, order, correct, scale, seconds, computed, checkpoint)
        result.table = result.make_table()
        return result

    def index(self, kind: str, perturbation: str | None = None, sigma: float | None = None,
              variant: str | None = None) -> list[int]:
        return [i for i, c in enumerate(self.plan.conditions) if c.kind == kind
                and (perturbation is None or c.perturbation == perturbation)
                and (sigma is None or c.sigma == sigma) and (variant is None or c.variant == variant)]

    def settings(self) -> list[tuple[str, float]]:
        """(perturbation, sigma) of every perturbed block, in plan order."""
        return list(dict.fromkeys((c.perturbation, c.sigma) for c in self.plan.conditions if c.kind != "baseline"))

    def make_table(self) -> pd.DataFrame:
        """behaviour.csv: per condition accuracy with Clopper-Pearson CI, McNemar p vs each random set of the same
        perturbation (median over sets) and the percentile among the random sets' accuracies."""
        n = len(self.plan.problems)
        rows = []
        for i, c in enumerate(self.plan.conditions):
            k = int(self.correct[i].sum())
            lo, hi = clopper_pearson(k, n)
            rnd = self.index("random", c.perturbation, c.sigma) if c.kind != "baseline" else []
            p_each = [mcnemar(self.correct[i], self.correct[j]) for j in rnd if j != i]
            rows.append({"condition": c.key, "kind": c.kind, "variant": c.variant, "seed": c.seed,
                         "perturbation": c.perturbation, "sigma": c.sigma, "n_heads": len(c.heads),
                         "n_problems": n, "n_correct": k, "accuracy": k / n, "ci_low": lo, "ci_high": hi,
                         "mcnemar_p": float(np.median(p_each)) if p_each and c.kind != "random" else np.nan,
                         "percentile_among_random": percentile_among(k / n, self.correct[rnd].mean(-1))
                         if rnd and c.kind != "random" else np.nan})
        return pd.DataFrame(rows)

    def variant_tests(self, perturbation: str, sigma: float, variant: str) -> dict:
        """Synergistic vs random of one block: accuracies with CIs, difference with its paired CI, McNemar, percentile."""
        t = self.table.set_index("condition")
        rnd = self.index("random", perturbation, sigma)
        syn = self.index("synergistic", perturbation, sigma, variant)[0]
        acc = lambda i: {"accuracy": float(t.iloc[i]["accuracy"]),       # noqa: E731
                         "ci95": [float(t.iloc[i]["ci_low"]), float(t.iloc[i]["ci_high"])]}
        rnd_acc = self.correct[rnd].mean(-1)
        return {"synergistic": acc(syn), "redundant": acc(self.index("redundant", perturbation, sigma, variant)[0]),
                "layer_matched": acc(self.index("layer_matched", perturbation, sigma, variant)[0]),
                "random_mean": float(rnd_acc.mean()), "random_sd": float(rnd_acc.std(ddof=1)) if len(rnd) > 1 else None,
                "syn_minus_random": float(self.correct[syn].mean() - rnd_acc.mean()),
                "syn_minus_random_ci95": paired_difference_ci(self.correct[syn], self.correct[rnd], seed=self.plan.seed),
                "mcnemar_p_median": float(t.iloc[syn]["mcnemar_p"]),
                "mcnemar_p_each": [mcnemar(self.correct[syn], self.correct[j]) for j in rnd],
                "percentile_among_random": float(t.iloc[syn]["percentile_among_random"]),
                "relative": {kind: self.relative(perturbation, sigma, kind, variant)
                             for kind in ("synergistic", "redundant", "layer_matched")}}

    def relative(self, perturbation: str, sigma: float, kind: str, variant: str) -> dict:
        """relative_difference of one head set (kind, variant) against the random sets of the same setting."""
        cond = self.correct[self.index(kind, perturbation, sigma, variant)[0]]
        return relative_difference(cond, self.correct[self.index("random", perturbation, sigma)],
                                   self.correct[self.index("baseline")[0]], seed=self.plan.seed)

    def validity(self, perturbation: str, sigma: float) -> dict:
        """floor_ceiling of one setting's random sets against the baseline."""
        counts = self.correct[self.index("random", perturbation, sigma)].sum(-1)
        return floor_ceiling(int(self.correct[self.index("baseline")[0]].sum()), counts, len(self.plan.problems))

    def relative_random(self, perturbation: str, sigma: float) -> float:
        """Mean accuracy of the setting's random sets / baseline accuracy (the dose actually reached)."""
        base = self.correct[self.index("baseline")[0]].mean()
        rnd = self.correct[self.index("random", perturbation, sigma)].mean()
        return float(rnd / base) if base > 0 else math.nan

    def calibration_block(self, perturbation: str, sigma: float) -> dict:
        cal = self.plan.calibrated or Calibration.off()
        return {"calibrated": cal.settings is not None, "sigma": sigma if perturbation == "noise" else None,
                "relative_accuracy_random": self.relative_random(perturbation, sigma),
                "target": cal.settings.target if cal.settings else TARGET_RELATIVE_ACCURACY,
                "relative_accuracy_random_sweep": cal.relative_at_sigma,
                "sigmas": list(cal.settings.sigmas) if cal.settings else [], "note": cal.note}

    def sample_sizes(self) -> dict:
        cal = self.plan.calibration
        return {"problems": len(self.plan.problems), "random_sets": self.plan.n_random, "heads_per_set": self.plan.k,
                "heads_total": self.plan.n_heads_total, "variants": len(self.plan.variants),
                "calibration_problems": cal.n_problems if cal else 0,
                "calibration_random_sets": cal.n_sets if cal else 0,
                "calibration_sigmas": len(cal.sigmas) if cal else 0}

    def claim(self) -> dict:
        """The C6 block: first variant, first perturbation setting (see CLAIM_INPUTS / lib.claims). value: the
        relative accuracy difference (relative_difference); the absolute difference is in details["absolute"]."""
        perturbation, sigma = self.settings()[0]
        variant = self.plan.variants[0]
        tests = self.variant_tests(perturbation, sigma, variant)
        rel = tests["relative"]["synergistic"]
        rnd_acc = self.correct[self.index("random", perturbation, sigma)].mean(-1)
        base = self.table.iloc[self.index("baseline")[0]]
        spread = (rnd_acc - rnd_acc.mean()) / base["accuracy"] if base["accuracy"] > 0 else \
            np.full(len(rnd_acc), np.nan)
        unit = f", sigma {sigma:g} weight sd" if perturbation == "noise" else ""
        return {"id": "C6",
                "statistic": f"(accuracy(top {self.plan.fraction:.0%} synergistic heads perturbed) - mean accuracy("
                             f"random sets)) / accuracy(baseline), {perturbation}{unit}, variant {variant} (relative "
                             f"accuracy difference; paired bootstrap CI over problems, each replicate divided by its "
                             f"own baseline accuracy)",
                "value": rel["value"], "ci95": rel["ci95"], "se": rel["se"],
                "null": {"name": f"spread of {len(rnd_acc)} random head sets ((accuracy - their mean) / baseline "
                                 f"accuracy)", "value": 0.0,
                         "ci95": [float(np.quantile(spread, 0.025)), float(np.quantile(spread, 0.975))]},
                "direction": "less", "paper": PAPER, "paper_effect": PAPER_EFFECT,
                "paper_effect_note": PAPER_EFFECT_NOTE, "n": len(self.plan.problems),
                "validity": {k: v for k, v in self.validity(perturbation, sigma).items() if k in ("valid", "reason")},
                "sample_sizes": self.sample_sizes(),
                "by_variant": {v: {k: {"value": r["value"], "ci95": r["ci95"], "se": r["se"]}
                                   for k, r in self.variant_tests(perturbation, sigma, v)["relative"].items()}
                               for v in self.plan.variants},
                "calibration": self.calibration_block(perturbation, sigma),
                "details": {"perturbation": perturbation, "sigma": sigma, "variant": variant,
                            "baseline": {"accuracy": float(base["accuracy"]),
                                         "ci95": [float(base["ci_low"]), float(base["ci_high"])]},
                            "absolute": {"value": tests["syn_minus_random"], "ci95": tests["syn_minus_random_ci95"],
                                         "null_ci95": [float(np.quantile(rnd_acc - rnd_acc.mean(), q))
                                                       for q in (0.025, 0.975)],
                                         "paper": -0.16, "unit": "accuracy points, 0-1 scale"},
                            "validity": self.validity(perturbation, sigma),
                            "validity_per_setting": {f"{p}/{s:g}": self.validity(p, s) for p, s in self.settings()},
                            "per_variant": {v: self.variant_tests(perturbation, sigma, v) for v in self.plan.variants},
                            "per_setting": {f"{p}/{s:g}": {v: self.variant_tests(p, s, v) for v in self.plan.variants}
                                            for p, s in self.settings()}}}

    def summary(self) -> dict:
        p = self.plan
        claim = self.claim()
        return {"claim": claim, "model": p.model, "task": p.task, "n_problems": len(p.problems),
                "variants": p.variants, "fraction": p.fraction, "k_heads": p.k, "n_random": p.n_random,
                "perturbations": p.perturbations, "sigmas": p.sigmas, "weight_sd": self.scale,
                "max_new_tokens": p.max_new_tokens, "chat_template": p.chat_template,
                "answer_prefix": p.answer_prefix, "seed": p.seed, "calibration": claim["calibration"]
                | {"seconds": (p.calibrated.seconds if p.calibrated else 0.0)}, "validity": claim["validity"],
                "seconds": self.seconds}

    def sigma_curve(self) -> pd.DataFrame:
        """Accuracy vs sigma per kind (random: mean and sd over sets) for the noise conditions, plus sigma 0 =
        baseline."""
        t = self.table[self.table.perturbation == "noise"]
        g = t.groupby(["sigma", "kind", "variant"], sort=True)["accuracy"]
        out = g.agg(accuracy="mean", sd="std", n_sets="count").reset_index()
        return out

    def examples(self, n: int = 2) -> pd.DataFrame:
        """The first n generations of each non-random condition and of the first random set."""
        keep = {c.key for c in self.plan.conditions if c.kind != "random"}
        first_random = [c.key for c in self.plan.conditions if c.kind == "random"][:1]
        rows = [r for r in self.rows if r["condition"] in keep | set(first_random)]
        frame = pd.DataFrame(rows)
        return frame.groupby("condition", sort=False).head(n)[["condition", "question", "gold", "text", "extracted",
                                                               "correct"]]

    def save(self, out_dir=None) -> list[Path]:
        """behaviour.csv, behaviour_calibration.csv (header only when calibrate is false),
        behaviour_generations.jsonl, behaviour_summary.json (atomic, lib.storage.artifacts) and the manifest entry of 09."""
        from lib.storage.store import update_manifest
        out_dir = Path(out_dir or self.plan.out_dir)
        summary = self.summary()
        paths = [artifacts.save("behaviour", out_dir, self.table),
                 artifacts.save("behaviour_calibration", out_dir, (self.plan.calibrated or Calibration.off()).table),
                 artifacts.save("behaviour_generations", out_dir, self.rows),
                 artifacts.save("behaviour_summary", out_dir, summary)]
        update_manifest(out_dir, "09_task_behaviour", {k: v for k, v in summary.items() if k != "claim"}
                        | {"files": [p.name for p in paths], "c6_value": summary["claim"]["value"]})
        return paths
