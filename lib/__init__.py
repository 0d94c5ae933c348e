"""headinfo: how attention heads and neurons of language models integrate information.

Layers, bottom first (a module imports only its own layer and those below; tests/test_layers.py checks it):
storage (files, manifest, artifacts), model (architectures, loading, hooks, prompts), estimators (PhiID, Louvain,
network measures), plots, experiments (one module or package per stage), pipeline (stage declarations, value
rules, cost, verdicts, report tables); at the top the commands run, claims, report, plan, compare and models.

Relative run folders (a notebook's default out_dir "outputs/dev") are relative to the repository root whatever the
kernel's working directory (papermill runs kernels there, JupyterLab and nbval in notebooks/): lib resolves them
with lib.storage.store.run_folder. Importing lib has no side effect.
"""
from pathlib import Path

__all__ = ["REPO_ROOT"]

REPO_ROOT = Path(__file__).resolve().parent.parent
__version__ = "0.1.0"
