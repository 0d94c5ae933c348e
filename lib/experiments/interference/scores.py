"""Interference scores from per-sample gradients: the diagonal Fisher of task A, one matrix product per
(block, head, variant) over all sample pairs, and the whole computation from two sample sets."""
from __future__ import annotations

import time
import warnings
from typing import Sequence

import numpy as np
import torch
from torch import nn

from lib.experiments.interference.gradients import METHODS, SampleGradients, per_sample_gradients, torch_threads
from lib.experiments.interference.result import BLOCKS, DEFAULT_EPS, KV_BLOCKS, VARIANTS, InterferenceResult
from lib.experiments.interference.samples import MIN_SAMPLES_FOR_FISHER, TaskSamples
from lib.model.architectures import ArchInfo

__all__ = ["fisher_denominator", "normalised_contributions", "pair_scores", "check_block_slices",
           "interference_from_gradients", "compute_interference"]


# ----------------------------------------------------------------------------- scores

def fisher_denominator(fisher: torch.Tensor, eps: float = DEFAULT_EPS, ridge: float = 0.0) -> torch.Tensor:
    """max(F, eps) + ridge, elementwise (float32, or float64 when given float64)."""
    fisher = fisher if fisher.dtype == torch.float64 else fisher.float()
    return fisher.clamp_min(eps) + ridge


def normalised_contributions(g_a: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
    """C_i / (F + eps): the dimensionless share of the Fisher each task-A sample contributes, elementwise."""
    return g_a.square() / denom


def pair_scores(g_a: torch.Tensor, g_b: torch.Tensor, denom: torch.Tensor, variant: str = "magnitude") -> torch.Tensor:
    """All (i, j) scores of one parameter slice as one matrix product. g_a [n_a, K], g_b [n_b, K], denom [K].

    magnitude/pooled: (C_A / denom) @ |G_B|^T; signed: (G_A / denom) @ G_B^T; symmetric: (|G_A| / denom) @ |G_B|^T
    (pass the pooled denominator for "pooled").
    """
    if variant in ("magnitude", "pooled"):
        return (g_a.square() / denom) @ g_b.abs().T
    if variant == "signed":
        return (g_a / denom) @ g_b.T
    if variant == "symmetric":
        return (g_a.abs() / denom) @ g_b.abs().T
    raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")


def check_block_slices(arch: ArchInfo, layer: int, names: dict[int, str]) -> None:
    """Shape assertions for every (block, head) slice of `layer`, and that the head slices of the blocks sharing a
    tensor are disjoint and cover it exactly (what makes per-head scores add up to the whole-tensor score)."""
    coverage: dict[str, torch.Tensor] = {}
    owners: dict[str, list[str]] = {}
    expected_numel = arch.head_dim * arch.hidden_size
    for block, (weight, slicer) in arch.block_param_slices(layer).items():
        name = names.get(id(weight), "?")
        n_h = arch.n_kv_heads if block in KV_BLOCKS else arch.n_heads
        cover = coverage.setdefault(name, torch.zeros(weight.shape, dtype=torch.int16))
        owners.setdefault(name, []).append(block)
        for h in range(n_h):
            part = weight[slicer(h)]
            if part.numel() != expected_numel or arch.head_dim not in part.shape:
                raise AssertionError(f"parameter {name} (layer {layer}, head {h}, block {block}): slice shape "
                                     f"{tuple(part.shape)} of tensor {tuple(weight.shape)} is not head_dim "
                                     f"{arch.head_dim} x hidden {arch.hidden_size}")
            cover[slicer(h)] += 1
    for name, cover in coverage.items():
        if not bool((cover == 1).all()):
            bad = "overlap" if bool((cover > 1).any()) else "leave elements out"
            raise AssertionError(f"parameter {name} (layer {layer}, blocks {'/'.join(owners[name])}): the head "
                                 f"slices {bad} (head_dim {arch.head_dim}, {arch.n_heads} heads, "
                                 f"{arch.n_kv_heads} KV heads, tensor {tuple(cover.shape)})")


def _validate(variants, eps, ridge, n_a, min_samples_for_fisher, task_a) -> list[str]:
    variants = list(variants)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ValueError(f"unknown variants {unknown or variants}; choose from {VARIANTS}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0 (got {eps}): F is clamped at eps so that 0/0 becomes 0")
    if not ridge >= 0:
        raise ValueError(f"ridge must be >= 0 (got {ridge})")
    if min_samples_for_fisher < 1:
        raise ValueError(f"min_samples_for_fisher must be >= 1 (got {min_samples_for_fisher})")
    if n_a < min_samples_for_fisher:
        raise ValueError(f"task A {task_a!r} has {n_a} sample(s) but the diagonal Fisher needs at least "
                         f"min_samples_for_fisher={min_samples_for_fisher}: give more task-A samples (more prompts "
                         f"in the extraction, sample_source='generate' or 'texts') or lower min_samples_for_fisher")
    return variants


def interference_from_gradients(arch: ArchInfo, grads_a: SampleGradients, grads_b: SampleGradients, *,
                                variants: Sequence[str] = VARIANTS, eps: float = DEFAULT_EPS, ridge: float = 0.0,
                                min_samples_for_fisher: int = MIN_SAMPLES_FOR_FISHER, task_a: str = "A",
                                task_b: str = "B", progress: bool = False, device=None) -> InterferenceResult:
    """Scores from per-sample gradients: one layer at a time, one matrix product per (block, head, variant)."""
    variants = _validate(variants, eps, ridge, grads_a.n, min_samples_for_fisher, task_a)
    if grads_b.n == 0:
        warnings.warn(f"task B {task_b!r} has no samples: the interference results are empty "
                      f"(shape [n_a, 0, layers, heads])", stacklevel=2)
    t0 = time.perf_counter()
    L, hq, hkv = arch.n_layers, arch.n_heads, arch.n_kv_heads
    n_a, n_b = grads_a.n, grads_b.n
    scores = {v: {b: np.zeros((n_a, n_b, L, hkv if b in KV_BLOCKS else hq), dtype=np.float32) for b in BLOCKS}
              for v in variants}
    fisher_mass = {b: np.zeros((L, hkv if b in KV_BLOCKS else hq), dtype=np.float32) for b in BLOCKS}
    names = {id(m.weight): n for n, (_, m) in grads_a.weights.items()}
    layers = range(L)
    if progress:
        from tqdm.auto import tqdm
        layers = tqdm(layers, desc="interference scores", leave=False)
    checked: set = set()
    # one CPU thread for the scores: thousands of small, memory-bound products and elementwise passes, where thread
    # synchronisation costs more than it gains (SmolLM2, 10 x 10 pairs, shared 2-core machine: 6 s vs 90-136 s)
    with torch_threads(1):
        for layer in layers:
            _layer_scores(arch, layer, grads_a, grads_b, variants, eps, ridge, names, checked, scores, fisher_mass,
                          device)
    return InterferenceResult(
        scores=scores, ids_a=list(grads_a.ids), ids_b=list(grads_b.ids), task_a=task_a, task_b=task_b, n_layers=L,
        n_heads=hq, n_kv_heads=hkv, loss_a=grads_a.losses.copy(), loss_b=grads_b.losses.copy(),
        fisher_mass=fisher_mass, eps=eps, ridge=ridge, method=grads_a.method, model=arch.source,
        seconds={"gradients_a": grads_a.seconds, "gradients_b": grads_b.seconds,
                 "scores": time.perf_counter() - t0})


def _layer_scores(arch, layer, grads_a, grads_b, variants, eps, ridge, names, checked, scores, fisher_mass, device):
    """Fill scores[variant][block][:, :, layer, :] and fisher_mass[block][layer] for one layer."""
    hq, hkv, n_b = arch.n_heads, arch.n_kv_heads, grads_b.n
    slices = arch.block_param_slices(layer)
    shapes = tuple((b, tuple(w.shape)) for b, (w, _) in slices.items())
    if shapes not in checked:                  # the slice checks depend only on the shapes: once per layer kind
        check_block_slices(arch, layer, names)
        checked.add(shapes)
    ga, gb = grads_a.layer(layer, device), grads_b.layer(layer, device)
    # the operands of pair_scores, elementwise over each whole tensor once; then one product per block-head
    left: dict[str, dict[str, torch.Tensor]] = {}
    right: dict[str, dict[str, torch.Tensor]] = {}
    fisher: dict[str, torch.Tensor] = {}
    for name in list(ga):
        g_a, g_b = ga.pop(name), gb.pop(name)
        c_a = g_a.square()
        fisher[name] = c_a.mean(0)
        denom = fisher_denominator(fisher[name], eps, ridge)
        ops = {}
        for v in variants:
            if v == "magnitude":
                ops[v] = c_a / denom
            elif v == "pooled":
                f_pool = (fisher[name] + g_b.square().mean(0)) / 2 if n_b else fisher[name]
                ops[v] = c_a / fisher_denominator(f_pool, eps, ridge)
            elif v == "signed":
                ops[v] = g_a / denom
            else:
                ops[v] = g_a.abs() / denom
        abs_b = g_b.abs()
        left[name] = ops
        right[name] = {v: (g_b if v == "signed" else abs_b) for v in variants}
        del g_a, g_b, c_a
    for block, (weight, slicer) in slices.items():
        name = names[id(weight)]
        for h in range(hkv if block in KV_BLOCKS else hq):
            idx = (slice(None), *slicer(h))
            fisher_mass[block][layer, h] = float(fisher[name][slicer(h)].sum())
            for v in variants:
                a, b = left[name][v][idx].flatten(1), right[name][v][idx].flatten(1)
                if a.shape[1] != arch.head_dim * arch.hidden_size:
                    raise AssertionError(f"parameter {name} (layer {layer}, head {h}, block {block}): per-sample "
                                         f"gradient slice has {a.shape[1]} elements, expected head_dim x hidden")
                scores[v][block][:, :, layer, h] = (a @ b.T).cpu().numpy()
    del ga, gb, left, right


def compute_interference(model: nn.Module, arch: ArchInfo, task_a: TaskSamples, task_b: TaskSamples, *,
                         variants: Sequence[str] = VARIANTS, eps: float = DEFAULT_EPS, ridge: float = 0.0,
                         method: str = "hooks", batch_size: int = 8,
                         min_samples_for_fisher: int = MIN_SAMPLES_FOR_FISHER, num_threads: int = 0,
                         progress: bool = True) -> InterferenceResult:
    """Per-sample gradients of both tasks, then every score (see the module docstring). Inputs are validated
    before any gradient is computed: task A needs at least min_samples_for_fisher samples; an empty task B gives
    a warning and empty results [n_a, 0, layers, heads]. num_threads > 0 sets torch's CPU threads for the
    gradient passes (0: torch's default; on a machine shared with other jobs 1 thread was faster: see the
    benchmark); the scores always use one thread."""
    _validate(variants, eps, ridge, len(task_a), min_samples_for_fisher, task_a.name)
    if method not in METHODS:
        raise ValueError(f"grad_method must be one of {METHODS} (got {method!r})")
    with torch_threads(num_threads):
        grads_a = per_sample_gradients(model, arch, task_a, method, batch_size, progress)
        grads_b = per_sample_gradients(model, arch, task_b, method, batch_size, progress)
    device = next(model.parameters()).device
    result = interference_from_gradients(arch, grads_a, grads_b, variants=variants, eps=eps, ridge=ridge,
                                         min_samples_for_fisher=min_samples_for_fisher, task_a=task_a.name,
                                         task_b=task_b.name, progress=progress, device=device)
    result.texts_a = [s.text for s in task_a.samples]
    result.texts_b = [s.text for s in task_b.samples]
    result.source_a, result.source_b = task_a.source, task_b.source
    return result
