"""Artifacts: atomic writes (a killed writer leaves no file), shape-checked loading, manifest merging."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lib.storage.store import ArtifactError, ensure_writable_dir, load_npz, save_npz, update_manifest, read_manifest


def test_killed_write_leaves_no_file(tmp_path):
    target = tmp_path / "big.npz"
    code = ("import numpy as np, sys\nfrom lib.storage import store\n"
            "class Slow:\n  def __array__(self, *a, **k):\n    import time; print('writing', flush=True); time.sleep(60)\n"
            "store.save_npz(sys.argv[1], a=np.zeros(10), slow=Slow())\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not target.exists()
    save_npz(target, a=np.arange(3))                    # a later write succeeds and is complete
    np.testing.assert_array_equal(load_npz(target)["a"], np.arange(3))


def test_failed_write_keeps_old_file(tmp_path):
    target = tmp_path / "x.npz"
    save_npz(target, a=np.arange(3))
    with pytest.raises(RuntimeError):
        save_npz(target, a=np.arange(5), b=BadArray())
    np.testing.assert_array_equal(load_npz(target)["a"], np.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["x.npz"]      # no temp file left behind


class BadArray:
    def __array__(self, *args, **kwargs):
        raise RuntimeError("cannot convert")


def test_load_checks_keys_and_dimensions(tmp_path):
    path = save_npz(tmp_path / "a.npz", activations=np.zeros((2, 3)))
    with pytest.raises(ArtifactError, match="expected 3 dimensions"):
        load_npz(path, expect={"activations": 3})
    with pytest.raises(ArtifactError, match="'tokens' is missing"):
        load_npz(path, expect={"tokens": 2})
    with pytest.raises(ArtifactError, match="run 01_extract_activations first"):
        load_npz(tmp_path / "none.npz", produced_by="01_extract_activations")


def test_unwritable_out_dir_is_a_clear_error(tmp_path):
    if os.geteuid() == 0:
        target = "/proc/headinfo-test"                # not writable even for root
    else:
        target = str(tmp_path / "ro" / "x")
        (tmp_path / "ro").mkdir(mode=0o500)
    with pytest.raises(ArtifactError, match="not writable"):
        ensure_writable_dir(target)


def test_manifest_sections_merge(tmp_path):
    update_manifest(tmp_path, "01", {"a": 1})
    update_manifest(tmp_path, "02", {"b": 2})
    update_manifest(tmp_path, "01", {"c": 3})
    manifest = read_manifest(tmp_path)
    assert manifest["sections"]["01"]["a"] == 1 and manifest["sections"]["01"]["c"] == 3
    assert manifest["sections"]["02"]["b"] == 2 and "numpy" in manifest["versions"]


# ----------------------------------------------------------------------------- unreadable files, full disks

def test_corrupt_manifest_is_one_error_naming_the_file(tmp_path):
    from lib.storage.store import read_manifest
    (tmp_path / "manifest.json").write_bytes(b'{"notebooks": {"01": \xff\xfe')
    with pytest.raises(ArtifactError, match=r"manifest.json is unreadable .*truncated or corrupt: move it aside"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"notebooks": {')
    with pytest.raises(ArtifactError, match="JSONDecodeError"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ArtifactError, match="not a mapping"):
        read_manifest(tmp_path)


def test_truncated_npz_is_one_error_naming_the_file(tmp_path):
    from lib.storage import artifacts
    path = save_npz(tmp_path / "activations.npz", activations=np.zeros((2, 3, 4), np.float32))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ArtifactError, match=r"activations.npz is unreadable .*truncated or corrupt: delete it and rerun 01"):
        load_npz(path, produced_by="01_extract_activations")
    with pytest.raises(ArtifactError, match=r"activations.npz is unreadable .*rerun 01_extract_activations"):
        artifacts.load("activations", tmp_path)


def test_malformed_csv_is_one_error_naming_the_file(tmp_path):
    from lib.storage import artifacts
    (tmp_path / "rankings.csv").write_text('layer,head\n0,1\n1,"2\n')
    with pytest.raises(ArtifactError, match=r"rankings.csv is unreadable .*rerun 04_ranking_variants"):
        artifacts.load("rankings", tmp_path)


def test_temp_files_of_interrupted_writes_are_cleaned(tmp_path):
    from lib.storage.store import clean_temp_files
    orphans = [tmp_path / ".neurons_direct_vs_total.png.k2j3.tmp.png", tmp_path / ".ablation_shards" / ".a.npz.x.tmp.npz",
               tmp_path / ".write-test-abc", tmp_path / "html" / ".02_phiid.tmp.html"]
    for p in orphans:
        p.parent.mkdir(exist_ok=True)
        p.write_text("partial")
    keep = save_npz(tmp_path / "activations.npz", a=np.arange(2))
    assert sorted(clean_temp_files(tmp_path)) == sorted(orphans)
    assert not any(p.exists() for p in orphans) and keep.exists()


def _fill_disk(monkeypatch, after_bytes: int):
    """Make every write through lib.storage.store fail with ENOSPC once `after_bytes` were written (a fake full disk)."""
    import builtins
    import errno
    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, data):
            self.n += len(data)
            if self.n > after_bytes:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return Full(f) if ("w" in mode or "a" in mode) and ".tmp" in str(file) else f

    def fake_write_text(self, data, *args, **kwargs):
        with fake_open(self, "w") as f:
            return f.write(data)
    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(Path, "write_text", fake_write_text)


def test_full_disk_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    from lib.storage.store import save_json
    target = save_npz(tmp_path / "x.npz", a=np.arange(3))
    save_json(tmp_path / "s.json", {"a": 1})
    _fill_disk(monkeypatch, after_bytes=64)
    with pytest.raises(OSError, match="No space left"):
        save_npz(target, a=np.arange(1000))
    with pytest.raises(OSError, match="No space left"):
        save_json(tmp_path / "s.json", {"a": list(range(1000))})
    monkeypatch.undo()
    np.testing.assert_array_equal(load_npz(target)["a"], np.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json", "x.npz"]


def test_real_full_tmpfs_leaves_no_partial_file(tmp_path):
    """On a real full file system (a 1 MB tmpfs; needs root and mount, otherwise the fake disk above covers it)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; test_full_disk_leaves_old_file_and_no_temp fakes a full disk")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mount -t tmpfs is not permitted in this container; the fake full disk test covers ENOSPC")
    try:
        save_npz(mnt / "a.npz", a=np.arange(10))
        with pytest.raises(OSError) as e:
            save_npz(mnt / "a.npz", a=np.zeros(1 << 20))
        import errno
        assert e.value.errno == errno.ENOSPC
        assert [p.name for p in mnt.iterdir()] == ["a.npz"]
        np.testing.assert_array_equal(load_npz(mnt / "a.npz")["a"], np.arange(10))
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


# ----------------------------------------------------------------------------- run lock

def test_run_lock_names_the_owner(tmp_path):
    import socket
    from lib.storage.store import RunLockedError, run_lock
    code = ("import sys, time\nfrom lib.storage.store import run_lock\n"
            "with run_lock(sys.argv[1], 'owner run'):\n  print('locked', flush=True); time.sleep(60)\n")
    owner = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=rf"in use by pid {owner.pid} on host {socket.gethostname()}.*owner run"):
            with run_lock(tmp_path, "second"):
                pass
        with pytest.raises(RunLockedError, match=f"pid {owner.pid}"):      # a shard run waits for a whole run too
            with run_lock(tmp_path, "shard", stem="05_ablation.shard-1-of-2"):
                pass
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    with run_lock(tmp_path, "after the owner died") as stale:          # the kernel released the flock
        assert f'"pid": {owner.pid}' in stale


def test_shard_runs_share_the_folder_but_not_a_shard(tmp_path):
    from lib.storage.store import RunLockedError, run_lock
    with run_lock(tmp_path, "a", stem="05_ablation.shard-1-of-2") as stale_a:
        with run_lock(tmp_path, "b", stem="05_ablation.shard-2-of-2") as stale_b:
            assert stale_a is None and stale_b is None
            with pytest.raises(RunLockedError, match="05_ablation.shard-2-of-2 of .* is already running"):
                with run_lock(tmp_path, "c", stem="05_ablation.shard-2-of-2"):
                    pass
            with pytest.raises(RunLockedError, match="in use by pid"):
                with run_lock(tmp_path, "whole run"):
                    pass
    with run_lock(tmp_path, "whole run") as stale:
        assert stale is None                        # both shard runs finished normally


def test_clean_temp_files_can_keep_to_one_notebooks_files(tmp_path):
    from lib.storage.store import clean_temp_files
    mine, theirs = tmp_path / ".made.npz.k2j.tmp.npz", tmp_path / ".used.npz.p9q.tmp.npz"
    mine.write_bytes(b"x")
    theirs.write_bytes(b"x")                     # another notebook, running beside this one, is writing it
    assert clean_temp_files(tmp_path, ["made*"]) == [mine]
    assert theirs.exists() and not mine.exists()
    assert clean_temp_files(tmp_path) == [theirs]


def test_json_is_strict_nan_and_inf_become_null(tmp_path):
    import json
    from lib.storage.store import save_json
    path = save_json(tmp_path / "x.json", {"a": np.float64("nan"), "b": np.array([1.0, np.inf]), "c": float("-inf"),
                                           "d": np.float32(2.5), "e": [np.int64(3)]})
    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")
    assert json.loads(path.read_text(), parse_constant=refuse) == {"a": None, "b": [1.0, None], "c": None,
                                                                   "d": 2.5, "e": [3]}


def test_the_wheel_holds_every_module_and_template(tmp_path):
    """Packaging by discovery: a built wheel (not the editable install) has every module of lib and its templates."""
    import subprocess
    import sys
    import zipfile
    from lib import REPO_ROOT
    import shutil
    src = tmp_path / "src"                                       # a copy: the build leaves nothing in the repository
    shutil.copytree(REPO_ROOT / "lib", src / "lib", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
                    str(src)], check=True, capture_output=True, timeout=300)
    names = set(zipfile.ZipFile(next(tmp_path.glob("headinfo-*.whl"))).namelist())
    lib_dir = REPO_ROOT / "lib"
    wanted = {str(p.relative_to(REPO_ROOT)) for p in lib_dir.rglob("*.py")} | \
             {str(p.relative_to(REPO_ROOT)) for p in (lib_dir / "templates").glob("*.j2")}
    assert not wanted - names, f"missing from the wheel: {sorted(wanted - names)}"


def test_a_relative_run_folder_is_relative_to_the_repository_root_whatever_the_working_directory(tmp_path,
                                                                                                monkeypatch):
    from lib import REPO_ROOT
    from lib.storage import artifacts
    from lib.storage.store import run_folder
    monkeypatch.chdir(tmp_path)                   # a kernel started elsewhere (JupyterLab, nbval: notebooks/)
    assert run_folder("outputs/dev") == REPO_ROOT / "outputs" / "dev"
    assert run_folder(tmp_path / "run") == tmp_path / "run"                     # absolute folders are kept
    assert artifacts.path("rankings", "outputs/dev") == REPO_ROOT / "outputs" / "dev" / "rankings.csv"
    assert artifacts.path("rankings", "") == Path("rankings.csv")               # a name inside any run folder


def test_importing_lib_leaves_the_working_directory_alone():
    from lib import REPO_ROOT
    code = "import os, lib, lib.storage.artifacts; print(os.getcwd())"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT / "notebooks", capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == REPO_ROOT / "notebooks"
