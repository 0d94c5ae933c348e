"""Small JSON indexes in the user's cache folder: values that are slow to compute from a file and are kept for as
long as the file is unchanged (a weights file's sha256, a lib module's syntax-tree fingerprint and imports).

An index maps a name (a path) to {"stamp", "value"}; `get` returns the value only when the stamp given now equals the
one stored, so a changed file (other stamp) is computed again and replaces its entry. Every process reads an index
once and writes it (atomically, merged with what other processes wrote meanwhile) only when it adds an entry; a
cache folder that cannot be written costs the recomputation, never an error."""
from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

__all__ = ["DiskIndex", "cache_dir"]


def cache_dir() -> Path:
    """Where converted bundled models and the indexes live ($HEADINFO_CACHE, else ~/.cache/headinfo)."""
    return Path(os.environ.get("HEADINFO_CACHE", Path.home() / ".cache" / "headinfo"))


class DiskIndex:
    """name -> value, valid while the caller's stamp for the name is unchanged; stored in cache_dir()/<file>."""

    def __init__(self, file: str):
        self.file = file
        self._entries: dict | None = None
        self._folder: Path | None = None
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        return cache_dir() / self.file

    def get(self, name: str, stamp: str) -> Any | None:
        with self._lock:
            entry = self._loaded().get(name)
        return entry["value"] if isinstance(entry, dict) and entry.get("stamp") == stamp else None

    def put(self, name: str, stamp: str, value: Any) -> None:
        with self._lock:
            entries = {**self._loaded(), **self._read(), name: {"stamp": stamp, "value": value}}
            self._entries = entries
            tmp = None
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.file}.", suffix=".tmp")
                with os.fdopen(fd, "w") as f:
                    json.dump(entries, f, separators=(",", ":"))
                os.chmod(tmp, 0o644)                     # mkstemp makes 0600
                os.replace(tmp, self.path)
                tmp = None
            except OSError:
                pass
            finally:
                if tmp is not None:
                    Path(tmp).unlink(missing_ok=True)

    def _loaded(self) -> dict:
        """The entries read once per process (again when HEADINFO_CACHE points elsewhere since)."""
        if self._entries is None or self._folder != cache_dir():
            self._entries, self._folder = self._read(), cache_dir()
        return self._entries

    def _read(self) -> dict:
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, ValueError):                 # none yet, unreadable, or cut short by a full disk
            return {}
        return entries if isinstance(entries, dict) else {}
