"""The runner's records in manifest.json and the up-to-date rule: a notebook is skipped when its parameters,
inputs, outputs, code and environment are unchanged since it last succeeded and nothing it reads ran since
(stale_reasons); what each output derives from (record_success); entries left "running" by a runner that died."""
from __future__ import annotations

import uuid
from pathlib import Path

from lib.pipeline import provenance
from lib.pipeline.steps import Step, params_hash, pipeline_notebooks, upstream_of
from lib.storage import artifacts
from lib.storage.store import read_manifest

__all__ = ["model_key", "stale_reasons", "code_reasons", "is_up_to_date", "record", "record_success",
           "stale_notebooks", "current_code", "shard_of", "settle_interrupted"]


# ----------------------------------------------------------------------------- execution

def model_key(params: dict) -> str:
    """The weights a notebook's results derive from: the model spec, plus the seed where it builds the weights."""
    spec = params.get("model")
    if not spec:
        return ""
    seeded = str(spec).startswith(("random:", "synthetic:")) or params.get("random_init")
    seed = f" seed {params.get('seed', 0)}" if seeded else ""
    return f"{spec}{seed}{' re-initialised' if params.get('random_init') else ''}"


def shard_of(step: Step) -> tuple[int, int] | None:
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
        outputs = {artifacts.relative(p, out_dir): p for p in artifacts.output_files(step.name, out_dir, shard_of(step))}
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


def settle_interrupted(out_dir: Path, stem: str | None = None) -> None:
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
