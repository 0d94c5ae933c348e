"""Ablation results: the KL curves, AUC ratios against random and layer-matched orders, their bootstrap CIs,
and the files notebook 05 writes."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from lib.storage import artifacts
from lib.model.architectures import ArchInfo
from lib.storage.store import ArtifactError, check_same_heads, update_manifest
from lib.experiments.ablation.engine import DivergenceEngine, perturbed_heads, removal_masks, zeroed_heads
from lib.experiments.ablation.plan import AblationInputs, AblationPlan, MATCHED, Ordering, TABLE_FRACTIONS
from lib.experiments.ablation.resume import (_open_checkpoint, checkpoint_path, existing_shards, fingerprint,
                                             merge_shards, shard_path)
from lib.storage.notebooks import NB

__all__ = ["AblationResult", "manifest_entry", "run_ablation", "plan_table", "verify", "shard_summary"]


# ----------------------------------------------------------------------------- results

@dataclass
class AblationResult:
    orderings: list[Ordering]
    n_removed: np.ndarray             # [points]
    total_heads: int
    kl: np.ndarray                    # float64 [orderings, points, prompts], nats/token
    prompt_ids: np.ndarray
    prompt_category: np.ndarray
    perturbation: str = "zero"
    noise_sigma: float = 0.0
    model: str = ""
    complete: bool = True
    shard: tuple[int, int] | None = None
    seconds: float = 0.0
    message: str = ""

    @property
    def fractions(self) -> np.ndarray:
        return self.n_removed / self.total_heads

    def index(self, kind: str, variant: str | None = None) -> list[int]:
        return [k for k, o in enumerate(self.orderings) if o.kind == kind and (variant is None or o.variant == variant)]

    @property
    def variants(self) -> list[str]:
        return list(dict.fromkeys(o.variant for o in self.orderings if o.kind == "ranking"))

    def to_frame(self) -> pd.DataFrame:
        """ablation.csv: ordering, variant, seed, n_removed, fraction, kl_mean, kl_sem (over prompts)."""
        n_p = self.kl.shape[2]
        mean = self.kl.mean(-1)
        sem = self.kl.std(-1, ddof=1) / math.sqrt(n_p) if n_p > 1 else np.full_like(mean, np.nan)
        rows = []
        for k, o in enumerate(self.orderings):
            for j, n in enumerate(self.n_removed):
                rows.append({"ordering": o.kind, "variant": o.variant, "seed": o.seed, "n_removed": int(n),
                             "fraction": n / self.total_heads, "kl_mean": mean[k, j], "kl_sem": sem[k, j],
                             "perturbation": self.perturbation, "n_prompts": n_p})
        return pd.DataFrame(rows)

    def curve_at(self, k: int, fractions) -> np.ndarray:
        """Per-prompt KL of ordering k at the given fractions (linear interpolation between measured points)."""
        x = self.fractions
        return np.stack([np.interp(fractions, x, self.kl[k, :, p]) for p in range(self.kl.shape[2])], axis=-1)

    def fraction_table(self, fractions=TABLE_FRACTIONS) -> pd.DataFrame:
        """Per variant and fraction: ranking KL, random mean +- sd over seeds, ratio, reverse KL (means over prompts)."""
        fractions = np.asarray(fractions, dtype=float)
        rnd = np.stack([self.curve_at(k, fractions).mean(-1) for k in self.index("random")]) \
            if self.index("random") else np.full((1, len(fractions)), np.nan)
        rows = []
        for v in self.variants:
            rank = self.curve_at(self.index("ranking", v)[0], fractions).mean(-1)
            rev = self.index("reverse", v)
            rev = self.curve_at(rev[0], fractions).mean(-1) if rev else np.full(len(fractions), np.nan)
            for i, f in enumerate(fractions):
                r_mean = rnd[:, i].mean()
                rows.append({"variant": v, "fraction": f, "n_removed": f * self.total_heads,
                             "on_grid": bool(np.isclose(self.fractions, f).any()),
                             "ranking_kl": rank[i], "random_mean": r_mean,
                             "random_sd": rnd[:, i].std(ddof=1) if len(rnd) > 1 else np.nan,
                             "ratio": rank[i] / r_mean if r_mean > 0 else np.nan, "reverse_kl": rev[i]})
        return pd.DataFrame(rows)

    def prompt_auc(self, max_fraction: float = 1.0) -> np.ndarray:
        """[orderings, prompts]: area under KL vs fraction removed over [0, max_fraction] (trapezoid over the
        measured points, the curve linearly interpolated at max_fraction when it falls between two points)."""
        x = self.fractions
        if not x[0] <= max_fraction <= x[-1] + 1e-12:
            raise ValueError(f"max_fraction must lie within the measured fractions [{x[0]:.3g}, {x[-1]:.3g}]; "
                             f"got {max_fraction!r}")
        keep = x < max_fraction - 1e-12
        j = min(int(np.searchsorted(x, max_fraction - 1e-12)), len(x) - 1)
        w = 0.0 if j == 0 or np.isclose(x[j], max_fraction) else (x[j] - max_fraction) / (x[j] - x[j - 1])
        end = (1 - w) * self.kl[:, j] + w * self.kl[:, max(j - 1, 0)]                   # [orderings, prompts]
        xs = np.append(x[keep], max_fraction)
        return np.trapezoid(np.concatenate([self.kl[:, keep], end[:, None]], axis=1), xs, axis=1)

    def _vs_controls(self, auc, boot_auc, k: int, controls: list[int], rng, n_boot: int, resample_orders: bool,
                     ci: float) -> dict:
        """Ratio of ordering k's mean AUC to the controls' mean AUC, its percentile bootstrap CI and its bootstrap
        sd "se" (prompts, and with resample_orders also the control orders, resampled with replacement), and k's
        percentile among the controls (% of control orders with a smaller mean AUC; ties count half)."""
        if not controls:
            return dict(auc_mean=np.nan, auc_sd=np.nan, ratio=np.nan, ci_low=np.nan, ci_high=np.nan, se=np.nan,
                        percentile=np.nan, n=0)
        per_order = auc[controls].mean(-1)                                         # [controls]
        pick = rng.integers(0, len(controls), size=(n_boot, len(controls))) if resample_orders \
            else np.tile(np.arange(len(controls)), (n_boot, 1))
        ctrl_b = np.take_along_axis(boot_auc[controls].T, pick, axis=1).mean(1)    # [n_boot]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio_b = boot_auc[k] / ctrl_b
        a = (1 - ci) / 2
        mine = auc[k].mean()
        return dict(auc_mean=per_order.mean(), auc_sd=per_order.std(ddof=1) if len(controls) > 1 else np.nan,
                    ratio=mine / per_order.mean() if per_order.mean() > 0 else np.nan,
                    ci_low=np.quantile(ratio_b, a), ci_high=np.quantile(ratio_b, 1 - a),
                    se=ratio_b.std(ddof=1) if n_boot > 1 else np.nan,
                    percentile=100 * (np.mean(per_order < mine) + 0.5 * np.mean(per_order == mine)), n=len(controls))

    def random_band(self, auc: np.ndarray, ci: float = 0.95) -> tuple[float, float]:
        """The random orders' own ratios AUC_k / mean AUC of all random orders (mean over prompts): their central
        `ci` quantile band, i.e. where a ratio falls when the ordering is just one more random order."""
        rnd = self.index("random")
        if len(rnd) < 2:
            return np.nan, np.nan
        per_order = auc[rnd].mean(-1)
        ratio = per_order / per_order.mean()
        return float(np.quantile(ratio, (1 - ci) / 2)), float(np.quantile(ratio, 1 - (1 - ci) / 2))

    def auc_table(self, n_boot: int = 2000, seed: int = 0, ci: float = 0.95, max_fraction: float = 1.0,
                  resample_orders: bool = True) -> pd.DataFrame:
        """One row per variant and ordering (ranking, reverse; the oracle is a variant like the others): AUC over
        [0, max_fraction] and
          auc_ratio, ci_low, ci_high, se   ratio to the mean AUC of the random orders, its percentile bootstrap CI
                                           and bootstrap sd (prompts resampled, the same resample for every
                                           ordering, and with resample_orders the random orders too, so the CI
                                           carries the spread between random orders); se lets a reader compute
                                           a minimum detectable effect (e.g. 2.8 se for 80 % power at 5 %);
          percentile                       the ordering's percentile among the random orders;
          random_band_low/high             the central `ci` band of the random orders' own ratios (the null);
          matched_*                        the same against this ordering's OWN layer-matched random orders
                                           ("matched" for a ranking, "matched_reverse" for a reverse)."""
        auc = self.prompt_auc(max_fraction)
        n_p = auc.shape[1]
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, n_p, size=(n_boot, n_p))
        boot = auc[:, idx].mean(-1)                                          # [orderings, n_boot]
        rnd = self.index("random")
        band = self.random_band(auc, ci)
        rows = []
        for v in self.variants:
            for kind in ("ranking", "reverse"):
                ks = self.index(kind, v)
                if not ks:
                    continue
                r = self._vs_controls(auc, boot, ks[0], rnd, np.random.default_rng([seed, 1]), n_boot,
                                      resample_orders, ci)
                m = self._vs_controls(auc, boot, ks[0], self.index(MATCHED[kind], v), np.random.default_rng([seed, 2]),
                                      n_boot, resample_orders, ci)
                rows.append({"variant": v, "ordering": kind, "max_fraction": max_fraction, "auc": auc[ks[0]].mean(),
                             "random_auc_mean": r["auc_mean"], "random_auc_sd": r["auc_sd"], "n_random": r["n"],
                             "auc_ratio": r["ratio"], "ci_low": r["ci_low"], "ci_high": r["ci_high"], "se": r["se"],
                             "percentile": r["percentile"], "random_band_low": band[0], "random_band_high": band[1],
                             "matched_auc_mean": m["auc_mean"], "n_matched": m["n"],
                             "matched_ratio": m["ratio"], "matched_ci_low": m["ci_low"],
                             "matched_ci_high": m["ci_high"], "matched_se": m["se"],
                             "matched_percentile": m["percentile"], "n_prompts": n_p})
        return pd.DataFrame(rows)

    def save(self, out_dir: str | Path, tables: dict | None = None, figures: dict | None = None,
             manifest: dict | None = None) -> list[Path]:
        """Write ablation.csv and ablation_kl.npz (per-prompt KL for bootstraps) atomically; with `tables` /
        `figures` ({artifact name: DataFrame / Figure}, e.g. ablation_auc, ablation_curves) those too, and with
        `manifest` (see manifest_entry) notebook 05's manifest section, listing the files written."""
        if not self.complete:
            raise ValueError(f"this is a partial (shard) result: {self.message}")
        for name in [*(tables or {}), *(figures or {})]:
            if artifacts.artifact(name).producer != NB.ABLATION:
                raise ArtifactError(f"{name!r} is not an artifact of {NB.ABLATION}; use one of "
                                    f"{[a.name for a in artifacts.producer_outputs(NB.ABLATION)]}")
        paths = [artifacts.save("ablation", out_dir, self.to_frame()),
                 artifacts.save("ablation_kl", out_dir, self._kl_arrays())]
        paths += [artifacts.save(name, out_dir, data) for name, data in {**(tables or {}), **(figures or {})}.items()]
        if manifest is not None:
            update_manifest(out_dir, NB.ABLATION, {**manifest, "files": [p.name for p in paths]})
        return paths

    def _kl_arrays(self) -> dict:
        return dict(kl=self.kl, n_removed=self.n_removed, fraction=self.fractions,
                    ordering=np.array([o.kind for o in self.orderings]),
                    variant=np.array([o.variant for o in self.orderings]),
                    seed=np.array([o.seed for o in self.orderings]),
                    order=np.array([o.order for o in self.orderings], dtype=np.int64),
                    prompt_ids=self.prompt_ids, prompt_category=self.prompt_category,
                    total_heads=self.total_heads, perturbation=self.perturbation,
                    noise_sigma=self.noise_sigma, model=self.model)

    @classmethod
    def load(cls, out_dir: str | Path) -> "AblationResult":
        d = artifacts.load("ablation_kl", out_dir)
        orderings = [Ordering(str(k), str(v), int(s), tuple(int(h) for h in o))
                     for k, v, s, o in zip(d["ordering"], d["variant"], d["seed"], d["order"])]
        return cls(orderings, d["n_removed"], int(d["total_heads"]), d["kl"], d["prompt_ids"], d["prompt_category"],
                   str(d["perturbation"]), float(d["noise_sigma"]), str(d["model"]))


def manifest_entry(plan: AblationPlan, inputs: AblationInputs, result: AblationResult, auc: pd.DataFrame,
                   check: pd.DataFrame, model: str, dtype: str, step_size, fractions, seconds: float) -> dict:
    """Notebook 05's manifest section (AblationResult.save adds the files): its settings, the AUC ratios (auc: one
    or more auc_table frames, keyed by ordering, variant and range), the largest relative difference of the live
    check and the timings."""
    kinds = [o.kind for o in plan.orderings]
    return {"model": model, "dtype": dtype, "variants": list(plan.variants), "n_random": kinds.count("random"),
            "n_matched": kinds.count("matched") + kinds.count("matched_reverse"), "include_reverse": "reverse" in kinds, "step_size": step_size,
            "fractions": fractions,
            "n_prompts": len(inputs.prompts), "prompt_ids": [int(p) for p in inputs.prompt_ids],
            "oracle_prompt_ids": [int(p) for p in inputs.held_out_prompt_ids], "n_tokens": inputs.n_tokens, "n_points": len(plan.n_removed),
            "perturbation": plan.perturbation,
            "noise_sigma": plan.noise_sigma if plan.perturbation == "noise" else None, "seed": plan.seed,
            "how": result.message,
            "auc_ratio": {f"{r.ordering}:{r.variant}:0-{r.max_fraction:.0%}": r.auc_ratio for r in auc.itertuples()},
            "check_max_rel_diff": float(check.rel_diff.max()), "ablation_seconds": result.seconds,
            "seconds": seconds}


def run_ablation(model, arch: ArchInfo, inputs: AblationInputs, plan: AblationPlan, batch_size: int = 32,
                 max_cache_gb: float = 2.0, logit_chunk_mb: float = 32.0, method: str = "auto",
                 progress: bool = True, on_unit: Callable[[int], None] | None = None) -> AblationResult:
    """Compute the curves (or this run's shard of them), checkpointing after every unit; see the module docstring.

    Returns a complete AblationResult, or for a shard run (plan.shard set) a partial one (complete=False) after
    writing its shard file. on_unit(k) is called after the k-th unit finished in this process (tests use it to
    interrupt a run).
    """
    t0 = time.perf_counter()
    check_same_heads("the run's activations / rankings", inputs.total_heads, f"model {arch.source!r}", arch.total_heads)
    max_token = max(int(inputs.tokens.max()), max(int(p.max()) for p in inputs.prompts))
    if max_token >= arch.vocab_size:
        raise ArtifactError(f"token id {max_token} exceeds the vocabulary of {arch.source!r} ({arch.vocab_size}): "
                            f"the run's activations come from another model")
    fp = fingerprint(plan, inputs, arch, next(model.parameters()).dtype)
    n_p = len(inputs.prompts)
    common = dict(orderings=plan.orderings, n_removed=plan.n_removed, total_heads=plan.total_heads,
                  prompt_ids=inputs.prompt_ids, prompt_category=inputs.prompt_category,
                  perturbation=plan.perturbation, noise_sigma=plan.noise_sigma, model=inputs.model)
    if plan.shard is None and existing_shards(inputs.out_dir):
        kl = merge_shards(inputs.out_dir, fp, plan, n_p)
        return AblationResult(kl=kl, seconds=time.perf_counter() - t0,
                              message=f"merged {len(existing_shards(inputs.out_dir))} shards", **common)
    shard = plan.shard or (1, 1)
    path = shard_path(inputs.out_dir, *shard) if plan.shard else checkpoint_path(inputs.out_dir, fp)
    ckpt = _open_checkpoint(path, fp, plan, n_p, shard)
    engine = DivergenceEngine(model, arch, inputs, batch_size=batch_size, logit_chunk_mb=logit_chunk_mb, method=method)
    chunk = max(1, int(max_cache_gb * 2 ** 30 // engine.clean_bytes_per_prompt()))
    chunks = [list(range(s, min(s + chunk, n_p))) for s in range(0, n_p, chunk)]
    groups = plan.groups()
    units = [u for u in plan.units() if ckpt.assigned[u]]
    todo = [(c, u) for c in range(len(chunks)) for u in units if not ckpt.done[u][chunks[c]].all()]
    finished = 0
    bar = tqdm(total=len(todo), desc=f"ablation {plan.perturbation}" + (f" shard {shard[0]}/{shard[1]}" if plan.shard else ""),
               unit="point", disable=not progress)
    for c, prompts in enumerate(chunks):
        pending = [u for cc, u in todo if cc == c]
        if not pending:
            continue
        clean = engine.clean(prompts)
        for g, j in pending:
            group = groups[g]
            if plan.perturbation == "zero":
                masks, index = removal_masks(plan, group, j, engine.device)
                kl = engine.divergence(prompts, masks, clean)
                for o, m in zip(group, index):
                    ckpt.kl[o, j, prompts] = kl[m]
            else:
                (o,) = group
                with perturbed_heads(arch, plan.orderings[o].order[:plan.n_removed[j]], plan.noise_sigma, plan.seed):
                    ckpt.kl[o, j, prompts] = engine.divergence(prompts, engine.ones(), clean)[0]
            ckpt.done[g, j, prompts] = True
            ckpt.save()
            finished += 1
            bar.update(1)
            bar.set_postfix(point=f"{int(plan.n_removed[j])}/{plan.total_heads}")
            if on_unit is not None:
                on_unit(finished)
        del clean
    bar.close()
    seconds = time.perf_counter() - t0
    if plan.shard:
        done, total = ckpt.units_done()
        return AblationResult(kl=ckpt.kl, complete=False, shard=plan.shard, seconds=seconds,
                              message=f"shard {shard[0]}/{shard[1]} written to {path} ({done} of {total} units); "
                                      f"merge all shards with a run with shard=''", **common)
    return AblationResult(kl=ckpt.kl.copy(), seconds=seconds, message=f"computed {finished} units", **common)


def plan_table(plan: AblationPlan, inputs: AblationInputs) -> pd.DataFrame:
    """One row per ordering: kind, variant, seed and the first heads it removes (as layer.head)."""
    n_heads = inputs.n_heads
    return pd.DataFrame([{"ordering": o.kind, "variant": o.variant, "seed": o.seed if o.seed >= 0 else "",
                          "first heads removed (layer.head)": " ".join(f"{h // n_heads}.{h % n_heads}" for h in o.order[:6]) + " ..."}
                         for o in plan.orderings])


@torch.inference_mode()
def _naive_logprobs(model, inputs: AblationInputs, prompt: int) -> torch.Tensor:
    ids = torch.as_tensor(np.concatenate([inputs.prompts[prompt], inputs.tokens[prompt, :-1]]),
                          device=next(model.parameters()).device)[None]
    logits = model(input_ids=ids).logits[0, len(inputs.prompts[prompt]) - 1:]
    return logits.double().log_softmax(-1)


def verify(model, arch: ArchInfo, inputs: AblationInputs, plan: AblationPlan, result: AblationResult,
           n_checks: int = 3, n_prompts: int = 2) -> pd.DataFrame:
    """Recompute a few (ordering, point, prompt) values the slow way: one prompt at a time, the full model with all
    logits, float64 log-softmax, heads removed by zeroing their output-projection weight columns (no hook) or, for
    'noise', the same weight perturbation. Rows: batched value, slow value, relative difference."""
    rng = np.random.default_rng(plan.seed)
    points = [j for j in range(len(plan.n_removed)) if 0 < plan.n_removed[j]]
    rows = []
    for _ in range(min(n_checks, len(points) * len(plan.orderings))):
        k, j = int(rng.integers(len(plan.orderings))), int(rng.choice(points))
        heads = plan.orderings[k].order[:plan.n_removed[j]]
        ctx = perturbed_heads(arch, heads, plan.noise_sigma, plan.seed) if plan.perturbation == "noise" \
            else zeroed_heads(arch, heads)
        prompts = sorted(rng.choice(len(inputs.prompts), min(n_prompts, len(inputs.prompts)), replace=False))
        with ctx:
            ablated = {p: _naive_logprobs(model, inputs, p) for p in prompts}
        for p in prompts:
            clean = _naive_logprobs(model, inputs, p)
            slow = float((clean.exp() * (clean - ablated[p])).sum(-1).mean())
            fast = float(result.kl[k, j, p])
            rows.append({"ordering": plan.orderings[k].label, "n_removed": int(plan.n_removed[j]),
                         "prompt": int(inputs.prompt_ids[p]), "batched_kl": fast, "slow_kl": slow,
                         "rel_diff": abs(fast - slow) / max(abs(slow), 1e-12)})
    return pd.DataFrame(rows)


def shard_summary(result: AblationResult) -> pd.DataFrame:
    """One-row table describing a run (used by the notebook for shard runs, where there is nothing to plot)."""
    return pd.DataFrame([{"complete": result.complete, "shard": "" if not result.shard else
                          f"{result.shard[0]}/{result.shard[1]}", "seconds": round(result.seconds, 1),
                          "message": result.message}])
