"""lib/pipeline/forkserver.py: kernels forked from a server that imported the heavy libraries once.

Checked through jupyter_client as the runner uses it (a KernelManager whose command goes through the launcher):
the forked kernel runs code with its own environment, working directory and thread count, is a child of the
server with the libraries already imported, gets freshly seeded global generators, is interrupted by SIGINT,
ends when its launcher is killed, and returns its exit code through the launcher. Whether a pipeline run with
forked kernels computes what fresh kernels compute is checked by tests/test_run.py's kill -9 tests: the killed
notebook is rerun alone (a fresh kernel) and compared bit for bit with the session's tiny run (forked kernels)."""
from __future__ import annotations

import os
import time

import pytest

from lib import REPO_ROOT
from lib.pipeline import execution
from lib.pipeline.forkserver import ForkServer
from tests.tools.waiting import ended, wait_for

pytestmark = pytest.mark.slow(reason="starts a fork server (imports torch and transformers) and kernels")


@pytest.fixture(scope="module")
def server():
    s = ForkServer({**os.environ, "OMP_NUM_THREADS": "2"}, str(REPO_ROOT))
    try:
        assert s.wait_ready(timeout=180), "the fork server did not get ready in 180 s"
        yield s
    finally:
        problem = s.stop()
    assert problem is None and s.process.returncode == 0 and not os.path.exists(s.folder)


def start(server, env: dict, cwd):
    from jupyter_client.manager import KernelManager
    km = server.manager_class(KernelManager)(kernel_name="python3")
    km.start_kernel(env={**os.environ, **env}, cwd=str(cwd))
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    return km, kc


def run(kc, code: str, timeout: float = 60) -> tuple[str, dict]:
    """Execute `code` -> (its stdout, the execute reply's content)."""
    out = []

    def hook(msg):
        if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
            out.append(msg["content"]["text"])
    reply = kc.execute_interactive(code, output_hook=hook, timeout=timeout)
    return "".join(out), reply["content"]


def test_the_launch_command_wraps_only_ipykernel_and_only_once_ready(server):
    cmd = ["/x/python", "-m", "ipykernel_launcher", "-f", "conn.json", "--IPKernelApp.exec_lines=1"]
    import sys
    from lib.pipeline import forkserver
    assert server.launch_command(cmd) == [sys.executable, forkserver.__file__, "launch", server.path, "--", "-f",
                                          "conn.json", "--IPKernelApp.exec_lines=1"]
    assert server.launch_command(["/x/python", "-m", "other_kernel"]) == ["/x/python", "-m", "other_kernel"]
    cold = ForkServer(dict(os.environ), str(REPO_ROOT))           # still importing: fresh kernels meanwhile
    try:
        assert not cold.ready() and cold.launch_command(cmd) == cmd
    finally:
        cold.process.kill()                                          # a server that dies says so when stopped
        assert cold.wait_ready(timeout=30) is False                  # and is not waited for
        assert "the kernel fork server failed (exit -9" in cold.stop() and not os.path.exists(cold.folder)


def test_a_forked_kernel_has_its_own_environment_directory_threads_and_generators(server, tmp_path):
    kernels = [start(server, {"HI_PROBE": f"kernel {i}", "OMP_NUM_THREADS": "1"}, tmp_path) for i in range(2)]
    try:
        seen = []
        for km, kc in kernels:
            text, reply = run(kc, "import sys\npreloaded = 'transformers' in sys.modules\n"
                                  "import os, random, numpy as np, torch\n"
                                  "print(os.environ['HI_PROBE'], os.getcwd(), torch.get_num_threads(), os.getppid(), "
                                  "preloaded, np.random.random(), random.random(), sep='|')")
            assert reply["status"] == "ok", reply
            seen.append(text.strip().split("|"))
        for i, (probe, cwd, threads, ppid, preloaded, _, _) in enumerate(seen):
            assert probe == f"kernel {i}" and cwd == str(tmp_path) and threads == "1"
            assert int(ppid) == server.process.pid and preloaded == "True"     # forked: imported before the fork
        assert seen[0][5] != seen[1][5] and seen[0][6] != seen[1][6]          # reseeded, not the server's state
    finally:
        for km, kc in kernels:
            kc.stop_channels()
            km.shutdown_kernel(now=True)


def test_sigint_interrupts_the_forked_kernel_and_shutdown_ends_the_launcher(server, tmp_path):
    km, kc = start(server, {}, tmp_path)
    try:
        msg_id = kc.execute("import time\ntime.sleep(60)", stop_on_error=False)   # an error would otherwise
        # abort the requests that reach the kernel while it handles it (ipykernel's stop_on_error), which on a busy
        # machine can include the next one
        time.sleep(1.0)
        km.interrupt_kernel()
        reply = kc.get_shell_msg(timeout=20)
        assert reply["parent_header"]["msg_id"] == msg_id
        assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
        assert run(kc, "assert 6 * 7 == 42")[1]["status"] == "ok"           # the kernel lives on (the reply on
        # the shell channel: a stream message can still be in flight behind the interrupted cell's on a busy machine)
    finally:
        kc.stop_channels()
        km.shutdown_kernel()
    assert km.provisioner is None or km.provisioner.process is None or km.provisioner.process.returncode == 0


def test_killing_the_launcher_ends_the_forked_kernel(server, tmp_path):
    km, kc = start(server, {}, tmp_path)
    pid = int(run(kc, "import os\nprint(os.getpid())")[0])
    launcher = km.provisioner.process
    assert pid != launcher.pid
    launcher.kill()                                                       # what the runner does on Ctrl-C
    launcher.wait()
    wait_for(lambda: ended(pid), 10, f"the forked kernel {pid} to end after its launcher was killed")
    kc.stop_channels()
    km.cleanup_resources()


def test_fork_server_off_leaves_kernels_fresh(monkeypatch):
    monkeypatch.setenv("HEADINFO_FORK_SERVER", "0")
    with execution.forked_kernels():
        assert execution.RUNNING.fork_server is None


def test_when_the_runner_dies_the_server_kernels_and_launchers_end_and_the_folder_goes(tmp_path):
    """The runner killed with SIGKILL: the server reads end of file on its input (what closing it here does), exits
    and removes its folder; its forked kernel, orphaned, ends (ipykernel's parent poller), and so does the launcher."""
    s = ForkServer(dict(os.environ), str(REPO_ROOT))
    try:
        assert s.wait_ready(timeout=180), "the fork server did not get ready in 180 s"
        km, kc = start(s, {}, tmp_path)
        pid = int(run(kc, "import os\nprint(os.getpid())")[0])
        s.process.stdin.close()                                          # the runner is gone
        s.process.wait(timeout=10)
        launcher = km.provisioner.process
        wait_for(lambda: ended(pid) and launcher.poll() is not None, 15, f"the orphaned kernel {pid} and its launcher to end")
        assert s.process.returncode == 0 and not os.path.exists(s.folder)
        kc.stop_channels()
        km.cleanup_resources()
    finally:
        if s.process.poll() is None:
            s.process.kill()
