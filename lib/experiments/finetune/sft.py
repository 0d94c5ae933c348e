"""Supervised fine-tuning through selected heads: next-token loss on the answer tokens only.

Each step draws `batch_size` training examples (fixed by (seed, step): a resumed run sees the same batches),
accumulates `grad_accum` micro-batches, and takes one MaskedAdamW step. The run checkpoints after every
evaluation, so a killed run resumes to the same numbers.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from lib.experiments.finetune.masks import MaskedAdamW, head_masks

__all__ = ["RunSettings", "SFTSettings", "check_positive", "Example", "collate", "train_step", "run_sft"]

IGNORE = -100


@dataclass(frozen=True)
class RunSettings:
    """What the settings of every fine-tuning method (SFTSettings, GRPOSettings) hold besides their own: the KV
    policy of the head masks (lib.experiments.finetune.masks.KV_POLICIES) and the seed, both set per run."""
    kv: str = "any"
    seed: int = 0


@dataclass(frozen=True)
class SFTSettings(RunSettings):
    n_steps: int = 20
    lr: float = 1.0e-4
    batch_size: int = 8
    grad_accum: int = 1
    eval_every: int = 10
    weight_decay: float = 0.0

    def check(self) -> None:
        check_positive(self, ("n_steps", "batch_size", "grad_accum", "eval_every"), "lr", "SFT")


def check_positive(settings, integers: tuple[str, ...], rate: str, what: str) -> None:
    """Raise ValueError naming the first field of `settings` that is not an integer >= 1 (integers) or not a
    positive number (the learning rate `rate`)."""
    for name in integers:
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{what} {name} must be an integer >= 1; got {value!r}")
    lr = getattr(settings, rate)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"{what} {rate} must be a positive number (AdamW learning rate, e.g. 1.0e-4); got {lr!r}")


@dataclass
class Example:
    prompt_ids: list[int]
    target_ids: list[int]


@dataclass
class Curve:
    """Accuracy on the test split before training (step 0) and every eval_every steps."""
    steps: list[int] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    correct: list[list[bool]] = field(default_factory=list)    # [evaluations][test problems]
    loss: list[float] = field(default_factory=list)            # mean training loss per step

    def as_dict(self) -> dict:
        return asdict(self)


def collate(examples: list[Example], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels [batch, len]; labels are IGNORE on prompt and padding."""
    width = max(len(e.prompt_ids) + len(e.target_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        seq = e.prompt_ids + e.target_ids
        ids[row, :len(seq)] = torch.as_tensor(seq)
        labels[row, len(e.prompt_ids):len(seq)] = torch.as_tensor(e.target_ids)
        mask[row, :len(seq)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def step_indices(n_examples: int, step: int, batch_size: int, seed: int) -> np.ndarray:
    """The training examples of one step, fixed by (seed, step)."""
    rng = np.random.default_rng([seed, step])
    return rng.choice(n_examples, size=batch_size, replace=n_examples < batch_size)


def answer_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the answer tokens of the batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    target = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                             ignore_index=IGNORE)


def train_step(model, optimiser: MaskedAdamW, examples: list[Example], idx: np.ndarray, grad_accum: int,
               pad_id: int) -> float:
    """One optimiser step over examples[idx] split into grad_accum micro-batches; returns the mean loss."""
    device = next(model.parameters()).device
    losses = []
    for part in np.array_split(idx, grad_accum):
        if len(part) == 0:
            continue
        with torch.set_grad_enabled(bool(optimiser.masks)):      # no head selected: nothing to differentiate
            loss = answer_loss(model, collate([examples[i] for i in part], pad_id, device))
        if optimiser.masks:
            (loss / grad_accum).backward()
        losses.append(loss.item())
    optimiser.step()
    optimiser.zero_grad(set_to_none=True)
    return float(np.mean(losses))


def run_sft(model, arch, heads: list[int], examples: list[Example], evaluate, settings: SFTSettings, pad_id: int,
            checkpoint=None, progress=None) -> Curve:
    """Train the selected heads for settings.n_steps; evaluate(model) -> list[bool] (per test problem) at step 0
    and every eval_every steps. checkpoint: an object with load() -> state | None and save(state), or None."""
    settings.check()
    optimiser = MaskedAdamW(head_masks(arch, heads, settings.kv), lr=settings.lr,
                            weight_decay=settings.weight_decay)
    model.train(False)          # dropout off: the paper's setting, and deterministic resumes
    curve, start = Curve(), 0
    state = checkpoint.load() if checkpoint is not None else None
    if state is not None:
        start, curve = _restore(state, optimiser)
    try:
        with torch.enable_grad():
            for step in range(start, settings.n_steps + 1):
                if step % settings.eval_every == 0 or step == settings.n_steps:
                    if not curve.steps or curve.steps[-1] != step:
                        _record(curve, step, evaluate(model))
                        if checkpoint is not None:
                            checkpoint.save(_state(step, curve, optimiser))
                if step == settings.n_steps:
                    break
                idx = step_indices(len(examples), step, settings.batch_size, settings.seed)
                curve.loss.append(train_step(model, optimiser, examples, idx, settings.grad_accum, pad_id))
                if progress is not None:
                    progress.update(1)
    finally:
        optimiser.release()
    return curve


def _record(curve: Curve, step: int, correct) -> None:
    correct = [bool(c) for c in correct]
    curve.steps.append(step)
    curve.correct.append(correct)
    curve.accuracy.append(float(np.mean(correct)) if correct else float("nan"))


def _state(step: int, curve: Curve, optimiser: MaskedAdamW) -> dict:
    return {"step": step, "curve": curve.as_dict(), "optimiser": optimiser.state_dict(),
            "tensors": [m.param.detach().clone() for m in optimiser.masks]}


def _restore(state: dict, optimiser: MaskedAdamW) -> tuple[int, Curve]:
    with torch.no_grad():
        for m, saved in zip(optimiser.masks, state["tensors"]):
            m.param.copy_(saved)
    optimiser.load_state_dict(state["optimiser"])
    return int(state["step"]), Curve(**state["curve"])
