"""Exact Gaussian Integrated Information Decomposition (PhiID) for one pair and for all pairs of heads.

Conventions (those of the reference library `phyid`, Imperial-MIND-lab/integrated-info-decomp):
for a source series `src` and a target series `trg` and a lag `tau`,
    x = src[:-tau] (source past)    y = trg[:-tau] (target past)
    a = src[tau:]  (source future)  b = trg[tau:]  (target future)
and atom "AtB" is the information carried by past atom A that ends up in future atom B, each side one of
r (redundant), x (unique to source), y (unique to target), s (synergistic). Units: nats.

What is computed (identical to phyid's Gaussian estimator, `kind="gaussian"`):
each of the four rows is z-scored (mean, sd with ddof=1), C is their 4x4 correlation matrix, and the local
entropy of a subset S at time t is h_S(t) = -log N(z_S(t); 0, C_SS). Local mutual informations are
I(A;B)(t) = h_A + h_B - h_AB; there are nine of them (MI_NAMES). Six single-sided redundancies (RED_NAMES)
and one double redundancy D are built from them, and the 16 atoms solve a fixed linear system
(`atoms_from_parts`, explicit solution).

Closed form for MMI (the fast path). The same correlation matrix is used to fit and to evaluate, so the time
mean of every local MI is exactly
    mean I(A;B) = 0.5 * [logdet C_AA + logdet C_BB - logdet C_AB,AB]
(the mean quadratic form is |S| (N-1)/N and cancels). MMI picks whole local arrays (the first MI of a
redundancy if its time mean is strictly smaller, else the second; the double redundancy is the argmin of
I_xta, I_xtb, I_yta, I_ytb), so atom means are the linear atom formulas applied to these mean MIs, and they
depend only on the 4x4 correlation matrix. For all pairs of H heads we build one [2H, 2H] correlation matrix
of (all pasts, all futures) per segment, gather the six correlations of every unordered pair, and evaluate the
needed log-determinants for all pairs at once in closed form, as products of conditional variances from the
pair's Cholesky factors (e.g. I(xy; a) = -0.5 log var(a | x, y)); this keeps every subtraction at unit scale.
A sample far from the mean (which makes phyid's density underflow to 0 and every atom NaN) is no problem here:
nothing is exponentiated.

CCS has no closed form: local values are needed because its redundancy keeps the local co-information only
where the signs of the MIs agree. We evaluate local MIs in log space from the quadratic forms (regression
residuals of the Gaussian, never a density), vectorised over batches of pairs, and only the time means of the
seven redundancy terms are accumulated (atoms are linear in the MIs, the redundancies and D).

Fast option (`phiid_fast_stats`): MMI sts, rtr and TDMI only, per segment or averaged, from the same segments,
geometry and degeneracy rule (what rankings, split halves and surrogates need).

Local atoms (`phiid_local_pairs` for explicit pairs, `phiid_local_head_means` for per-head means over all
partners, streamed): phyid's local arrays, evaluated for every prompt at once per block of pairs, in per_prompt
and pooled modes; their time means are phiid_all_pairs.

Batches of pairs are processed by a few threads at once (numpy releases the GIL in its loops); each batch
writes its own slice of the accumulators, so results do not depend on the number of threads or batch size.
On a small shared machine, OPENBLAS_NUM_THREADS=1 (set before numpy is imported) avoids BLAS threads competing
with these; the per-segment matrix products are small.

Modes of `phiid_all_pairs` (X has shape [prompts, heads, steps]):
    per_prompt  PhiID of each prompt separately (its own correlation matrix), then the mean over prompts.
                This is the paper's protocol.
    concat      the prompts are joined end to end into one series per head ([heads, prompts*steps]) and
                PhiID is computed on it once; the transitions across prompt junctions are included.
    pooled      one correlation matrix from all within-prompt transitions: the past samples are
                X[p, h, t] and the future samples X[p, h, t + tau] for every prompt p and t < steps - tau,
                stacked over prompts ([heads, prompts*(steps - tau)] each). Each past row and each future row is
                standardised over these pooled samples (its own mean and sd, ddof=1) and C is the correlation
                matrix of the stacked (pasts, futures). No junction transition enters. Local values (CCS)
                are evaluated at every pooled transition. Equivalent to phyid fed with these pooled
                (x, y, a, b) rows.

Degenerate pairs (policy). A pair is undefined in a segment (a prompt, or the whole series) when
    * a head's past or future row contains NaN or inf, or is constant (sd <= CONSTANT_RTOL * max|value|), or
    * the pair's 4x4 correlation matrix is (numerically) singular: min_k (1 - R^2_k) < SINGULAR_RTOL, where
      R^2_k is the squared multiple correlation of variable k on the other three. This minimum residual
      variance equals det C / max(det of the 3x3 principal minors) and lies within a factor 4 of the smallest
      eigenvalue of C. It catches duplicate heads, affine copies, pure-lag copies and heads whose future is an
      affine map of their past. With SINGULAR_RTOL = 1e-10 every pair that phyid computes (it refuses
      eigenvalues below ~2.2e-10 of the largest) is computed here too, e.g. y = x + 1e-3 noise (condition
      number 5e6) is computed and matches phyid to 4e-11. Rounding error grows like 1e-16 / (min residual
      variance): against 50-digit arithmetic on the same correlation matrix, 2e-11 nats at 1e-6 and 4e-8 nats
      at 1e-9, so atoms near the threshold are still good to ~1e-7 nats.
Undefined pairs never become 0. In `concat` and `pooled` modes they get NaN atoms. In `per_prompt` mode a pair's
atoms are the mean over the prompts in which it is defined, `result.n_valid[i, j]` counts those prompts, and a
pair defined in no prompt gets NaN. `result.degenerate` is True exactly where the atoms are NaN (the diagonal
included: a head with itself is singular). A `DegeneratePairWarning` names the heads involved, both for
undefined pairs and (per_prompt) for pairs dropped from some prompts.
"""
from __future__ import annotations

from lib.estimators.phiid.atoms import ATOM_NAMES, MODES, SWAPPED_ATOM, DegeneratePairWarning
from lib.estimators.phiid.reference import mmi_atoms_from_correlation, phiid_pair, phiid_pair_local
from lib.estimators.phiid.engine import phiid_all_pairs
from lib.estimators.phiid.fast import phiid_fast_stats
from lib.estimators.phiid.local import LOCAL_MODES, phiid_local_pairs, phiid_local_head_means
from lib.estimators.phiid.files import phiid_path, save_phiid, load_phiid, run_phiid_for_run

__all__ = ["ATOM_NAMES", "MODES", "SWAPPED_ATOM", "DegeneratePairWarning", "mmi_atoms_from_correlation", "phiid_pair",
           "phiid_pair_local", "phiid_all_pairs", "phiid_fast_stats", "LOCAL_MODES", "phiid_local_pairs",
           "phiid_local_head_means", "phiid_path", "save_phiid", "load_phiid", "run_phiid_for_run"]
