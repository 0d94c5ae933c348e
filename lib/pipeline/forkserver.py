"""Notebook kernels forked from one process that imported the heavy libraries once.

A kernel started as `python -m ipykernel_launcher` imports ipykernel, and its notebook then imports torch,
transformers, pandas, scipy and matplotlib again: 1-3 s of CPU per notebook, most of a tiny notebook's own work.
When the runner runs several notebooks it starts one server (`forkserver.py serve SOCKET`, see `serving`) that
imports them (PRELOAD) and waits. A kernel is then launched as `forkserver.py launch SOCKET -- <ipykernel args>`:
a small process (standard library only) that hands its standard streams, environment and working directory to the
server, which forks a child; the child becomes the kernel exactly as ipykernel_launcher would have started it.
To jupyter_client the launcher is the kernel process: it forwards SIGINT, SIGTERM and SIGHUP to the child and
exits with the child's exit code; when it is killed (SIGKILL), the child's lifeline (a pipe only the launcher
holds open) closes and the child exits. The server exits, removing its folder, when the runner closes its standard
input or dies.

What a fork inherits that a fresh process would not have: the preloaded libraries' state. The child therefore
takes the thread count of its environment (torch.set_num_threads, threadpoolctl for BLAS), reseeds Python's and
NumPy's global generators from the OS, and lib itself is never preloaded (it reads its environment, the run's
read log and notebook name, when a notebook imports it). Variables read at import by the preloaded libraries
(TQDM_*, MPLBACKEND, HF_HUB_OFFLINE, ...) are the runner's, as they are for every kernel it starts.
HEADINFO_FORK_SERVER=0 turns it off (every kernel a fresh process), and a machine with an NVIDIA device does
without it: CUDA cannot be used in a process forked after the driver was touched, and beside a GPU's work the
imports are a small part of a notebook."""
from __future__ import annotations

import json
import os
import signal
import socket
import sys

PRELOAD = ("numpy", "pandas", "scipy.stats", "matplotlib", "torch", "transformers", "transformers.modeling_utils",
           "tqdm.auto", "IPython", "ipykernel.kernelapp")
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_LIMIT = 1 << 20                 # bytes of one request (the kernel's environment and arguments)


# ----------------------------------------------------------------------------- the launcher (jupyter_client's kernel)

def _read_line(conn: socket.socket, data: bytes = b"") -> bytes | None:
    """`data` completed to one newline-terminated message from `conn`, or None when it closed first."""
    while not data.endswith(b"\n"):
        chunk = conn.recv(_LIMIT)
        if not chunk:
            return None
        data += chunk
    return data


def _message(conn: socket.socket) -> dict | None:
    """One newline-terminated JSON message from `conn`, or None when it closed first."""
    line = _read_line(conn)
    return None if line is None else json.loads(line)


def launch(path: str, argv: list[str]) -> int:
    """Have the server at `path` fork a kernel with these ipykernel arguments, our streams, environment and working
    directory; forward signals to it; return its exit code."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    lifeline_read, lifeline_write = os.pipe()          # we hold the write end: it closes when we die
    request = json.dumps({"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}).encode()
    socket.send_fds(conn, [request + b"\n"], [0, 1, 2, lifeline_read])
    os.close(lifeline_read)
    started = _message(conn)
    if not started:
        print("[forkserver] the server closed the connection before starting the kernel", file=sys.stderr)
        return 1
    pid = started["pid"]
    def forward(signum, frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:                   # it has just ended: its exit code is on the way
            pass
    for sig in FORWARDED:
        signal.signal(sig, forward)
    ended = _message(conn)
    os.close(lifeline_write)
    return ended["exit"] if ended else 1


# ----------------------------------------------------------------------------- the server

def serve(path: str) -> None:
    """Import PRELOAD, listen at `path`, fork a kernel per request; exit when standard input closes."""
    import importlib
    import select
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # Ctrl-C is the runner's: it stops the kernels itself
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")   # as ipykernel sets it
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError as e:                     # not installed here: the notebook that needs it says so
            print(f"[forkserver] not preloaded: {name} ({e})", file=sys.stderr)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".tmp")
    listener.listen(16)
    os.replace(path + ".tmp", path)                  # the socket appears once everything is imported
    waiting: dict[int, socket.socket] = {}           # child pid -> its launcher's connection
    while True:
        ready, _, _ = select.select([listener, sys.stdin], [], [], 0.05)
        if sys.stdin in ready and not os.read(sys.stdin.fileno(), 1):
            break                                    # the runner closed our input or died
        if listener in ready:
            conn, _ = listener.accept()
            pid = _fork_kernel(conn, [listener, *waiting.values()])
            if pid:
                waiting[pid] = conn
        _report_exits(waiting)
    for conn in waiting.values():
        conn.close()
    import shutil
    shutil.rmtree(os.path.dirname(path), ignore_errors=True)      # also when the runner was killed (SIGKILL)


def _report_exits(waiting: dict[int, socket.socket]) -> None:
    """Tell each launcher whose child has ended its exit code (negative signal number when killed)."""
    while waiting:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = waiting.pop(pid, None)
        if conn is not None:
            code = os.waitstatus_to_exitcode(status)
            try:
                conn.sendall(json.dumps({"exit": code if code >= 0 else 128 - code}).encode() + b"\n")
            except OSError:                          # the launcher is gone
                pass
            conn.close()


def _fork_kernel(conn: socket.socket, others: list[socket.socket]) -> int | None:
    """Read one request from `conn` and fork its kernel -> the child's pid (None when the request was bad).
    `others`: the server's other sockets, closed in the child."""
    data, fds, _, _ = socket.recv_fds(conn, _LIMIT, 4)
    try:
        data = _read_line(conn, data)
        if data is None:
            raise ValueError("truncated request")
        request = json.loads(data)
        if len(fds) != 4:
            raise ValueError(f"{len(fds)} descriptors instead of 4")
    except ValueError as e:
        print(f"[forkserver] bad request: {e}", file=sys.stderr)
        for fd in fds:
            os.close(fd)
        conn.close()
        return None
    pid = os.fork()
    if pid == 0:                                     # the child: becomes the kernel, never returns
        for other in others:
            other.close()
        _become_kernel(request, fds, conn)
    for fd in fds:
        os.close(fd)
    conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    return pid


def _become_kernel(request: dict, fds: list[int], conn: socket.socket) -> None:
    code = 1
    try:
        conn.close()
        for fd, target in zip(fds[:3], (0, 1, 2)):
            os.dup2(fd, target)
        _die_with(fds[3])
        for fd in fds[:3]:
            os.close(fd)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        fresh_process_state(os.environ)
        # ipykernel read JPY_PARENT_PID when the server imported it: give the kernel its own
        parent = [f"--IPKernelApp.parent_handle={os.environ['JPY_PARENT_PID']}"] if "JPY_PARENT_PID" in os.environ else []
        sys.argv = ["ipykernel_launcher", *request["argv"], *parent]
        from ipykernel import kernelapp
        kernelapp.launch_new_instance()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def _die_with(lifeline: int) -> None:
    """Exit this process when the launcher's end of `lifeline` closes (the launcher was killed or ended)."""
    import threading

    def watch():
        while os.read(lifeline, 1):
            pass
        os._exit(1)
    threading.Thread(target=watch, name="lifeline", daemon=True).start()


def fresh_process_state(env) -> None:
    """What a fresh kernel process would have: the thread count of `env` and freshly seeded global generators."""
    import random

    import numpy as np
    random.seed()
    np.random.seed()
    threads = env.get("OMP_NUM_THREADS")
    if threads:
        import torch
        from threadpoolctl import threadpool_limits
        torch.set_num_threads(int(threads))
        threadpool_limits(int(threads))


# ----------------------------------------------------------------------------- the runner's side

class ForkServer:
    """The server process for one runner call: `launch_command(cmd)` turns an ipykernel command into the
    launcher's once the server has imported PRELOAD (before that, or when it failed, kernels start as fresh
    processes)."""

    def __init__(self, env: dict[str, str], cwd: str):
        import subprocess
        import tempfile
        self.folder = tempfile.mkdtemp(prefix="hi-fork-")
        self.path = os.path.join(self.folder, "kernels.sock")
        self.log = open(os.path.join(self.folder, "server.log"), "w+b")   # read back in stop(), even once removed
        self.process = subprocess.Popen([sys.executable, __file__, "serve", self.path], stdin=subprocess.PIPE,
                                        stdout=subprocess.DEVNULL, stderr=self.log, env=env, cwd=cwd,
                                        start_new_session=True)

    def ready(self) -> bool:
        return self.process.poll() is None and os.path.exists(self.path)

    def wait_ready(self, timeout: float) -> bool:
        """Wait until the server has imported PRELOAD and listens (False: it failed or `timeout` s passed)."""
        import time
        deadline = time.monotonic() + timeout
        while not self.ready() and self.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.ready()

    def launch_command(self, cmd: list[str]) -> list[str]:
        if not self.ready() or cmd[1:3] != ["-m", "ipykernel_launcher"]:
            return cmd
        return [sys.executable, __file__, "launch", self.path, "--", *cmd[3:]]

    def manager_class(self, base):
        """A subclass of the jupyter_client KernelManager class `base` whose kernels are launched through this
        server (nbval's and the tests' managers; the runner's looks the server up per kernel, RUNNING.fork_server)."""
        server = self

        class ForkedKernelManager(base):
            def format_kernel_cmd(self, extra_arguments=None):
                return server.launch_command(super().format_kernel_cmd(extra_arguments))
        return ForkedKernelManager

    def stop(self) -> str | None:
        """End the server and remove its folder -> None, or what went wrong when it failed (the kernels started
        meanwhile were fresh processes)."""
        import shutil
        try:
            self.process.stdin.close()
            self.process.wait(timeout=10)
        except Exception:
            self.process.kill()
            self.process.wait()
        self.log.seek(0)
        lines = self.log.read().decode(errors="replace").strip().splitlines()
        self.log.close()
        shutil.rmtree(self.folder, ignore_errors=True)
        if self.process.returncode != 0:
            return f"the kernel fork server failed (exit {self.process.returncode}: {lines[-1] if lines else ''})"
        return None


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2])
    elif sys.argv[1:2] == ["launch"] and sys.argv[3:4] == ["--"]:
        sys.exit(launch(sys.argv[2], sys.argv[4:]))
    else:
        sys.exit("usage: forkserver.py serve SOCKET | launch SOCKET -- <ipykernel arguments>")
