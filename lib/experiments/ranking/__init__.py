"""Head rankings by synergy vs redundancy: the paper's variant and the fixes tried since, and whether each is
signal.

Every variant turns pair-level PhiID into one score per head in [0, 1] (min-max of its raw score; higher =
more synergistic), ranks (1 = most synergistic) and a per-layer mean. Synergy = atom `sts`, redundancy =
atom `rtr`, TDMI = the sum of the 16 atoms; a head's value is the mean over all its non-degenerate pairs.

    rank_diff              rank(syn) - rank(red) on per-prompt PhiID (the paper)
    balance                per pair sts / (sts + rtr), then the mean per head (pairs with sts + rtr <= 0
                           are left out)
    tdmi_normalized        per pair sts / TDMI and rtr / TDMI (pairs with TDMI <= 0 left out), per-head
                           means, then rank_diff
    concat                 rank_diff on PhiID of the prompts joined end to end (phiid mode "concat")
    pooled                 rank_diff on PhiID of the pooled within-prompt transitions (mode "pooled")
    detrended              rank_diff on per-prompt PhiID of the series with its least-squares line removed
                           (per prompt and head)
    first_difference       rank_diff on per-prompt PhiID of x[t] - x[t-1]
    autocorr_residualized  per-head syn and red each regressed (least squares with intercept) on the head's
                           lag-1 autocorrelation; rank(residual syn) - rank(residual red)

Oracle (not a PhiID variant): when notebook 01 wrote oracle.npz (lib.experiments.oracle: attribution patching, each head's
measured first-order effect on the greedy tokens' NLL), rankings.csv gets a column `oracle` = minmax of that
score (higher = more important, removed first by 05), a positive control that 05 and 09 take like any variant.
Only the run's own model has one (never a random-init or checkpoint tag).

Is it signal?
  split-half reliability  random halves of the prompts; PhiID recomputed on each half (per-prompt modes: mean
                          of the per-prompt values over the half; concat / pooled: the mode on the half's prompts);
                          Spearman between the halves' head scores; mean +- sd over splits and the
                          Spearman-Brown estimate for the full prompt set, 2 r / (1 + r), of the mean r.
  surrogate null          each head's series circularly shifted within each prompt by an independent random
                          offset (after the variant's preprocessing); PhiID recomputed; the per-layer profile of
                          every surrogate gives the null band and per-layer z-scores.
  inverted-U test         lib.experiments.diagnostics.inverted_u_test on the per-layer profile, and on the excess of each
                          head's score over its mean surrogate score (what cross-head timing adds).

Speed: with MMI, sts, rtr and TDMI come from the engine's fast option (lib.estimators.phiid.phiid_fast_stats, a closed
form of each pair's correlation matrix), so 100 surrogates x 5 PhiID sources stay cheap; with
CCS every recomputation calls lib.estimators.phiid.phiid_all_pairs.
"""
from __future__ import annotations

from lib.experiments.ranking.scores import (VARIANTS, DEFAULT_VARIANTS, check_variants, PairStats, mmi_segment_stats,
                                            mmi_pair_means, phiid_pair_stats, per_prompt_stats, VariantScore, minmax,
                                            variant_score)
from lib.experiments.ranking.inputs import RankingInputs, load_inputs
from lib.experiments.ranking.signal import (split_half_reliability, surrogate_scores, null_tables, inverted_u_table,
                                            signal_summary, agreement, rankings_frame, profiles_frame,
                                            baseline_profiles, ORACLE, oracle_score, oracle_agreement, save_rankings)

from lib.experiments.ranking.scores import VARIANTS
__all__ = ["VARIANTS", "DEFAULT_VARIANTS", "check_variants", "PairStats", "mmi_segment_stats", "mmi_pair_means",
           "phiid_pair_stats", "per_prompt_stats", "VariantScore", "minmax", "variant_score", "RankingInputs",
           "load_inputs", "split_half_reliability", "surrogate_scores", "null_tables", "inverted_u_table",
           "signal_summary", "agreement", "rankings_frame", "profiles_frame", "baseline_profiles", "ORACLE",
           "oracle_score", "oracle_agreement", "save_rankings", "VARIANTS"]
