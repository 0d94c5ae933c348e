"""lib.plan: the settle plan of underpowered claims becomes a params file that the runner's --check accepts, and
lib.plots.claims puts every claim on the paper's scale (fractions checked by hand)."""
from __future__ import annotations

import json
import shutil

import pytest
import yaml

from lib import REPO_ROOT
from lib.storage import artifacts
from lib import plan
from lib.plots.claims import forest_rows


def test_settle_values_take_the_largest_request_per_key():
    claims = [{"verdict": "underpowered", "settle": {"params": {"09_task_behaviour.n_problems": 200}}},
              {"verdict": "underpowered", "settle": {"params": {"09_task_behaviour.n_problems": 150,
                                                                "10_head_finetuning.seeds": 6}}},
              {"verdict": "ruled out", "settle": {"params": {"05_ablation.n_prompts": 99}}}]
    assert plan.settle_values(claims) == {"09_task_behaviour.n_problems": 200, "10_head_finetuning.seeds": 6}
    raw = {"model": "m", "10_head_finetuning": {"seeds": [0]}}
    out = plan.settle_params(raw, {"10_head_finetuning.seeds": 3, "09_task_behaviour.n_problems": 200})
    assert out["10_head_finetuning"]["seeds"] == [0, 1, 2] and out["09_task_behaviour"]["n_problems"] == 200
    assert raw["10_head_finetuning"]["seeds"] == [0]                       # the run's own params are untouched


def test_settle_raises_01s_prompts_when_05_asks_for_more_than_the_oracle_leaves():
    # tiny: 01 extracts 12 prompts, the oracle takes 6, so 05 can use at most 6; a plan asking 10 needs 16 in 01
    raw = {"01_extract_activations": {"n_prompts": 12, "oracle": True, "oracle_prompts": 6},
           "05_ablation": {"n_prompts": 4}}
    out = plan.settle_params(raw, {"05_ablation.n_prompts": 10})
    assert out["01_extract_activations"]["n_prompts"] == 16 and out["05_ablation"]["n_prompts"] == 10
    raw["01_extract_activations"]["oracle"] = False                        # no oracle: 12 prompts already cover 10
    assert plan.settle_params(raw, {"05_ablation.n_prompts": 10})["01_extract_activations"]["n_prompts"] == 12
    raw["01_extract_activations"]["n_prompts"] = 30                        # never lowered
    assert plan.settle_params(raw, {"05_ablation.n_prompts": 10})["01_extract_activations"]["n_prompts"] == 30


def test_write_settle_gives_a_params_file_that_passes_check(tmp_path):
    params = tmp_path / "unit.yaml"
    shutil.copy(REPO_ROOT / "params" / "tiny.yaml", params)
    out = tmp_path / "run"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"sections": {"run": {"params_file": str(params)}}}))
    artifacts.save("claims", out, {"paper": "planted", "claims": [
        {"id": "C6", "verdict": "underpowered", "paper_effect": {"value": -0.276}, "power": {"mde": -0.4},
         "settle": {"factor": 2.1, "params": {"09_task_behaviour.n_problems": 17}}}]})
    target, rows = plan.write_settle(out)
    assert target == tmp_path / "unit-settle.yaml" and rows[0]["claim"] == "C6"
    assert yaml.safe_load(target.read_text())["09_task_behaviour"]["n_problems"] == 17
    assert "09_task_behaviour.n_problems = 17" in target.read_text()
    from lib.pipeline.runner import check_run
    assert check_run(str(target), require_cache=False)


def test_forest_rows_are_fractions_of_the_paper_effect():
    c = {"id": "C5", "verdict": "underpowered", "value": 1.2, "ci95": [0.9, 1.5], "paper_effect": {"value": 1.95},
         "null": {"value": 1.0, "ci95": [0.6, 1.4]}, "power": {"mde": 1.8}}
    r = forest_rows([c])[0]
    assert r["value"] == pytest.approx(0.2 / 0.95) and r["ci"] == pytest.approx([-0.1 / 0.95, 0.5 / 0.95])
    assert r["band"] == pytest.approx([-0.4 / 0.95, 0.4 / 0.95]) and r["mde"] == pytest.approx(0.8 / 0.95)
    less = {**c, "value": -0.1, "ci95": [-0.2, 0.0], "paper_effect": {"value": -0.276},
            "null": {"value": 0.0, "ci95": None}, "power": {}}
    assert forest_rows([less])[0]["value"] == pytest.approx(0.1 / 0.276)      # toward the paper: positive
    assert forest_rows([{"id": "C7", "verdict": "not tested", "value": None}])[0]["value"] is None
