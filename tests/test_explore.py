"""The explorer's tables (lib/pipeline/explore.py) and the guard that keeps kernels outside the runner from writing into a
run folder (lib.storage.store.check_write_allowed), on small folders built here; the truth is computed independently."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lib.storage import artifacts, store
from lib.pipeline import explore
from lib.pipeline import report


def _run_folder(folder: Path, statuses: dict[str, str], finished: str, params_file: str = "params/x.yaml") -> Path:
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({
        "sections": {"run": {"params_file": params_file, "shared": {"model": "random:llama"}}},
        "notebooks": {nb: {"status": st, "finished": finished} for nb, st in statuses.items()}}))
    return folder


def test_runs_are_listed_finished_and_newest_first(tmp_path):
    _run_folder(tmp_path / "old", {"01_extract_activations": "ok"}, "2026-01-01T10:00:00")
    _run_folder(tmp_path / "new", {"01_extract_activations": "ok", "02_phiid": "ok"}, "2026-02-01T10:00:00")
    _run_folder(tmp_path / "broken", {"01_extract_activations": "ok", "02_phiid": "failed"}, "2026-03-01T10:00:00")
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "rankings.csv").write_text("head_idx\n0\n")       # notebooks run by hand, no manifest
    (tmp_path / "empty").mkdir()                                           # neither: not a run
    runs = explore.list_runs(tmp_path)
    assert runs["run"].tolist() == ["new", "old", "dev", "broken"]
    assert runs["status"].tolist() == ["finished", "finished", "by hand", "failed"]
    assert runs["notebooks"].iloc[0] == "2/2 ok" and runs["notebooks"].iloc[3] == "1/2 ok"
    assert explore.default_run(tmp_path) == tmp_path / "new"
    assert explore.default_run(tmp_path / "empty") is None


def test_an_empty_outputs_folder_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(explore, "OUTPUT_ROOT", tmp_path)
    run = explore.load_run("")
    assert run.n_layers == 0 and "make run" in run.missing[0]
    assert explore.message_html("phiid_<mode>.npz is missing") == "phiid_&lt;mode&gt;.npz is missing"


def _fake_run(n_layers=3, n_heads=4, prompts=5, steps=12, seed=0) -> explore.RunData:
    rng = np.random.default_rng(seed)
    H = n_layers * n_heads
    syn, red = rng.random((H, H)), rng.random((H, H))
    syn[2, 7] = 50.0                                           # one bright cell
    deg = np.zeros((H, H), bool)
    deg[1, 3] = True
    run = explore.RunData(out_dir=Path("/nowhere"), n_layers=n_layers, n_heads=n_heads,
                          activations=rng.random((prompts, H, steps)).astype(np.float32),
                          tokens=rng.integers(0, 100, (prompts, steps)), prompt_text=[f"p{i}" for i in range(prompts)])
    run.phiid["per_prompt"] = {"syn": syn, "red": red, "degenerate": deg}
    run.local = {"sts": rng.standard_normal((H, prompts, steps - 1)), "token_ids": run.tokens[:, :-1], "tau": 1,
                 "tokenizer": None}
    return run


def test_head_box_accepts_L14H6_and_names_the_range_otherwise():
    run = _fake_run()
    assert explore.parse_head(run, "L2H3") == 2 * 4 + 3
    assert explore.parse_head(run, " l1h0 ") == 4 and explore.parse_head(run, "1,2") == 6
    with pytest.raises(ValueError, match=r"outside the model: layers 0-2, heads 0-3"):
        explore.parse_head(run, "L3H0")
    with pytest.raises(ValueError, match=r"not a head: write L<layer>H<head>"):
        explore.parse_head(run, "head six")


def test_colour_limits_are_percentiles_shared_by_heads_or_of_the_head_row():
    run = _fake_run()
    syn, deg = run.phiid["per_prompt"]["syn"], run.phiid["per_prompt"]["degenerate"]
    H = run.n_total
    defined = [syn[i, j] for i in range(H) for j in range(H) if i != j and not deg[i, j]]
    assert run.color_limits("per_prompt", "syn", 0, "shared") == pytest.approx(tuple(np.percentile(defined, [1, 99])))
    assert run.color_limits("per_prompt", "syn", 0, "shared") == run.color_limits("per_prompt", "syn", 5, "shared")
    row = [syn[1, j] for j in range(H) if j != 1 and not deg[1, j]]
    assert run.color_limits("per_prompt", "syn", 1, "head") == pytest.approx(tuple(np.percentile(row, [2, 98])))
    lo, hi = run.color_limits("per_prompt", "syn", 2, "head")
    assert hi < 50.0                                           # the bright cell does not set the scale
    with pytest.raises(ValueError, match="colour limits"):
        run.color_limits("per_prompt", "syn", 0, "max")


def test_prompt_tokens_put_local_synergy_at_the_step_that_reads_the_token():
    run = _fake_run()
    table = explore.prompt_tokens(run, prompt=3, idx=7)
    assert np.isnan(table["local_synergy"].iloc[0])            # no transition ends at step 0
    np.testing.assert_array_equal(table["local_synergy"].to_numpy()[1:], run.local["sts"][7, 3])
    np.testing.assert_array_equal(table["activation"].to_numpy(), run.activations[3, 7])
    assert table["token"].tolist() == [f"#{t}" for t in run.tokens[3]]      # no tokenizer on disk: the ids


def test_the_widgets_select_heads_by_text_buttons_and_top_table():
    pytest.importorskip("ipywidgets")
    run = _fake_run()
    run.rankings = pd.DataFrame({"head_idx": np.arange(12), "layer": np.arange(12) // 4, "head": np.arange(12) % 4,
                                 "alpha": np.linspace(0, 1, 12)})
    panel = explore.head_explorer(run, layer=1, head=2)
    c, state = panel.controls, panel.state
    assert state["idx"] == 6
    c["head"].value = "L2H3"
    assert state["idx"] == 11
    c["next"].click()
    assert c["head"].value == "L0H0" and state["idx"] == 0          # wraps around
    c["previous"].click()
    assert c["head"].value == "L2H3"
    c["head"].value = "L7H7"
    assert state["idx"] == 11 and "outside the model" in panel.note.value
    grid = panel.outputs["top"].outputs                      # the clickable table is a widget in that output
    assert state["errors"] == []
    assert c["variant"].value == "alpha" and grid is not None


# ----------------------------------------------------------------------------- the write guard

def _rankings() -> pd.DataFrame:
    return pd.DataFrame({"head_idx": [0], "layer": [0], "head": [0], "syn": [0.1], "red": [0.2], "rank_diff": [1.0]})


def test_a_kernel_outside_the_runner_cannot_write_into_a_run_folder(tmp_path, monkeypatch):
    run = _run_folder(tmp_path / "myrun", {"04_ranking_variants": "ok"}, "2026-01-01T10:00:00", "params/myrun.yaml")
    monkeypatch.delenv(artifacts.NOTEBOOK_ENV, raising=False)
    monkeypatch.delenv(store.WRITE_OVERRIDE_ENV, raising=False)
    monkeypatch.setattr(store, "in_jupyter_kernel", lambda: True)
    with pytest.raises(store.RunFolderWriteError) as e:
        artifacts.save("rankings", run, _rankings())
    assert "`python -m lib.run --params params/myrun.yaml --only 04_ranking_variants`" in str(e.value)
    assert store.WRITE_OVERRIDE_ENV in str(e.value) and "\n" not in str(e.value)
    assert not (run / "rankings.csv").exists() and not list(run.glob(".*tmp*"))
    monkeypatch.setenv("JPY_SESSION_NAME", str(run / "05_ablation.ipynb"))        # Lab names the open notebook
    with pytest.raises(store.RunFolderWriteError, match="--only 05_ablation"):
        artifacts.append("behaviour_generations", run, [{"a": 1}])
    with pytest.raises(store.RunFolderWriteError):
        store.ensure_writable_dir(run)
    other = tmp_path / "scratch"                              # not a runner's folder: written
    artifacts.save("rankings", other, _rankings())
    monkeypatch.setenv(artifacts.NOTEBOOK_ENV, "04_ranking_variants")             # the runner's own kernel
    artifacts.save("rankings", run, _rankings())
    monkeypatch.delenv(artifacts.NOTEBOOK_ENV)
    monkeypatch.setenv(store.WRITE_OVERRIDE_ENV, "1")                             # the documented override
    (run / "rankings.csv").unlink()
    artifacts.save("rankings", run, _rankings())
    assert (run / "rankings.csv").exists()


def test_outside_a_kernel_writes_are_unchanged(tmp_path):
    import ipykernel.kernelspec  # noqa: F401  (the runner imports it to find the kernel; that is not a kernel)
    assert not store.in_jupyter_kernel()
    run = _run_folder(tmp_path / "myrun", {"04_ranking_variants": "ok"}, "2026-01-01T10:00:00")
    artifacts.save("rankings", run, _rankings())
    assert (run / "rankings.csv").exists()


def test_a_real_kernel_refuses_and_names_the_runner_command(tmp_path):
    """A Jupyter kernel started the way Lab starts one (no HEADINFO_NOTEBOOK) runs the notebooks' save call."""
    from jupyter_client.manager import start_new_kernel
    run = _run_folder(tmp_path / "myrun", {"04_ranking_variants": "ok"}, "2026-01-01T10:00:00", "params/myrun.yaml")
    env = {k: v for k, v in os.environ.items() if k not in (artifacts.NOTEBOOK_ENV, store.WRITE_OVERRIDE_ENV)}
    km, kc = start_new_kernel(kernel_name="python3", env=env)
    try:
        code = ("import pandas as pd\nfrom lib.storage import artifacts\n"
                f"artifacts.save('rankings', {str(run)!r}, pd.DataFrame({_rankings().to_dict('list')!r}))")
        reply = kc.execute_interactive(code, timeout=120, output_hook=lambda msg: None)
        assert reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == "RunFolderWriteError"
        assert "python -m lib.run --params params/myrun.yaml --only 04_ranking_variants" in reply["content"]["evalue"]
        assert not (run / "rankings.csv").exists()
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


# ----------------------------------------------------------------------------- claims inside executed notebooks

def test_executed_notebooks_open_with_their_claims_once(tmp_path):
    import nbformat
    out = tmp_path / "run"
    out.mkdir()
    claims = [{"id": "C5", "claim": "ablation | diverges", "notebook": "05_ablation", "verdict": "underpowered",
               "statistic": "AUC ratio", "value": 1.26, "ci95": [0.93, 2.05], "reason": "CI spans <null>"},
              {"id": "C1", "claim": "distinct", "notebook": "03_phiid_diagnostics", "verdict": "supported"}]
    (out / "claims.json").write_text(json.dumps({"paper": "the paper", "claims": claims}))
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# 05"), nbformat.v4.new_code_cell("1")])
    nbformat.write(nb, str(out / "05_ablation.ipynb"))
    rep = report.NotebookReport(stem="05_ablation", name="05_ablation", shard=None, status="ok",
                                executed=out / "05_ablation.ipynb")
    for _ in range(2):                                         # a second report run replaces, never adds
        report.add_findings_to_notebooks(out, [rep])
    cells = nbformat.read(str(out / "05_ablation.ipynb"), as_version=4).cells
    assert [c.cell_type for c in cells] == ["markdown", "markdown", "code"]
    assert sum(report.FINDINGS_TAG in c.metadata.get("tags", []) for c in cells) == 1
    text = cells[0].source
    assert "C5: ablation \\| diverges" in text and "**underpowered**" in text and "1.26 [0.93, 2.05]" in text
    assert "C1" not in text and "&lt;null>" in text            # only this notebook's claims; no raw HTML
