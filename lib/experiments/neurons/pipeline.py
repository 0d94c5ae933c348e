"""A neuron-effects run: validated setup, resumable batched computation, shards and their merge, the artifacts
(neuron_effects.csv, neuron_summaries.json, layer_summary.csv, figures, manifest section) and the live check."""
from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from lib.storage import artifacts
from lib.storage.checkpoints import CheckpointMismatch, Parts, describe_differences, differences, parse_shard
from lib.model.architectures import ArchInfo
from lib.experiments.neurons.effects import (CleanPass, Treatment, _batch_rows, classify, clean_pass, direct_logits,
                                 direct_ratio, frozen_logits, neuron_directions, neuron_scales, total_logits_full,
                                 treated_logits_incremental)
from lib.experiments.neurons.selection import (MODES, SCALES, SELECTORS, Neuron, PromptSet, check_mlp_site, load_prompts,
                                   read_neuron_file, select_neurons, validate_neurons)
from lib.experiments.neurons.summaries import layer_summary, summaries_frame, summarize_neurons
from lib.storage.store import ArtifactError, run_folder
from lib.storage.notebooks import NB

__all__ = ["NeuronSetup", "prepare", "compute_batch", "read_effects_csv", "compute_effects", "NeuronResult", "run",
           "verify"]

# ----------------------------------------------------------------------------- setup (all validation here)

def _token_id(tokenizer, arch: ArchInfo, value, what: str, prompt: int) -> int:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if not 0 <= int(value) < arch.vocab_size:
            raise ValueError(f"{what} id {value} of prompt {prompt} is outside the vocabulary (0..{arch.vocab_size - 1})")
        return int(value)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} of prompt {prompt} must be a non-empty string or a token id (got {value!r})")
    ids = tokenizer.encode(value, add_special_tokens=False)
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise ValueError(f"{what} {value!r} of prompt {prompt} tokenises to {len(ids)} tokens {pieces} (ids {ids}); a "
                         f"target must be ONE token (refused rather than guessing which one): choose a single-token "
                         f"string (mind the leading space, e.g. ' Paris' vs 'Paris') or give the token id")
    return int(ids[0])


@dataclass
class NeuronSetup:
    """Everything a run needs, validated; nothing has been written yet."""
    model: Any
    tokenizer: Any
    arch: ArchInfo
    out_dir: Path
    prompts: PromptSet
    clean: CleanPass
    neurons: list[Neuron]
    mode: str
    activation_scale: str
    target_ids: list[int]
    distractor_ids: list[int]
    target_source: str
    thresholds: tuple[float, float]
    batch_size: int
    topk: int
    shard: tuple[int, int] | None
    skip_lower: bool = True
    params: dict = field(default_factory=dict)

    def settings(self) -> dict:
        """Everything that defines the numbers (not batch size, thresholds, shard): what a shard file or checkpoint
        must match to be merged or resumed."""
        h = hashlib.sha256()
        for ids in self.prompts.input_ids:
            h.update(ids.numpy().astype(np.int64).tobytes() + b"|")
        return {"model": self.arch.source, "weights": self.arch.weights_id,
                "dtype": str(next(self.model.parameters()).dtype), "mode": self.mode,
                "activation_scale": self.activation_scale, "targets": list(self.target_ids),
                "distractors": list(self.distractor_ids), "topk": self.topk,
                "neurons": [n.id for n in self.neurons], "prompts_sha256": h.hexdigest()[:16]}

    def fingerprint(self) -> str:
        """A short hash of settings() (recorded in the manifest)."""
        return hashlib.sha256(json.dumps(self.settings(), sort_keys=True).encode()).hexdigest()[:16]

    def shard_neurons(self, shard: tuple[int, int] | None) -> list[Neuron]:
        """Round-robin split (balances layers, hence cost): shard i of n takes neurons[i-1::n]."""
        return list(self.neurons) if shard is None else self.neurons[shard[0] - 1::shard[1]]

    def prompt_table(self) -> pd.DataFrame:
        tok = self.tokenizer
        return pd.DataFrame({
            "prompt_id": self.prompts.prompt_ids, "category": self.prompts.categories,
            "n_tokens": [len(i) for i in self.prompts.input_ids], "text": self.prompts.texts,
            "target": [repr(tok.decode([t])) for t in self.target_ids],
            "distractor": [repr(tok.decode([t])) for t in self.distractor_ids],
            "clean_target_prob": torch.softmax(self.clean.logits, -1)[
                torch.arange(len(self.target_ids)), torch.tensor(self.target_ids)].cpu().numpy().round(4)})

    def neuron_table(self) -> pd.DataFrame:
        counts = pd.Series([n.layer for n in self.neurons]).value_counts().sort_index()
        return pd.DataFrame({"layer": counts.index, "n_neurons": counts.values})


def prepare(model, tokenizer, arch: ArchInfo, *, out_dir: str | Path = "outputs/dev", n_prompts: int = 4,
            neurons: list | None = None, neurons_file: str = "", selector: str = "top_activation",
            n_neurons: int = 32, layers: list | None = None, mode: str = "add", activation_scale: str = "actual",
            targets: list | None = None, thresholds=(0.3, 0.7), batch_size: int = 256, topk: int = 5,
            shard: str = "", seed: int = 0, chat_template: bool = True, skip_lower: bool = True,
            progress: bool = True) -> NeuronSetup:
    """Validate every parameter, load the prompts, run the clean pass, resolve the neuron set and the targets.
    Raises ValueError (one clear message) on bad input; writes nothing."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use 'add' (add V to the residual stream) or 'ablate' (the "
                         f"neuron's activation set to 0 at the down-projection input)")
    if activation_scale not in SCALES:
        raise ValueError(f"unknown activation_scale {activation_scale!r}; use one of {list(SCALES)}")
    if (not isinstance(thresholds, (list, tuple)) or len(thresholds) != 2
            or not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in thresholds)
            or not 0 <= float(thresholds[0]) <= float(thresholds[1]) <= 1):
        raise ValueError(f"thresholds must be [low, high] with 0 <= low <= high <= 1 (got {thresholds!r}); default [0.3, 0.7]")
    for name, value in (("batch_size", batch_size), ("topk", topk)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer (got {value!r})")
    shard_t = parse_shard(shard)
    check_mlp_site(arch)
    if neurons is not None and neurons_file:
        raise ValueError("give either neurons (an explicit list) or neurons_file, not both")
    explicit = None
    if neurons is not None:
        explicit = validate_neurons(arch, neurons, "the neurons parameter")
    elif neurons_file:
        explicit = validate_neurons(arch, read_neuron_file(neurons_file), f"neurons_file {neurons_file}")
    elif selector not in SELECTORS:
        raise ValueError(f"unknown neuron selector {selector!r}; use one of {list(SELECTORS)}")
    else:                                # validate n_neurons and layers before the (slower) clean pass
        select_neurons(arch, "random", n_neurons, layers, seed=seed)
    prompts = load_prompts(out_dir, tokenizer, arch, n_prompts, chat_template)
    if targets is not None:
        if not isinstance(targets, (list, tuple)) or len(targets) != len(prompts):
            raise ValueError(f"targets must be None (clean top prediction) or a list of {len(prompts)} entries "
                             f"{{target, distractor}}, one per prompt (got {targets!r:.200})")
        pairs = []
        for p, entry in enumerate(targets):
            if isinstance(entry, dict):
                if "target" not in entry:
                    raise ValueError(f"targets[{p}] has no 'target' key: {entry!r}")
                t = _token_id(tokenizer, arch, entry["target"], "target", p)
                d = entry.get("distractor")
                d = None if d is None else _token_id(tokenizer, arch, d, "distractor", p)
                if d == t:
                    raise ValueError(f"targets[{p}]: the distractor is the target itself ({entry!r}); give another "
                                     f"distractor or leave it out (then the clean top prediction is used)")
                pairs.append((t, d))
            else:
                pairs.append((_token_id(tokenizer, arch, entry, "target", p), None))
    clean = clean_pass(model, arch, prompts, progress=progress)
    top2 = clean.logits.topk(2, dim=-1).indices.tolist()
    if targets is None:
        target_ids, distractor_ids, source = [t[0] for t in top2], [t[1] for t in top2], "clean top prediction"
    else:
        target_ids = [t for t, _ in pairs]
        distractor_ids = [d if d is not None else (top[0] if top[0] != t else top[1])
                          for (t, d), top in zip(pairs, top2)]
        source = "params targets"
    if explicit is None:
        explicit = select_neurons(arch, selector, n_neurons, layers, clean.acts, seed)
    params = dict(out_dir=str(out_dir), model=arch.source, n_prompts=n_prompts, neurons=neurons,
                  neurons_file=neurons_file, selector=selector, n_neurons=n_neurons, layers=layers, mode=mode,
                  activation_scale=activation_scale, targets=targets, thresholds=list(thresholds),
                  batch_size=batch_size, topk=topk, shard=shard, seed=seed, chat_template=chat_template,
                  prompt_source=prompts.source)
    return NeuronSetup(model, tokenizer, arch, run_folder(out_dir), prompts, clean, explicit, mode, activation_scale,
                       target_ids, distractor_ids, source, (float(thresholds[0]), float(thresholds[1])),
                       batch_size, topk, shard_t, skip_lower, params)


# ----------------------------------------------------------------------------- computation (resumable)

def _plan(setup: NeuronSetup, neurons: list[Neuron]) -> list[tuple[int, int, int]]:
    """Batches (prompt, start, stop) over `neurons` (sorted by layer, so a batch mostly shares its layer)."""
    rows = setup.batch_size - 1                 # one row per batch is the clean reference
    rows = max(rows, 1)
    return [(p, s, min(s + rows, len(neurons))) for p in range(len(setup.prompts))
            for s in range(0, len(neurons), rows)]


def batch_treatment(mode: str, neurons: list[Neuron], directions: torch.Tensor, actual: torch.Tensor,
                    scale: torch.Tensor) -> Treatment:
    """Row 0 untreated (the clean reference), then one row per neuron: "add" pushes V = scale * W_down[:, n] into
    the residual stream after the neuron's layer; "ablate" sets the neuron's activation to actual - scale at the
    down-projection input (0 with activation_scale "actual": the neuron zeroed). actual, scale: [N] one prompt."""
    layers = torch.tensor([n.layer for n in neurons])
    layers = torch.cat([layers.min()[None], layers])
    if mode == "add":
        vectors = directions * scale.to(directions.dtype)[:, None]                           # [N, hidden]
        return Treatment.add(layers, torch.cat([torch.zeros_like(vectors[:1]), vectors]))
    index = torch.tensor([-1] + [n.neuron for n in neurons])
    values = torch.cat([torch.zeros(1), (actual - scale).float().cpu()])
    return Treatment.ablate(layers, index, values)


def compute_batch(setup: NeuronSetup, neurons: list[Neuron], prompt: int,
                  directions: torch.Tensor | None = None) -> pd.DataFrame:
    """Direct, total and indirect effects of `neurons` on prompt `prompt`: one incremental forward (plus a clean
    reference row in the same batch, so a zero V gives an effect at rounding level, < 1e-6) and one matrix step."""
    arch, clean = setup.arch, setup.clean
    dirs = neuron_directions(arch, neurons) if directions is None else directions
    actual, scale = neuron_scales(clean, neurons, setup.activation_scale)
    treatment = batch_treatment(setup.mode, neurons, dirs, actual[:, prompt], scale[:, prompt])
    total, deltas = treated_logits_incremental(setup.model, arch, clean, prompt, treatment, setup.skip_lower)
    direct = direct_logits(arch, clean.h_final[prompt], deltas)
    vectors, layers = deltas[1:], treatment.layers[1:]
    t, d = setup.target_ids[prompt], setup.distractor_ids[prompt]
    m = _batch_rows(total[1:], direct[1:], total[0], direct[0], t, d, setup.topk)
    clean_probs = torch.softmax(total[0], -1)
    frame = pd.DataFrame({
        "neuron_id": [n.id for n in neurons], "layer": layers.numpy(), "neuron": [n.neuron for n in neurons],
        "prompt": prompt, "prompt_id": setup.prompts.prompt_ids[prompt], "target_id": t, "distractor_id": d,
        "activation": actual[:, prompt].double().cpu().numpy(), "scale": scale[:, prompt].double().cpu().numpy(),
        "v_norm": vectors.float().norm(dim=-1).double().cpu().numpy(),
        "clean_target_logit": float(total[0, t]), "clean_target_prob": float(clean_probs[t]), **m})
    frame["direct_ratio"] = direct_ratio(frame["direct"], frame["indirect"], frame["total"])
    frame["aligned"] = (frame["direct"] * frame["indirect"]) > 0
    return frame


def read_effects_csv(path: str | Path) -> pd.DataFrame:
    """An effects table (neuron_effects.csv, a shard or a checkpoint part), list columns kept as text."""
    return artifacts.load_file("neuron_effects", path)


def compute_effects(setup: NeuronSetup, neurons: list[Neuron], parts_dir: Path | None = None,
                    progress: bool = True, desc: str = "neuron effects") -> pd.DataFrame:
    """All (neuron, prompt) rows for `neurons`, batch by batch; with parts_dir every finished batch is saved there
    and a rerun with the same settings resumes from them (other settings: CheckpointMismatch naming what differs)."""
    plan = _plan(setup, neurons)
    dirs = neuron_directions(setup.arch, neurons)
    parts = None
    if parts_dir is not None:
        parts = Parts.open(parts_dir, {**setup.settings(), "batch_size": setup.batch_size,
                                       "computed_neurons": [n.id for n in neurons]})
    frames, done = [], 0
    for k, (p, s, e) in enumerate(tqdm(plan, desc=desc, unit="batch", disable=not progress)):
        part = artifacts.path("neuron_effects_part", parts.folder, batch=k) if parts else None
        if part is not None and part.exists():
            frames.append(read_effects_csv(part))
            done += 1
            continue
        frame = compute_batch(setup, neurons[s:e], p, dirs[s:e])
        if part is not None:
            artifacts.save("neuron_effects_part", parts.folder, frame, batch=k)
        frames.append(frame)
    if done and progress:
        print(f"[neurons] resumed: {done} of {len(plan)} batches were already done")
    effects = pd.concat(frames, ignore_index=True)
    return effects.sort_values(["layer", "neuron", "prompt"], kind="stable").reset_index(drop=True)


# ----------------------------------------------------------------------------- run: shards, merge, artifacts

FIGURES = ("direct_vs_total", "direct_ratio_by_layer", "classes_by_layer", "mean_direct_ratio_by_layer")


@dataclass
class NeuronResult:
    complete: bool                       # False for a shard run (only its shard file was written)
    effects: pd.DataFrame | None = None
    summaries: list | None = None
    layers: pd.DataFrame | None = None
    paths: dict = field(default_factory=dict)
    seconds: float = 0.0
    message: str = ""
    setup: NeuronSetup | None = field(default=None, repr=False)

    def summary_table(self) -> pd.DataFrame:
        return summaries_frame(self.summaries) if self.summaries is not None else pd.DataFrame()

    def figure(self, name: str):
        """One of FIGURES, drawn and saved as neurons_<name>.png in the run folder; returns the Figure."""
        from lib.plots import neurons as plots
        if not self.complete:
            raise ValueError(f"a shard run has no figures ({self.message})")
        setup = self.setup
        n_layers, thresholds = setup.arch.n_layers, setup.thresholds
        draw = {"direct_vs_total": lambda: plots.direct_vs_total(self.effects, n_layers, setup.mode),
                "direct_ratio_by_layer": lambda: plots.direct_ratio_by_layer(self.summary_table(), n_layers,
                                                                             thresholds),
                "classes_by_layer": lambda: plots.class_counts_by_layer(self.layers),
                "mean_direct_ratio_by_layer": lambda: plots.mean_direct_ratio_by_layer(self.layers, thresholds)}
        if name not in draw:
            raise ValueError(f"unknown neuron figure {name!r}; choose one of {list(FIGURES)}")
        fig = draw[name]()
        self.paths[name] = artifacts.save("neurons_figure", setup.out_dir, fig, figure=name)
        return fig

    def record(self, check: pd.DataFrame | None = None, **extra) -> None:
        """Write the run's manifest section (NB.NEURONS): parameters, sizes, settings hash, how the effects
        were obtained, the live check's verdict, and `extra` (e.g. dtype, seconds)."""
        from lib.storage.store import update_manifest
        setup = self.setup
        update_manifest(setup.out_dir, NB.NEURONS, {
            **{k: v for k, v in setup.params.items() if k != "out_dir"}, "n_neurons_run": len(setup.neurons),
            "n_prompts_run": len(setup.prompts), "fingerprint": setup.fingerprint(), "how": self.message,
            "check_ok": None if check is None else bool(check["ok"].all()), "effects_seconds": self.seconds,
            **extra})


def _shard_infos(setup: NeuronSetup) -> dict[tuple[int, int], dict]:
    return {key: artifacts.load_file("neuron_shard_info", p)
            for key, p in artifacts.shards("neuron_shard_info", setup.out_dir).items()}


def _check_shard_set(setup: NeuronSetup, infos: dict) -> int:
    """The shard count n of a complete, matching set; raises ArtifactError naming what is wrong."""
    where = artifacts.path("neuron_effects", setup.out_dir, shard=(1, 1)).parent
    counts = sorted({n for _, n in infos})
    if len(counts) > 1:
        raise ArtifactError(f"{where} holds shards of different splits (of {counts}); keep one complete set "
                            f"(delete the others) or delete the folder to compute everything in this run")
    n, settings = counts[0], setup.settings()
    wrong = {i: describe_differences(info["settings"], settings) for (i, _), info in sorted(infos.items())
             if differences(info["settings"], settings)}
    if wrong:
        raise CheckpointMismatch(
            f"shards {sorted(wrong)} of {n} in {where} were computed with different parameters than this run ("
            + "; ".join(f"shard {i}: {d}" for i, d in wrong.items()) + f"): rerun all {n} shards with these "
            f"parameters, or delete {where} to compute everything in this run")
    missing = [i for i in range(1, n + 1) if (i, n) not in infos]
    if missing:
        raise ArtifactError(f"incomplete shard set in {where}: shards {missing} of {n} are missing; rerun them "
                            f"(--set shard=<i>/{n} for i in {missing}, e.g. sbatch --array="
                            f"{','.join(map(str, missing))} ...), then rerun this merge with shard ''")
    return n


def _merge_shards(setup: NeuronSetup, infos: dict) -> pd.DataFrame:
    n = _check_shard_set(setup, infos)
    frames = [artifacts.load("neuron_effects", setup.out_dir, shard=(i, n)) for i in range(1, n + 1)
              if infos[(i, n)]["n_rows"] > 0]                      # more shards than neurons: empty shards
    effects = pd.concat(frames, ignore_index=True)
    expected = len(setup.neurons) * len(setup.prompts)
    if len(effects) != expected:
        raise ArtifactError(f"the {n} shards of neuron_effects hold {len(effects)} rows, expected {expected}: rerun "
                            f"the shards")
    return effects.sort_values(["layer", "neuron", "prompt"], kind="stable").reset_index(drop=True)


def _run_shard(setup: NeuronSetup, progress: bool, t0: float) -> NeuronResult:
    """Compute this shard's neurons (resumable), write its shard CSV and info file, remove its checkpoint."""
    i, n = setup.shard
    mine = setup.shard_neurons(setup.shard)
    parts = artifacts.parts_dir("neuron_effects", setup.out_dir, setup.shard)
    effects = compute_effects(setup, mine, parts, progress, desc=f"shard {i}/{n}") if mine else pd.DataFrame()
    csv = artifacts.save("neuron_effects", setup.out_dir, effects, shard=setup.shard) if mine else None
    artifacts.save("neuron_shard_info", setup.out_dir, {
        "settings": setup.settings(), "shard": f"{i}/{n}", "n_neurons_total": len(setup.neurons),
        "neurons": [x.id for x in mine], "n_rows": len(effects), "seconds": time.perf_counter() - t0,
        "params": setup.params}, shard=setup.shard)
    Parts(parts, {}).remove()
    return NeuronResult(False, effects=effects, paths={"shard": csv}, seconds=time.perf_counter() - t0,
                        message=f"shard {i}/{n}: {len(mine)} neurons x {len(setup.prompts)} prompts written to "
                                f"{csv}; run again with shard '' to merge", setup=setup)


def run(setup: NeuronSetup, progress: bool = True) -> NeuronResult:
    """Shard run: compute this shard's neurons (resumable), write its shard files and stop. Otherwise: merge the
    shard files when present (refusing incomplete or mismatched sets), else compute everything (resumable); then
    write neuron_effects.csv, neuron_summaries.json and layer_summary.csv."""
    t0 = time.perf_counter()
    from lib.storage.store import ensure_writable_dir
    ensure_writable_dir(setup.out_dir)
    if setup.shard is not None:
        return _run_shard(setup, progress, t0)
    infos = _shard_infos(setup)
    parts = artifacts.parts_dir("neuron_effects", setup.out_dir)
    if infos:
        effects, how = _merge_shards(setup, infos), f"merged {len(infos)} shards"
    else:
        effects, how = compute_effects(setup, setup.neurons, parts, progress), "computed"
    effects["prompt_class"] = classify(effects["direct_ratio"], setup.thresholds)
    summaries = summarize_neurons(effects, setup.thresholds)
    layers = layer_summary(summaries, setup.arch.n_layers)
    paths = {"effects": artifacts.save("neuron_effects", setup.out_dir, effects),
             "summaries": artifacts.save("neuron_summaries", setup.out_dir, summaries),
             "layers": artifacts.save("layer_summary", setup.out_dir, layers)}
    if not infos:
        Parts(parts, {}).remove()
        with contextlib.suppress(OSError):
            parts.parent.rmdir()
    return NeuronResult(True, effects, summaries, layers, paths, time.perf_counter() - t0,
                        f"{how}: {len(setup.neurons)} neurons x {len(setup.prompts)} prompts", setup)


# ----------------------------------------------------------------------------- live verification

def verify(setup: NeuronSetup, n_neurons: int = 4, n_prompts: int = 2) -> pd.DataFrame:
    """Check table on a few neurons (spread over the layers) and prompts: fast batched last-position total effects
    vs whole-prompt forwards (one per neuron, injection by hook), and the algebraic direct effect vs an explicit
    frozen-downstream run; max |difference| over the whole vocabulary."""
    arch, clean, model = setup.arch, setup.clean, setup.model
    pick = np.unique(np.linspace(0, len(setup.neurons) - 1, min(n_neurons, len(setup.neurons))).round().astype(int))
    neurons = [setup.neurons[i] for i in pick]
    dirs = neuron_directions(arch, neurons)
    actual, scale = neuron_scales(clean, neurons, setup.activation_scale)
    rows = []
    for p in range(min(n_prompts, len(setup.prompts))):
        treatment = batch_treatment(setup.mode, neurons, dirs, actual[:, p], scale[:, p])
        fast, deltas = treated_logits_incremental(model, arch, clean, p, treatment, setup.skip_lower)
        alg = direct_logits(arch, clean.h_final[p], deltas)
        fast_eff, alg_eff = fast[1:] - fast[0], alg[1:] - alg[0]
        ids = setup.prompts.input_ids[p]
        for j, nrn in enumerate(neurons):
            one = treatment.take([0, j + 1])
            full, frozen = total_logits_full(model, arch, ids, one), frozen_logits(model, arch, ids, nrn.layer, one)
            full_eff, frozen_eff = full[1] - full[0], frozen[1] - frozen[0]
            rows.append({"neuron": nrn.id, "prompt": p, "max_abs_total_effect": float(full_eff.abs().max()),
                         "batched_vs_full_max_abs_diff": float((fast_eff[j] - full_eff).abs().max()),
                         "max_abs_direct_effect": float(frozen_eff.abs().max()),
                         "algebraic_vs_frozen_max_abs_diff": float((alg_eff[j] - frozen_eff).abs().max())})
    frame = pd.DataFrame(rows)
    tol = 1e-4 if next(model.parameters()).dtype == torch.float32 else 5e-2
    frame["ok"] = (frame["batched_vs_full_max_abs_diff"] <= tol) & (frame["algebraic_vs_frozen_max_abs_diff"] <= tol)
    return frame
