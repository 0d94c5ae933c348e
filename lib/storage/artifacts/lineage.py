"""Provenance between artifacts: what each file of a run folder was computed from, and whether it is
stale."""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from lib.storage import store
from lib.storage.store import ArtifactError, check_same_heads, run_folder
from lib.storage.artifacts.folders import identify
from lib.storage.artifacts.readme import producer_outputs
from lib.storage.artifacts.registry import ARTIFACTS, artifact

__all__ = ["scalar", "check_same_run", "READS_ENV", "NOTEBOOK_ENV", "MODEL_ENV", "note_read", "fingerprint",
           "output_globs", "output_files", "relative", "is_tagged", "check_input"]


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
MODEL_ENV = "HEADINFO_MODEL"          # that notebook's model key (see lib.pipeline.bookkeeping.model_key)


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
    out_dir, found = run_folder(out_dir), set()
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
    return Path(p).resolve().relative_to(run_folder(out_dir).resolve()).as_posix()


def _records(out_dir) -> dict:
    from lib.storage.store import read_manifest
    return read_manifest(out_dir).get("artifacts", {})


def is_tagged(rel: str) -> bool:
    """Baseline files (random_init, rev-...) derive from other weights by design."""
    return "__" in Path(rel).name.split("__shard-")[0]


def check_input(out_dir, p, notebook: str = "", model: str = "", records: dict | None = None) -> None:
    """Refuse a run-folder file whose provenance does not hold: modified or replaced after its producer wrote it,
    computed from a file that has changed since (mixed inputs), or derived from other weights than `model`."""
    out_dir = run_folder(out_dir)
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
