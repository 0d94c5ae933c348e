"""The pipeline layer: the stage declarations (stages), parameter rules (params, notebook_params), provenance,
the cost table (cost), the claims' verdict table (verdicts), report tables and conclusions, the run explorer; the
runner (steps: params file -> steps; bookkeeping: manifest records and the up-to-date rule; execution: one notebook;
scheduler: --jobs; forkserver: kernels forked from one process that imported the libraries; runner: run_pipeline,
--explain, --check; interrupts: Ctrl-C), the claims scorecard (claims/) and the run index (report/).
It sits on the experiments; the commands at lib's top (run, claims, report, plan, compare, models) sit on it."""

__all__: list[str] = []
