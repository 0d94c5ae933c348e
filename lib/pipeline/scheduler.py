"""Running a run's steps in order, or up to --jobs at once: each after the steps it reads from, the longest chain
first, each kernel with its share of the CPUs; a failure or an interrupt stops the rest."""
from __future__ import annotations

import contextlib
import os
import time

from lib import REPO_ROOT
from lib.pipeline.bookkeeping import stale_reasons
from lib.pipeline.execution import RUNNING, execute, forked_kernels
from lib.pipeline.steps import Step, upstream_of
from lib.storage.store import read_manifest

__all__ = ["default_jobs", "kernel_threads", "run_concurrently", "run_steps"]


def default_jobs() -> int:
    """How many notebooks run at once when --jobs is not given: $HEADINFO_JOBS, else min(2, the CPUs this process
    may use); 1 on one CPU."""
    if os.environ.get("HEADINFO_JOBS"):
        return max(1, int(os.environ["HEADINFO_JOBS"]))
    return max(1, min(2, len(os.sched_getaffinity(0))))


def kernel_threads(jobs: int) -> dict[str, str]:
    """Thread variables for a kernel started while `jobs` notebooks run (or are ready to) at once: the CPUs split
    between them, unless OMP_NUM_THREADS is set already (tests, SLURM jobs) or it runs alone."""
    if jobs <= 1 or os.environ.get("OMP_NUM_THREADS"):
        return {}
    share = str(max(1, len(os.sched_getaffinity(0)) // jobs))
    return {"OMP_NUM_THREADS": share, "MKL_NUM_THREADS": share}


def _run_one(step: Step, pipeline: list[str], force: bool, log_output: bool) -> None:
    """Run `step` unless it is up to date (decided now, after the notebooks it reads from have run)."""
    earlier = upstream_of(step.name, pipeline)
    reasons = ["--force"] if force else stale_reasons(step, read_manifest(step.output.parent), earlier)
    if not reasons:
        print(f"[run] {step.name}: up to date (same parameters, inputs and outputs), skipped; --force reruns it",
              flush=True)
        return
    shown = step.output.relative_to(REPO_ROOT) if step.output.is_relative_to(REPO_ROOT) else step.output
    print(f"[run] {step.name} -> {shown} (runs because {'; '.join(reasons)})", flush=True)
    seconds = execute(step, log_output=log_output, earlier=earlier)
    print(f"[run] {step.name}: done in {seconds:.1f} s", flush=True)


def run_steps(steps: list[Step], pipeline: list[str], force: bool, log_output: bool, jobs: int = 1) -> None:
    """Run the steps in order, or up to `jobs` at once, each after the steps it reads from (run_concurrently)."""
    if jobs <= 1 or len(steps) <= 1:
        for step in steps:
            _run_one(step, pipeline, force, log_output)
        return
    with forked_kernels(), whole_lines():
        run_concurrently(steps, pipeline, jobs, lambda step: _run_one(step, pipeline, force, log_output))


class _WholeLines:
    """sys.stdout while notebooks run at once: each thread's text reaches the stream a whole line at a time, so the
    lines of two threads never run into each other (print writes its text and its newline separately)."""

    def __init__(self, stream):
        import threading
        self.stream, self.lock, self.local = stream, threading.Lock(), threading.local()

    def write(self, text: str) -> int:
        *lines, self.local.pending = (getattr(self.local, "pending", "") + text).split("\n")
        if lines:
            with self.lock:
                self.stream.write("".join(f"{line}\n" for line in lines))
        return len(text)

    def flush(self) -> None:
        pending, self.local.pending = getattr(self.local, "pending", ""), ""
        with self.lock:
            self.stream.write(pending)
            self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextlib.contextmanager
def whole_lines():
    """Within the block sys.stdout writes whole lines per thread (_WholeLines)."""
    import sys
    previous, sys.stdout = sys.stdout, _WholeLines(sys.stdout)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stdout = previous


def _waits_for(steps: list[Step], pipeline: list[str]) -> dict[str, set[str]]:
    """step stem -> the stems of the steps it reads from, directly or through others (upstream_of)."""
    return {s.output.stem: {o.output.stem for o in steps if o.name in upstream_of(s.name, pipeline)} for s in steps}


def _critical_first(steps: list[Step], waits: dict[str, set[str]]) -> list[Step]:
    """The steps, longest chain first: a step's chain is its own seconds (as last recorded in the manifest; 1 s when
    unknown) plus the longest chain of the steps waiting on it. Among ready steps the runner starts the first."""
    entries = read_manifest(steps[0].output.parent).get("notebooks", {}) if steps else {}
    chain: dict[str, float] = {}
    for s in sorted(steps, key=lambda s: -len(waits[s.output.stem])):      # steps waiting on others first
        after = [chain[t] for t, w in waits.items() if s.output.stem in w]
        chain[s.output.stem] = float(entries.get(s.output.stem, {}).get("seconds") or 1.0) + max(after, default=0.0)
    return sorted(steps, key=lambda s: -chain[s.output.stem])


def run_concurrently(steps: list[Step], pipeline: list[str], jobs: int, run_one) -> None:
    """Call run_one(step) in up to `jobs` threads at once, each step after every step it reads from has finished
    (its kernel gets the CPUs' share of the notebooks running or ready when it starts: kernel_threads).
    A failure: no further step starts, those running finish, then the first error is raised. An interrupt
    (Ctrl-C, SIGTERM) in the main thread kills the running kernels (their notebooks are recorded failed) and
    is re-raised once their threads have finished."""
    import threading
    waits, done, running, errors = _waits_for(steps, pipeline), set(), {}, []
    pending, changed = _critical_first(steps, waits), threading.Condition()

    def work(step, busy):
        RUNNING.local.prefix, RUNNING.local.threads = f"[{step.output.stem}] ", kernel_threads(busy)
        try:
            run_one(step)
        except BaseException as e:               # noqa: B036 - handed to the main thread
            errors.append(e)
        with changed:
            done.add(step.output.stem)
            running.pop(step.output.stem)
            changed.notify_all()
    try:
        with changed:
            while pending or running:
                ready = [] if errors else [s for s in pending if waits[s.output.stem] <= done]
                busy = min(jobs, len(running) + len(ready))          # notebooks sharing the CPUs from now on
                for step in ready[:jobs - len(running)]:
                    pending.remove(step)
                    running[step.output.stem] = threading.Thread(target=work, args=(step, busy), daemon=True)
                    running[step.output.stem].start()
                if not running:
                    break
                changed.wait(timeout=1.0)
    except BaseException:
        RUNNING.stopping = True
        deadline = time.time() + 60
        while any(t.is_alive() for t in list(running.values())) and time.time() < deadline:
            RUNNING.stop_kernels()               # again: a kernel may have been starting the first time
            for thread in list(running.values()):
                thread.join(timeout=0.5)
        raise
    finally:
        RUNNING.stopping = False
    if errors:
        raise errors[0]
