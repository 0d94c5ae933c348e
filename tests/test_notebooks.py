"""nbval over every notebook with its own defaults, in pipeline order (each reads the artifacts of the ones before
it in outputs/dev). The explorer (00) runs last, over that finished dev run."""
import os
import subprocess
import sys

import pytest

from lib import REPO_ROOT


@pytest.mark.slow(reason="runs every notebook under nbval")
def test_notebooks_run_with_defaults_under_nbval():
    notebooks = sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    ordered = [n for n in notebooks if not n.startswith("notebooks/00_")] + [n for n in notebooks if n.startswith("notebooks/00_")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-current-env", "-p", "no:cacheprovider",
                           "-q", "-o", "addopts=", "--nbval-cell-timeout=1200", "-p", "tests.tools.nbval_forked",
                           *ordered], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-6000:]
