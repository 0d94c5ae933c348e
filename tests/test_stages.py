"""lib/pipeline/stages.py: one declaration per stage, read by the runner's graph, the cost table, the claims map and the SLURM
submitter; a stage declared outside lib (a toy stage in a temporary folder) goes through --check, the runner, the
cost table and slurm/pipeline.sh --dry-run without an edit anywhere else."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import nbformat
import pytest

from lib import REPO_ROOT
from lib.pipeline import stages

TOY_STAGE = '''
from lib.pipeline.cost import Work
from lib.pipeline.stages import Stage, declare


def toy_cost(p, run, dims):
    """n_items forwards of 10 tokens each."""
    return Work(forwards=p["n_items"], tokens=10 * p["n_items"])


declare(Stage("99_toy", device="GPU", cost=toy_cost, path=__file__.replace("toy_stage.py", "99_toy.ipynb")))
'''


def test_the_declared_graph_is_the_runners_and_the_claims_map():
    from lib.pipeline.claims import CLAIMS
    from lib.pipeline.cost import GPU_NOTEBOOKS, estimator
    from lib.pipeline.steps import PARENTS, pipeline_notebooks
    declared = stages.stages()
    assert PARENTS == {name: list(s.reads) for name, s in declared.items()}
    assert set(pipeline_notebooks()) == set(declared)                       # every stage has its notebook
    assert set(GPU_NOTEBOOKS) == {n for n, s in declared.items() if s.device == "GPU"}
    for cid, (_, notebook, _) in CLAIMS.items():
        assert cid in declared[notebook].claims
    assert all(estimator(n) is not None for n in declared)
    for name, s in declared.items():                                          # parents come before their children
        assert all(parent < name for parent in s.reads)


def test_a_stage_with_an_undeclared_parent_or_device_is_refused():
    with pytest.raises(ValueError, match="not declared stages"):
        stages.declare(stages.Stage("98_x", reads=("97_missing",)))
    with pytest.raises(ValueError, match="device must be one of"):
        stages.Stage("98_x", device="TPU")
    assert "98_x" not in stages.stages()


def _toy(tmp_path):
    """A toy stage module, its notebook and a params file in tmp_path -> (env, params path, out dir)."""
    (tmp_path / "toy_stage.py").write_text(TOY_STAGE)
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"display_name": "Python 3", "language": "python",
                                                           "name": "python3"}})
    params = nbformat.v4.new_code_cell("model = 'random:llama'\nn_items = 2\nout_dir = 'outputs/dev'")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# Toy stage"), params,
                nbformat.v4.new_code_cell("print(f'{n_items} items of {model}')")]
    nbformat.write(nb, tmp_path / "99_toy.ipynb")
    out = tmp_path / "run"
    (tmp_path / "toy.yaml").write_text(textwrap.dedent(f"""\
        model: random:llama
        out_dir: {out}
        99_toy:
          n_items: 3
        """))
    env = {**os.environ, stages.EXTRA_VAR: str(tmp_path / "toy_stage.py"), "HF_HUB_OFFLINE": "1"}
    return env, tmp_path / "toy.yaml", out


@pytest.mark.slow(reason="runs a notebook through the runner and slurm/pipeline.sh --dry-run")
def test_a_toy_stage_declared_outside_lib_goes_through_check_runner_cost_and_slurm(tmp_path):
    env, params, out = _toy(tmp_path)
    run = lambda *a: subprocess.run([sys.executable, *a], cwd=REPO_ROOT, env=env, capture_output=True, text=True)  # noqa: E731
    bad = tmp_path / "bad.yaml"
    bad.write_text(params.read_text().replace("n_items: 3", "n_itemz: 3"))
    refused = run("-m", "lib.run", "--params", str(bad), "--check")
    assert refused.returncode != 0 and "unknown key 'n_itemz' in section '99_toy'" in refused.stderr
    checked = run("-m", "lib.run", "--params", str(params), "--check")
    assert checked.returncode == 0, checked.stderr
    ran = run("-m", "lib.run", "--params", str(params), "--quiet")
    assert ran.returncode == 0, ran.stderr[-2000:]
    record = json.loads((out / "manifest.json").read_text())["notebooks"]["99_toy"]
    assert record["status"] == "ok" and record["params"]["n_items"] == 3
    assert "3 items of random:llama" in (out / "99_toy.ipynb").read_text()
    dry = subprocess.run([str(REPO_ROOT / "slurm" / "pipeline.sh"), str(params), "--dry-run", "--force"],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    submit = [line for line in dry.stdout.splitlines() if line.startswith("sbatch ") and "99_toy" in line]
    assert submit and "--gres=gpu:1" in submit[0]                            # declared device GPU
    cost = [line for line in dry.stderr.splitlines() + dry.stdout.splitlines() if line.lstrip("# ").startswith("99_toy")]
    assert cost and " 3 " in f" {cost[0]} " and " 30 " in f" {cost[0]} "      # toy_cost: 3 forwards, 30 tokens
