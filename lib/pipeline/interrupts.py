"""The runner's command line under Ctrl-C: one line, then stderr (the runner's and its kernels') goes quiet while
the interrupted notebook is recorded failed and its kernel shut down; `python -m lib.run` returns 130."""
from __future__ import annotations

import os
import sys

__all__ = ["INTERRUPTED", "INTERRUPTS", "on_interrupt", "StderrGate"]


INTERRUPTED = "interrupted by the user; rerun to resume"
INTERRUPTS: list[int] = []        # set by the SIGINT handler: main returns 130 whatever the interrupt turned into


_REAL_STDERR: list[int] = []       # the terminal's stderr while a StderrGate holds fd 2


def on_interrupt(*_):
    """Ctrl-C: one line, then stderr goes quiet (the kernel's and its client's shutdown noise: ZMQError
    tracebacks) while the interrupted notebook is recorded "failed" and the kernel is shut down; main returns 130."""
    signal = __import__("signal")
    signal.signal(signal.SIGINT, signal.SIG_IGN)                # a second Ctrl-C does not cut the bookkeeping short
    INTERRUPTS.append(1)
    sys.stdout.flush()
    os.write(_REAL_STDERR[-1] if _REAL_STDERR else 2, f"{INTERRUPTED}\n".encode())
    if not _REAL_STDERR:
        _quiet_stderr()
    raise KeyboardInterrupt


def _quiet_stderr() -> None:
    """fd 2 -> /dev/null for the rest of the process."""
    quiet = os.open(os.devnull, os.O_WRONLY)
    os.dup2(quiet, 2)
    os.close(quiet)


class StderrGate:
    """fd 2 of the runner, and so of the kernels it starts (they inherit it), becomes a pipe forwarded to the real
    stderr by a thread until the user interrupts; then the rest (kernel shutdown tracebacks) is dropped."""

    def __enter__(self):
        import threading
        sys.stderr.flush()
        _REAL_STDERR.append(os.dup(2))
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        self.thread = threading.Thread(target=self._forward, args=(read, _REAL_STDERR[-1]), daemon=True)
        self.thread.start()

    @staticmethod
    def _forward(read: int, real: int) -> None:
        while chunk := os.read(read, 65536):
            if not INTERRUPTS:
                os.write(real, chunk)
        os.close(read)

    def __exit__(self, *exc):
        sys.stderr.flush()
        if INTERRUPTS:       # after the one line only shutdown noise is left, e.g. asyncio's "Task exception was
            _quiet_stderr()  # never retrieved" for the dead kernel at interpreter exit
        else:
            os.dup2(_REAL_STDERR[-1], 2)       # the pipe stays open only in kernels still shutting down
        self.thread.join(timeout=1.0)          # what we wrote is forwarded before we return
        os.close(_REAL_STDERR.pop())
