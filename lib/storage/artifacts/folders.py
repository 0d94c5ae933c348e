"""What a run folder holds: the tags and shards present, and the key and shape checks of a file."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from lib.storage.store import ArtifactError, run_folder
from lib.storage.artifacts.registry import ARTIFACTS, Artifact, Key, RANDOM_INIT, _FIELD, artifact, sharded

__all__ = ["revision_tag", "tag_sort_key", "tags", "identify", "parts_dir", "shards"]


# ----------------------------------------------------------------------------------------------------------------
# tags and shards present in a run folder

def revision_tag(revision: str) -> str:
    """The tag of a training checkpoint: "rev-<revision>" (e.g. rev-step1000)."""
    return f"rev-{revision}"


def tag_sort_key(tag: str):
    """"" (the run's model) first, then random_init, then checkpoints in training order (the last number in the
    revision, e.g. rev-step20 before rev-step1000), then anything else by name."""
    if tag == "":
        return (-1, 0, tag)
    if tag == RANDOM_INIT:
        return (0, 0, tag)
    if tag.startswith(revision_tag("")):
        nums = re.findall(r"\d+", tag)
        return (1, int(nums[-1]) if nums else 0, tag)
    return (2, 0, tag)


def tags(name: str, out_dir, **fields: Any) -> list[str]:
    """Tags present in out_dir for this artifact, in tag_sort_key order ("" = the run's model, when present)."""
    a = artifact(name)
    main = a.path(out_dir, "", **fields)
    prefix, suffix = main.name.rsplit(".", 1)[0] + "__", "." + a.format
    found = [p.name[len(prefix):-len(suffix)] for p in main.parent.glob(f"{prefix}*{suffix}")]
    return sorted(([""] if main.exists() else []) + found, key=tag_sort_key)


def _pattern_regex(pattern: str) -> re.Pattern:
    """A file name pattern as a regex: {tag} -> optional "__<tag>", {i} / {n} -> digits, other fields -> a name."""
    parts, last = [], 0
    for m in _FIELD.finditer(pattern):
        parts.append(re.escape(pattern[last:m.start()]))
        field_name = m.group(1)
        parts.append(r"(?:__(?P<tag>[^/]+))?" if field_name == "tag" else
                     rf"(?P<{field_name}>\d+)" if field_name in ("i", "n") else rf"(?P<{field_name}>[^/]+?)")
        last = m.end()
    parts.append(re.escape(pattern[last:]))
    return re.compile("".join(parts) + r"\Z")


def _shard_file_pattern(a: Artifact) -> str:
    if a.shard_pattern:
        return f"{a.shard_dir}/{a.shard_pattern}"
    stem, ext = a.pattern.rsplit(".", 1)
    return f"{a.shard_dir}/{stem}__shard-{{i}}-of-{{n}}.{ext}"


def identify(relative_path) -> tuple[Artifact, dict] | None:
    """Which registered artifact a file of a run folder is (path relative to the folder) -> (artifact, its fields:
    tag, mode, shard (i, n), ...), or None for a file no artifact declares."""
    rel = Path(relative_path).as_posix()
    for a in ARTIFACTS.values():
        for pattern in [a.pattern] + ([_shard_file_pattern(a)] if a.shard_dir else []):
            m = _pattern_regex(pattern).match(rel)
            if m:
                found = {k: v or "" for k, v in m.groupdict().items()}
                if "i" in found:
                    found["shard"] = (int(found.pop("i")), int(found.pop("n")))
                return a, found
    return None


def parts_dir(name: str, out_dir, shard: tuple[int, int] | None = None) -> Path:
    """The checkpoint folder of a run (shard None: "<shard folder>/<stem>.parts") or of one shard
    ("<shard folder>/<stem>__shard-<i>-of-<n>.parts"), for artifacts with a shard folder."""
    a = artifact(name)
    if not a.shard_dir:
        raise ArtifactError(f"artifact {name!r} has no shard folder, hence no checkpoint parts")
    stem = a.filename(shard=shard).rsplit(".", 1)[0]
    return run_folder(out_dir) / a.shard_dir / f"{stem}.parts"


def _shard_regex(a: Artifact, **fields: Any) -> re.Pattern:
    if a.shard_pattern:
        name = re.escape(a.shard_pattern).replace(r"\{i\}", r"(\d+)").replace(r"\{n\}", r"(\d+)")
        return re.compile(name + r"\Z")
    stem, ext = a.filename(**fields).rsplit(".", 1)
    return re.compile(re.escape(stem) + r"__shard-(\d+)-of-(\d+)\." + re.escape(ext) + r"\Z")


def shards(name: str, out_dir, **fields: Any) -> dict[tuple[int, int], Path]:
    """The shard files of an artifact present in out_dir: {(i, n): path}."""
    a = artifact(name)
    if not a.shard_dir:
        raise ArtifactError(f"artifact {name!r} has no shard files (only {sharded()} do)")
    folder, pattern = run_folder(out_dir) / a.shard_dir, _shard_regex(a, **fields)
    found = {}
    for p in sorted(folder.iterdir()) if folder.is_dir() else []:
        m = pattern.match(p.name)
        if m and p.is_file():
            found[(int(m.group(1)), int(m.group(2)))] = p
    return found


# ----------------------------------------------------------------------------------------------------------------
# key checks

_KINDS = {"float": "f", "int": "iu", "bool": "b", "str": "UST"}
_JSON_TYPES = {"dict": dict, "list": list, "str": str, "bool": bool, "int": (int, float), "float": (int, float)}


def _kind_ok(value: np.ndarray, dtype: str, exact: bool = False) -> bool:
    if dtype in _KINDS:
        return value.dtype.kind in _KINDS[dtype] or (dtype == "float" and value.dtype.kind in "iu" and value.ndim == 0)
    if not exact:
        return value.dtype.kind == np.dtype(dtype).kind
    return value.dtype == np.dtype(dtype)


def _check_array(where: str, key: str, spec: Key, value, exact: bool) -> None:
    value = np.asarray(value)
    if not _kind_ok(value, spec.dtype, exact):
        raise ArtifactError(f"{where}: {key!r} has dtype {value.dtype}, expected {spec.dtype}")
    if value.ndim != len(spec.dims):
        raise ArtifactError(f"{where}: {key!r} has shape {value.shape}, expected "
                            f"[{', '.join(spec.dims)}] ({len(spec.dims)} dimensions)")


def _check_dims(a: Artifact, data: dict, where: str) -> None:
    """Axes with the same name must have the same length across the file's arrays."""
    seen: dict[str, tuple[int, str]] = {}
    for key, value in data.items():
        spec = a.keys.get(key)
        if spec is None:
            continue
        for dim, size in zip(spec.dims, np.shape(value)):
            if dim == "*":
                continue
            if dim in seen and seen[dim][0] != size:
                raise ArtifactError(f"{where}: axis {dim!r} has length {size} in {key!r} but {seen[dim][0]} in "
                                    f"{seen[dim][1]!r}: the arrays do not describe the same {dim}")
            seen.setdefault(dim, (size, key))


def _check_json(where: str, key: str, spec: Key, value) -> None:
    want = list if spec.dims else _JSON_TYPES.get(spec.dtype)
    if want is not None and value is not None and not isinstance(value, want):
        raise ArtifactError(f"{where}: {key!r} is a {type(value).__name__}, expected "
                            f"{'a list of ' if spec.dims else ''}{spec.dtype}")


def check_keys(a: Artifact, data: dict, where: str, keys=None, exact: bool = False) -> None:
    """Raise ArtifactError naming the file when a required key is missing or a declared one is malformed.

    keys: the declared keys that must be present (None: all of them; optional ones may be absent anyway). Every present declared key is checked: dtype (its kind, or exactly with exact=True) and ndim for
    npz, JSON type for json; same-named axes must agree. CSV columns are checked for presence only."""
    required = [k for k in (a.keys if keys is None else keys) if k in a.keys and not a.keys[k].optional]
    for key in required:
        if key not in data:
            raise ArtifactError(f"{where}: key {key!r} is missing (has {sorted(data)}); the file is from an older or "
                                f"different writer: regenerate it with {a.producer}")
    if a.format == "npz":
        for key, value in data.items():
            if key in a.keys:
                _check_array(where, key, a.keys[key], value, exact)
        _check_dims(a, data, where)
    elif a.format == "json":
        for key, value in data.items():
            if key in a.keys:
                _check_json(where, key, a.keys[key], value)


def _missing(a: Artifact, p: Path) -> ArtifactError:
    return ArtifactError(f"missing artifact {str(p)!r}; run {a.producer} first "
                         f"(python -m lib.run --params <run>.yaml --only {a.producer})")


def _unreadable(a: Artifact, p: Path, e: Exception) -> ArtifactError:
    return ArtifactError(f"{p} is unreadable ({type(e).__name__}: {e}); it is truncated or corrupt: delete it "
                         f"and rerun {a.producer}")
