"""The registry of a run folder's files: one entry per file kind, in pipeline order (name pattern, producer,
keys, shapes, tags, shards)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lib.storage.store import ArtifactError, run_folder
from lib.storage.notebooks import NB

__all__ = ["FORMATS", "RANDOM_INIT", "Artifact", "ARTIFACTS", "artifact", "sharded", "path"]


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
    producer: str                     # notebook that writes it (an NB constant), or the lib command that does
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
            return run_folder(out_dir) / self.filename(tag, **fields)
        if not self.shard_dir:
            raise ArtifactError(f"artifact {self.name!r} has no shard files (only {sharded()} do)")
        return run_folder(out_dir) / self.shard_dir / self.filename(tag, shard, **fields)
def _k(dtype, *dims, doc="", optional=False) -> Key:
    return Key(dtype, tuple(dims), doc, optional)
def _columns(*names, optional=()) -> dict[str, Key]:
    """CSV columns (presence is checked; pandas decides their dtypes)."""
    return {n: _k("any", "rows", optional=n in optional) for n in (*names, *optional)}
def _claim_summary(name: str, producer: str, doc: str, claim: str) -> Artifact:
    """<name>.json of a stage whose "claim" key holds the block of `claim` (e.g. "C6") the claims scorecard reads."""
    return Artifact(name, f"{name}.json", producer, doc, {
        "claim": _k("object", doc=f"the {claim} claim block read by the claims scorecard")})


# ----------------------------------------------------------------------------------------------------------------
# the registry: one entry per file kind, in pipeline order

_ATOMS = ("rtr", "rtx", "rty", "rts", "xtr", "xtx", "xty", "xts", "ytr", "ytx", "yty", "yts", "str", "stx", "sty", "sts")

ARTIFACTS: dict[str, Artifact] = {a.name: a for a in [
    Artifact("activations", "activations{tag}.npz", NB.EXTRACT,
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
                 "end_of_turn_ids": _k("int", "*", optional=True,
                                       doc="token ids that end a chat turn for the tokenizer that generated the tokens"),
             }),
    Artifact("extract_checkpoint", ".extract_checkpoints/{key}/batch-{start:05d}-{batch_size}.npz",
             NB.EXTRACT,
             "one finished generation batch of an interrupted extraction (key: hash of its settings); removed when "
             "the extraction completes", {
                 "tokens": _k("int", "batch", "steps"),
                 "norms": _k("float32", "batch", "heads", "steps"),
             }),
    Artifact("oracle", "oracle.npz", NB.EXTRACT,
             "measured head importance (attribution patching: sum over positions of |grad x activation| of the "
             "greedy tokens' NLL at each head's output, mean over the oracle's prompts); lib.experiments.oracle", {
                 "score": _k("float", "heads", doc="mean_q sum_i |g . z|, the oracle's ordering key"),
                 "signed": _k("float", "heads", doc="mean_q sum_i -g . z: first-order NLL change of zeroing the head"),
                 "per_prompt": _k("float", "prompts", "heads"), "nll": _k("float", "prompts"),
                 "prompt_ids": _k("int", "prompts"), "rows": _k("int", "prompts"),
                 "head_layer": _k("int", "heads"), "head_index": _k("int", "heads"),
                 "model": _k("str"), "extraction_key": _k("str"), "seconds": _k("float"),
             }),
    Artifact("phiid", "phiid_{mode}{tag}.npz", NB.PHIID,
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
    Artifact("diagnostics", "diagnostics{tag}.json", NB.DIAGNOSTICS,
             "synergy-redundancy correlation, lag-1 autocorrelation, TDMI, drift, layer profiles", {
                 "n_prompts": _k("int"), "n_heads": _k("int"), "n_steps": _k("int"), "syn_red": _k("dict"),
                 "layer_profiles": _k("dict"), "per_head": _k("dict"), "all_files": _k("list"),
                 "mode": _k("str"), "tag": _k("str"),
             }),
    Artifact("rankings", "rankings.csv", NB.RANKING,
             "one row per head: head_idx, layer, head, one score column per ranking variant, syn / red",
             _columns("head_idx", "layer", "head", optional=("syn", "red"))),
    Artifact("ranking_summary", "ranking_summary.json", NB.RANKING,
             "split-half reliability, surrogate null, inverted-U test, trained vs random", {
                 "variants": _k("list"), "n_heads": _k("int"),
                 **{k: _k(t, optional=True) for k, t in (("n_prompts", "int"), ("tau", "int"), ("redundancy", "str"),
                                                         ("layer_profiles", "dict"), ("reliability", "list"),
                                                         ("inverted_u", "list"), ("inverted_u_beyond_null", "list"),
                                                         ("null_z", "dict"), ("agreement", "dict"))},
             }),
    Artifact("ranking_surrogates", "ranking_surrogates.npz", NB.RANKING,
             "circular-shift surrogate scores, one [surrogates, heads] array per variant (also the resume "
             "checkpoint)", {
                 "signature": _k("str", doc="hash of the activations, variants, tau, redundancy and seed"),
             }),
    Artifact("ablation", "ablation.csv", NB.ABLATION,
             "KL(clean ‖ ablated) per order and number of heads removed (mean and SEM over prompts)",
             _columns("ordering", "variant", "seed", "n_removed", "fraction", "kl_mean", "kl_sem", "perturbation",
                      "n_prompts")),
    Artifact("ablation_kl", "ablation_kl.npz", NB.ABLATION,
             "KL per order, point and prompt (nats/token), with the orders", {
                 "kl": _k("float", "orders", "points", "prompts"),
                 "n_removed": _k("int", "points"), "fraction": _k("float", "points"),
                 "ordering": _k("str", "orders"), "variant": _k("str", "orders"), "seed": _k("int", "orders"),
                 "order": _k("int64", "orders", "heads"),
                 "prompt_ids": _k("int", "prompts"), "prompt_category": _k("str", "prompts"),
                 "total_heads": _k("int"), "perturbation": _k("str"), "noise_sigma": _k("float"), "model": _k("str"),
             }),
    Artifact("ablation_checkpoint", "ablation_checkpoint_{digest}.npz", NB.ABLATION,
             "progress of an ablation run (digest: hash of its settings), or of shard i of n", {
                 "fingerprint": _k("str", doc="JSON of everything the numbers depend on"),
                 "shard_i": _k("int"), "shard_n": _k("int"),
                 "assigned": _k("bool", "groups", "points"), "done": _k("bool", "groups", "points", "prompts"),
                 "kl": _k("float64", "orders", "points", "prompts"),
             }, shard_dir="ablation_shards", shard_pattern="shard-{i}-of-{n}.npz"),
    Artifact("ablation_fractions", "ablation_fractions.csv", NB.ABLATION,
             "KL at 12.5 %, 25 %, ..., 100 % of heads removed: ranking, random mean and sd, ratio, reverse",
             _columns("variant", "fraction", "n_removed", "on_grid", "ranking_kl", "random_mean", "random_sd",
                      "ratio", "reverse_kl")),
    Artifact("ablation_auc", "ablation_auc.csv", NB.ABLATION,
             "area under each KL curve and its ratio to the random orders, with a bootstrap CI over prompts",
             _columns("variant", "ordering", "auc", "random_auc_mean", "random_auc_sd", "auc_ratio", "ci_low",
                      "ci_high")),
    Artifact("ablation_curves", "ablation_curves.png", NB.ABLATION,
             "figure: KL vs fraction of heads removed, ranking vs random and reverse orders"),
    Artifact("ablation_prompt_ratios", "ablation_prompt_ratios.png", NB.ABLATION,
             "figure: per-prompt AUC ratios by task category"),
    Artifact("neuron_effects", "neuron_effects.csv", NB.NEURONS,
             "direct, indirect and total effect of each selected MLP neuron on each prompt", {
                 "neuron_id": _k("str", "rows"), "layer": _k("int", "rows"), "neuron": _k("int", "rows"),
                 "prompt": _k("int", "rows"), "prompt_id": _k("int", "rows"),
                 "direct": _k("float", "rows", doc="target-logit effect, logits"), "indirect": _k("float", "rows"),
                 "total": _k("float", "rows"), "direct_ratio": _k("float", "rows"),
                 **{c: _k("str", "rows", doc="space-separated, top-k tokens") for c in (
                     "top_total_ids", "top_total_effects", "top_direct_ids", "top_direct_effects")},
             }, shard_dir=".neuron_shards"),
    Artifact("neuron_shard_info", "neuron_effects.json", NB.NEURONS,
             "what one shard of neuron_effects computed (settings, neurons, rows); next to its shard CSV", {
                 "settings": _k("object", doc="what the numbers depend on"), "shard": _k("str"), "n_rows": _k("int"),
             }, shard_dir=".neuron_shards"),
    Artifact("neuron_effects_part", "batch-{batch:05d}.csv", NB.NEURONS,
             "checkpoint: the rows of one finished batch, in a parts folder (parts_dir('neuron_effects', ...))"),
    Artifact("neuron_summaries", "neuron_summaries.json", NB.NEURONS, "per-class summaries of the effects"),
    Artifact("layer_summary", "layer_summary.csv", NB.NEURONS, "direct/total ratio by layer", {
                 "layer": _k("int", "layers"), "n_neurons": _k("int", "layers"),
             }),
    Artifact("neurons_figure", "neurons_{figure}.png", NB.NEURONS,
             "figures: direct_vs_total, direct_ratio_by_layer, classes_by_layer"),
    Artifact("interference", "interference.npz", NB.INTERFERENCE,
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
    Artifact("top_conflicts", "top_conflicts.csv", NB.INTERFERENCE, "the most conflicting (layer, head, block)", {
                 "variant": _k("str", "rows"), "block": _k("str", "rows"), "rank": _k("int", "rows"),
                 "sample_a": _k("str", "rows"), "sample_b": _k("str", "rows"), "text_a": _k("str", "rows"),
                 "text_b": _k("str", "rows"),
             }),
    Artifact("interference_summary", "interference_summary.csv", NB.INTERFERENCE,
             "interference per block and variant", {"variant": _k("str", "rows"), "block": _k("str", "rows")}),
    Artifact("interference_figure", "interference_{figure}.png", NB.INTERFERENCE,
             "figures: heatmaps_magnitude, heatmaps_signed, layers"),
    Artifact("topology", "topology.json", NB.TOPOLOGY,
             "efficiency and modularity of the synergy and redundancy networks, threshold sweep, strength-"
             "preserving null, modules vs layers, per tag; the C4 claim block", {
                 "tags": _k("object", doc="per tag (trained, random_init, rev-...): measures, null bands, z-scores"),
                 "claim": _k("object", doc="claim C4 in the claims scorecard's shape"),
             }),
    Artifact("modules", "modules.csv", NB.TOPOLOGY,
             "Louvain module of every head in each network (full and top 10%), its layer and strength", {
                 "head_idx": _k("int", "heads"), "layer": _k("int", "heads"), "head": _k("int", "heads"),
                 "module": _k("int", "heads"), "module_top": _k("int", "heads"),
                 "strength": _k("float", "heads"),
             }),
    Artifact("behaviour", "behaviour.csv", NB.BEHAVIOUR,
             "task accuracy per perturbation condition: Clopper-Pearson CI, McNemar vs random, percentile", {
                 "condition": _k("str", "conditions"), "kind": _k("str", "conditions"),
                 "accuracy": _k("float", "conditions"), "ci_low": _k("float", "conditions"),
                 "ci_high": _k("float", "conditions"), "n_problems": _k("int", "conditions"),
             }),
    Artifact("behaviour_calibration", "behaviour_calibration.csv", NB.BEHAVIOUR,
             "dose sweep before the main measurement: accuracy of the baseline and of random head sets per noise sigma "
             "(CIs), relative to the baseline, the target and the chosen sigma (no rows when calibrate is false)", {
                 "kind": _k("str", "rows"), "seed": _k("int", "rows"), "sigma": _k("float", "rows"),
                 "n_problems": _k("int", "rows"), "n_correct": _k("float", "rows"), "accuracy": _k("float", "rows"),
                 "ci_low": _k("float", "rows"), "ci_high": _k("float", "rows"),
                 "relative_accuracy": _k("float", "rows"), "relative_ci_low": _k("float", "rows"),
                 "relative_ci_high": _k("float", "rows"), "target": _k("float", "rows"),
                 "chosen_sigma": _k("float", "rows"),
             }),
    Artifact("behaviour_generations", "behaviour_generations.jsonl", NB.BEHAVIOUR,
             "per condition and problem: generated text, extracted answer, correctness"),
    _claim_summary("behaviour_summary", NB.BEHAVIOUR,
                   "settings, synergistic vs random tests per variant and the C6 claim block", "C6"),
    Artifact("behaviour_checkpoint", "behaviour_checkpoint_{key}.jsonl", NB.BEHAVIOUR,
             "finished work units of a behaviour run (a rerun with the same settings resumes from it)"),
    Artifact("finetune", "finetune.csv", NB.FINETUNE,
             "test accuracy (with Clopper-Pearson CI) per method, condition, seed and evaluation step", {
                 "method": _k("str", "rows"), "condition": _k("str", "rows"), "seed": _k("int", "rows"),
                 "step": _k("int", "rows"), "accuracy": _k("float", "rows"), "n": _k("int", "rows"),
             }),
    Artifact("finetune_deltas", "finetune_deltas.csv", NB.FINETUNE,
             "Frobenius norm of each head's Q/K/V/O weight change per method, condition and seed, and whether the "
             "slice was trainable", {
                 "layer": _k("int", "rows"), "head": _k("int", "rows"), "block": _k("str", "rows"),
                 "delta_norm": _k("float", "rows"), "selected": _k("bool", "rows"),
             }),
    _claim_summary("finetune_summary", NB.FINETUNE,
                   "final and best accuracy per run, Hedges' g and permutation tests between conditions, claim C7", "C7"),
    Artifact("finetune_checkpoint", ".finetune_checkpoints/{key}/{run}.pt", NB.FINETUNE,
             "state of one fine-tuning run after its last evaluation (removed when every run finished)"),
    Artifact("local_phiid", "local_phiid{tag}.npz", NB.LOCAL,
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
    Artifact("local_summary", "local_summary.json", NB.LOCAL,
             "local synergy vs entropy/surprisal (circular-shift null) per layer, by token kind (bootstrap CI, "
             "shift null), per tag", {
                 "tau": _k("int"), "redundancy": _k("str"), "mode": _k("str"),
                 "tags": _k("object", doc="per tag (trained, random_init): correlations, kind table, agreement"),
             }),
    Artifact("manifest", "manifest.json", "lib.run",
             "parameters, versions, git commit, weights checksum, timings; one section per notebook"),
    Artifact("claims", "claims.json", "lib.run",
             "the claims scorecard: one entry per claim of the paper (C1-C7) with statistic, 95% CI, null, the "
             "paper's figure and a verdict by the rules of lib/pipeline/claims/", {
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
