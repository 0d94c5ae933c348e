"""The run index: outputs/<run>/html/index.html, one page that summarises a run and links its reports.

    python -m lib.report outputs/<run> [--check]        (also: make report RUN=<run>; the runner calls
                                                          write_index(out_dir) at the end of every invocation)

The page shows the run summary from manifest.json (model, params file and overrides, git commit, package
versions, status and time of every notebook, shard runs included), links to every notebook's report
(html/NN_name.html, rendered by the runner without code) and executed notebook, lists the run's artifacts, and
shows the key figures inline: the image outputs of cells tagged `key-figure` in the executed notebooks, written
as PNG/SVG files to html/figures/ next to index.html (so the page stays small and the figures can be reused).

`check_run(out_dir)` lists what is wrong with a finished run: notebooks that failed or are still marked running,
executed notebooks with error outputs, HTML reports that contain a traceback, planned notebooks never run.
`--check` prints these problems and exits 1 when there are any.
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from lib.store import atomic_path, locked, read_manifest

NOTEBOOK_RE = re.compile(r"^(\d\d_[A-Za-z0-9_]+?)(?:\.shard-(\d+)-of-(\d+))?$")
KEY_FIGURE_TAG = "key-figure"
IMAGE_TYPES = {"image/png": "png", "image/svg+xml": "svg", "image/jpeg": "jpg"}
TRACEBACK_MARKERS = ("Traceback (most recent call last)", 'data-mime-type="application/vnd.jupyter.error"',
                     "jp-OutputArea-error")


@dataclass
class Figure:
    notebook: str
    index: int                  # k-th key figure of the notebook, from 1
    kind: str                   # png, svg, jpg
    data: bytes
    caption: str

    @property
    def filename(self) -> str:
        return f"{self.notebook}-{self.index}.{self.kind}"


@dataclass
class NotebookReport:
    stem: str                   # output stem: 05_ablation or 05_ablation.shard-1-of-4
    name: str                   # notebook name: 05_ablation
    shard: tuple[int, int] | None
    status: str                 # ok, failed, running, error (ok in the manifest but error outputs), not run
    seconds: float | None = None
    started: str | None = None
    finished: str | None = None
    error: str | None = None
    params: dict = field(default_factory=dict)
    executed: Path | None = None
    html: Path | None = None
    error_cells: list[int] = field(default_factory=list)      # execution counts (or cell indices) with errors
    figures: list[Figure] = field(default_factory=list)


# ----------------------------------------------------------------------------- reading a run

def _text(value) -> str:
    return "".join(value) if isinstance(value, list) else (value or "")


def _caption(cells: list, index: int) -> str:
    """The nearest markdown heading above cell `index`, else its first markdown line."""
    for cell in reversed(cells[:index]):
        if cell.get("cell_type") != "markdown":
            continue
        lines = [l.strip() for l in _text(cell.get("source")).splitlines() if l.strip()]
        heads = [l.lstrip("#").strip() for l in lines if l.startswith("#")]
        if heads:
            return heads[-1]
        if lines:
            return lines[0][:120]
    return ""


def read_executed(path: Path, name: str) -> tuple[list[int], list[Figure]]:
    """-> (cells with error outputs, key figures) of an executed notebook."""
    nb = json.loads(path.read_text())
    cells = nb.get("cells", [])
    errors, figures = [], []
    for i, cell in enumerate(cells):
        outputs = cell.get("outputs", [])
        if any(o.get("output_type") == "error" for o in outputs):
            errors.append(cell.get("execution_count") or i)
        if KEY_FIGURE_TAG not in cell.get("metadata", {}).get("tags", []):
            continue
        for out in outputs:
            data = out.get("data", {})
            for mime, kind in IMAGE_TYPES.items():
                if mime in data:
                    raw = _text(data[mime])
                    payload = raw.encode() if kind == "svg" else base64.b64decode(raw)
                    figures.append(Figure(name, len(figures) + 1, kind, payload, _caption(cells, i)))
                    break
    return errors, figures


def planned_notebooks(manifest: dict) -> list[str]:
    """Notebook sections of the run's params file (from the manifest), when the file is still there."""
    params_file = manifest.get("sections", {}).get("run", {}).get("params_file")
    if not params_file:
        return []
    from lib import REPO_ROOT
    path = Path(params_file)
    path = path if path.is_absolute() else REPO_ROOT / path
    try:
        import yaml
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, ValueError):
        return []
    return sorted(k for k in raw if isinstance(k, str) and re.match(r"^\d\d_", k) and not k.startswith("00_"))


def collect(out_dir: str | Path) -> tuple[dict, list[NotebookReport]]:
    """-> (manifest, one NotebookReport per notebook or shard run, in pipeline order)."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    entries = dict(manifest.get("notebooks", {}))
    stems = set(entries) | {p.stem for p in out_dir.glob("[0-9][0-9]_*.ipynb")}
    reports = []
    for stem in stems:
        m = NOTEBOOK_RE.match(stem)
        if not m:
            continue
        entry = entries.get(stem, {})
        executed = out_dir / f"{stem}.ipynb"
        page = out_dir / "html" / f"{stem}.html"
        rep = NotebookReport(stem=stem, name=m.group(1), shard=(int(m.group(2)), int(m.group(3))) if m.group(2) else None,
                             status=entry.get("status", "unknown"), seconds=entry.get("seconds"),
                             started=entry.get("started"), finished=entry.get("finished"), error=entry.get("error"),
                             params=entry.get("params", {}), executed=executed if executed.exists() else None,
                             html=page if page.exists() else None)
        if rep.executed:
            try:
                rep.error_cells, figures = read_executed(executed, stem)
            except (OSError, ValueError) as e:
                rep.error, figures = f"unreadable executed notebook: {e}", []
            if rep.shard is None:
                rep.figures = figures
            if rep.error_cells and rep.status == "ok":
                rep.status = "error"
        reports.append(rep)
    for name in planned_notebooks(manifest):
        if not any(r.name == name for r in reports):
            reports.append(NotebookReport(stem=name, name=name, shard=None, status="not run"))
    reports.sort(key=lambda r: (r.name, r.shard is not None, r.shard or (0, 0)))
    return manifest, reports


def check_run(out_dir: str | Path) -> list[str]:
    """Problems of a run folder (empty list: every notebook ran and no report shows an error)."""
    out_dir = Path(out_dir)
    problems = []
    if not (out_dir / "manifest.json").exists():
        return [f"{out_dir}: no manifest.json (not a run folder, or nothing has run yet)"]
    _, reports = collect(out_dir)
    if not reports:
        problems.append(f"{out_dir}: no notebook has run")
    for r in reports:
        if r.status not in ("ok",):
            detail = f": {r.error}" if r.error else ""
            problems.append(f"{r.stem}: status {r.status}{detail}")
        if r.error_cells:
            problems.append(f"{r.stem}: error output in cell(s) {r.error_cells} of {r.executed}")
        if r.status == "ok" and r.html is None:
            problems.append(f"{r.stem}: no HTML report {out_dir / 'html' / (r.stem + '.html')}")
        if r.html is not None:
            text = r.html.read_text(errors="replace")
            found = [m for m in TRACEBACK_MARKERS if m in text]
            if found:
                problems.append(f"{r.stem}: HTML report {r.html} shows an error ({found[0]!r})")
    return problems


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


def _e(value) -> str:
    return html.escape(str(value), quote=True)


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


def _badge(status: str) -> str:
    return f'<span class="badge {status.replace(" ", "")}">{_e(status)}</span>'


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


def render_index(out_dir: Path, manifest: dict, reports: list[NotebookReport], problems: list[str]) -> str:
    run = manifest.get("sections", {}).get("run", {})
    name = run.get("name", out_dir.name)
    status = _run_status(reports)
    total = sum(r.seconds or 0 for r in reports if r.status in ("ok", "error", "failed"))
    parts = [f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>",
             f"<meta name='viewport' content='width=device-width, initial-scale=1'>",
             f"<title>Run {_e(name)}: report index</title><style>{CSS}</style><script>{SCRIPT}</script></head><body>",
             f"<h1>Run {_e(name)} {_badge(status)}</h1>",
             f"<p class='sub'>{_e(out_dir.resolve())} &middot; index written {time.strftime('%Y-%m-%d %H:%M:%S')}</p>"]
    versions = ", ".join(f"{k} {v}" for k, v in manifest.get("versions", {}).items())
    rows = [("model", _model(manifest, reports)), ("params file", run.get("params_file", "?")),
            ("overrides", " ".join(run.get("overrides", [])) or "none"),
            ("shared parameters", json.dumps(run.get("shared", {}), sort_keys=True)),
            ("git commit", manifest.get("git_commit") or "?"), ("versions", versions or "?"),
            ("notebook time (sum)", _fmt_seconds(total))]
    parts.append("<dl class='summary'>" + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in rows) + "</dl>")
    if problems:
        parts.append("<div class='problems'><b>Problems</b><ul>" + "".join(f"<li>{_e(p)}</li>" for p in problems)
                     + "</ul></div>")

    parts.append("<h2>Notebooks</h2><table><tr><th>notebook</th><th>status</th><th>time</th><th>finished</th>"
                 "<th>report</th><th>executed notebook</th></tr>")
    for r in reports:
        label = f"shard {r.shard[0]}/{r.shard[1]}" if r.shard else r.name
        report_link = f"<a href='{_e(r.html.name)}'>report</a>" if r.html else ""
        nb_link = f"<a href='../{_e(r.executed.name)}'>{_e(r.executed.name)}</a>" if r.executed else ""
        err = ""
        if r.error or r.error_cells:
            err = f"<div class='err'>{_e(r.error or '')}{' error output in cell(s) ' + _e(r.error_cells) if r.error_cells else ''}</div>"
        parts.append(f"<tr class='{'shard' if r.shard else 'nb'}'><td>{_e(label)}{err}</td><td>{_badge(r.status)}</td>"
                     f"<td class='num'>{_fmt_seconds(r.seconds)}</td><td>{_e((r.finished or r.started or '').replace('T', ' '))}</td>"
                     f"<td>{report_link}</td><td>{nb_link}</td></tr>")
    parts.append("</table>")

    figures = [f for r in reports for f in r.figures]
    parts.append("<h2>Key figures</h2>")
    if not figures:
        parts.append("<p class='sub'>No key figures yet (cells tagged <code>key-figure</code> in the executed "
                     "notebooks).</p>")
    parts.append("<div class='figures'>")
    for f in figures:
        parts.append(f"<figure id='{_e(f.filename)}'><figcaption><a href='{_e(f.notebook)}.html'>{_e(f.notebook)}</a>"
                     f"{' &middot; ' + _e(f.caption) if f.caption else ''}</figcaption>"
                     f"<img src='figures/{_e(f.filename)}' alt='{_e(f.notebook)} key figure {f.index}'></figure>")
    parts.append("</div>")

    parts.append("<h2>Parameters</h2>")
    for r in reports:
        if r.params and not r.shard:
            parts.append(f"<details><summary>{_e(r.name)}</summary><pre>{_e(json.dumps(r.params, indent=2, sort_keys=True))}</pre></details>")
    artifacts = _artifacts(out_dir)
    if artifacts:
        parts.append("<h2>Artifacts</h2><table><tr><th>file</th><th>size</th></tr>" + "".join(
            f"<tr><td><a href='../{_e(n)}'>{_e(n)}</a></td><td class='num'>{_size(s)}</td></tr>" for n, s in artifacts)
            + "</table>")
    logs = sorted((out_dir / "logs").glob("*.out")) if (out_dir / "logs").is_dir() else []
    if logs:
        parts.append("<h2>Job logs</h2><table><tr><th>log (SLURM)</th><th>size</th></tr>" + "".join(
            f"<tr><td><a href='../logs/{_e(p.name)}'>{_e(p.name)}</a></td><td class='num'>{_size(p.stat().st_size)}</td></tr>"
            for p in logs) + "</table>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


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
        for f in (f for r in reports for f in r.figures):
            target = fig_dir / f.filename
            keep.add(target.name)
            if not target.exists() or target.read_bytes() != f.data:
                with atomic_path(target) as tmp:
                    tmp.write_bytes(f.data)
        for old in fig_dir.iterdir():
            if old.is_file() and old.name not in keep and not old.name.startswith("."):
                old.unlink()
        with atomic_path(index) as tmp:
            tmp.write_text(render_index(out_dir, manifest, reports, problems))
    return index


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="a run folder, e.g. outputs/smollm2-135m")
    parser.add_argument("--check", action="store_true", help="also list problems; exit 1 when there are any")
    args = parser.parse_args(argv)
    try:
        path = write_index(args.out_dir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[report] {path}")
    if args.check:
        problems = check_run(args.out_dir)
        for p in problems:
            print(f"[report] problem: {p}")
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
