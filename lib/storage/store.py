"""Artifacts: atomic writes, the run manifest, and loading with shape checks.

Every artifact is written to a temporary file in the destination folder and renamed into place, so a killed
process leaves either the old file or the new one, never a partial file.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from lib import REPO_ROOT

__all__ = ["run_folder", "ArtifactError", "RunFolderWriteError", "NOTEBOOK_ENV", "PRODUCER_HOOKS", "WRITE_OVERRIDE_ENV",
           "in_jupyter_kernel", "check_write_allowed", "ensure_writable_dir", "atomic_path", "save_npz", "save_json",
           "save_csv", "save_figure", "READ_HOOKS", "load_npz", "check_same_heads", "git_commit", "package_versions",
           "file_checksum", "read_manifest", "clean_temp_files", "disk_error", "locked", "update_manifest",
           "jsonable", "RunLockedError", "run_lock"]


def run_folder(out_dir) -> Path:
    """A run folder as a Path. A relative one (a notebook's default "outputs/dev") is relative to the repository
    root, whatever the kernel's working directory: papermill runs kernels there, JupyterLab and nbval start them in
    notebooks/. An empty out_dir ("") stays empty: artifacts.path(name, "") is a file's path inside any run folder
    (what artifacts.identify reads back), not a file of the repository root."""
    path = Path(out_dir).expanduser()
    return path if path.is_absolute() or path == Path("") else REPO_ROOT / path


_UMASK = os.umask(0)
os.umask(_UMASK)


class ArtifactError(ValueError):
    """An artifact is missing, malformed, or belongs to a different run or model."""


class RunFolderWriteError(ArtifactError):
    """A notebook opened in Jupyter (not started by the runner) tried to write into a run folder the runner owns."""


NOTEBOOK_ENV = "HEADINFO_NOTEBOOK"    # notebook being executed by the runner (lib.storage.artifacts re-exports it)
PRODUCER_HOOKS: list = []             # relative path -> the notebook that writes it, or None (lib.storage.artifacts adds one)
WRITE_OVERRIDE_ENV = "HEADINFO_WRITE_RUN_FOLDER"     # "1": let a kernel outside the runner write into a run folder


def runner_folder(path: str | os.PathLike, depth: int = 3) -> Path | None:
    """The run folder holding `path` (it or one of its `depth` nearest parents) when the runner owns it: its
    manifest.json has notebook entries (lib.pipeline.bookkeeping.record); else None."""
    for folder in list(Path(path).resolve().parents)[:depth]:
        manifest = folder / "manifest.json"
        if manifest.is_file():
            try:
                return folder if json.loads(manifest.read_text()).get("notebooks") else None
            except (OSError, ValueError, AttributeError):
                return folder
    return None


def in_jupyter_kernel() -> bool:
    """True inside a running Jupyter kernel (ipykernel's app started), not in a process that merely imported it
    (the runner imports ipykernel's kernelspec to find the kernel)."""
    import sys
    app = sys.modules.get("ipykernel.kernelapp")
    return bool(app is not None and app.IPKernelApp.initialized())


def check_write_allowed(path: str | os.PathLike) -> None:
    """Refuse (RunFolderWriteError, one line) a write into a runner-owned run folder from a Jupyter kernel that the
    runner did not start: Run All on an executed report (outputs/<run>/NN_name.ipynb, its injected out_dir) would
    rewrite the run's artifacts behind the runner's back. The runner's kernels carry HEADINFO_NOTEBOOK; scripts
    and tests (no ipykernel) write as before; HEADINFO_WRITE_RUN_FOLDER=1 lets a kernel write anyway."""
    if os.environ.get(NOTEBOOK_ENV) or os.environ.get(WRITE_OVERRIDE_ENV) == "1" or not in_jupyter_kernel():
        return
    folder = runner_folder(path)
    if folder is None:
        return
    session = Path(os.environ.get("JPY_SESSION_NAME", "")).stem        # the notebook Lab opened, when it says
    producers = [p for p in (f(Path(path).resolve().relative_to(folder)) for f in PRODUCER_HOOKS) if p]
    notebook = session if session[:2].isdigit() else (producers[0] if producers else "<notebook>")
    params = json.loads((folder / "manifest.json").read_text()).get("sections", {}).get("run", {}).get(
        "params_file", f"params/{folder.name}.yaml")
    raise RunFolderWriteError(
        f"{folder} is a run folder of the runner and this kernel was not started by it: {Path(path).name} is not "
        f"written there; rerun with `python -m lib.run --params {params} --only {notebook}`, or set "
        f"{WRITE_OVERRIDE_ENV}=1 before starting Jupyter to write anyway")


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create `path` (and parents) and check that files can be written there."""
    path = Path(path)
    check_write_allowed(path / ".write-test")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ArtifactError(
            f"output folder {str(path)!r} is not writable ({e.strerror}); choose another out_dir "
            f"(e.g. --set out_dir=...) or fix its permissions"
        ) from None
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    check_write_allowed(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)           # mkstemp creates 0600; artifacts are ordinary files
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_npz(path: str | os.PathLike, **arrays: Any) -> Path:
    """Write arrays to `path` (.npz, uncompressed) atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
    return Path(path)


def save_json(path: str | os.PathLike, obj: Any) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(jsonable(obj), indent=2, sort_keys=False, allow_nan=False) + "\n")
    return Path(path)


def save_csv(path: str | os.PathLike, frame) -> Path:
    """Write a pandas DataFrame to CSV atomically (no index column)."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)


def save_figure(path: str | os.PathLike, fig, dpi: int = 150) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=Path(path).suffix.lstrip(".") or "png")
    return Path(path)


READ_HOOKS: list = []      # functions called with each path load_npz reads (lib.storage.artifacts adds note_read)


def load_npz(path: str | os.PathLike, expect: dict[str, int] | None = None, produced_by: str | None = None) -> dict:
    """Load an .npz into a dict of arrays.

    expect: {key: ndim} that must be present with that number of dimensions.
    produced_by: the notebook that writes this file, named in the error when it is missing.
    Every function of READ_HOOKS sees the path first (lib.storage.artifacts registers its provenance check and read log,
    note_read, when imported: store stays below artifacts).
    """
    path = Path(path)
    if not path.exists():
        hint = f"; run {produced_by} first (python -m lib.run --params <run>.yaml --only {produced_by})" if produced_by else ""
        raise ArtifactError(f"missing artifact {str(path)!r}{hint}")
    for hook in READ_HOOKS:
        hook(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ArtifactError(f"{path} is unreadable ({type(e).__name__}: {e}); it is truncated or corrupt: delete it "
                            f"and rerun {produced_by or 'the notebook that wrote it'}") from None
    for key, ndim in (expect or {}).items():
        if key not in arrays:
            raise ArtifactError(f"{path}: key {key!r} is missing (has {sorted(arrays)}); the file is from an older "
                                f"or different writer: regenerate it with {produced_by or 'its notebook'}")
        if arrays[key].ndim != ndim:
            raise ArtifactError(f"{path}: {key!r} has shape {arrays[key].shape}, expected {ndim} dimensions")
    return arrays


def check_same_heads(name_a: str, n_a: int, name_b: str, n_b: int) -> None:
    """Fail clearly when two artifacts describe a different number of heads (different model or run)."""
    if n_a != n_b:
        raise ArtifactError(
            f"{name_a} has {n_a} heads but {name_b} has {n_b}: they come from different models or runs; "
            f"rerun the notebooks of this run in order (python -m lib.run --params <run>.yaml --force)"
        )


# ----------------------------------------------------------------------------- manifest

def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str]:
    from importlib import metadata
    names = ["torch", "transformers", "numpy", "scipy", "pandas", "matplotlib", "seaborn", "papermill", "nbval"]
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def file_checksum(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(out_dir: str | os.PathLike) -> dict:
    path = run_folder(out_dir) / "manifest.json"
    if not path.exists():
        return {}
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as e:
        raise ArtifactError(f"{path} is unreadable ({type(e).__name__}: {e}); it is truncated or corrupt: move it "
                            f"aside (mv {path} {path}.bad) and rerun; the run's notebooks then run again") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path} holds a {type(manifest).__name__}, not a mapping: it is corrupt; move it aside "
                            f"(mv {path} {path}.bad) and rerun")
    return manifest


TEMP_GLOBS = (".*.tmp*", ".write-test-*")      # atomic_path's and ensure_writable_dir's temporary files


def clean_temp_files(out_dir: str | os.PathLike, globs: list[str] | None = None) -> list[Path]:
    """Remove temporary files that an interrupted write left in the run folder (and its sub-folders); with `globs`,
    only those of files whose names match them (one notebook's outputs, while other notebooks write theirs)."""
    import fnmatch
    removed = []
    for pattern in TEMP_GLOBS:
        for p in run_folder(out_dir).rglob(pattern):
            if globs is not None and (p.parent.name == "html" or not any(fnmatch.fnmatch(p.name, f".{g}.*")
                                                                         for g in globs)):
                continue          # pages are rewritten by every job's report step: left to the whole run's clean-up
            if p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def disk_error(e: OSError, path) -> str:
    """One line for a failed write: the file, the reason and the fix."""
    import errno
    fix = "free space there (or choose another out_dir) and rerun" if e.errno in (errno.ENOSPC, errno.EDQUOT) \
        else "check the folder and rerun"
    return f"could not write {path}: {e.strerror or e} (errno {e.errno}); {fix}"


@contextlib.contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive advisory lock on `path` + '.lock' (SLURM array tasks update one manifest concurrently)."""
    import fcntl
    lock = Path(str(path) + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def update_manifest(out_dir: str | os.PathLike, section: str, entry: dict, merge: bool = True) -> dict:
    """Merge `entry` into manifest.json under `section` (e.g. a notebook name), atomically and under a lock."""
    path = run_folder(out_dir) / "manifest.json"
    with locked(path):
        manifest = read_manifest(out_dir)
        manifest.setdefault("git_commit", git_commit())
        manifest["versions"] = package_versions()
        sections = manifest.setdefault("sections", {})
        old = sections.get(section, {}) if merge else {}
        sections[section] = {**old, **entry, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
        save_json(path, manifest)
    return manifest


def jsonable(obj: Any) -> Any:
    """obj with numpy arrays and scalars as plain Python, NaN and inf as None (strict JSON: every parser reads it),
    paths as strings."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


# ----------------------------------------------------------------------------- run lock

class RunLockedError(ArtifactError):
    """Another runner is using the run folder."""


def _lock_owner(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "an unknown process"
    return (f"pid {info.get('pid')} on host {info.get('host')} (since {info.get('started')}"
            f"{', SLURM job ' + info['slurm_job'] if info.get('slurm_job') else ''}: {info.get('what', '')})")


def _write_owner(f, what: str) -> str | None:
    """Replace the lock file's owner line with ours; -> the previous owner when it was left by a dead process."""
    import socket
    f.seek(0)
    previous = f.read().strip()
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                        "slurm_job": os.environ.get("SLURM_JOB_ID", ""), "what": what}))
    f.flush()
    return previous or None


@contextlib.contextmanager
def run_lock(out_dir: str | os.PathLike, what: str, stem: str | None = None) -> Iterator[str | None]:
    """Hold the run folder for one runner invocation.

    A whole run takes `.run.lock` exclusively. Single-notebook runs (a notebook or one shard of it: SLURM jobs of
    the dependency graph, array tasks) share `.run.lock` and each takes `.run.lock.<stem>` exclusively, so they run
    at once but never beside a whole run or a second copy of the same notebook or shard. The locks are flock()s:
    when the owner dies the kernel releases them, and the next runner reports the stale owner it replaces. Yields the stale owner's line (or None).
    """
    import fcntl
    out_dir = run_folder(out_dir)
    main_path = out_dir / ".run.lock"
    held = []
    try:
        main = open(main_path, "a+")
        held.append(main)
        try:
            fcntl.flock(main, (fcntl.LOCK_SH if stem else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            owners = [_lock_owner(p) for p in sorted(out_dir.glob(".run.lock.*")) if _is_locked(p)]
            raise RunLockedError(f"run folder {out_dir} is in use by {'; '.join(owners or [_lock_owner(main_path)])} "
                                 f"(lock {main_path}); wait for it to finish or stop that process") from None
        target, left = main, None
        if stem:
            stem_path = out_dir / f".run.lock.{stem}"
            target = _lock_stem_file(stem_path, stem, out_dir)
            held.append(target)
        else:
            left = _remove_stem_locks(out_dir)     # we hold the folder alone: every notebook lock is a dead one's
        try:
            previous = _write_owner(target, what)
            yield previous or left
        finally:
            target.truncate(0)             # an empty lock file: its last owner did not die while holding it
            if stem:
                stem_path.unlink(missing_ok=True)   # removed while held; _lock_stem_file checks the inode it locks
    finally:
        for f in reversed(held):
            f.close()                      # closing releases the flock


def _lock_stem_file(path: Path, stem: str, out_dir: Path):
    """Open and flock `path` exclusively; the file may be removed by its previous holder as it finishes, so the lock
    counts only when the locked file is still the one at `path` (same inode), else it is opened again."""
    import fcntl
    for _ in range(5):
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise RunLockedError(f"{stem} of {out_dir} is already running: {_lock_owner(path)} (lock {path})") from None
        try:
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                return f
        except FileNotFoundError:
            pass
        f.close()
    raise RunLockedError(f"could not lock {path}: it keeps being removed by another runner; retry")


def _remove_stem_locks(out_dir: Path) -> str | None:
    """Remove the `.run.lock.<stem>` files of single-notebook runs (called with the folder held exclusively: none
    can be live); -> the owner line of one left by a process that died while holding it (None: all were clean)."""
    left = None
    for p in sorted(out_dir.glob(".run.lock.*")):
        try:
            owner = p.read_text().strip()
        except OSError:
            owner = ""
        left = left or owner or None
        p.unlink(missing_ok=True)
    return left


def _is_locked(path: Path) -> bool:
    import fcntl
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False
