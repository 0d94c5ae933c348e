"""Polling with a deadline, for tests that wait on other processes (kernels, SLURM jobs)."""
from __future__ import annotations

import os
import time
from typing import Any, Callable


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, poll: float = 0.05) -> Any:
    """Call `predicate` every `poll` seconds until it returns something true -> that value; TimeoutError naming
    `what` after `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def ended(pid: int) -> bool:
    """True once no process has this pid (signal 0 only checks that it exists)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False
