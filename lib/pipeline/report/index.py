"""The run index, outputs/<run>/html/index.html: run summary, status and time of every notebook, links to their
reports, the run's artifacts, the key figures inline and the claims' forest plot; written under the report
lock by write_index."""
from __future__ import annotations

import json
import time
from pathlib import Path

from lib.pipeline.report.findings import (FINDINGS_CSS, add_findings_to_notebooks, add_findings_to_reports,
                                          findings_rows, read_claims, template)
from lib.pipeline.report.reading import Figure, NotebookReport, check_run, collect
from lib.storage.store import atomic_path, locked
from lib.storage.notebooks import NB

__all__ = ["INDEX_FIGURE_LIMIT", "write_index", "render_index", "comparisons_including"]


# ----------------------------------------------------------------------------- writing the page

CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif; margin: 2rem auto; max-width: 1100px;
       padding: 0 1rem; color: #1f2328; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #d0d7de; }
.sub { color: #59636e; margin-top: 0; }
table { border-collapse: collapse; width: 100%; font-size: .9rem; }
th, td { text-align: left; padding: .3rem .6rem; border-bottom: 1px solid #e5e8eb; vertical-align: top; }
th { background: #f6f8fa; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.shard td:first-child { padding-left: 1.6rem; color: #59636e; }
.badge { display: inline-block; padding: 0 .5rem; border-radius: 1rem; font-size: .8rem; font-weight: 600; color: #fff; }
.ok { background: #1a7f37; } .failed, .error { background: #cf222e; } .running { background: #9a6700; }
.notrun, .unknown { background: #8c959f; }
.err { color: #cf222e; font-family: ui-monospace, monospace; font-size: .8rem; }
dl.summary { display: grid; grid-template-columns: max-content 1fr; gap: .2rem 1rem; font-size: .9rem; }
dl.summary dt { color: #59636e; } dl.summary dd { margin: 0; font-family: ui-monospace, monospace; }
.figures { display: flex; flex-wrap: wrap; gap: 1rem 2rem; align-items: flex-start; }
figure { margin: .8rem 0 1.2rem; max-width: 100%; } figure img { max-width: 100%; height: auto; border: 1px solid #e5e8eb; }
figcaption { color: #59636e; font-size: .9rem; margin-bottom: .3rem; }
img.broken { outline: 3px solid #cf222e; min-height: 2rem; min-width: 10rem; }
details { margin: .3rem 0; } pre { background: #f6f8fa; padding: .6rem; overflow-x: auto; font-size: .8rem; }
.problems { border: 1px solid #cf222e; background: #fff5f5; padding: .5rem 1rem; border-radius: 6px; }
"""

# marks the page once every image has loaded (or failed): data-images-ok / data-images-total on <html>, and a red
# outline on any broken image. Used by the browser test; harmless for readers.
SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images), ok = 0;
  imgs.forEach(function (im) { if (im.complete && im.naturalWidth > 0) { ok++; } else { im.classList.add('broken'); } });
  document.documentElement.setAttribute('data-images-ok', ok);
  document.documentElement.setAttribute('data-images-total', imgs.length);
  document.documentElement.setAttribute('data-report-ready', '1');
});
"""


def _fmt_seconds(s) -> str:
    if s is None:
        return ""
    s = float(s)
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.2f} h"


def _run_status(reports: list[NotebookReport]) -> str:
    statuses = {r.status for r in reports}
    if not reports:
        return "not run"
    for s in ("failed", "error", "running", "not run", "unknown"):
        if s in statuses:
            return s
    return "ok"


def _model(manifest: dict, reports: list[NotebookReport]) -> str:
    shared = manifest.get("sections", {}).get("run", {}).get("shared", {})
    if "model" in shared:
        return str(shared["model"])
    for r in reports:
        if "model" in r.params:
            return str(r.params["model"])
    return "?"


def _artifacts(out_dir: Path) -> list[tuple[str, int]]:
    files = []
    for p in sorted(out_dir.iterdir()):
        if p.is_file() and not p.name.startswith(".") and p.suffix not in (".lock", ".ipynb"):
            files.append((p.name, p.stat().st_size))
        elif p.is_dir() and p.name.endswith("_shards"):
            size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
            files.append((p.name + "/", size))
    return files


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


INDEX_FIGURE_LIMIT = {NB.PHIID: 1}     # notebook -> key figures shown on the index (02: the per_prompt pair)


def _index_figures(reports: list[NotebookReport]) -> list[Figure]:
    return [f for r in reports for f in r.figures[:INDEX_FIGURE_LIMIT.get(r.name, len(r.figures))]]


def _summary_rows(manifest: dict, reports: list[NotebookReport], total: float) -> list[tuple[str, str]]:
    run = manifest.get("sections", {}).get("run", {})
    versions = ", ".join(f"{k} {v}" for k, v in manifest.get("versions", {}).items())
    model = _model(manifest, reports)
    rows = [("model", model)]
    from lib.pipeline.claims import weights_note
    if weights_note(model):
        rows.append(("weights", weights_note(model)))
    return rows + [("params file", run.get("params_file", "?")),
                   ("overrides", " ".join(run.get("overrides", [])) or "none"),
                   ("shared parameters", json.dumps(run.get("shared", {}), sort_keys=True)),
                   ("git commit", manifest.get("git_commit") or "?"), ("versions", versions or "?"),
                   ("notebook time (sum)", _fmt_seconds(total))]


def _notebook_rows(reports: list[NotebookReport]) -> list[dict]:
    rows = []
    for r in reports:
        err = (r.error or "") + (f" error output in cell(s) {r.error_cells}" if r.error_cells else "")
        rows.append({"label": f"shard {r.shard[0]}/{r.shard[1]}" if r.shard else r.name, "shard": r.shard,
                     "status": r.status, "time": _fmt_seconds(r.seconds), "error": err.strip(),
                     "finished": (r.finished or r.started or "").replace("T", " "),
                     "html": r.html.name if r.html else "", "executed": r.executed.name if r.executed else ""})
    return rows


def render_index(out_dir: Path, manifest: dict, reports: list[NotebookReport], problems: list[str]) -> str:
    """The index page (lib/templates/index.html.j2), Findings box first."""
    run = manifest.get("sections", {}).get("run", {})
    total = sum(r.seconds or 0 for r in reports if r.status in ("ok", "error", "failed"))
    paper, claims = read_claims(out_dir)
    logs = sorted((out_dir / "logs").glob("*.out")) if (out_dir / "logs").is_dir() else []
    return template("index.html.j2").render(
        name=run.get("name", out_dir.name), status=_run_status(reports), out_dir=str(out_dir.resolve()),
        written=time.strftime("%Y-%m-%d %H:%M:%S"), css=CSS + FINDINGS_CSS, script=SCRIPT,
        findings=findings_rows(claims), paper=paper, standalone=False,
        forest=f"figures/{FOREST}" if (out_dir / "html" / "figures" / FOREST).exists() else "",
        summary=_summary_rows(manifest, reports, total), problems=problems, notebooks=_notebook_rows(reports),
        figures=_index_figures(reports),
        param_sections=[{"name": r.name, "text": json.dumps(r.params, indent=2, sort_keys=True)}
                        for r in reports if r.params and not r.shard],
        artifacts=[(n, _size(sz)) for n, sz in _artifacts(out_dir)],
        logs=[(p.name, _size(p.stat().st_size)) for p in logs], comparisons=_comparison_links(out_dir))


def comparisons_including(run_dir, compare_root=None) -> list[Path]:
    """The comparison reports (outputs/compare*/<NB.COMPARE>.html) whose runs include `run_dir`."""
    run_dir = Path(run_dir).resolve()
    root = Path(compare_root) if compare_root else run_dir.parent
    found = []
    for runs_file in sorted(root.glob("compare*/runs.json")):
        runs = [Path(r).resolve() for r in json.loads(runs_file.read_text()).get("runs", [])]
        if run_dir in runs and (runs_file.parent / f"{NB.COMPARE}.html").exists():
            found.append(runs_file.parent / f"{NB.COMPARE}.html")
    return found


def _comparison_links(out_dir: Path) -> list[tuple[str, str]]:
    """(relative link, label) of every cross-model comparison (lib/compare.py) that includes this run."""
    import os
    return [(os.path.relpath(p, out_dir / "html"), p.parent.name) for p in comparisons_including(out_dir)]


FOREST = "forest.png"


def _write_forest(out_dir: Path, target: Path) -> bool:
    """The claims' forest plot (lib/plots/claims.py) as html/figures/forest.png; False without claims."""
    _, claims = read_claims(out_dir)
    if not claims:
        return False
    import io
    import matplotlib.pyplot as plt
    from lib.plots.claims import forest_plot
    fig = forest_plot(claims)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    with atomic_path(target) as tmp:
        tmp.write_bytes(buf.getvalue())
    return True


def write_index(out_dir: str | Path) -> Path:
    """Write <out_dir>/html/index.html and html/figures/*; -> the index path. Safe to call concurrently
    (SLURM array tasks): one writer at a time under a lock, every file replaced atomically."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"run folder {str(out_dir)!r} does not exist; run the pipeline first "
                                f"(python -m lib.run --params params/<run>.yaml)")
    html_dir = out_dir / "html"
    fig_dir = html_dir / "figures"
    index = html_dir / "index.html"
    fig_dir.mkdir(parents=True, exist_ok=True)
    with locked(out_dir / ".report"):          # hidden .report.lock next to manifest.json
        manifest, reports = collect(out_dir)
        problems = check_run(out_dir) if (out_dir / "manifest.json").exists() else []
        keep = set()
        for f in _index_figures(reports):
            target = fig_dir / f.filename
            keep.add(target.name)
            if not target.exists() or target.read_bytes() != f.data:
                with atomic_path(target) as tmp:
                    tmp.write_bytes(f.data)
        if _write_forest(out_dir, fig_dir / FOREST):
            keep.add(FOREST)
        for old in fig_dir.iterdir():
            if old.is_file() and old.name not in keep and not old.name.startswith("."):
                old.unlink()
        add_findings_to_reports(out_dir, reports)
        add_findings_to_notebooks(out_dir, reports)
        with atomic_path(index) as tmp:
            tmp.write_text(render_index(out_dir, manifest, reports, problems))
    return index
