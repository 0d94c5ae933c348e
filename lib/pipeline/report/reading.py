"""Reading a finished run for its report: the executed notebooks (their key figures, cells with stderr output), the
manifest's entries (shard runs included, planned notebooks never run), and check_run, the list of what is wrong
with the run."""
from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from lib.storage.store import read_manifest

__all__ = ["Figure", "NotebookReport", "stderr_cells", "check_run", "NOTEBOOK_RE", "KEY_FIGURE_TAG", "IMAGE_TYPES",
           "TRACEBACK_MARKERS", "read_executed", "planned_notebooks", "collect"]


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
