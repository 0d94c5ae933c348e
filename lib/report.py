"""The run index: outputs/<run>/html/index.html, one page that summarises a run and links its reports.

    python -m lib.report outputs/<run> [--check]        (also: make report RUN=<run>; the runner calls
                                                          write_index(out_dir) at the end of every invocation)

The page (rendered from lib/templates/index.html.j2) opens with the Findings box: the claims scorecard of
claims.json (lib/claims.py: every claim of the paper with our number and CI, its null, the paper's figure and a
colour-coded verdict); the same box, restricted to the claims a notebook tests, is put at the top of that
notebook's HTML report. Then the run summary from manifest.json (model, params file and overrides, git commit, package
versions, status and time of every notebook, shard runs included), links to every notebook's report
(html/NN_name.html, rendered by the runner without code) and executed notebook, lists the run's artifacts, and
shows the key figures inline: the image outputs of cells tagged `key-figure` in the executed notebooks, written
as PNG/SVG files to html/figures/ next to index.html (so the page stays small and the figures can be reused;
INDEX_FIGURE_LIMIT caps a notebook's share, e.g. one PhiID heatmap pair of 02).

`check_run(out_dir)` lists what is wrong with a finished run: notebooks that failed or are still marked running,
executed notebooks with error or stderr outputs, HTML reports that contain a traceback, planned notebooks never
run.
`--check` prints these problems and exits 1 when there are any.
"""
from __future__ import annotations

import argparse
import base64
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from lib.storage.store import atomic_path, locked, read_manifest
from lib.storage.notebooks import NB

__all__ = ["Figure", "NotebookReport", "stderr_cells", "check_run", "FINDINGS_CSS", "INDEX_FIGURE_LIMIT",
           "own_findings", "FINDINGS_TAG", "add_findings_to_notebooks", "write_index", "main"]

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
    stem: str                   # output stem: <notebook> or <notebook>.shard-1-of-4
    name: str                   # notebook name (an NB constant)
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


def stderr_cells(path: Path) -> list[int]:
    """Execution counts (or cell indices) of the cells of an executed notebook that wrote to stderr (warnings,
    log lines): an executed report must carry none."""
    nb = json.loads(Path(path).read_text())
    return [c.get("execution_count") or i for i, c in enumerate(nb.get("cells", []))
            if any(o.get("output_type") == "stream" and o.get("name") == "stderr" for o in c.get("outputs", []))]


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
        noisy = stderr_cells(r.executed) if r.executed else []
        if noisy:
            problems.append(f"{r.stem}: stderr output (warnings or log lines) in cell(s) {noisy} of {r.executed}")
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

FINDINGS_CSS = """
section.findings { border: 2px solid #0969da; border-radius: 8px; padding: .3rem 1rem .8rem; margin: 1rem 0 1.5rem;
                   background: #f6faff; }
section.findings h2 { margin-top: .4rem; border: none; }
table.claims td { font-size: .85rem; } .stat { color: #59636e; font-size: .78rem; margin-top: .15rem; }
.verdict { display: inline-block; padding: .05rem .5rem; border-radius: 1rem; font-weight: 600; color: #fff;
           white-space: nowrap; }
.v-yes { background: #1a7f37; } .v-no { background: #cf222e; } .v-maybe { background: #9a6700; }
.v-none { background: #8c959f; } .v-opp { background: #8250df; } .v-bad { background: #57606a; }
img.forest { max-width: 760px; width: 100%; }
"""

# notebook reports: the Findings box and tables that fit 1200 px (scroll inside their cell instead of the page)
REPORT_CSS = FINDINGS_CSS + """
.findings-wrap { max-width: 1150px; margin: 1rem auto; font-family: system-ui, sans-serif; line-height: 1.4; }
section.findings table { border-collapse: collapse; width: 100%; }
section.findings th, section.findings td { text-align: left; padding: .3rem .6rem; border-bottom: 1px solid #e5e8eb;
                                           vertical-align: top; }
section.findings .sub { color: #59636e; }
.jp-RenderedHTMLCommon table, .rendered_html table { display: block; max-width: 1150px; overflow-x: auto;
                                                     font-size: 11px; }
.hi-tables { margin: .3rem 0 .8rem; } .hi-note { color: #59636e; font-size: .8rem; margin: .2rem 0 0; }
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
VERDICT_CSS = {"supported": "v-yes", "opposite": "v-opp", "ruled out": "v-no", "underpowered": "v-maybe",
               "invalid": "v-bad", "not tested": "v-none"}
FINDINGS_MARK = ("<!-- findings -->", "<!-- /findings -->")


def _template(name: str):
    import jinja2
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(Path(__file__).parent / "templates")),
                             autoescape=True, trim_blocks=True, lstrip_blocks=True)
    return env.get_template(name)


def _num(x) -> str:
    if x is None:
        return "n/a"
    x = float(x)
    return f"{x:.3g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"


def _with_ci(value, ci) -> str:
    if value is None:
        return "n/a"
    if not ci or any(v is None for v in ci):
        return _num(value)
    return f"{_num(value)} [{_num(ci[0])}, {_num(ci[1])}]"


def _extra_lines(c: dict) -> list[str]:
    """What sits under a claim: power, the other results of the same experiment, sensitivity checks, the plan."""
    d, lines = c.get("details") or {}, []
    lines += _power_lines(c)
    for key, label in (("random_init", "random-init copy"), ("before_end_of_turn", "steps before the end of turn")):
        e = d.get(key)
        if isinstance(e, dict) and "r" in e:
            lines.append(f"{label}: r = {_with_ci(e['r'], e.get('ci95'))}, null {_with_ci(e.get('null_mean'), e.get('null_ci95'))}"
                         f" -> {e.get('verdict')}")
        elif isinstance(e, dict) and "raw" in e:
            lines.append(f"{label}: raw {e.get('raw')}, beyond null {e.get('beyond_null')}")
    t = d.get("trend_kept_null")
    if isinstance(t, dict) and "r" in t:
        lines.append(f"null keeping each series' trend: band {_with_ci(t['null_mean'], t['null_ci95'])} -> "
                     f"{t['verdict']}")
    elif isinstance(t, dict) and "verdict" in t:
        b = t["beyond_null"]
        lines.append(f"null keeping each series' trend: mid - early {_with_ci(b['value'], [b['lo'], b['hi']])} "
                     f"({b['verdict']}) -> {t['verdict']}")
    dup = (d.get("random_init") or {}).get("near_duplicate_heads") or d.get("random_init_near_duplicate_heads")
    if dup:
        lines.append(f"random-init copy: {dup['heads']} of {dup['of_heads']} heads have a near copy (series r >= "
                     f"{dup['threshold']}): {dup['note']}")
    for key in ("raw", "beyond_null"):
        e = d.get(key)
        if c.get("id") == "C2" and isinstance(e, dict):
            lines.append(f"{key.replace('_', ' ')} shape: {e['shape']}, mid - early "
                         f"{_with_ci(e['value'], [e['lo'], e['hi']])}")
    if c.get("id") == "C3" and d.get("trained"):
        t, r = d["trained"], d.get("random_init") or {}
        lines.append(f"trained: raw {t.get('raw')}, beyond null {t.get('beyond_null')}; random init: raw "
                     f"{r.get('raw')}, beyond null {r.get('beyond_null')}")
    for half, h in (d.get("halves") or {}).items():
        lines.append(f"{half}: {h['verdict']} ({_with_ci(h['value'], h.get('ci95') or h.get('null_ci95'))}"
                     f"{' vs null band' if 'null_ci95' in h else ''})")
    if "percentile_among_random" in d:
        m = d.get("layer_matched") or {}
        lines.append(f"percentile among {d.get('n_random')} random orders: {_num(d['percentile_among_random'])}; "
                     f"vs {m.get('n', 0)} layer-matched orders: ratio {_with_ci(m.get('ratio'), m.get('ci95'))}")
    if isinstance(d.get("oracle"), dict):
        o = d["oracle"]
        value = o.get("auc_ratio", o.get("value"))
        lines.append(f"oracle ordering (positive control, heads by measured importance): "
                     f"{_with_ci(value, o.get('ci95'))} -> {o.get('verdict')}")
    lines += [f"also: {x}" for x in d.get("also") or []]
    sft = d.get("sft_control")
    if isinstance(sft, dict) and sft.get("line"):
        lines.append(f"SFT control: {sft['line']}")
    return lines


def _power_lines(c: dict) -> list[str]:
    p, e = c.get("power") or {}, c.get("paper_effect") or {}
    lines = []
    if p.get("mde") is not None:
        seen = "" if p.get("paper_detectable") is None else (
            " (the paper's effect is detectable)" if p["paper_detectable"] else " (the paper's effect is NOT detectable)")
        lines.append(f"paper's effect {_num(e.get('value'))}; minimum detectable effect (80% power) "
                     f"{_num(p['mde'])}{seen}")
    plan = c.get("settle") or {}
    if plan.get("params"):
        lines.append("to settle: " + ", ".join(f"{k} = {v}" for k, v in plan["params"].items())
                     + f" (x{plan['factor']:.1f}; python -m lib.plan)")
    elif plan.get("why"):
        lines.append(f"to settle: {plan['why']}")
    return lines


def findings_rows(claims: list[dict], notebook: str | None = None) -> list[dict]:
    """Rows of the Findings box (all claims, or those tested by one notebook)."""
    rows = []
    for c in claims:
        if notebook is not None and c.get("notebook") != notebook:
            continue
        null = c.get("null") or {}
        paper = c.get("paper") or {}
        rows.append({"id": c["id"], "claim": c.get("claim", ""), "verdict": c.get("verdict", "not tested"),
                     "css": VERDICT_CSS.get(c.get("verdict"), "v-none"), "reason": c.get("reason", ""),
                     "statistic": c.get("statistic", ""), "ours": _with_ci(c.get("value"), c.get("ci95")),
                     "null": (f"{null.get('name', '')}: {_with_ci(null.get('value'), null.get('ci95'))}"
                              if null else "n/a"),
                     "paper": paper.get("text", ""), "notebook": c.get("notebook", ""),
                     "effect": _num((c.get("paper_effect") or {}).get("value")),
                     "mde": _num((c.get("power") or {}).get("mde")),
                     "notebook_link": f"{c['notebook']}.html" if c.get("notebook") else "", "extra": _extra_lines(c)})
    return rows


def _claims(out_dir: Path) -> tuple[str, list[dict]]:
    from lib.storage import artifacts
    if not artifacts.path("claims", out_dir).exists():
        from lib.claims import PAPER
        return PAPER, []
    data = artifacts.load("claims", out_dir)
    return data.get("paper", ""), data.get("claims", [])


def render_findings(out_dir: Path, notebook: str | None = None, standalone: bool = False) -> str:
    paper, claims = _claims(out_dir)
    return _template("findings.html.j2").render(findings=findings_rows(claims, notebook), paper=paper,
                                                standalone=standalone, css=REPORT_CSS, out_dir=str(out_dir))


def add_findings_to_reports(out_dir: Path, reports: list["NotebookReport"]) -> None:
    """Put that notebook's claims (and the wide-table CSS) at the top of every notebook's HTML report; replaces an
    earlier box, so repeated runs leave exactly one."""
    paper, claims = _claims(out_dir)
    tested = {c.get("notebook") for c in claims}
    for r in reports:
        if r.html is None or r.shard:
            continue
        text = r.html.read_text(errors="replace")
        if FINDINGS_MARK[0] in text:
            head, rest = text.split(FINDINGS_MARK[0], 1)
            text = head + rest.split(FINDINGS_MARK[1], 1)[-1]
        box = render_findings(out_dir, r.name, standalone=True) if r.name in tested else \
            f"<style>{REPORT_CSS}</style>" + own_findings(text)
        m = re.search(r"<body[^>]*>", text)
        if m is None:
            continue
        text = text[:m.end()] + FINDINGS_MARK[0] + f"<div class='findings-wrap'>{box}</div>" + FINDINGS_MARK[1] + text[m.end():]
        with atomic_path(r.html) as tmp:
            tmp.write_text(text)


OWN_BOX_RE = re.compile(r"<section class=[\"']findings conclusions[\"'] id=[\"']what-this-shows-.*?</section>", re.S)


def own_findings(page_html: str) -> str:
    """For a page that tests no claim of the paper (06, 07, 11): a copy of its closing "What this shows" box
    (lib/pipeline/conclusions.py) as its Findings box at the top; "" when the page has none."""
    m = OWN_BOX_RE.search(page_html)
    if m is None:
        return ""
    box = re.sub(r"id=([\"'])what-this-shows-", r"id=\1own-findings-", m.group(0), count=1)
    return box.replace(">What this shows</h2>", ">Findings of this page</h2><p class='sub'>No claim of the paper is "
                       "tested here; these are the page's own results (the same box closes the page).</p>", 1)


FINDINGS_TAG = "findings"          # the cell that add_findings_to_notebooks puts first in an executed notebook


def _md_cell(text) -> str:
    """Text for one cell of a markdown table: pipes escaped, no line breaks, no HTML."""
    return str(text).replace("|", "\\|").replace("\n", " ").replace("<", "&lt;")


def findings_markdown(rows: list[dict], paper: str) -> str:
    """The Findings box of one notebook as a markdown cell (renders in JupyterLab and nbconvert alike)."""
    lines = ["## Findings: the claims this notebook tests", "", f"Paper: {paper}; verdicts from the whole run's "
             f"claims.json (written by the runner after the last notebook).", "",
             "| claim | verdict | statistic | ours [95% CI] | null | paper | reason |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['id']}: {_md_cell(r['claim'])} | **{_md_cell(r['verdict'])}** | {_md_cell(r['statistic'])} | {_md_cell(r['ours'])} "
              f"| {_md_cell(r['null'])} | {_md_cell(r['paper'])} | {_md_cell(r['reason'])} |" for r in rows]
    return "\n".join(lines)


def add_findings_to_notebooks(out_dir: Path, reports: list["NotebookReport"]) -> None:
    """Put that notebook's claims first in every executed notebook (a markdown cell tagged `findings`), so a
    report opened in JupyterLab shows its verdicts as its HTML page does; replaces an earlier cell."""
    import nbformat
    paper, claims = _claims(out_dir)
    for r in reports:
        rows = findings_rows(claims, r.name)
        if r.executed is None or r.shard or not rows or not r.executed.exists():
            continue
        nb = nbformat.read(r.executed, as_version=4)
        nb.cells = [c for c in nb.cells if FINDINGS_TAG not in c.get("metadata", {}).get("tags", [])]
        nb.cells.insert(0, nbformat.v4.new_markdown_cell(findings_markdown(rows, paper),
                                                         metadata={"tags": [FINDINGS_TAG]}))
        with atomic_path(r.executed) as tmp:
            nbformat.write(nb, str(tmp))


def _index_figures(reports: list[NotebookReport]) -> list[Figure]:
    return [f for r in reports for f in r.figures[:INDEX_FIGURE_LIMIT.get(r.name, len(r.figures))]]


def _summary_rows(manifest: dict, reports: list[NotebookReport], total: float) -> list[tuple[str, str]]:
    run = manifest.get("sections", {}).get("run", {})
    versions = ", ".join(f"{k} {v}" for k, v in manifest.get("versions", {}).items())
    model = _model(manifest, reports)
    rows = [("model", model)]
    from lib.claims import weights_note
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
    paper, claims = _claims(out_dir)
    logs = sorted((out_dir / "logs").glob("*.out")) if (out_dir / "logs").is_dir() else []
    return _template("index.html.j2").render(
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
    _, claims = _claims(out_dir)
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
