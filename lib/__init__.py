"""headinfo: how attention heads and neurons of language models integrate information.

One module per idea: models (architecture knowledge), heads (the per-head hook), extract (generation),
phiid (Integrated Information Decomposition), diagnostics, ranking, ablation, neurons, interference,
plots, store (artifacts), run (the notebook runner), report (HTML index of a run).

Relative paths (a notebook's default out_dir "outputs/dev") are relative to the repository root. papermill runs
kernels there (the runner passes cwd); JupyterLab and nbval start kernels in notebooks/, so importing lib from a
kernel whose working directory is the repository's notebooks/ folder moves it to the repository root.
"""
import os
from pathlib import Path

__all__ = ["REPO_ROOT"]

REPO_ROOT = Path(__file__).resolve().parent.parent
__version__ = "0.1.0"

if Path.cwd() == REPO_ROOT / "notebooks":
    os.chdir(REPO_ROOT)
