"""pytest plugin (-p tests.tools.nbval_forked) for the nbval run of tests/test_notebooks.py: nbval's kernels are
forked from one server that imported torch, transformers, pandas, scipy and matplotlib once
(lib/pipeline/forkserver.py), as the runner's kernels are when it runs several notebooks, instead of each of the 14
kernels importing them again. HEADINFO_FORK_SERVER=0 (or a machine where the runner would not fork: no os.fork,
an NVIDIA device) keeps nbval's own fresh kernels."""
from __future__ import annotations

import os

_SERVER = None


def pytest_configure(config):
    global _SERVER
    from lib import REPO_ROOT
    from lib.pipeline.execution import fork_server_wanted
    if not fork_server_wanted():
        return
    import nbval.kernel
    from lib.pipeline.forkserver import ForkServer
    _SERVER = ForkServer(dict(os.environ), str(REPO_ROOT))
    _SERVER.wait_ready(timeout=120)
    nbval.kernel.KernelManager = _SERVER.manager_class(nbval.kernel.KernelManager)


def pytest_unconfigure(config):
    if _SERVER is not None:
        problem = _SERVER.stop()
        assert problem is None, problem
