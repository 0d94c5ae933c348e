"""Readable progress and cell output in headless runs (the runner under papermill, SLURM job logs).

In JupyterLab `from tqdm.auto import tqdm` shows a widget bar: nothing to do. Under the runner the kernel has no
frontend: a widget bar would be saved as a blank widget (stuck at 0% in the HTML report) and nothing would reach
the job log. The runner therefore starts each kernel with `KERNEL_SETUP`, which makes `tqdm.auto` a plain text
bar that writes to the kernel's own stderr (inherited from the runner: the terminal or the SLURM log), not into
the notebook. Updates come at most every TQDM_MININTERVAL seconds (the runner sets 10 s when stderr is not a
terminal) and, when the target is not a terminal, each update is a line of its own (`LineWriter`) instead of
a carriage return, so `less`/`tail -f` on a job log read like a list of timestamps.
"""
from __future__ import annotations

import io
import sys

__all__ = ["KERNEL_SETUP", "LineWriter"]

# one line, run by the kernel before the first cell (IPKernelApp.exec_lines); binds no name in the notebook
KERNEL_SETUP = "__import__('lib.pipeline.progress').pipeline.progress.use_text_progress()"


class LineWriter:
    """File-like wrapper: on a terminal writes through; elsewhere turns each carriage-return update into its own
    line and drops blank redraws (tqdm clears a finished leave=False bar with spaces). prefix starts every line
    written off a terminal (the runner's notebooks run at once: "[<notebook>] ")."""

    def __init__(self, stream, prefix: str = ""):
        self.stream = stream
        self.prefix = prefix
        try:
            self.tty = bool(stream.isatty())
        except (AttributeError, ValueError):
            self.tty = False
        self._line_open = False          # something was written since the last newline
        self.encoding = getattr(stream, "encoding", None) or "utf-8"

    def write(self, text: str) -> int:
        if self.tty:
            return self.stream.write(text)
        for k, part in enumerate(text.split("\r")):
            if k > 0 and self._line_open:
                self.stream.write("\n")
                self._line_open = False
            if not part or (not self._line_open and not part.strip(" ")):
                continue
            self.stream.write(self._prefixed(part) if self.prefix else part)
            self._line_open = not part.endswith("\n")
        self.flush()
        return len(text)

    def _prefixed(self, part: str) -> str:
        """`part` with the prefix before each of its lines that starts here and is not empty."""
        lines = part.splitlines(keepends=True)
        starts = [not self._line_open] + [True] * (len(lines) - 1)
        return "".join(self.prefix + l if first and l != "\n" else l for first, l in zip(starts, lines))

    def flush(self) -> None:
        try:
            self.stream.flush()
        except (AttributeError, ValueError):
            pass

    def isatty(self) -> bool:
        return self.tty

    def fileno(self) -> int:
        return self.stream.fileno()


def real_stderr():
    """The process's stderr as inherited (terminal or job log). In an ipykernel, fd 2 is a pipe that the kernel
    forwards into the notebook; its OutStream.fileno() is a copy of the original fd 2, which is what we want."""
    try:
        return open(sys.stderr.fileno(), "w", encoding="utf-8", errors="replace", closefd=False, buffering=1)
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return sys.__stderr__


def use_text_progress(stream=None) -> None:
    """Make `tqdm.auto.tqdm` / `trange` (and tqdm.autonotebook) text bars writing to `stream` (default: the
    process's inherited stderr, `real_stderr()`), not into the notebook. Call before the notebook imports
    tqdm.auto's names (the runner does it at kernel start)."""
    import tqdm.auto
    import tqdm.autonotebook
    import tqdm.std

    target = LineWriter(stream if stream is not None else real_stderr())

    class TextTqdm(tqdm.std.tqdm):
        def __init__(self, *args, **kwargs):
            if kwargs.get("file") is None:
                kwargs["file"] = target
                if not target.tty:
                    kwargs["leave"] = True      # a log keeps the final state (leave=False would blank it out)
            super().__init__(*args, **kwargs)

    def trange(*args, **kwargs):
        return TextTqdm(range(*args), **kwargs)

    for module in (tqdm.auto, tqdm.autonotebook):
        module.tqdm = TextTqdm
        module.trange = trange
