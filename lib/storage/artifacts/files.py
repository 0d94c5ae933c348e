"""Loading and saving a registered file (atomic writes, checked keys), and the write guard naming its
producer."""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from lib.storage import store
from lib.storage.store import ArtifactError
from lib.storage.artifacts.folders import _missing, _unreadable, check_keys
from lib.storage.artifacts.lineage import note_read
from lib.storage.artifacts.registry import Artifact, artifact, path

__all__ = ["load_file", "load", "save_file", "save", "append"]


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
