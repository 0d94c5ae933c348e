"""The runner: params validation against the notebooks' declared parameters, overrides, end to end on tiny.yaml."""
import json
import subprocess
import sys

import nbformat
import pytest

from lib import REPO_ROOT
from lib.run import ParamsError, build_steps, declared_parameters, load_params, parse_value, pipeline_notebooks


def write_params(tmp_path, text, name="myrun"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
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


@pytest.mark.slow
def test_end_to_end_on_tiny(tmp_path):
    out = tmp_path / "tiny"
    proc = runner("--params", "params/tiny.yaml", "--set", f"out_dir={out}", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = [s.name for s in steps_for(REPO_ROOT / "params/tiny.yaml")]
    manifest = json.loads((out / "manifest.json").read_text())
    for name in names:
        assert (out / f"{name}.ipynb").exists() and (out / "html" / f"{name}.html").exists()
        assert manifest["notebooks"][name]["status"] == "ok"
        nb = nbformat.read(out / f"{name}.ipynb", as_version=4)
        assert not [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert (out / "activations.npz").exists()
    again = runner("--params", "params/tiny.yaml", "--set", f"out_dir={out}", "--quiet", "--only", names[0])
    assert again.returncode == 0 and "up to date" in again.stdout
    failing = runner("--params", "params/tiny.yaml", "--set", f"out_dir={out}", "--quiet", "--only", names[0],
                     "--set", "01_extract_activations.n_tokens=-3")
    assert failing.returncode == 1
    assert "notebook 01_extract_activations failed in cell" in failing.stderr and "n_tokens must be a positive" in failing.stderr
