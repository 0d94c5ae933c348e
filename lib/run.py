"""The runner: executes the notebook pipeline of one run with papermill.

    python -m lib.run --params params/<run>.yaml [--only <notebook> ...] [--set key=value ...] [--force]

A params file holds shared keys (top level: injected into every notebook that declares them) and one section per
notebook (a top-level key named like the notebook, e.g. `<NN_name>:`); the notebooks with a section form the run's
pipeline, in file-name order. The run's name, and so its output folder outputs/<run>/, is the params file's stem.

Before anything runs, every key is checked against the notebook's declared parameters (its `parameters` cell,
read by papermill.inspect_notebook) and against the type of the declared default. A section of a shardable notebook
(one that declares `shard`) may also set `shards: N`, the SLURM array size of slurm/pipeline.sh; it is not passed to
the notebook. --check also prints the run's cost estimate (lib/pipeline/cost.py). Each notebook is executed with
the repository root as working directory into outputs/<run>/NN_name.ipynb and rendered to
outputs/<run>/html/NN_name.html (report view, no code).

    python -m lib.run --params params/<run>.yaml --explain     # what would run and why, per notebook; runs nothing

A notebook is up to date, and skipped, when its parameters, its inputs (every run-folder file it read, by sha256),
every one of its outputs, and its code and environment (lib.pipeline.provenance: its code cells, the lib modules it imports,
as syntax trees, so comments and formatting do not count; the numeric packages' versions; the weights) are unchanged
since it last succeeded, and no notebook it reads from (PARENTS, and theirs) ran since; otherwise it reruns (the log
says why), and so does everything that reads from it. --force reruns anyway. One runner at a time holds a run folder
(single-notebook runs, e.g. SLURM jobs and shards, may run at once beside each other, never beside a whole run); see
lib.storage.store.run_lock.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import yaml

from lib import REPO_ROOT
from lib.storage import artifacts
from lib.pipeline import params as constraints, provenance, stages
from lib.pipeline.notebook_params import (ParamsError, _base_type, declared_parameters,  # noqa: F401
                                 default_value as _default_value)
from lib.storage.store import ArtifactError, ensure_writable_dir, read_manifest, update_manifest

__all__ = ["OUTPUT_ROOT", "Step", "PARENTS", "parents_of", "upstream_of", "pipeline_notebooks", "check_type",
           "parse_value", "load_params", "build_steps", "shard_suffix", "params_hash", "model_key", "stale_reasons",
           "code_reasons", "is_up_to_date", "record", "record_success", "export_html", "render_html", "execute",
           "run_pipeline", "default_jobs", "kernel_threads", "run_concurrently", "explain", "check_run",
           "cache_problem", "main", "stale_notebooks"]

# papermill and nbconvert import nbformat, which imports jsonschema, whose optional IRI format check imports
# rfc3987_syntax (installed with jupyter's jsonschema[format-nongpl]); that module compiles a grammar on import:
# ~1.6 s of CPU in every runner process. No notebook schema uses the IRI format: the runner does without it.
sys.modules.setdefault("rfc3987_syntax", None)

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


# ----------------------------------------------------------------------------- execution

def model_key(params: dict) -> str:
    """The weights a notebook's results derive from: the model spec, plus the seed where it builds the weights."""
    spec = params.get("model")
    if not spec:
        return ""
    seeded = str(spec).startswith(("random:", "synthetic:")) or params.get("random_init")
    seed = f" seed {params.get('seed', 0)}" if seeded else ""
    return f"{spec}{seed}{' re-initialised' if params.get('random_init') else ''}"


def _shard_of(step: Step) -> tuple[int, int] | None:
    shard = step.params.get("shard")
    return tuple(int(x) for x in str(shard).split("/")) if shard else None


def _changed(old: dict, new: dict, ignore: str = "") -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k != ignore)


def stale_reasons(step: Step, manifest: dict, earlier: list[str]) -> list[str]:
    """Why `step` must run again (empty: up to date). earlier: the notebooks it reads from (upstream_of)."""
    entries, records = manifest.get("notebooks", {}), manifest.get("artifacts", {})
    entry, out_dir = entries.get(step.output.stem), step.output.parent
    if not entry:
        return ["it has not run in this run folder"]
    if entry.get("status") != "ok":
        return [f"its last run {entry.get('status', 'did not finish')}"]
    if entry.get("params_hash") != params_hash(step.params):
        keys = _changed(entry.get("params", {}), step.params, ignore="out_dir")
        return [f"parameters changed: {keys}" if keys else "its parameters were recorded by an older runner"]
    if not step.output.exists():
        return [f"its executed copy {step.output.name} is missing"]
    if "outputs" not in entry:
        return ["no provenance recorded for its last run"]
    reasons = code_reasons(entry.get("code"), current_code(step))
    for kind, files in (("output", entry["outputs"]), ("input", entry.get("inputs", {}))):
        for rel, sha in files.items():
            if not (out_dir / rel).is_file():
                reasons.append(f"{kind} {rel} is missing")
            elif artifacts.fingerprint(out_dir / rel, records.get(rel))["sha256"] != sha:
                reasons.append(f"{kind} {rel} changed since it ran")
    upstream = entry.get("upstream", {})
    reasons += [f"{nb} ran since" for nb in earlier if nb in entries and entries[nb].get("run_id") != upstream.get(nb)]
    return reasons


def current_code(step: Step) -> dict | None:
    """The fingerprint of the code and environment `step` would run with (lib.pipeline.provenance; None for a notebook file
    that does not exist, e.g. a test's registered-only notebook). Computed once per step."""
    if step.code is None and Path(step.path).is_file():
        unset = {k: v for k, v in provenance.parameter_defaults(step.path).items() if k not in step.params}
        weights = provenance.weights_id(model_key(step.params), step.params.get("model"))
        step.code = provenance.notebook_fingerprint(step.path, unset, weights)
    return step.code


def code_reasons(recorded: dict | None, current: dict | None) -> list[str]:
    """What changed in the code, packages or weights since the notebook ran (a record without a fingerprint: stale)."""
    return [] if current is None else provenance.code_reasons(recorded, current)


def is_up_to_date(step: Step, earlier: list[str] | None = None) -> bool:
    """True when `step` would be skipped (see stale_reasons); earlier defaults to the notebooks it reads from."""
    if earlier is None:
        earlier = upstream_of(step.name, pipeline_notebooks())
    return not stale_reasons(step, read_manifest(step.output.parent), earlier)


def record(step: Step, **entry) -> None:
    """Runner bookkeeping in manifest.json under notebooks/<output stem>."""
    from lib.storage.store import locked, save_json
    path = step.output.parent / "manifest.json"
    with locked(path):
        manifest = read_manifest(step.output.parent)
        manifest.setdefault("notebooks", {})[step.output.stem] = {"params": step.params, **entry}
        save_json(path, manifest)


def record_success(step: Step, reads: set[Path], earlier: list[str], **entry) -> None:
    """Status ok plus provenance: the files the notebook read and wrote (sha256) and what each output derives from."""
    from lib.storage.store import locked, save_json
    out_dir = step.output.parent
    path = out_dir / "manifest.json"
    with locked(path):
        manifest = read_manifest(out_dir)
        records, entries = manifest.setdefault("artifacts", {}), manifest.setdefault("notebooks", {})
        outputs = {artifacts.relative(p, out_dir): p for p in artifacts.output_files(step.name, out_dir, _shard_of(step))}
        inputs = {}
        for p in sorted(reads):
            rel = artifacts.relative(p, out_dir)
            if rel not in outputs and p.is_file():
                inputs[rel] = artifacts.fingerprint(p, records.get(rel))["sha256"]
        model = model_key(step.params) or next((records[r].get("model", "") for r in inputs
                                                 if r in records and not artifacts.is_tagged(r)), "")
        for rel, p in list(outputs.items()):
            old = records.get(rel) or {}
            now = artifacts.fingerprint(p, old)
            if not (old.get("mtime_ns") == now["mtime_ns"] and old.get("sha256") == now["sha256"]):
                records[rel] = {**now, "producer": step.output.stem, "model": model, "inputs": inputs}
            elif Path(p).resolve() in {Path(r).resolve() for r in reads} and not _missing_inputs(out_dir, old):
                # read back, not rewritten, its inputs all still there: the notebook reused it as valid
                if old.get("inputs") != inputs:
                    print(f"[run] kept {rel}: {step.name} read it back as a valid checkpoint; it now derives from "
                          f"the current inputs", flush=True)
                records[rel] = {**now, "producer": step.output.stem, "model": model, "inputs": inputs}
            elif _lost_inputs(out_dir, old, records):   # not rewritten, and what it was computed from is gone
                print(f"[run] removed {rel}: {step.name} did not rewrite it and it was computed from "
                      f"{_lost_inputs(out_dir, old, records)}, which changed or is missing now", flush=True)
                p.unlink()
                del outputs[rel], records[rel]
        entries[step.output.stem] = {
            "params": step.params, **entry, "run_id": uuid.uuid4().hex[:12], "model": model, "inputs": inputs,
            "outputs": {rel: records[rel]["sha256"] for rel in outputs},
            "upstream": {nb: entries[nb].get("run_id") for nb in earlier if nb in entries}}
        save_json(path, manifest)


def _lost_inputs(out_dir: Path, record: dict, records: dict) -> list[str]:
    """The recorded inputs of an artifact that are missing or changed in the run folder."""
    lost = []
    for rel, sha in (record.get("inputs") or {}).items():
        p = out_dir / rel
        if not p.is_file() or artifacts.fingerprint(p, records.get(rel))["sha256"] != sha:
            lost.append(rel)
    return lost


def _missing_inputs(out_dir: Path, record: dict) -> list[str]:
    """The recorded inputs of an artifact that no longer exist (a file computed from a deleted input is never
    kept, even when the notebook read it back)."""
    return [rel for rel in (record.get("inputs") or {}) if not (out_dir / rel).is_file()]


_HTML_EXPORTER = []        # one nbconvert exporter per runner process (importing nbconvert takes seconds)


def html_exporter():
    """nbconvert's HTML exporter configured as `jupyter nbconvert --to html --no-input
    --CoalesceStreamsPreprocessor.enabled=True` (report view: no code, no prompts, stream outputs merged), made once
    per process: the same HTML without a Python start and an nbconvert import per notebook."""
    if not _HTML_EXPORTER:
        from nbconvert import HTMLExporter
        from traitlets.config import Config
        config = Config({"TemplateExporter": {"exclude_input": True, "exclude_input_prompt": True,
                                              "exclude_output_prompt": True},
                         "CoalesceStreamsPreprocessor": {"enabled": True}})
        _HTML_EXPORTER.append(HTMLExporter(config=config))
    return _HTML_EXPORTER[0]


def export_html(executed: Path, target: Path) -> None:
    """Write the report view of the executed notebook to `target` (as nbconvert's command line writes it)."""
    body, _ = html_exporter().from_filename(str(executed), resources={"unique_key": Path(executed).stem,
                                                                      "output_files_dir": f"{Path(executed).stem}_files"})
    with open(target, "w", encoding="utf-8") as f:
        f.write(body)


def render_html(executed: Path, html: Path) -> None:
    """nbconvert's report view, written to a temporary name and renamed (no partial HTML on a full disk)."""
    html.parent.mkdir(parents=True, exist_ok=True)
    tmp = html.parent / f".{html.stem}.tmp.html"
    try:
        export_html(executed, tmp)
        os.replace(tmp, html)
    except Exception as e:                        # a full disk, an unreadable notebook, a template error
        raise OSError(f"nbconvert could not write {html}: {type(e).__name__}: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)


class _KernelEnv:
    """Environment of one notebook's kernel: quiet progress bars off a terminal, provenance logging of reads, and
    (notebooks run at once, --jobs N) the thread count of its share of the CPUs. Given to that kernel only (the
    runner's own environment is left alone, so notebooks run at once in threads each log their own reads)."""

    def __init__(self, step: Step, reads_log: Path):
        self.values = {artifacts.READS_ENV: str(reads_log), artifacts.NOTEBOOK_ENV: step.name,
                       artifacts.MODEL_ENV: model_key(step.params), **getattr(_RUNNING.local, "threads", {})}
        if not sys.stderr.isatty():
            self.values["TQDM_MININTERVAL"] = "10"   # readable logs under papermill / SLURM: few progress updates

    def manager(self):
        """A jupyter_client kernel manager class whose kernels start in REPO_ROOT with os.environ + these values;
        each one it starts is listed in _RUNNING.kernels until it is shut down (an interrupt stops them all)."""
        from jupyter_client.manager import AsyncKernelManager
        values = self.values

        class KernelManager(AsyncKernelManager):
            async def start_kernel(self, **kw):
                if _RUNNING.stopping:
                    raise RuntimeError("the runner is stopping: no new kernel")
                kw.update(env={**os.environ, **kw.get("env", {}), **values}, cwd=str(REPO_ROOT))
                _RUNNING.kernels.add(self)
                await super().start_kernel(**kw)

            async def shutdown_kernel(self, *args, **kw):
                try:
                    await super().shutdown_kernel(*args, **kw)
                finally:
                    _RUNNING.kernels.discard(self)
        return KernelManager


class _Running:
    """What the notebooks running now share: their kernel managers (stopped on an interrupt); per runner thread,
    its log prefix and its kernel's thread variables (--jobs N)."""

    def __init__(self):
        import threading
        self.kernels: set = set()
        self.stopping = False
        self.local = threading.local()

    def stop_kernels(self) -> None:
        """Kill every kernel still running (their notebooks then fail as interrupted in their own threads)."""
        for km in list(self.kernels):
            process = getattr(getattr(km, "provisioner", None), "process", None)
            if process is not None and process.poll() is None:
                process.kill()


_RUNNING = _Running()


def _reads_log(step: Step) -> Path:
    """The temporary file a notebook's kernel lists the run-folder files it reads in (lib.artifacts)."""
    return step.output.with_name(f".{step.output.stem}.reads.tmp.log")


def _papermill(step: Step, target: Path, log_output: bool) -> None:
    import papermill
    from lib.pipeline.progress import KERNEL_SETUP, LineWriter
    # cell stdout/stderr streamed to our stdout/stderr (one line per update off a terminal); tqdm.auto in the
    # kernel becomes a text bar on the log (lib/pipeline/progress.py), so reports hold no blank progress widgets
    prefix = getattr(_RUNNING.local, "prefix", "")
    streams = {"stdout_file": LineWriter(sys.stdout, prefix), "stderr_file": LineWriter(sys.stderr, prefix)} \
        if log_output else {}
    papermill.execute_notebook(str(step.path), str(target), parameters=step.params, log_output=False,
                               progress_bar=False, kernel_name="python3",
                               kernel_manager_class=_KernelEnv(step, _reads_log(step)).manager(),
                               extra_arguments=[f"--IPKernelApp.exec_lines={KERNEL_SETUP}"], **streams)


def execute(step: Step, log_output: bool = True, earlier: list[str] = ()) -> float:
    """Run one notebook into a temporary copy renamed into place; raise RuntimeError naming the failing cell, or
    the file that could not be written. The manifest says "failed" for any failure, never "running"."""
    from papermill.exceptions import PapermillExecutionError
    t0 = time.perf_counter()
    code, git = current_code(step), provenance.git_state()        # what runs: taken before the kernel starts
    record(step, status="running", started=time.strftime("%Y-%m-%dT%H:%M:%S"), params_hash=params_hash(step.params))
    tmp = step.output.with_name(f".{step.output.name}.tmp.ipynb")
    log = _reads_log(step)                        # removed by the next run if we are killed
    failure = None
    try:
        log.write_text("")
        _papermill(step, tmp, log_output)
        os.replace(tmp, step.output)
        render_html(step.output, step.html)
        reads = {Path(line) for line in Path(log).read_text().splitlines() if line}
        record_success(step, reads, list(earlier), status="ok", seconds=round(time.perf_counter() - t0, 2),
                       params_hash=params_hash(step.params), finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
                       **({"code": code} if code is not None else {}), git=git)
    except PapermillExecutionError as e:
        if tmp.exists():
            os.replace(tmp, step.output)          # the executed copy shows the traceback
        failure = (f"{e.ename}: {e.evalue}", e.exec_count,
                   f"notebook {step.name} failed in cell {e.exec_count}: {e.ename}: {e.evalue}\n"
                   f"  executed copy with the traceback: {step.output}")
    except OSError as e:
        from lib.storage.store import disk_error
        message = disk_error(e, e.filename or tmp) if e.errno else str(e)
        failure = (message, None, f"notebook {step.name}: {message}")
    except BaseException as e:                    # Ctrl-C, SIGTERM from scancel, anything unexpected
        failure = (f"interrupted ({type(e).__name__})", None, None)
        raise
    finally:
        Path(log).unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
        if failure:
            _record_failure(step, failure[0], failure[1], time.perf_counter() - t0)
    if failure:
        raise RuntimeError(failure[2])
    return time.perf_counter() - t0


def _record_failure(step: Step, error: str, cell, seconds: float) -> None:
    try:
        record(step, status="failed", seconds=round(seconds, 2), error=error, cell=cell,
               params_hash=params_hash(step.params))
    except OSError as e:                           # a full disk: the next run marks the entry as failed
        print(f"[run] could not record the failure of {step.name} in manifest.json ({e.strerror})", file=sys.stderr)
    if error.startswith("could not write") or error.startswith("nbconvert"):
        step.html.unlink(missing_ok=True)


def _settle_interrupted(out_dir: Path, stem: str | None = None) -> None:
    """Entries left "running" by a runner that died: mark them failed. We hold the run lock (or, with `stem`, the
    lock of that one notebook or shard, so only its entry can be settled)."""
    manifest = read_manifest(out_dir)
    stuck = [k for k, v in manifest.get("notebooks", {}).items()
             if v.get("status") == "running" and stem in (None, k)]
    if not stuck:
        return
    from lib.storage.store import locked, save_json
    with locked(out_dir / "manifest.json"):
        manifest = read_manifest(out_dir)
        for name in stuck:
            manifest["notebooks"][name].update(status="failed", error="interrupted: the runner stopped while it ran")
        save_json(out_dir / "manifest.json", manifest)
    print(f"[run] {stuck}: marked failed (interrupted by an earlier runner that stopped)", flush=True)


def _own_files(step: Step) -> list[str]:
    """Globs of the file names one notebook writes: its executed copy, its read log and its artifacts. (A shard's
    artifact globs also match its sibling shards' files; those are written only by their own array tasks, which
    hold their own locks, so their temporary files are left to the whole run's clean-up.)"""
    if _shard_of(step) is not None:
        return [step.output.stem]
    return [step.output.stem] + artifacts.output_globs(step.name)


def _lock_scope(steps: list[Step]) -> str | None:
    """Single-notebook runs (`--only NB`, a shard of NB) share the run folder, each holding its own lock: the SLURM
    graph runs notebooks that do not read each other's files at once (06 and 07 beside 02). A run of several
    notebooks holds the folder alone."""
    if len(steps) == 1:
        return steps[0].output.stem
    return None


def run_pipeline(params_path: str, only: list[str] | None = None, overrides: list[str] = (), force: bool = False,
                 log_output: bool = True, jobs: int = 1) -> Path:
    """Run the pipeline of a params file (or `only` some of its notebooks), up to `jobs` notebooks at once, then
    write claims.json and the report index; -> the run folder."""
    from lib.storage.store import clean_temp_files, run_lock
    run, shared, sections = load_params(params_path, overrides)
    steps = build_steps(run, shared, sections, only)
    out_dir = ensure_writable_dir(steps[0].params["out_dir"]) if steps else OUTPUT_ROOT / run
    scope = _lock_scope(steps)
    with run_lock(out_dir, f"python -m lib.run --params {params_path}", scope) as stale_owner:
        if stale_owner:
            print(f"[run] took over the lock of a runner that is gone: {stale_owner}", flush=True)
        for p in clean_temp_files(out_dir, None if scope is None else _own_files(steps[0])):
            print(f"[run] removed {p.relative_to(out_dir)} (left by an interrupted write)", flush=True)
        _settle_interrupted(out_dir, scope)
        update_manifest(out_dir, "run", {"name": run, "params_file": str(params_path), "shared": shared,
                                         "overrides": list(overrides), "git": provenance.git_state()})
        prepare_bundled_models(steps)
        _run_steps(steps, sorted(sections), force, log_output, jobs)
        try:
            from lib.claims import write_claims
            from lib.report import write_index
            print(f"[run] claims: {write_claims(out_dir, stale=stale_notebooks(out_dir))}", flush=True)
            print(f"[run] report: {write_index(out_dir)}", flush=True)
        except ImportError:
            pass
    return out_dir


def prepare_bundled_models(steps: list[Step]) -> None:
    """Convert every bundled: model the steps load that is not converted yet (python -m lib.models prepare), before
    any notebook is fingerprinted: the fingerprint holds the converted weights' checksum, which a conversion inside
    notebook 01 would change mid-run (and every claim would read "not tested: weights changed")."""
    from lib.model.checksums import cache_dir
    specs = sorted({str(s.params.get("model")) for s in steps if str(s.params.get("model")).startswith("bundled:")})
    for spec in specs:
        if not (cache_dir() / f"{spec.split(':', 1)[1]}-float32" / "config.json").exists():
            print(f"[run] {spec} is not converted yet: python -m lib.models prepare {spec}", flush=True)
            subprocess.run([sys.executable, "-m", "lib.models", "prepare", spec], check=True)


def default_jobs() -> int:
    """How many notebooks run at once when --jobs is not given: $HEADINFO_JOBS, else min(2, the CPUs this process
    may use); 1 on one CPU."""
    if os.environ.get("HEADINFO_JOBS"):
        return max(1, int(os.environ["HEADINFO_JOBS"]))
    return max(1, min(2, len(os.sched_getaffinity(0))))


def kernel_threads(jobs: int) -> dict[str, str]:
    """Thread variables for a kernel started while `jobs` notebooks run (or are ready to) at once: the CPUs split
    between them, unless OMP_NUM_THREADS is set already (tests, SLURM jobs) or it runs alone."""
    if jobs <= 1 or os.environ.get("OMP_NUM_THREADS"):
        return {}
    share = str(max(1, len(os.sched_getaffinity(0)) // jobs))
    return {"OMP_NUM_THREADS": share, "MKL_NUM_THREADS": share}


def _run_one(step: Step, pipeline: list[str], force: bool, log_output: bool) -> None:
    """Run `step` unless it is up to date (decided now, after the notebooks it reads from have run)."""
    earlier = upstream_of(step.name, pipeline)
    reasons = ["--force"] if force else stale_reasons(step, read_manifest(step.output.parent), earlier)
    if not reasons:
        print(f"[run] {step.name}: up to date (same parameters, inputs and outputs), skipped; --force reruns it",
              flush=True)
        return
    shown = step.output.relative_to(REPO_ROOT) if step.output.is_relative_to(REPO_ROOT) else step.output
    print(f"[run] {step.name} -> {shown} (runs because {'; '.join(reasons)})", flush=True)
    seconds = execute(step, log_output=log_output, earlier=earlier)
    print(f"[run] {step.name}: done in {seconds:.1f} s", flush=True)


def _run_steps(steps: list[Step], pipeline: list[str], force: bool, log_output: bool, jobs: int = 1) -> None:
    """Run the steps in order, or up to `jobs` at once, each after the steps it reads from (run_concurrently)."""
    if jobs <= 1 or len(steps) <= 1:
        for step in steps:
            _run_one(step, pipeline, force, log_output)
        return
    run_concurrently(steps, pipeline, jobs, lambda step: _run_one(step, pipeline, force, log_output))


def _waits_for(steps: list[Step], pipeline: list[str]) -> dict[str, set[str]]:
    """step stem -> the stems of the steps it reads from, directly or through others (upstream_of)."""
    return {s.output.stem: {o.output.stem for o in steps if o.name in upstream_of(s.name, pipeline)} for s in steps}


def _critical_first(steps: list[Step], waits: dict[str, set[str]]) -> list[Step]:
    """The steps, longest chain first: a step's chain is its own seconds (as last recorded in the manifest; 1 s when
    unknown) plus the longest chain of the steps waiting on it. Among ready steps the runner starts the first."""
    entries = read_manifest(steps[0].output.parent).get("notebooks", {}) if steps else {}
    chain: dict[str, float] = {}
    for s in sorted(steps, key=lambda s: -len(waits[s.output.stem])):      # steps waiting on others first
        after = [chain[t] for t, w in waits.items() if s.output.stem in w]
        chain[s.output.stem] = float(entries.get(s.output.stem, {}).get("seconds") or 1.0) + max(after, default=0.0)
    return sorted(steps, key=lambda s: -chain[s.output.stem])


def run_concurrently(steps: list[Step], pipeline: list[str], jobs: int, run_one) -> None:
    """Call run_one(step) in up to `jobs` threads at once, each step after every step it reads from has finished
    (its kernel gets the CPUs' share of the notebooks running or ready when it starts: kernel_threads).
    A failure: no further step starts, those running finish, then the first error is raised. An interrupt
    (Ctrl-C, SIGTERM) in the main thread kills the running kernels (their notebooks are recorded failed) and
    is re-raised once their threads have finished."""
    import threading
    waits, done, running, errors = _waits_for(steps, pipeline), set(), {}, []
    pending, changed = _critical_first(steps, waits), threading.Condition()

    def work(step, busy):
        _RUNNING.local.prefix, _RUNNING.local.threads = f"[{step.output.stem}] ", kernel_threads(busy)
        try:
            run_one(step)
        except BaseException as e:               # noqa: B036 - handed to the main thread
            errors.append(e)
        with changed:
            done.add(step.output.stem)
            running.pop(step.output.stem)
            changed.notify_all()
    try:
        with changed:
            while pending or running:
                ready = [] if errors else [s for s in pending if waits[s.output.stem] <= done]
                busy = min(jobs, len(running) + len(ready))          # notebooks sharing the CPUs from now on
                for step in ready[:jobs - len(running)]:
                    pending.remove(step)
                    running[step.output.stem] = threading.Thread(target=work, args=(step, busy), daemon=True)
                    running[step.output.stem].start()
                if not running:
                    break
                changed.wait(timeout=1.0)
    except BaseException:
        _RUNNING.stopping = True
        deadline = time.time() + 60
        while any(t.is_alive() for t in list(running.values())) and time.time() < deadline:
            _RUNNING.stop_kernels()               # again: a kernel may have been starting the first time
            for thread in list(running.values()):
                thread.join(timeout=0.5)
        raise
    finally:
        _RUNNING.stopping = False
    if errors:
        raise errors[0]


def explain(params_path: str, only=None, overrides=()) -> list[str]:
    """--explain: one line per notebook of the run saying whether it would run and why; nothing runs or is written.
    A notebook after one that would run would run too ("NN would run first")."""
    run, shared, sections = load_params(params_path, overrides)
    steps = build_steps(run, shared, sections, only)
    manifest = read_manifest(steps[0].output.parent) if steps else {}
    would, lines = set(), []
    for step in steps:
        earlier = upstream_of(step.name, sorted(sections))
        reasons = stale_reasons(step, manifest, earlier)
        reasons = reasons or [f"{nb} would run first" for nb in earlier if nb in would]
        if reasons:
            would.add(step.output.stem)
        lines.append(f"{step.output.stem}: " + (f"would run ({_kind(reasons[0])}): {'; '.join(reasons)}" if reasons
                                                 else "up to date"))
    return lines


_KINDS = (("has not run", "never ran"), ("its last run", "failed last time"), ("parameters", "params changed"),
          ("code", "code changed"), (" -> ", "code changed"), ("weights", "code changed"), ("input", "input changed"),
          ("ran since", "input changed"), ("would run first", "input changed"), ("output", "output changed"),
          ("executed copy", "output changed"), ("provenance", "never ran"))


def _kind(reason: str) -> str:
    """The --explain category of a stale reason."""
    return next((kind for word, kind in _KINDS if word in reason), "changed")


def uncached_models(steps: list[Step]) -> list[str]:
    """Hugging Face ids (and revisions) of the run that are not in the local HF cache, as the download commands to
    run on a login node; local folders, bundled: and random: specs need nothing."""
    from huggingface_hub import try_to_load_from_cache
    wanted = set()
    for step in steps:
        spec = str(step.params.get("model") or "")
        if re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and not (REPO_ROOT / spec).is_dir() and not Path(spec).is_dir():
            wanted.add((spec, None))
            wanted.update((spec, rev) for rev in step.params.get("revisions") or [])
    missing = []
    for spec, rev in sorted(wanted, key=str):
        if not isinstance(try_to_load_from_cache(spec, "config.json", revision=rev), str):
            missing.append(f"huggingface-cli download {spec}{f' --revision {rev}' if rev else ''}")
    return missing


def check_run(params_path: str, only=None, overrides=(), require_cache: bool = True) -> list[Step]:
    """--check: parameters (types and values) and, for Hugging Face ids, the offline cache of the compute nodes
    (require_cache=False: a missing model is reported by cache_problem, not raised)."""
    run, shared, sections = load_params(params_path, overrides)
    steps = build_steps(run, shared, sections, only)
    problem = cache_problem(steps)
    if problem and require_cache:
        raise ParamsError(problem)
    return steps


def cache_problem(steps: list[Step]) -> str:
    """Why the compute nodes cannot load the run's models offline, with the command to fix it ("" when they can)."""
    missing = uncached_models(steps)
    if not missing:
        return ""
    return (f"model weights not in the local Hugging Face cache (compute nodes run offline); on a login "
            f"node run: {' && '.join(missing)}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", required=True, help="params/<run>.yaml")
    parser.add_argument("--only", nargs="+", default=None, help="notebook names to run (default: the whole pipeline)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a shared key, or NN_notebook.key for one notebook (repeatable)")
    parser.add_argument("--force", action="store_true", help="rerun notebooks even when their outputs are up to date")
    parser.add_argument("--check", action="store_true", help="validate the params file and exit")
    parser.add_argument("--quiet", action="store_true", help="do not stream cell outputs to the log")
    parser.add_argument("--jobs", "-j", type=int, default=None, metavar="N",
                        help="notebooks run at once, each after those it reads from (default: $HEADINFO_JOBS, else "
                             "min(2, CPUs)); 1 runs them one after another")
    parser.add_argument("--explain", action="store_true",
                        help="print what would run and why, per notebook, and exit (runs nothing)")
    args = parser.parse_args(argv)
    import signal
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))    # scancel / requeue: record "failed", then stop
    signal.signal(signal.SIGINT, _interrupted)
    try:
        if args.explain:
            print("\n".join(explain(args.params, args.only, args.overrides)))
            return 0
        if args.check:
            steps = check_run(args.params, args.only, args.overrides)
            print(f"[run] {args.params}: valid; pipeline {[s.name for s in steps]} -> {steps[0].params['out_dir']}")
            from lib.pipeline.cost import cost_table
            print(cost_table(steps))
            return 0
        with _StderrGate():
            run_pipeline(args.params, args.only, args.overrides, args.force, log_output=not args.quiet,
                         jobs=args.jobs if args.jobs is not None else default_jobs())
    except (ParamsError, ArtifactError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 130 if _INTERRUPTS else 1
    except KeyboardInterrupt:
        return 130
    return 130 if _INTERRUPTS else 0


INTERRUPTED = "interrupted by the user; rerun to resume"
_INTERRUPTS: list[int] = []        # set by the SIGINT handler: main returns 130 whatever the interrupt turned into


_REAL_STDERR: list[int] = []       # the terminal's stderr while a _StderrGate holds fd 2


def _interrupted(*_):
    """Ctrl-C: one line, then stderr goes quiet (the kernel's and its client's shutdown noise: ZMQError
    tracebacks) while the interrupted notebook is recorded "failed" and the kernel is shut down; main returns 130."""
    signal = __import__("signal")
    signal.signal(signal.SIGINT, signal.SIG_IGN)                # a second Ctrl-C does not cut the bookkeeping short
    _INTERRUPTS.append(1)
    sys.stdout.flush()
    os.write(_REAL_STDERR[-1] if _REAL_STDERR else 2, f"{INTERRUPTED}\n".encode())
    if not _REAL_STDERR:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    raise KeyboardInterrupt


class _StderrGate:
    """fd 2 of the runner, and so of the kernels it starts (they inherit it), becomes a pipe forwarded to the real
    stderr by a thread until the user interrupts; then the rest (kernel shutdown tracebacks) is dropped."""

    def __enter__(self):
        import threading
        sys.stderr.flush()
        _REAL_STDERR.append(os.dup(2))
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        self.thread = threading.Thread(target=self._forward, args=(read, _REAL_STDERR[-1]), daemon=True)
        self.thread.start()

    @staticmethod
    def _forward(read: int, real: int) -> None:
        while chunk := os.read(read, 65536):
            if not _INTERRUPTS:
                os.write(real, chunk)
        os.close(read)

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(_REAL_STDERR[-1], 2)           # the pipe stays open only in kernels still shutting down
        self.thread.join(timeout=1.0)          # what we wrote is forwarded before we return
        os.close(_REAL_STDERR.pop())



def stale_notebooks(out_dir) -> dict[str, str]:
    """notebook (manifest stem) -> why its recorded results are not current: its last run failed (or did not
    finish), or the runner would rerun it with its recorded parameters (code, packages, weights, inputs or outputs
    changed, an upstream notebook ran since). Notebooks up to date are left out."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    entries, notebooks = manifest.get("notebooks", {}), pipeline_notebooks()
    pipeline = sorted({stem.split(".shard-")[0] for stem in entries})
    found = {}
    for stem, entry in entries.items():
        name = stem.split(".shard-")[0]
        if name not in notebooks:
            continue
        if entry.get("status") != "ok":
            found[stem] = f"its last run {entry.get('status', 'did not finish')}" + \
                (f" ({entry['error']})" if entry.get("error") else "")
            continue
        step = Step(name, notebooks[name], {**entry.get("params", {}), "out_dir": str(out_dir)},
                    out_dir / f"{stem}.ipynb", out_dir / "html" / f"{stem}.html")
        reasons = stale_reasons(step, manifest, upstream_of(name, pipeline))
        if reasons:
            found[stem] = "stale: " + "; ".join(reasons)
    return dict(sorted(found.items()))


if __name__ == "__main__":
    sys.exit(main())
