"""Task accuracy under head perturbation (notebook 09, the paper's Fig 4b).

For every condition the model answers every problem of a task set (lib.tasks) by greedy generation of up to
`max_new_tokens` (a row stops at an end-of-sequence token); the reply is checked with lib.tasks.check_answer.

Conditions (k = max(1, round(fraction * total heads)) heads each):
- baseline: no perturbation;
- synergistic: the top k heads of each ranking variant (rankings.csv, descending score, ties by lower index);
- redundant: the k heads at the other end of the same order (most redundant first);
- random: `n_random` random sets, default_rng(seed + i).permutation(heads)[:k] (lib.ablation's random orders);
- layer_matched: per variant, a random set with as many heads in each layer as that variant's synergistic set
  (the first k heads of lib.ablation's layer-matched random order).
Perturbations (lib.ablation's, reused): "zero" multiplies the heads' outputs by 0 (lib.heads.HeadHooks mask, one
row per (condition, problem)); "noise" adds N(0, (sigma * s)^2) to the heads' query-projection rows and
output-projection columns (lib.ablation.perturbed_heads, noise of head h fixed by (seed, h), so a head is perturbed
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

Resumable: the work units are (condition group, problem batch), with group = all zero conditions of one
perturbation, or one baseline / noise condition; after every unit its rows are appended to
behaviour_checkpoint_<settings hash>.jsonl (lib.artifacts), so a rerun with the same settings continues where it
stopped with identical results.

    plan = prepare("outputs/run", model="bundled:smollm2-135m", variants=["rank_diff"], sigmas=[1.0])
    result = run_behaviour(model, tokenizer, arch, plan)     # BehaviourResult
    result.save("outputs/run")                               # behaviour.csv, behaviour_generations.jsonl, summary
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from lib import artifacts, tasks
from lib.ablation import make_orderings, perturbed_heads
from lib.extract import left_pad
from lib.heads import HeadHooks
from lib.models import ArchInfo
from lib.store import ArtifactError

PERTURBATIONS = ("zero", "noise")
KINDS = ("baseline", "synergistic", "redundant", "random", "layer_matched")
PAPER = {"value": -0.16,
         "text": "Gemma-3-4B MATH accuracy: baseline 58, redundant 52, random 44, synergistic 28 (%; read off "
                 "Fig 4b, approximate; sigma not stated): synergistic - random = -16 points"}

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
    then the random sets: lib.ablation.make_orderings' ranking, reverse, layer-matched and random orders, cut after
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

    @property
    def k(self) -> int:
        return max(1, int(round(self.fraction * self.n_heads_total)))


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
    if "noise" in perturbations:
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


def load_rankings(out_dir: Path, variants: list[str], model: str | None) -> pd.DataFrame:
    """rankings.csv (through lib.artifacts), checked: every head once, the variants present and numeric, and (when
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
            chat_template: bool = True, answer_prefix: str = tasks.ANSWER_PREFIX) -> BehaviourPlan:
    """Validate every setting, the task set and rankings.csv (nothing is written) -> BehaviourPlan."""
    variants, perturbations = _as_list(variants), _as_list(perturbations)
    sigmas = _as_list(sigmas) if "noise" in perturbations else []
    check_settings(variants, fraction, n_random, perturbations, sigmas, max_new_tokens, batch_size, seed)
    problems = tasks.load_task(task, n_problems, "test", difficulty, task_seed)
    out_dir = Path(out_dir)
    rankings = load_rankings(out_dir, variants, model)
    n_heads = int(rankings["head"].max()) + 1
    sets = head_sets(rankings, variants, float(fraction), n_random, seed, n_heads)
    return BehaviourPlan(out_dir, model or "", problems, make_conditions(sets, perturbations, sigmas), variants,
                         float(fraction), n_random, perturbations, [float(s) for s in sigmas], seed, max_new_tokens,
                         batch_size, bool(chat_template), str(answer_prefix), task, len(rankings))


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


def paired_difference_ci(cond: np.ndarray, random: np.ndarray, n_boot: int = 2000, seed: int = 0) -> list[float]:
    """95% bootstrap CI (problems resampled, paired) of accuracy(cond) - mean accuracy of the random sets.
    cond [problems] bool, random [sets, problems] bool."""
    idx = np.random.default_rng(seed).integers(0, len(cond), size=(n_boot, len(cond)))
    diff = cond[idx].mean(-1) - random[:, idx].mean(-1).mean(0)
    return [float(np.quantile(diff, 0.025)), float(np.quantile(diff, 0.975))]


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
                "percentile_among_random": float(t.iloc[syn]["percentile_among_random"])}

    def claim(self) -> dict:
        """The C6 block: first variant, first perturbation setting (see CLAIM_INPUTS / lib.claims)."""
        perturbation, sigma = self.settings()[0]
        variant = self.plan.variants[0]
        tests = self.variant_tests(perturbation, sigma, variant)
        rnd_acc = self.correct[self.index("random", perturbation, sigma)].mean(-1)
        spread = rnd_acc - rnd_acc.mean()
        base = self.table.iloc[self.index("baseline")[0]]
        unit = f", sigma {sigma:g} weight sd" if perturbation == "noise" else ""
        return {"id": "C6",
                "statistic": f"accuracy(top {self.plan.fraction:.0%} synergistic heads perturbed) - mean accuracy("
                             f"random sets), {perturbation}{unit}, variant {variant} (accuracy points, 0-1 scale)",
                "value": tests["syn_minus_random"], "ci95": tests["syn_minus_random_ci95"],
                "null": {"name": f"spread of {len(rnd_acc)} random head sets (accuracy minus their mean)", "value": 0.0,
                         "ci95": [float(np.quantile(spread, 0.025)), float(np.quantile(spread, 0.975))]},
                "direction": "less", "paper": PAPER, "n": len(self.plan.problems),
                "details": {"perturbation": perturbation, "sigma": sigma, "variant": variant,
                            "baseline": {"accuracy": float(base["accuracy"]),
                                         "ci95": [float(base["ci_low"]), float(base["ci_high"])]},
                            "per_variant": {v: self.variant_tests(perturbation, sigma, v) for v in self.plan.variants},
                            "per_setting": {f"{p}/{s:g}": {v: self.variant_tests(p, s, v) for v in self.plan.variants}
                                            for p, s in self.settings()}}}

    def summary(self) -> dict:
        p = self.plan
        return {"claim": self.claim(), "model": p.model, "task": p.task, "n_problems": len(p.problems),
                "variants": p.variants, "fraction": p.fraction, "k_heads": p.k, "n_random": p.n_random,
                "perturbations": p.perturbations, "sigmas": p.sigmas, "weight_sd": self.scale,
                "max_new_tokens": p.max_new_tokens, "chat_template": p.chat_template,
                "answer_prefix": p.answer_prefix, "seed": p.seed,
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
        """behaviour.csv, behaviour_generations.jsonl, behaviour_summary.json (atomic, lib.artifacts) and the
        manifest entry of notebook 09."""
        from lib.store import update_manifest
        out_dir = Path(out_dir or self.plan.out_dir)
        summary = self.summary()
        paths = [artifacts.save("behaviour", out_dir, self.table),
                 artifacts.save("behaviour_generations", out_dir, self.rows),
                 artifacts.save("behaviour_summary", out_dir, summary)]
        update_manifest(out_dir, "09_task_behaviour", {k: v for k, v in summary.items() if k != "claim"}
                        | {"files": [p.name for p in paths], "c6_value": summary["claim"]["value"]})
        return paths
