"""Executing one notebook: papermill into a temporary copy renamed into place, the kernel's environment (provenance
logging of reads, its share of the CPUs), the HTML report view (nbconvert), and the manifest entry of a failure;
the kernels running now (stopped all at once on an interrupt)."""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

from lib import REPO_ROOT
from lib.pipeline import provenance
from lib.pipeline.bookkeeping import current_code, model_key, record, record_success
from lib.pipeline.steps import Step, params_hash
from lib.storage import artifacts

__all__ = ["export_html", "render_html", "execute", "html_exporter", "forked_kernels", "RUNNING"]


_HTML_EXPORTER = []        # one nbconvert exporter per runner process (importing nbconvert takes seconds)


def html_exporter():
    """nbconvert's HTML exporter configured as `jupyter nbconvert --to html --no-input
    --CoalesceStreamsPreprocessor.enabled=True` (report view: no code, no prompts, stream outputs merged), made once
    per process: the same HTML without a Python start and an nbconvert import per notebook."""
    if not _HTML_EXPORTER:
        from nbconvert import HTMLExporter
        from traitlets.config import Config
        config = Config({"TemplateExporter": {"exclude_input": True, "exclude_input_prompt": True,
                                              "exclude_output_prompt": True},
                         "CoalesceStreamsPreprocessor": {"enabled": True}})
        _HTML_EXPORTER.append(HTMLExporter(config=config))
    return _HTML_EXPORTER[0]


def export_html(executed: Path, target: Path) -> None:
    """Write the report view of the executed notebook to `target` (as nbconvert's command line writes it)."""
    body, _ = html_exporter().from_filename(str(executed), resources={"unique_key": Path(executed).stem,
                                                                      "output_files_dir": f"{Path(executed).stem}_files"})
    with open(target, "w", encoding="utf-8") as f:
        f.write(body)


def render_html(executed: Path, html: Path) -> None:
    """nbconvert's report view, written to a temporary name and renamed (no partial HTML on a full disk)."""
    html.parent.mkdir(parents=True, exist_ok=True)
    tmp = html.parent / f".{html.stem}.tmp.html"
    try:
        export_html(executed, tmp)
        os.replace(tmp, html)
    except Exception as e:                        # a full disk, an unreadable notebook, a template error
        raise OSError(f"nbconvert could not write {html}: {type(e).__name__}: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def quiet_progress_env() -> dict[str, str]:
    """Readable logs under papermill / SLURM: off a terminal, progress bars update every 10 s at most."""
    return {} if sys.stderr.isatty() else {"TQDM_MININTERVAL": "10"}


class _KernelEnv:
    """Environment of one notebook's kernel: quiet progress bars off a terminal, provenance logging of reads, and
    (notebooks run at once, --jobs N) the thread count of its share of the CPUs. Given to that kernel only (the
    runner's own environment is left alone, so notebooks run at once in threads each log their own reads)."""

    def __init__(self, step: Step, reads_log: Path):
        self.values = {artifacts.READS_ENV: str(reads_log), artifacts.NOTEBOOK_ENV: step.name,
                       artifacts.MODEL_ENV: model_key(step.params), **getattr(RUNNING.local, "threads", {}),
                       **quiet_progress_env()}

    def manager(self):
        """A jupyter_client kernel manager class whose kernels start in REPO_ROOT with os.environ + these values;
        each one it starts is listed in RUNNING.kernels until it is shut down (an interrupt stops them all)."""
        from jupyter_client.manager import AsyncKernelManager
        values = self.values

        class KernelManager(AsyncKernelManager):
            async def start_kernel(self, **kw):
                if RUNNING.stopping:
                    raise RuntimeError("the runner is stopping: no new kernel")
                kw.update(env={**os.environ, **kw.get("env", {}), **values}, cwd=str(REPO_ROOT))
                RUNNING.kernels.add(self)
                await super().start_kernel(**kw)

            def format_kernel_cmd(self, extra_arguments=None):
                cmd = super().format_kernel_cmd(extra_arguments)
                server = RUNNING.fork_server
                return server.launch_command(cmd) if server is not None else cmd

            async def shutdown_kernel(self, *args, **kw):
                try:
                    await super().shutdown_kernel(*args, **kw)
                finally:
                    RUNNING.kernels.discard(self)
        return KernelManager


class _Running:
    """What the notebooks running now share: their kernel managers (stopped on an interrupt); per runner thread,
    its log prefix and its kernel's thread variables (--jobs N)."""

    def __init__(self):
        import threading
        self.kernels: set = set()
        self.stopping = False
        self.fork_server = None
        self.local = threading.local()

    def stop_kernels(self) -> None:
        """Kill every kernel still running (their notebooks then fail as interrupted in their own threads)."""
        for km in list(self.kernels):
            process = getattr(getattr(km, "provisioner", None), "process", None)
            if process is not None and process.poll() is None:
                process.kill()


RUNNING = _Running()


def fork_server_wanted() -> bool:
    """False with HEADINFO_FORK_SERVER=0, without os.fork, and on a machine with an NVIDIA device (CUDA is not
    fork-safe)."""
    import glob
    return os.environ.get("HEADINFO_FORK_SERVER") != "0" and hasattr(os, "fork") and not glob.glob("/dev/nvidia[0-9]*")


@contextlib.contextmanager
def forked_kernels():
    """Within the block, kernels are forked from one server that has imported the heavy libraries once
    (lib.pipeline.forkserver); the block starts once the server is ready (or has failed: fresh kernels then).
    Fresh kernels where fork_server_wanted() says no."""
    if not fork_server_wanted():
        yield
        return
    from lib.pipeline.forkserver import ForkServer
    env = {**os.environ, **quiet_progress_env()}      # tqdm reads it on import: the server's kernels need it too
    server = ForkServer(env, str(REPO_ROOT))
    RUNNING.fork_server = server
    try:
        server.wait_ready(timeout=60)  # a fresh kernel would spend as long importing, and the imports happen once
        yield
    finally:
        RUNNING.fork_server = None
        problem = server.stop()
        if problem:
            print(f"[run] {problem}; its kernels started as fresh processes", flush=True)


def _reads_log(step: Step) -> Path:
    """The temporary file a notebook's kernel lists the run-folder files it reads in (lib.artifacts)."""
    return step.output.with_name(f".{step.output.stem}.reads.tmp.log")


def _papermill(step: Step, target: Path, log_output: bool) -> None:
    import papermill
    from lib.pipeline.progress import KERNEL_SETUP, LineWriter
    # cell stdout/stderr streamed to our stdout/stderr (one line per update off a terminal); tqdm.auto in the
    # kernel becomes a text bar on the log (lib/pipeline/progress.py), so reports hold no blank progress widgets
    prefix = getattr(RUNNING.local, "prefix", "")
    streams = {"stdout_file": LineWriter(sys.stdout, prefix), "stderr_file": LineWriter(sys.stderr, prefix)} \
        if log_output else {}
    papermill.execute_notebook(str(step.path), str(target), parameters=step.params, log_output=False,
                               progress_bar=False, kernel_name="python3",
                               kernel_manager_class=_KernelEnv(step, _reads_log(step)).manager(),
                               extra_arguments=[f"--IPKernelApp.exec_lines={KERNEL_SETUP}"], **streams)


def execute(step: Step, log_output: bool = True, earlier: list[str] = ()) -> float:
    """Run one notebook into a temporary copy renamed into place; raise RuntimeError naming the failing cell, or
    the file that could not be written. The manifest says "failed" for any failure, never "running"."""
    from papermill.exceptions import PapermillExecutionError
    t0 = time.perf_counter()
    code, git = current_code(step), provenance.git_state()        # what runs: taken before the kernel starts
    record(step, status="running", started=time.strftime("%Y-%m-%dT%H:%M:%S"), params_hash=params_hash(step.params))
    tmp = step.output.with_name(f".{step.output.name}.tmp.ipynb")
    log = _reads_log(step)                        # removed by the next run if we are killed
    failure = None
    try:
        log.write_text("")
        _papermill(step, tmp, log_output)
        os.replace(tmp, step.output)
        render_html(step.output, step.html)
        reads = {Path(line) for line in Path(log).read_text().splitlines() if line}
        record_success(step, reads, list(earlier), status="ok", seconds=round(time.perf_counter() - t0, 2),
                       params_hash=params_hash(step.params), finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
                       **({"code": code} if code is not None else {}), git=git)
    except PapermillExecutionError as e:
        if tmp.exists():
            os.replace(tmp, step.output)          # the executed copy shows the traceback
        failure = (f"{e.ename}: {e.evalue}", e.exec_count,
                   f"notebook {step.name} failed in cell {e.exec_count}: {e.ename}: {e.evalue}\n"
                   f"  executed copy with the traceback: {step.output}")
    except OSError as e:
        from lib.storage.store import disk_error
        message = disk_error(e, e.filename or tmp) if e.errno else str(e)
        failure = (message, None, f"notebook {step.name}: {message}")
    except BaseException as e:                    # Ctrl-C, SIGTERM from scancel, anything unexpected
        failure = (f"interrupted ({type(e).__name__})", None, None)
        raise
    finally:
        Path(log).unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
        if failure:
            _record_failure(step, failure[0], failure[1], time.perf_counter() - t0)
    if failure:
        raise RuntimeError(failure[2])
    return time.perf_counter() - t0


def _record_failure(step: Step, error: str, cell, seconds: float) -> None:
    try:
        record(step, status="failed", seconds=round(seconds, 2), error=error, cell=cell,
               params_hash=params_hash(step.params))
    except OSError as e:                           # a full disk: the next run marks the entry as failed
        print(f"[run] could not record the failure of {step.name} in manifest.json ({e.strerror})", file=sys.stderr)
    if error.startswith("could not write") or error.startswith("nbconvert"):
        step.html.unlink(missing_ok=True)
