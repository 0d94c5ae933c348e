"""Shards and checkpoints: one parser for "i/n", one resume policy.

    shard = parse_shard("2/4")                                  # -> (2, 4); "" -> None
    check_settings(path, saved, settings)                       # raises CheckpointMismatch naming what differs
    parts = Parts.open(folder, settings)                        # a folder of finished work units (resumable)

The policy: a checkpoint (or shard file) records the settings its numbers depend on, as a flat dict. Resuming or
merging it under other settings raises CheckpointMismatch, which names every key that differs with both values and
says how to proceed (rerun with the recorded settings, or delete the checkpoint). Nothing is discarded silently and
nothing is resumed silently under changed settings.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from lib.storage.store import ArtifactError, save_json

__all__ = ["CheckpointMismatch", "parse_shard", "differences", "describe_differences", "check_settings", "Parts"]

_SHARD_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
SETTINGS_FILE = "settings.json"


class CheckpointMismatch(ArtifactError):
    """A checkpoint or shard file was computed with other settings than the current run."""


def parse_shard(shard: str | None) -> tuple[int, int] | None:
    """'' or None -> None (no sharding); 'i/n' (1-based, 1 <= i <= n) -> (i, n)."""
    if shard is None or str(shard).strip() == "":
        return None
    m = _SHARD_RE.match(str(shard))
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise ValueError(f"shard must be '' (no sharding, or merge the shards) or 'i/n' with 1 <= i <= n, e.g. '2/4' "
                         f"for task 2 of 4 (SLURM: shard=\"$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT\" with "
                         f"--array=1-<n>); got {shard!r}")
    return int(m.group(1)), int(m.group(2))


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= width else text[:width - 3] + "..."


def differences(saved: dict, settings: dict) -> list[str]:
    """Keys whose values differ (or exist on one side only), sorted; values compared after a JSON round trip."""
    a, b = json.loads(json.dumps(saved, default=str)), json.loads(json.dumps(settings, default=str))
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def describe_differences(saved: dict, settings: dict) -> str:
    """'mode: "ablate" (checkpoint) vs "add" (this run); ...' for every differing key."""
    return "; ".join(f"{k}: {_short(saved.get(k, '<absent>'))} (checkpoint) vs {_short(settings.get(k, '<absent>'))} "
                     f"(this run)" for k in differences(saved, settings))


def check_settings(where: str | Path, saved: dict, settings: dict) -> None:
    """Raise CheckpointMismatch when `saved` (read from the checkpoint at `where`) differs from `settings`."""
    if differences(saved, settings):
        raise CheckpointMismatch(
            f"{where} was computed with different settings ({describe_differences(saved, settings)}); it cannot be "
            f"resumed or merged by this run. Rerun with the checkpoint's settings, or delete it (rm -r {where}) to "
            f"start afresh")


class Parts:
    """A folder of finished work units (one file per unit) plus the settings they were computed with.

    Parts.open(folder, settings) creates it, or reopens it after checking the recorded settings (raises
    CheckpointMismatch naming what differs). Unit files are written atomically by their owner (lib.storage.artifacts)."""

    def __init__(self, folder: Path, settings: dict):
        self.folder, self.settings = Path(folder), settings

    @classmethod
    def open(cls, folder: str | Path, settings: dict) -> "Parts":
        folder = Path(folder)
        recorded = folder / SETTINGS_FILE
        if recorded.exists():
            check_settings(folder, json.loads(recorded.read_text()), settings)
        else:
            folder.mkdir(parents=True, exist_ok=True)
            save_json(recorded, settings)
        return cls(folder, settings)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
