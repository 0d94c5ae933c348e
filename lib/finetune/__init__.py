"""Fine-tuning only selected heads (notebook 10, the paper's Fig 5): masks, SFT, GRPO (TRL), runs and statistics.

    masks    which weight entries a head owns (Q rows, O columns, K/V rows by GQA policy); MaskedAdamW
    sft      supervised next-token loss on the answer tokens, resumable
    grpo     GRPO through TRL's GRPOTrainer with the same masked optimiser
    run      conditions, runs per condition and seed, results and the claim block (C7)
    stats    Hedges' g, permutation test, paired bootstrap
"""
from lib.finetune.grpo import GRPOSettings  # noqa: F401
from lib.finetune.run import (FinetuneResult, moved_table, plan_table, prepare, run_finetune,  # noqa: F401
                              tests_table)
from lib.finetune.sft import SFTSettings  # noqa: F401
