"""Interim hook sites for the neuron effects (the lib.hooks API: hooks(arch, {site | (site, layer): fn}) and
skipped_blocks(arch, {layer: output})); replaced by lib.hooks."""
from __future__ import annotations

from contextlib import contextmanager

_SITES = {"mlp_act": ("mlp_down", "pre"), "resid_post": ("block", "post"), "attn_out": ("attn_out", "post"),
          "mlp_out": ("mlp_down", "post")}


def _module(arch, site, layer):
    where, kind = _SITES[site]
    return (arch.layers()[layer] if where == "block" else getattr(arch, where)(layer)), kind


@contextmanager
def hooks(arch, fns):
    handles = []
    try:
        for key, fn in fns.items():
            site, layers = (key, range(arch.n_layers)) if isinstance(key, str) else (key[0], [key[1]])
            for layer in layers:
                module, kind = _module(arch, site, layer)
                if kind == "pre":
                    def pre(m, args, fn=fn, layer=layer):
                        new = fn(layer, args[0])
                        return None if new is None else (new,) + tuple(args[1:])
                    handles.append(module.register_forward_pre_hook(pre))
                else:
                    def post(m, args, out, fn=fn, layer=layer):
                        return fn(layer, out)
                    handles.append(module.register_forward_hook(post))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def skipped_blocks(arch, outputs):
    blocks = arch.layers()
    try:
        for layer, out in outputs.items():
            blocks[layer].forward = (lambda *a, _o=out, **k: _o)
        yield
    finally:
        for layer in outputs:
            blocks[layer].__dict__.pop("forward", None)
