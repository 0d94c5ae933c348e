"""The runner: params validation against the notebooks' declared parameters, overrides, end to end on tiny.yaml."""
import re
import json
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest

from lib import REPO_ROOT
from lib.storage.store import ArtifactError
from lib.pipeline.notebook_params import ParamsError, declared_parameters
from lib.pipeline.steps import build_steps, load_params, parse_value, pipeline_notebooks


def write_params(tmp_path, text, name="myrun", model=True):
    """A params file; a run whose notebooks take a model and that names none gets `model: random:llama`
    (model=False: as given)."""
    path = tmp_path / f"{name}.yaml"
    nbs = pipeline_notebooks()
    takes = any(line.rstrip(":{} ") in nbs and "model" in declared_parameters(nbs[line.rstrip(":{} ")])
                for line in text.splitlines() if not line.startswith(" "))
    has_model = any(line.startswith("model:") for line in text.splitlines())
    path.write_text("model: random:llama\n" + text if takes and model and not has_model else text)
    return path


def steps_for(path, overrides=()):
    run, shared, sections = load_params(path, list(overrides))
    return build_steps(run, shared, sections)


@pytest.mark.parametrize("params_file", sorted((REPO_ROOT / "params").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_params_files_validate(params_file):
    steps = steps_for(params_file)
    assert [s.name for s in steps] == sorted(s.name for s in steps) and steps
    assert all(s.params["out_dir"].endswith(f"outputs/{params_file.stem}") for s in steps)


def test_unknown_key_names_key_notebook_and_allowed(tmp_path):
    path = write_params(tmp_path, "model: random:llama\n01_extract_activations:\n  n_tokenz: 5\n")
    with pytest.raises(ParamsError, match=r"unknown key 'n_tokenz' in section '01_extract_activations'.*allowed: .*n_tokens"):
        steps_for(path)


def test_unknown_shared_key(tmp_path):
    path = write_params(tmp_path, "modle: random:llama\n01_extract_activations: {}\n")
    with pytest.raises(ParamsError, match="unknown shared key 'modle'.*allowed: .*model"):
        steps_for(path)


@pytest.mark.parametrize("yaml_text, message", [
    ("01_extract_activations:\n  n_tokens: abc\n", "'n_tokens' must be int.*got str"),
    ("01_extract_activations:\n  n_tokens: 2.5\n", "'n_tokens' must be int.*got float"),
    ("01_extract_activations:\n  chat_template: 1\n", "'chat_template' must be bool"),
    ("01_extract_activations:\n  revisions: step1\n", "'revisions' must be list"),
    ("01_extract_activations:\n  n_tokens: true\n", "'n_tokens' must be int"),
])
def test_wrong_types(tmp_path, yaml_text, message):
    with pytest.raises(ParamsError, match=message):
        steps_for(write_params(tmp_path, yaml_text))


def test_missing_params_file_lists_available():
    with pytest.raises(ParamsError, match="not found; available in params/: .*tiny.yaml"):
        load_params("params/nope.yaml")


def test_overrides_shared_and_per_notebook(tmp_path):
    path = write_params(tmp_path, "model: random:llama\n01_extract_activations:\n  n_tokens: 5\n")
    (step,) = steps_for(path, ["model=random:gpt2", "01_extract_activations.n_tokens=9", "out_dir=/tmp/x"])
    assert step.params["model"] == "random:gpt2" and step.params["n_tokens"] == 9 and step.params["out_dir"] == "/tmp/x"
    assert parse_value("1e-3") == 1e-3 and parse_value("[1, 2]") == [1, 2] and parse_value("true") is True


def test_every_notebook_follows_the_house_rules():
    for path in sorted((REPO_ROOT / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(params) == 1, f"{path.name}: exactly one parameters cell"
        assert "out_dir" in declared_parameters(path), f"{path.name}: declares out_dir"
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name}: stored with outputs"
                assert not any(l.lstrip().startswith(("def ", "class ")) for l in cell.source.splitlines()), path.name
                assert len(cell.source.splitlines()) <= 25, f"{path.name}: cell longer than 25 lines"


def test_unparsable_parameter_comment_is_refused(tmp_path):
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"}})
    cell = nbformat.v4.new_code_cell('out_dir = "x"\nn = 3  # 60 = all prompts\n')
    cell.metadata["tags"] = ["parameters"]
    nb.cells.append(cell)
    path = tmp_path / "01_bad.ipynb"
    nbformat.write(nb, path)
    with pytest.raises(ParamsError, match=r"cannot parse the parameter line\(s\) of \['n'\]"):
        declared_parameters(path)


def runner(*args):
    return subprocess.run([sys.executable, "-m", "lib.run", *args], cwd=REPO_ROOT, capture_output=True, text=True)


def test_cli_reports_bad_params_without_running(tmp_path):
    proc = runner("--params", str(write_params(tmp_path, "01_extract_activations:\n  n_tokens: x\n")),
                  "--set", f"out_dir={tmp_path / 'out'}")
    assert proc.returncode == 2 and "must be int" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow(reason="the tiny pipeline, then runner calls on a copy")
def test_end_to_end_on_tiny(tiny_run, tiny_run_copy):
    """The session's tiny run (conftest: the runner exited 0 on params/tiny.yaml), then reruns on a copy of it."""
    out = tiny_run
    names = [s.name for s in steps_for(REPO_ROOT / "params/tiny.yaml")]
    manifest = json.loads((out / "manifest.json").read_text())
    for name in names:
        assert (out / f"{name}.ipynb").exists() and (out / "html" / f"{name}.html").exists()
        assert manifest["notebooks"][name]["status"] == "ok"
        nb = nbformat.read(out / f"{name}.ipynb", as_version=4)
        assert not [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert (out / "activations.npz").exists()
    out = tiny_run_copy                                                   # the runner writes: a copy of the run
    again = runner("--params", "params/tiny.yaml", "--set", f"out_dir={out}", "--quiet", "--only", names[0])
    assert again.returncode == 0 and "up to date" in again.stdout
    refused = runner("--params", "params/tiny.yaml", "--set", f"out_dir={out}", "--quiet", "--only", names[0],
                     "--set", "01_extract_activations.n_tokens=-3")     # a value constraint: refused before running
    assert refused.returncode == 2 and "01_extract_activations: n_tokens=-3 must be >= 1" in refused.stderr
    failing = runner("--params", "params/tiny.yaml", "--set", f"out_dir={out}", "--quiet", "--only", names[0],
                     "--set", "model=nobody/no-such-model")             # valid spec, fails when the notebook loads it
    assert failing.returncode == 1
    assert "notebook 01_extract_activations failed in cell" in failing.stderr and "nobody/no-such-model" in failing.stderr
    assert json.loads((out / "manifest.json").read_text())["notebooks"][names[0]]["status"] == "failed"


# ----------------------------------------------------------------------------- --set precedence, declared types

def test_shared_set_wins_over_a_notebook_section(tmp_path):
    path = write_params(tmp_path, "model: random:llama\n01_extract_activations:\n  chat_template: true\n  n_tokens: 5\n"
                                  "06_neuron_effects:\n  chat_template: true\n")
    steps = steps_for(path, ["chat_template=false", "n_tokens=7"])
    assert [s.params["chat_template"] for s in steps] == [False, False]
    assert steps[0].params["n_tokens"] == 7
    (step,) = steps_for(path, ["01_extract_activations.n_tokens=9"])[:1]   # the dotted form still targets one notebook
    assert step.params["n_tokens"] == 9


def test_set_naming_a_missing_notebook_is_refused(tmp_path):
    path = write_params(tmp_path, "01_extract_activations: {}\n")
    with pytest.raises(ParamsError, match=r"--set '09_nope.x=1': no notebook '09_nope'"):
        steps_for(path, ["09_nope.x=1"])


@pytest.mark.parametrize("override, message", [
    ("05_ablation.step_size=two", r"'step_size' must be int \(default None\), got str"),
    ("05_ablation.n_prompts=1.5", r"'n_prompts' must be int"),
    ("05_ablation.fractions=0.5", r"'fractions' must be list"),
    ("06_neuron_effects.layers=3", r"'layers' must be list \(default None\), got int"),
    ("02_phiid.tags=random_init", r"'tags' must be list"),
])
def test_none_defaults_are_type_checked_by_their_declared_type(tmp_path, override, message):
    path = write_params(tmp_path, "02_phiid: {}\n05_ablation: {}\n06_neuron_effects: {}\n")
    with pytest.raises(ParamsError, match=message):
        steps_for(path, [override])
    (step,) = [s for s in steps_for(path, ["05_ablation.step_size=3"]) if s.name == "05_ablation"]
    assert step.params["step_size"] == 3


def _notebook(tmp_path, source, name="01_typed.ipynb"):
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"}})
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = ["parameters"]
    nb.cells.append(cell)
    nbformat.write(nb, tmp_path / name)
    return tmp_path / name


def test_none_default_without_declared_type_is_refused(tmp_path):
    with pytest.raises(ParamsError, match=r"\['k'\] default to None without a declared type.*# type: int"):
        declared_parameters(_notebook(tmp_path, 'out_dir = "x"\nk = None  # how many\n'))
    typed = declared_parameters(_notebook(tmp_path, 'out_dir = "x"\nk = None  # type: Optional[int]  how many\n', "01_b.ipynb"))
    from lib.pipeline.steps import check_type
    check_type("01_b", "k", 3, typed["k"])
    check_type("01_b", "k", None, typed["k"])
    with pytest.raises(ParamsError, match="'k' must be int"):
        check_type("01_b", "k", "3", typed["k"])


def test_every_none_default_of_the_notebooks_declares_its_type():
    for path in pipeline_notebooks().values():
        for name, info in declared_parameters(path).items():
            if info["default"] == "None":
                assert info["type"] not in (None, "None"), f"{path.name}: {name}"


# ----------------------------------------------------------------------------- --check validates values

@pytest.mark.parametrize("yaml_text, message", [
    ("01_extract_activations:\n  n_prompts: 0\n", r"01_extract_activations: n_prompts=0 must be >= 1"),
    ("02_phiid:\n  tau: 0\n", r"02_phiid: tau=0 must be >= 1"),
    ("02_phiid:\n  modes: [per_prompt, bogus]\n", r"modes=.* has unknown entries \['bogus'\]; allowed: \['per_prompt'"),
    ("model: random:foo\n01_extract_activations: {}\n", r"random:foo is not a tiny test model; use one of .*random:llama"),
    ("dtype: float8\n01_extract_activations: {}\n", r"dtype='float8' must be one of \['float32', 'bfloat16', 'float16'\]"),
    ("05_ablation:\n  shard: 3/2\n", r"shard='3/2' must be '' or 'i/n' with 1 <= i <= n"),
    ("05_ablation:\n  shard: abc\n", r"shard='abc' must be '' or 'i/n'"),
    ("05_ablation:\n  step_size: 0\n", r"step_size=0 must be >= 1"),
    ("05_ablation:\n  step_size: 2\n  fractions: [0.5]\n", r"either step_size or fractions"),
    ("06_neuron_effects:\n  layers: [0, -1]\n", r"layers=\[0, -1\] has invalid entries \[-1\]"),
    ("06_neuron_effects:\n  mode: zero\n", r"mode='zero' must be one of \['add', 'ablate'\]"),
    ("model: lib\n01_extract_activations: {}\n", r"folder 'lib' is not a model \(no config.json\)"),
    ("04_ranking_variants:\n  variants: [rank_diff, nope]\n", r"variants=.*unknown entries \['nope'\]"),
    ("01_extract_activations: {}\n09_nonexistent:\n  x: 1\n", r"section\(s\) \['09_nonexistent'\] name no notebook"),
    ("05_ablation:\n  shards: 0\n", r"section '05_ablation': 'shards' must be a positive integer.*got 0"),
    ("05_ablation:\n  shards: many\n", r"'shards' must be a positive integer.*got 'many'"),
    ("05_ablation:\n  shards: true\n", r"'shards' must be a positive integer.*got True"),
    ("02_phiid:\n  shards: 2\n", r"section '02_phiid': 'shards' is set but notebooks/02_phiid.ipynb declares no 'shard'"),
])
def test_check_refuses_values_that_would_fail_on_the_node(tmp_path, yaml_text, message):
    with pytest.raises(ParamsError, match=message):
        steps_for(write_params(tmp_path, yaml_text))


@pytest.mark.parametrize("arch", ["gemma2", "mistral", "gemma3_multimodal", "llama"])
def test_check_accepts_every_tiny_architecture_lib_models_builds(tmp_path, arch):
    (step,) = steps_for(write_params(tmp_path, f"model: random:{arch}\n01_extract_activations: {{}}\n"))
    assert step.params["model"] == f"random:{arch}"


def test_model_rule_lists_the_architectures_of_lib_models():
    from lib.model import loading as models
    from lib.pipeline import params
    message = params.model_spec("random:foo")
    assert all(f"random:{a}'" in message for a in models.RANDOM_ARCHS + models.CLUSTER_ARCHS)
    assert params.model_spec("bundled:smollm2-135m") is None and "bundled:nope is unknown" in params.model_spec("bundled:nope")


def test_importing_params_does_not_import_torch():
    code = "import sys, lib.pipeline.params; assert 'torch' not in sys.modules, 'lib.pipeline.params imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


def test_check_cli_is_one_line_and_lists_every_problem(tmp_path):
    proc = runner("--params", str(write_params(tmp_path, "01_extract_activations:\n  n_prompts: 0\n  n_tokens: 0\n")),
                  "--check")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "n_prompts=0" in proc.stderr and "n_tokens=0" in proc.stderr


def test_constraints_are_the_library_rules():
    from lib.pipeline import params
    assert params.problems("05_ablation", {"shard": "2/4", "step_size": None, "fractions": [0.5, 1.0]}) == []
    with pytest.raises(params.ParamsValueError, match="noise_sigma=0 must be > 0"):
        params.validate("05_ablation", {"noise_sigma": 0})
    params.declare("98_new", {"n_null": params.at_least(1)})       # a new notebook declares its rules once
    assert params.problems("98_new", {"n_null": 0}) == ["98_new: n_null=0 must be >= 1"]


# ----------------------------------------------------------------------------- provenance (a registered notebook)

@pytest.fixture
def fake_pipeline(tmp_path, monkeypatch):
    """Two notebooks known only by their registered artifacts (no runner change): 97_make writes made*.npz from
    the model, 98_use reads made.npz and writes used.npz."""
    from lib.storage import artifacts
    from lib.pipeline.steps import Step
    for a in (artifacts.Artifact("made", "made{kind}{tag}.npz", "97_make", "test input"),
              artifacts.Artifact("used", "used.npz", "98_use", "test output")):
        monkeypatch.setitem(artifacts.ARTIFACTS, a.name, a)
    out = tmp_path / "run"
    out.mkdir()

    def step(name, **params):
        return Step(name, tmp_path / f"{name}.ipynb", {"out_dir": str(out), **params}, out / f"{name}.ipynb",
                    out / "html" / f"{name}.html")
    return out, step


def _succeed(step, reads=(), earlier=()):
    from lib.pipeline.bookkeeping import record_success
    from lib.pipeline.steps import params_hash
    step.output.write_text("{}")
    record_success(step, {step.output.parent / r for r in reads}, list(earlier), status="ok",
                   params_hash=params_hash(step.params))


def _reasons(step, earlier=()):
    from lib.pipeline.bookkeeping import stale_reasons
    from lib.storage.store import read_manifest
    return stale_reasons(step, read_manifest(step.output.parent), list(earlier))


def test_up_to_date_needs_parameters_inputs_and_outputs(fake_pipeline):
    from lib.storage.store import save_npz
    out, step = fake_pipeline
    make, use = step("97_make", model="random:llama", seed=0), step("98_use")
    save_npz(out / "made.npz", x=np.arange(3))
    _succeed(make)
    save_npz(out / "used.npz", y=np.arange(2))
    _succeed(use, reads=["made.npz"], earlier=["97_make"])
    assert _reasons(make) == [] and _reasons(use, ["97_make"]) == []
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["artifacts"]["used.npz"]["inputs"] == {"made.npz": manifest["artifacts"]["made.npz"]["sha256"]}
    assert manifest["artifacts"]["used.npz"]["model"] == "random:llama seed 0"      # inherited through made.npz
    (out / "used.npz").unlink()
    assert _reasons(use, ["97_make"]) == ["output used.npz is missing"]
    save_npz(out / "used.npz", y=np.arange(2))
    save_npz(out / "made.npz", x=np.arange(4))                   # changed outside the runner
    assert _reasons(make) == ["output made.npz changed since it ran"]
    assert "input made.npz changed since it ran" in _reasons(use, ["97_make"])
    _succeed(make)                                               # 97 reruns: 98 is stale because it ran since
    assert "97_make ran since" in _reasons(use, ["97_make"])
    assert _reasons(step("98_use", other=1), ["97_make"])[0].startswith("parameters changed: ['other']")


def test_consumers_refuse_replaced_mixed_and_foreign_inputs(fake_pipeline):
    from lib.storage import artifacts
    from lib.storage.store import save_npz
    out, step = fake_pipeline
    save_npz(out / "made.npz", x=np.arange(3))
    _succeed(step("97_make", model="random:llama", seed=0))
    save_npz(out / "used.npz", y=np.arange(2))
    _succeed(step("98_use"), reads=["made.npz"], earlier=["97_make"])
    artifacts.check_input(out, out / "used.npz", "99_next", "random:llama seed 0")
    with pytest.raises(ArtifactError, match=r"made.npz derives from model 'random:llama seed 0' but 99_next runs "
                                            r"model 'random:llama seed 1'"):
        artifacts.check_input(out, out / "made.npz", "99_next", "random:llama seed 1")
    save_npz(out / "made.npz", x=np.arange(5))                   # e.g. another seed's file copied in
    with pytest.raises(ArtifactError, match=r"made.npz is not the file 97_make wrote .*replaced or modified"):
        artifacts.check_input(out, out / "made.npz", "99_next")
    with pytest.raises(ArtifactError, match=r"used.npz was computed from another made.npz .* mixed inputs"):
        artifacts.check_input(out, out / "used.npz", "99_next")
    artifacts.check_input(out, out / "made.npz", "97_make")      # its producer may read (and rewrite) it


def test_reads_under_the_runner_are_checked_and_logged(fake_pipeline, monkeypatch):
    from lib.storage import artifacts
    from lib.storage.store import load_npz, save_npz
    out, step = fake_pipeline
    save_npz(out / "made.npz", x=np.arange(3))
    _succeed(step("97_make", model="random:gpt2", seed=0))
    log = out.parent / "reads.log"
    monkeypatch.setenv(artifacts.READS_ENV, str(log))
    monkeypatch.setenv(artifacts.MODEL_ENV, "random:llama seed 0")
    with pytest.raises(ArtifactError, match="derives from model 'random:gpt2 seed 0'"):
        load_npz(out / "made.npz")
    monkeypatch.setenv(artifacts.MODEL_ENV, "random:gpt2 seed 0")
    load_npz(out / "made.npz")
    assert log.read_text().split() == [str((out / "made.npz").resolve())]


def test_stale_leftover_outputs_are_removed(fake_pipeline, capsys):
    """A notebook rerun that no longer writes a file (its input is gone) removes the stale file it left."""
    from lib.storage.store import save_npz
    out, step = fake_pipeline
    save_npz(out / "made.npz", x=np.arange(3))
    save_npz(out / "made__random_init.npz", x=np.arange(4))
    _succeed(step("97_make"))
    save_npz(out / "used.npz", y=np.arange(2))
    _succeed(step("98_use"), reads=["made.npz"])
    (out / "made.npz").unlink()
    _succeed(step("98_use"), reads=["made__random_init.npz"])      # used.npz was not rewritten
    assert not (out / "used.npz").exists() and "removed used.npz" in capsys.readouterr().out


# ----------------------------------------------------------------------------- failures: status, partial files

def test_full_disk_during_a_notebook_is_one_line_and_failed(fake_pipeline, monkeypatch):
    import errno
    from lib.pipeline import execution
    out, step = fake_pipeline
    s = step("97_make")

    def full(step, target, log_output):
        target.write_text('{"cells": [')                     # a partial executed copy
        raise OSError(errno.ENOSPC, "No space left on device", str(target))
    monkeypatch.setattr(execution, "_papermill", full)
    with pytest.raises(RuntimeError, match=r"^notebook 97_make: could not write .*97_make.ipynb.tmp.ipynb: No space "
                                           r"left on device \(errno 28\); free space there"):
        execution.execute(s)
    entry = json.loads((out / "manifest.json").read_text())["notebooks"]["97_make"]
    assert entry["status"] == "failed" and "No space left" in entry["error"]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "manifest.json.lock"]


def test_full_disk_in_nbconvert_leaves_no_html(fake_pipeline, monkeypatch):
    from lib.pipeline import execution
    out, step = fake_pipeline
    s = step("97_make")
    monkeypatch.setattr(execution, "_papermill", lambda step, target, log_output: target.write_text("{}"))

    def nbconvert_full(executed, target):
        import errno
        Path(target).write_text("<html")                         # a partial page, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(execution, "export_html", nbconvert_full)
    with pytest.raises(RuntimeError, match=r"^notebook 97_make: nbconvert could not write .*97_make.html: OSError: "
                                           r"\[Errno 28\] No space left on device$"):
        execution.execute(s)
    assert json.loads((out / "manifest.json").read_text())["notebooks"]["97_make"]["status"] == "failed"
    assert list((out / "html").iterdir()) == []


def test_interrupted_entries_are_marked_failed(fake_pipeline):
    from lib.pipeline.bookkeeping import record, settle_interrupted
    out, step = fake_pipeline
    record(step("97_make"), status="running")
    settle_interrupted(out)
    entry = json.loads((out / "manifest.json").read_text())["notebooks"]["97_make"]
    assert entry["status"] == "failed" and "interrupted" in entry["error"]


def test_a_single_notebook_run_settles_only_its_own_entry(fake_pipeline):
    from lib.pipeline.bookkeeping import record, settle_interrupted
    out, step = fake_pipeline
    record(step("97_make"), status="running")
    record(step("98_use"), status="running")          # another notebook's job, running beside this one
    settle_interrupted(out, "97_make")
    entries = json.loads((out / "manifest.json").read_text())["notebooks"]
    assert entries["97_make"]["status"] == "failed" and entries["98_use"]["status"] == "running"


def test_upstream_follows_the_parents_graph():
    from lib.pipeline.steps import PARENTS, upstream_of
    pipeline = sorted(PARENTS) + ["12_unlisted"]
    assert upstream_of("06_neuron_effects", pipeline) == ["01_extract_activations"]
    assert upstream_of("05_ablation", pipeline) == ["01_extract_activations", "02_phiid", "03_phiid_diagnostics",
                                                    "04_ranking_variants"]
    assert upstream_of("08_topology", ["02_phiid", "08_topology"]) == ["02_phiid"]   # only this run's notebooks
    assert upstream_of("12_unlisted", pipeline) == sorted(PARENTS)                  # unlisted: all before it


@pytest.mark.slow(reason="reads the session's tiny pipeline run")
def test_parents_cover_every_file_a_notebook_read(tiny_reference):
    from lib.pipeline.steps import PARENTS, upstream_of
    manifest = json.loads((tiny_reference / "manifest.json").read_text())
    records = manifest["artifacts"]
    checked = 0
    for name, entry in manifest["notebooks"].items():
        producers = {records[r]["producer"].split(".")[0] for r in entry.get("inputs", {}) if r in records}
        base = name.split(".")[0]                       # a shard reads what its notebook reads
        assert producers - {base} <= set(upstream_of(base, PARENTS)), (name, producers)
        checked += bool(producers)
    assert checked >= 5


def test_corrupt_manifest_cli_is_one_line(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_bytes(b"\x00\xff garbage")
    proc = runner("--params", "params/tiny.yaml", "--set", f"out_dir={out}", "--only", "02_phiid", "--quiet")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert f"{out / 'manifest.json'} is unreadable" in proc.stderr


# ----------------------------------------------------------------------------- the tiny run: stale, missing, mixed, kill -9

@pytest.fixture
def tiny_reference(tiny_run):
    """The session's tiny run (tests/conftest.py: one uninterrupted run, read-only), every notebook up to date."""
    assert all(r == [] for r in reasons_of(tiny_run).values()), reasons_of(tiny_run)
    return tiny_run


@pytest.fixture
def tiny_copy(tiny_run_copy):
    """A writable copy of the session's tiny run (mtimes kept: the recorded checksums stay valid)."""
    return tiny_run_copy


def tiny_steps(out, *overrides):
    run, shared, sections = load_params(REPO_ROOT / "params/tiny.yaml", [f"out_dir={out}", *overrides])
    return {s.name: s for s in build_steps(run, shared, sections)}


UNDER_TEST = ("01_extract_activations", "02_phiid", "03_phiid_diagnostics", "04_ranking_variants", "05_ablation",
              "06_neuron_effects", "07_qkov_interference")     # the notebooks these tests run and judge


def reasons_of(out, *overrides):
    from lib.pipeline.bookkeeping import stale_reasons
    from lib.pipeline.steps import upstream_of
    from lib.storage.store import read_manifest
    steps, manifest = tiny_steps(out, *overrides), read_manifest(out)
    return {name: stale_reasons(s, manifest, upstream_of(name, steps)) for name, s in steps.items()
            if name in UNDER_TEST}


def outputs_of(out, notebook):
    return json.loads((out / "manifest.json").read_text())["notebooks"][notebook]["outputs"]


def assert_same_artifacts(ref, out, notebook):
    """Every output of `notebook` equal in both runs (timings aside)."""
    import pandas as pd
    assert sorted(outputs_of(out, notebook)) == sorted(outputs_of(ref, notebook))
    for rel in outputs_of(ref, notebook):
        a, b = ref / rel, out / rel
        if rel.endswith(".npz"):
            with np.load(a) as za, np.load(b) as zb:
                assert sorted(za.files) == sorted(zb.files), rel
                for key in za.files:
                    if "seconds" not in key:
                        np.testing.assert_array_equal(za[key], zb[key], err_msg=f"{rel}:{key}")
        elif rel.endswith(".csv"):
            fa, fb = pd.read_csv(a), pd.read_csv(b)
            pd.testing.assert_frame_equal(fa[[c for c in fa if "seconds" not in c]], fb[[c for c in fb if "seconds" not in c]])
        elif rel.endswith(".json"):
            def strip(x):
                if isinstance(x, dict):
                    return {k: strip(v) for k, v in x.items() if not any(t in k for t in ("seconds", "updated", "time"))}
                return [strip(v) for v in x] if isinstance(x, list) else x
            assert strip(json.loads(a.read_text())) == strip(json.loads(b.read_text())), rel


@pytest.mark.slow(reason="reruns notebooks of a tiny run")
def test_changed_upstream_reruns_everything_after_it(tiny_copy):
    out = tiny_copy
    assert all(r == [] for r in reasons_of(out).values())        # a moved run folder stays up to date
    proc = runner("--params", "params/tiny.yaml", "--set", f"out_dir={out}", "--quiet", "--only", "01_extract_activations",
                  "--set", "01_extract_activations.n_prompts=6")
    assert proc.returncode == 0, proc.stderr[-2000:]
    reasons = reasons_of(out, "01_extract_activations.n_prompts=6")
    assert reasons["01_extract_activations"] == []
    for name in ("02_phiid", "03_phiid_diagnostics", "05_ablation", "06_neuron_effects", "07_qkov_interference"):
        assert "01_extract_activations ran since" in reasons[name], (name, reasons[name])
    proc = runner("--params", "params/tiny.yaml", "--set", f"out_dir={out}", "--set", "01_extract_activations.n_prompts=6",
                  "--only", "01_extract_activations", "02_phiid", "--quiet")
    assert proc.returncode == 0 and "02_phiid -> " in proc.stdout and "01_extract_activations ran since" in proc.stdout
    records = json.loads((out / "manifest.json").read_text())["artifacts"]
    assert records["phiid_per_prompt.npz"]["inputs"]["activations.npz"] == records["activations.npz"]["sha256"]
    with np.load(out / "activations.npz") as z:
        assert z["activations"].shape[0] == 6
    assert "01_extract_activations: up to date" in proc.stdout


@pytest.mark.slow(reason="reruns a notebook of a tiny run")
def test_deleted_and_replaced_artifacts_are_noticed(tiny_reference, tiny_copy):
    import shutil
    out = tiny_copy
    (out / "phiid_per_prompt.npz").unlink()
    (out / "rankings.csv").unlink()
    reasons = reasons_of(out)
    assert any("output phiid_per_prompt.npz is missing" in r for r in reasons["02_phiid"])
    assert any("output rankings.csv is missing" in r for r in reasons["04_ranking_variants"])
    assert "input phiid_per_prompt.npz is missing" in reasons["03_phiid_diagnostics"]
    assert reasons["01_extract_activations"] == []
    shutil.copy(out / "activations__random_init.npz", out / "activations.npz")   # same shapes, other weights
    proc = runner("--params", "params/tiny.yaml", "--set", f"out_dir={out}", "--quiet", "--only", "05_ablation")
    assert proc.returncode == 1 and "notebook 05_ablation failed in cell" in proc.stderr
    assert "activations.npz is not the file 01_extract_activations wrote" in proc.stderr
    assert json.loads((out / "manifest.json").read_text())["notebooks"]["05_ablation"]["status"] == "failed"


@pytest.mark.slow(reason="reruns a notebook of a tiny run")
def test_missing_main_activations_leave_no_stale_phiid(tiny_copy):
    out = tiny_copy
    (out / "activations.npz").unlink()
    proc = runner("--params", "params/tiny.yaml", "--set", f"out_dir={out}", "--quiet", "--only", "02_phiid", "--force")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "removed phiid_per_prompt.npz" in proc.stdout and not (out / "phiid_per_prompt.npz").exists()
    assert (out / "phiid_per_prompt__random_init.npz").exists()
    assert "output activations.npz is missing" in reasons_of(out)["01_extract_activations"]


@pytest.mark.slow(reason="reruns a notebook of a tiny run")
def test_other_weights_are_refused_by_a_model_notebook(tiny_copy):
    out = tiny_copy
    proc = runner("--params", "params/tiny.yaml", "--set", f"out_dir={out}", "--quiet", "--only", "05_ablation",
                  "--set", "05_ablation.seed=1")
    assert proc.returncode == 2            # refused before anything runs (the kernel-side check: test_reads_under_...)
    assert "05_ablation.seed=1 differs from 01_extract_activations.seed=0: with model random:llama the seed builds " \
           "the weights" in proc.stderr and proc.stderr.count("\n") == 1


@pytest.mark.slow(reason="reruns a notebook of a tiny run")
def test_a_second_runner_is_refused_while_one_runs(tiny_copy):
    import socket
    out = tiny_copy
    first = subprocess.Popen([sys.executable, "-m", "lib.run", "--params", "params/tiny.yaml", "--set", f"out_dir={out}",
                              "--quiet", "--only", "02_phiid", "--force"], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    try:
        assert "02_phiid -> " in first.stdout.readline()
        second = runner("--params", "params/tiny.yaml", "--set", f"out_dir={out}", "--quiet")      # a whole run
        assert second.returncode == 2 and second.stderr.count("\n") == 1
        assert f"in use by pid {first.pid} on host {socket.gethostname()}" in second.stderr
    finally:
        first.wait(timeout=600)
    assert first.returncode == 0


def _children(pid: int) -> list[int]:
    """Every descendant of `pid` (from /proc), deepest first."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            child = int(stat.parent.name)
            found += _children(child) + [child]
    return found


def _executed_cells(path: Path) -> int:
    try:
        nb = json.loads(path.read_text())
    except (OSError, ValueError):
        return 0
    return sum(1 for c in nb["cells"] if c.get("cell_type") == "code" and c.get("execution_count"))


@pytest.mark.slow(reason="kills a runner mid-notebook and reruns it")
@pytest.mark.parametrize("notebook", ["01_extract_activations", "02_phiid", "05_ablation"])
def test_kill_9_mid_notebook_then_rerun_gives_the_same_artifacts(tiny_reference, tiny_copy, notebook):
    import os
    import signal
    import time
    out = tiny_copy
    args = [sys.executable, "-m", "lib.run", "--params", "params/tiny.yaml", "--set", f"out_dir={out}", "--quiet",
            "--only", notebook]
    expected = tiny_reference                             # the same code's uninterrupted result (the session's run)
    for rel in outputs_of(out, notebook):                 # the killed run has to compute them again
        (out / rel).unlink()
    n_code = sum(1 for c in nbformat.read(REPO_ROOT / "notebooks" / f"{notebook}.ipynb", as_version=4).cells
                 if c.cell_type == "code")
    killed = subprocess.Popen(args, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    partial = out / f".{notebook}.ipynb.tmp.ipynb"
    deadline = time.time() + 600
    while _executed_cells(partial) < n_code // 2 and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert killed.poll() is None, "the notebook finished before it could be killed"
    for pid in _children(killed.pid) + [killed.pid]:      # the kernel (its own session) and the runner
        os.kill(pid, signal.SIGKILL)
    killed.wait()
    entry = json.loads((out / "manifest.json").read_text())["notebooks"][notebook]
    assert entry["status"] == "running"
    proc = runner(*args[3:])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "interrupted by an earlier runner" in proc.stdout and f"{notebook} -> " in proc.stdout
    assert not [p for p in out.rglob(".*.tmp*")], "temp files left"
    assert_same_artifacts(expected, out, notebook)


def test_check_names_the_download_for_models_missing_from_the_cache(tmp_path, monkeypatch):
    import huggingface_hub
    from lib.pipeline.runner import check_run
    path = write_params(tmp_path, "model: EleutherAI/pythia-1b\n01_extract_activations:\n  revisions: [step1000]\n")
    seen = []
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda repo, name, revision=None: seen.append((repo, revision)) or
                        ("/cache/config.json" if revision is None else None))
    with pytest.raises(ParamsError, match=r"not in the local Hugging Face cache .*huggingface-cli download "
                                          r"EleutherAI/pythia-1b --revision step1000$"):
        check_run(path)
    assert set(seen) == {("EleutherAI/pythia-1b", None), ("EleutherAI/pythia-1b", "step1000")}
    assert [s.name for s in check_run(write_params(tmp_path, "model: random:llama\n01_extract_activations: {}\n"))]


def test_shards_key_is_read_by_the_runner_not_passed_to_the_notebook(tmp_path):
    steps = steps_for(write_params(tmp_path, "model: random:llama\n05_ablation:\n  shards: 3\n06_neuron_effects: {}\n"))
    by_name = {s.name: s for s in steps}
    assert by_name["05_ablation"].shards == 3 and "shards" not in by_name["05_ablation"].params
    assert by_name["06_neuron_effects"].shards is None
    assert steps_for(write_params(tmp_path, "05_ablation: {}\n"), ["05_ablation.shards=5"])[0].shards == 5




@pytest.mark.parametrize("text, where", [
    ("model: random:llama\nseed: 0\nseed: 1\n02_phiid: {}\n", "'seed' is given twice (lines 2 and 3)"),
    ("model: random:llama\n02_phiid:\n  tau: 1\n  tau: 2\n", "'tau' is given twice (lines 3 and 4)"),
    ("model: random:llama\n02_phiid:\n  tau: 1\n02_phiid:\n  tau: 2\n", "'02_phiid' is given twice (lines 2 and 4)"),
])
def test_duplicate_keys_are_refused_naming_the_key_and_lines(tmp_path, text, where):
    from lib.pipeline.notebook_params import ParamsError
    from lib.pipeline.steps import load_params
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError, match=re.escape(where)) as e:
        load_params(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_a_run_without_a_model_is_refused(tmp_path):
    with pytest.raises(ParamsError, match=r"names no model: add a top-level `model:`"):
        steps_for(write_params(tmp_path, "01_extract_activations:\n  n_tokens: 30\n", model=False))
    assert steps_for(write_params(tmp_path, "model: random:llama\n01_extract_activations:\n  n_tokens: 30\n"))


def test_in_process_html_export_is_the_nbconvert_command_line_output(tmp_path):
    """The runner's one in-process exporter writes byte for byte what `jupyter nbconvert --to html --no-input
    --CoalesceStreamsPreprocessor.enabled=True` writes (code hidden, split stream outputs merged)."""
    from lib.pipeline.execution import render_html
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"}})
    nb.cells = [nbformat.v4.new_markdown_cell("# Report"),
                nbformat.v4.new_code_cell("print('secret code')", execution_count=1, outputs=[
                    nbformat.v4.new_output("stream", name="stdout", text="first line\n"),
                    nbformat.v4.new_output("stream", name="stdout", text="second line\n"),
                    nbformat.v4.new_output("display_data", data={"text/plain": "<table>", "text/html": "<b>bold</b>"})])]
    executed = tmp_path / "01_made.ipynb"
    nbformat.write(nb, executed)
    subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "html", "--no-input", "--log-level=ERROR",
                    "--CoalesceStreamsPreprocessor.enabled=True", "--output-dir", str(tmp_path / "cli"), str(executed)],
                   check=True, capture_output=True)
    render_html(executed, tmp_path / "html" / "01_made.html")
    ours = (tmp_path / "html" / "01_made.html").read_bytes()
    assert ours == (tmp_path / "cli" / "01_made.html").read_bytes()
    assert b"secret code" not in ours and b"first line\nsecond line" in ours and b"<b>bold</b>" in ours
    assert sorted(p.name for p in (tmp_path / "html").iterdir()) == ["01_made.html"]      # no temporary file left


def test_the_shared_tiny_runs_guard_notices_every_kind_of_change(tmp_path):
    """tests/conftest.py's check that a test left the read-only tiny run alone: a rewrite (same size), a new file
    and a removed file all change the snapshot; reading does not; a copy made like tiny_run_copy is writable."""
    import os
    import shutil
    from tests.conftest import _set_writable, _snapshot
    run = tmp_path / "run"
    (run / "html").mkdir(parents=True)
    (run / "a.npz").write_bytes(b"1234")
    (run / "html" / "b.html").write_text("<p>")
    before = _snapshot(run)
    assert sorted(before) == ["a.npz", "html/b.html"]
    (run / "a.npz").read_bytes()
    assert _snapshot(run) == before
    st = (run / "a.npz").stat()
    (run / "a.npz").write_bytes(b"5678")
    os.utime(run / "a.npz", ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert _snapshot(run) != before
    (run / "a.npz").unlink()
    assert "a.npz" not in _snapshot(run)
    (run / ".run.lock").write_text("")
    assert ".run.lock" in _snapshot(run)
    _set_writable(run, False)
    assert not (run / "html").stat().st_mode & 0o222
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    _set_writable(copy, True)
    _set_writable(run, True)
    (copy / "html" / "c.html").write_text("ok")                     # as root the write bits matter little; as a user they do
    assert (copy / "html").stat().st_mode & 0o200
