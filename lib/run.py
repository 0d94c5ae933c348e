"""The runner: executes the notebook pipeline of one run with papermill.

    python -m lib.run --params params/<run>.yaml [--only 01_extract_activations ...] [--set key=value ...] [--force]

A params file holds shared keys (top level: injected into every notebook that declares them) and one section per
notebook (a top-level key named like the notebook, e.g. `02_phiid:`); the notebooks with a section form the run's
pipeline, in file-name order. The run's name, and so its output folder outputs/<run>/, is the params file's stem.

Before anything runs, every key is checked against the notebook's declared parameters (its `parameters` cell,
read by papermill.inspect_notebook) and against the type of the declared default. Each notebook is executed with
the repository root as working directory into outputs/<run>/NN_name.ipynb and rendered to
outputs/<run>/html/NN_name.html (report view, no code). A notebook whose executed copy exists for identical
parameters is skipped unless --force (or an earlier notebook of the pipeline ran in this invocation).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from lib import REPO_ROOT
from lib.store import ArtifactError, ensure_writable_dir, read_manifest, update_manifest

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
OUTPUT_ROOT = REPO_ROOT / "outputs"
RUNNER_KEYS = {"out_dir"}          # set by the runner, may be overridden with --set out_dir=...


class ParamsError(ValueError):
    """A params file, key or value that the pipeline cannot run with."""


@dataclass
class Step:
    name: str                 # notebook stem, e.g. "02_phiid"
    path: Path
    params: dict              # everything injected into the notebook
    output: Path              # executed notebook
    html: Path


# ----------------------------------------------------------------------------- parameters

def pipeline_notebooks() -> dict[str, Path]:
    """Notebook stem -> path, for every NN_*.ipynb in notebooks/ (00_explore is not part of the pipeline)."""
    return {p.stem: p for p in sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb")) if not p.stem.startswith("00_")}


def declared_parameters(path: Path) -> dict[str, dict]:
    """name -> {"type": inferred type name, "default": default source text} from the `parameters` cell."""
    import papermill
    import logging
    logging.getLogger("papermill").setLevel(logging.ERROR)
    declared = papermill.inspect_notebook(str(path))
    if not declared:
        raise ParamsError(f"{path.name} has no cell tagged 'parameters'")
    missed = sorted(assigned_names(path) - set(declared))
    if missed:
        raise ParamsError(f"{path.name}: papermill cannot parse the parameter line(s) of {missed} (it drops lines "
                          f"whose comment contains '=' or ';'); rewrite those comments")
    return {name: {"type": info["inferred_type_name"], "default": info["default"]} for name, info in declared.items()}


def assigned_names(path: Path) -> set[str]:
    """Names assigned at top level in the notebook's `parameters` cell (parsed with ast, independent of papermill)."""
    import ast
    nb = json.loads(path.read_text())
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ParamsError(f"{path.name} must have exactly one cell tagged 'parameters' (has {len(cells)})")
    tree = ast.parse("".join(cells[0]["source"]))
    names = set()
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def _default_value(source: str):
    try:
        import ast
        return ast.literal_eval(source)
    except (ValueError, SyntaxError):
        return None


def check_type(notebook: str, key: str, value, declared: dict) -> None:
    """Fail when `value` does not fit the declared type (or the type of the declared default)."""
    type_name = (declared.get("type") or "None").replace("typing.", "")
    default = _default_value(declared.get("default", "None"))
    expected = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "dict": dict}.get(type_name)
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


def load_params(params_path: str | os.PathLike, overrides: list[str] = ()) -> tuple[str, dict, dict]:
    """-> (run name, shared keys, {notebook: section}) with --set overrides applied."""
    path = Path(params_path)
    if not path.exists():
        available = sorted(p.name for p in (REPO_ROOT / "params").glob("*.yaml"))
        raise ParamsError(f"params file {str(path)!r} not found; available in params/: {available}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of keys, got {type(raw).__name__}")
    notebooks = pipeline_notebooks()
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
        else:
            shared[key] = value
    return path.stem, shared, sections


def build_steps(run: str, shared: dict, sections: dict, only: list[str] | None = None) -> list[Step]:
    """Validate every key against the notebooks' declared parameters; -> the steps to execute, in order."""
    notebooks = pipeline_notebooks()
    if not sections:
        raise ParamsError(f"run {run!r} has no notebook sections; add one or more of {list(notebooks)}")
    out_dir = Path(shared.pop("out_dir", OUTPUT_ROOT / run))
    declared = {name: declared_parameters(notebooks[name]) for name in sections}
    for key in shared:
        if not any(key in d for d in declared.values()):
            every = sorted({k for d in declared.values() for k in d} - RUNNER_KEYS)
            raise ParamsError(f"unknown shared key {key!r}: no notebook of this run declares it; allowed: {every}")
    for name, section in sections.items():
        for key, value in section.items():
            if key not in declared[name] or key in RUNNER_KEYS:
                allowed = sorted(set(declared[name]) - RUNNER_KEYS)
                raise ParamsError(f"unknown key {key!r} in section {name!r} (notebooks/{name}.ipynb); allowed: {allowed}")
            check_type(name, key, value, declared[name][key])
        for key, value in shared.items():
            if key in declared[name]:
                check_type(name, key, value, declared[name][key])
    if only:
        unknown = [o for o in only if o not in sections]
        if unknown:
            raise ParamsError(f"--only {unknown}: not in this run's pipeline {list(sections)}")
    steps = []
    for name in sorted(sections):
        if only and name not in only:
            continue
        params = {k: v for k, v in shared.items() if k in declared[name]}
        params.update(sections[name])
        params["out_dir"] = str(out_dir)
        suffix = _shard_suffix(params.get("shard"))
        steps.append(Step(name, notebooks[name], params, out_dir / f"{name}{suffix}.ipynb",
                          out_dir / "html" / f"{name}{suffix}.html"))
    return steps


def _shard_suffix(shard) -> str:
    if not shard:
        return ""
    i, n = str(shard).split("/")
    return f".shard-{i}-of-{n}"


def params_hash(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- execution

def is_up_to_date(step: Step) -> bool:
    entry = read_manifest(step.output.parent).get("notebooks", {}).get(step.output.stem, {})
    return step.output.exists() and entry.get("status") == "ok" and entry.get("params_hash") == params_hash(step.params)


def record(step: Step, **entry) -> None:
    """Runner bookkeeping in manifest.json under notebooks/<output stem>."""
    from lib.store import locked, save_json
    path = step.output.parent / "manifest.json"
    with locked(path):
        manifest = read_manifest(step.output.parent)
        manifest.setdefault("notebooks", {})[step.output.stem] = {"params": step.params, **entry}
        save_json(path, manifest)


def render_html(executed: Path, html: Path) -> None:
    html.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "html", "--no-input", "--log-level=ERROR",
                    "--CoalesceStreamsPreprocessor.enabled=True",
                    "--output-dir", str(html.parent), "--output", html.stem, str(executed)],
                   check=True, cwd=REPO_ROOT, capture_output=True)


def execute(step: Step, log_output: bool = True) -> float:
    """Run one notebook; raise RuntimeError naming the failing cell."""
    import papermill
    from papermill.exceptions import PapermillExecutionError
    t0 = time.perf_counter()
    record(step, status="running", started=time.strftime("%Y-%m-%dT%H:%M:%S"), params_hash=params_hash(step.params))
    from lib.progress import KERNEL_SETUP, LineWriter
    env_backup = os.environ.get("TQDM_MININTERVAL")
    if not sys.stderr.isatty():
        os.environ["TQDM_MININTERVAL"] = "10"     # readable logs under papermill / SLURM: few progress updates
    # cell stdout/stderr streamed to our stdout/stderr (one line per update off a terminal); tqdm.auto in the
    # kernel becomes a text bar on the log (lib/progress.py), so reports hold no blank progress widgets
    streams = {"stdout_file": LineWriter(sys.stdout), "stderr_file": LineWriter(sys.stderr)} if log_output else {}
    try:
        papermill.execute_notebook(str(step.path), str(step.output), parameters=step.params, cwd=str(REPO_ROOT),
                                   log_output=False, progress_bar=False, kernel_name="python3",
                                   extra_arguments=[f"--IPKernelApp.exec_lines={KERNEL_SETUP}"], **streams)
    except PapermillExecutionError as e:
        seconds = time.perf_counter() - t0
        record(step, status="failed", seconds=seconds, error=f"{e.ename}: {e.evalue}", cell=e.exec_count,
               params_hash=params_hash(step.params))
        raise RuntimeError(f"notebook {step.name} failed in cell {e.exec_count}: {e.ename}: {e.evalue}\n"
                           f"  executed copy with the traceback: {step.output}") from None
    finally:
        if env_backup is None:
            os.environ.pop("TQDM_MININTERVAL", None)
        else:
            os.environ["TQDM_MININTERVAL"] = env_backup
    render_html(step.output, step.html)
    seconds = time.perf_counter() - t0
    record(step, status="ok", seconds=round(seconds, 2), params_hash=params_hash(step.params),
           finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    return seconds


def run_pipeline(params_path: str, only: list[str] | None = None, overrides: list[str] = (), force: bool = False,
                 log_output: bool = True) -> Path:
    run, shared, sections = load_params(params_path, overrides)
    steps = build_steps(run, shared, sections, only)
    out_dir = ensure_writable_dir(steps[0].params["out_dir"]) if steps else OUTPUT_ROOT / run
    update_manifest(out_dir, "run", {"name": run, "params_file": str(params_path), "shared": shared,
                                     "overrides": list(overrides)})
    rerun_rest = force
    for step in steps:
        if not rerun_rest and is_up_to_date(step):
            print(f"[run] {step.name}: up to date (same parameters), skipped; --force reruns it", flush=True)
            continue
        print(f"[run] {step.name} -> {step.output.relative_to(REPO_ROOT) if step.output.is_relative_to(REPO_ROOT) else step.output}", flush=True)
        seconds = execute(step, log_output=log_output)
        print(f"[run] {step.name}: done in {seconds:.1f} s", flush=True)
        rerun_rest = True
    try:
        from lib.report import write_index
        print(f"[run] report: {write_index(out_dir)}", flush=True)
    except ImportError:
        pass
    return out_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", required=True, help="params/<run>.yaml")
    parser.add_argument("--only", nargs="+", default=None, help="notebook names to run (default: the whole pipeline)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a shared key, or NN_notebook.key for one notebook (repeatable)")
    parser.add_argument("--force", action="store_true", help="rerun notebooks even when their outputs are up to date")
    parser.add_argument("--check", action="store_true", help="validate the params file and exit")
    parser.add_argument("--quiet", action="store_true", help="do not stream cell outputs to the log")
    args = parser.parse_args(argv)
    try:
        if args.check:
            run, shared, sections = load_params(args.params, args.overrides)
            steps = build_steps(run, shared, sections, args.only)
            print(f"[run] {args.params}: valid; pipeline {[s.name for s in steps]} -> {steps[0].params['out_dir']}")
            return 0
        run_pipeline(args.params, args.only, args.overrides, args.force, log_output=not args.quiet)
    except (ParamsError, ArtifactError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
