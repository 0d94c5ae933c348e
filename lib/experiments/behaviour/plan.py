"""The behaviour experiment's plan (notebook 09): its conditions (no heads, synergistic, redundant, random
sets; noise dose sigma) and the checks of its settings."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from lib.storage import artifacts
from lib.experiments import tasks
from lib.experiments.ablation import make_orderings
from lib.model.architectures import ArchInfo
from lib.storage.store import ArtifactError, run_folder
from lib.storage.notebooks import NB

__all__ = ["PERTURBATIONS", "KINDS", "PAPER_EFFECT", "PAPER_EFFECT_NOTE", "PAPER", "Condition", "head_sets",
           "make_conditions", "check_settings", "load_rankings", "check_rankings_model", "prepare", "plan_table", "Calibration"]


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
        raise ArtifactError(f"{p}: head_idx must list every head 0..n-1 once; regenerate it with {NB.RANKING}")
    available = [c for c in rankings.columns if c not in ("head_idx", "layer", "head")]
    unknown = [v for v in variants if v not in available]
    if unknown:
        raise ValueError(f"unknown ranking variant(s) {unknown}: not columns of {p}; available: {available} (add the "
                         f"variant to {NB.RANKING}' `variants` and rerun 04, or pick an available one)")
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
    out_dir = run_folder(out_dir)
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


CALIBRATION_COLUMNS = ["kind", "seed", "sigma", "n_problems", "n_correct", "accuracy", "ci_low", "ci_high",
                       "relative_accuracy", "relative_ci_low", "relative_ci_high", "target", "chosen_sigma"]


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

    def apply(self, plan: BehaviourPlan) -> BehaviourPlan:
        """The plan's main conditions at the chosen sigma (the plan itself when calibration is off)."""
        if self.settings is None:
            return plan
        if plan.calibration != self.settings:
            raise ValueError("this calibration was made with other calibration settings than the plan's; rerun "
                             "calibrate(model, tokenizer, arch, plan) on this plan")
        return replace(plan, sigmas=[self.sigma], calibrated=self,
                       conditions=make_conditions(plan.sets, plan.perturbations, [self.sigma]))
