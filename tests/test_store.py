"""Artifacts: atomic writes (a killed writer leaves no file), shape-checked loading, manifest merging."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lib.store import ArtifactError, ensure_writable_dir, load_npz, save_npz, update_manifest, read_manifest


def test_killed_write_leaves_no_file(tmp_path):
    target = tmp_path / "big.npz"
    code = ("import numpy as np, sys\nfrom lib import store\n"
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
