"""PhiID artifacts: phiid_<mode>[__<tag>].npz next to activations[__<tag>].npz: saving, loading and the
checks that a file matches its activations."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from lib.estimators.phiid.atoms import ATOM_NAMES, DegeneratePairWarning, MODES, REDUNDANCIES
from lib.estimators.phiid.engine import phiid_all_pairs
from lib.estimators.phiid.reference import _check_choice
from lib.storage.store import run_folder
from lib.storage.notebooks import NB

__all__ = ["phiid_path", "save_phiid", "load_phiid", "run_phiid_for_run"]


# ----------------------------------------------------------------------------------------------------------------
# artifacts: phiid_<mode>[__<tag>].npz next to activations[__<tag>].npz

def activations_files(out_dir, tags=None):
    """-> list of (tag, path) for the activation files of a run folder (lib.storage.artifacts "activations"). Tag "" is
    the run's model; tag "random_init" the re-initialised copy, "rev-<revision>" a checkpoint. tags=None: every
    file present (in lib.storage.artifacts.tag_sort_key order); else the listed tags ("" or None for the main file), each
    of which must exist."""
    from lib.storage import artifacts
    names = artifacts.shown_name(artifacts.artifact("activations"))
    if tags is None:
        found = [(tag, artifacts.path("activations", out_dir, tag)) for tag in artifacts.tags("activations", out_dir)]
        if not found:
            raise FileNotFoundError(f"no {names} in {str(out_dir)!r}: run notebook {NB.EXTRACT} with "
                                    f"out_dir={str(out_dir)!r} first")
        return found
    tags = [tags] if isinstance(tags, str) else list(tags)
    found = [(tag or "", artifacts.path("activations", out_dir, tag or "")) for tag in tags]
    missing = [str(path) for _, path in found if not path.exists()]
    if missing:
        raise FileNotFoundError(f"activation file(s) {missing} not found for tags {tags}; available: "
                                f"{[t for t, _ in activations_files(out_dir)]} (tag '' is the run's own model)")
    return found


def phiid_path(out_dir, mode, tag=""):
    """The PhiID file of one mode: for the run's model (tag "") or a baseline tag (lib.storage.artifacts "phiid")."""
    from lib.storage import artifacts
    return artifacts.path("phiid", out_dir, tag, mode=mode)


def save_phiid(path, result, head_layer, head_index, **extra):
    """Write a PhiIDResult atomically (lib.storage.artifacts "phiid", keys checked before writing): one [heads, heads]
    array per atom name, atom_names, head_layer, head_index [heads], degenerate, n_valid [heads, heads], seconds,
    tau, redundancy, mode, backend, plus any extra arrays (run_phiid_for_run adds n_prompts, n_steps,
    activations_file and model)."""
    from lib.storage import artifacts
    heads = result.degenerate.shape[0]
    if len(head_layer) != heads or len(head_index) != heads:
        raise ValueError(f"head_layer/head_index have {len(head_layer)}/{len(head_index)} entries but the result "
                         f"has {heads} heads: pass the head map of the activations the result was computed from")
    return artifacts.save_file("phiid", path, dict(
        **result.atoms, atom_names=np.array(list(result.atoms)), head_layer=np.asarray(head_layer, np.int64),
        head_index=np.asarray(head_index, np.int64), degenerate=result.degenerate, n_valid=result.n_valid,
        seconds=np.float64(result.seconds), tau=np.int64(result.tau), redundancy=np.str_(result.redundancy),
        mode=np.str_(result.mode), backend=np.str_(result.backend), **extra))


def _missing_mode(out_dir, path, mode, needed_by):
    from lib.storage import artifacts
    who = f"{needed_by} needs" if needed_by else "this analysis needs"
    spec = artifacts.artifact("phiid")
    return artifacts.ArtifactError(
        f"{who} {path.name} in {str(run_folder(out_dir))!r}, which does not exist. Notebook {spec.producer} writes "
        f"{artifacts.shown_name(spec)} for every mode in its `modes` parameter: add {mode!r} to `modes` (params "
        f"YAML, section of {spec.producer}) and rerun it (python -m lib.run --params <run>.yaml --only "
        f"{spec.producer}), or drop the variants that need it")


def load_phiid(source, mode="per_prompt", tag="", activations=None, atoms=None, needed_by=""):
    """Read a PhiID file (written by save_phiid) -> dict: atom name -> [heads, heads], atom_names (list of str),
    head_layer, head_index [heads], degenerate [heads, heads] bool, n_valid, the scalars seconds, tau,
    redundancy, mode, backend (and n_prompts, n_steps, activations_file, model when recorded) as plain Python
    values, and path.

    source: a run folder (mode and tag choose the file; a missing mode names notebook 02's `modes` parameter and
    `needed_by`) or the path of the file itself. atoms: those that must be present (default: all 16).
    activations: a loaded activations dict; the file must come from the same run (lib.storage.artifacts.check_same_run)."""
    from lib.storage import artifacts
    if Path(source).suffix == ".npz":
        path = Path(source)
    else:
        _check_choice(mode, MODES, "PhiID mode")
        path = phiid_path(source, mode, tag)
        if not path.exists():
            raise _missing_mode(source, path, mode, needed_by)
    atoms = ATOM_NAMES if atoms is None else tuple(atoms)
    data = artifacts.load_file("phiid", path, require=[*atoms, "atom_names", "head_layer", "head_index", "degenerate"])
    data["atom_names"] = [str(a) for a in data["atom_names"]]
    data["degenerate"] = data["degenerate"].astype(bool)
    for key in ("seconds", "tau", "redundancy", "mode", "backend", "n_prompts", "n_steps", "activations_file", "model"):
        if key in data:
            data[key] = data[key].item()
    data["path"] = path
    if activations is not None:
        artifacts.check_same_run(activations, data)
    return data


def _mean_defined(values):
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def run_phiid_for_run(out_dir, modes=MODES, tau=1, redundancy="MMI", backend="numpy", tags=None):
    """Notebook 02: PhiID for every activations file of a run folder (or the given tags) and every mode.
    Writes phiid_<mode>[__<tag>].npz (see save_phiid) and a manifest entry; returns a pandas DataFrame with one
    row per (file, mode): tag ("" = activations.npz), mode, heads, prompts, steps, seconds, undefined and
    partially defined pairs (unordered), mean sts and rtr over defined ordered pairs (nats), output file."""
    import pandas as pd
    from lib.storage import artifacts, store
    modes = [modes] if isinstance(modes, str) else list(modes)
    for mode in modes:
        _check_choice(mode, MODES, "mode")
    _check_choice(redundancy, REDUNDANCIES, "redundancy")
    rows = []
    for tag, path in activations_files(out_dir, tags):
        run = artifacts.load_file("activations", path, require=["activations", "head_layer", "head_index"])
        X = run["activations"]
        for mode in modes:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", DegeneratePairWarning)
                result = phiid_all_pairs(X, tau=tau, redundancy=redundancy, mode=mode, backend=backend,
                                         head_names=[f"L{l}H{h}" for l, h in zip(run["head_layer"], run["head_index"])])
            for w in caught:  # re-emit, naming the file
                warnings.warn(f"{path.name}: {w.message}", DegeneratePairWarning, stacklevel=2)
            provenance = {"n_prompts": np.int64(X.shape[0]), "n_steps": np.int64(X.shape[2]),
                          "activations_file": np.str_(path.name)}
            if "model" in run:
                provenance["model"] = run["model"]
            out = save_phiid(phiid_path(out_dir, mode, tag), result, run["head_layer"], run["head_index"],
                             **provenance)
            off_diagonal = ~np.eye(X.shape[1], dtype=bool)
            rows.append({"tag": tag, "activations": path.name, "mode": mode, "redundancy": redundancy, "tau": tau,
                         "backend": backend, "prompts": X.shape[0], "heads": X.shape[1], "steps": X.shape[2],
                         "seconds": round(result.seconds, 3),
                         "undefined_pairs": int((result.degenerate & off_diagonal).sum()) // 2,
                         "partially_defined_pairs": int(((result.n_valid > 0) & (result.n_valid < X.shape[0])
                                                         & off_diagonal).sum()) // 2 if mode == "per_prompt" else 0,
                         "mean_sts": _mean_defined(result["sts"]), "mean_rtr": _mean_defined(result["rtr"]),
                         "file": out.name})
    table = pd.DataFrame(rows)
    store.update_manifest(out_dir, NB.PHIID, {"tau": tau, "redundancy": redundancy, "backend": backend,
                                                "modes": modes, "runs": rows})
    return table
