"""The runner's --jobs N: notebooks run at once, each only after the notebooks it reads from (the stage graph,
written out by hand below as the independent truth), the longest chain first, failures and interrupts."""
import json
import re
import threading
import time
from pathlib import Path

import pytest

from lib import REPO_ROOT
from lib.pipeline.scheduler import default_jobs, kernel_threads, run_concurrently
from lib.pipeline.steps import build_steps, load_params

TINY = REPO_ROOT / "params" / "tiny.yaml"
# the notebooks whose files each notebook reads, directly (docs/conventions, lib/stages.py)
PARENTS = {"01_extract_activations": [], "02_phiid": ["01_extract_activations"], "03_phiid_diagnostics": ["02_phiid"],
           "04_ranking_variants": ["02_phiid", "03_phiid_diagnostics"], "05_ablation": ["04_ranking_variants"],
           "06_neuron_effects": ["01_extract_activations"], "07_qkov_interference": ["01_extract_activations"],
           "08_topology": ["02_phiid"], "09_task_behaviour": ["04_ranking_variants"],
           "10_head_finetuning": ["04_ranking_variants"], "11_local_synergy": ["02_phiid"]}


def tiny_steps(out):
    run, shared, sections = load_params(TINY, [f"out_dir={out}"])
    return build_steps(run, shared, sections)


class Recorder:
    """A run_one that sleeps `seconds[name]` and records (event, name, time) and the most steps seen at once."""

    def __init__(self, seconds=None, fail=()):
        self.events, self.now, self.most, self.lock = [], set(), 0, threading.Lock()
        self.seconds, self.fail = seconds or {}, set(fail)

    def __call__(self, step):
        with self.lock:
            self.events.append(("start", step.name, time.perf_counter()))
            self.now.add(step.name)
            self.most = max(self.most, len(self.now))
        time.sleep(self.seconds.get(step.name, 0.05))
        with self.lock:
            self.now.discard(step.name)
            self.events.append(("end", step.name, time.perf_counter()))
        if step.name in self.fail:
            raise RuntimeError(f"notebook {step.name} failed")

    def started(self):
        return [name for kind, name, _ in self.events if kind == "start"]

    def time(self, kind, name):
        return next(t for k, n, t in self.events if k == kind and n == name)


@pytest.mark.parametrize("jobs", [2, 3])
def test_every_notebook_starts_after_the_notebooks_it_reads_from(tmp_path, jobs):
    rec = Recorder()
    run_concurrently(tiny_steps(tmp_path / "run"), sorted(PARENTS), jobs, rec)
    assert sorted(rec.started()) == sorted(PARENTS)
    for name, parents in PARENTS.items():
        for parent in parents:
            assert rec.time("end", parent) <= rec.time("start", name), (parent, name)
    assert rec.most == jobs          # 06, 07 and 02 are ready together after 01: the runner used every slot


def test_the_longest_chain_of_recorded_seconds_starts_first(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    seconds = {"01_extract_activations": 12, "02_phiid": 5, "03_phiid_diagnostics": 7.5, "04_ranking_variants": 10,
               "05_ablation": 15, "06_neuron_effects": 10, "07_qkov_interference": 13, "08_topology": 10.6,
               "09_task_behaviour": 10.5, "10_head_finetuning": 26, "11_local_synergy": 12}
    (out / "manifest.json").write_text(json.dumps({"notebooks": {k: {"status": "ok", "seconds": v}
                                                                 for k, v in seconds.items()}}))
    rec = Recorder()
    run_concurrently(tiny_steps(out), sorted(PARENTS), 1, rec)
    # by hand: chains 10: 26, 05: 15, 07: 13, 11: 12, 08: 10.6, 09: 10.5, 06: 10; 04: 10 + 26; 03: 7.5 + 36;
    # 02: 5 + 43.5 (its other children 08, 11 are shorter); 01 first. One slot: every ready step by its chain.
    assert rec.started() == ["01_extract_activations", "02_phiid", "03_phiid_diagnostics", "04_ranking_variants",
                             "10_head_finetuning", "05_ablation", "07_qkov_interference", "11_local_synergy",
                             "08_topology", "09_task_behaviour", "06_neuron_effects"]


def test_a_failure_starts_nothing_more_and_lets_the_running_notebooks_finish(tmp_path):
    rec = Recorder(seconds={"02_phiid": 0.05, "06_neuron_effects": 0.6}, fail={"02_phiid"})
    with pytest.raises(RuntimeError, match="notebook 02_phiid failed"):
        run_concurrently(tiny_steps(tmp_path / "run"), sorted(PARENTS), 2, rec)
    # after 01: 02 (longest chain) and one of 06/07 start; 02 fails while the other still runs
    assert rec.started()[:2] == ["01_extract_activations", "02_phiid"] and len(rec.started()) == 3
    other = rec.started()[2]
    assert other in ("06_neuron_effects", "07_qkov_interference")
    assert ("end", other) in [(k, n) for k, n, _ in rec.events]      # it finished before the error was raised
    assert rec.time("start", other) < rec.time("end", "02_phiid")


def test_default_jobs_and_kernel_threads(monkeypatch):
    import os
    cpus = len(os.sched_getaffinity(0))
    monkeypatch.delenv("HEADINFO_JOBS", raising=False)
    assert default_jobs() == min(2, cpus)
    monkeypatch.setenv("HEADINFO_JOBS", "3")
    assert default_jobs() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert kernel_threads(2) == {}                     # the caller's thread count is kept (tests, SLURM jobs)
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert kernel_threads(1) == {}
    assert kernel_threads(2) == {"OMP_NUM_THREADS": str(max(1, cpus // 2)), "MKL_NUM_THREADS": str(max(1, cpus // 2))}


@pytest.mark.slow(reason="reads the session's tiny pipeline run")
def test_the_shared_tiny_run_ran_notebooks_at_once_in_graph_order(tiny_run_log):
    """The runner's log of the session's tiny run (default --jobs on this machine): every notebook started after
    its parents were done, and, with two CPUs or more, some notebooks ran at once."""
    lines = tiny_run_log["stdout"].splitlines()
    if not lines:
        pytest.skip("HEADINFO_TINY_RUN given: no runner log of this session")
    start = {m.group(1): i for i, l in enumerate(lines) if (m := re.match(r"\[run\] (\S+) -> ", l))}
    done = {m.group(1): i for i, l in enumerate(lines) if (m := re.match(r"\[run\] (\S+): done in", l))}
    assert set(start) == set(done) == set(PARENTS)
    for name, parents in PARENTS.items():
        assert all(done[p] < start[name] for p in parents), name
    overlapping = [a for a in start for b in start if a != b and start[a] < start[b] < done[a]]
    assert bool(overlapping) == (default_jobs() > 1), lines


def test_log_lines_of_notebooks_run_at_once_carry_the_notebook_name():
    import io
    from lib.pipeline.progress import LineWriter
    sink = io.StringIO()
    w = LineWriter(sink, "[05_ablation] ")
    for text in ("first ", "line\nsecond\n", "bar 10%\rbar 50%\r", "\nthird\n"):
        w.write(text)
    assert sink.getvalue() == ("[05_ablation] first line\n[05_ablation] second\n[05_ablation] bar 10%\n"
                               "[05_ablation] bar 50%\n\n[05_ablation] third\n")     # blank lines stay blank


def _alive(pid: int) -> bool:
    """pid exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow(reason="runs two notebooks of a tiny run at once and stops the runner with SIGTERM")
def test_sigterm_stops_every_running_kernel_and_records_their_notebooks_failed(tiny_run_copy):
    import signal
    import subprocess
    import sys
    from tests.test_run import _children
    out = tiny_run_copy
    before = json.loads((out / "manifest.json").read_text())["notebooks"]
    only = ["02_phiid", "06_neuron_effects", "07_qkov_interference"]       # all three read only 01: ready at once
    proc = subprocess.Popen([sys.executable, "-m", "lib.run", "--params", str(TINY), "--set", f"out_dir={out}",
                             "--quiet", "--force", "--jobs", "2", "--only", *only], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)

    def running():
        entries = json.loads((out / "manifest.json").read_text())["notebooks"]
        return sorted(n for n in only if entries[n].get("status") == "running")
    deadline = time.time() + 300
    while (len(running()) < 2 or len(_children(proc.pid)) < 2) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    started, kernels = running(), _children(proc.pid)
    assert len(started) == 2 and proc.poll() is None, (started, proc.poll())
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 143, stderr[-2000:]
    entries = json.loads((out / "manifest.json").read_text())["notebooks"]
    for name in started:
        assert entries[name]["status"] == "failed" and entries[name]["error"].startswith("interrupted"), entries[name]
    (waiting,) = set(only) - set(started)
    assert entries[waiting] == before[waiting]                       # never started, its record untouched
    time.sleep(1)
    assert not [pid for pid in kernels if _alive(pid)], "kernels left running"


def test_a_kernel_gets_all_cpus_alone_and_its_share_beside_others(tmp_path, monkeypatch):
    import os
    from lib.pipeline import execution
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    seen = {}
    rec = Recorder()

    def run_one(step):
        seen[step.name] = dict(getattr(execution.RUNNING.local, "threads", {}))
        rec(step)
    run_concurrently(tiny_steps(tmp_path / "run"), sorted(PARENTS), 2, run_one)
    half = str(max(1, len(os.sched_getaffinity(0)) // 2))
    assert seen["01_extract_activations"] == {}                       # nothing else can run beside it
    assert seen["02_phiid"] == {"OMP_NUM_THREADS": half, "MKL_NUM_THREADS": half}     # 06 and 07 ready too


def test_lines_printed_by_notebooks_run_at_once_reach_stdout_whole():
    """print() writes its text and its newline separately, so two runner threads printing at once could run their
    lines together ("[run] 02_phiid -> ...[run] 07_qkov_interference -> ..." was seen in a runner log): under
    whole_lines every write that reaches the stream is whole lines, and every line arrives intact."""
    import sys
    import threading
    from lib.pipeline.scheduler import whole_lines

    class Recorder:
        def __init__(self):
            self.writes = []

        def write(self, text):
            self.writes.append(text)

        def flush(self):
            pass
    recorder, real = Recorder(), sys.stdout
    sys.stdout = recorder
    try:
        with whole_lines():
            def talk(name):
                for i in range(300):
                    print(f"[run] {name} line {i}", flush=True)
            threads = [threading.Thread(target=talk, args=(n,)) for n in ("a", "b", "c")]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            print("unfinished", end="")
    finally:
        sys.stdout = real
    written = [w for w in recorder.writes if w]
    assert all(w.endswith("\n") for w in written[:-1]) and written[-1] == "unfinished"   # flushed at the end
    lines = "".join(written[:-1]).splitlines()
    assert sorted(lines) == sorted(f"[run] {n} line {i}" for n in "abc" for i in range(300))
