"""lib.report: the run index (outputs/<run>/html/index.html).

Run folders are built here the way the runner leaves them: executed notebooks (nbformat, with real PNG outputs
drawn by matplotlib), runner bookkeeping through lib.pipeline.bookkeeping.record / lib.storage.store.update_manifest, HTML report files.
The key figures written next to index.html must be byte-identical to the PNGs put into the notebooks.
The browser test opens the index in headless Chromium (installed with apt-get when missing) and checks that the
page rendered and that every image loaded, with a broken image as the negative control.
"""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from lib import REPO_ROOT, report as report_command
from lib.pipeline import report
from lib.pipeline.bookkeeping import record
from lib.pipeline.steps import Step
from lib.storage.store import update_manifest


def png_bytes(seed: int, color: str = "tab:blue") -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, ax = plt.subplots(figsize=(3, 2), dpi=60)
    ax.plot(np.random.default_rng(seed).standard_normal(20).cumsum(), color=color)
    ax.set(xlabel="step", ylabel="value", title=f"figure {seed}")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def image_output(data: bytes):
    return new_output("display_data", data={"image/png": base64.b64encode(data).decode(), "text/plain": "<Figure>"})


def executed_notebook(path: Path, figures: list[tuple[bytes, bool, str]], error: bool = False) -> None:
    """An executed notebook: per figure (png, tagged key-figure, section heading above it)."""
    cells = [new_markdown_cell(f"# {path.stem}\n\nWhat it measures.")]
    for k, (data, key, section) in enumerate(figures):
        cells.append(new_markdown_cell(f"## {section}\n\nHow to read it."))
        cell = new_code_cell(f"fig = plots.f{k}()", metadata={"tags": ["key-figure"]} if key else {},
                             execution_count=k + 1)
        cell.outputs = [image_output(data)]
        cells.append(cell)
    if error:
        cell = new_code_cell("1 / 0", execution_count=len(figures) + 1)
        cell.outputs = [new_output("error", ename="ZeroDivisionError", evalue="division by zero",
                                   traceback=["Traceback (most recent call last)", "ZeroDivisionError"])]
        cells.append(cell)
    nbformat.write(new_notebook(cells=cells), path)


def make_run(root: Path, spec: dict, params_file: Path | None = None) -> Path:
    """spec: output stem -> dict(status, seconds, figures=[(png, key, section)], error=bool, html=str|None)."""
    out = root / "run"
    (out / "html").mkdir(parents=True, exist_ok=True)
    update_manifest(out, "run", {"name": "unit", "params_file": str(params_file or root / "unit.yaml"),
                                 "shared": {"model": "random:llama"}, "overrides": ["out_dir=" + str(out)]})
    for stem, s in spec.items():
        executed = out / f"{stem}.ipynb"
        executed_notebook(executed, s.get("figures", []), s.get("error", False))
        html = out / "html" / f"{stem}.html"
        if s.get("html") is not None:
            html.write_text(s["html"])
        step = Step(stem.split(".")[0], executed, {"out_dir": str(out), "n": 1}, executed, html)
        entry = {"status": s.get("status", "ok"), "seconds": s.get("seconds", 1.5), "params_hash": "x"}
        if s.get("failed_error"):
            entry["error"] = s["failed_error"]
        record(step, **entry)
    return out


CLEAN_HTML = "<html><body><h1>report</h1><p>fine</p></body></html>"


@pytest.fixture
def clean_run(tmp_path):
    pngs = [png_bytes(1), png_bytes(2, "tab:red"), png_bytes(3, "tab:green"), png_bytes(4)]
    spec = {
        "01_extract": {"seconds": 12.25, "html": CLEAN_HTML,
                       "figures": [(pngs[0], True, "Head output norms"), (pngs[1], False, "Not key")]},
        "02_phiid": {"seconds": 300.0, "html": CLEAN_HTML,
                     "figures": [(pngs[2], True, "Synergy"), (pngs[3], True, "Redundancy")]},
        "05_ablation.shard-1-of-2": {"html": CLEAN_HTML, "figures": [(png_bytes(9), True, "Shard figure")]},
        "05_ablation.shard-2-of-2": {"html": CLEAN_HTML},
        "05_ablation": {"html": CLEAN_HTML, "figures": [(png_bytes(5), True, "Ablation curve")]},
    }
    return make_run(tmp_path, spec), pngs


def test_index_summarises_run_links_reports_and_extracts_exactly_the_key_figures(clean_run):
    out, pngs = clean_run
    index = report.write_index(out)
    assert index == out / "html" / "index.html"
    text = index.read_text()
    figures = sorted(p.name for p in (out / "html" / "figures").iterdir())
    # key figures of non-shard notebooks only; the untagged figure and the shard's figure are not shown; 02 shows
    # its first pair only (INDEX_FIGURE_LIMIT: the per_prompt heatmaps, not every mode and tag)
    assert figures == ["01_extract-1.png", "02_phiid-1.png", "05_ablation-1.png"]
    assert (out / "html" / "figures" / "01_extract-1.png").read_bytes() == pngs[0]
    assert (out / "html" / "figures" / "02_phiid-1.png").read_bytes() == pngs[2]
    for name in figures:
        assert f"src='figures/{name}'" in text
    # captions come from the section heading above each figure
    assert "Head output norms" in text and "Synergy" in text and "Redundancy" not in text and "Not key" not in text
    for stem in ("01_extract", "02_phiid", "05_ablation", "05_ablation.shard-1-of-2", "05_ablation.shard-2-of-2"):
        assert f"href='{stem}.html'" in text
        assert f"href='../{stem}.ipynb'" in text
    assert "shard 1/2" in text and "shard 2/2" in text
    assert "random:llama" in text and "12.2 s" in text and "5.0 min" in text
    assert "Problems" not in text
    assert report.check_run(out) == []


def test_index_is_idempotent_and_drops_stale_figures(clean_run):
    out, _ = clean_run
    report.write_index(out)
    stale = out / "html" / "figures" / "09_gone-1.png"
    stale.write_bytes(b"old")
    first = sorted((p.name, p.read_bytes()) for p in (out / "html" / "figures").iterdir() if p != stale)
    report.write_index(out)
    assert not stale.exists()
    assert sorted((p.name, p.read_bytes()) for p in (out / "html" / "figures").iterdir()) == first
    assert not list((out / "html").glob("*.lock")) and not list((out / "html").glob(".*tmp*"))


def planted_claims(out: Path) -> list[dict]:
    from lib.storage import artifacts
    from lib.pipeline import claims as C
    rows = [C.new_claim("C1"), C.new_claim("C5"), C.not_tested("C6", "no behaviour_summary.json (09 did not run)")]
    rows[0].verdict, rows[0].value, rows[0].ci95 = "ruled out", 0.891, [0.85, 0.92]
    rows[0].null = {"name": "circular-shift surrogates", "value": 0.9, "ci95": [0.88, 0.93]}
    rows[0].notebook = "02_phiid"
    rows[1].verdict, rows[1].value, rows[1].ci95 = "underpowered", 0.91, [0.8, 1.02]
    rows[1].null = {"name": "random orders", "value": 1.0, "ci95": [0.6, 1.5]}
    rows[1].power = {"mde": 1.62, "paper_detectable": True}
    rows[1].settle = {"factor": 2.5, "params": {"05_ablation.n_prompts": 20}}
    artifacts.save("claims", out, {"paper": C.PAPER, "claims": [c.as_dict() for c in rows]})
    return rows


def test_findings_box_leads_the_index_and_each_notebook_report(clean_run):
    out, _ = clean_run
    planted_claims(out)
    for _ in range(2):                                            # idempotent: one box per page
        text = report.write_index(out).read_text()
    assert text.index("Findings") < text.index("<h2>Notebooks</h2>") and "arXiv 2601.06851" in text
    assert "0.891 [0.85, 0.92]" in text and "circular-shift surrogates: 0.9 [0.88, 0.93]" in text
    assert 'class="verdict v-no"' in text and 'class="verdict v-maybe"' in text and 'class="verdict v-none"' in text
    assert "4.1 vs 2.1 random at 30% removed" in text and "09 did not run" in text
    assert "minimum detectable effect (80% power) 1.62" in text and "05_ablation.n_prompts = 20" in text
    assert text.index('src="figures/forest.png"') < text.index("<table class=\"claims\">")
    assert (out / "html" / "figures" / "forest.png").stat().st_size > 5000
    nb_page = (out / "html" / "02_phiid.html").read_text()
    assert nb_page.count("<!-- findings -->") == 1 and "0.891 [0.85, 0.92]" in nb_page
    assert nb_page.index("Findings") < nb_page.index("<h1>report</h1>") and "C5" not in nb_page
    other = (out / "html" / "01_extract.html").read_text()
    assert "Findings" not in other and "overflow-x: auto" in other            # wide tables scroll in their cell
    assert report.check_run(out) == []


def test_index_without_claims_says_how_to_get_them_and_names_bundled_weights(clean_run):
    out, _ = clean_run
    update_manifest(out, "run", {"name": "unit", "params_file": "unit.yaml", "shared": {"model": "bundled:smollm2-135m"},
                                 "overrides": []})
    text = report.write_index(out).read_text()
    assert "No claims.json in this run yet" in text and "Q4_1 GGUF file dequantized to float32" in text


def test_templates_ship_with_the_package():
    from importlib.resources import files
    import tomllib
    names = {p.name for p in files("lib").joinpath("templates").iterdir()}
    assert {"index.html.j2", "findings.html.j2"} <= names
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert "templates/*.j2" in pyproject["tool"]["setuptools"]["package-data"]["lib"]


def test_check_run_flags_stderr_output(clean_run):
    out, _ = clean_run
    nb = nbformat.read(out / "01_extract.ipynb", as_version=4)
    next(c for c in nb.cells if c.cell_type == "code").outputs.append(new_output("stream", name="stderr", text="FutureWarning: past_key_values\n"))
    nbformat.write(nb, out / "01_extract.ipynb")
    problems = report.check_run(out)
    assert len(problems) == 1 and "stderr output" in problems[0] and "01_extract" in problems[0]


def test_check_run_reports_failures_error_cells_tracebacks_and_notebooks_never_run(tmp_path):
    params = tmp_path / "unit.yaml"
    params.write_text("model: random:llama\n01_extract: {}\n02_phiid: {}\n03_diag: {}\n04_rank: {}\n")
    out = make_run(tmp_path, {
        "01_extract": {"html": CLEAN_HTML},
        "02_phiid": {"html": CLEAN_HTML, "error": True},                      # ok in the manifest, error output
        "03_diag": {"status": "failed", "failed_error": "ValueError: bad tau"},  # failed, no HTML
        "04_rank": {"html": "<pre>Traceback (most recent call last):\n  File x</pre>"},
    }, params_file=params)
    params.write_text(params.read_text() + "06_neurons: {}\n")
    problems = report.check_run(out)
    text = "\n".join(problems)
    assert "02_phiid: status error" in text and "error output in cell(s) [1]" in text
    assert "03_diag: status failed: ValueError: bad tau" in text
    assert "04_rank: HTML report" in text and "Traceback" in text
    assert "06_neurons: status not run" in text
    assert not any(p.startswith("01_extract") for p in problems)
    html = report.write_index(out).read_text()
    assert "Problems" in html and "bad tau" in html
    assert "<h1>Run unit <span class=\"badge failed\">failed</span></h1>" in html


def test_cli_exit_codes(clean_run, tmp_path, capsys):
    out, _ = clean_run
    assert report_command.main([str(out), "--check"]) == 0
    assert "index.html" in capsys.readouterr().out
    assert report_command.main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    executed_notebook(out / "02_phiid.ipynb", [], error=True)
    assert report_command.main([str(out), "--check"]) == 1
    assert "02_phiid: status error" in capsys.readouterr().out


# ----------------------------------------------------------------------------- browser

@pytest.fixture(scope="module")
def chromium():
    from tests.tools.browser import ensure_chromium
    path, why = ensure_chromium()
    if not path:
        pytest.skip(f"no headless browser: {why}")
    return path


@pytest.mark.slow(reason="drives a headless browser")
def test_index_renders_in_chromium_with_every_image_loaded(clean_run, chromium, tmp_path):
    from tests.tools.browser import dump_dom, html_attributes, image_stats, screenshot
    out, _ = clean_run
    index = report.write_index(out)
    attrs = html_attributes(dump_dom(chromium, index.as_uri()))
    assert attrs.get("data-report-ready") == "1", attrs
    assert attrs["data-images-total"] == "3" and attrs["data-images-ok"] == "3", attrs      # as in the key-figure test
    shot = screenshot(chromium, index.as_uri(), tmp_path / "index.png")
    stats = image_stats(shot)
    assert stats["width"] == 1200 and stats["non_white_fraction"] > 0.02 and stats["colours"] > 20, stats
    if os.environ.get("REPORT_SCREENSHOT_DIR"):      # keep the screenshot to look at it
        shutil.copy(shot, Path(os.environ["REPORT_SCREENSHOT_DIR"]) / "test_report_index.png")
    # negative control: a missing figure file is seen as a broken image
    (out / "html" / "figures" / "02_phiid-1.png").unlink()
    attrs = html_attributes(dump_dom(chromium, index.as_uri()))
    assert attrs["data-images-total"] == "3" and attrs["data-images-ok"] == "2", attrs


def test_notebook_formulas_read_offline_without_mathjax():
    """Reports are read offline: nbconvert's MathJax comes from a CDN, so no markdown cell may hold TeX math
    ($...$, $$...$$, \\(...\\)); formulas are written as plain text / HTML (e.g. <sub>, <sup>, &Sigma;)."""
    import json
    import re
    tex = re.compile(r"\$\$.*?\$\$|\$[^$\n]+\$|\\\(|\\\[", re.S)
    notebooks = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))
    assert notebooks
    found = {p.name: m.group(0)[:40] for p in notebooks for c in json.loads(p.read_text())["cells"]
             if c["cell_type"] == "markdown" for m in [tex.search("".join(c["source"]))] if m}
    assert not found, f"TeX math in markdown (unreadable offline): {found}"


def test_index_names_gemma_weights_and_links_comparisons_including_it(clean_run, tmp_path):
    out, _ = clean_run
    update_manifest(out, "run", {"name": "unit", "params_file": "unit.yaml", "shared": {"model": "bundled:gemma3-270m"},
                                 "overrides": []})
    for name, runs in (("compare", [out, tmp_path / "other"]), ("compare-b", [tmp_path / "other"])):
        (out.parent / name).mkdir()
        (out.parent / name / "runs.json").write_text(json.dumps({"runs": [str(r) for r in runs]}))
        (out.parent / name / "12_compare_models.html").write_text("<html></html>")
    text = report.write_index(out).read_text()
    assert "Q4_K_M" in text and "no chat template" in text
    assert "../../compare/12_compare_models.html" in text and "compare-b/" not in text
