"""Parameter value constraints of every notebook, declared once.

The runner (`python -m lib.run --check`, and so `slurm/pipeline.sh` before it submits anything) and the library
entry points call `validate(notebook, params)`, so a value that would fail on a compute node is refused on the login
node with the same one-line message. Types are checked by the runner from the parameters cell; these rules check
values: ranges, allowed names, shard specs, model specs.

A notebook added to the pipeline declares its rules with `declare(NB.TOPOLOGY, {"n_null": at_least(1), ...})`;
keys without a rule are only type-checked. SHARED rules (model, dtype, device, seed, shard) apply to every notebook
that declares the key.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

from lib import REPO_ROOT
from lib.storage.notebooks import NB

__all__ = ["DTYPES", "ParamsValueError", "at_least", "above", "fractions", "numbers", "thresholds", "shard",
           "device", "model_spec", "resamples", "MIN_PROMPTS", "NEEDS_NETWORK", "declare", "problems",
           "run_problems", "validate"]

Rule = Callable[[Any], "str | None"]      # value -> None when fine, else what is wrong ("must be >= 1")

DTYPES = ("float32", "bfloat16", "float16")
PHIID_MODES = ("per_prompt", "concat", "pooled")


class ParamsValueError(ValueError):
    """A parameter value that the notebook cannot run with (the message names notebook, key, value and the fix)."""


# ----------------------------------------------------------------------------- rules

def at_least(low, optional: bool = False) -> Rule:
    def rule(v):
        if v is None and optional:
            return None
        return None if v is not None and v >= low else f"must be >= {low}"
    return rule


def above(low) -> Rule:
    return lambda v: None if v > low else f"must be > {low}"


def one_of(*names) -> Rule:
    return lambda v: None if v in names else f"must be one of {list(names)}"


def subset_of(*names, empty_ok: bool = False) -> Rule:
    def rule(v):
        if v is None:
            return None
        if not isinstance(v, (list, tuple)):
            return f"must be a list drawn from {list(names)}"
        bad = [x for x in v if x not in names]
        if bad:
            return f"has unknown entries {bad}; allowed: {list(names)}"
        return None if v or empty_ok else f"must name at least one of {list(names)}"
    return rule


def list_of(kind: type, optional: bool = True, low=None) -> Rule:
    def rule(v):
        if v is None and optional:
            return None
        if not isinstance(v, (list, tuple)):
            return f"must be a list of {kind.__name__} (e.g. [0, 1]), not a single {type(v).__name__}"
        bad = [x for x in v if not isinstance(x, kind) or isinstance(x, bool) or (low is not None and x < low)]
        return f"has invalid entries {bad} (each must be {kind.__name__}{f' >= {low}' if low is not None else ''})" if bad else None
    return rule


def fractions(v) -> str | None:
    if v is None:
        return None
    if not isinstance(v, (list, tuple)) or not v:
        return "must be None or a non-empty list of fractions in (0, 1]"
    bad = [x for x in v if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 < x <= 1]
    return f"has entries outside (0, 1]: {bad}" if bad else None


def numbers(at_least_zero: bool) -> Rule:
    """A non-empty list of numbers >= 0 (or > 0: a log grid)."""
    def rule(v):
        if not isinstance(v, (list, tuple)) or not v:
            return f"must be a non-empty list of numbers {'>= 0' if at_least_zero else '> 0'}, e.g. [0.1, 0.5, 1.0]"
        bad = [x for x in v if isinstance(x, bool) or not isinstance(x, (int, float))
               or not (x >= 0 if at_least_zero else x > 0)]
        return f"has entries that are not numbers {'>= 0' if at_least_zero else '> 0'}: {bad}" if bad else None
    return rule


def thresholds(v) -> str | None:
    ok = isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v)
    return None if ok and 0 <= v[0] <= v[1] <= 1 else "must be two numbers [low, high] with 0 <= low <= high <= 1"


_SHARD = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


def shard(v) -> str | None:
    """'' (everything, or merge the shards) or 'i/n' with 1 <= i <= n."""
    if v in ("", None):
        return None
    m = _SHARD.fullmatch(str(v))
    if m and 1 <= int(m.group(1)) <= int(m.group(2)):
        return None
    return "must be '' or 'i/n' with 1 <= i <= n (e.g. '2/4'; SLURM: $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)"


def device(v) -> str | None:
    return None if re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", str(v)) else "must be auto, cpu, cuda, cuda:<n> or mps"


def _random_archs() -> tuple[str, ...]:
    """The tiny test architectures lib.model.loading can build (imported here so `import lib.pipeline.params` needs no torch)."""
    from lib.model.specs import CLUSTER_ARCHS, RANDOM_ARCHS
    return RANDOM_ARCHS + CLUSTER_ARCHS


def _bundled_models() -> tuple[str, ...]:
    from lib.model.bundled import BUNDLED
    return tuple(BUNDLED)


def model_spec(v) -> str | None:
    """random:<arch>, bundled:<name>, a local model folder (with config.json), a Hugging Face id org/name, or a
    network-free spec (synthetic:<kind>[:<L>x<H>], file:<path.npz>; lib.experiments.synthetic, which checks the file)."""
    v = str(v)
    if v.startswith(("synthetic:", "file:")):
        from lib.experiments.synthetic import spec_problem
        return spec_problem(v)
    if v.startswith("random:"):
        from lib.model.specs import ModelSpecError, layout_overrides, parse_random_spec
        try:
            arch, layout = parse_random_spec(v)
            layout_overrides(arch, layout)
        except ModelSpecError as e:
            return str(e)
        random_archs = _random_archs()
        return None if arch in random_archs else f"random:{arch} is not a tiny test model; use one of " \
                                                   f"{[f'random:{a}' for a in random_archs]} (optionally :<L>x<H>[kv<K>])"
    if v.startswith("bundled:"):
        name, bundled = v.split(":", 1)[1], _bundled_models()
        return None if name in bundled else f"bundled:{name} is unknown; use one of " \
                                             f"{[f'bundled:{n}' for n in bundled]}"
    folder = Path(v).expanduser()
    folder = folder if folder.is_absolute() else REPO_ROOT / folder      # notebooks run in the repository root
    if folder.is_dir():
        return None if (folder / "config.json").is_file() else \
            f"folder {v!r} is not a model (no config.json); give a model folder, an org/name Hugging Face id, " \
            f"bundled:... or random:<arch>"
    if re.fullmatch(r"[\w.-]+/[\w.-]+", v):
        return None
    return ("must be a Hugging Face id (org/name), a local model folder, bundled:<name>, random:<arch>, "
            "synthetic:<kind> or file:<path.npz>")


GRPO_KEYS = ("n_steps", "lr", "n_generations", "batch_size", "grad_accum", "max_completion_length", "temperature")


def grpo_settings(v) -> str | None:
    """Notebook 10's `grpo` mapping: known keys (lib.experiments.finetune.GRPOSettings fields) with positive values."""
    if not isinstance(v, dict):
        return f"must be a mapping of {list(GRPO_KEYS)}"
    unknown = sorted(set(v) - set(GRPO_KEYS))
    if unknown:
        return f"has unknown keys {unknown}; allowed: {list(GRPO_KEYS)}"
    bad = [k for k, x in v.items() if isinstance(x, bool) or not isinstance(x, (int, float)) or x <= 0]
    if bad:
        return f"needs positive numbers for {bad}"
    return "needs n_generations >= 2" if v.get("n_generations", 2) < 2 else None


def resamples(v) -> str | None:
    """Surrogates, null networks, bootstrap draws: 0 (skip that null or CI) or at least MIN_RESAMPLES; one draw
    gives a band or CI of width 0 (a verdict from nothing)."""
    if v is None or v == 0 or (isinstance(v, int) and not isinstance(v, bool) and v >= MIN_RESAMPLES):
        return None
    return f"must be 0 (no null / CI) or >= {MIN_RESAMPLES} (one draw gives a band of width 0)"


def task_source(v) -> str | None:
    """'arithmetic' (generated problems) or a jsonl file (relative to the repository root) that lib.experiments.tasks parses."""
    if v == "arithmetic":
        return None
    from lib.experiments.tasks import TaskError, load_jsonl
    path = Path(str(v)).expanduser()
    path = path if path.is_absolute() else REPO_ROOT / path
    if not path.is_file():
        return (f"names no file ({path} does not exist; relative paths start at the repository root): give "
                f"'arithmetic' or an existing jsonl file with question and answer")
    try:
        load_jsonl(path, split=None)
    except TaskError as e:
        return f"does not parse: {e}"
    return None


# ----------------------------------------------------------------------------- declarations

# Minimum sizes, checked across the run's notebooks (run_problems) beside the per-notebook rules below.
MIN_PROMPTS = 2          # 01's prompts: split halves (04, 11's halves) and prompt bootstraps (08, 11) need two
MIN_RESAMPLES = 2        # surrogates / null draws / bootstrap draws when not 0 (resamples)
PHIID_MIN_SAMPLES = 5    # lib.estimators.phiid.MIN_SAMPLES: PhiID needs n_tokens >= tau + 5 past/future samples
PROMPT_USERS = (NB.RANKING, NB.DIAGNOSTICS, NB.TOPOLOGY, NB.LOCAL)

SHARED: dict[str, Rule] = {
    "model": model_spec, "dtype": one_of(*DTYPES), "device": device, "seed": at_least(0), "shard": shard,
    "batch_size": at_least(1),
}

CONSTRAINTS: dict[str, dict[str, Rule]] = {
    NB.EXTRACT: {"n_prompts": at_least(1), "n_tokens": at_least(1), "n_single_check": at_least(0),
                               "revisions": list_of(str, optional=False)},
    NB.PHIID: {"modes": subset_of(*PHIID_MODES), "tau": at_least(1), "redundancy": one_of("MMI", "CCS"),
                 "backend": one_of("numpy", "torch"), "tags": list_of(str)},
    NB.DIAGNOSTICS: {"mode": one_of(*PHIID_MODES), "lag": at_least(1), "hexbin_gridsize": at_least(1)},
    NB.RANKING: {"n_splits": at_least(1), "n_surrogates": resamples, "n_bootstrap": resamples,
                            "tau": at_least(1), "redundancy": one_of("MMI", "CCS"), "n_jobs": at_least(1)},
    NB.ABLATION: {"n_random": at_least(0), "n_matched": at_least(0), "step_size": at_least(1, optional=True),
                    "fractions": fractions,
                    "n_prompts": at_least(1, optional=True), "perturbation": one_of("zero", "noise"),
                    "noise_sigma": above(0), "n_bootstrap": resamples},
    NB.NEURONS: {"n_prompts": at_least(1), "selector": one_of("top_activation", "random"),
                          "n_neurons": at_least(1), "layers": list_of(int, low=0), "mode": one_of("add", "ablate"),
                          "activation_scale": one_of("actual", "mean", "unit"), "thresholds": thresholds,
                          "topk": at_least(1), "n_check": at_least(0)},
    NB.INTERFERENCE: {"sample_source": one_of("auto", "activations", "generate", "texts"),
                             "max_samples": at_least(0), "max_continuation_tokens": at_least(0),
                             "n_new_tokens": at_least(1), "min_samples_for_fisher": at_least(1), "eps": above(0),
                             "ridge": at_least(0.0), "variants": subset_of("magnitude", "signed", "symmetric", "pooled"),
                             "grad_method": one_of("hooks", "vmap", "loop"), "num_threads": at_least(0),
                             "top_k": at_least(1)},
    NB.TOPOLOGY: {"mode": one_of(*PHIID_MODES), "thresholds": fractions, "n_louvain": at_least(1),
                    "n_null": resamples, "n_boot": resamples, "n_bands": at_least(1), "n_jobs": at_least(1)},
    NB.BEHAVIOUR: {"fraction": lambda v: None if 0 < v <= 1 else "must lie in (0, 1]",
                          "n_random": at_least(1), "perturbations": subset_of("noise", "zero"),
                          "sigmas": numbers(at_least_zero=True), "n_problems": at_least(1, optional=True),
                          "difficulty": one_of(0, 1, 2, 3, 4, 5), "max_new_tokens": at_least(1),
                          "calibrate": one_of(True, False), "calibration_sigmas": numbers(at_least_zero=False),
                          "calibration_problems": at_least(1), "calibration_sets": at_least(1),
                          "target_relative_accuracy": lambda v: None if 0 < v < 1 else "must lie in (0, 1)",
                          "task": task_source},
    NB.FINETUNE: {"fraction": lambda v: None if 0 < v <= 1 else "must lie in (0, 1]",
                           "kv": one_of("any", "all", "majority", "none"), "n_random": at_least(1),
                           "seeds": list_of(int, optional=False), "sft_seeds": list_of(int),
                           "methods": subset_of("sft", "grpo"),
                           "difficulty": one_of(0, 1, 2, 3, 4, 5), "n_train": at_least(1, optional=True),
                           "n_test": at_least(1, optional=True), "max_new_tokens": at_least(1),
                           "eval_batch_size": at_least(1), "n_steps": at_least(1), "lr": above(0),
                           "eval_every": at_least(1), "grpo": grpo_settings, "task": task_source},
    NB.LOCAL: {"n_null": resamples, "n_boot": resamples, "tau": at_least(1)},
}


NEEDS_NETWORK = (NB.ABLATION, NB.NEURONS, NB.INTERFERENCE, NB.BEHAVIOUR,
                 NB.FINETUNE, NB.LOCAL)      # run the model itself (01 can do without one)


def network_model_spec(v) -> str | None:
    """model_spec for the notebooks that run the model: a network-free spec (synthetic:, file:) is refused."""
    if str(v).startswith(("synthetic:", "file:")):
        return ("has no network (activations without weights) and this notebook runs the model; leave the notebook "
                "out of the params file (as params/synthetic.yaml does)")
    return model_spec(v)


for _notebook in NEEDS_NETWORK:
    CONSTRAINTS.setdefault(_notebook, {})["model"] = network_model_spec


def declare(notebook: str, rules: dict[str, Rule]) -> None:
    """Add (or extend) a notebook's value rules; called by the module that owns the notebook."""
    CONSTRAINTS.setdefault(notebook, {}).update(rules)


def _late_rules(notebook: str) -> dict[str, Rule]:
    """Rules whose allowed names live in a library module (imported only when the notebook is checked)."""
    if notebook == NB.RANKING:
        from lib.experiments.ranking import VARIANTS
        return {"variants": subset_of(*VARIANTS)}
    if notebook == NB.ABLATION:
        return {"variants": list_of(str, optional=False)}
    return {}


def problems(notebook: str, params: dict) -> list[str]:
    """Every value problem of `params` for `notebook`, one message each (empty when all is fine)."""
    rules = {**SHARED, **CONSTRAINTS.get(notebook, {}), **_late_rules(notebook)}
    found = []
    for key, value in params.items():
        rule = rules.get(key)
        if rule is None:
            continue
        try:
            why = rule(value)
        except TypeError:
            why = f"has the wrong type ({type(value).__name__})"
        if why:
            found.append(f"{notebook}: {key}={value!r} {why}")
    if notebook == NB.ABLATION and params.get("step_size") is not None and params.get("fractions") is not None:
        found.append(f"{notebook}: give either step_size or fractions, not both (set the other to None)")
    if notebook == NB.BEHAVIOUR and params.get("calibrate") is True \
            and "noise" not in (params.get("perturbations") or ["noise"]):
        found.append(f"{notebook}: calibrate=True tunes the noise sigma but perturbations="
                     f"{params.get('perturbations')!r} has no 'noise': add 'noise' or set calibrate: false")
    return found


def run_problems(runs: dict[str, dict]) -> list[str]:
    """Problems across the notebooks of one run: {notebook: every parameter it receives, defaults included} ->
    one message each naming the key, the value and the fix (the minimum sizes above; one model and seed)."""
    return _size_problems(runs) + _held_out_problems(runs) + _weights_problems(runs)


def _size_problems(runs: dict[str, dict]) -> list[str]:
    first = runs.get(NB.EXTRACT)
    if not first:
        return []
    found, users = [], [nb for nb in PROMPT_USERS if nb in runs]
    n, steps = first.get("n_prompts"), first.get("n_tokens")
    if users and isinstance(n, int) and n < MIN_PROMPTS:
        found.append(f"{NB.EXTRACT}.n_prompts={n} is below {MIN_PROMPTS}, the fewest that {users[0]} needs "
                     f"(split halves and prompt bootstraps of {', '.join(users)}); set {NB.EXTRACT}."
                     f"n_prompts: {MIN_PROMPTS} or more")
    taus = {nb: p["tau"] for nb, p in runs.items() if isinstance(p.get("tau"), int) and p["tau"] >= 1}
    if taus and isinstance(steps, int):
        nb = max(taus, key=taus.get)
        need = taus[nb] + PHIID_MIN_SAMPLES
        if steps < need:
            found.append(f"{NB.EXTRACT}.n_tokens={steps} is below {need}, the fewest steps PhiID needs with "
                         f"{nb}.tau={taus[nb]} (tau + {PHIID_MIN_SAMPLES} past/future samples); set "
                         f"{NB.EXTRACT}.n_tokens: {need} or more, or a smaller tau")
    return found


def _held_out_problems(runs: dict[str, dict]) -> list[str]:
    """05 ablates only prompts the oracle did not use (lib.experiments.ablation.select_prompt_rows): with the oracle ordering,
    05.n_prompts must fit in 01.n_prompts - 01.oracle_prompts, else 05 fails on the node after 01-04 have run."""
    first, ablation = runs.get(NB.EXTRACT) or {}, runs.get(NB.ABLATION) or {}
    n, held, wanted = first.get("n_prompts"), first.get("oracle_prompts"), ablation.get("n_prompts")
    if not (first.get("oracle") is True and "oracle" in (ablation.get("variants") or ())):
        return []
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, held, wanted)) or wanted <= n - held:
        return []
    return [f"{NB.ABLATION}.n_prompts={wanted} is more than the {max(n - held, 0)} prompts that 01 leaves to it "
            f"({NB.EXTRACT}.n_prompts={n} minus oracle_prompts={held}, which the oracle ordering keeps "
            f"out of the ablation); set {NB.EXTRACT}.n_prompts: {wanted + held}, or lower "
            f"{NB.ABLATION}.n_prompts to {max(n - held, 1)} or oracle_prompts"]


def _weights_key(p: dict) -> tuple:
    """(model, seed where the seed builds the weights): what lib.pipeline.bookkeeping.model_key compares between notebooks."""
    spec = str(p.get("model"))
    return (spec, p.get("seed", 0) if spec.startswith(("random:", "synthetic:")) else None)


def _weights_problems(runs: dict[str, dict]) -> list[str]:
    models = {nb: p for nb, p in runs.items() if p.get("model") is not None}
    if not models:
        return []
    ref = NB.EXTRACT if NB.EXTRACT in models else min(models)
    found = []
    for nb, p in sorted(models.items()):
        if nb == ref or _weights_key(p) == _weights_key(models[ref]):
            continue
        if p["model"] != models[ref]["model"]:
            found.append(f"{nb}.model={p['model']!r} differs from {ref}.model={models[ref]['model']!r}: its inputs "
                         f"derive from {ref}'s weights; set one top-level model: (and no model in the sections)")
        else:
            found.append(f"{nb}.seed={p.get('seed', 0)!r} differs from {ref}.seed={models[ref].get('seed', 0)!r}: "
                         f"with model {p['model']} the seed builds the weights, so {nb} would run other weights "
                         f"than {ref}; set {nb}.seed: {models[ref].get('seed', 0)} (or set seed once at the top level)")
    return found


def validate(notebook: str, params: dict) -> None:
    """Raise ParamsValueError listing every problem (one line each); call before anything is loaded or written."""
    found = problems(notebook, params)
    if found:
        raise ParamsValueError("; ".join(found))
