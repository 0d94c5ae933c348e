"""Checkpoints and shards of an ablation run: resuming where a run stopped, merging the shards of a SLURM
array, and the settings a checkpoint must match."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lib.storage import artifacts
from lib.model.architectures import ArchInfo
from lib.storage.store import ArtifactError
from lib.experiments.ablation.plan import AblationInputs, AblationPlan

__all__ = ["fingerprint", "Checkpoint"]


# ----------------------------------------------------------------------------- checkpoints and shards

def fingerprint(plan: AblationPlan, inputs: AblationInputs, arch: ArchInfo | None = None, dtype=None) -> dict:
    """Everything the numbers depend on (not batch sizes or devices, which change only float noise)."""
    orders = hashlib.sha256(np.array([o.order for o in plan.orderings], dtype=np.int64).tobytes()).hexdigest()
    return {"model": inputs.model, "weights_id": getattr(arch, "weights_id", ""), "dtype": str(dtype),
            "tokens": inputs.tokens_checksum, "prompt_ids": [int(p) for p in inputs.prompt_ids],
            "perturbation": plan.perturbation, "noise_sigma": plan.noise_sigma,
            "orderings": [o.label for o in plan.orderings], "orders_sha256": orders,
            "n_removed": [int(n) for n in plan.n_removed], "total_heads": plan.total_heads}


@dataclass
class Checkpoint:
    """State of one run or shard: kl [orderings, points, prompts] (NaN = not computed), done [groups, points, prompts]."""
    path: Path
    fingerprint: dict
    shard: tuple[int, int]
    assigned: np.ndarray          # bool [groups, points]
    done: np.ndarray              # bool [groups, points, prompts]
    kl: np.ndarray                # float64 [orderings, points, prompts]

    @classmethod
    def new(cls, path, fp, plan: AblationPlan, n_prompts: int, shard: tuple[int, int]):
        g, j = len(plan.groups()), len(plan.n_removed)
        assigned = np.zeros((g, j), dtype=bool)
        for unit in plan.units()[shard[0] - 1::shard[1]]:
            assigned[unit] = True
        return cls(Path(path), fp, shard, assigned, np.zeros((g, j, n_prompts), dtype=bool),
                   np.full((len(plan.orderings), j, n_prompts), np.nan))

    @classmethod
    def load(cls, path) -> "Checkpoint":
        d = artifacts.load_file("ablation_checkpoint", path)
        return cls(Path(path), json.loads(str(d["fingerprint"])), (int(d["shard_i"]), int(d["shard_n"])),
                   d["assigned"].astype(bool), d["done"].astype(bool), d["kl"].astype(np.float64))

    def save(self) -> None:
        artifacts.save_file("ablation_checkpoint", self.path, dict(
            fingerprint=json.dumps(self.fingerprint, sort_keys=True), shard_i=self.shard[0], shard_n=self.shard[1],
            assigned=self.assigned, done=self.done, kl=self.kl))

    @property
    def complete(self) -> bool:
        return bool(self.done[self.assigned].all())

    def units_done(self) -> tuple[int, int]:
        return int(self.done[self.assigned].all(-1).sum()), int(self.assigned.sum())


def _differences(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _open_checkpoint(path: Path, fp: dict, plan: AblationPlan, n_prompts: int, shard: tuple[int, int]) -> Checkpoint:
    if path.exists():
        ckpt = Checkpoint.load(path)
        diff = _differences(ckpt.fingerprint, fp)
        if diff or ckpt.shard != shard:
            raise ArtifactError(
                f"{path} was computed with different settings (differs in: {diff or ['shard']}); it cannot be "
                f"resumed by this run. Delete it (rm {path}) to start afresh, or rerun with its original parameters")
        return ckpt
    return Checkpoint.new(path, fp, plan, n_prompts, shard)


def checkpoint_path(out_dir: str | Path, fp: dict) -> Path:
    """Checkpoint of an unsharded run, named by a hash of its settings: changing a parameter starts a new file
    (and changing it back resumes the old one) instead of clashing with it."""
    digest = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:12]
    return artifacts.path("ablation_checkpoint", out_dir, digest=digest)


def shard_path(out_dir: str | Path, i: int, n: int) -> Path:
    return artifacts.path("ablation_checkpoint", out_dir, shard=(i, n))


def existing_shards(out_dir: str | Path) -> dict[tuple[int, int], Path]:
    return artifacts.shards("ablation_checkpoint", out_dir)


def merge_shards(out_dir: str | Path, fp: dict, plan: AblationPlan, n_prompts: int) -> np.ndarray:
    """Combine complete shard files into kl [orderings, points, prompts]; refuse incomplete or mismatched sets."""
    found = existing_shards(out_dir)
    counts = sorted({n for _, n in found})
    folder = shard_path(out_dir, 1, 1).parent
    if len(counts) != 1:
        raise ArtifactError(f"{folder} holds shard files of different shard counts {counts}: delete the stale ones "
                            f"(keep one complete set shard-*-of-N.npz) and rerun with shard=''")
    n = counts[0]
    missing = [i for i in range(1, n + 1) if (i, n) not in found]
    problems = []
    if missing:
        problems.append(f"missing shards {missing} of {n}: run them with " +
                        ", ".join(f"shard='{i}/{n}'" for i in missing) + f" (SLURM array task ids {missing})")
    kl = np.full((len(plan.orderings), len(plan.n_removed), n_prompts), np.nan)
    covered = np.zeros((len(plan.groups()), len(plan.n_removed)), dtype=bool)
    incomplete, mismatched = [], []
    for (i, _), path in sorted(found.items()):
        ckpt = Checkpoint.load(path)
        diff = _differences(ckpt.fingerprint, fp)
        if diff:
            mismatched.append(f"{path.name} (differs in: {diff})")
            continue
        if not ckpt.complete:
            done, total = ckpt.units_done()
            incomplete.append(f"shard {i}/{n} ({done} of {total} units done): rerun it with shard='{i}/{n}' (it resumes)")
            continue
        for g, j in zip(*np.nonzero(ckpt.assigned)):
            for o in plan.groups()[g]:
                kl[o, j] = ckpt.kl[o, j]
            covered[g, j] = True
    if mismatched:
        problems.append(f"shards computed with other settings than this run: {mismatched}; rerun them with the "
                        f"current parameters (delete {folder} first) or run this merge with their parameters")
    problems += incomplete
    if not problems and not covered.all():
        problems.append(f"the shards of {folder} do not cover all work units; delete it and rerun all shards")
    if problems:
        raise ArtifactError("cannot merge ablation shards: " + "; ".join(problems))
    return kl
