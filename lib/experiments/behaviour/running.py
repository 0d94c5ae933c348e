"""Running the behaviour experiment: greedy generation under head noise, the work units and their
checkpoint, resumable and shardable."""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from lib.storage import artifacts
from lib.experiments import tasks
from lib.experiments.ablation import perturbed_heads
from lib.experiments.extract import left_pad
from lib.model.heads import HeadHooks
from lib.model.architectures import ArchInfo
from lib.storage.store import ArtifactError
from lib.experiments.behaviour.plan import BehaviourPlan, Condition, check_rankings_model
from lib.experiments.behaviour.statistics import BehaviourResult

__all__ = ["eos_ids", "greedy_generate", "problem_batches", "fingerprint", "Checkpoint", "run_behaviour"]


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
