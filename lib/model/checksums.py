"""What identifies a model's weights without loading them (no torch import): the cache folder, the checksum of its
weights files, and the stamp a bundled model's converted folder carries (weights.sha256). Used by lib.model.loading
when it loads a model and by lib.pipeline.provenance when the runner fingerprints a notebook, so both write the same
string."""
from __future__ import annotations

import os
from pathlib import Path

from lib.storage.disk_index import DiskIndex, cache_dir

__all__ = ["cache_dir", "weights_checksum", "stamped_checksum", "ModelSpecError"]

STAMP = "weights.sha256"


class ModelSpecError(ValueError):
    """A model spec, dtype or device that cannot be loaded; the message says how to fix it."""


def weights_checksum(folder: Path) -> str:
    """"sha256:<a>+<b>...": the first 16 hex digits of the sha256 of each weights file (*.safetensors, else *.bin),
    sorted by name. A file of the HF cache is a link to a blob named by its sha256 (verified at download), so a
    snapshot costs no reading; other files are hashed once (cached by path, size and mtime in cache_dir())."""
    files = sorted(Path(folder).glob("*.safetensors")) or sorted(Path(folder).glob("*.bin"))
    if not files:
        raise ModelSpecError(f"no weights files (*.safetensors, *.bin) in {folder}")
    return "sha256:" + "+".join(_file_sha256(p)[:16] for p in files)


def stamped_checksum(folder: Path) -> str:
    """weights_checksum of a converted bundled folder, stamped next to the weights (computing it takes ~1 s): the
    stamp is written when the folder is made (lib.model.bundled.prepare_bundled) or at the first call."""
    stamp = Path(folder) / STAMP
    if stamp.exists():
        return stamp.read_text().strip()
    digest = weights_checksum(folder)
    try:
        stamp.write_text(digest + "\n")
    except OSError:
        pass
    return digest


_CHECKSUMS = DiskIndex("weights-sha256.json")     # real path -> sha256, while its size and mtime hold


def _file_sha256(path: Path) -> str:
    from lib.storage.store import file_checksum
    real = Path(os.path.realpath(path))
    if real.parent.name == "blobs" and len(real.name) == 64 and all(c in "0123456789abcdef" for c in real.name):
        return real.name
    stat = real.stat()
    stamp = f"{stat.st_size}|{stat.st_mtime_ns}"
    digest = _CHECKSUMS.get(str(real), stamp)
    if digest is None:
        digest = file_checksum(real)
        _CHECKSUMS.put(str(real), stamp, digest)
    return digest
