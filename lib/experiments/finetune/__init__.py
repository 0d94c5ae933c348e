"""Fine-tuning only selected heads (notebook 10, the paper's Fig 5): masks, SFT, GRPO (TRL), runs and statistics.

    masks    which weight entries a head owns (Q rows, O columns, K/V rows by GQA policy); MaskedAdamW; overlap
    sft      supervised next-token loss on the answer tokens, resumable
    grpo     GRPO through TRL's GRPOTrainer with the same masked optimiser
    run      conditions, runs per condition and seed, results
    claim    the claim block (C7): GRPO's g with its analytic CI, the SFT control (TOST), validity, overlap
    stats    Hedges' g and its CI, permutation test, paired bootstrap, equivalence test
"""
from lib.experiments.finetune.grpo import GRPOSettings  # noqa: F401
from lib.experiments.finetune.run import (FinetuneResult, claim_table, moved_table, overlap_table, plan_table,  # noqa: F401
                              prepare, run_finetune, tests_table)
from lib.experiments.finetune.sft import SFTSettings  # noqa: F401

__all__ = ["GRPOSettings", "FinetuneResult", "claim_table", "moved_table", "overlap_table", "plan_table", "prepare",
           "run_finetune", "tests_table", "SFTSettings"]
