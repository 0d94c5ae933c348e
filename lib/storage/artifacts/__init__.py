"""The artifact contract: every file a notebook writes into a run folder, declared once.

One `Artifact` record per file kind: its name pattern (with an optional baseline tag and shard), the notebook that
produces it, its format, and its keys (npz arrays, CSV columns or JSON top-level keys) with dtype and dims.
Modules and notebooks never build a file name or call np.load themselves; they call

    path("activations", out_dir, tag="random_init")        # -> out_dir / "activations__random_init.npz"
    load("activations", out_dir, keys=["activations"])      # checked: present, dtype kind, ndim, dims agree
    save("activations", out_dir, arrays, tag="")            # atomic (lib.storage.store), keys checked before writing
    tags("activations", out_dir)                            # ["", "random_init", "rev-step1000", ...]

Tags: "" is the run's own model; "random_init" the re-initialised copy; "rev-<revision>" a training checkpoint
(`revision_tag`). `tags` lists them in that order, checkpoints by the last number in their revision.
Shards: (i, n) -> "<shard_dir>/<stem>__shard-<i>-of-<n>.<ext>", or the artifact's own `shard_pattern` (e.g.
"ablation_shards/shard-<i>-of-<n>.npz"); `shards` finds them, `parts_dir` is a run's or a shard's checkpoint folder.
Dims name what an axis holds ("prompts", "heads", "steps", "pairs", ...); a dim "*" is any size. Axes with the same
name must have the same length in one file.
Load checks the dtype kind ("float32" accepts any float); save checks the exact dtype, so a writer cannot change
what a file holds without changing its declaration here.
"""
from __future__ import annotations

from lib.storage.artifacts.registry import FORMATS, RANDOM_INIT, Artifact, ARTIFACTS, artifact, sharded, path
from lib.storage.artifacts.folders import revision_tag, tag_sort_key, tags, identify, parts_dir, shards
from lib.storage.artifacts.files import load_file, load, save_file, save, append
from lib.storage.artifacts.lineage import (scalar, check_same_run, READS_ENV, NOTEBOOK_ENV, MODEL_ENV, note_read,
                                           fingerprint, output_globs, output_files, relative, is_tagged, check_input)
from lib.storage.artifacts.readme import shown_name, readme_with_table, producer_outputs

from lib.storage.artifacts.folders import revision_tag
from lib.storage.store import ArtifactError  # noqa: F401  (re-exported: what a failed check raises)
__all__ = ["FORMATS", "RANDOM_INIT", "Artifact", "ARTIFACTS", "artifact", "sharded", "path", "revision_tag",
           "tag_sort_key", "tags", "identify", "parts_dir", "shards", "load_file", "load", "save_file", "save",
           "append", "scalar", "check_same_run", "READS_ENV", "NOTEBOOK_ENV", "MODEL_ENV", "note_read", "fingerprint",
           "output_globs", "output_files", "relative", "is_tagged", "check_input", "shown_name", "readme_with_table",
           "producer_outputs", "revision_tag"]
