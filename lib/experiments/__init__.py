"""The experiments layer: one module or package per stage of the pipeline (extract, synthetic, diagnostics,
ranking, oracle, ablation, neurons, interference, topology, tasks, behaviour, finetune, local). They import the
layers below (estimators, model, storage) and lib.plots for the figures they save; never lib.pipeline."""

__all__: list[str] = []
