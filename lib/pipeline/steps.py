"""A run's steps: its params file read (shared keys, one section per notebook, --set overrides), every key checked
against the notebooks' declared parameters and value rules, and the notebooks to execute, in order, with what
each receives; the graph of which notebook reads which (PARENTS, from lib/pipeline/stages.py)."""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from lib import REPO_ROOT
from lib.pipeline import params as constraints, stages
from lib.pipeline.notebook_params import ParamsError, _base_type, declared_parameters, default_value as _default_value

__all__ = ["OUTPUT_ROOT", "Step", "PARENTS", "parents_of", "upstream_of", "pipeline_notebooks", "check_type",
           "parse_value", "load_params", "build_steps", "shard_suffix", "params_hash", "RUNNER_KEYS",
           "DuplicateKeyError", "UniqueKeyLoader", "check_shards"]


NOTEBOOK_DIR = Path(os.environ.get(stages.NOTEBOOKS_VAR) or REPO_ROOT / "notebooks")   # tests: an edited copy
OUTPUT_ROOT = REPO_ROOT / "outputs"
RUNNER_KEYS = {"out_dir"}          # set by the runner, may be overridden with --set out_dir=...


@dataclass
class Step:
    name: str                 # notebook stem (an NB constant)
    path: Path
    params: dict              # everything injected into the notebook
    output: Path              # executed notebook
    html: Path
    shards: int | None = None # the section's `shards:` (SLURM array size of a shardable notebook), None: not set
    code: dict | None = None  # lib.pipeline.provenance.notebook_fingerprint, filled by current_code on first use


# ----------------------------------------------------------------------------- parameters

# The notebooks whose files each notebook reads (lib/pipeline/stages.py declares them). The runner reruns a notebook when one
# of these (or their parents) ran since it did; slurm/pipeline.sh makes each SLURM job wait for them. A notebook not
# listed depends on every notebook before it.
PARENTS = stages.parents()


def parents_of(name: str, pipeline) -> list[str]:
    """PARENTS[name]; a notebook not listed reads every notebook of `pipeline` before it."""
    return PARENTS[name] if name in PARENTS else [n for n in pipeline if n < name]


def upstream_of(name: str, pipeline) -> list[str]:
    """The notebooks of `pipeline` that `name` reads from, directly or through others (PARENTS), sorted."""
    found, todo = set(), list(parents_of(name, pipeline))
    while todo:
        parent = todo.pop()
        if parent not in found:
            found.add(parent)
            todo += parents_of(parent, pipeline)
    return sorted(found & set(pipeline))


def pipeline_notebooks() -> dict[str, Path]:
    """Stage name -> notebook path, for every declared stage (lib/pipeline/stages.py) whose notebook exists; the explorer
    (00) and the cross-run notebooks are not stages."""
    return {name: s.path for name, s in stages.stages().items() if s.path.is_file()}


def check_type(notebook: str, key: str, value, declared: dict) -> None:
    """Fail when `value` does not fit the declared type (or the type of the declared default)."""
    default = _default_value(declared.get("default", "None"))
    expected = _base_type(declared.get("type"))
    if expected is None and default is not None:
        expected = type(default)
    if expected is None or value is None:
        return
    ok = isinstance(value, expected)
    if expected is int and isinstance(value, bool):
        ok = False
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if expected is list and isinstance(value, tuple):
        ok = True
    if not ok:
        hint = " (YAML reads 1e-3 as a string: write 1.0e-3)" if expected is float and isinstance(value, str) else ""
        raise ParamsError(f"{notebook}: parameter {key!r} must be {expected.__name__} (default "
                          f"{declared.get('default')}), got {type(value).__name__} {value!r}{hint}")


def parse_value(text: str):
    """A --set value: int, float (1e-3 included), or YAML (true, [1, 2], {a: 1}, strings)."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


class DuplicateKeyError(ValueError):
    """A key given twice in one mapping of a params file (YAML keeps the last one silently)."""


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (a top-level key, a notebook section or a key
    inside a section), naming the key and both lines."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise DuplicateKeyError(f"key {key!r} is given twice (lines {seen[key]} and {line}); keep one")
            seen[key] = line
        return super().construct_mapping(node, deep)


def load_params(params_path: str | os.PathLike, overrides: list[str] = ()) -> tuple[str, dict, dict]:
    """-> (run name, shared keys, {notebook: section}) with --set overrides applied."""
    path = Path(params_path)
    if not path.exists():
        available = sorted(p.name for p in (REPO_ROOT / "params").glob("*.yaml"))
        raise ParamsError(f"params file {str(path)!r} not found; available in params/: {available}")
    try:
        raw = yaml.load(path.read_text(), Loader=UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML ({e})") from None
    except DuplicateKeyError as e:
        raise ParamsError(f"{path}: {e}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of keys, got {type(raw).__name__}")
    notebooks = pipeline_notebooks()
    ghosts = [k for k in raw if isinstance(k, str) and re.fullmatch(r"\d\d_\w+", k) and k not in notebooks]
    if ghosts:
        raise ParamsError(f"{path}: section(s) {ghosts} name no notebook in notebooks/; notebooks: {list(notebooks)}")
    shared = {k: v for k, v in raw.items() if k not in notebooks}
    sections = {k: (v or {}) for k, v in raw.items() if k in notebooks}
    for name, section in sections.items():
        if not isinstance(section, dict):
            raise ParamsError(f"{path}: section {name!r} must be a mapping of parameters, got {section!r}")
    for item in overrides:
        if "=" not in item:
            raise ParamsError(f"--set {item!r}: use key=value or NN_notebook.key=value")
        key, text = item.split("=", 1)
        value = parse_value(text)
        if "." in key and key.split(".", 1)[0] in notebooks:
            nb, sub = key.split(".", 1)
            sections.setdefault(nb, {})[sub] = value
        elif "." in key and re.fullmatch(r"\d\d_\w+", key.split(".", 1)[0]):
            raise ParamsError(f"--set {item!r}: no notebook {key.split('.', 1)[0]!r}; notebooks: {list(notebooks)}")
        else:                        # a shared --set wins over the file everywhere, notebook sections included
            shared[key] = value
            for section in sections.values():
                if key in section:
                    section[key] = value
    return path.stem, shared, sections


def build_steps(run: str, shared: dict, sections: dict, only: list[str] | None = None) -> list[Step]:
    """Validate every key against the notebooks' declared parameters; -> the steps to execute, in order."""
    notebooks = pipeline_notebooks()
    if not sections:
        raise ParamsError(f"run {run!r} has no notebook sections; add one or more of {list(notebooks)}")
    out_dir = Path(shared.pop("out_dir", OUTPUT_ROOT / run))
    declared = {name: declared_parameters(notebooks[name]) for name in sections}
    sections = {name: dict(section) for name, section in sections.items()}
    shards = {name: check_shards(name, section.pop("shards"), declared[name])
              for name, section in sections.items() if "shards" in section}
    for key in shared:
        if not any(key in d for d in declared.values()):
            every = sorted({k for d in declared.values() for k in d} - RUNNER_KEYS)
            raise ParamsError(f"unknown shared key {key!r}: no notebook of this run declares it; allowed: {every}")
    for name, section in sections.items():
        for key, value in section.items():
            if key not in declared[name] or key in RUNNER_KEYS:
                allowed = sorted(set(declared[name]) - RUNNER_KEYS | ({"shards"} if "shard" in declared[name] else set()))
                raise ParamsError(f"unknown key {key!r} in section {name!r} (notebooks/{name}.ipynb); allowed: {allowed}")
            check_type(name, key, value, declared[name][key])
        for key, value in shared.items():
            if key in declared[name]:
                check_type(name, key, value, declared[name][key])
    problems = [p for name in sorted(sections) for p in constraints.problems(name, _merged(name, shared, sections, declared))]
    problems += constraints.run_problems({name: _with_defaults(name, shared, sections, declared) for name in sections})
    if problems:
        raise ParamsError("invalid value(s): " + "; ".join(problems))
    needs_model = [n for n in sorted(sections) if "model" in declared[n] and "model" not in sections[n]]
    if needs_model and "model" not in shared:
        raise ParamsError(f"run {run!r} names no model: add a top-level `model:` (e.g. model: bundled:smollm2-135m, "
                          f"a Hugging Face id or random:llama); {needs_model[0]} would otherwise use its notebook "
                          f"default, a tiny random test model")
    if only:
        unknown = [o for o in only if o not in sections]
        if unknown:
            raise ParamsError(f"--only {unknown}: not in this run's pipeline {list(sections)}")
    steps = []
    for name in sorted(sections):
        if only and name not in only:
            continue
        params = _merged(name, shared, sections, declared)
        params["out_dir"] = str(out_dir)
        suffix = shard_suffix(params.get("shard"))
        steps.append(Step(name, notebooks[name], params, out_dir / f"{name}{suffix}.ipynb",
                          out_dir / "html" / f"{name}{suffix}.html", shards.get(name)))
    return steps


def check_shards(notebook: str, value, declared: dict) -> int:
    """A section's `shards:` key: the SLURM array size slurm/pipeline.sh submits (its --shards overrides it)."""
    if "shard" not in declared:
        raise ParamsError(f"section {notebook!r}: 'shards' is set but notebooks/{notebook}.ipynb declares no "
                          f"'shard' parameter, so it cannot be split; remove the key")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ParamsError(f"section {notebook!r}: 'shards' must be a positive integer (SLURM array size; 1 = one "
                          f"unsharded job), got {value!r}")
    return value


def _merged(name: str, shared: dict, sections: dict, declared: dict) -> dict:
    """The parameters a notebook receives (besides out_dir): its declared shared keys, then its section."""
    return {**{k: v for k, v in shared.items() if k in declared[name]}, **sections[name]}


def _with_defaults(name: str, shared: dict, sections: dict, declared: dict) -> dict:
    """Every parameter a notebook computes with: its declared defaults, then what the run sets."""
    return {**{k: _default_value(d.get("default", "None")) for k, d in declared[name].items()},
            **_merged(name, shared, sections, declared)}


def shard_suffix(shard) -> str:
    if not shard:
        return ""
    i, n = str(shard).split("/")
    return f".shard-{i}-of-{n}"


def params_hash(params: dict) -> str:
    """Hash of what a notebook computes with; out_dir is left out (a moved or copied run folder stays valid: its
    files are checked by their checksums)."""
    kept = {k: v for k, v in params.items() if k != "out_dir"}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]
