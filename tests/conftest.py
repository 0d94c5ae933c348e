"""Shared fixtures.

The tiny run: ONE run of the tiny pipeline (params/tiny.yaml, through the runner) per pytest session, shared by
every test that reads a finished run. Use it instead of running the pipeline yourself:

    def test_something(tiny_run):          # pathlib.Path of a finished tiny run folder: READ-ONLY
        data = json.loads((tiny_run / "claims.json").read_text())

    def test_something_else(tiny_run_copy):   # a writable copy (mtimes kept: every notebook still up to date),
        (tiny_run_copy / "rankings.csv").unlink()      # yours to change, deleted after the test

- `tiny_run` is read-only: do not write, delete or rerun anything in it (no `python -m lib.run` on it: the runner
  takes a lock file and rewrites the manifest). The fixture checks after each test that every file of the run is
  unchanged (names, sizes, mtimes) and fails that test otherwise; on non-root machines the files are also chmod'ed
  read-only. A test that changes a run uses `tiny_run_copy`.
- `tiny_run_log` holds the first run's runner output: {"stdout": ..., "stderr": ...} (it ran with --quiet).
- The run is made on first use (minutes: 11 notebooks, each its own kernel) in a temporary folder outside pytest's
  basetemp (which a concurrent pytest session may prune) and removed at the end of the session. A test using
  these fixtures (or `smollm2`) is marked slow automatically (SLOW_FIXTURES below), so `make test-fast` skips it.
- HEADINFO_TINY_RUN=<folder> reuses a finished tiny run instead (e.g. while iterating on one test); it is checked
  up to date and never deleted.

Models are cached per session: loading a tiny random model takes ~0.3 s, SmolLM2 ~0.4 s.
"""
from __future__ import annotations

import functools
import json
import uuid
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# one thread per process, as make test sets it: a notebook rerun by a test (kill -9, stale inputs) then computes
# bit for bit what the session's tiny run computed, whatever CPU share the runner (--jobs) gave either kernel
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

from lib import REPO_ROOT  # noqa: E402
from lib.model.loading import CLUSTER_ARCHS, RANDOM_ARCHS, load_model  # noqa: E402
from lib.storage.store import save_json  # noqa: E402

TINY_PARAMS = REPO_ROOT / "params" / "tiny.yaml"
SESSION_VAR = "HEADINFO_TEST_SESSION"     # names the folder the session's processes share (see _session_dir)


# ----------------------------------------------------------------------------- the shared tiny run

def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """relative path -> (size, mtime_ns) of every file under `folder`."""
    found = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() or p.is_symlink():
            st = p.lstat()
            found[str(p.relative_to(folder))] = (st.st_size, st.st_mtime_ns)
    return found


def _set_writable(folder: Path, writable: bool) -> None:
    """Add or remove the write bits of every file and folder under `folder` (folder included)."""
    bits = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
    for p in [*folder.rglob("*"), folder]:
        if p.is_symlink():
            continue
        mode = p.stat().st_mode
        os.chmod(p, (mode | stat.S_IWUSR) if writable else (mode & ~bits))


def _up_to_date_problems(out: Path) -> dict[str, list[str]]:
    """notebook -> why the runner would rerun it (empty lists: the run is finished and up to date)."""
    from lib.pipeline.bookkeeping import stale_reasons
    from lib.pipeline.steps import build_steps, load_params, upstream_of
    from lib.storage.store import read_manifest
    run, shared, sections = load_params(TINY_PARAMS, [f"out_dir={out}"])
    steps = {s.name: s for s in build_steps(run, shared, sections)}
    manifest = read_manifest(out)
    reasons = {name: stale_reasons(s, manifest, upstream_of(name, steps)) for name, s in steps.items()}
    return {name: r for name, r in reasons.items() if r}


def _session_dir() -> Path:
    """A folder shared by every process of this pytest session (the controller and its xdist workers), outside
    pytest's basetemp (which a concurrent pytest session may prune); removed by the controller at the end."""
    return Path(tempfile.gettempdir()) / f"hi-tests-{os.environ[SESSION_VAR]}"


def _make_tiny_run(out: Path) -> dict:
    """Run params/tiny.yaml into `out` -> the runner's {"stdout", "stderr"}; a failure is recorded next to it so
    that the other workers fail with the same message instead of running the pipeline again."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "lib.run", "--params", str(TINY_PARAMS), "--set", f"out_dir={out}",
                           "--quiet"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=3000)
    log = {"stdout": proc.stdout, "stderr": proc.stderr, "returncode": proc.returncode}
    save_json(out.parent / "tiny-log.json", log)
    return log


@pytest.fixture(scope="session")
def _tiny_run_session():
    """(folder, runner output): the tiny pipeline run once per pytest session, or HEADINFO_TINY_RUN reused.
    With xdist (make test runs two workers) the first worker that needs it runs it under a file lock; the other
    waits for it, and every worker reads the same folder."""
    given = os.environ.get("HEADINFO_TINY_RUN") or os.environ.get("HEADINFO_RUN_TEST_REFERENCE")
    if given:
        out = Path(given).resolve()
        assert (out / "manifest.json").exists(), f"HEADINFO_TINY_RUN={given} is not a finished run folder"
        yield out, {"stdout": "", "stderr": ""}
        return
    from filelock import FileLock
    out = _session_dir() / "tiny"
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out.parent / "tiny.lock")):
        done = out.parent / "tiny-log.json"
        log = json.loads(done.read_text()) if done.exists() else _make_tiny_run(out)
        assert log["returncode"] == 0, log["stderr"][-3000:]
        if not (out.parent / "tiny-checked").exists():
            problems = _up_to_date_problems(out)
            assert not problems, f"the shared tiny run {out} is not up to date: {problems}"
            _set_writable(out, False)
            (out.parent / "tiny-checked").touch()
    yield out, {"stdout": log["stdout"], "stderr": log["stderr"]}


@pytest.fixture(scope="session")
def session_folder() -> Path:
    """The folder every process of this pytest session shares (the xdist controller and its workers)."""
    folder = _session_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def tiny_run(_tiny_run_session):
    """Path of the session's finished tiny run (params/tiny.yaml). READ-ONLY: checked unchanged after the test."""
    out = _tiny_run_session[0]
    before = _snapshot(out)
    yield out
    after = _snapshot(out)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, (f"this test changed the shared read-only tiny run {out}: {changed[:10]}; "
                         f"use the tiny_run_copy fixture to change a run")


@pytest.fixture
def tiny_run_copy(_tiny_run_session):
    """A writable copy of the session's tiny run (mtimes kept, so the runner finds it up to date), removed after."""
    parent = Path(tempfile.mkdtemp(prefix="hi-tiny-copy-"))
    out = parent / "tiny"
    shutil.copytree(_tiny_run_session[0], out, symlinks=True)   # copy2 keeps mtimes: recorded checksums stay valid
    _set_writable(out, True)
    yield out
    shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture
def tiny_run_log(_tiny_run_session):
    """{"stdout", "stderr"} of the runner call that made the shared tiny run (empty when HEADINFO_TINY_RUN is set)."""
    return dict(_tiny_run_session[1])


# ----------------------------------------------------------------------------- models

@functools.lru_cache(maxsize=None)
def cached_model(spec: str, attn_implementation: str | None = None, dtype: str = "float32"):
    return load_model(spec, attn_implementation=attn_implementation, dtype=dtype, device="cpu")


@pytest.fixture(params=RANDOM_ARCHS)
def tiny_arch(request):
    """Each supported architecture as a tiny random model: (name, model, tokenizer, arch)."""
    model, tokenizer, arch = cached_model(f"random:{request.param}", "eager")
    return request.param, model, tokenizer, arch


@pytest.fixture(scope="session")
def smollm2():
    """The real bundled SmolLM2-135M-Instruct (sdpa attention): (model, tokenizer, arch)."""
    return cached_model("bundled:smollm2-135m")


@pytest.fixture(scope="session")
def gemma3():
    """The real bundled Gemma-3-270M base (sdpa attention): (model, tokenizer, arch). Skipped, naming the install
    command, when its weights package is not installed (make model PARAMS=params/gemma3-270m.yaml installs it)."""
    import importlib.util
    from lib.model.bundled import BUNDLED, bundled_install_command
    if importlib.util.find_spec(BUNDLED["gemma3-270m"][0]) is None:
        pytest.skip(f"bundled:gemma3-270m is not installed: {bundled_install_command('gemma3-270m')}")
    return cached_model("bundled:gemma3-270m")


@pytest.fixture(params=RANDOM_ARCHS + CLUSTER_ARCHS)
def every_arch(request):
    """Every tiny architecture, the cluster examples' layouts included (multimodal Gemma 3, Gemma 2, Mistral)."""
    model, tokenizer, arch = cached_model(f"random:{request.param}", "eager")
    return request.param, model, tokenizer, arch


@pytest.fixture(params=CLUSTER_ARCHS)
def cluster_arch(request):
    """The cluster examples' layouts as tiny random models: (name, model, tokenizer, arch)."""
    model, tokenizer, arch = cached_model(f"random:{request.param}", "eager")
    return request.param, model, tokenizer, arch


# ----------------------------------------------------------------------------- tiers

SLOW_FIXTURES = {
    "smollm2": "loads SmolLM2-135M, a model bigger than tiny",
    "gemma3": "loads Gemma-3-270M, a model bigger than tiny",
    "tiny_run": "reads the session's tiny pipeline run",
    "tiny_run_copy": "copies the session's tiny pipeline run",
    "tiny_run_log": "reads the session's tiny pipeline run",
}


SLURM_FIXTURES = {"cluster", "pipeline"}    # tests/test_slurm.py: ONE local SLURM cluster and run per session
GROUPS_FILE = "xdist-groups.json"          # nodeid -> work unit, written by the workers, read by the scheduler


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """A test that uses a slow fixture (SLOW_FIXTURES: SmolLM2, the shared tiny run) is marked slow with the reason,
    so `make test-fast` (-m "not slow") leaves it out even when its author did not mark it.
    For xdist (`make test`: -n 2 --dist loadgroup): the tests on the local SLURM cluster form one work unit (one
    worker, one cluster, one pipeline run), and their module goes first, so the longest unit starts at once while
    the other worker takes the rest (the first of those that needs the tiny run makes it). The units are handed to
    the scheduler through the session folder (see pytest_xdist_make_scheduler); modules stay contiguous."""
    first, groups = set(), {}
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        reasons = [why for name, why in SLOW_FIXTURES.items() if name in names]
        if reasons and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow(reason=reasons[0]))
        if names & SLURM_FIXTURES:
            item.add_marker(pytest.mark.xdist_group("slurm"))
            first.add(item.module.__name__ if item.module else "")
    order = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda it: (0 if it.module and it.module.__name__ in first else 1, order[id(it)]))
    if _is_worker(config):
        for item in items:
            marks = [m.args[0] if m.args else m.kwargs.get("name", "default") for m in item.iter_markers("xdist_group")]
            if marks:
                groups[item.nodeid] = "_".join(sorted(set(map(str, marks))))
        save_json(_session_dir() / GROUPS_FILE, groups)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """--dist loadgroup that holds with pytest >= 9.2: xdist 3.8 forms a group by appending "@group" to item._nodeid
    on the worker, which pytest 9.2 no longer reads (the nodeid is built from item._id), so every xdist_group test
    became its own unit and each worker started its own SLURM cluster and pipeline run. This scheduler reads the
    units the workers wrote at collection (GROUPS_FILE) instead; a nodeid not in it falls back to xdist's rule."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class FileGroupScheduling(LoadGroupScheduling):
        _units: dict | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self._units is None:       # called once every worker has collected (and written the file)
                path = _session_dir() / GROUPS_FILE
                self._units = json.loads(path.read_text()) if path.exists() else {}
            return self._units.get(nodeid) or super()._split_scope(nodeid)

    return FileGroupScheduling(config, log)


# ----------------------------------------------------------------------------- one session, several processes

def _is_worker(config) -> bool:
    return hasattr(config, "workerinput")


def pytest_configure(config):
    """The controller names the session's shared folder before xdist starts its workers (they inherit it)."""
    if not _is_worker(config):
        os.environ[SESSION_VAR] = uuid.uuid4().hex[:12]


def pytest_unconfigure(config):
    """The controller removes the shared folder (the tiny run) once every worker has finished."""
    if not _is_worker(config) and os.environ.get(SESSION_VAR):
        folder = _session_dir()
        if folder.exists():
            _set_writable(folder, True)
            shutil.rmtree(folder, ignore_errors=True)
