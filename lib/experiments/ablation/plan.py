"""The ablation plan (notebook 05): which heads are removed in which order for every ordering (rankings,
random and layer-matched orders, the oracle), the fractions measured and the plan's checks."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from lib.storage import artifacts
from lib.storage.checkpoints import parse_shard
from lib.storage.store import ArtifactError, check_same_heads, run_folder
from lib.storage.notebooks import NB

__all__ = ["PERTURBATIONS", "RANDOM_VARIANT", "ORACLE", "Ordering", "AblationInputs", "make_points", "make_orderings",
           "load_inputs", "select_prompt_rows", "prepare"]


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
    out_dir = run_folder(out_dir)
    act_path = artifacts.path("activations", out_dir)
    act = artifacts.load_file("activations", act_path, require=["tokens", "prompt_input_ids", "prompt_lengths",
                                                                "head_layer", "head_index"])
    total = len(act["head_layer"])
    if model is not None and "model" in act and str(act["model"]) != model:
        raise ValueError(f"{act_path} holds the greedy tokens of model {str(act['model'])!r} "
                         f"but this notebook runs model={model!r}: the divergence must be measured on the same "
                         f"model; set model to {str(act['model'])!r} or rerun {NB.EXTRACT} with {model!r}")
    path = artifacts.path("rankings", out_dir)
    rankings = artifacts.load_file("rankings", path, require=["head_idx", "layer", "head"])
    check_same_heads(str(path), len(rankings), str(act_path), total)
    if sorted(rankings["head_idx"].tolist()) != list(range(total)):
        raise ArtifactError(f"{path}: head_idx must list every head 0..{total - 1} once; regenerate it with "
                            f"{NB.RANKING}")
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
                         f"produced by notebook {NB.RANKING} (its `variants` params choose them): add the "
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
                         f"lower oracle_prompts in {NB.EXTRACT} or raise its n_prompts")
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
