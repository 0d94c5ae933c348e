"""The run index: outputs/<run>/html/index.html, one page that summarises a run and links its reports.

    python -m lib.report outputs/<run> [--check]        (also: make report RUN=<run>; the runner calls
                                                          write_index(out_dir) at the end of every invocation)

The page (rendered from lib/templates/index.html.j2) opens with the Findings box: the claims scorecard of
claims.json (lib/pipeline/claims/: every claim of the paper with our number and CI, its null, the paper's figure and a
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

Modules: reading (the executed notebooks and the manifest, check_run), findings (the Findings box), index (the
run index page, write_index).
"""
from lib.pipeline.report.reading import Figure, NotebookReport, stderr_cells, check_run
from lib.pipeline.report.findings import FINDINGS_CSS, own_findings, FINDINGS_TAG, add_findings_to_notebooks
from lib.pipeline.report.index import INDEX_FIGURE_LIMIT, write_index

__all__ = ["Figure", "NotebookReport", "stderr_cells", "check_run", "FINDINGS_CSS", "INDEX_FIGURE_LIMIT",
           "own_findings", "FINDINGS_TAG", "add_findings_to_notebooks", "write_index"]
