"""The runner: a params file's pipeline run under the run folder's lock (bundled models converted first, then the
steps, then claims.json and the report index); --explain (what would run and why) and --check (parameters and
the offline model cache)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from lib import REPO_ROOT
from lib.pipeline import provenance
from lib.pipeline.bookkeeping import settle_interrupted, shard_of, stale_notebooks, stale_reasons
from lib.pipeline.notebook_params import ParamsError
from lib.pipeline.scheduler import run_steps
from lib.pipeline.steps import OUTPUT_ROOT, Step, build_steps, load_params, upstream_of
from lib.storage import artifacts
from lib.storage.store import ensure_writable_dir, read_manifest, update_manifest

__all__ = ["run_pipeline", "explain", "check_run", "cache_problem", "prepare_bundled_models", "uncached_models"]


def _own_files(step: Step) -> list[str]:
    """Globs of the file names one notebook writes: its executed copy, its read log and its artifacts. (A shard's
    artifact globs also match its sibling shards' files; those are written only by their own array tasks, which
    hold their own locks, so their temporary files are left to the whole run's clean-up.)"""
    if shard_of(step) is not None:
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
        settle_interrupted(out_dir, scope)
        update_manifest(out_dir, "run", {"name": run, "params_file": str(params_path), "shared": shared,
                                         "overrides": list(overrides), "git": provenance.git_state()})
        prepare_bundled_models(steps)
        run_steps(steps, sorted(sections), force, log_output, jobs)
        try:
            from lib.pipeline.claims import write_claims
            from lib.pipeline.report import write_index
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
