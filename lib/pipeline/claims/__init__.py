"""The claims scorecard: what a run says about each claim of the paper, with its CI, its null and a verdict.

The paper: "A Brain-like Synergistic Core in LLMs Drives Behaviour and Learning" (arXiv 2601.06851).

    python -m lib.claims outputs/<run>          # (re)write outputs/<run>/claims.json from the run's artifacts
    write_claims(out_dir)                       # what the runner calls at the end of every run (recomputes only
                                                # when an input file, a setting or these rules changed)

Modules: rules (the claims, the paper's figures and effects, the verdict rule of each claim, the Claim record),
head_claims (C1-C3), ablation_claim (C5), block_claims (C4, C6, C7), scorecard (evaluate, write_claims).

One entry per claim (C1-C7), each with: the claim in one sentence, the test, the statistic with its 95% CI, the
null or baseline it is compared with, the paper's own figure (read off the paper's plots: approximate), the
verdict, the rule that gave it, and the artifacts it was computed from. A claim whose inputs are absent (its
notebook did not run, or is not part of this version) is `not tested`, with the reason.

Verdicts (lib/pipeline/verdicts.py holds the table: supported, opposite, ruled out, underpowered, invalid, not tested). Each
claim reduces to an estimate with its 95% CI, a null, the claimed direction and the paper's effect in the same units
(PAPER_EFFECTS: the smallest effect of interest, with the conversion). Every entry also carries the minimum
detectable effect at 80% power from the run's own variance (`power`), the sample sizes it rests on, and, when
underpowered, the factor on the sample size that would settle it (`settle`; lib/plan.py writes the params file).

C1  synergy and redundancy are distinct. Spearman r between per-head synergy (mean sts) and redundancy (mean rtr)
    of the per-prompt PhiID, bootstrap CI over heads; null: circular-shift surrogates (each (prompt, head) series
    shifted by its own offset: keeps each head's CIRCULAR autocorrelation and its values, breaks the timing between
    heads; a trend is cut at the shift point, so a drift shared by all heads is not kept). Direction "less"; extra
    condition for supported: CI high < 0.5 (less than a quarter of shared rank variance). Paper: r ~ -0.4.
C2  the syn-minus-red profile over depth is an inverted U. Two results: the raw shape and the shape beyond the null
    (score minus mean surrogate score); the verdict rests on the beyond-null one: middle minus early third of
    the rank_diff profile, CI over heads, direction "greater", extra condition: mid minus late CI > 0 too.
C3  the pattern emerges with training: beyond-null mid-minus-early of the trained model minus that of the
    randomly initialised copy (same surrogates, same statistic as C2); extra: trained inverted U, random-init not.
C4  the synergistic network is more efficient (efficiency syn - red) AND the redundant one more modular (modularity
    red - syn), each against its own strength-preserving null; supported when both halves are.
C5  removing synergistic heads first diverges behaviour faster: AUC ratio to random orders over 0-40%, CI over
    prompts and random orders; extra: percentile among random orders >= 95 and the layer-matched ratio CI > 1.
    Every variant, its reverse order and the oracle ordering are reported with their own verdicts; the claim rests
    on rank_diff, and is `underpowered` (never `ruled out`) when the oracle ordering is not detected either.
C6  perturbing synergistic heads hurts accuracy most: (acc(synergistic) - mean acc(random sets)) / acc(baseline),
    `invalid` when the random sets sit at a floor or ceiling.
C7  updating only synergistic heads helps RL (GRPO) learning most: Hedges' g synergistic vs random over seeds; SFT is
    reported as the paper's control (no difference expected, equivalence test); an SFT-only run is `invalid` for C7.
"""
from lib.pipeline.claims.rules import (PAPER, VERDICT_RULES, CLAIMS, PAPER_FIGURES, PAPER_EFFECTS,
                                       EXPERIMENT_ARTIFACTS, Claim, new_claim, not_tested, evidence_c1,
                                       evidence_profile)
from lib.pipeline.claims.head_claims import (bootstrap_spearman, HeadEvidence, head_evidence, series_correlation,
                                             profile_verdicts, c1_against_null, claim_c1, claim_c2, claim_c3,
                                             near_duplicates)
from lib.pipeline.claims.ablation_claim import claim_c5
from lib.pipeline.claims.block_claims import block_evidence, claim_from_block, recentred, claim_c6, claim_c7
from lib.pipeline.claims.scorecard import write_claims, weights_note, evaluate, load_claims

__all__ = ["PAPER", "VERDICT_RULES", "CLAIMS", "PAPER_FIGURES", "PAPER_EFFECTS", "EXPERIMENT_ARTIFACTS", "Claim",
           "new_claim", "not_tested", "evidence_c1", "evidence_profile", "bootstrap_spearman", "HeadEvidence",
           "head_evidence", "series_correlation", "profile_verdicts", "c1_against_null", "claim_c1", "claim_c2",
           "claim_c3", "near_duplicates", "claim_c5", "block_evidence", "claim_from_block", "recentred", "claim_c6",
           "claim_c7", "write_claims", "weights_note", "evaluate", "load_claims"]
