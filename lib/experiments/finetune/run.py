"""Notebook 10: learning through selected heads (the paper's Fig 5), SFT and GRPO, per condition and seed.

Conditions (lib.experiments.behaviour.head_sets, the same sets as the task-behaviour experiment; k = round(fraction x heads)):
synergistic (top k of the ranking variant), redundant (the other end of the same order), `n_random` random sets,
and a layer-matched random set. Every (method, condition, seed) run starts from the loaded weights (restored
bit-exactly afterwards) and evaluates test accuracy before training and every `eval_every` steps.

Checkpoints: <out_dir>/.finetune_checkpoints/<settings hash>/<run>.pt after every evaluation (and the finished
run's curve and deltas), so a killed run resumes to the same numbers; the folder is removed when all runs finished.

    plan = prepare(out_dir, model=..., variant="rank_diff", fraction=0.5, seeds=[0])
    result = run_finetune(model, tokenizer, arch, plan)      # FinetuneResult, saved: finetune.csv, finetune_deltas.csv,
                                                              # finetune_summary.json
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from lib.storage import artifacts
from lib.experiments import tasks
from lib.experiments.behaviour import (check_rankings_model, clopper_pearson, eos_ids, greedy_generate, head_sets,
                           load_rankings, problem_batches)
from lib.experiments.finetune import claim as fc
from lib.experiments.finetune.grpo import GRPOSettings, evaluation_callback, run_grpo
from lib.experiments.finetune.masks import KV_POLICIES, head_masks, selected_units, weight_deltas
from lib.experiments.finetune.sft import Example, SFTSettings, run_sft
from lib.experiments.finetune.stats import hedges_g, paired_bootstrap, permutation_null
from lib.storage.store import ArtifactError, run_folder
from lib.storage.notebooks import NB

__all__ = ["METHODS", "KINDS", "PAPER", "Condition", "check_settings", "make_conditions", "prepare", "sft_examples",
           "RunRecord", "run_finetune", "FinetuneResult", "plan_table", "tests_table", "moved_table",
           "overlap_table", "claim_table"]

METHODS = ("sft", "grpo")
KINDS = ("synergistic", "redundant", "random", "layer_matched")
PAPER = {"value": 1.4, "text": "Qwen2.5-Math-1.5B, GRPO on MATH: synergistic vs random Hedges' g ~1.4 (p < 0.05), vs "
                              "redundant ~5.0 (p < 0.001); SFT: no difference (read off Fig 5, approximate)"}


@dataclass(frozen=True)
class Condition:
    kind: str
    variant: str
    seed: int                     # head-set seed (random, layer-matched), -1 otherwise
    heads: tuple[int, ...]

    @property
    def key(self) -> str:
        return self.kind + (f":seed={self.seed}" if self.kind == "random" else "")


@dataclass
class FinetunePlan:
    out_dir: Path
    model: str
    variant: str
    fraction: float
    kv: str
    conditions: list[Condition]
    seeds: list[int]
    methods: list[str]
    train: list[tasks.Problem]
    test: list[tasks.Problem]
    sft: SFTSettings
    grpo: GRPOSettings
    max_new_tokens: int = 32
    eval_batch_size: int = 32
    chat_template: bool = True
    answer_prefix: str = tasks.ANSWER_PREFIX
    sft_seeds: list[int] | None = None    # SFT's training seeds when they differ from `seeds` (the control may be
                                          # cheaper than the GRPO arm); None: `seeds`

    def seeds_for(self, method: str) -> list[int]:
        return list(self.sft_seeds) if method == "sft" and self.sft_seeds else list(self.seeds)

    def n_steps(self, method: str) -> int:
        return self.sft.n_steps if method == "sft" else self.grpo.n_steps

    def runs(self) -> list[tuple[str, Condition, int]]:
        return [(m, c, s) for m in self.methods for c in self.conditions for s in self.seeds_for(m)]

    def fingerprint(self, arch) -> dict:
        return {"model": self.model, "weights": arch.weights_id, "variant": self.variant, "fraction": self.fraction,
                "kv": self.kv, "conditions": [asdict(c) for c in self.conditions], "seeds": self.seeds,
                "sft_seeds": self.sft_seeds,
                "methods": self.methods, "train": [p.id for p in self.train], "test": [p.id for p in self.test],
                "sft": asdict(self.sft), "grpo": asdict(self.grpo), "max_new_tokens": self.max_new_tokens,
                "chat_template": self.chat_template, "answer_prefix": self.answer_prefix}


def check_settings(fraction, kv, seeds, methods, n_random, sft_seeds=None) -> None:
    """Raise ValueError naming the first bad setting (nothing read or written)."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"fraction (share of heads trained) must lie in (0, 1], e.g. 0.5 as in the paper; "
                         f"got {fraction!r}")
    if kv not in KV_POLICIES:
        raise ValueError(f"kv must be one of {list(KV_POLICIES)} (GQA policy for shared K/V heads); got {kv!r}")
    if not isinstance(seeds, (list, tuple)) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of integers (one training run each), e.g. [0]; got {seeds!r}")
    if sft_seeds is not None and (not isinstance(sft_seeds, (list, tuple)) or
                                  not all(isinstance(s, int) and not isinstance(s, bool) for s in sft_seeds)):
        raise ValueError(f"sft_seeds must be a list of integers (SFT's training seeds; [] or None: the same as "
                         f"seeds); got {sft_seeds!r}")
    bad = [m for m in (methods if isinstance(methods, (list, tuple)) else [methods]) if m not in METHODS]
    if not isinstance(methods, (list, tuple)) or not methods or bad:
        raise ValueError(f"methods must be a non-empty list of {list(METHODS)}; got {methods!r}")
    if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 1:
        raise ValueError(f"n_random (random head sets) must be an integer >= 1; got {n_random!r}")


def make_conditions(rankings: pd.DataFrame, variant: str, fraction: float, n_random: int, seed: int,
                    n_heads: int) -> list[Condition]:
    sets = head_sets(rankings, [variant], fraction, n_random, seed, n_heads)
    order = {k: i for i, k in enumerate(KINDS)}
    return sorted((Condition(kind, v, int(s), tuple(int(h) for h in heads)) for kind, v, s, heads in sets),
                  key=lambda c: order[c.kind])


def prepare(out_dir, model: str | None = None, variant: str = "rank_diff", fraction: float = 0.5, kv: str = "any",
            n_random: int = 1, seeds=(0,), methods=("sft",), task: str = "arithmetic", n_train: int | None = 200,
            n_test: int | None = 40, difficulty: int = 2, task_seed: int = 0, sft: SFTSettings = SFTSettings(),
            grpo: GRPOSettings = GRPOSettings(), max_new_tokens: int = 32, eval_batch_size: int = 32,
            chat_template: bool = True, answer_prefix: str = tasks.ANSWER_PREFIX, seed: int = 0,
            sft_seeds=None) -> FinetunePlan:
    """Validate every setting, the task splits and rankings.csv (nothing is written) -> FinetunePlan.
    sft_seeds: SFT's training seeds when they differ from `seeds` ([] or None: the same)."""
    seeds, methods = list(seeds) if isinstance(seeds, tuple) else seeds, \
        list(methods) if isinstance(methods, tuple) else methods
    check_settings(fraction, kv, seeds, methods, n_random, sft_seeds)
    sft.check()
    if "grpo" in methods:
        grpo.check()
    train = tasks.load_task(task, n_train, "train", difficulty, task_seed)
    test = tasks.load_task(task, n_test, "test", difficulty, task_seed)
    out_dir = run_folder(out_dir)
    rankings = load_rankings(out_dir, [variant], model)
    n_heads = int(rankings["head"].max()) + 1
    conditions = make_conditions(rankings, variant, float(fraction), n_random, seed, n_heads)
    return FinetunePlan(out_dir, model or "", variant, float(fraction), kv, conditions, seeds, methods, train, test,
                        sft, grpo, max_new_tokens, eval_batch_size, bool(chat_template), str(answer_prefix),
                        list(sft_seeds) if sft_seeds else None)


# ----------------------------------------------------------------------------------------------------------------
# evaluation and data

class Evaluator:
    """Greedy answers to the test problems -> correctness per problem (lib.experiments.behaviour's batched generation)."""

    def __init__(self, model, tokenizer, arch, plan: FinetunePlan):
        self.model, self.arch, self.plan = model, arch, plan
        self.prompts = [tasks.encode_problem(tokenizer, p, plan.chat_template, plan.answer_prefix) for p in plan.test]
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.stop = eos_ids(model, tokenizer)
        self.tokenizer = tokenizer
        self.batches = problem_batches([len(p) for p in self.prompts], plan.eval_batch_size)

    def baseline(self, model) -> list[bool]:
        """Correctness of the loaded weights (every run starts from them), computed once."""
        if getattr(self, "_baseline", None) is None:
            self._baseline = self(model)
        return list(self._baseline)

    def for_run(self, model):
        """evaluate(model) for one run: its first call (before training) returns the shared baseline."""
        calls = []

        def evaluate(m):
            calls.append(1)
            return self.baseline(m) if len(calls) == 1 else self(m)
        return evaluate

    def __call__(self, model) -> list[bool]:
        correct = [False] * len(self.prompts)
        for batch in self.batches:
            seqs = [self.prompts[i] for i in batch]
            outs = greedy_generate(model, self.arch, seqs, max(len(s) for s in seqs), self.plan.max_new_tokens,
                                   self.pad, self.stop)
            for i, ids in zip(batch, outs):
                text = tasks.reply_text(self.tokenizer.decode(ids, skip_special_tokens=True), self.plan.answer_prefix)
                correct[i] = bool(tasks.check_answer(text, self.plan.test[i].answer).correct)
        return correct


def sft_examples(tokenizer, problems: list[tasks.Problem], chat_template: bool,
                 answer_prefix: str = tasks.ANSWER_PREFIX) -> list[Example]:
    """Prompt ids (the task format, ending with the answer prefix) and target ids (the rest of tasks.target_text,
    then end of turn) of every training problem: the loss is on the answer tokens only."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    rest = lambda p: tasks.target_text(p, answer_prefix)[len(answer_prefix):] if answer_prefix else tasks.target_text(p)
    return [Example(tasks.encode_problem(tokenizer, p, chat_template, answer_prefix),
                    tokenizer(rest(p), add_special_tokens=False).input_ids + eos) for p in problems]


# ----------------------------------------------------------------------------------------------------------------
# checkpoints

class RunCheckpoint:
    """torch.save'd state of one run in the plan's checkpoint folder (atomic: temp file + rename)."""

    def __init__(self, folder: Path, name: str):
        self.path = artifacts.path("finetune_checkpoint", folder.parent.parent, key=folder.name,
                                   run=name.replace(":", "_").replace("=", "-"))

    def load(self):
        if not self.path.exists():
            return None
        try:
            return torch.load(self.path, weights_only=False)
        except Exception as e:            # truncated by a kill during a write that did not use the rename
            raise ArtifactError(f"checkpoint {self.path} is unreadable ({type(e).__name__}); delete it to "
                                f"restart that run") from None

    def save(self, state) -> None:
        from lib.storage.store import atomic_path
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)


def checkpoint_folder(plan: FinetunePlan, arch) -> Path:
    digest = hashlib.sha256(json.dumps(plan.fingerprint(arch), sort_keys=True).encode()).hexdigest()[:12]
    return artifacts.path("finetune_checkpoint", plan.out_dir, key=digest, run="-").parent


# ----------------------------------------------------------------------------------------------------------------
# running

@dataclass
class RunRecord:
    method: str
    condition: Condition
    seed: int
    steps: list[int]
    accuracy: list[float]
    correct: list[list[bool]]
    loss: list[float]
    deltas: list[dict]
    seconds: float = 0.0


def _attention_snapshot(arch) -> dict[int, torch.Tensor]:
    masks = head_masks(arch, list(range(arch.total_heads)), kv="all")
    return {id(m.param): m.param.detach().clone() for m in masks}


def _restore(arch, snapshot: dict[int, torch.Tensor]) -> None:
    with torch.no_grad():
        for m in head_masks(arch, list(range(arch.total_heads)), kv="all"):
            m.param.copy_(snapshot[id(m.param)])


def _one_run(model, tokenizer, arch, plan, method, cond, seed, evaluator, examples, ckpt, bar) -> RunRecord:
    t0 = time.perf_counter()
    resuming = ckpt is not None and ckpt.path.exists()         # its step-0 evaluation is in the checkpoint
    evaluate = evaluator if resuming else evaluator.for_run(model)
    if method == "sft":
        settings = SFTSettings(**{**asdict(plan.sft), "kv": plan.kv, "seed": seed})
        curve = run_sft(model, arch, list(cond.heads), examples, evaluate, settings, _pad(tokenizer), ckpt, bar)
        steps, acc, correct, loss = curve.steps, curve.accuracy, curve.correct, curve.loss
    else:
        settings = GRPOSettings(**{**asdict(plan.grpo), "kv": plan.kv, "seed": seed})
        steps, correct = [0], [evaluate(model)]

        def record(step, result):
            bar.update(step - steps[-1])
            steps.append(step)
            correct.append(result)

        prompts = [tokenizer.decode(tasks.encode_problem(tokenizer, p, plan.chat_template, plan.answer_prefix))
                   for p in plan.train]
        check = lambda text, gold: tasks.check_answer(tasks.reply_text(text, plan.answer_prefix), gold).correct
        log = run_grpo(model, tokenizer, arch, list(cond.heads), prompts, [p.answer for p in plan.train], check, settings,
                       next(model.parameters()).device.type == "cpu",
                       [evaluation_callback(evaluate, plan.sft.eval_every, record)])
        if steps[-1] != settings.n_steps:
            record(settings.n_steps, evaluate(model))
        acc, loss = [float(np.mean(c)) for c in correct], [float(h.get("reward", np.nan)) for h in log]
    return RunRecord(method, cond, seed, steps, acc, correct, loss, [], time.perf_counter() - t0)


def _pad(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def run_finetune(model, tokenizer, arch, plan: FinetunePlan, progress: bool = True) -> "FinetuneResult":
    """Every (method, condition, seed) run, resumable; writes finetune.csv, finetune_deltas.csv and
    finetune_summary.json (FinetuneResult.save). The model's weights are unchanged afterwards."""
    check_rankings_model(load_rankings(plan.out_dir, [plan.variant], None), arch)
    folder = checkpoint_folder(plan, arch)
    evaluate = Evaluator(model, tokenizer, arch, plan)
    examples = sft_examples(tokenizer, plan.train, plan.chat_template, plan.answer_prefix)
    snapshot = _attention_snapshot(arch)
    total = sum(plan.n_steps(m) for m, _, _ in plan.runs())
    records, t0 = [], time.perf_counter()
    with tqdm(total=total, desc="fine-tuning (steps)", disable=not progress) as bar:
        for method, cond, seed in plan.runs():
            name = f"{method}-{cond.key}-seed{seed}"
            done = RunCheckpoint(folder, name + "-done")
            record = done.load()
            if record is None:
                try:
                    record = _one_run(model, tokenizer, arch, plan, method, cond, seed, evaluate, examples,
                                      RunCheckpoint(folder, name) if method == "sft" else None, bar)
                    chosen = selected_units(arch, list(cond.heads), plan.kv)
                    record.deltas = [{**d, "selected": (d["layer"], d["head"], d["block"]) in chosen}
                                     for d in weight_deltas(arch, snapshot)]
                finally:
                    _restore(arch, snapshot)
                done.save(record)
            else:
                bar.update(plan.n_steps(method))
            records.append(record)
    layout = {"n_layers": arch.n_layers, "n_heads": arch.n_heads, "n_kv_heads": arch.n_kv_heads}
    result = FinetuneResult(plan, records, time.perf_counter() - t0, {"layout": layout})
    result.save()
    shutil.rmtree(folder, ignore_errors=True)
    if folder.parent.is_dir() and not any(folder.parent.iterdir()):
        folder.parent.rmdir()
    return result


# ----------------------------------------------------------------------------------------------------------------
# results

@dataclass
class FinetuneResult:
    plan: FinetunePlan
    records: list[RunRecord]
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def curves(self) -> pd.DataFrame:
        """One row per (method, condition, seed, step): accuracy with its Clopper-Pearson 95% CI, n problems."""
        rows = []
        for r in self.records:
            for step, acc, correct in zip(r.steps, r.accuracy, r.correct):
                lo, hi = clopper_pearson(int(np.sum(correct)), len(correct))
                rows.append({"method": r.method, "condition": r.condition.key, "kind": r.condition.kind,
                             "seed": r.seed, "step": step, "accuracy": acc, "ci_lo": lo, "ci_hi": hi,
                             "n": len(correct)})
        return pd.DataFrame(rows)

    def finals(self) -> pd.DataFrame:
        """Per run: accuracy before training, after the last step, and the best evaluation after step 0."""
        rows = []
        for r in self.records:
            later = r.accuracy[1:] or r.accuracy
            rows.append({"method": r.method, "condition": r.condition.key, "kind": r.condition.kind,
                         "seed": r.seed, "n_heads": len(r.condition.heads), "before": r.accuracy[0],
                         "final": r.accuracy[-1], "best": float(np.max(later)), "seconds": round(r.seconds, 1)})
        return pd.DataFrame(rows)

    def deltas(self) -> pd.DataFrame:
        """One row per (run, layer, head, block): delta_norm (Frobenius norm of the weight change) and whether the
        slice was trainable (`selected`); head is the query head for Q/O and the KV head for K/V."""
        return pd.DataFrame([{"method": r.method, "condition": r.condition.key, "kind": r.condition.kind,
                              "seed": r.seed, **d} for r in self.records for d in r.deltas])

    def compare(self, method: str, a: str, b: str, metric: str = "final") -> dict:
        """Condition kind a vs b for one method: Hedges' g over seeds (random sets pooled as one group), a
        permutation p (one-sided, a > b), and the paired accuracy difference on the test problems with its
        bootstrap CI (last evaluation, runs averaged per problem)."""
        finals = self.finals()
        fa = finals[(finals.method == method) & (finals.kind == a)][metric].to_numpy()
        fb = finals[(finals.method == method) & (finals.kind == b)][metric].to_numpy()
        null = permutation_null(fa, fb) if len(fa) and len(fb) else np.array([np.nan])
        observed = float(np.mean(fa) - np.mean(fb)) if len(fa) and len(fb) else float("nan")
        ca, cb = (np.mean([r.correct[-1] for r in self.records if r.method == method and r.condition.kind == k],
                          axis=0) for k in (a, b))
        diff, lo, hi = paired_bootstrap(ca, cb)
        return {"a": a, "b": b, "method": method, "metric": metric, "n_a": int(len(fa)), "n_b": int(len(fb)),
                "hedges_g": hedges_g(fa, fb), "mean_difference": observed,
                "permutation_p": float(np.mean(null >= observed - 1e-12)) if np.isfinite(observed) else None,
                "null_ci95": [float(np.percentile(null, 2.5)), float(np.percentile(null, 97.5))],
                "paired_difference": diff, "paired_ci95": [lo, hi]}

    def tests(self) -> list[dict]:
        return [self.compare(m, "synergistic", b) for m in self.plan.methods
                for b in ("random", "redundant", "layer_matched")]

    def claim(self) -> dict:
        """Claim C7 block (lib.experiments.finetune.claim's docstring): GRPO's g when GRPO ran (details.arm "grpo"), else
        today's SFT statistic (details.arm "sft": the wrong arm for the paper's claim)."""
        arm = "grpo" if "grpo" in self.plan.methods else "sft"
        block = self._grpo_claim() if arm == "grpo" else self._sft_claim()
        finals = self.finals()
        finals = finals[finals.method == arm]
        by_kind = {k: finals[finals.kind == k]["final"].tolist() for k in KINDS if (finals.kind == k).any()}
        rows = self.overlap_rows()
        block.update({
            "paper": PAPER, "paper_effect": fc.PAPER_EFFECT, "paper_effect_note": fc.PAPER_EFFECT_NOTE,
            "validity": fc.validity(by_kind, fc.claim_jaccard(rows, self.plan.kv)),
            "sample_sizes": {"seeds": len(self.plan.seeds_for(arm)), "test_problems": len(self.plan.test),
                             "steps": self.plan.n_steps(arm), "runs": {k: len(v) for k, v in by_kind.items()}},
            "vs_redundant": fc.g_block(by_kind.get("synergistic", []), by_kind.get("redundant", [])),
            "sft_control": self.sft_control(),
            "overlap": {"policy": self.plan.kv, "max_param_jaccard": fc.MAX_PARAM_JACCARD, "rows": rows}})
        block["details"].update({"arm": arm, "tests": self.tests(), "variant": self.plan.variant,
                                 "fraction": self.plan.fraction, "kv": self.plan.kv})
        return block

    def _grpo_claim(self) -> dict:
        finals = self.finals()
        finals = finals[finals.method == "grpo"]
        g = fc.g_block(finals[finals.kind == "synergistic"]["final"].to_numpy(),
                       finals[finals.kind == "random"]["final"].to_numpy())
        return {"id": "C7", "statistic": "Hedges' g of the final test accuracy (after the last GRPO step), "
                                         "synergistic vs random heads, over runs (training seeds x random sets); "
                                         "95% CI g +- 1.96 se (Hedges & Olkin variance)",
                "value": g["value"], "ci95": g["ci95"], "se": g["se"],
                "null": {"name": "no difference between head sets (g = 0)", "value": 0.0, "ci95": None},
                "direction": "greater", "n": g["n_a"] + g["n_b"], "details": {"n_a": g["n_a"], "n_b": g["n_b"]}}

    def _sft_claim(self) -> dict:
        t = self.compare("sft", "synergistic", "random")
        many = t["n_a"] >= 2 and t["n_b"] >= 2
        stat = ("Hedges' g of the final test accuracy, synergistic vs random heads (sft, seeds)" if many else
                "final test accuracy, synergistic minus random heads (sft, one seed: paired over problems)")
        finals = self.finals()
        groups = [finals[(finals.method == "sft") & (finals.kind == k)]["final"] for k in ("synergistic", "random")]
        se = fc.g_block(*groups)["se"] if many else None
        null = {"name": "permutation of condition labels over seeds" if many else
                "no difference (0); CI from a paired bootstrap over test problems",
                "value": 0.0, "ci95": t["null_ci95"] if many else None}
        return {"id": "C7", "statistic": stat, "value": t["hedges_g"] if many else t["paired_difference"],
                "ci95": None if many else t["paired_ci95"], "se": se, "null": null, "direction": "greater",
                "n": t["n_a"] if many else len(self.plan.test), "details": {}}

    def sft_control(self) -> dict:
        """SFT synergistic - random, paired over test problems, with the TOST (lib.experiments.finetune.claim.sft_control)."""
        runs = [r for r in self.records if r.method == "sft"]
        by = {k: [r for r in runs if r.condition.kind == k] for k in ("synergistic", "random")}
        if not all(by.values()) or len(self.plan.test) < 2:
            return {"ran": False, "line": "SFT: not run (methods without sft)" if not runs else
                    "SFT: inconclusive (too few runs or test problems)"}
        correct = {k: np.mean([r.correct[-1] for r in v], axis=0) for k, v in by.items()}
        before = {k: float(np.mean([r.accuracy[0] for r in v])) for k, v in by.items()}
        after = {k: float(np.mean([r.accuracy[-1] for r in v])) for k, v in by.items()}
        changed = any(r.correct[-1] != r.correct[0] for v in by.values() for r in v)
        return {"ran": True, **fc.sft_control(correct["synergistic"], correct["random"], before, after, changed)}

    def overlap_rows(self) -> list[dict]:
        """Trained query heads, KV heads and weights shared by synergistic and each other condition, under every
        KV policy (lib.experiments.finetune.claim.overlap_rows); [] without the model's layout."""
        layout = self.extra.get("layout")
        if not layout:
            return []
        return fc.overlap_rows(SimpleNamespace(**layout), self.plan.conditions)

    def summary(self) -> dict:
        return {"model": self.plan.model, "variant": self.plan.variant, "fraction": self.plan.fraction,
                "kv": self.plan.kv, "methods": self.plan.methods, "seeds": self.plan.seeds,
                "sft_seeds": self.plan.seeds_for("sft"), "n_train": len(self.plan.train),
                "n_test": len(self.plan.test), "sft": asdict(self.plan.sft), "grpo": asdict(self.plan.grpo),
                "layout": self.extra.get("layout"), "runs": self.finals().to_dict("records"),
                "seconds": round(self.seconds, 1), "claim": self.claim()}

    def save(self, out_dir=None) -> list[Path]:
        from lib.storage.store import update_manifest
        out_dir = Path(out_dir or self.plan.out_dir)
        paths = [artifacts.save("finetune", out_dir, self.curves()),
                 artifacts.save("finetune_deltas", out_dir, self.deltas()),
                 artifacts.save("finetune_summary", out_dir, self.summary())]
        update_manifest(out_dir, NB.FINETUNE, {"model": self.plan.model, "seconds": round(self.seconds, 1),
                                                        "artifacts": [p.name for p in paths]})
        return paths


# ----------------------------------------------------------------------------------------------------------------
# tables for the notebook

def plan_table(plan: FinetunePlan) -> pd.DataFrame:
    """One row per condition: kind, seed, number of heads, the first heads (layer.head)."""
    rows = []
    for c in plan.conditions:
        rows.append({"condition": c.key, "variant": c.variant or "", "n_heads": len(c.heads),
                     "heads": " ".join(str(h) for h in c.heads[:10]) + (" ..." if len(c.heads) > 10 else ""),
                     "runs": len(plan.seeds) * len(plan.methods)})
    return pd.DataFrame(rows)


def undefined_because(n_a: int, n_b: int, g: float | None) -> str:
    """Why Hedges' g and the permutation p of two groups of runs are not results ('' when they are): g needs a
    spread within the groups, and with one run per group the permutation p can only be 0.5 or 1."""
    if n_a < 2 or n_b < 2:
        return f"needs >= 2 runs per condition (here {n_a} vs {n_b})"
    if g is None or not np.isfinite(g):
        return "no spread: each condition's runs all end equal"
    return ""


def _finite_ci(ci) -> list[float] | None:
    return None if ci is None or not np.isfinite(np.asarray(ci, float)).all() else [float(ci[0]), float(ci[1])]


def tests_table(result: FinetuneResult) -> pd.DataFrame:
    """Synergistic vs each control per method (FinetuneResult.tests), accuracy in points; g and p are left empty
    (None) with the reason in the last column when they are not results (undefined_because)."""
    rows = []
    for t in result.tests():
        why = undefined_because(t["n_a"], t["n_b"], t["hedges_g"])
        rows.append({"method": t["method"], "synergistic vs": t["b"], "runs": f"{t['n_a']} vs {t['n_b']}",
                     "Hedges g": None if why else t["hedges_g"],
                     "permutation p (one-sided)": None if why else t["permutation_p"],
                     "paired difference (points)": 100 * t["paired_difference"],
                     "95% CI (points)": f"[{100 * t['paired_ci95'][0]:.1f}, {100 * t['paired_ci95'][1]:.1f}]",
                     "g and p not defined because": why})
    return pd.DataFrame(rows)


def moved_table(result: FinetuneResult) -> pd.DataFrame:
    """Per run: slices that moved inside and outside the trained selection (outside must be 0)."""
    d = result.deltas()
    d = d.assign(moved=d.delta_norm > 0)
    d = d.assign(inside=d.moved & d.selected, outside=d.moved & ~d.selected)
    return (d.groupby(["method", "condition", "seed"])[["selected", "inside", "outside"]].sum().astype(int)
            .rename(columns={"selected": "slices trained", "inside": "moved inside", "outside": "moved outside"})
            .reset_index())


def overlap_table(result: FinetuneResult) -> pd.DataFrame:
    """Synergistic vs each other condition under every KV policy: query heads, KV heads and weights trained by
    both (counts and Jaccard); the run's own policy is marked."""
    rows = pd.DataFrame(result.overlap_rows())
    if rows.empty:
        return rows
    rows.insert(1, "this run", np.where(rows.kv == result.plan.kv, "*", ""))
    rows["kv"] = rows.kv.replace({"none": "none (K/V frozen)"})        # a policy, not a missing value
    return rows.drop(columns="a").rename(columns={"b": "synergistic vs"})


def claim_table(result: FinetuneResult) -> pd.DataFrame:
    """The C7 numbers in one table: GRPO (or SFT) g vs random and vs redundant with CIs, the SFT control; an
    undefined g is None with the reason in the last column (undefined_because)."""
    c = result.claim()
    arm, d, red = c["details"]["arm"], c["details"], c["vs_redundant"]
    g_rows = [(f"g synergistic vs random ({arm})", c["value"], c["ci95"], c.get("se"), d.get("n_a"), d.get("n_b")),
              (f"g synergistic vs redundant ({arm})", red["value"], red["ci95"], red["se"], red["n_a"], red["n_b"])]
    rows = []
    for name, value, ci, se, n_a, n_b in g_rows:
        why = undefined_because(n_a, n_b, value) if n_a is not None and n_b is not None else ""
        why = why or ("" if value is not None and np.isfinite(value) else "not defined")
        rows.append({"statistic": name, "value": None if why else value, "95% CI": None if why else _finite_ci(ci),
                     "se": None if why else se, "not defined because": why})
    sft = c["sft_control"]
    if sft.get("ran"):
        rows.append({"statistic": "SFT synergistic - random (points, paired)", "value": sft["difference_points"],
                     "95% CI": _finite_ci(sft["ci95_points"]), "se": sft["se_points"], "not defined because": ""})
    table = pd.DataFrame(rows)
    table["95% CI"] = [None if ci is None else f"[{ci[0]:.2f}, {ci[1]:.2f}]" for ci in table["95% CI"]]
    return table
