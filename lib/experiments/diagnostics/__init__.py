"""Is the PhiID head ranking measuring integration, or each head's own autocorrelation? Diagnostics.

The paper ranks heads by rank(synergy) - rank(redundancy), with synergy = the `sts` atom and redundancy = the
`rtr` atom, each averaged over all pairs a head takes part in. That ranking is informative only if synergy
and redundancy carry different information. This module measures what they share:

* per-head synergy and redundancy: the mean of `sts` (resp. `rtr`) over every pair involving the head, as
  source or as target, degenerate pairs excluded (`per_head_mean`);
* their Pearson and Spearman correlation at head level and at pair level (`syn_red_correlations`);
* the time-delayed mutual information of each pair, TDMI = I(past_i, past_j; future_i, future_j) = the sum of
  the 16 atoms (`tdmi_matrix`), which both atoms scale with;
* each head's lag-1 autocorrelation (Pearson of x[:-lag] with x[lag:], per prompt, then the mean over
  prompts; `lag_autocorrelation`), which the TDMI tracks;
* each head's within-generation drift (`drift`): the least-squares slope of its norm over the generated steps
  times (steps - 1), divided by its mean norm, per prompt, then the mean over prompts. -0.4 means the
  fitted line falls by 40% of the head's mean level from the first to the last step;
* per-layer profiles (`layer_profile`) on normalised depth (layer / (n_layers - 1)).

It also holds the generic statistics used to decide whether a ranking is signal at all (used by
lib.experiments.ranking): Spearman-Brown (`spearman_brown`), random prompt halves (`random_halves`), circular-shift
surrogates (`circular_shift`), and the inverted-U test on a per-layer profile (`inverted_u_test`), and the
loader of the activations (`load_activations`; PhiID files are read by lib.estimators.phiid's `load_phiid`, re-exported here).

Units: atoms and TDMI in nats; autocorrelation and correlations dimensionless; drift a fraction.
"""
from __future__ import annotations

from lib.experiments.diagnostics.pairs import (DegenerateHeadError, load_activations, available_tags, head_labels,
                                               per_head_mean, pair_index, upper, per_head_mean_pairs, tdmi_matrix,
                                               correlation, bootstrap_correlation, pair_bootstrap_correlation,
                                               correlation_ci_table, syn_red_correlations)
from lib.experiments.diagnostics.series import (lag_autocorrelation, circular_autocorrelation, head_autocorrelation,
                                                drift, linear_detrend, first_difference, shift_series,
                                                shift_keeping_trend, circular_shift, normalized_depth, layer_means,
                                                layer_profile, heads_grid, spearman_brown, random_halves, null_band)
from lib.experiments.diagnostics.summary import inverted_u_test, diagnose, run_diagnostics, summary_table

from lib.experiments.diagnostics.pairs import bootstrap_correlation
from lib.experiments.diagnostics.summary import inverted_u_test
from lib.experiments.diagnostics.series import shift_series
from lib.estimators.phiid import load_phiid  # noqa: F401  (re-exported: the one PhiID reader)
__all__ = ["DegenerateHeadError", "load_activations", "available_tags", "head_labels", "per_head_mean", "pair_index",
           "upper", "per_head_mean_pairs", "tdmi_matrix", "correlation", "bootstrap_correlation",
           "pair_bootstrap_correlation", "correlation_ci_table", "syn_red_correlations", "lag_autocorrelation",
           "circular_autocorrelation", "head_autocorrelation", "drift", "linear_detrend", "first_difference",
           "shift_series", "shift_keeping_trend", "circular_shift", "normalized_depth", "layer_means", "layer_profile",
           "heads_grid", "spearman_brown", "random_halves", "null_band", "inverted_u_test", "diagnose",
           "run_diagnostics", "summary_table", "bootstrap_correlation", "inverted_u_test", "shift_series"]
