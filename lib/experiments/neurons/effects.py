"""The effects of a neuron's treatment on the last-position logits: the clean pass, the fast batched total
effect (clean KV cache, lower blocks skipped), the algebraic direct effect, the whole-model references, metrics."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from lib.model.hooks import hooks, skipped_blocks
from lib.model.architectures import ArchInfo
from lib.experiments.neurons.selection import SCALES, Neuron, PromptSet

__all__ = ["CLASSES", "TOTAL_EPS", "CleanPass", "clean_pass", "Treatment", "treated_logits_incremental",
           "total_logits_incremental", "total_logits_full", "frozen_logits", "direct_logits", "neuron_directions",
           "neuron_scales", "direct_ratio", "classify"]

CLASSES = ("routing-dominant", "mixed", "logit-dominant")
TOTAL_EPS = 1e-6                 # |total| below this: direct_ratio = 0.5 (no effect to split)


# ----------------------------------------------------------------------------- clean pass

def _device(model) -> torch.device:
    return next(model.parameters()).device


def _expand_cache(cache, rows: int, keep_growth: bool = True):
    """A fresh cache object holding the clean keys/values expanded (views) to `rows` batch rows. A forward
    concatenates onto its own copy, so the clean cache is never modified. keep_growth=False: each layer returns the
    grown keys/values to its attention but does not keep them (the cache is thrown away after one forward), so the
    [rows, kv_heads, positions, head_dim] copies of all layers are never alive at the same time."""
    if cache is None:
        return None
    if not hasattr(cache, "layers"):
        import transformers
        raise RuntimeError(f"the KV cache of transformers {transformers.__version__} has no per-layer objects "
                           f"(Cache.layers); neuron effects need a newer transformers (tested with 5.x): "
                           f"pip install -U 'transformers>=5'")
    new = copy.copy(cache)
    new.layers = []
    for layer in cache.layers:
        fresh = copy.copy(layer)
        if getattr(layer, "keys", None) is not None and layer.keys.dim() == 4:
            fresh.keys = layer.keys.expand(rows, -1, -1, -1)
            fresh.values = layer.values.expand(rows, -1, -1, -1)
            if not keep_growth:
                fresh.update = _forgetful_update(fresh)
        new.layers.append(fresh)
    return new


def _forgetful_update(layer):
    update, keys, values = layer.update, layer.keys, layer.values

    def forgetful(*args, **kwargs):
        out = update(*args, **kwargs)
        layer.keys, layer.values = keys, values
        return out
    return forgetful


@dataclass
class CleanPass:
    """Clean quantities at the last position of every prompt (from the incremental path: prefix + last token)."""
    resid: torch.Tensor          # [P, L, H] residual stream after every block (block outputs)
    acts: torch.Tensor           # [P, L, d_mlp] neuron activations (down-projection inputs)
    logits: torch.Tensor         # [P, V] clean logits, float32
    caches: list                 # per prompt: HF cache of the prompt minus its last token (None for 1-token prompts)
    last_tokens: list[int]

    @property
    def h_final(self) -> torch.Tensor:
        """[P, H] the final pre-norm hidden state (the last block's output)."""
        return self.resid[:, -1]


@torch.no_grad()
def clean_pass(model, arch: ArchInfo, prompts: PromptSet, progress: bool = False) -> CleanPass:
    """Per prompt: a forward of the prompt minus its last token (keeps its KV cache), then the last token alone with
    that cache, recording every block's output and every down projection's input at that position."""
    device = _device(model)
    resid, acts, logits, caches, last = [], [], [], [], []
    for ids in tqdm(prompts.input_ids, desc="clean pass", unit="prompt", disable=not progress):
        ids = ids.to(device)
        cache = None
        if len(ids) > 1:
            cache = model(input_ids=ids[None, :-1], use_cache=True, logits_to_keep=1).cache
        rec_r, rec_a = {}, {}
        with hooks(arch, {"resid_post": _keep_last_of_row0(rec_r), "mlp_act": _keep_last_of_row0(rec_a)}):
            out = model(input_ids=ids[None, -1:], cache=_expand_cache(cache, 1), use_cache=cache is not None)
        resid.append(torch.stack([rec_r[l] for l in range(arch.n_layers)]))
        acts.append(torch.stack([rec_a[l] for l in range(arch.n_layers)]))
        logits.append(out.logits[0, -1].float())
        caches.append(cache)
        last.append(int(ids[-1]))
    clean = CleanPass(torch.stack(resid), torch.stack(acts), torch.stack(logits), caches, last)
    check = arch.logits_from_hidden(clean.h_final).float()
    if not torch.allclose(check, clean.logits, atol=1e-3 * max(1.0, float(clean.logits.abs().max())), rtol=1e-3):
        raise RuntimeError(f"{arch.model_type}: final norm + unembedding of the last block's output does not reproduce "
                           f"the model's logits (max diff {float((check - clean.logits).abs().max()):.3g}); "
                           f"ArchInfo.logits_from_hidden / final_norm needs fixing for this architecture")
    return clean


def _keep_last_of_row0(record: dict):
    def fn(layer, h):
        record[layer] = h[0, -1].clone()
    return fn


# ----------------------------------------------------------------------------- treatments

@dataclass
class Treatment:
    """One batch of treatments at the last position; row r acts on layer layers[r]:

    mode "add":    the residual stream after block layers[r] (site resid_post) += vectors[r]      [B, hidden]
    mode "ablate": the activation of neuron neurons[r] at the down-projection input (site mlp_act) is set to
                   values[r] (0 for the neuron zeroed)                                              [B], [B]
    A row with a zero vector ("add") or neuron -1 ("ablate") is untreated: the clean reference."""
    mode: str
    layers: torch.Tensor
    vectors: torch.Tensor | None = None
    neurons: torch.Tensor | None = None
    values: torch.Tensor | None = None

    @classmethod
    def add(cls, layers: torch.Tensor, vectors: torch.Tensor) -> "Treatment":
        return cls("add", torch.as_tensor(layers).long(), vectors=vectors)

    @classmethod
    def ablate(cls, layers: torch.Tensor, neurons: torch.Tensor, values: torch.Tensor) -> "Treatment":
        return cls("ablate", torch.as_tensor(layers).long(), neurons=torch.as_tensor(neurons).long(),
                   values=torch.as_tensor(values))

    @property
    def rows(self) -> int:
        return len(self.layers)

    def take(self, rows: list[int]) -> "Treatment":
        """The treatment of these rows only, in this order."""
        pick = lambda t: None if t is None else t[torch.as_tensor(rows, device=t.device)]
        return Treatment(self.mode, pick(self.layers), pick(self.vectors), pick(self.neurons), pick(self.values))

    def first_computed_block(self) -> int:
        """The lowest block that must run: an ablation acts inside its block, a push after it."""
        low = int(self.layers.min())
        return low if self.mode == "ablate" else low + 1

    def site_fns(self, record: dict | None = None) -> dict:
        """{(site, layer): fn} applying the treatment (lib.model.hooks convention); with `record`, every treated layer's
        block output at the last position is stored as record[layer] [B, hidden]."""
        fns = {}
        for layer in sorted(set(self.layers.tolist())):
            mask = self.layers == layer
            if self.mode == "add":
                fns[("resid_post", layer)] = _push(self.vectors * mask[:, None].to(self.vectors.device,
                                                                                    self.vectors.dtype))
            else:
                rows = (mask & (self.neurons >= 0)).nonzero()[:, 0]
                fns[("mlp_act", layer)] = _set_activation(rows, self.neurons[rows], self.values[rows])
            if record is not None:
                fns[("resid_post", layer)] = _chain(fns.get(("resid_post", layer)), _keep_last(record, layer))
        return fns

    def residual_deltas(self, record: dict) -> torch.Tensor:
        """[B, hidden]: each row's change of its block's output (the push itself for "add"; for "ablate" the
        recorded output minus the untreated row 0's, which is the clean output computed in the same batch)."""
        if self.mode == "add":
            return self.vectors
        return torch.stack([record[int(l)][r] - record[int(l)][0] for r, l in enumerate(self.layers)])


def _push(delta: torch.Tensor):
    def fn(layer, h):
        h = h.clone()
        h[:, -1] += delta.to(h.device, h.dtype)
        return h
    return fn


def _set_activation(rows: torch.Tensor, neurons: torch.Tensor, values: torch.Tensor):
    def fn(layer, act):
        act = act.clone()
        act[rows.to(act.device), -1, neurons.to(act.device)] = values.to(act.device, act.dtype)
        return act
    return fn


def _keep_last(record: dict, layer: int):
    def fn(_, h):
        record[layer] = h[:, -1].clone()
    return fn


def _chain(first, then):
    if first is None:
        return then

    def fn(layer, h):
        out = first(layer, h)
        then(layer, h if out is None else out)
        return out
    return fn


# ----------------------------------------------------------------------------- the three computations

@torch.inference_mode()
def treated_logits_incremental(model, arch: ArchInfo, clean: CleanPass, prompt: int, treatment: Treatment,
                               skip_lower: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [B, V] float32 of the last token under each row's treatment, residual deltas [B, hidden]); the
    earlier positions come from the clean KV cache of `prompt`; the blocks below the first one that must run are
    skipped (their output is the cached clean residual stream) when possible."""
    rows, device = treatment.rows, _device(model)
    cache = _expand_cache(clean.caches[prompt], rows, keep_growth=False)
    ids = torch.full((rows, 1), clean.last_tokens[prompt], dtype=torch.long, device=device)
    below = treatment.first_computed_block() if skip_lower else 0
    skipped = {l: clean.resid[prompt, l].reshape(1, 1, -1).expand(rows, 1, -1).contiguous() for l in range(below)}
    record: dict = {}
    with skipped_blocks(arch, skipped), hooks(arch, treatment.site_fns(record)):
        out = model(input_ids=ids, cache=cache, use_cache=cache is not None)
    return out.logits[:, -1].float(), treatment.residual_deltas(record)


@torch.inference_mode()
def total_logits_incremental(model, arch: ArchInfo, clean: CleanPass, prompt: int, layers: torch.Tensor,
                             vectors: torch.Tensor, skip_lower: bool = True) -> torch.Tensor:
    """Logits [B, V] (float32) of the last token with row r's V added after block layers[r] (see
    treated_logits_incremental)."""
    return treated_logits_incremental(model, arch, clean, prompt, Treatment.add(layers, vectors), skip_lower)[0]


@torch.inference_mode()
def total_logits_full(model, arch: ArchInfo, input_ids: torch.Tensor, layers, vectors=None) -> torch.Tensor:
    """Reference: the WHOLE prompt through ALL layers, one batch row per treatment (a Treatment, or layers and
    vectors for "add"). -> logits [B, V] float32 at the last position."""
    treatment = layers if isinstance(layers, Treatment) else Treatment.add(layers, vectors)
    ids = input_ids.to(_device(model))[None].expand(treatment.rows, -1)
    with hooks(arch, treatment.site_fns()):
        out = model(input_ids=ids, logits_to_keep=1)
    return out.logits[:, -1].float()


@torch.inference_mode()
def frozen_logits(model, arch: ArchInfo, input_ids: torch.Tensor, layer: int, treatment) -> torch.Tensor:
    """Reference for the direct effect: the treatment (a Treatment of one layer, or vectors [B, hidden] added
    after block `layer`) at the last position while every later layer's attention output and MLP output are patched
    to their clean values there. -> logits [B, V] float32 at the last position (row order as the treatment)."""
    if not isinstance(treatment, Treatment):
        treatment = Treatment.add(torch.full((treatment.shape[0],), layer), treatment)
    ids = input_ids.to(_device(model))[None]
    later = [(site, l) for l in range(layer + 1, arch.n_layers) for site in ("attn_out", "mlp_out")]
    saved: dict = {}
    with hooks(arch, {key: _save_last(saved, key) for key in later}):
        model(input_ids=ids, logits_to_keep=1)
    patches = {key: _set_last(saved[key]) for key in later}
    with hooks(arch, {**treatment.site_fns(), **patches}):
        out = model(input_ids=ids.expand(treatment.rows, -1), logits_to_keep=1)
    return out.logits[:, -1].float()


def _save_last(saved: dict, key):
    def fn(_, h):
        saved[key] = h[:, -1].clone()
    return fn


def _set_last(value: torch.Tensor):
    def fn(_, h):
        h = h.clone()
        h[:, -1] = value
        return h
    return fn


@torch.inference_mode()
def direct_logits(arch: ArchInfo, h_final: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """Algebraic direct effect, many neurons at once: logits_from_hidden(h_final + V) -> [B, V] float32."""
    return arch.logits_from_hidden(h_final[None].to(vectors.dtype) + vectors).float()


def neuron_directions(arch: ArchInfo, neurons: list[Neuron]) -> torch.Tensor:
    """[N, hidden]: column n of layer l's down projection for every neuron."""
    out = []
    for l in sorted({n.layer for n in neurons}):
        idx = [n.neuron for n in neurons if n.layer == l]
        out.append((l, idx, arch.down_proj_weight(l)[:, idx].T))
    by = {(l, i): row for l, idx, rows in out for i, row in zip(idx, rows)}
    return torch.stack([by[(n.layer, n.neuron)] for n in neurons])


def neuron_scales(clean: CleanPass, neurons: list[Neuron], activation_scale: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(actual activations [N, P], the scale a used for V [N, P]) for activation_scale actual / mean / unit."""
    if activation_scale not in SCALES:
        raise ValueError(f"unknown activation_scale {activation_scale!r}; use one of {list(SCALES)}")
    layer = torch.tensor([n.layer for n in neurons])
    index = torch.tensor([n.neuron for n in neurons])
    actual = clean.acts[:, layer, index].T.float()                      # [N, P]
    if activation_scale == "actual":
        return actual, actual
    if activation_scale == "mean":
        return actual, actual.mean(1, keepdim=True).expand_as(actual)
    return actual, torch.ones_like(actual)


# ----------------------------------------------------------------------------- metrics

def direct_ratio(direct, indirect, total=None):
    """|d| / (|d| + |i|), elementwise; 0.5 where |total| < 1e-6 (no effect to split)."""
    d, i = np.abs(np.asarray(direct, float)), np.abs(np.asarray(indirect, float))
    t = np.asarray(direct, float) + np.asarray(indirect, float) if total is None else np.asarray(total, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = d / (d + i)
    return np.where((np.abs(t) < TOTAL_EPS) | ~np.isfinite(ratio), 0.5, ratio)


def classify(ratio, thresholds=(0.3, 0.7)):
    """< lo routing-dominant, lo..hi (inclusive) mixed, > hi logit-dominant (elementwise, returns str array)."""
    lo, hi = thresholds
    r = np.asarray(ratio, float)
    return np.where(r < lo, CLASSES[0], np.where(r > hi, CLASSES[2], CLASSES[1]))


def _join(values, fmt) -> str:
    return " ".join(fmt(v) for v in values)


def _batch_rows(total: torch.Tensor, direct: torch.Tensor, clean_total: torch.Tensor, clean_direct: torch.Tensor,
                target: int, distractor: int, topk: int) -> dict[str, np.ndarray | list]:
    """Metrics of B rows (one prompt): total/direct logits [B, V] against their clean references [V]."""
    eff_t, eff_d = total - clean_total, direct - clean_direct
    eff_i = eff_t - eff_d
    prob = lambda logits: torch.exp(logits[..., target] - torch.logsumexp(logits, -1))    # target probability
    k = min(topk, eff_t.shape[-1])
    np_ = lambda x: x.double().cpu().numpy()
    out = {
        "direct": np_(eff_d[:, target]), "indirect": np_(eff_i[:, target]), "total": np_(eff_t[:, target]),
        "diff_direct": np_(eff_d[:, target] - eff_d[:, distractor]),
        "diff_indirect": np_(eff_i[:, target] - eff_i[:, distractor]),
        "diff_total": np_(eff_t[:, target] - eff_t[:, distractor]),
        "dprob_total": np_(prob(total) - prob(clean_total)), "dprob_direct": np_(prob(direct) - prob(clean_direct)),
    }
    for name, e in (("total", eff_t), ("direct", eff_d), ("indirect", eff_i)):
        mag = e.abs()
        top = mag.topk(k, dim=-1)
        out[f"mean_abs_{name}"] = np_(mag.mean(-1))
        out[f"max_abs_{name}"] = np_(top.values[:, 0])
        if name != "indirect":
            out[f"top_{name}_ids"] = [_join(r, str) for r in top.indices.tolist()]
            out[f"top_{name}_effects"] = [_join(r, lambda v: f"{v:.6g}") for r in e.gather(1, top.indices).tolist()]
    return out

