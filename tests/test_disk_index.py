"""lib/storage/disk_index.py, and the two indexes built on it: a lib module's fingerprint and imports
(lib.pipeline.provenance), a weights file's sha256 (lib.model.checksums)."""
import hashlib
import json
import os

import pytest

from lib import REPO_ROOT
from lib.pipeline import provenance
from lib.storage.disk_index import DiskIndex


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADINFO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_value_is_returned_only_with_its_stamp_and_survives_the_process(cache):
    DiskIndex("x.json").put("a", "stamp 1", {"v": [1, 2]})
    fresh = DiskIndex("x.json")                                   # another process: reads the file
    assert fresh.get("a", "stamp 1") == {"v": [1, 2]}
    assert fresh.get("a", "stamp 2") is None and fresh.get("b", "stamp 1") is None
    fresh.put("a", "stamp 2", 3)                                  # the file changed: its entry is replaced
    assert DiskIndex("x.json").get("a", "stamp 1") is None and DiskIndex("x.json").get("a", "stamp 2") == 3
    assert oct(os.stat(cache / "x.json").st_mode & 0o777) == "0o644"
    assert [p.name for p in cache.iterdir()] == ["x.json"]         # no temporary file left


def test_two_processes_adding_entries_keep_both(cache):
    first, second = DiskIndex("x.json"), DiskIndex("x.json")
    assert first.get("a", "s") is None and second.get("b", "s") is None      # both read the (missing) file
    first.put("a", "s", 1)
    second.put("b", "s", 2)                                         # merges what the first one wrote meanwhile
    assert json.loads((cache / "x.json").read_text()) == {"a": {"stamp": "s", "value": 1},
                                                          "b": {"stamp": "s", "value": 2}}


def test_a_corrupt_or_unwritable_index_costs_a_recomputation_never_an_error(cache, tmp_path, monkeypatch):
    cache.mkdir()
    (cache / "x.json").write_text('{"a": {"stamp": "s", "val')          # cut short
    index = DiskIndex("x.json")
    assert index.get("a", "s") is None
    index.put("a", "s", 1)
    assert DiskIndex("x.json").get("a", "s") == 1
    blocker = tmp_path / "a file"
    blocker.write_text("")
    monkeypatch.setenv("HEADINFO_CACHE", str(blocker / "cache"))       # below a file: cannot be created
    index = DiskIndex("x.json")
    index.put("a", "s", 1)
    assert index.get("a", "s") == 1 and DiskIndex("x.json").get("a", "s") is None


def _lib_modules():
    return sorted((REPO_ROOT / "lib").rglob("*.py"))


def _fresh_process(monkeypatch):
    """What a new process sees: empty in-memory caches, the index read again from disk."""
    _clear_memory()
    monkeypatch.setattr(provenance, "_MODULES", DiskIndex("lib-modules.json"))


def _clear_memory():
    provenance._parsed_module.cache_clear()
    provenance._module_info.cache_clear()


@pytest.fixture(autouse=True)
def _forget_planted_values():
    """The tests plant wrong values in the index: no later test of this process may see them."""
    yield
    _clear_memory()


def test_lib_module_fingerprints_from_the_index_equal_the_parsed_ones_and_skip_parsing(cache, monkeypatch):
    _fresh_process(monkeypatch)
    parsed = {p: provenance.module_info(p) for p in _lib_modules()}
    assert len(json.loads((cache / "lib-modules.json").read_text())) == len(parsed)
    for p, (fingerprint, deps) in parsed.items():                   # independent: the source itself
        assert fingerprint == provenance.source_fingerprint(p.read_text())
        package = ".".join(p.relative_to(REPO_ROOT).with_suffix("").parts)
        package = package.rsplit(".", 1)[0] + "._" if p.name == "__init__.py" else package
        assert set(deps) == provenance.imported_modules(p.read_text(), package)
    _fresh_process(monkeypatch)

    def no_parsing(*args):
        raise AssertionError("parsed although the index holds the module")
    monkeypatch.setattr(provenance, "source_fingerprint", no_parsing)
    monkeypatch.setattr(provenance, "imported_names", no_parsing)
    assert {p: provenance.module_info(p) for p in _lib_modules()} == parsed


def test_an_entry_of_other_text_is_not_used(cache, monkeypatch):
    path = REPO_ROOT / "lib/experiments/ranking/signal.py"
    _fresh_process(monkeypatch)
    true = provenance.module_info(path)
    index = json.loads((cache / "lib-modules.json").read_text())
    entry = index["lib/experiments/ranking/signal.py"]
    index["lib/experiments/ranking/signal.py"] = {"stamp": hashlib.sha256(b"other text").hexdigest(),
                                                 "value": ["0" * 16, []]}
    (cache / "lib-modules.json").write_text(json.dumps(index))
    _fresh_process(monkeypatch)
    assert provenance.module_info(path) == true                      # recomputed, and the entry replaced
    assert json.loads((cache / "lib-modules.json").read_text())["lib/experiments/ranking/signal.py"] == entry
    index["lib/experiments/ranking/signal.py"] = {"stamp": entry["stamp"], "value": ["0" * 16, []]}
    (cache / "lib-modules.json").write_text(json.dumps(index))
    _fresh_process(monkeypatch)                                      # the same stamp: the index is believed
    assert provenance.module_info(path) == ("0" * 16, ())


def test_a_weights_checksum_is_read_once_while_size_and_mtime_hold(cache, tmp_path, monkeypatch):
    from lib.model import checksums
    monkeypatch.setattr(checksums, "_CHECKSUMS", DiskIndex("weights-sha256.json"))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights one")
    expected = "sha256:" + hashlib.sha256(b"weights one").hexdigest()[:16]
    assert checksums.weights_checksum(tmp_path) == expected
    monkeypatch.setattr(checksums, "_CHECKSUMS", DiskIndex("weights-sha256.json"))
    import lib.storage.store as store
    monkeypatch.setattr(store, "file_checksum", lambda p: pytest.fail("hashed again"))
    assert checksums.weights_checksum(tmp_path) == expected
    monkeypatch.undo()
    monkeypatch.setenv("HEADINFO_CACHE", str(cache))
    weights.write_bytes(b"weights two!")                                # other size: hashed again
    assert checksums.weights_checksum(tmp_path) == "sha256:" + hashlib.sha256(b"weights two!").hexdigest()[:16]
