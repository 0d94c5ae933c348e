"""RL through selected heads: GRPO with TRL's GRPOTrainer and the same head masks as SFT.

TRL's trainer does the policy-gradient work; this module only hands it the masked optimiser (MaskedAdamW: nothing
outside the selected heads' slices can move), a correctness reward from lib.experiments.tasks, and a quiet progress bar.
The paper's setting (cluster params): 5,000 steps, 8 generations per prompt, max completion 1,024 tokens,
effective batch 16.
"""
from __future__ import annotations

import contextlib
import gc
import tempfile
import warnings
from dataclasses import dataclass

from lib.experiments.finetune.masks import MaskedAdamW, head_masks
from lib.experiments.finetune.sft import RunSettings, check_positive

__all__ = ["GRPOSettings", "correctness_reward", "evaluation_callback", "run_grpo"]


@dataclass(frozen=True)
class GRPOSettings(RunSettings):
    n_steps: int = 3
    lr: float = 1.0e-6
    n_generations: int = 4
    batch_size: int = 4              # completions per device step (a multiple of n_generations)
    grad_accum: int = 1
    max_completion_length: int = 32
    temperature: float = 1.0

    def check(self) -> None:
        check_positive(self, ("n_steps", "n_generations", "batch_size", "grad_accum", "max_completion_length"), "lr",
                       "GRPO")
        if self.n_generations < 2:
            raise ValueError("GRPO n_generations must be >= 2 (advantages are relative within a group)")
        if (self.batch_size * self.grad_accum) % self.n_generations:
            raise ValueError(f"GRPO batch_size x grad_accum ({self.batch_size} x {self.grad_accum}) must be a "
                             f"multiple of n_generations ({self.n_generations})")


def correctness_reward(check):
    """A TRL reward function: 1.0 when check(completion, answer) holds, else 0.0."""
    def reward(completions, answer, **_):
        return [1.0 if check(text, gold) else 0.0 for text, gold in zip(completions, answer)]
    reward.__name__ = "correct"
    return reward


# trl 1.16 still calls transformers' gradient_checkpointing* names and passes `past_key_values=` in its generation
# loop, both deprecated in transformers 5: these FutureWarnings come from the trainer's internals, not from this
# project's calls, and are silenced inside run_grpo only.
_TRL_DEPRECATIONS = r"`((is_)?gradient_checkpointing\w*|past_key_values)` is deprecated"


def evaluation_callback(evaluate, every: int, record):
    """A TrainerCallback calling record(step, evaluate(model)) every `every` optimiser steps."""
    from transformers.trainer_callback import TrainerCallback

    class Evaluate(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % every == 0:
                record(state.global_step, evaluate(model))
    return Evaluate()


@contextlib.contextmanager
def _gc_frozen():
    """The objects alive before a trainer runs (torch, transformers, trl, the model: ~10^6) are left out of garbage
    collection while it runs, then put back: accelerate's clean-up calls gc.collect() in every train(), which
    otherwise walks all of them (0.6 s per trainer on the tiny model, 8 trainers per tiny run)."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def run_grpo(model, tokenizer, arch, heads: list[int], prompts: list[str], answers: list[str], check,
             settings: GRPOSettings, device_is_cpu: bool = True, callbacks=()) -> list[dict]:
    """Train the selected heads with GRPO; returns the trainer's per-step log (reward mean/std, loss, ...).
    callbacks: extra TrainerCallbacks (e.g. evaluation_callback for test accuracy during training)."""
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import GRPOConfig, GRPOTrainer

    settings.check()
    optimiser = MaskedAdamW(head_masks(arch, heads, settings.kv), lr=settings.lr)
    data = Dataset.from_list([{"prompt": p, "answer": a} for p, a in zip(prompts, answers)])
    had_own_forward = "forward" in vars(model)
    with tempfile.TemporaryDirectory(prefix="grpo-") as tmp, warnings.catch_warnings(), _gc_frozen():
        warnings.filterwarnings("ignore", message=_TRL_DEPRECATIONS, category=FutureWarning)
        args = GRPOConfig(
            output_dir=tmp, max_steps=settings.n_steps, learning_rate=settings.lr,
            per_device_train_batch_size=settings.batch_size, gradient_accumulation_steps=settings.grad_accum,
            num_generations=settings.n_generations, max_completion_length=settings.max_completion_length,
            temperature=settings.temperature, seed=settings.seed, use_cpu=device_is_cpu, bf16=False,
            report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, disable_dropout=True)
        trainer = GRPOTrainer(model=model, reward_funcs=[correctness_reward(check)], args=args, train_dataset=data,
                              processing_class=tokenizer, optimizers=(optimiser, None), callbacks=list(callbacks))
        for callback in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(callback)
        try:
            trainer.train()
        finally:
            optimiser.release()
            if not had_own_forward and "forward" in vars(model):
                del model.forward                  # the trainer wraps the instance's forward; put the class's back
    model.eval()
    return [h for h in trainer.state.log_history if "reward" in h]
