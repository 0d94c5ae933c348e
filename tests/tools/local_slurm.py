"""A real single-node SLURM cluster on this machine, for tests and benchmarks (wraps start/stop-local-slurm.sh).

    cluster = LocalSlurm()            # state, config and logs in a fresh /tmp/hi-slurm-XXXX (short: munge socket)
    cluster.start()                   # installs slurm-wlm + munge with apt-get when missing; SlurmUnavailable if not
    subprocess.run([...], env=cluster.env)      # SLURM_CONF set: sbatch/squeue/scontrol talk to this cluster
    cluster.jobs("12,13")             # one dict per job / array task, from `scontrol -o show job`
    cluster.stop()                    # cancels jobs, ends the daemons by their recorded PIDs; -> PIDs still alive

Needs root (the daemons run as root, as in CI).
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE"}


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be installed or started on this machine (the reason is the message)."""


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port_pair(start: int = 16817) -> int:
    """A port p with p and p + 1 free (slurmctld, slurmd)."""
    for p in range(start, start + 2000, 2):
        if _port_free(p) and _port_free(p + 1):
            return p
    raise SlurmUnavailable("no two free consecutive TCP ports for slurmctld/slurmd")


class LocalSlurm:
    def __init__(self, cpus: int = 16, gpus: int = 4, kill_invalid_depend: bool = False, keep_dir: bool = False):
        self.dir = Path(tempfile.mkdtemp(prefix="hi-slurm-"))
        self.port = free_port_pair()
        self.keep_dir = keep_dir
        self.settings = {"SLURM_LOCAL_DIR": str(self.dir), "SLURM_LOCAL_PORT": str(self.port),
                         "SLURM_LOCAL_LINK_ETC": "0", "SLURM_LOCAL_CPUS": str(cpus), "SLURM_LOCAL_GPUS": str(gpus),
                         "SLURM_LOCAL_KILL_INVALID_DEPEND": "1" if kill_invalid_depend else "0",
                         "SLURM_LOCAL_MIN_JOB_AGE": "7200"}
        path = os.environ.get("PATH", "/usr/bin:/bin")
        for extra in ("/usr/sbin", "/sbin"):          # slurmctld, slurmd, munged live in sbin
            if extra not in path.split(":"):
                path += ":" + extra
        self.env = {**os.environ, **self.settings, "SLURM_CONF": str(self.dir / "etc" / "slurm.conf"),
                    "DEBIAN_FRONTEND": "noninteractive", "PATH": path}
        self.started = False
        self.start_log = ""
        self.installed_now = False

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: int = 600) -> float:
        """Install if needed and start; -> seconds taken. Raises SlurmUnavailable with the reason."""
        if os.geteuid() != 0:
            self.stop()
            raise SlurmUnavailable("starting slurmctld/slurmd/munged needs root")
        self.installed_now = not all(shutil.which(b, path=self.env["PATH"])
                                     for b in ("slurmctld", "slurmd", "sbatch", "munged"))
        if self.installed_now and not shutil.which("apt-get"):
            self.stop()
            raise SlurmUnavailable("SLURM is not installed and there is no apt-get to install slurm-wlm + munge")
        t0 = time.perf_counter()
        try:
            r = subprocess.run([str(TOOLS / "start-local-slurm.sh")], env=self.env, capture_output=True, text=True,
                               timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            self.stop()
            raise SlurmUnavailable(f"start-local-slurm.sh did not finish within {timeout} s: {e.stdout}") from None
        self.start_log = r.stdout + r.stderr
        if r.returncode != 0:
            self.stop()
            raise SlurmUnavailable(f"start-local-slurm.sh failed (exit {r.returncode}):\n{self.start_log[-3000:]}")
        self.started = True
        return time.perf_counter() - t0

    def pids(self) -> dict[str, int]:
        for name in ("pids", "pids.stopped"):
            f = self.dir / name
            if f.exists():
                return {k: int(v) for k, v in (line.split() for line in f.read_text().splitlines() if line.strip())}
        return {}

    def stop(self) -> list[int]:
        """Cancel every job and end the daemons by their recorded PIDs; -> PIDs still alive afterwards."""
        pids = self.pids()
        if (self.dir / "pids").exists():
            subprocess.run([str(TOOLS / "stop-local-slurm.sh")], env=self.env, capture_output=True, text=True,
                           timeout=120, stdin=subprocess.DEVNULL)
        alive = [p for p in pids.values() if Path(f"/proc/{p}").exists()]
        if not alive and not self.keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.started = False
        return alive

    # ------------------------------------------------------------------ jobs
    def run(self, *args: str, check: bool = True, timeout: int = 120) -> subprocess.CompletedProcess:
        r = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed (exit {r.returncode}): {r.stdout}{r.stderr}")
        return r

    def jobs(self, ids: str | list) -> list[dict]:
        """One dict per job or array task: JobId, ArrayJobId, ArrayTaskId, JobName, JobState, Reason, ExitCode,
        StartTime, EndTime, Dependency, Restarts... (scontrol -o show job)."""
        ids = ids if isinstance(ids, str) else ",".join(str(i) for i in ids)
        out = []
        for one in ids.split(","):
            r = self.run("scontrol", "-o", "show", "job", one, check=False)
            for line in r.stdout.splitlines():
                fields = dict(re.findall(r"(\w+)=(\S*)", line))
                if "JobId" in fields:
                    out.append(fields)
        return out

    def wait(self, ids, timeout: float = 900, poll: float = 0.5) -> list[dict]:
        """Until every listed job (array tasks included) is in a finished state; -> their final records."""
        deadline = time.time() + timeout
        while True:
            jobs = self.jobs(ids)
            if jobs and all(j["JobState"] in FINISHED for j in jobs):
                return jobs
            if time.time() > deadline:
                raise TimeoutError("jobs not finished after %d s: %s" % (timeout, [(j["JobId"], j.get("ArrayTaskId"),
                                   j["JobState"], j.get("Reason")) for j in jobs]))
            time.sleep(poll)

    def tail_logs(self, n: int = 40) -> str:
        text = []
        for name in ("slurmctld.log", "slurmd.log"):
            f = self.dir / "log" / name
            if f.exists():
                text.append(f"--- {f}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-n:]))
        return "\n".join(text)
