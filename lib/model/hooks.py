"""The one place where the project hooks a model or patches its weights.

Read or replace a tensor at a named site (lib.model.architectures.SITES) of every layer or of one layer:

    def scale_heads(layer, z):                  # z: head_out [batch, pos, n_heads * head_dim]
        return z * 0.5                          # a replacement tensor, or None to leave it unchanged

    with hooks(arch, {"head_out": scale_heads, ("mlp_act", 3): record}):
        model(input_ids)

Patch weights for the duration of a block, restored bit-exactly on exit (also on error):

    q, index = arch.head_weight_slices(layer, head)["q"]
    with patched_weights([((q, index), lambda w: w + noise), (o_weight, torch.zeros_like)]):
        model(input_ids)

Skip blocks whose output is known (e.g. cached clean residual streams below the first perturbed layer):

    with skipped_blocks(arch, {0: h0, 1: h1}):  # blocks 0 and 1 return h0, h1 without computing
        model(input_ids)

Every hook handle is removed on exit, whatever happens inside the block.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Mapping

import torch

from lib.model.architectures import ArchInfo, SITES

__all__ = ["hooks", "skipped_blocks", "patched_weights"]

HookFn = Callable[[int, torch.Tensor], "torch.Tensor | None"]


def _site_layers(arch: ArchInfo, key) -> tuple[str, list[int]]:
    """"site" -> (site, every layer); ("site", layer) -> (site, [layer])."""
    if isinstance(key, str):
        return key, list(range(arch.n_layers))
    if isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], str) and isinstance(key[1], int):
        return key[0], [key[1]]
    raise ValueError(f"hook key must be a site name or (site, layer), e.g. 'head_out' or ('mlp_act', 2); got {key!r}. "
                     f"Sites: {sorted(SITES)}")


def _pre_hook(fn: HookFn, layer: int):
    def hook(module, args):
        new = fn(layer, args[0])
        return None if new is None else (new,) + tuple(args[1:])
    return hook


def _post_hook(fn: HookFn, layer: int):
    def hook(module, args, output):
        first = output[0] if isinstance(output, tuple) else output
        new = fn(layer, first)
        if new is None:
            return None
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new
    return hook


@contextmanager
def hooks(arch: ArchInfo, fns: Mapping, innermost: bool = False):
    """Install fn(layer, tensor) -> replacement | None at each site ("site": every layer, ("site", layer): one).

    "pre" sites (head_out, mlp_act, qkv_in) pass the module's first positional input, "post" sites (attn_out,
    mlp_out, resid_post, q_out, k_out, v_out) its output (element 0 when the module returns a tuple). Hooks run in
    the order of `fns`, after hooks already installed; innermost=True puts the post hooks before those (they see
    the module's own output even when another hook rewrites it; pre hooks are last anyway: the real input).
    """
    planned = []
    for key, fn in fns.items():                  # resolve every site before installing any hook
        site, layers = _site_layers(arch, key)
        planned += [(layer, fn, *arch.site(site, layer)) for layer in layers]
    handles = []
    try:
        for layer, fn, module, kind in planned:
            if kind == "pre":
                handles.append(module.register_forward_pre_hook(_pre_hook(fn, layer)))
            else:
                handles.append(module.register_forward_hook(_post_hook(fn, layer), prepend=innermost))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def skipped_blocks(arch: ArchInfo, outputs: Mapping[int, torch.Tensor]):
    """Skip the computation of blocks for the duration: block `layer` returns outputs[layer] (its resid_post
    tensor [batch, pos, d_model]) without running; hooks at its resid_post site still see and may replace it.
    Decoder blocks of transformers 5 return a plain tensor, which is what the skipped block returns. Restored on
    exit, also after an error."""
    blocks = arch.layers()
    skipped = []
    try:
        for layer, output in outputs.items():
            block = blocks[layer]
            if "forward" in block.__dict__:
                raise RuntimeError(f"block {layer} already has its forward replaced (nested skipped_blocks?)")
            block.forward = (lambda *args, _out=output, **kwargs: _out)
            skipped.append(block)
        yield
    finally:
        for block in skipped:
            del block.forward


def _targets(patches) -> Iterable[tuple]:
    items = patches.items() if isinstance(patches, Mapping) else patches
    for target, value in items:
        param, index = target if isinstance(target, tuple) else (target, ...)
        if not isinstance(param, torch.Tensor):
            raise TypeError(f"patched_weights: a target must be a parameter or (parameter, index); got {type(param)}")
        yield param, index, value


@contextmanager
def patched_weights(patches):
    """Patch weights in place under no_grad for the block; restore the saved originals bit-exactly on exit.

    patches: {parameter: value}, or a list of (target, value) pairs where target is a parameter or
    (parameter, index) (index: anything tensor indexing takes, e.g. the slices of ArchInfo.head_weight_slices;
    a list because slices are not hashable). value is a tensor (broadcast into parameter[index]) or a callable
    taking the current parameter[index] and returning its new value. Restored in reverse order, also after an
    error.
    """
    saved = []
    try:
        with torch.no_grad():
            for param, index, value in _targets(patches):
                current = param[index]
                saved.append((param, index, current.clone()))
                new = value(current) if callable(value) else value
                param[index] = torch.as_tensor(new, device=param.device).to(param.dtype)
        yield
    finally:
        with torch.no_grad():
            for param, index, original in reversed(saved):
                param[index] = original
