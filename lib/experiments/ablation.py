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

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lib.storage import artifacts
from lib.experiments.extract import left_pad
from lib.model.heads import HeadHooks
from lib.model.hooks import patched_weights
from lib.storage.checkpoints import parse_shard
from lib.model.loading import ArchInfo
from lib.storage.store import ArtifactError, check_same_heads, update_manifest

__all__ = ["PERTURBATIONS", "RANDOM_VARIANT", "ORACLE", "Ordering", "AblationInputs", "make_points",
           "make_orderings", "load_inputs", "select_prompt_rows", "prepare", "DivergenceEngine", "removal_masks",
           "perturbed_heads", "fingerprint", "Checkpoint", "AblationResult", "manifest_entry", "run_ablation",
           "plan_table", "verify", "shard_summary"]

PERTURBATIONS = ("zero", "noise")
TABLE_FRACTIONS = tuple(k / 8 for k in range(1, 9))      # 12.5 %, 25 %, ..., 100 %
RANDOM_VARIANT = "none"                                  # `variant` of random orderings in ablation.csv
MATCHED = {"ranking": "matched", "reverse": "matched_reverse"}   # kind of the layer-matched controls of each kind
ORACLE = "oracle"                                        # the oracle variant (lib.experiments.oracle), see load_inputs


# ----------------------------------------------------------------------------- plan

@dataclass(frozen=True)
class Ordering:
    kind: str                  # "ranking", "random", "reverse", "matched" / "matched_reverse" (layer-matched
                               # random orders of the variant's ranking / reverse)
    variant: str               # ranking variant the order comes from (RANDOM_VARIANT for random orders)
    seed: int                  # the random seed (-1 unless kind is "random" or "matched")
    order: tuple[int, ...]     # head indices in removal order (a permutation of all heads)

    @property
    def label(self) -> str:
        if self.kind == "random":
            return f"random:seed={self.seed}"
        if self.kind in MATCHED.values():
            return f"{self.kind}:{self.variant}:seed={self.seed}"
        return f"{self.kind}:{self.variant}"


@dataclass
class AblationInputs:
    """What notebook 05 reads from out_dir (validated): prompts, the clean greedy tokens and the rankings."""
    out_dir: Path
    model: str                       # model spec that produced the tokens
    prompts: list[np.ndarray]        # prompt token ids as fed to the model (chat template applied), unpadded
    tokens: np.ndarray               # int64 [prompts, T] clean greedy tokens
    prompt_ids: np.ndarray           # index in the paper's 60
    prompt_category: np.ndarray
    rankings: pd.DataFrame
    total_heads: int
    n_heads: int
    pad_token_id: int
    tokens_checksum: str
    held_out_prompt_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # the oracle's

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[1])


@dataclass
class AblationPlan:
    orderings: list[Ordering]
    n_removed: np.ndarray            # int64 [points], increasing, starts at 0
    total_heads: int
    perturbation: str = "zero"
    noise_sigma: float = 0.0
    seed: int = 0
    shard: tuple[int, int] | None = None
    variants: list[str] = field(default_factory=list)

    @property
    def fractions(self) -> np.ndarray:
        return self.n_removed / self.total_heads

    def groups(self) -> list[list[int]]:
        """Orderings that share forwards: all of them for 'zero' (per-row masks), one each for 'noise' (weights)."""
        n = len(self.orderings)
        return [list(range(n))] if self.perturbation == "zero" else [[o] for o in range(n)]

    def units(self) -> list[tuple[int, int]]:
        """Work units (group, point), point-major so that round-robin shards get a mix of cheap and costly points."""
        return [(g, j) for j in range(len(self.n_removed)) for g in range(len(self.groups()))]

    def shard_units(self) -> list[tuple[int, int]]:
        i, n = self.shard or (1, 1)
        return self.units()[i - 1::n]


def make_points(total_heads: int, step_size: int | None = None, fractions: list[float] | None = None) -> np.ndarray:
    """n_removed values: 0, s, 2s, ..., total_heads for step_size s, or 0 and round(f * total_heads) for fractions."""
    if step_size is not None and fractions is not None:
        raise ValueError("give either step_size or fractions, not both (set the other to None)")
    if fractions is None:
        step = 1 if step_size is None else step_size
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or not 1 <= step <= total_heads:
            raise ValueError(f"step_size must be an integer in [1, {total_heads}] (the number of heads of this "
                             f"model), heads removed per point; 1 = every head as in the paper; got {step_size!r}")
        points = list(range(0, total_heads + 1, int(step)))
        if points[-1] != total_heads:
            points.append(total_heads)
        return np.array(points, dtype=np.int64)
    if not isinstance(fractions, (list, tuple, np.ndarray)) or len(fractions) == 0:
        raise ValueError(f"fractions must be a non-empty list of numbers in (0, 1], e.g. [0.125, 0.25, 0.5, 1.0]; "
                         f"got {fractions!r}")
    bad = [f for f in fractions if isinstance(f, bool) or not isinstance(f, (int, float, np.number))
           or not 0 < float(f) <= 1]
    if bad:
        raise ValueError(f"fractions must lie in (0, 1] (fraction of all {total_heads} heads removed); "
                         f"bad values: {bad}")
    counts = {0} | {max(1, int(round(float(f) * total_heads))) for f in fractions}
    return np.array(sorted(counts), dtype=np.int64)


def layer_matched_order(order, head_layer, rng) -> tuple[int, ...]:
    """A random order with the layer histogram of `order` at every prefix: position i removes a random,
    not yet removed head of the layer that order[i] belongs to. head_layer [heads]; rng: numpy Generator."""
    head_layer = np.asarray(head_layer)
    pools = {int(l): list(rng.permutation(np.flatnonzero(head_layer == l))) for l in np.unique(head_layer)}
    return tuple(int(pools[int(head_layer[h])].pop()) for h in order)


def make_orderings(rankings: pd.DataFrame, variants: list[str], n_random: int = 5, include_reverse: bool = True,
                   seed: int = 0, n_matched: int = 0, matched_variants: list[str] | None = None) -> list[Ordering]:
    """Ranking order per variant, n_random seeded random orders, (optionally) the reverse of each ranking, then
    n_matched layer-matched random orders of each ranking ("matched") and, with include_reverse, of each reverse
    ("matched_reverse"), for every variant of matched_variants (default: every variant). Seeds seed, seed+1, ...:
    numpy default_rng([seed_k, variant position]) for a ranking, default_rng([seed_k, variant position, 1]) for
    a reverse; each has the layer histogram of ITS OWN ordering's first k heads for every k (layer_matched_order)."""
    heads = rankings["head_idx"].to_numpy()
    total = len(heads)
    by_head = rankings.set_index("head_idx").loc[np.arange(total)]
    rankings_orders = []
    for v in variants:
        score = by_head[v].to_numpy(dtype=np.float64)
        rankings_orders.append((v, tuple(int(h) for h in np.argsort(-score, kind="stable"))))
    out = [Ordering("ranking", v, -1, order) for v, order in rankings_orders]
    out += [Ordering("random", RANDOM_VARIANT, seed + k,
                     tuple(int(h) for h in np.random.default_rng(seed + k).permutation(total)))
            for k in range(n_random)]
    if include_reverse:
        out += [Ordering("reverse", v, -1, order[::-1]) for v, order in rankings_orders]
    layers = by_head["layer"].to_numpy()
    picked = [(i, v, order) for i, (v, order) in enumerate(rankings_orders)
              if matched_variants is None or v in matched_variants]
    out += [Ordering("matched", v, seed + k, layer_matched_order(order, layers, np.random.default_rng([seed + k, i])))
            for i, v, order in picked for k in range(n_matched)]
    if include_reverse:
        out += [Ordering("matched_reverse", v, seed + k,
                         layer_matched_order(order[::-1], layers, np.random.default_rng([seed + k, i, 1])))
                for i, v, order in picked for k in range(n_matched)]
    return out


def load_inputs(out_dir: str | Path, variants: list[str], n_prompts: int | None = None,
                model: str | None = None) -> AblationInputs:
    """Read and validate the activations (tokens, prompts) and rankings of out_dir (lib.storage.artifacts)."""
    out_dir = Path(out_dir)
    act_path = artifacts.path("activations", out_dir)
    act = artifacts.load_file("activations", act_path, require=["tokens", "prompt_input_ids", "prompt_lengths",
                                                                "head_layer", "head_index"])
    total = len(act["head_layer"])
    if model is not None and "model" in act and str(act["model"]) != model:
        raise ValueError(f"{act_path} holds the greedy tokens of model {str(act['model'])!r} "
                         f"but this notebook runs model={model!r}: the divergence must be measured on the same "
                         f"model; set model to {str(act['model'])!r} or rerun 01_extract_activations with {model!r}")
    path = artifacts.path("rankings", out_dir)
    rankings = artifacts.load_file("rankings", path, require=["head_idx", "layer", "head"])
    check_same_heads(str(path), len(rankings), str(act_path), total)
    if sorted(rankings["head_idx"].tolist()) != list(range(total)):
        raise ArtifactError(f"{path}: head_idx must list every head 0..{total - 1} once; regenerate it with "
                            f"04_ranking_variants")
    by_head = rankings.set_index("head_idx").loc[np.arange(total)]
    if not (np.array_equal(by_head["layer"].to_numpy(), act["head_layer"])
            and np.array_equal(by_head["head"].to_numpy(), act["head_index"])):
        raise ArtifactError(f"{path}: (layer, head) of the heads differ from {act_path.name}'s head map: the files "
                            f"come from different models; rerun the notebooks of this run in order")
    if isinstance(variants, str) or not isinstance(variants, (list, tuple)) or not variants:
        raise ValueError(f"variants must be a non-empty list of ranking variant names (columns of rankings.csv), "
                         f"e.g. ['rank_diff']; got {variants!r}")
    available = [c for c in rankings.columns if c not in ("head_idx", "layer", "head")]
    unknown = [v for v in variants if v not in available]
    if unknown:
        raise ValueError(f"ranking variant(s) {unknown} not in {path}; available: {available}. The columns are "
                         f"produced by notebook 04_ranking_variants (its `variants` params choose them): add the "
                         f"variant there and rerun 04, or pick one of the available ones")
    for v in variants:
        if not np.isfinite(pd.to_numeric(rankings[v], errors="coerce")).all():
            raise ArtifactError(f"{path}: column {v!r} has missing or non-numeric scores; regenerate it with 04")
    tokens = act["tokens"].astype(np.int64)
    lengths = act["prompt_lengths"].astype(np.int64)
    ids = act["prompt_input_ids"].astype(np.int64)
    prompts = [ids[i, ids.shape[1] - lengths[i]:] for i in range(len(lengths))]
    category = act["prompt_category"] if "prompt_category" in act else np.array(["all"] * len(prompts))
    prompt_ids = act["prompt_ids"] if "prompt_ids" in act else np.arange(len(prompts))
    held_out = oracle_prompt_rows(out_dir, prompt_ids) if ORACLE in variants else []
    keep = select_prompt_rows(category, n_prompts, exclude=held_out)
    digest = hashlib.sha256()
    for a in (tokens[keep], lengths[keep], ids[keep]):
        digest.update(np.ascontiguousarray(a).tobytes())
    n_heads = int(act["n_heads"]) if "n_heads" in act else int(act["head_index"].max()) + 1
    return AblationInputs(
        out_dir=out_dir, model=str(act["model"]) if "model" in act else "", prompts=[prompts[i] for i in keep],
        tokens=tokens[keep], prompt_ids=np.asarray(prompt_ids)[keep], prompt_category=np.asarray(category)[keep],
        rankings=rankings, total_heads=total, n_heads=n_heads,
        pad_token_id=int(act["pad_token_id"]) if "pad_token_id" in act else 0, tokens_checksum=digest.hexdigest(),
        held_out_prompt_ids=np.asarray(prompt_ids)[held_out])


def oracle_prompt_rows(out_dir: Path, prompt_ids) -> list[int]:
    """Rows of activations.npz the oracle (oracle.npz, notebook 01) was computed from: left out of 05's prompts."""
    path = artifacts.path("oracle", out_dir)
    if not path.exists():
        raise ArtifactError(f"variant {ORACLE!r} is requested but {path} is missing: notebook 01 computes it "
                            f"(oracle: true), notebook 04 adds the column; rerun both, or drop {ORACLE!r}")
    used = set(artifacts.load_file("oracle", path, keys=["prompt_ids"])["prompt_ids"].tolist())
    return [r for r, p in enumerate(np.asarray(prompt_ids).tolist()) if p in used]


def select_prompt_rows(category: np.ndarray, n_prompts: int | None, exclude=()) -> list[int]:
    """None -> all rows; n -> n rows spread evenly over the categories (in file order), the first ones of each
    category, earlier categories taking the remainder (12 prompts of 6 categories = the first 2 of each).
    Rows in `exclude` (the oracle's prompts) are never selected."""
    category = np.asarray(category)
    rows = [r for r in range(len(category)) if r not in set(exclude)]
    if not rows:
        raise ValueError("no prompts left for the ablation: the oracle (01, oracle_prompts) uses all of them; "
                         "lower oracle_prompts in 01_extract_activations or raise its n_prompts")
    if n_prompts is None:
        return rows
    if isinstance(n_prompts, bool) or not isinstance(n_prompts, (int, np.integer)) or not 1 <= n_prompts <= len(rows):
        left = f" not used by the oracle" if len(exclude) else ""
        raise ValueError(f"n_prompts must be None (all {len(rows)} prompts of the activations{left}) or an integer "
                         f"in [1, {len(rows)}]; got {n_prompts!r}")
    cats = list(dict.fromkeys(category[rows].tolist()))
    by_cat = {c: [r for r in rows if category[r] == c] for c in cats}
    base, extra = divmod(int(n_prompts), len(cats))
    want = {c: base + (1 if k < extra else 0) for k, c in enumerate(cats)}
    picked = [r for c in cats for r in by_cat[c][:want[c]]]
    if len(picked) < n_prompts:                      # a short category: fill from the others, in file order
        picked += [r for r in rows if r not in picked][:n_prompts - len(picked)]
    return sorted(picked)


def prepare(out_dir: str | Path, model: str | None = None, variants: list[str] = ("rank_diff",), n_random: int = 5,
            include_reverse: bool = True, step_size: int | None = None, fractions: list[float] | None = None,
            n_prompts: int | None = None, perturbation: str = "zero", noise_sigma: float = 0.0, seed: int = 0,
            shard: str = "", batch_size: int = 32, n_matched: int = 0) -> tuple[AblationInputs, AblationPlan]:
    """Validate every parameter and input artifact (nothing is written): -> (inputs, plan)."""
    shard_spec = parse_shard(shard)
    if perturbation not in PERTURBATIONS:
        raise ValueError(f"perturbation must be one of {list(PERTURBATIONS)}; got {perturbation!r}")
    if perturbation == "noise" and not (isinstance(noise_sigma, (int, float)) and noise_sigma > 0):
        raise ValueError(f"perturbation='noise' needs noise_sigma > 0 (standard deviation of the Gaussian noise "
                         f"added to the head's Q rows and O columns, in weight units, e.g. 0.05); got {noise_sigma!r}")
    if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 0:
        raise ValueError(f"n_random must be an integer >= 0 (number of random orders; the paper uses 5); got {n_random!r}")
    if isinstance(n_matched, bool) or not isinstance(n_matched, int) or n_matched < 0:
        raise ValueError(f"n_matched must be an integer >= 0 (layer-matched random orders per ranking and per "
                         f"reverse: random heads with the layer histogram of that ordering's first k); "
                         f"got {n_matched!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size (rows per forward pass) must be a positive integer; got {batch_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer; got {seed!r}")
    inputs = load_inputs(out_dir, list(variants) if isinstance(variants, (list, tuple)) else variants,
                         n_prompts, model)
    points = make_points(inputs.total_heads, step_size, fractions)
    orderings = make_orderings(inputs.rankings, list(variants), n_random, include_reverse, seed, n_matched,
)
    plan = AblationPlan(orderings=orderings, n_removed=points, total_heads=inputs.total_heads,
                        perturbation=perturbation, noise_sigma=float(noise_sigma) if perturbation == "noise" else 0.0,
                        seed=seed, shard=shard_spec, variants=list(variants))
    if shard_spec and shard_spec[1] > len(plan.units()):
        raise ValueError(f"shard {shard!r}: only {len(plan.units())} work units (points x ordering groups) exist; "
                         f"use at most {len(plan.units())} shards")
    return inputs, plan


# ----------------------------------------------------------------------------- computation

class DivergenceEngine:
    """Teacher-forced divergence on the T predicting positions for (head mask, prompt) rows.

    Only the base model runs on all positions; the unembedding (in float32) runs on the T predicting positions,
    `logit_rows` rows at a time, so no [rows, positions, vocab] tensor of a whole forward batch exists.

    Without final-logit soft-capping the logits are affine in the final hidden state, z = W h + b, so
        KL_t = sum_v p_c (log p_c - log p_a) = u_c . (h_c - h_a) + S_c (lse_a - lse_c),
    with u_c = W^T p_c, S_c = sum_v p_c (1 up to rounding) and lse = logsumexp(z) (accumulated in float64 from a
    float32 exp-sum): the clean cache is [T, hidden] per prompt and each ablated position costs its logits and one
    logsumexp ("linear" method). With soft-capping the clean p and log p [T, vocab] are cached and
    KL_t = sum_v p_c (log p_c - log p_a) directly ("direct" method). Rows are ordered by prompt length so each
    forward pads little; the clean rows go through exactly the same path (an all-ones mask), so identical rows give
    bitwise identical numbers and the divergence of an unablated model is exactly 0.
    """

    def __init__(self, model, arch: ArchInfo, inputs: AblationInputs, batch_size: int = 32,
                 logit_rows: int | None = None, logit_chunk_mb: float = 32.0, method: str = "auto"):
        self.model, self.arch, self.inputs = model, arch, inputs
        self.device = next(model.parameters()).device
        self.T = inputs.n_tokens
        self.V = arch.vocab_size
        self.batch_size = batch_size
        self.logit_rows = logit_rows or max(1, int(logit_chunk_mb * 2 ** 20 // (self.T * self.V * 4)))
        self.seqs = [np.concatenate([p, t[:-1]]) for p, t in zip(inputs.prompts, inputs.tokens)]
        self.base = arch.base_model()
        self.W = arch.unembedding_float32()[0]                                        # [vocab, hidden] float32
        self.softcap = arch.final_logit_softcap
        if method == "auto":
            method = "direct" if self.softcap else "linear"
        if method not in ("linear", "direct") or (method == "linear" and self.softcap):
            raise ValueError(f"method must be 'auto', 'direct' or (without logit soft-capping) 'linear'; got {method!r}")
        self.method = method

    def ones(self, n: int = 1) -> torch.Tensor:
        return torch.ones(n, self.arch.total_heads, device=self.device)

    def clean_bytes_per_prompt(self) -> int:
        return 2 * self.T * self.V * 4 if self.method == "direct" else 2 * self.T * self.arch.hidden_size * 8

    def _rows(self, prompts: list[int], n_masks: int) -> list[tuple[int, int]]:
        rows = [(m, p) for m in range(n_masks) for p in prompts]
        return sorted(rows, key=lambda r: len(self.seqs[r[1]]))          # stable: ties keep (mask, prompt) order

    @torch.inference_mode()
    def hidden_chunks(self, prompts: list[int], masks: torch.Tensor):
        """Yield (rows [(mask i, prompt p)], final-normed hidden float32 [len(rows), T, hidden]) for all
        mask x prompt rows; `logit_rows` rows at a time."""
        rows = self._rows(prompts, len(masks))
        masks = masks.to(self.device)
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start:start + self.batch_size]
            ids, attn = left_pad([self.seqs[p].tolist() for _, p in batch], self.inputs.pad_token_id)
            ids, attn = ids.to(self.device), attn.to(self.device)
            pos = (attn.cumsum(-1) - 1).clamp(min=0)
            with HeadHooks(self.arch, mask=masks[[m for m, _ in batch]]):
                hidden = self.base(input_ids=ids, attention_mask=attn, position_ids=pos,
                                   use_cache=False).last_hidden_state[:, -self.T:]
            for s in range(0, len(batch), self.logit_rows):
                yield batch[s:s + self.logit_rows], hidden[s:s + self.logit_rows].float()

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """float32 logits [.., vocab] from final-normed hidden states (ArchInfo.logits_from_normed in float32)."""
        return self.arch.logits_from_normed(h, float32=True)

    @staticmethod
    def _exp_lse(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """In place: z -> exp(z - max); returns (that, logsumexp(z) in float64)."""
        m = z.amax(-1, keepdim=True)
        e = z.sub_(m).exp_()
        return e, m[..., 0].double() + e.sum(-1).double().log()

    @torch.inference_mode()
    def clean(self, prompts: list[int]) -> dict:
        """Cache of the unablated model for these prompts (compute once per prompt chunk)."""
        k = {p: i for i, p in enumerate(prompts)}
        if self.method == "linear":
            shape = (len(prompts), self.T)
            out = {"h": torch.empty(*shape, self.arch.hidden_size, dtype=torch.float64, device=self.device),
                   "u": torch.empty(*shape, self.arch.hidden_size, dtype=torch.float64, device=self.device),
                   "S": torch.empty(shape, dtype=torch.float64, device=self.device),
                   "lse": torch.empty(shape, dtype=torch.float64, device=self.device)}
            for batch, h in self.hidden_chunks(prompts, self.ones()):
                e, lse = self._exp_lse(self.logits(h))
                p = e.div_(e.sum(-1, keepdim=True))
                idx = [k[pp] for _, pp in batch]
                out["h"][idx], out["lse"][idx] = h.double(), lse
                out["S"][idx], out["u"][idx] = p.sum(-1, dtype=torch.float64), (p @ self.W).double()
            return out
        logp = torch.empty(len(prompts), self.T, self.V, dtype=torch.float32, device=self.device)
        for batch, h in self.hidden_chunks(prompts, self.ones()):
            z = self.logits(h)
            logp[[k[pp] for _, pp in batch]] = z - torch.logsumexp(z, -1, keepdim=True)
        return {"logp": logp, "p": logp.exp()}

    @torch.inference_mode()
    def divergence(self, prompts: list[int], masks: torch.Tensor, clean: dict) -> np.ndarray:
        """float64 [len(masks), len(prompts)]: mean over the T positions of KL(clean || masked), nats."""
        k = {p: i for i, p in enumerate(prompts)}
        out = np.full((len(masks), len(prompts)), np.nan)
        for batch, h in self.hidden_chunks(prompts, masks):
            idx = [k[p] for _, p in batch]
            z = self.logits(h)
            if self.method == "linear":
                _, lse = self._exp_lse(z)
                dh = clean["h"][idx] - h.double()
                kl = (clean["u"][idx] * dh).sum(-1) + clean["S"][idx] * (lse - clean["lse"][idx])
            else:
                z -= torch.logsumexp(z, -1, keepdim=True)
                kl = torch.linalg.vecdot(clean["p"][idx], torch.sub(clean["logp"][idx], z, out=z)).double()
            kl = kl.mean(-1).cpu().numpy()
            for r, (m, p) in enumerate(batch):
                out[m, k[p]] = kl[r]
        return out


def removal_masks(plan: AblationPlan, group: list[int], point: int, device="cpu") -> tuple[torch.Tensor, list[int]]:
    """Distinct head masks of the orderings in `group` at `point` -> (masks [m, heads], mask index per ordering)."""
    n = int(plan.n_removed[point])
    keys, index = {}, []
    for o in group:
        key = tuple(sorted(plan.orderings[o].order[:n]))
        index.append(keys.setdefault(key, len(keys)))
    masks = torch.ones(len(keys), plan.total_heads, device=device)
    for key, m in keys.items():
        if key:
            masks[m, list(key)] = 0.0
    return masks, index


def _noise_seed(seed: int, head: int, part: int) -> int:
    return int(np.random.SeedSequence([seed, head, part]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _head_noise(seed: int, head: int, part: int, shape, sigma: float) -> torch.Tensor:
    """N(0, sigma^2) float32 noise of one weight slice, fixed by (seed, head, part)."""
    gen = torch.Generator().manual_seed(_noise_seed(seed, head, part))
    return torch.randn(shape, generator=gen, dtype=torch.float32) * sigma


def perturbed_heads(arch: ArchInfo, heads, sigma: float, seed: int):
    """Context: add N(0, sigma^2) noise to the Q rows and O columns of `heads` (noise fixed by (seed, head));
    the exact original weights are restored on exit (lib.model.hooks.patched_weights)."""
    patches = []
    for h in heads:
        slices = arch.head_weight_slices(*divmod(int(h), arch.n_heads))
        for part, key in enumerate(("q", "o")):
            add = lambda w, h=int(h), part=part: w + _head_noise(seed, h, part, w.shape, sigma).to(w.device, w.dtype)
            patches.append((slices[key], add))
    return patched_weights(patches)


def zeroed_heads(arch: ArchInfo, heads):
    """Context: the output-projection columns of `heads` set to zero (the heads removed at the weights, no hook);
    restored bit-exactly on exit."""
    return patched_weights([(arch.head_weight_slices(*divmod(int(h), arch.n_heads))["o"], torch.zeros_like)
                            for h in heads])


# ----------------------------------------------------------------------------- checkpoints and shards

def fingerprint(plan: AblationPlan, inputs: AblationInputs, arch: ArchInfo | None = None, dtype=None) -> dict:
    """Everything the numbers depend on (not batch sizes or devices, which change only float noise)."""
    orders = hashlib.sha256(np.array([o.order for o in plan.orderings], dtype=np.int64).tobytes()).hexdigest()
    return {"model": inputs.model, "weights_id": getattr(arch, "weights_id", ""), "dtype": str(dtype),
            "tokens": inputs.tokens_checksum, "prompt_ids": [int(p) for p in inputs.prompt_ids],
            "perturbation": plan.perturbation, "noise_sigma": plan.noise_sigma,
            "orderings": [o.label for o in plan.orderings], "orders_sha256": orders,
            "n_removed": [int(n) for n in plan.n_removed], "total_heads": plan.total_heads}


@dataclass
class Checkpoint:
    """State of one run or shard: kl [orderings, points, prompts] (NaN = not computed), done [groups, points, prompts]."""
    path: Path
    fingerprint: dict
    shard: tuple[int, int]
    assigned: np.ndarray          # bool [groups, points]
    done: np.ndarray              # bool [groups, points, prompts]
    kl: np.ndarray                # float64 [orderings, points, prompts]

    @classmethod
    def new(cls, path, fp, plan: AblationPlan, n_prompts: int, shard: tuple[int, int]):
        g, j = len(plan.groups()), len(plan.n_removed)
        assigned = np.zeros((g, j), dtype=bool)
        for unit in plan.units()[shard[0] - 1::shard[1]]:
            assigned[unit] = True
        return cls(Path(path), fp, shard, assigned, np.zeros((g, j, n_prompts), dtype=bool),
                   np.full((len(plan.orderings), j, n_prompts), np.nan))

    @classmethod
    def load(cls, path) -> "Checkpoint":
        d = artifacts.load_file("ablation_checkpoint", path)
        return cls(Path(path), json.loads(str(d["fingerprint"])), (int(d["shard_i"]), int(d["shard_n"])),
                   d["assigned"].astype(bool), d["done"].astype(bool), d["kl"].astype(np.float64))

    def save(self) -> None:
        artifacts.save_file("ablation_checkpoint", self.path, dict(
            fingerprint=json.dumps(self.fingerprint, sort_keys=True), shard_i=self.shard[0], shard_n=self.shard[1],
            assigned=self.assigned, done=self.done, kl=self.kl))

    @property
    def complete(self) -> bool:
        return bool(self.done[self.assigned].all())

    def units_done(self) -> tuple[int, int]:
        return int(self.done[self.assigned].all(-1).sum()), int(self.assigned.sum())


def _differences(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _open_checkpoint(path: Path, fp: dict, plan: AblationPlan, n_prompts: int, shard: tuple[int, int]) -> Checkpoint:
    if path.exists():
        ckpt = Checkpoint.load(path)
        diff = _differences(ckpt.fingerprint, fp)
        if diff or ckpt.shard != shard:
            raise ArtifactError(
                f"{path} was computed with different settings (differs in: {diff or ['shard']}); it cannot be "
                f"resumed by this run. Delete it (rm {path}) to start afresh, or rerun with its original parameters")
        return ckpt
    return Checkpoint.new(path, fp, plan, n_prompts, shard)


def checkpoint_path(out_dir: str | Path, fp: dict) -> Path:
    """Checkpoint of an unsharded run, named by a hash of its settings: changing a parameter starts a new file
    (and changing it back resumes the old one) instead of clashing with it."""
    digest = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:12]
    return artifacts.path("ablation_checkpoint", out_dir, digest=digest)


def shard_path(out_dir: str | Path, i: int, n: int) -> Path:
    return artifacts.path("ablation_checkpoint", out_dir, shard=(i, n))


def existing_shards(out_dir: str | Path) -> dict[tuple[int, int], Path]:
    return artifacts.shards("ablation_checkpoint", out_dir)


def merge_shards(out_dir: str | Path, fp: dict, plan: AblationPlan, n_prompts: int) -> np.ndarray:
    """Combine complete shard files into kl [orderings, points, prompts]; refuse incomplete or mismatched sets."""
    found = existing_shards(out_dir)
    counts = sorted({n for _, n in found})
    folder = shard_path(out_dir, 1, 1).parent
    if len(counts) != 1:
        raise ArtifactError(f"{folder} holds shard files of different shard counts {counts}: delete the stale ones "
                            f"(keep one complete set shard-*-of-N.npz) and rerun with shard=''")
    n = counts[0]
    missing = [i for i in range(1, n + 1) if (i, n) not in found]
    problems = []
    if missing:
        problems.append(f"missing shards {missing} of {n}: run them with " +
                        ", ".join(f"shard='{i}/{n}'" for i in missing) + f" (SLURM array task ids {missing})")
    kl = np.full((len(plan.orderings), len(plan.n_removed), n_prompts), np.nan)
    covered = np.zeros((len(plan.groups()), len(plan.n_removed)), dtype=bool)
    incomplete, mismatched = [], []
    for (i, _), path in sorted(found.items()):
        ckpt = Checkpoint.load(path)
        diff = _differences(ckpt.fingerprint, fp)
        if diff:
            mismatched.append(f"{path.name} (differs in: {diff})")
            continue
        if not ckpt.complete:
            done, total = ckpt.units_done()
            incomplete.append(f"shard {i}/{n} ({done} of {total} units done): rerun it with shard='{i}/{n}' (it resumes)")
            continue
        for g, j in zip(*np.nonzero(ckpt.assigned)):
            for o in plan.groups()[g]:
                kl[o, j] = ckpt.kl[o, j]
            covered[g, j] = True
    if mismatched:
        problems.append(f"shards computed with other settings than this run: {mismatched}; rerun them with the "
                        f"current parameters (delete {folder} first) or run this merge with their parameters")
    problems += incomplete
    if not problems and not covered.all():
        problems.append(f"the shards of {folder} do not cover all work units; delete it and rerun all shards")
    if problems:
        raise ArtifactError("cannot merge ablation shards: " + "; ".join(problems))
    return kl


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
            if artifacts.artifact(name).producer != "05_ablation":
                raise ArtifactError(f"{name!r} is not an artifact of 05_ablation; use one of "
                                    f"{[a.name for a in artifacts.producer_outputs('05_ablation')]}")
        paths = [artifacts.save("ablation", out_dir, self.to_frame()),
                 artifacts.save("ablation_kl", out_dir, self._kl_arrays())]
        paths += [artifacts.save(name, out_dir, data) for name, data in {**(tables or {}), **(figures or {})}.items()]
        if manifest is not None:
            update_manifest(out_dir, "05_ablation", {**manifest, "files": [p.name for p in paths]})
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
