"""The Findings box: the claims scorecard of claims.json as a colour-coded table (our number and CI, its null, the
paper's figure and effect, the verdict), on the run index and, restricted to the claims a notebook tests, at the
top of that notebook's HTML report and executed notebook."""
from __future__ import annotations

import re
from pathlib import Path

from lib.storage.store import atomic_path

__all__ = ["FINDINGS_CSS", "own_findings", "FINDINGS_TAG", "add_findings_to_notebooks", "REPORT_CSS", "VERDICT_CSS",
           "FINDINGS_MARK", "findings_rows", "render_findings", "add_findings_to_reports", "findings_markdown",
           "template", "read_claims"]


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
VERDICT_CSS = {"supported": "v-yes", "opposite": "v-opp", "ruled out": "v-no", "underpowered": "v-maybe",
               "invalid": "v-bad", "not tested": "v-none"}
FINDINGS_MARK = ("<!-- findings -->", "<!-- /findings -->")


def template(name: str):
    import jinja2
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(Path(__file__).parents[2] / "templates")),
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


def read_claims(out_dir: Path) -> tuple[str, list[dict]]:
    from lib.storage import artifacts
    if not artifacts.path("claims", out_dir).exists():
        from lib.pipeline.claims import PAPER
        return PAPER, []
    data = artifacts.load("claims", out_dir)
    return data.get("paper", ""), data.get("claims", [])


def render_findings(out_dir: Path, notebook: str | None = None, standalone: bool = False) -> str:
    paper, claims = read_claims(out_dir)
    return template("findings.html.j2").render(findings=findings_rows(claims, notebook), paper=paper,
                                                standalone=standalone, css=REPORT_CSS, out_dir=str(out_dir))


def add_findings_to_reports(out_dir: Path, reports: list["NotebookReport"]) -> None:
    """Put that notebook's claims (and the wide-table CSS) at the top of every notebook's HTML report; replaces an
    earlier box, so repeated runs leave exactly one."""
    paper, claims = read_claims(out_dir)
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
    paper, claims = read_claims(out_dir)
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
