"""headinfo: how attention heads and neurons of language models integrate information.

One module per idea: models (architecture knowledge), heads (the per-head hook), extract (generation),
phiid (Integrated Information Decomposition), diagnostics, ranking, ablation, neurons, interference,
plots, store (artifacts), run (the notebook runner).
"""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
__version__ = "0.1.0"
