"""The pipeline layer: the stage declarations (stages), parameter rules (params, notebook_params), provenance,
the cost table (cost), the claims' verdict table (verdicts), report tables and conclusions, the run explorer.
It sits on the experiments; the commands at lib's top (run, claims, report, plan, compare, models) sit on it."""

__all__: list[str] = []
