"""The artifact contract: every file a notebook writes into a run folder, declared once.

One `Artifact` record per file kind: its name pattern (with an optional baseline tag and shard), the notebook that
produces it, its format, and its keys (npz arrays, CSV columns or JSON top-level keys) with dtype and dims.
Modules and notebooks never build a file name or call np.load themselves; they call

    path("activations", out_dir, tag="random_init")        # -> out_dir / "activations__random_init.npz"
    load("activations", out_dir, keys=["activations"])      # checked: present, dtype kind, ndim, dims agree
    save("activations", out_dir, arrays, tag="")            # atomic (lib.storage.store), keys checked before writing
    tags("activations", out_dir)                            # ["", "random_init", "rev-step1000", ...]

Tags: "" is the run's own model; "random_init" the re-initialised copy; "rev-<revision>" a training checkpoint
(`revision_tag`). `tags` lists them in that order, checkpoints by the last number in their revision.
Shards: (i, n) -> "<shard_dir>/<stem>__shard-<i>-of-<n>.<ext>", or the artifact's own `shard_pattern` (e.g.
"ablation_shards/shard-<i>-of-<n>.npz"); `shards` finds them, `parts_dir` is a run's or a shard's checkpoint folder.
Dims name what an axis holds ("prompts", "heads", "steps", "pairs", ...); a dim "*" is any size. Axes with the same
name must have the same length in one file.
Load checks the dtype kind ("float32" accepts any float); save checks the exact dtype, so a writer cannot change
what a file holds without changing its declaration here.
"""
from __future__ import annotations

import json
import os
import re
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lib.storage import store
from lib.storage.store import ArtifactError, check_same_heads

__all__ = ["FORMATS", "RANDOM_INIT", "Artifact", "ARTIFACTS", "artifact", "sharded", "path", "revision_tag",
           "tag_sort_key", "tags", "identify", "parts_dir", "shards", "load_file", "load", "save_file", "save",
           "append", "scalar", "check_same_run", "READS_ENV", "NOTEBOOK_ENV", "MODEL_ENV", "note_read",
           "fingerprint", "output_globs", "output_files", "relative", "is_tagged", "check_input", "shown_name",
           "readme_with_table", "producer_outputs"]

FORMATS = ("npz", "csv", "json", "jsonl", "png", "ipynb", "html", "lock", "pt")   # pt: torch state, read by its owner
RANDOM_INIT = "random_init"
_FIELD = re.compile(r"\{(\w+)(?::[^}]*)?\}")


@dataclass(frozen=True)
class Key:
    """One array / column / JSON key of an artifact. dtype: a numpy kind name ("float", "int", "bool", "str"), an
    exact dtype ("float32"), or for JSON a type name ("dict", "list"); dims: axis names, () for a scalar.
    Optional keys may be absent."""
    dtype: str
    dims: tuple[str, ...] = ()
    doc: str = ""
    optional: bool = False


@dataclass(frozen=True)
class Artifact:
    name: str
    pattern: str                      # e.g. "phiid_{mode}{tag}.npz"; {tag} -> "" or "__<tag>"
    producer: str                     # notebook that writes it
    doc: str
    keys: dict[str, Key] = field(default_factory=dict)
    shard_dir: str | None = None      # folder (relative to the run) for shard files, if the artifact shards
    shard_pattern: str | None = None  # shard file name with {i} and {n}; default "<stem>__shard-{i}-of-{n}.<ext>"

    @property
    def format(self) -> str:
        return self.pattern.rsplit(".", 1)[-1]

    def filename(self, tag: str = "", shard: tuple[int, int] | None = None, **fields: Any) -> str:
        if shard is not None and self.shard_pattern:
            return self.shard_pattern.format(i=int(shard[0]), n=int(shard[1]))
        if tag and ("/" in tag or tag.startswith(".")):
            raise ArtifactError(f"artifact tag {tag!r} must be a plain name (e.g. 'random_init', 'rev-step1000')")
        try:
            name = self.pattern.format(tag=f"__{tag}" if tag else "", **fields)
        except KeyError as e:
            raise ArtifactError(f"artifact {self.name!r} needs the field {e.args[0]!r} (pattern {self.pattern!r})") from None
        if shard is not None:
            stem, ext = name.rsplit(".", 1)
            name = f"{stem}__shard-{int(shard[0])}-of-{int(shard[1])}.{ext}"
        return name

    def path(self, out_dir, tag: str = "", shard: tuple[int, int] | None = None, **fields: Any) -> Path:
        if shard is None:
            return Path(out_dir) / self.filename(tag, **fields)
        if not self.shard_dir:
            raise ArtifactError(f"artifact {self.name!r} has no shard files (only {sharded()} do)")
        return Path(out_dir) / self.shard_dir / self.filename(tag, shard, **fields)


def _k(dtype, *dims, doc="", optional=False) -> Key:
    return Key(dtype, tuple(dims), doc, optional)


def _columns(*names, optional=()) -> dict[str, Key]:
    """CSV columns (presence is checked; pandas decides their dtypes)."""
    return {n: _k("any", "rows", optional=n in optional) for n in (*names, *optional)}


# ----------------------------------------------------------------------------------------------------------------
# the registry: one entry per file kind, in pipeline order

_ATOMS = ("rtr", "rtx", "rty", "rts", "xtr", "xtx", "xty", "xts", "ytr", "ytx", "yty", "yts", "str", "stx", "sty", "sts")

ARTIFACTS: dict[str, Artifact] = {a.name: a for a in [
    Artifact("activations", "activations{tag}.npz", "01_extract_activations",
             "per-head L2 norm of the attention output at every generated step, with the greedy tokens", {
                 "activations": _k("float32", "prompts", "heads", "steps", doc="L2 norm of each head's output"),
                 "tokens": _k("int", "prompts", "steps", doc="generated token ids"),
                 "prompt_input_ids": _k("int", "prompts", "*", doc="prompt ids, left-padded with pad_token_id"),
                 "prompt_lengths": _k("int", "prompts"),
                 "prompt_ids": _k("int", "prompts"),
                 "prompt_category": _k("str", "prompts"),
                 "prompt_text": _k("str", "prompts"),
                 "head_layer": _k("int", "heads"),
                 "head_index": _k("int", "heads"),
                 "n_layers": _k("int"), "n_heads": _k("int"), "n_kv_heads": _k("int"), "pad_token_id": _k("int"),
                 "model": _k("str"), "chat_template": _k("bool"), "seconds": _k("float"),
                 "extraction_key": _k("str", optional=True),
             }),
    Artifact("extract_checkpoint", ".extract_checkpoints/{key}/batch-{start:05d}-{batch_size}.npz",
             "01_extract_activations",
             "one finished generation batch of an interrupted extraction (key: hash of its settings); removed when "
             "the extraction completes", {
                 "tokens": _k("int", "batch", "steps"),
                 "norms": _k("float32", "batch", "heads", "steps"),
             }),
    Artifact("oracle", "oracle.npz", "01_extract_activations",
             "measured head importance (attribution patching: sum over positions of |grad x activation| of the "
             "greedy tokens' NLL at each head's output, mean over the oracle's prompts); lib.experiments.oracle", {
                 "score": _k("float", "heads", doc="mean_q sum_i |g . z|, the oracle's ordering key"),
                 "signed": _k("float", "heads", doc="mean_q sum_i -g . z: first-order NLL change of zeroing the head"),
                 "per_prompt": _k("float", "prompts", "heads"), "nll": _k("float", "prompts"),
                 "prompt_ids": _k("int", "prompts"), "rows": _k("int", "prompts"),
                 "head_layer": _k("int", "heads"), "head_index": _k("int", "heads"),
                 "model": _k("str"), "extraction_key": _k("str"), "seconds": _k("float"),
             }),
    Artifact("phiid", "phiid_{mode}{tag}.npz", "02_phiid",
             "all 16 PhiID atoms (nats) for every ordered head pair, one mode (per_prompt, concat, pooled)", {
                 **{a: _k("float", "heads", "heads") for a in _ATOMS},
                 "atom_names": _k("str", "atoms"),
                 "head_layer": _k("int", "heads"), "head_index": _k("int", "heads"),
                 "degenerate": _k("bool", "heads", "heads"), "n_valid": _k("int", "heads", "heads"),
                 "seconds": _k("float"), "tau": _k("int"), "redundancy": _k("str"), "mode": _k("str"),
                 "backend": _k("str"),
                 "n_prompts": _k("int", optional=True), "n_steps": _k("int", optional=True),
                 "activations_file": _k("str", optional=True), "model": _k("str", optional=True),
             }),
    Artifact("diagnostics", "diagnostics{tag}.json", "03_phiid_diagnostics",
             "synergy-redundancy correlation, lag-1 autocorrelation, TDMI, drift, layer profiles", {
                 "n_prompts": _k("int"), "n_heads": _k("int"), "n_steps": _k("int"), "syn_red": _k("dict"),
                 "layer_profiles": _k("dict"), "per_head": _k("dict"), "all_files": _k("list"),
                 "mode": _k("str"), "tag": _k("str"),
             }),
    Artifact("rankings", "rankings.csv", "04_ranking_variants",
             "one row per head: head_idx, layer, head, one score column per ranking variant, syn / red",
             _columns("head_idx", "layer", "head", optional=("syn", "red"))),
    Artifact("ranking_summary", "ranking_summary.json", "04_ranking_variants",
             "split-half reliability, surrogate null, inverted-U test, trained vs random", {
                 "variants": _k("list"), "n_heads": _k("int"),
                 **{k: _k(t, optional=True) for k, t in (("n_prompts", "int"), ("tau", "int"), ("redundancy", "str"),
                                                         ("layer_profiles", "dict"), ("reliability", "list"),
                                                         ("inverted_u", "list"), ("inverted_u_beyond_null", "list"),
                                                         ("null_z", "dict"), ("agreement", "dict"))},
             }),
    Artifact("ranking_surrogates", "ranking_surrogates.npz", "04_ranking_variants",
             "circular-shift surrogate scores, one [surrogates, heads] array per variant (also the resume "
             "checkpoint)", {
                 "signature": _k("str", doc="hash of the activations, variants, tau, redundancy and seed"),
             }),
    Artifact("ablation", "ablation.csv", "05_ablation",
             "KL(clean ‖ ablated) per order and number of heads removed (mean and SEM over prompts)",
             _columns("ordering", "variant", "seed", "n_removed", "fraction", "kl_mean", "kl_sem", "perturbation",
                      "n_prompts")),
    Artifact("ablation_kl", "ablation_kl.npz", "05_ablation",
             "KL per order, point and prompt (nats/token), with the orders", {
                 "kl": _k("float", "orders", "points", "prompts"),
                 "n_removed": _k("int", "points"), "fraction": _k("float", "points"),
                 "ordering": _k("str", "orders"), "variant": _k("str", "orders"), "seed": _k("int", "orders"),
                 "order": _k("int64", "orders", "heads"),
                 "prompt_ids": _k("int", "prompts"), "prompt_category": _k("str", "prompts"),
                 "total_heads": _k("int"), "perturbation": _k("str"), "noise_sigma": _k("float"), "model": _k("str"),
             }),
    Artifact("ablation_checkpoint", "ablation_checkpoint_{digest}.npz", "05_ablation",
             "progress of an ablation run (digest: hash of its settings), or of shard i of n", {
                 "fingerprint": _k("str", doc="JSON of everything the numbers depend on"),
                 "shard_i": _k("int"), "shard_n": _k("int"),
                 "assigned": _k("bool", "groups", "points"), "done": _k("bool", "groups", "points", "prompts"),
                 "kl": _k("float64", "orders", "points", "prompts"),
             }, shard_dir="ablation_shards", shard_pattern="shard-{i}-of-{n}.npz"),
    Artifact("ablation_fractions", "ablation_fractions.csv", "05_ablation",
             "KL at 12.5 %, 25 %, ..., 100 % of heads removed: ranking, random mean and sd, ratio, reverse",
             _columns("variant", "fraction", "n_removed", "on_grid", "ranking_kl", "random_mean", "random_sd",
                      "ratio", "reverse_kl")),
    Artifact("ablation_auc", "ablation_auc.csv", "05_ablation",
             "area under each KL curve and its ratio to the random orders, with a bootstrap CI over prompts",
             _columns("variant", "ordering", "auc", "random_auc_mean", "random_auc_sd", "auc_ratio", "ci_low",
                      "ci_high")),
    Artifact("ablation_curves", "ablation_curves.png", "05_ablation",
             "figure: KL vs fraction of heads removed, ranking vs random and reverse orders"),
    Artifact("ablation_prompt_ratios", "ablation_prompt_ratios.png", "05_ablation",
             "figure: per-prompt AUC ratios by task category"),
    Artifact("neuron_effects", "neuron_effects.csv", "06_neuron_effects",
             "direct, indirect and total effect of each selected MLP neuron on each prompt", {
                 "neuron_id": _k("str", "rows"), "layer": _k("int", "rows"), "neuron": _k("int", "rows"),
                 "prompt": _k("int", "rows"), "prompt_id": _k("int", "rows"),
                 "direct": _k("float", "rows", doc="target-logit effect, logits"), "indirect": _k("float", "rows"),
                 "total": _k("float", "rows"), "direct_ratio": _k("float", "rows"),
                 **{c: _k("str", "rows", doc="space-separated, top-k tokens") for c in (
                     "top_total_ids", "top_total_effects", "top_direct_ids", "top_direct_effects")},
             }, shard_dir=".neuron_shards"),
    Artifact("neuron_shard_info", "neuron_effects.json", "06_neuron_effects",
             "what one shard of neuron_effects computed (settings, neurons, rows); next to its shard CSV", {
                 "settings": _k("object", doc="what the numbers depend on"), "shard": _k("str"), "n_rows": _k("int"),
             }, shard_dir=".neuron_shards"),
    Artifact("neuron_effects_part", "batch-{batch:05d}.csv", "06_neuron_effects",
             "checkpoint: the rows of one finished batch, in a parts folder (parts_dir('neuron_effects', ...))"),
    Artifact("neuron_summaries", "neuron_summaries.json", "06_neuron_effects", "per-class summaries of the effects"),
    Artifact("layer_summary", "layer_summary.csv", "06_neuron_effects", "direct/total ratio by layer", {
                 "layer": _k("int", "layers"), "n_neurons": _k("int", "layers"),
             }),
    Artifact("neurons_figure", "neurons_{figure}.png", "06_neuron_effects",
             "figures: direct_vs_total, direct_ratio_by_layer, classes_by_layer"),
    Artifact("interference", "interference.npz", "07_qkov_interference",
             "QK-OV Fisher interference scores per variant and block (scores__<variant>__<block> [samples_a, "
             "samples_b, layers, heads]), sample ids of both tasks", {
                 "ids_a": _k("str", "samples_a"), "ids_b": _k("str", "samples_b"),
                 "loss_a": _k("float32", "samples_a"), "loss_b": _k("float32", "samples_b"),
                 "texts_a": _k("str", "samples_a"), "texts_b": _k("str", "samples_b"),
                 "variants": _k("str", "variants"), "blocks": _k("str", "blocks"),
                 **{f"fisher_mass__{b}": _k("float32", "layers", "heads") for b in "QO"},
                 **{f"fisher_mass__{b}": _k("float32", "layers", "kv_heads") for b in "KV"},
                 "n_layers": _k("int"), "n_heads": _k("int"), "n_kv_heads": _k("int"), "eps": _k("float"),
                 "ridge": _k("float"), "task_a": _k("str"), "task_b": _k("str"), "model": _k("str"),
                 "method": _k("str"), "source_a": _k("str"), "source_b": _k("str"),
             }),
    Artifact("top_conflicts", "top_conflicts.csv", "07_qkov_interference", "the most conflicting (layer, head, block)", {
                 "variant": _k("str", "rows"), "block": _k("str", "rows"), "rank": _k("int", "rows"),
                 "sample_a": _k("str", "rows"), "sample_b": _k("str", "rows"), "text_a": _k("str", "rows"),
                 "text_b": _k("str", "rows"),
             }),
    Artifact("interference_summary", "interference_summary.csv", "07_qkov_interference",
             "interference per block and variant", {"variant": _k("str", "rows"), "block": _k("str", "rows")}),
    Artifact("interference_figure", "interference_{figure}.png", "07_qkov_interference",
             "figures: heatmaps_magnitude, heatmaps_signed, layers"),
    Artifact("topology", "topology.json", "08_topology",
             "efficiency and modularity of the synergy and redundancy networks, threshold sweep, strength-"
             "preserving null, modules vs layers, per tag; the C4 claim block", {
                 "tags": _k("object", doc="per tag (trained, random_init, rev-...): measures, null bands, z-scores"),
                 "claim": _k("object", doc="claim C4 in the claims scorecard's shape"),
             }),
    Artifact("modules", "modules.csv", "08_topology",
             "Louvain module of every head in each network (full and top 10%), its layer and strength", {
                 "head_idx": _k("int", "heads"), "layer": _k("int", "heads"), "head": _k("int", "heads"),
                 "module": _k("int", "heads"), "module_top": _k("int", "heads"),
                 "strength": _k("float", "heads"),
             }),
    Artifact("behaviour", "behaviour.csv", "09_task_behaviour",
             "task accuracy per perturbation condition: Clopper-Pearson CI, McNemar vs random, percentile", {
                 "condition": _k("str", "conditions"), "kind": _k("str", "conditions"),
                 "accuracy": _k("float", "conditions"), "ci_low": _k("float", "conditions"),
                 "ci_high": _k("float", "conditions"), "n_problems": _k("int", "conditions"),
             }),
    Artifact("behaviour_calibration", "behaviour_calibration.csv", "09_task_behaviour",
             "dose sweep before the main measurement: accuracy of the baseline and of random head sets per noise sigma "
             "(CIs), relative to the baseline, the target and the chosen sigma (no rows when calibrate is false)", {
                 "kind": _k("str", "rows"), "seed": _k("int", "rows"), "sigma": _k("float", "rows"),
                 "n_problems": _k("int", "rows"), "n_correct": _k("float", "rows"), "accuracy": _k("float", "rows"),
                 "ci_low": _k("float", "rows"), "ci_high": _k("float", "rows"),
                 "relative_accuracy": _k("float", "rows"), "relative_ci_low": _k("float", "rows"),
                 "relative_ci_high": _k("float", "rows"), "target": _k("float", "rows"),
                 "chosen_sigma": _k("float", "rows"),
             }),
    Artifact("behaviour_generations", "behaviour_generations.jsonl", "09_task_behaviour",
             "per condition and problem: generated text, extracted answer, correctness"),
    Artifact("behaviour_summary", "behaviour_summary.json", "09_task_behaviour",
             "settings, synergistic vs random tests per variant and the C6 claim block", {
                 "claim": _k("object", doc="the C6 claim block read by the claims scorecard"),
             }),
    Artifact("behaviour_checkpoint", "behaviour_checkpoint_{key}.jsonl", "09_task_behaviour",
             "finished work units of a behaviour run (a rerun with the same settings resumes from it)"),
    Artifact("finetune", "finetune.csv", "10_head_finetuning",
             "test accuracy (with Clopper-Pearson CI) per method, condition, seed and evaluation step", {
                 "method": _k("str", "rows"), "condition": _k("str", "rows"), "seed": _k("int", "rows"),
                 "step": _k("int", "rows"), "accuracy": _k("float", "rows"), "n": _k("int", "rows"),
             }),
    Artifact("finetune_deltas", "finetune_deltas.csv", "10_head_finetuning",
             "Frobenius norm of each head's Q/K/V/O weight change per method, condition and seed, and whether the "
             "slice was trainable", {
                 "layer": _k("int", "rows"), "head": _k("int", "rows"), "block": _k("str", "rows"),
                 "delta_norm": _k("float", "rows"), "selected": _k("bool", "rows"),
             }),
    Artifact("finetune_summary", "finetune_summary.json", "10_head_finetuning",
             "final and best accuracy per run, Hedges' g and permutation tests between conditions, claim C7", {
                 "claim": _k("object", doc="the C7 claim block read by the claims scorecard"),
             }),
    Artifact("finetune_checkpoint", ".finetune_checkpoints/{key}/{run}.pt", "10_head_finetuning",
             "state of one fine-tuning run after its last evaluation (removed when every run finished)"),
    Artifact("local_phiid", "local_phiid{tag}.npz", "11_local_synergy",
             "per-head local sts and rtr (mean over partners) at every transition t -> t + tau, with the token "
             "read, entropy and surprisal at the future step and the token kinds", {
                 "sts": _k("float", "heads", "prompts", "transitions", doc="local synergy, nats"),
                 "rtr": _k("float", "heads", "prompts", "transitions", doc="local redundancy, nats"),
                 "n_partners": _k("int", "heads", "prompts", doc="partners defined with the head in the prompt"),
                 "head_layer": _k("int", "heads"), "head_index": _k("int", "heads"),
                 "entropy": _k("float", "prompts", "transitions", doc="next-token entropy at the future step, nats"),
                 "surprisal": _k("float", "prompts", "transitions", doc="-log p(generated token), nats"),
                 "token_ids": _k("int", "prompts", "transitions", doc="token read at the future step"),
                 "kinds": _k("bool", "kinds", "prompts", "transitions"), "kind_names": _k("str", "kinds"),
                 "tau": _k("int"), "redundancy": _k("str"), "mode": _k("str"), "model": _k("str"),
                 "greedy_agreement": _k("float"), "seconds": _k("float"),
             }),
    Artifact("local_summary", "local_summary.json", "11_local_synergy",
             "local synergy vs entropy/surprisal (circular-shift null) per layer, by token kind (bootstrap CI, "
             "shift null), per tag", {
                 "tau": _k("int"), "redundancy": _k("str"), "mode": _k("str"),
                 "tags": _k("object", doc="per tag (trained, random_init): correlations, kind table, agreement"),
             }),
    Artifact("manifest", "manifest.json", "lib.run",
             "parameters, versions, git commit, weights checksum, timings; one section per notebook"),
    Artifact("claims", "claims.json", "lib.run",
             "the claims scorecard: one entry per claim of the paper (C1-C7) with statistic, 95% CI, null, the "
             "paper's figure and a verdict by the rules of lib/claims.py", {
                 "paper": _k("str"), "claims": _k("str", "claims", doc="list of claim entries"),
             }),
    Artifact("manifest_lock", "manifest.json.lock", "lib.run",
             "advisory lock of manifest.json (SLURM array tasks update it concurrently)"),
    Artifact("run_index", "html/index.html", "lib.report",
             "the run's report: status, parameters, versions, timings, links, key figures"),
    Artifact("report_figure", "html/figures/{figure}.png", "lib.report", "key figures of the report"),
    Artifact("report_lock", ".report.lock", "lib.report", "lock of the report while it is rebuilt"),
    Artifact("notebook_html", "html/{notebook}.html", "lib.run", "an executed notebook as a report page, no code"),
    Artifact("executed_notebook", "{notebook}.ipynb", "lib.run",
             "an executed notebook, with outputs (and the traceback when it failed)"),
]}


def artifact(name: str) -> Artifact:
    try:
        return ARTIFACTS[name]
    except KeyError:
        raise ArtifactError(f"unknown artifact {name!r}; known: {sorted(ARTIFACTS)}") from None


def register(a: Artifact) -> Artifact:
    """Add an artifact kind (modules that own a new notebook declare theirs at import)."""
    if a.format not in FORMATS:
        raise ArtifactError(f"artifact {a.name!r}: format {a.format!r} is not one of {FORMATS}")
    if a.name in ARTIFACTS and ARTIFACTS[a.name] != a:
        raise ArtifactError(f"artifact {a.name!r} is already declared differently")
    ARTIFACTS[a.name] = a
    return a


def sharded() -> list[str]:
    return [a.name for a in ARTIFACTS.values() if a.shard_dir]


def path(name: str, out_dir, tag: str = "", shard: tuple[int, int] | None = None, **fields: Any) -> Path:
    return artifact(name).path(out_dir, tag, shard, **fields)


# ----------------------------------------------------------------------------------------------------------------
# tags and shards present in a run folder

def revision_tag(revision: str) -> str:
    """The tag of a training checkpoint: "rev-<revision>" (e.g. rev-step1000)."""
    return f"rev-{revision}"


def tag_sort_key(tag: str):
    """"" (the run's model) first, then random_init, then checkpoints in training order (the last number in the
    revision, e.g. rev-step20 before rev-step1000), then anything else by name."""
    if tag == "":
        return (-1, 0, tag)
    if tag == RANDOM_INIT:
        return (0, 0, tag)
    if tag.startswith(revision_tag("")):
        nums = re.findall(r"\d+", tag)
        return (1, int(nums[-1]) if nums else 0, tag)
    return (2, 0, tag)


def tags(name: str, out_dir, **fields: Any) -> list[str]:
    """Tags present in out_dir for this artifact, in tag_sort_key order ("" = the run's model, when present)."""
    a = artifact(name)
    main = a.path(out_dir, "", **fields)
    prefix, suffix = main.name.rsplit(".", 1)[0] + "__", "." + a.format
    found = [p.name[len(prefix):-len(suffix)] for p in main.parent.glob(f"{prefix}*{suffix}")]
    return sorted(([""] if main.exists() else []) + found, key=tag_sort_key)


def _pattern_regex(pattern: str) -> re.Pattern:
    """A file name pattern as a regex: {tag} -> optional "__<tag>", {i} / {n} -> digits, other fields -> a name."""
    parts, last = [], 0
    for m in _FIELD.finditer(pattern):
        parts.append(re.escape(pattern[last:m.start()]))
        field_name = m.group(1)
        parts.append(r"(?:__(?P<tag>[^/]+))?" if field_name == "tag" else
                     rf"(?P<{field_name}>\d+)" if field_name in ("i", "n") else rf"(?P<{field_name}>[^/]+?)")
        last = m.end()
    parts.append(re.escape(pattern[last:]))
    return re.compile("".join(parts) + r"\Z")


def _shard_file_pattern(a: Artifact) -> str:
    if a.shard_pattern:
        return f"{a.shard_dir}/{a.shard_pattern}"
    stem, ext = a.pattern.rsplit(".", 1)
    return f"{a.shard_dir}/{stem}__shard-{{i}}-of-{{n}}.{ext}"


def identify(relative_path) -> tuple[Artifact, dict] | None:
    """Which registered artifact a file of a run folder is (path relative to the folder) -> (artifact, its fields:
    tag, mode, shard (i, n), ...), or None for a file no artifact declares."""
    rel = Path(relative_path).as_posix()
    for a in ARTIFACTS.values():
        for pattern in [a.pattern] + ([_shard_file_pattern(a)] if a.shard_dir else []):
            m = _pattern_regex(pattern).match(rel)
            if m:
                found = {k: v or "" for k, v in m.groupdict().items()}
                if "i" in found:
                    found["shard"] = (int(found.pop("i")), int(found.pop("n")))
                return a, found
    return None


def parts_dir(name: str, out_dir, shard: tuple[int, int] | None = None) -> Path:
    """The checkpoint folder of a run (shard None: "<shard folder>/<stem>.parts") or of one shard
    ("<shard folder>/<stem>__shard-<i>-of-<n>.parts"), for artifacts with a shard folder."""
    a = artifact(name)
    if not a.shard_dir:
        raise ArtifactError(f"artifact {name!r} has no shard folder, hence no checkpoint parts")
    stem = a.filename(shard=shard).rsplit(".", 1)[0]
    return Path(out_dir) / a.shard_dir / f"{stem}.parts"


def _shard_regex(a: Artifact, **fields: Any) -> re.Pattern:
    if a.shard_pattern:
        name = re.escape(a.shard_pattern).replace(r"\{i\}", r"(\d+)").replace(r"\{n\}", r"(\d+)")
        return re.compile(name + r"\Z")
    stem, ext = a.filename(**fields).rsplit(".", 1)
    return re.compile(re.escape(stem) + r"__shard-(\d+)-of-(\d+)\." + re.escape(ext) + r"\Z")


def shards(name: str, out_dir, **fields: Any) -> dict[tuple[int, int], Path]:
    """The shard files of an artifact present in out_dir: {(i, n): path}."""
    a = artifact(name)
    if not a.shard_dir:
        raise ArtifactError(f"artifact {name!r} has no shard files (only {sharded()} do)")
    folder, pattern = Path(out_dir) / a.shard_dir, _shard_regex(a, **fields)
    found = {}
    for p in sorted(folder.iterdir()) if folder.is_dir() else []:
        m = pattern.match(p.name)
        if m and p.is_file():
            found[(int(m.group(1)), int(m.group(2)))] = p
    return found


# ----------------------------------------------------------------------------------------------------------------
# key checks

_KINDS = {"float": "f", "int": "iu", "bool": "b", "str": "UST"}
_JSON_TYPES = {"dict": dict, "list": list, "str": str, "bool": bool, "int": (int, float), "float": (int, float)}


def _kind_ok(value: np.ndarray, dtype: str, exact: bool = False) -> bool:
    if dtype in _KINDS:
        return value.dtype.kind in _KINDS[dtype] or (dtype == "float" and value.dtype.kind in "iu" and value.ndim == 0)
    if not exact:
        return value.dtype.kind == np.dtype(dtype).kind
    return value.dtype == np.dtype(dtype)


def _check_array(where: str, key: str, spec: Key, value, exact: bool) -> None:
    value = np.asarray(value)
    if not _kind_ok(value, spec.dtype, exact):
        raise ArtifactError(f"{where}: {key!r} has dtype {value.dtype}, expected {spec.dtype}")
    if value.ndim != len(spec.dims):
        raise ArtifactError(f"{where}: {key!r} has shape {value.shape}, expected "
                            f"[{', '.join(spec.dims)}] ({len(spec.dims)} dimensions)")


def _check_dims(a: Artifact, data: dict, where: str) -> None:
    """Axes with the same name must have the same length across the file's arrays."""
    seen: dict[str, tuple[int, str]] = {}
    for key, value in data.items():
        spec = a.keys.get(key)
        if spec is None:
            continue
        for dim, size in zip(spec.dims, np.shape(value)):
            if dim == "*":
                continue
            if dim in seen and seen[dim][0] != size:
                raise ArtifactError(f"{where}: axis {dim!r} has length {size} in {key!r} but {seen[dim][0]} in "
                                    f"{seen[dim][1]!r}: the arrays do not describe the same {dim}")
            seen.setdefault(dim, (size, key))


def _check_json(where: str, key: str, spec: Key, value) -> None:
    want = list if spec.dims else _JSON_TYPES.get(spec.dtype)
    if want is not None and value is not None and not isinstance(value, want):
        raise ArtifactError(f"{where}: {key!r} is a {type(value).__name__}, expected "
                            f"{'a list of ' if spec.dims else ''}{spec.dtype}")


def check_keys(a: Artifact, data: dict, where: str, keys=None, exact: bool = False) -> None:
    """Raise ArtifactError naming the file when a required key is missing or a declared one is malformed.

    keys: the declared keys that must be present (None: all of them; optional ones may be absent anyway). Every present declared key is checked: dtype (its kind, or exactly with exact=True) and ndim for
    npz, JSON type for json; same-named axes must agree. CSV columns are checked for presence only."""
    required = [k for k in (a.keys if keys is None else keys) if k in a.keys and not a.keys[k].optional]
    for key in required:
        if key not in data:
            raise ArtifactError(f"{where}: key {key!r} is missing (has {sorted(data)}); the file is from an older or "
                                f"different writer: regenerate it with {a.producer}")
    if a.format == "npz":
        for key, value in data.items():
            if key in a.keys:
                _check_array(where, key, a.keys[key], value, exact)
        _check_dims(a, data, where)
    elif a.format == "json":
        for key, value in data.items():
            if key in a.keys:
                _check_json(where, key, a.keys[key], value)


def _missing(a: Artifact, p: Path) -> ArtifactError:
    return ArtifactError(f"missing artifact {str(p)!r}; run {a.producer} first "
                         f"(python -m lib.run --params <run>.yaml --only {a.producer})")


def _unreadable(a: Artifact, p: Path, e: Exception) -> ArtifactError:
    return ArtifactError(f"{p} is unreadable ({type(e).__name__}: {e}); it is truncated or corrupt: delete it "
                         f"and rerun {a.producer}")


# ----------------------------------------------------------------------------------------------------------------
# load / save

def _jsonl_rows(text: str, torn_tail_ok: bool) -> list:
    lines = [line for line in text.splitlines() if line.strip()]
    if torn_tail_ok and lines and not text.endswith("\n"):
        lines = lines[:-1]                      # a line cut short by a killed writer (see append)
    return [json.loads(line) for line in lines]


def _read_csv(a: Artifact, p: Path):
    import pandas as pd
    text_columns = [k for k, spec in a.keys.items() if spec.dtype == "str"]
    data = pd.read_csv(p, dtype={k: str for k in text_columns})
    for k in text_columns:                     # declared text: an empty field is "", not NaN
        if k in data.columns:
            data[k] = data[k].fillna("")
    return data


def _read(a: Artifact, p: Path, keys, torn_tail_ok: bool):
    if a.format == "npz":
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in (z.files if keys is None else [k for k in keys if k in z.files])}
    if a.format == "csv":
        return _read_csv(a, p)
    if a.format == "json":
        return json.loads(p.read_text())
    if a.format == "jsonl":
        return _jsonl_rows(p.read_text(), torn_tail_ok)
    raise ArtifactError(f"artifact {a.name!r} ({a.format}) is not read back through lib.storage.artifacts")


def load_file(name: str, p, keys=None, torn_tail_ok: bool = False, require=None):
    """Load the file `p` of artifact kind `name`: npz -> dict of arrays (0-d arrays kept as arrays), csv -> pandas
    DataFrame (declared text columns as str, empty = ""), json -> object, jsonl -> list of objects.

    keys: the npz arrays to return (None: every array in the file). require: the declared keys that must be
    present (None: `keys` when given, else every non-optional declared key). torn_tail_ok (jsonl): drop a last
    line without its newline (an append interrupted by a kill). Missing, unreadable (truncated, corrupt) or
    malformed files raise ArtifactError naming the file and the notebook that writes it."""
    a, p = artifact(name), Path(p)
    if not p.exists():
        raise _missing(a, p)
    note_read(p)
    try:
        data = _read(a, p, keys, torn_tail_ok)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, UnicodeDecodeError) as e:
        raise _unreadable(a, p, e) from None
    required = keys if require is None else require
    if a.format == "npz":
        check_keys(a, data, str(p), required)
    elif a.format == "csv":
        check_keys(a, {c: None for c in data.columns}, str(p), required)
    elif a.format == "json" and isinstance(data, dict):
        check_keys(a, data, str(p), required)
    return data


def load(name: str, out_dir, tag: str = "", keys=None, shard: tuple[int, int] | None = None,
         torn_tail_ok: bool = False, require=None, **fields: Any):
    """Load an artifact of a run folder (see load_file for keys, require and the returned types)."""
    return load_file(name, path(name, out_dir, tag, shard, **fields), keys, torn_tail_ok, require)


def save_file(name: str, p, data) -> Path:
    """Write `data` to the file `p` as artifact kind `name`, atomically, after checking every declared key (exact
    dtypes): nothing is written when a check fails. data: dict of arrays (npz), a DataFrame (csv), a JSON-able
    object (json), a list of them (jsonl) or a matplotlib Figure (png)."""
    from lib.storage import store
    a, p = artifact(name), Path(p)
    where = f"{name} (about to write {p.name})"
    if a.format == "npz":
        check_keys(a, {k: np.asarray(v) for k, v in data.items()}, where, exact=True)
        return store.save_npz(p, **data)
    if a.format == "csv":
        check_keys(a, {c: None for c in data.columns}, where)
        return store.save_csv(p, data)
    if a.format == "json":
        if isinstance(data, dict):
            check_keys(a, data, where, keys=[])                      # types of the keys present
        return store.save_json(p, data)
    if a.format == "png":
        return store.save_figure(p, data)
    if a.format != "jsonl":
        raise ArtifactError(f"artifact {a.name!r} ({a.format}) is written by {a.producer}, not through lib.storage.artifacts")
    with store.atomic_path(p) as tmp:
        tmp.write_text("".join(json.dumps(store.jsonable(row), allow_nan=False) + "\n" for row in data))
    return p


def save(name: str, out_dir, data, tag: str = "", shard: tuple[int, int] | None = None, **fields: Any) -> Path:
    """Write an artifact of a run folder atomically after checking its declared keys; returns its path."""
    return save_file(name, path(name, out_dir, tag, shard, **fields), data)


def append(name: str, out_dir, rows: list, tag: str = "", **fields: Any) -> Path:
    """Append rows to a jsonl artifact (checkpoints that grow by a unit at a time): whole lines in one write,
    flushed to disk. A write cut short by a kill leaves a last line without newline, which
    load(..., torn_tail_ok=True) drops; rewrite the file with save() before appending again."""
    a = artifact(name)
    if a.format != "jsonl":
        raise ArtifactError(f"append works on jsonl artifacts only; {name!r} is {a.format}")
    from lib.storage import store
    p = a.path(out_dir, tag, None, **fields)
    store.check_write_allowed(p)
    with open(p, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(store.jsonable(row), allow_nan=False) + "\n" for row in rows))
        f.flush()
        os.fsync(f.fileno())
    return p


# ----------------------------------------------------------------------------------------------------------------
# provenance between artifacts

def scalar(d, key):
    """d[key] as a Python scalar when it is a 0-d value, else None (absent or not a scalar)."""
    if key not in d:
        return None
    v = np.asarray(d[key])
    return v.item() if v.ndim == 0 else None


def check_same_run(acts: dict, ph: dict) -> None:
    """Raise ArtifactError when a loaded activations file and a loaded PhiID file cannot come from the same run
    (head count, head map, model, prompt count)."""
    producer = artifact("phiid").producer
    a_name = Path(acts.get("path", "activations")).name
    p_name = Path(ph.get("path", "phiid")).name
    fix = (f"they come from different runs or models: rerun {producer} on this run's {a_name} "
           f"(python -m lib.run --params <run>.yaml --only {producer} --force)")
    check_same_heads(a_name, acts["activations"].shape[1], p_name, ph["degenerate"].shape[0])
    for key in ("head_layer", "head_index"):
        if key in ph and not np.array_equal(np.asarray(ph[key]), np.asarray(acts[key])):
            raise ArtifactError(f"{p_name} and {a_name} have different {key} arrays: {fix}")
    a, p = scalar(acts, "model"), scalar(ph, "model")
    if a is not None and p is not None and str(a) != str(p):
        raise ArtifactError(f"{p_name} was computed for model {p!r} but {a_name} holds model {a!r}: {fix}")
    p = scalar(ph, "n_prompts")
    if p is not None and int(p) != acts["activations"].shape[0]:
        raise ArtifactError(f"{p_name} was computed on {p} prompts but {a_name} has "
                            f"{acts['activations'].shape[0]}: {fix}")


# ----------------------------------------------------------------------------------------------------------------
# provenance: what each file of a run folder was computed from
#
# manifest.json["artifacts"][<file relative to the run folder>] = {sha256, size, mtime_ns, producer, model, inputs},
# written by the runner after a notebook succeeded: `inputs` maps every run-folder file the notebook read (through
# lib.storage.artifacts or lib.storage.store) to its sha256, `model` is the weights the file derives from. A new notebook gets this by
# registering its artifacts with producer = its name; nothing else is needed.

READS_ENV = "HEADINFO_READS"          # file the kernel appends every artifact it reads to (set by the runner)
NOTEBOOK_ENV = store.NOTEBOOK_ENV    # notebook being executed by the runner
MODEL_ENV = "HEADINFO_MODEL"          # that notebook's model key (see lib.run.model_key)


def note_read(p) -> None:
    """Under the runner: check the provenance of a file about to be read and log it as an input of the notebook."""
    log = os.environ.get(READS_ENV)
    if not log:
        return
    p = Path(p).resolve()
    check_input(p.parent if p.parent.name not in _shard_dirs() else p.parent.parent, p,
                os.environ.get(NOTEBOOK_ENV, ""), os.environ.get(MODEL_ENV, ""))
    with open(log, "a") as f:
        f.write(f"{p}\n")


store.READ_HOOKS.append(note_read)
store.PRODUCER_HOOKS.append(lambda rel: (identify(rel) or (None,))[0] and identify(rel)[0].producer)


def _shard_dirs() -> set[str]:
    return {a.shard_dir for a in ARTIFACTS.values() if a.shard_dir}


def fingerprint(p, known: dict | None = None) -> dict:
    """{sha256, size, mtime_ns} of a file; the known checksum is reused when size and mtime did not change."""
    from lib.storage.store import file_checksum
    st = Path(p).stat()
    if known and known.get("size") == st.st_size and known.get("mtime_ns") == st.st_mtime_ns and known.get("sha256"):
        return {"sha256": known["sha256"], "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {"sha256": file_checksum(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _glob(pattern: str) -> str:
    return re.sub(r"(\{[^}]*\})+", "*", pattern)        # "phiid_{mode}{tag}.npz" -> "phiid_*.npz"


def output_globs(notebook: str) -> list[str]:
    """Glob patterns of the file names a notebook's artifacts take (shard files included)."""
    return [_glob(a.pattern).rsplit(".", 1)[0] + "*" for a in producer_outputs(notebook)]


def output_files(notebook: str, out_dir, shard: tuple[int, int] | None = None) -> list[Path]:
    """The files of the notebook's registered artifacts present in out_dir: the shard files of `shard` for a shard
    run, else the run folder's files (shard files excluded)."""
    out_dir, found = Path(out_dir), set()
    for a in producer_outputs(notebook):
        if shard is not None:
            if a.shard_dir:
                found.update((out_dir / a.shard_dir).glob(_glob(a.filename(shard=shard)) if a.shard_pattern else
                                                          _glob(a.pattern).rsplit(".", 1)[0] +
                                                          f"__shard-{shard[0]}-of-{shard[1]}.{a.format}"))
            continue
        found.update(p for p in out_dir.glob(_glob(a.pattern)) if "__shard-" not in p.name and p.is_file())
    return sorted(found)


def relative(p, out_dir) -> str:
    return Path(p).resolve().relative_to(Path(out_dir).resolve()).as_posix()


def _records(out_dir) -> dict:
    from lib.storage.store import read_manifest
    return read_manifest(out_dir).get("artifacts", {})


def is_tagged(rel: str) -> bool:
    """Baseline files (random_init, rev-...) derive from other weights by design."""
    return "__" in Path(rel).name.split("__shard-")[0]


def check_input(out_dir, p, notebook: str = "", model: str = "", records: dict | None = None) -> None:
    """Refuse a run-folder file whose provenance does not hold: modified or replaced after its producer wrote it,
    computed from a file that has changed since (mixed inputs), or derived from other weights than `model`."""
    out_dir = Path(out_dir)
    try:
        rel = relative(p, out_dir)
    except ValueError:
        return                                            # outside the run folder (a user's neurons file, ...)
    records = _records(out_dir) if records is None else records
    rec = records.get(rel)
    if not rec or rec.get("producer", "").split(".shard-")[0] == notebook:
        return
    now = fingerprint(p, rec)["sha256"]
    if now != rec["sha256"]:
        raise ArtifactError(f"{out_dir / rel} is not the file {rec['producer']} wrote (sha256 {rec['sha256'][:12]} "
                            f"recorded, {now[:12]} found): it was replaced or modified outside the runner; rerun "
                            f"{rec['producer']} (python -m lib.run --params <run>.yaml --only {rec['producer']})")
    for src, sha in (rec.get("inputs") or {}).items():
        src_path = out_dir / src
        if not src_path.exists():
            raise ArtifactError(f"{out_dir / rel} was computed from {src}, which is missing now: rerun the "
                                f"producers of both ({records.get(src, {}).get('producer', '?')}, {rec['producer']})")
        cur = fingerprint(src_path, records.get(src))["sha256"]
        if cur != sha:
            raise ArtifactError(f"{out_dir / rel} was computed from another {src} (sha256 {sha[:12]}) than the one in "
                                f"the run folder ({cur[:12]}): mixed inputs; rerun {rec['producer']}")
    theirs = rec.get("model") or ""
    if model and theirs and theirs != model and not is_tagged(rel):
        raise ArtifactError(f"{out_dir / rel} derives from model {theirs!r} but {notebook or 'this notebook'} runs "
                            f"model {model!r}: results would mix weights; use the same model (and seed) as "
                            f"{rec['producer']}, or rerun it with this one")


# ----------------------------------------------------------------------------------------------------------------
# the README's table

README_BEGIN = "<!-- artifacts table: generated by `python -m lib.artifacts --readme` from lib/storage/artifacts.py -->"
README_END = "<!-- end of artifacts table -->"


def shown_name(a: Artifact, with_tag: bool = True) -> str:
    """The pattern as a reader sees it: activations[__<tag>].npz, phiid_<mode>[__<tag>].npz, ... (with_tag=False:
    the run's own file, activations.npz, phiid_<mode>.npz)."""
    shown = _FIELD.sub(lambda m: "" if m.group(1) == "tag" else f"<{m.group(1)}>", a.pattern)
    if "{tag}" in a.pattern and with_tag:
        stem, ext = shown.rsplit(".", 1)
        shown = f"{stem}[__<tag>].{ext}"
    return shown


def outputs_table() -> str:
    """The README's outputs table (markdown), generated from the registry."""
    rows = ["| file | written by | what |", "|---|---|---|"]
    for a in ARTIFACTS.values():
        where = f"`{shown_name(a)}`" + (f", shards `{a.shard_dir}/shard-<i>-of-<n>.{a.format}`" if a.shard_dir else "")
        rows.append(f"| {where} | {a.producer} | {a.doc.replace('|', chr(92) + '|')} |")
    return "\n".join(rows)


def readme_with_table(text: str) -> str:
    """README text with the part between README_BEGIN and README_END replaced by outputs_table()."""
    if README_BEGIN not in text or README_END not in text:
        raise ArtifactError(f"README has no artifacts table markers; add the two lines {README_BEGIN!r} and "
                            f"{README_END!r} where the table belongs")
    head, rest = text.split(README_BEGIN, 1)
    return f"{head}{README_BEGIN}\n{outputs_table()}\n{README_END}{rest.split(README_END, 1)[1]}"


def producer_outputs(notebook: str) -> list[Artifact]:
    """The artifact kinds a notebook writes."""
    return [a for a in ARTIFACTS.values() if a.producer == notebook]


if __name__ == "__main__":  # python -m lib.artifacts [--readme]: print the table, or rewrite README.md's copy
    if sys.argv[1:] == ["--readme"]:
        from lib import REPO_ROOT
        readme = REPO_ROOT / "README.md"
        readme.write_text(readme_with_table(readme.read_text()))
        print(f"updated the artifacts table in {readme}")
    else:
        print(outputs_table())
