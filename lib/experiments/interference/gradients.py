"""Per-sample gradients of the continuation loss w.r.t. every attention projection weight (float32 whatever the
model dtype): batched by hooks (factors x, dy per token), by torch.func vmap, or one backward per sample."""
from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from lib.model.hooks import hooks
from lib.experiments.interference.samples import Sample, TaskSamples
from lib.model.architectures import ArchInfo

__all__ = ["METHODS", "projection_sites", "projection_weights", "torch_threads", "continuation_nll",
           "SampleGradients", "per_sample_gradients"]

METHODS = ("hooks", "vmap", "loop")


# ----------------------------------------------------------------------------- per-sample gradients

_QKV_OUT_SITES = ("q_out", "k_out", "v_out")


def projection_sites(arch: ArchInfo) -> dict[str, tuple[int, nn.Module, str, str]]:
    """Parameter name of every attention projection weight -> (layer, module owning it, input site, output site)
    (lib.model.architectures.SITES, PROJECTION_SITES). Fused tensors appear once; q/k/v share their input site qkv_in."""
    module_names = {id(m): n for n, m in arch.model.named_modules()}
    out: dict[str, tuple[int, nn.Module, str, str]] = {}
    for layer in range(arch.n_layers):
        for i, module in enumerate(arch.qkv_modules(layer)):
            out[f"{module_names[id(module)]}.weight"] = (layer, module, "qkv_in", _QKV_OUT_SITES[i])
        out[f"{module_names[id(arch.attn_out(layer))]}.weight"] = (layer, arch.attn_out(layer), "head_out", "attn_out")
    return out


def projection_weights(arch: ArchInfo) -> dict[str, tuple[int, nn.Module]]:
    """Parameter name of every attention projection weight -> (layer, module owning it). Fused tensors appear once."""
    return {name: (layer, module) for name, (layer, module, _, _) in projection_sites(arch).items()}


@contextmanager
def torch_threads(n: int):
    """Run the block with n intra-op CPU threads (n <= 0: leave torch's setting), restoring it afterwards."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def _differentiable(weights: Iterable[torch.Tensor]):
    """requires_grad on exactly these weights for the duration (restored after; no .grad is left behind)."""
    weights = list(weights)
    before = [w.requires_grad for w in weights]
    try:
        for w in weights:
            w.requires_grad_(True)
        yield
    finally:
        for w, flag in zip(weights, before):
            w.requires_grad_(flag)
            w.grad = None


def _batches(samples: Sequence[Sample], batch_size: int, device) -> list[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Length-sorted batches: (sample indices, input_ids [b, T] right-padded, target mask [b, T]).

    Right padding needs no attention mask: the models are causal, so real tokens never see the padding, and the
    padded positions carry no loss. target[b, t] = 1 when token t is a continuation token.
    """
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].prompt_ids) + len(samples[i].continuation_ids))
    out = []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        seqs = [samples[i].prompt_ids + samples[i].continuation_ids for i in idx]
        width = max(map(len, seqs))
        ids = torch.zeros(len(idx), width, dtype=torch.long)
        target = torch.zeros(len(idx), width, dtype=torch.bool)
        for r, (i, seq) in enumerate(zip(idx, seqs)):
            ids[r, :len(seq)] = torch.tensor(seq)
            target[r, len(samples[i].prompt_ids):len(seq)] = True
        out.append((idx, ids.to(device), target.to(device)))
    return out


def continuation_nll(logits: torch.Tensor, input_ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean next-token NLL over the continuation tokens, in float32. logits [b, T, V] -> [b]."""
    rows, cols = target[:, 1:].nonzero(as_tuple=True)          # token cols + 1 is predicted from position cols
    logp = torch.log_softmax(_at_least_float32(logits[rows, cols]), dim=-1)
    nll = -logp.gather(-1, input_ids[rows, cols + 1][:, None])[:, 0]
    total = torch.zeros(input_ids.shape[0], dtype=nll.dtype, device=nll.device).index_add(0, rows, nll)
    return total / target[:, 1:].sum(1).to(nll.dtype)


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


class SampleGradients:
    """Per-sample gradients (float32) of every attention projection weight, for one sample set.

    Stored per batch either as factors (input x and output gradient dy per token; the gradient of sample i is
    sum_t dy_t x_t^T) or dense, whichever is smaller; `layer(l)` materialises [n, *weight.shape] per weight.
    """

    def __init__(self, arch: ArchInfo, ids: Sequence[str], method: str):
        self.arch, self.ids, self.method = arch, list(ids), method
        self.weights = projection_weights(arch)
        self.shapes = {n: tuple(m.weight.shape) for n, (_, m) in self.weights.items()}
        self.losses = np.zeros(len(self.ids), dtype=np.float32)
        # float32 whatever the model dtype (float64 only for a float64 model, used by the tests as exact reference)
        self.dtype = torch.float64 if next(arch.model.parameters()).dtype == torch.float64 else torch.float32
        self.seconds = 0.0
        self._parts: list[tuple[list[int], dict]] = []    # (sample indices, {name: ("dense", g) | ("factors", x, dy)})

    @property
    def n(self) -> int:
        return len(self.ids)

    def names(self, layer: int) -> list[str]:
        return [n for n, (l, _) in self.weights.items() if l == layer]

    def add(self, indices: list[int], entries: dict) -> None:
        self._parts.append((list(indices), entries))

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, e in self._parts for v in e.values() for t in v[1:])

    def full(self, name: str, device=None) -> torch.Tensor:
        """[n, *shape] float32 per-sample gradients of one weight, in sample order."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        out = torch.zeros((self.n, *self.shapes[name]), dtype=self.dtype, device=device)
        for idx, entries in self._parts:
            kind, *data = entries[name]
            if kind == "dense":
                g = data[0]
            elif self.arch.weights_transposed:                  # [in, out]
                g = torch.einsum("bti,bto->bio", data[0].to(device), data[1].to(device))
            else:                                              # nn.Linear [out, in]
                g = torch.einsum("bto,bti->boi", data[1].to(device), data[0].to(device))
            out[torch.as_tensor(idx, device=out.device)] = g.to(device=out.device, dtype=self.dtype)
        return out

    def layer(self, layer: int, device=None) -> dict[str, torch.Tensor]:
        return {n: self.full(n, device) for n in self.names(layer)}


def per_sample_gradients(model: nn.Module, arch: ArchInfo, task: TaskSamples, method: str = "hooks",
                         batch_size: int = 8, progress: bool = False) -> SampleGradients:
    """Per-sample gradients of the per-sample loss w.r.t. every attention projection weight.

    method: "hooks" (one batched forward/backward; forward hooks keep each projection's input x and autograd gives
    the output gradient dy: g_i = sum_t dy_t x_t^T), "vmap" (torch.func: vmap over grad of functional_call) or
    "loop" (one backward pass per sample; the reference).
    """
    if method not in METHODS:
        raise ValueError(f"grad_method must be one of {METHODS} (got {method!r})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    out = SampleGradients(arch, task.ids, method)
    if not len(task):
        return out
    vocab = arch.vocab_size
    bad = [s.id for s in task.samples if max(s.prompt_ids + s.continuation_ids) >= vocab]
    if bad:
        raise ValueError(f"task {task.name!r}: samples {bad[:5]} hold token ids >= the model's vocabulary ({vocab}); "
                         f"they were tokenised for another model")
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    batches = _batches(task.samples, 1 if method == "loop" else batch_size, device)
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc=f"per-sample gradients {task.name[:30]} ({method})", leave=False)
    runner = {"hooks": _grads_hooks, "vmap": _grads_vmap, "loop": _grads_loop}[method]
    runner(model, out, batches)
    out.seconds = time.perf_counter() - t0
    return out


def _keep(store: dict, key):
    def fn(_, tensor):
        store[key] = tensor
    return fn


def _grads_hooks(model, out: SampleGradients, batches) -> None:
    """One batched forward/backward per batch: each projection's input x (its input site) and output y (its output
    site, seen before any other hook rewrites it), dy = d(sum of losses)/dy; g_i = sum_t dy_t x_t^T."""
    sites = projection_sites(out.arch)
    inputs: dict = {}
    outputs: dict = {}
    fns = {}
    for name, (layer, _, in_site, out_site) in sites.items():
        fns[(in_site, layer)] = _keep(inputs, (in_site, layer))
        fns[(out_site, layer)] = _keep(outputs, name)
    with hooks(out.arch, fns, innermost=True), _differentiable(m.weight for _, m in out.weights.values()), \
            torch.enable_grad():
        for idx, ids, target in batches:
            inputs.clear()
            outputs.clear()
            logits = model(input_ids=ids, use_cache=False).logits
            losses = continuation_nll(logits, ids, target)
            missing = set(out.weights) - set(outputs)
            if missing:
                raise RuntimeError(f"the forward pass did not run the projections {sorted(missing)[:3]}")
            names = list(outputs)
            dys = torch.autograd.grad(losses.sum(), [outputs[n] for n in names], allow_unused=True)
            xs = {n: inputs[(sites[n][2], sites[n][0])] for n in names}
            out.add(idx, _batch_entries(out, names, xs, dys, outputs, ids, target))
            out.losses[idx] = losses.detach().cpu().numpy()
            inputs.clear()
            outputs.clear()


def _batch_entries(out: SampleGradients, names, xs, dys, outputs, ids, target) -> dict:
    """Per weight: ("factors", x, dy) or ("dense", g), whichever is smaller; padding and prompt-only tail zeroed."""
    length = target.shape[1] - target.flip(1).int().argmax(1)          # last continuation token + 1
    valid = (torch.arange(ids.shape[1], device=ids.device)[None] < length[:, None])[..., None]
    kept: dict[int, torch.Tensor] = {}                                 # q/k/v share one input: keep once
    entries = {}
    for name, dy in zip(names, dys):
        x = xs[name]
        dy = torch.zeros_like(outputs[name]) if dy is None else dy
        b, t, d_in = x.shape
        d_out = dy.shape[-1]
        if t * (d_in + d_out) < d_in * d_out:
            if id(x) not in kept:
                kept[id(x)] = _at_least_float32(x.detach() * valid).cpu()
            entries[name] = ("factors", kept[id(x)], _at_least_float32(dy * valid).cpu())
        else:
            xf, dyf = _at_least_float32(x.detach() * valid), _at_least_float32(dy * valid)
            g = (torch.einsum("bti,bto->bio", xf, dyf) if out.arch.weights_transposed
                 else torch.einsum("bto,bti->boi", dyf, xf))
            entries[name] = ("dense", g.cpu())
    return entries


def _grads_loop(model, out: SampleGradients, batches) -> None:
    names = list(out.weights)
    weights = [out.weights[n][1].weight for n in names]
    with _differentiable(weights), torch.enable_grad():
        for idx, ids, target in batches:
            loss = continuation_nll(model(input_ids=ids, use_cache=False).logits, ids, target)
            grads = torch.autograd.grad(loss.sum(), weights)
            out.add(idx, {n: ("dense", _at_least_float32(g.detach())[None].cpu()) for n, g in zip(names, grads)})
            out.losses[idx] = loss.detach().cpu().numpy()


def _grads_vmap(model, out: SampleGradients, batches) -> None:
    from torch.func import functional_call, grad_and_value, vmap

    params = {n: m.weight.detach() for n, (_, m) in out.weights.items()}
    embed = model.get_input_embeddings()

    def loss_fn(p, ids, target):
        embeds = embed(ids[None])           # inputs_embeds: HF's padding check on input_ids cannot run under vmap
        logits = functional_call(model, p, args=(), kwargs={"inputs_embeds": embeds, "use_cache": False}).logits[0]
        logp = torch.log_softmax(_at_least_float32(logits[:-1]), dim=-1)
        nll = -logp.gather(-1, ids[1:, None])[:, 0]
        w = target[1:].to(logp.dtype)
        return (nll * w).sum() / w.sum()

    fn = vmap(grad_and_value(loss_fn), in_dims=(None, 0, 0))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*batching rule.*")       # sdpa falls back to a loop under vmap
        for idx, ids, target in batches:
            grads, losses = fn(params, ids, target)
            out.add(idx, {n: ("dense", _at_least_float32(g.detach()).cpu()) for n, g in grads.items()})
            out.losses[idx] = losses.detach().cpu().numpy()

