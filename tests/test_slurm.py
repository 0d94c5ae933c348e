"""slurm/: the pipeline on a real single-node SLURM cluster started on this machine.

The slow tests start slurmctld + slurmd + munged (tests/tools/start-local-slurm.sh: apt-get installs slurm-wlm and
munge when missing; 4 fake GPUs so that the GPU jobs' --gres=gpu:1 is accepted and the code falls back to CPU;
no cluster-wide kill_invalid_depend, so each job's own --kill-on-invalid-dep=yes is what is tested), run
`slurm/pipeline.sh params/tiny.yaml` into a temporary out_dir, and check every job, artifact, report and log.
On the way, one ablation array task is cancelled while it runs (after its first checkpoint): the merge and the
notebooks that read the ablation must be cancelled (not left pending), the others still run, the report job
runs, and resubmitting with `--from 05_ablation` must resume that shard from its checkpoint. Every daemon is stopped by its recorded PID.
When SLURM cannot be installed or started here they fail with the reason, unless HEADINFO_ALLOW_SKIP=1 says to
skip them.
The dry-run test needs no SLURM.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from lib import REPO_ROOT
from tests.tools.waiting import wait_for

# HEADINFO_SLURM_TEST_PARAMS: run the same checks on another params file (e.g. a cluster's params on a real cluster)
PARAMS = Path(os.environ.get("HEADINFO_SLURM_TEST_PARAMS", REPO_ROOT / "params" / "tiny.yaml")).resolve()
PIPELINE = REPO_ROOT / "slurm" / "pipeline.sh"
SHARDS = 2
GPU_NOTEBOOKS = {"01_extract_activations", "05_ablation", "06_neuron_effects", "07_qkov_interference",
                 "09_task_behaviour", "10_head_finetuning"}
# artifacts each notebook must leave in the run folder (conventions: "Artifacts of a run")
ARTIFACTS = {"01_extract_activations": ["activations.npz"], "02_phiid": ["phiid_per_prompt.npz"],
             "04_ranking_variants": ["rankings.csv"], "05_ablation": ["ablation.csv"],
             "06_neuron_effects": ["neuron_effects.csv"], "07_qkov_interference": ["interference.npz"],
             "08_topology": ["topology.json", "modules.csv"],
             "09_task_behaviour": ["behaviour.csv", "behaviour_generations.jsonl", "behaviour_summary.json"],
             "10_head_finetuning": ["finetune.csv", "finetune_deltas.csv", "finetune_summary.json"],
             "11_local_synergy": ["local_phiid.npz", "local_summary.json"]}


def sections(params: Path = PARAMS) -> list[str]:
    """The pipeline of a params file: its notebook sections that exist in notebooks/."""
    raw = yaml.safe_load(params.read_text())
    return sorted(k for k in raw if re.match(r"^\d\d_", k) and (REPO_ROOT / "notebooks" / f"{k}.ipynb").exists())


def shardable(nb: str) -> bool:
    from lib.pipeline.notebook_params import declared_parameters
    return "shard" in declared_parameters(REPO_ROOT / "notebooks" / f"{nb}.ipynb")


def parse_submission(stdout: str) -> dict[str, str]:
    """'submitted <label...> <id>' lines -> {label: id}; labels: notebook, '<nb> shards', '<nb> merge', 'report'."""
    jobs = {}
    for line in stdout.splitlines():
        m = re.match(r"^submitted (.+?) (<[^>]+>|\d+)(?: array \S+)?(?: \(.*\))?$", line)
        if m:
            jobs[m.group(1)] = m.group(2)
    return jobs


# ----------------------------------------------------------------------------- no cluster needed

def test_scripts_parse_with_bash():
    for script in sorted((REPO_ROOT / "slurm").glob("*.s*")) + sorted((REPO_ROOT / "tests" / "tools").glob("*.sh")):
        r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert r.returncode == 0, (script, r.stderr)


# the notebooks whose files each notebook reads: its afterok parents in the job graph
PARENTS = {"01_extract_activations": [], "02_phiid": ["01_extract_activations"], "03_phiid_diagnostics": ["02_phiid"],
           "04_ranking_variants": ["02_phiid", "03_phiid_diagnostics"], "05_ablation": ["04_ranking_variants"],
           "06_neuron_effects": ["01_extract_activations"], "07_qkov_interference": ["01_extract_activations"],
           "08_topology": ["02_phiid"], "09_task_behaviour": ["04_ranking_variants"],
           "10_head_finetuning": ["04_ranking_variants"], "11_local_synergy": ["02_phiid"]}


def blocked_by(nb: str) -> set[str]:
    """nb and every notebook that reads its files, directly or through others (cancelled when nb fails)."""
    blocked, added = {nb}, True
    while added:
        added = {n for n, parents in PARENTS.items() if set(parents) & blocked} - blocked
        blocked |= added
    return blocked


def dry_run(tmp_path, out, *args) -> tuple[dict[str, str], str]:
    """pipeline.sh --dry-run -> ({label: sbatch command}, stdout)."""
    r = subprocess.run([str(PIPELINE), str(PARAMS), "--dry-run", "--shards", str(SHARDS), "--set", f"out_dir={out}",
                        *args], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    commands = [l for l in r.stdout.splitlines() if l.startswith("sbatch ")]
    jobs = parse_submission(r.stdout)
    assert len(commands) == len(jobs)
    return dict(zip(jobs, commands)), r.stdout


def dependency(cmd: str) -> tuple[str | None, set[str]]:
    """An sbatch command's --dependency -> (kind, {placeholder labels or job ids}); (None, set()) when it has none."""
    m = re.search(r"--dependency=(after\w+):(\S+)", cmd)
    if not m:
        return None, set()
    return m.group(1), {re.sub(r"[\\<>]", "", d) for d in m.group(2).split(":")}


def done_label(nb: str) -> str:
    """The dry-run placeholder of the job after which a notebook's files are complete (its merge when sharded)."""
    return f"{nb}-merge" if shardable(nb) else nb


@pytest.mark.slow(reason="slurm/pipeline.sh --dry-run: each call starts Python, checks the params and imports torch for the cost table")
def test_dry_run_prints_the_graph_and_submits_nothing(tmp_path):
    out = tmp_path / "run"
    cmds, text = dry_run(tmp_path, out)
    expected = []
    for nb in sections():
        expected += [f"{nb} shards", f"{nb} merge"] if shardable(nb) else [nb]
    assert list(cmds) == expected + ["report"]
    assert not out.exists()                                    # nothing created, nothing submitted
    assert set(sections()) <= set(PARENTS), "a notebook of the pipeline has no declared parents in this test"
    for label, cmd in cmds.items():
        nb = label.split()[0]
        kind, waits = dependency(cmd)
        assert "--kill-on-invalid-dep=yes" in cmd and "--parsable" in cmd
        assert ("--gres=gpu:1" in cmd) == (nb in GPU_NOTEBOOKS and not label.endswith(("merge", "report"))), cmd
        assert f"--set out_dir={out}" in cmd or label == "report"
        if label == "report":        # after every job, also after a failure
            assert kind == "afterany" and waits == {l.replace(" ", "-") for l in cmds if l != "report"}, cmd
        elif label.endswith("merge"):
            assert kind == "afterok" and waits == {f"{nb}-shards"}, cmd
            assert f"run_notebook.sbatch {PARAMS} {nb} --set {nb}.shard=\\\"\\\"" in cmd, cmd
        else:
            parents = {done_label(p) for p in PARENTS[nb] if p in sections()}
            assert waits == parents and kind == ("afterok" if parents else None), (label, cmd)
        if label.endswith("shards"):
            assert f"--array=1-{SHARDS}" in cmd and "--requeue" in cmd and f"run_shards.sbatch {PARAMS} {nb} {SHARDS}" in cmd
        elif label != "report" and not label.endswith("merge"):
            assert f"run_notebook.sbatch {PARAMS} {nb}" in cmd
    assert "  after 02_phiid 03_phiid_diagnostics" in text        # the graph, as printed for the user


@pytest.mark.slow(reason="slurm/pipeline.sh --dry-run: each call starts Python, checks the params and imports torch for the cost table")
def test_dry_run_from_waits_for_the_given_job_where_parents_are_not_submitted(tmp_path):
    cmds, _ = dry_run(tmp_path, tmp_path / "run", "--from", "05_ablation", "--after", "4242")
    assert "04_ranking_variants" not in cmds and "01_extract_activations" not in cmds
    for label, cmd in cmds.items():
        nb = label.split()[0]
        if label == "report":
            assert dependency(cmd) == ("afterany", {l.replace(" ", "-") for l in cmds if l != "report"})
        elif not label.endswith("merge"):
            submitted = {done_label(p) for p in PARENTS[nb] if p in {l.split()[0] for l in cmds}}
            assert dependency(cmd) == ("afterok", submitted or {"4242"}), (label, cmd)


@pytest.mark.slow(reason="slurm/pipeline.sh --dry-run: each call starts Python, checks the params and imports torch for the cost table")
def test_dry_run_forces_the_notebooks_after_the_first_one_with_work(tmp_path):
    """Each job is its own runner call: notebooks after one that will run must get --force (stale inputs)."""
    from lib.pipeline.bookkeeping import current_code, record_success
    from lib.pipeline.steps import Step, build_steps, load_params, params_hash, shard_suffix
    out = tmp_path / "run"
    run, shared, secs = load_params(PARAMS, [f"out_dir={out}"])
    steps = build_steps(run, shared, secs)

    def mark_done(step, shard=None):
        if shard is not None:
            suffix = shard_suffix(shard)
            step = Step(step.name, step.path, {**step.params, "shard": shard}, out / f"{step.name}{suffix}.ipynb",
                        out / "html" / f"{step.name}{suffix}.html")
        step.output.parent.mkdir(parents=True, exist_ok=True)
        step.output.write_text("{}")
        earlier = [s.name for s in steps if s.name < step.name]
        record_success(step, set(), earlier, status="ok", params_hash=params_hash(step.params),
                       code=current_code(step))            # what the runner records: the code fingerprint

    for step in steps:
        if shardable(step.name):
            for shard in [""] + [f"{i}/{SHARDS}" for i in range(1, SHARDS + 1)]:
                mark_done(step, shard)
        else:
            mark_done(step)

    def plan():
        r = subprocess.run([str(PIPELINE), str(PARAMS), "--dry-run", "--shards", str(SHARDS), "--set", f"out_dir={out}"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        cmds = [l for l in r.stdout.splitlines() if l.startswith("sbatch ")]
        return dict(zip(parse_submission(r.stdout), cmds)), r.stdout

    cmds, text = plan()
    assert not any(" --force" in c for c in cmds.values()), text       # everything up to date: nothing forced
    submitted = [l for l in text.splitlines() if l.startswith("submitted ") and not l.startswith("submitted report")]
    assert submitted and all(l.endswith("(up to date: the job will skip it)") for l in submitted), text
    names = [s.name for s in steps]
    (out / "02_phiid.ipynb").unlink()               # 02 has work again: what reads its files reruns, nothing else
    cmds, text = plan()
    for label, cmd in cmds.items():
        nb = label.split()[0]
        assert (" --force" in cmd) == (label != "report" and nb in blocked_by("02_phiid") - {"02_phiid"}), (label, cmd)
    (out / f"{names[0]}.ipynb").unlink()                                   # the first notebook has work again
    cmds, text = plan()
    assert len(cmds) > 2
    for label, cmd in cmds.items():
        nb = label.split()[0]
        assert (" --force" in cmd) == (label != "report" and names.index(nb) > 0), (label, cmd)


@pytest.mark.slow(reason="slurm/pipeline.sh --dry-run: each call starts Python, checks the params and imports torch for the cost table")
def test_pipeline_refuses_bad_params_before_submitting(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(PARAMS.read_text().replace("  n_tokens: 24\n", "  n_tokens: many\n", 1))
    r = subprocess.run([str(PIPELINE), str(bad), "--dry-run"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "n_tokens" in r.stderr and "sbatch" not in r.stdout
    r = subprocess.run([str(PIPELINE), str(PARAMS), "--dry-run", "--from", "99_nope"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "99_nope" in r.stderr


# ----------------------------------------------------------------------------- the real cluster

def claim_the_one_cluster(session_folder: Path) -> None:
    """Fail when a second local SLURM cluster is started in this pytest session: the tests on it are one xdist work
    unit (tests/conftest.py), and two clusters would run the tiny pipeline twice, on the same 2 cores."""
    mark = session_folder / "slurm-cluster-started"
    try:
        fd = os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        pytest.fail(f"a second local SLURM cluster in this session (the first: {mark.read_text()}): the tests on the "
                    f"cluster must run as one xdist work unit (tests/conftest.py, pytest_xdist_make_scheduler)")
    os.write(fd, f"worker {os.environ.get('PYTEST_XDIST_WORKER', 'main')}, pid {os.getpid()}".encode())
    os.close(fd)


@pytest.fixture(scope="module")
def cluster(session_folder):
    from tests.tools.local_slurm import LocalSlurm, SlurmUnavailable
    claim_the_one_cluster(session_folder)
    t0 = time.perf_counter()
    c = LocalSlurm(cpus=16, gpus=4, kill_invalid_depend=False)
    try:
        c.start_seconds = c.start()
    except SlurmUnavailable as e:
        print(f"\nSLURM unavailable: {e}")
        if os.environ.get("HEADINFO_ALLOW_SKIP") != "1":      # green must mean it ran
            pytest.fail(f"SLURM cannot be installed or started here: {e} (set HEADINFO_ALLOW_SKIP=1 to skip instead)")
        pytest.skip(f"SLURM cannot be installed or started here (HEADINFO_ALLOW_SKIP=1): {e}")
    c.t0 = t0
    try:
        yield c
    finally:
        pids = c.pids()
        alive = c.stop()
        assert pids and not alive, f"daemons still alive after stop: {alive} (recorded {pids})"


def submit(cluster, *args) -> tuple[dict[str, str], str]:
    r = cluster.run(str(PIPELINE), str(PARAMS), "--shards", str(SHARDS), *args, timeout=300)
    return parse_submission(r.stdout), r.stdout


def ablation_checkpoint(out: Path, i: int) -> dict | None:
    path = out / "ablation_shards" / f"shard-{i}-of-{SHARDS}.npz"
    if not path.exists():
        return None
    try:
        with np.load(path) as d:
            return {k: d[k] for k in ("assigned", "done", "kl")}
    except (OSError, ValueError, KeyError):      # being replaced right now: read it again later
        return None


def busy_and_idle(jobs: list[dict]) -> dict:
    """Where the pipeline's wall time went (SLURM's 1 s timestamps): busy_s, seconds in which some job ran;
    idle_s, seconds from the first submission to the last end in which none ran (scheduler latency, the test's
    own polling and the resubmission); jobs, how many jobs and array tasks ran."""
    from datetime import datetime

    def t(text):
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S").timestamp()
    ran = sorted((t(j["StartTime"]), t(j["EndTime"])) for j in jobs if j.get("StartTime", "Unknown") != "Unknown"
                 and j.get("EndTime", "Unknown") != "Unknown" and j["JobState"] != "PENDING")
    if not ran:
        return {}
    busy, (start, end) = 0.0, ran[0]
    for a, b in ran[1:]:
        if a > end:
            busy, start = busy + end - start, a
        end = max(end, b)
    busy += end - start
    first = min(t(j["SubmitTime"]) for j in jobs)
    return {"busy_s": busy, "idle_s": max(r[1] for r in ran) - first - busy, "jobs": len(ran)}


@pytest.fixture(scope="module")
def pipeline(cluster):
    """Run the tiny pipeline to the end on the cluster, with one cancelled and resubmitted ablation shard."""
    out = Path(tempfile.mkdtemp(prefix="hi-slurm-run-"))
    record = {"out": out, "cancel": None}
    t_submit = time.perf_counter()
    jobs, text = submit(cluster, "--set", f"out_dir={out}")
    record["first_submission"] = jobs
    assert "report" in jobs, text
    if "05_ablation shards" in jobs:
        array = jobs["05_ablation shards"]
        task = f"{array}_{SHARDS}"

        def running_with_checkpoint():
            j = cluster.jobs(task)
            if j and j[0]["JobState"] in ("COMPLETED", "FAILED", "CANCELLED"):
                pytest.fail(f"shard {SHARDS} ended ({j[0]['JobState']}) before it could be cancelled mid-run: "
                            f"give the test ablation more work")
            ck = ablation_checkpoint(out, SHARDS)
            return j and j[0]["JobState"] == "RUNNING" and ck is not None and ck["done"].any() and \
                not ck["done"][ck["assigned"]].all()

        wait_for(running_with_checkpoint, 600, f"ablation task {task} running with a partial checkpoint", 0.1)
        cluster.run("scancel", task)
        state = wait_for(lambda: (j := cluster.jobs(task)) and j[0]["JobState"] in ("CANCELLED", "COMPLETED")
                         and j[0], 60, f"{task} to end", poll=0.2)
        assert state["JobState"] == "CANCELLED", state
        before = ablation_checkpoint(out, SHARDS)
        # the merge and what reads 05's files are cancelled (never satisfiable), not left pending; the notebooks
        # that do not read them run to the end; the report runs after all of them
        waited = [jobs[k] for k in jobs if k not in ("report", "05_ablation shards")]
        final = cluster.wait(waited + [jobs["report"]], timeout=1200)
        record["cancel"] = {"task": task, "before": before, "after_cancel": final,
                            "index_after_cancel": (out / "html" / "index.html").read_text()}
        jobs2, text2 = submit(cluster, "--set", f"out_dir={out}", "--from", "05_ablation")
        record["resubmission"] = jobs2
        record["resubmitted_array"] = jobs2["05_ablation shards"]
        final_jobs = list(jobs2.values())
        record["earlier_jobs"] = [jobs[k] for k in list(jobs)[:list(jobs).index("05_ablation shards")]]
    else:
        final_jobs = list(jobs.values())
        record["earlier_jobs"] = []
    record["final"] = cluster.wait(final_jobs, timeout=1200)
    record["earlier"] = cluster.wait(record["earlier_jobs"], timeout=60) if record["earlier_jobs"] else []
    record["seconds_pipeline"] = time.perf_counter() - t_submit
    record["seconds_from_nothing"] = time.perf_counter() - cluster.t0
    ids = list(record["first_submission"].values()) + list((record.get("resubmission") or {}).values())
    summary = {"installed_now": cluster.installed_now, "cluster_start_s": round(cluster.start_seconds, 1),
               "pipeline_s": round(record["seconds_pipeline"], 1), **busy_and_idle(cluster.jobs(ids)),
               "from_nothing_to_finished_s": round(record["seconds_from_nothing"], 1),
               "notebooks": sections(), "shards": SHARDS, "cancel_and_resubmit": record["cancel"] is not None}
    print("\nSLURM tiny pipeline:", json.dumps(summary))
    if os.environ.get("SLURM_BENCH_JSON"):
        Path(os.environ["SLURM_BENCH_JSON"]).write_text(json.dumps(summary, indent=2))
    yield record
    shutil.rmtree(out, ignore_errors=True)


def states(jobs: list[dict]) -> list[tuple]:
    return [(j["JobName"], j.get("ArrayTaskId", ""), j["JobState"], j["ExitCode"], j.get("Reason")) for j in jobs]


@pytest.mark.slow(reason="the tiny pipeline on a local SLURM cluster")
def test_pipeline_runs_to_the_end_with_every_artifact(pipeline):
    jobs = pipeline["final"] + pipeline["earlier"]
    assert all(j["JobState"] == "COMPLETED" and j["ExitCode"] == "0:0" for j in jobs), states(jobs)
    out = pipeline["out"]
    from lib.pipeline.report import check_run
    from lib.storage.store import read_manifest
    manifest = read_manifest(out)["notebooks"]
    for nb in sections():
        assert manifest[nb]["status"] == "ok", (nb, manifest[nb])
        assert (out / f"{nb}.ipynb").exists() and (out / "html" / f"{nb}.html").exists(), nb
        for name in ARTIFACTS.get(nb, []):
            assert (out / name).stat().st_size > 0, name
        if shardable(nb):
            for i in range(1, SHARDS + 1):
                stem = f"{nb}.shard-{i}-of-{SHARDS}"
                assert manifest[stem]["status"] == "ok" and (out / "html" / f"{stem}.html").exists(), stem
    assert (out / "html" / "index.html").exists()
    assert check_run(out) == []          # no failed notebook, no error output, no traceback in any report
    # GPU notebooks ran with a (fake) GPU allocated; CPU notebooks and every merge job (it only gathers shards) without
    for log in (out / "logs").glob("*.out"):
        nb = log.name.split(".")[0]
        if nb in GPU_NOTEBOOKS and ".merge." not in log.name:
            assert "CUDA_VISIBLE_DEVICES=(none)" not in log.read_text(), log.name
        elif nb in sections():
            assert "CUDA_VISIBLE_DEVICES=(none)" in log.read_text(), log.name


@pytest.mark.slow(reason="the tiny pipeline on a local SLURM cluster")
def test_cancelled_shard_stops_what_depends_on_it_and_resumes_when_resubmitted(pipeline):
    if pipeline["cancel"] is None:
        pytest.skip("params/tiny.yaml has no 05_ablation section yet: nothing to cancel")
    c = pipeline["cancel"]
    after = {(j["JobName"], j.get("ArrayTaskId", "")): j for j in c["after_cancel"]}
    report = [j for j in c["after_cancel"] if j["JobName"].endswith(":report")]
    assert report and report[0]["JobState"] == "COMPLETED"                 # afterany: the index shows the failure
    blocked = blocked_by("05_ablation")
    for j in c["after_cancel"]:
        if j["JobName"].endswith(":report"):
            continue
        if j["JobName"].split(":")[1] in blocked:        # the merge, and what reads the ablation
            assert j["JobState"] == "CANCELLED" and j["Reason"] == "DependencyNeverSatisfied", states([j])
        else:                                            # a graph, not a chain: the other notebooks still ran
            assert j["JobState"] == "COMPLETED", states([j])
    assert any(j["JobName"].split(":")[1] == "06_neuron_effects" for j in c["after_cancel"]) or \
        "06_neuron_effects" not in sections()
    assert "Problems" in c["index_after_cancel"] and f"05_ablation.shard-{SHARDS}-of-{SHARDS}" in c["index_after_cancel"]
    before = c["before"]
    done_before = before["done"][before["assigned"]].all(-1)                 # units finished before the cancel
    assert 0 < done_before.sum() < len(done_before)
    # resumed: the resubmitted task had only the remaining units to do, the finished ones kept their values
    out = pipeline["out"]
    array = pipeline["resubmitted_array"]
    log = (out / "logs" / f"05_ablation.shard-{SHARDS}-of-{SHARDS}.{array}_{SHARDS}.out").read_text()
    remaining = int(len(done_before) - done_before.sum())
    assert re.search(rf"ablation \w+ shard {SHARDS}/{SHARDS}:\s+0%\|[^|]*\| 0/{remaining} ", log), log[-3000:]
    final = ablation_checkpoint(out, SHARDS)
    assert final["done"][final["assigned"]].all()
    units = np.argwhere(before["assigned"])[done_before]
    for g, j in units:
        np.testing.assert_array_equal(final["done"][g, j], before["done"][g, j])
    kept = np.isfinite(before["kl"])
    np.testing.assert_array_equal(final["kl"][kept], before["kl"][kept])
    # the finished shard is skipped: nothing it reads ran since (the up-to-date rule follows the graph, lib.pipeline.steps.PARENTS)
    log1 = (out / "logs" / f"05_ablation.shard-1-of-{SHARDS}.{array}_1.out").read_text()
    assert "up to date (same parameters, inputs and outputs), skipped" in log1, log1[-3000:]


@pytest.mark.slow(reason="the tiny pipeline on a local SLURM cluster")
def test_job_logs_are_readable(pipeline):
    logs = sorted((pipeline["out"] / "logs").glob("*.out"))
    assert logs
    finished = re.compile(r"finished with exit code 0 after \d+ s")
    for log in logs:
        text = log.read_text()
        assert "\r" not in text, f"{log.name}: carriage returns in the log"
        assert len(text.splitlines()) < 400, f"{log.name}: {len(text.splitlines())} lines"
        assert text.startswith("== "), log.name                              # the job header
        if not log.name.startswith("report."):
            cancelled_task = pipeline["cancel"] and log.name.endswith(f"{pipeline['cancel']['task']}.out")
            assert cancelled_task or finished.search(text), f"{log.name}:\n{text[-1500:]}"
    extract = next(l for l in logs if l.name.startswith("01_extract_activations."))
    progress = [l for l in extract.read_text().splitlines() if re.search(r"generate .*\d+%\|", l)]
    assert progress and any("100%|" in l for l in progress)               # text progress bars, one line each


def assert_same_results(reference: Path, out: Path) -> None:
    """The numbers a run computes (activations, PhiID, rankings, ablation KL) equal in two runs of the same params
    (to float32 rounding: another process, shards and a resumed shard may sum in another order)."""
    import pandas as pd
    with np.load(reference / "activations.npz") as a, np.load(out / "activations.npz") as b:
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
        np.testing.assert_allclose(a["activations"], b["activations"], rtol=1e-4, atol=1e-6)
    with np.load(reference / "phiid_per_prompt.npz") as a, np.load(out / "phiid_per_prompt.npz") as b:
        for atom in ("sts", "rtr", "xtx"):
            np.testing.assert_allclose(a[atom], b[atom], rtol=1e-3, atol=1e-6, err_msg=atom)
    ra, rb = pd.read_csv(reference / "rankings.csv"), pd.read_csv(out / "rankings.csv")
    pd.testing.assert_frame_equal(ra, rb, check_exact=False, rtol=1e-3, atol=1e-6)
    keys = ["ordering", "variant", "seed", "n_removed", "perturbation"]
    aa, ab = (pd.read_csv(p / "ablation.csv").sort_values(keys).reset_index(drop=True) for p in (reference, out))
    pd.testing.assert_frame_equal(aa[keys], ab[keys])
    np.testing.assert_allclose(aa["kl_mean"], ab["kl_mean"], rtol=1e-3, atol=1e-7)


@pytest.mark.slow(reason="the tiny pipeline on a local SLURM cluster, compared with the session's tiny run")
def test_cluster_results_equal_the_local_tiny_run(pipeline, tiny_run):
    """The job graph (shards, merges, a cancelled and resumed shard) computes what one local runner call computes:
    checked against the session's shared tiny run (tests/conftest.py) instead of recomputing a reference."""
    if PARAMS != (REPO_ROOT / "params" / "tiny.yaml").resolve():
        pytest.skip(f"HEADINFO_SLURM_TEST_PARAMS={PARAMS}: the shared run is of params/tiny.yaml")
    assert_same_results(tiny_run, pipeline["out"])


@pytest.fixture
def private_tmp():
    """A temporary directory outside pytest's basetemp (which a concurrent pytest session may prune)."""
    path = Path(tempfile.mkdtemp(prefix="hi-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow(reason="the tiny pipeline on a local SLURM cluster and a headless browser")
def test_run_index_renders_in_chromium(pipeline, private_tmp):
    from tests.tools.browser import dump_dom, ensure_chromium, html_attributes, image_stats, screenshot
    chromium, why = ensure_chromium()
    if not chromium:
        pytest.skip(f"no headless browser: {why}")
    index = pipeline["out"] / "html" / "index.html"
    attrs = html_attributes(dump_dom(chromium, index.as_uri()))
    assert attrs.get("data-report-ready") == "1" and int(attrs["data-images-total"]) > 0, attrs
    assert attrs["data-images-ok"] == attrs["data-images-total"], attrs
    shot = screenshot(chromium, index.as_uri(), private_tmp / "slurm_index.png")
    assert image_stats(shot)["non_white_fraction"] > 0.02
    if os.environ.get("REPORT_SCREENSHOT_DIR"):
        shutil.copy(shot, Path(os.environ["REPORT_SCREENSHOT_DIR"]) / "tiny_slurm_index.png")
        for nb in sections()[:7]:
            screenshot(chromium, (pipeline["out"] / "html" / f"{nb}.html").as_uri(),
                       Path(os.environ["REPORT_SCREENSHOT_DIR"]) / f"tiny_{nb}.png")


@pytest.mark.slow(reason="the tiny pipeline on a local SLURM cluster and the explorer notebook")
def test_explorer_runs_over_the_finished_run(pipeline, private_tmp):
    """notebooks/00_explore.ipynb with papermill on the run the cluster produced: no error, its figures drawn."""
    import papermill
    out = private_tmp / "00_explore.ipynb"
    papermill.execute_notebook(str(REPO_ROOT / "notebooks" / "00_explore.ipynb"), str(out),
                               parameters={"out_dir": str(pipeline["out"]), "layer": 1, "head": 1},
                               cwd=str(REPO_ROOT), progress_bar=False, kernel_name="python3",
                               start_timeout=120, execution_timeout=300)
    nb = json.loads(out.read_text())
    outputs = [o for c in nb["cells"] for o in c.get("outputs", [])]
    assert not [o for o in outputs if o["output_type"] == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == (3 if "04_ranking_variants" in sections() else 2)   # head, variant, prompt
    printed = "".join("".join(o.get("text", "")) for o in outputs if o["output_type"] == "stream")
    assert "missing: activations.npz" not in printed and "missing: phiid" not in printed


@pytest.mark.slow(reason="starts a local SLURM cluster")
def test_a_rejected_submission_cancels_the_jobs_already_submitted(cluster, private_tmp):
    """No half chain is left queued: 01 (GPU) is accepted, 02 (CPU, impossible request) is refused."""
    r = cluster.run(str(PIPELINE), str(PARAMS), "--set", f"out_dir={private_tmp / 'run'}", "--cpu-args",
                    "--cpus-per-task=999", "--sbatch-args", "--hold", check=False, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    jobs = parse_submission(r.stdout)
    first = jobs[sections()[0]]
    assert "cancelling the jobs submitted so far" in r.stderr and first in r.stderr
    state = wait_for(lambda: (j := cluster.jobs(first)) and j[0]["JobState"] in ("CANCELLED",) and j[0], 30,
                     f"job {first} to be cancelled", poll=0.2)
    assert state["JobState"] == "CANCELLED"


@pytest.mark.slow(reason="slurm/pipeline.sh --dry-run: each call starts Python, checks the params and imports torch for the cost table")
def test_dry_run_takes_the_shard_count_from_the_params_file(tmp_path):
    params = tmp_path / "sharded.yaml"
    params.write_text(PARAMS.read_text().replace("05_ablation:\n", "05_ablation:\n  shards: 3\n", 1))

    def array_of(*args):
        r = subprocess.run([str(PIPELINE), str(params), "--dry-run", "--set", f"out_dir={tmp_path / 'run'}", *args],
                           capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert r.returncode == 0, r.stderr
        cmds = dict(zip(parse_submission(r.stdout), [l for l in r.stdout.splitlines() if l.startswith("sbatch ")]))
        return re.search(r"--array=(\S+)", cmds["05_ablation shards"]).group(1), r.stdout

    array, text = array_of()
    assert array == "1-3" and "05_ablation 3" in text and "# model cache check: ok" in text
    assert re.search(r"^# 05_ablation +GPU", text, re.M) and "cost estimate" in text
    assert array_of("--shards", "2")[0] == "1-2"                  # the command line overrides the file
    assert array_of("--shards", "05_ablation=5")[0] == "1-5"


def test_busy_and_idle_seconds_of_a_job_timeline():
    jobs = [{"SubmitTime": "2026-12-04T10:00:00", "StartTime": "2026-12-04T10:00:02", "EndTime": "2026-12-04T10:00:10",
             "JobState": "COMPLETED"},
            {"SubmitTime": "2026-12-04T10:00:00", "StartTime": "2026-12-04T10:00:05", "EndTime": "2026-12-04T10:00:12",
             "JobState": "COMPLETED"},
            {"SubmitTime": "2026-12-04T10:00:00", "StartTime": "2026-12-04T10:00:15", "EndTime": "2026-12-04T10:00:20",
             "JobState": "CANCELLED"},
            {"SubmitTime": "2026-12-04T10:00:00", "StartTime": "Unknown", "EndTime": "Unknown", "JobState": "CANCELLED"}]
    # by hand: running 02-12 (10 s) and 15-20 (5 s); from the submission at 00 to the last end at 20: 5 s idle
    assert busy_and_idle(jobs) == {"busy_s": 15.0, "idle_s": 5.0, "jobs": 3}
