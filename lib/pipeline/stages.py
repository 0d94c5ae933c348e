"""The pipeline's stages, each declared once: its notebook, the stages it reads, where it runs, its cost estimator
and the claims it tests. The runner's graph (lib.run), the cost table (lib.pipeline.cost), the claims map (lib.pipeline.claims) and
the SLURM submitter (slurm/pipeline.sh: GPU or CPU job, afterok parents) all read this table.

    Stage(NB.ABLATION, reads=(NB.RANKING,), device="GPU", cost="ablation", claims=("C5",))

A stage's name is an `NB` constant (lib.storage.notebooks, the only module of lib that spells notebook names); the
rest of lib refers to it through that constant. Adding a stage: its notebook (notebooks/NN_name.ipynb, or `path=`),
its name in NB, its lib module, one `Stage(...)` here, its tests; value rules beside the module
(lib.pipeline.params.declare) and artifacts in lib.storage.artifacts. A stage declared outside
lib (a project's own experiment) is a module that calls `declare(Stage(...))`, named in HEADINFO_STAGES
("pkg.module" or a file path, several separated by ':'), which every runner, cost table and SLURM call imports.
Nothing here imports torch: `python -m lib.run --check` and `slurm/pipeline.sh --dry-run` stay fast.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from lib import REPO_ROOT
from lib.storage.notebooks import NB

__all__ = ["Stage", "declare", "stages", "parents", "gpu_stages", "stage_testing", "pointed", "EXTRA_VAR"]

EXTRA_VAR = "HEADINFO_STAGES"
NOTEBOOKS_VAR = "HEADINFO_NOTEBOOKS"     # another folder holding the stages' notebooks (tests: an edited copy)
DEVICES = ("GPU", "CPU")


@dataclass(frozen=True)
class Stage:
    """One notebook of the pipeline. reads: the stages whose files it reads (it reruns when one of them ran since;
    its SLURM job waits for them). device: "GPU" when it runs the model (a GPU job on a cluster; it still runs on
    CPU anywhere). cost: its estimator (p, run, dims) -> lib.pipeline.cost.Work: a function name of lib.pipeline.cost, "module:function"
or the function itself (None: no forward-pass estimate). claims: the ids
    of the paper's claims it tests (lib.pipeline.claims). conclusions: its "What this shows" generator (out_dir, **extra) ->
    lib.pipeline.conclusions.Conclusion, named like cost (a function of lib.pipeline.conclusions, "module:function"
    or the function; None: no box). path: the notebook (default notebooks/<name>.ipynb, or
    $HEADINFO_NOTEBOOKS/<name>.ipynb)."""
    name: str
    reads: tuple[str, ...] = ()
    device: str = "CPU"
    cost: object = None              # str (a lib.pipeline.cost function, or "module:function") or a callable
    claims: tuple[str, ...] = ()
    path: Path | None = None
    conclusions: object = None       # like cost, in lib.pipeline.conclusions

    def __post_init__(self):
        if self.device not in DEVICES:
            raise ValueError(f"stage {self.name}: device must be one of {DEVICES}, got {self.device!r}")
        object.__setattr__(self, "reads", tuple(self.reads))
        object.__setattr__(self, "claims", tuple(self.claims))
        folder = Path(os.environ.get(NOTEBOOKS_VAR) or REPO_ROOT / "notebooks")
        object.__setattr__(self, "path", Path(self.path) if self.path else folder / f"{self.name}.ipynb")


_DECLARED: dict[str, Stage] = {s.name: s for s in (
    Stage(NB.EXTRACT, device="GPU", cost="extraction", conclusions="extraction"),
    Stage(NB.PHIID, reads=(NB.EXTRACT,), cost="phiid", conclusions="phiid"),
    Stage(NB.DIAGNOSTICS, reads=(NB.PHIID,), cost="diagnostics", claims=("C1",), conclusions="diagnostics"),
    Stage(NB.RANKING, reads=(NB.PHIID, NB.DIAGNOSTICS), cost="ranking", claims=("C2", "C3"), conclusions="rankings"),
    Stage(NB.ABLATION, reads=(NB.RANKING,), device="GPU", cost="ablation", claims=("C5",), conclusions="ablation"),
    Stage(NB.NEURONS, reads=(NB.EXTRACT,), device="GPU", cost="neurons", conclusions="neurons"),
    Stage(NB.INTERFERENCE, reads=(NB.EXTRACT,), device="GPU", cost="interference", conclusions="interference"),
    Stage(NB.TOPOLOGY, reads=(NB.PHIID,), cost="topology", claims=("C4",), conclusions="topology"),
    Stage(NB.BEHAVIOUR, reads=(NB.RANKING,), device="GPU", cost="behaviour", claims=("C6",), conclusions="behaviour"),
    Stage(NB.FINETUNE, reads=(NB.RANKING,), device="GPU", cost="finetune", claims=("C7",), conclusions="finetune"),
    Stage(NB.LOCAL, reads=(NB.PHIID,), cost="local", conclusions="local"),
)}
_loaded_extra: set[str] = set()


def declare(stage: Stage) -> Stage:
    """Add a stage (or replace one of the same name); its parents must be declared stages."""
    unknown = [r for r in stage.reads if r not in _DECLARED and r != stage.name]
    if unknown:
        raise ValueError(f"stage {stage.name} reads {unknown}, which are not declared stages; declare them first")
    _DECLARED[stage.name] = stage
    return stage


def _import_extra(spec: str) -> None:
    """Import a module that declares stages: a dotted name or a .py file path."""
    if spec.endswith(".py"):
        loaded = importlib.util.spec_from_file_location(f"headinfo_stages_{Path(spec).stem}", spec)
        if loaded is None or not Path(spec).is_file():
            raise ValueError(f"{EXTRA_VAR}: {spec} is not a Python file; name a module or a .py file that calls "
                             f"lib.pipeline.stages.declare(...)")
        loaded.loader.exec_module(importlib.util.module_from_spec(loaded))
    else:
        importlib.import_module(spec)


def stages() -> dict[str, Stage]:
    """Every declared stage (those of HEADINFO_STAGES included), by name, in pipeline order."""
    for spec in filter(None, os.environ.get(EXTRA_VAR, "").split(":")):
        if spec not in _loaded_extra:
            _loaded_extra.add(spec)
            _import_extra(spec)
    return dict(sorted(_DECLARED.items()))


def parents() -> dict[str, list[str]]:
    """stage -> the stages it reads (the runner's graph)."""
    return {name: list(s.reads) for name, s in stages().items()}


def gpu_stages() -> tuple[str, ...]:
    """The stages that run the model (GPU jobs on a cluster)."""
    return tuple(name for name, s in stages().items() if s.device == "GPU")


def pointed(name: str, field: str, home: str):
    """A stage's `cost` or `conclusions` as a function: the declared callable, "module:function", or a function name of
    the module `home` (imported here, so that this module stays free of numpy, pandas and torch); None when the stage
    is unknown or declares none."""
    stage = stages().get(name)
    target = getattr(stage, field) if stage is not None else None
    if not target or callable(target):
        return target or None
    module, _, func = target.rpartition(":") if ":" in target else (home, "", target)
    return getattr(importlib.import_module(module), func)


def stage_testing(claim: str) -> str | None:
    """The stage whose notebook tests `claim`, or None."""
    return next((name for name, s in stages().items() if claim in s.claims), None)
