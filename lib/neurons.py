"""MLP neuron effects on the output: direct (straight to the logits) vs indirect (through later layers).

Causal mediation / activation patching at the LAST prompt position. For neuron n of layer l and prompt p:

    a      the neuron's activation in the clean pass (the down projection's input) at the last position
    V      = W_down[:, n] * a   (activation_scale "actual"; "mean": a averaged over the prompts; "unit": a = 1)
    treatment  mode "add": residual stream after layer l, last position, += V;  mode "ablate": -= V
               (with "actual" scale, "ablate" is the neuron zeroed at the last position)
    total      = logits(model with the treatment) - clean logits                       (a forward pass)
    direct     = logits_from_hidden(h_final + V) - logits_from_hidden(h_final)         (no forward pass)
               h_final is the final pre-norm hidden state. This is exact for "every later layer frozen" (their
               attention and MLP outputs patched to clean values: then h_final becomes h_final + V). The final norm
               is RECOMPUTED on h_final + V (TransformerLens-style direct logit attribution freezes the norm scale
               instead, which makes it linear in V); any final logit soft-capping is applied.
    indirect   = total - direct (exact as vectors over the vocabulary; magnitudes do not add)

Metrics per (neuron, prompt) on a target token (default: the clean top prediction; distractor default: the clean
runner-up): target logit effect (direct / indirect / total), target - distractor logit-difference effect, target
probability change, direct_ratio = |d| / (|d| + |i|) (0.5 when |total| < 1e-6), sign alignment (d * i > 0), and
over the whole vocabulary the mean / max |effect| and the top-k most affected token ids.

Fast path (total effects). The perturbation sits at the last position only, so (causal attention) every earlier
position is unchanged: the clean keys/values of the prompt minus its last token (the clean KV cache) are reused
and only the last token runs through the model, many neurons per forward (batch rows = neurons of one prompt, each
row its own injection, the clean cache expanded along the batch). Blocks up to the lowest injected layer are not
computed at all: their forward is temporarily replaced by the cached clean residual stream (when the block returns
a plain tensor; otherwise they run for the one token). Per neuron that is one token through the remaining layers
instead of the whole prompt through all layers. Reference implementations (whole-prompt forwards, explicit frozen
runs) are here too, for the tests, the benchmark and the notebook's live check table.

Artifacts (notebook 06): neuron_effects.csv (one row per neuron x prompt), neuron_summaries.json (one entry per
neuron, id "L{layer}/N{neuron}"), layer_summary.csv. Sharding (shard "i/n") splits the neuron set round-robin;
each shard checkpoints per batch in <out_dir>/neuron_effects_shards/ and a run with shard "" merges the shards.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from lib.models import ArchInfo
from lib.store import ArtifactError, load_npz, save_csv, save_json

MODES = ("add", "ablate")
SCALES = ("actual", "mean", "unit")
SELECTORS = ("top_activation", "random")
CLASSES = ("routing-dominant", "mixed", "logit-dominant")
TOTAL_EPS = 1e-6                 # |total| below this: direct_ratio = 0.5 (no effect to split)
SHARD_DIR = "neuron_effects_shards"
EFFECTS_FILE, SUMMARIES_FILE, LAYERS_FILE = "neuron_effects.csv", "neuron_summaries.json", "layer_summary.csv"
_LIST_COLUMNS = ("top_total_ids", "top_total_effects", "top_direct_ids", "top_direct_effects")


# ----------------------------------------------------------------------------- neuron sets

@dataclass(frozen=True, order=True)
class Neuron:
    layer: int
    neuron: int

    @property
    def id(self) -> str:
        return f"L{self.layer}/N{self.neuron}"


_ID_RE = re.compile(r"^\s*L(-?\d+)\s*/\s*N(-?\d+)\s*$", re.IGNORECASE)


def check_mlp_site(arch: ArchInfo) -> None:
    """Fail clearly when the architecture's MLP down projection (the neuron site) cannot be found or has the wrong
    shape; names the architecture and the module path tried."""
    path = getattr(arch.spec, "mlp_down", None)
    fix = ("add or correct the ArchSpec.mlp_down entry for it in lib/models.py (the module whose input is the "
           "neuron activations, [.., d_mlp], and whose output is added to the residual stream)")
    if not path:
        raise ValueError(f"the MLP site of architecture {arch.model_type!r} is unknown (no mlp_down path): {fix}")
    try:
        weight = arch.down_proj_weight(0)
    except (AttributeError, IndexError, TypeError) as e:
        raise ValueError(f"the MLP site of architecture {arch.model_type!r} is unknown: no module at "
                         f"{path!r} in its blocks ({type(e).__name__}: {e}); {fix}") from None
    if tuple(weight.shape) != (arch.hidden_size, arch.d_mlp):
        raise ValueError(f"the MLP site of architecture {arch.model_type!r} is unknown: {path!r} has a weight of "
                         f"shape {tuple(weight.shape)}, expected [hidden {arch.hidden_size}, d_mlp {arch.d_mlp}] "
                         f"(a mixture-of-experts or fused MLP?); {fix}")


def _parse_neuron(item: Any) -> tuple[int, int]:
    if isinstance(item, str):
        m = _ID_RE.match(item)
        if not m:
            raise ValueError(f"cannot read neuron {item!r}: write 'L<layer>/N<neuron>' (e.g. 'L3/N12') or [layer, neuron]")
        return int(m.group(1)), int(m.group(2))
    if isinstance(item, dict) and {"layer", "neuron"} <= set(item):
        item = (item["layer"], item["neuron"])
    if isinstance(item, (list, tuple)) and len(item) == 2:
        layer, neuron = item
        ok = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (layer, neuron))
        if ok:
            return int(layer), int(neuron)
    raise ValueError(f"cannot read neuron {item!r}: write [layer, neuron] with two integers, or 'L<layer>/N<neuron>'")


def validate_neurons(arch: ArchInfo, items, source: str = "neurons") -> list[Neuron]:
    """Parse and check a neuron list -> sorted, de-duplicated list of Neuron. Raises ValueError naming the bad entry."""
    check_mlp_site(arch)
    parsed = [_parse_neuron(it) for it in (items or [])]
    if not parsed:
        raise ValueError(f"empty neuron set (from {source}): give neurons = [[layer, neuron], ...], a neurons_file, "
                         f"or a selector with n_neurons > 0")
    for layer, neuron in parsed:
        if not 0 <= layer < arch.n_layers:
            raise ValueError(f"neuron L{layer}/N{neuron} (from {source}): layer {layer} does not exist; the model "
                             f"has {arch.n_layers} layers (0..{arch.n_layers - 1})")
        if not 0 <= neuron < arch.d_mlp:
            raise ValueError(f"neuron L{layer}/N{neuron} (from {source}): index {neuron} is out of range for layer "
                             f"{layer}, which has d_mlp = {arch.d_mlp} neurons (0..{arch.d_mlp - 1})")
    return sorted({Neuron(l, n) for l, n in parsed})


def read_neuron_file(path: str | Path) -> list:
    """Neuron list from a file: .json (list of [layer, neuron] or 'L3/N12'), .csv (columns layer, neuron), or text
    (one neuron per line: 'L3/N12', '3 12' or '3,12'; '#' starts a comment)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"neurons_file {str(path)!r} does not exist")
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        return data["neurons"] if isinstance(data, dict) and "neurons" in data else data
    if path.suffix == ".csv":
        frame = pd.read_csv(path)
        if not {"layer", "neuron"} <= set(frame.columns):
            raise ValueError(f"{path}: a neuron CSV needs columns 'layer' and 'neuron' (has {list(frame.columns)})")
        return [(int(l), int(n)) for l, n in zip(frame["layer"], frame["neuron"])]
    items = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = re.split(r"[,\s]+", line)
        items.append(line if len(parts) == 1 else tuple(int(p) for p in parts) if all(
            re.fullmatch(r"-?\d+", p) for p in parts) else line)
    return items


def _split_evenly(n: int, k: int) -> list[int]:
    base, extra = divmod(n, k)
    return [base + (1 if i < extra else 0) for i in range(k)]


def select_neurons(arch: ArchInfo, selector: str = "top_activation", n_neurons: int = 32,
                   layers: list[int] | None = None, activations: torch.Tensor | None = None,
                   seed: int = 0) -> list[Neuron]:
    """n_neurons split evenly over `layers` (default all; earlier layers get the remainder), chosen per layer by
    "top_activation" (largest mean |activation| at the last position over the prompts; needs `activations`
    [prompts, layers, d_mlp]) or "random" (seeded uniform sample without replacement)."""
    check_mlp_site(arch)
    if selector not in SELECTORS:
        raise ValueError(f"unknown neuron selector {selector!r}; use one of {list(SELECTORS)}")
    if not isinstance(n_neurons, int) or isinstance(n_neurons, bool) or n_neurons <= 0:
        raise ValueError(f"empty neuron set: n_neurons must be a positive integer (got {n_neurons!r})")
    chosen = list(range(arch.n_layers)) if layers is None else list(layers)
    if not chosen:
        raise ValueError("empty neuron set: `layers` is an empty list; give None (all layers) or some layer indices")
    for l in chosen:
        if not isinstance(l, (int, np.integer)) or not 0 <= l < arch.n_layers:
            raise ValueError(f"layer {l!r} does not exist; the model has {arch.n_layers} layers (0..{arch.n_layers - 1})")
    if n_neurons > len(chosen) * arch.d_mlp:
        raise ValueError(f"n_neurons={n_neurons} but the chosen layers hold only {len(chosen) * arch.d_mlp} neurons")
    counts = _split_evenly(n_neurons, len(chosen))
    if max(counts) > arch.d_mlp:
        raise ValueError(f"n_neurons={n_neurons} over {len(chosen)} layers needs {max(counts)} per layer > d_mlp {arch.d_mlp}")
    rng = np.random.default_rng(seed)
    out = []
    for layer, k in zip(chosen, counts):
        if k == 0:
            continue
        if selector == "random":
            picks = rng.choice(arch.d_mlp, size=k, replace=False)
        else:
            if activations is None:
                raise ValueError("selector 'top_activation' needs the clean activations (run clean_pass first)")
            score = activations[:, layer].abs().float().mean(0)
            picks = torch.topk(score, k).indices.cpu().numpy()
        out.extend(Neuron(int(layer), int(n)) for n in picks)
    return sorted(set(out))


# ----------------------------------------------------------------------------- prompts

@dataclass
class PromptSet:
    input_ids: list[torch.Tensor]     # each 1-D LongTensor, the prompt exactly as fed (chat template applied)
    prompt_ids: list[int]             # index in the paper's 60
    texts: list[str]
    categories: list[str]
    source: str                       # where they came from (activations.npz, or select_prompts + tokenizer)

    def __len__(self) -> int:
        return len(self.input_ids)


def load_prompts(out_dir: str | Path, tokenizer, arch: ArchInfo, n_prompts: int = 4,
                 chat_template: bool = True) -> PromptSet:
    """The prompts of the run: from <out_dir>/activations.npz when it exists (prompt_input_ids / prompt_lengths: the
    same chat-templated inputs as the extraction; the paper's even split over categories when the file holds those
    prompts, otherwise evenly spaced rows), else lib.prompts.select_prompts(n_prompts) encoded with the tokenizer
    (with its chat template when chat_template=True, as notebook 01 does)."""
    from lib.prompts import select_prompts
    if not isinstance(n_prompts, int) or isinstance(n_prompts, bool) or n_prompts <= 0:
        raise ValueError(f"n_prompts must be a positive integer (got {n_prompts!r})")
    path = Path(out_dir) / "activations.npz"
    if path.exists():
        data = load_npz(path, expect={"prompt_input_ids": 2, "prompt_lengths": 1},
                        produced_by="01_extract_activations")
        made_with = str(data["model"]) if "model" in data else None
        if made_with is not None and arch.source and made_with != arch.source:
            raise ArtifactError(f"{path} was made with model {made_with!r} but this run uses {arch.source!r}: use "
                                f"the same model, or another out_dir (without activations.npz the prompts are "
                                f"taken from lib.prompts)")
        total = len(data["prompt_lengths"])
        if n_prompts > total:
            raise ValueError(f"n_prompts={n_prompts} but {path} holds only {total} prompts; use n_prompts <= {total}")
        ids_in_file = [int(i) for i in data.get("prompt_ids", np.arange(total))]
        wanted = [p.prompt_id for p in select_prompts(n_prompts)] if n_prompts <= 60 else []
        if wanted and all(w in ids_in_file for w in wanted):
            rows = [ids_in_file.index(w) for w in wanted]
        else:
            rows = sorted(set(np.linspace(0, total - 1, n_prompts).round().astype(int).tolist()))
        ids = [torch.as_tensor(data["prompt_input_ids"][r, -int(data["prompt_lengths"][r]):], dtype=torch.long)
               for r in rows]
        texts = [str(data["prompt_text"][r]) if "prompt_text" in data else "" for r in rows]
        cats = [str(data["prompt_category"][r]) if "prompt_category" in data else "" for r in rows]
        bad = [int(t.max()) for t in ids if int(t.max()) >= arch.vocab_size]
        if bad:
            raise ArtifactError(f"{path}: token id {bad[0]} >= vocabulary {arch.vocab_size}: the file is from another "
                                f"tokenizer; regenerate it with 01_extract_activations for this model")
        return PromptSet(ids, [ids_in_file[r] for r in rows], texts, cats, f"{path} (prompt_input_ids)")
    from lib.extract import encode_prompts
    prompts = select_prompts(n_prompts)
    encoded = encode_prompts(tokenizer, [p.text for p in prompts], chat_template)
    return PromptSet([torch.as_tensor(e, dtype=torch.long) for e in encoded], [p.prompt_id for p in prompts],
                     [p.text for p in prompts], [p.category for p in prompts],
                     f"lib.prompts.select_prompts({n_prompts}) + tokenizer (chat_template={bool(chat_template)})")


# ----------------------------------------------------------------------------- clean pass

def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _with_hidden(output, hidden):
    return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden


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
    block_returns_tensor: bool   # blocks return a plain tensor: the lower blocks can be skipped in the fast path

    @property
    def h_final(self) -> torch.Tensor:
        """[P, H] the final pre-norm hidden state (the last block's output)."""
        return self.resid[:, -1]


@torch.no_grad()
def clean_pass(model, arch: ArchInfo, prompts: PromptSet, progress: bool = False) -> CleanPass:
    """Per prompt: a forward of the prompt minus its last token (keeps its KV cache), then the last token alone with
    that cache, recording every block's output and every down projection's input at that position."""
    device = _device(model)
    layers = arch.layers()
    resid, acts, logits, caches, last, kinds = [], [], [], [], [], set()
    for ids in tqdm(prompts.input_ids, desc="clean pass", unit="prompt", disable=not progress):
        ids = ids.to(device)
        cache = None
        if len(ids) > 1:
            cache = model(input_ids=ids[None, :-1], use_cache=True, logits_to_keep=1).past_key_values
        rec_r, rec_a, handles = {}, {}, []
        for l, block in enumerate(layers):
            def block_hook(module, args, output, l=l):
                kinds.add(isinstance(output, torch.Tensor))
                rec_r[l] = _hidden(output)[0, -1].clone()
            def down_hook(module, args, l=l):
                rec_a[l] = args[0][0, -1].clone()
            handles.append(block.register_forward_hook(block_hook))
            handles.append(arch.mlp_down(l).register_forward_pre_hook(down_hook))
        try:
            out = model(input_ids=ids[None, -1:], past_key_values=_expand_cache(cache, 1), use_cache=cache is not None)
        finally:
            for h in handles:
                h.remove()
        resid.append(torch.stack([rec_r[l] for l in range(arch.n_layers)]))
        acts.append(torch.stack([rec_a[l] for l in range(arch.n_layers)]))
        logits.append(out.logits[0, -1].float())
        caches.append(cache)
        last.append(int(ids[-1]))
    clean = CleanPass(torch.stack(resid), torch.stack(acts), torch.stack(logits), caches, last, kinds == {True})
    check = arch.logits_from_hidden(clean.h_final).float()
    if not torch.allclose(check, clean.logits, atol=1e-3 * max(1.0, float(clean.logits.abs().max())), rtol=1e-3):
        raise RuntimeError(f"{arch.model_type}: final norm + unembedding of the last block's output does not reproduce "
                           f"the model's logits (max diff {float((check - clean.logits).abs().max()):.3g}); "
                           f"ArchInfo.logits_from_hidden / final_norm needs fixing for this architecture")
    return clean


# ----------------------------------------------------------------------------- the three computations

class _Injection:
    """Forward hooks adding row r's vector V[r] at the last position of block `layers[r]`'s output; optionally the
    blocks 0..skip_through are not computed (their forward returns the cached clean residual stream)."""

    def __init__(self, arch: ArchInfo, layers: torch.Tensor, vectors: torch.Tensor,
                 skip_through: int | None = None, clean_resid: torch.Tensor | None = None):
        self.arch, self.layers, self.vectors = arch, layers, vectors
        self.skip_through, self.clean_resid = skip_through, clean_resid
        self._handles, self._patched = [], []

    def __enter__(self):
        blocks = self.arch.layers()
        rows = self.vectors.shape[0]
        for l in sorted(set(self.layers.tolist())):
            mask = (self.layers == l).to(self.vectors.device)
            delta = self.vectors * mask[:, None].to(self.vectors.dtype)

            def hook(module, args, output, delta=delta):
                h = _hidden(output).clone()
                h[:, -1] += delta.to(h.dtype)
                return _with_hidden(output, h)
            self._handles.append(blocks[l].register_forward_hook(hook))
        if self.skip_through is not None:
            for l in range(self.skip_through + 1):
                clean = self.clean_resid[l].reshape(1, 1, -1).expand(rows, 1, -1).contiguous()
                had = blocks[l].__dict__.get("forward")
                blocks[l].forward = (lambda *a, _c=clean, **k: _c)
                self._patched.append((blocks[l], had))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        for block, had in self._patched:
            if had is None:
                del block.forward
            else:
                block.forward = had
        self._handles, self._patched = [], []


@torch.inference_mode()
def total_logits_incremental(model, arch: ArchInfo, clean: CleanPass, prompt: int, layers: torch.Tensor,
                             vectors: torch.Tensor, skip_lower: bool = True) -> torch.Tensor:
    """Logits [B, V] (float32) of the last token with row r's V added after block layers[r]; the earlier positions
    come from the clean KV cache of `prompt`; blocks below the lowest injected layer are skipped when possible."""
    rows = vectors.shape[0]
    device = _device(model)
    skip = int(layers.min()) if (skip_lower and clean.block_returns_tensor) else None
    cache = _expand_cache(clean.caches[prompt], rows, keep_growth=False)
    ids = torch.full((rows, 1), clean.last_tokens[prompt], dtype=torch.long, device=device)
    with _Injection(arch, layers, vectors, skip, clean.resid[prompt]):
        out = model(input_ids=ids, past_key_values=cache, use_cache=cache is not None)
    return out.logits[:, -1].float()


@torch.inference_mode()
def total_logits_full(model, arch: ArchInfo, input_ids: torch.Tensor, layers: torch.Tensor,
                      vectors: torch.Tensor) -> torch.Tensor:
    """Reference: the WHOLE prompt through ALL layers, one batch row per injection (row r: V[r] added after block
    layers[r] at the last position). -> logits [B, V] float32 at the last position."""
    rows = vectors.shape[0]
    ids = input_ids.to(_device(model))[None].expand(rows, -1)
    with _Injection(arch, layers, vectors):
        out = model(input_ids=ids, logits_to_keep=1)
    return out.logits[:, -1].float()


@torch.inference_mode()
def frozen_logits(model, arch: ArchInfo, input_ids: torch.Tensor, layer: int, vectors: torch.Tensor) -> torch.Tensor:
    """Reference for the direct effect: V[r] added after block `layer` at the last position while every later
    layer's attention output projection and MLP down projection outputs are patched to their clean values there.
    -> logits [B, V] float32 at the last position (row order as `vectors`)."""
    device = _device(model)
    ids = input_ids.to(device)[None]
    later = range(layer + 1, arch.n_layers)
    sites = [m for l in later for m in (arch.attn_out(l), arch.mlp_down(l))]
    saved, handles = {}, []
    for i, m in enumerate(sites):
        handles.append(m.register_forward_hook(lambda mod, a, out, i=i: saved.__setitem__(i, out[:, -1].clone())))
    try:
        model(input_ids=ids, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    handles = []
    for i, m in enumerate(sites):
        def patch(mod, a, out, i=i):
            out = out.clone()
            out[:, -1] = saved[i]
            return out
        handles.append(m.register_forward_hook(patch))
    try:
        rows = vectors.shape[0]
        with _Injection(arch, torch.full((rows,), layer), vectors):
            out = model(input_ids=ids.expand(rows, -1), logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return out.logits[:, -1].float()


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


# ----------------------------------------------------------------------------- setup (all validation here)

def parse_shard(shard: str) -> tuple[int, int] | None:
    """"" -> None; "i/n" (1-based) -> (i, n)."""
    if shard in ("", None):
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(shard))
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise ValueError(f"shard must be '' (everything, or merge shards) or 'i/n' with 1 <= i <= n (got {shard!r}); "
                         f"in a SLURM array use shard=$SLURM_ARRAY_TASK_ID/<n> with --array=1-<n>")
    return int(m.group(1)), int(m.group(2))


def _token_id(tokenizer, arch: ArchInfo, value, what: str, prompt: int) -> int:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if not 0 <= int(value) < arch.vocab_size:
            raise ValueError(f"{what} id {value} of prompt {prompt} is outside the vocabulary (0..{arch.vocab_size - 1})")
        return int(value)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} of prompt {prompt} must be a non-empty string or a token id (got {value!r})")
    ids = tokenizer.encode(value, add_special_tokens=False)
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise ValueError(f"{what} {value!r} of prompt {prompt} tokenises to {len(ids)} tokens {pieces} (ids {ids}); a "
                         f"target must be ONE token (refused rather than guessing which one): choose a single-token "
                         f"string (mind the leading space, e.g. ' Paris' vs 'Paris') or give the token id")
    return int(ids[0])


@dataclass
class NeuronSetup:
    """Everything a run needs, validated; nothing has been written yet."""
    model: Any
    tokenizer: Any
    arch: ArchInfo
    out_dir: Path
    prompts: PromptSet
    clean: CleanPass
    neurons: list[Neuron]
    mode: str
    activation_scale: str
    target_ids: list[int]
    distractor_ids: list[int]
    target_source: str
    thresholds: tuple[float, float]
    batch_size: int
    topk: int
    shard: tuple[int, int] | None
    skip_lower: bool = True
    params: dict = field(default_factory=dict)

    @property
    def shard_dir(self) -> Path:
        return self.out_dir / SHARD_DIR

    def fingerprint(self) -> str:
        """Hash of everything that defines the numbers (not batch size, thresholds, shard)."""
        h = hashlib.sha256()
        h.update(json.dumps({
            "model": self.arch.source, "weights": self.arch.weights_id,
            "dtype": str(next(self.model.parameters()).dtype), "mode": self.mode, "scale": self.activation_scale,
            "targets": self.target_ids, "distractors": self.distractor_ids, "topk": self.topk,
            "neurons": [n.id for n in self.neurons]}, sort_keys=True).encode())
        for ids in self.prompts.input_ids:
            h.update(ids.numpy().astype(np.int64).tobytes() + b"|")
        return h.hexdigest()[:16]

    def shard_neurons(self, shard: tuple[int, int] | None) -> list[Neuron]:
        """Round-robin split (balances layers, hence cost): shard i of n takes neurons[i-1::n]."""
        return list(self.neurons) if shard is None else self.neurons[shard[0] - 1::shard[1]]

    def prompt_table(self) -> pd.DataFrame:
        tok = self.tokenizer
        return pd.DataFrame({
            "prompt_id": self.prompts.prompt_ids, "category": self.prompts.categories,
            "n_tokens": [len(i) for i in self.prompts.input_ids], "text": self.prompts.texts,
            "target": [repr(tok.decode([t])) for t in self.target_ids],
            "distractor": [repr(tok.decode([t])) for t in self.distractor_ids],
            "clean_target_prob": torch.softmax(self.clean.logits, -1)[
                torch.arange(len(self.target_ids)), torch.tensor(self.target_ids)].cpu().numpy().round(4)})

    def neuron_table(self) -> pd.DataFrame:
        counts = pd.Series([n.layer for n in self.neurons]).value_counts().sort_index()
        return pd.DataFrame({"layer": counts.index, "n_neurons": counts.values})


def prepare(model, tokenizer, arch: ArchInfo, *, out_dir: str | Path = "outputs/dev", n_prompts: int = 4,
            neurons: list | None = None, neurons_file: str = "", selector: str = "top_activation",
            n_neurons: int = 32, layers: list | None = None, mode: str = "add", activation_scale: str = "actual",
            targets: list | None = None, thresholds=(0.3, 0.7), batch_size: int = 256, topk: int = 5,
            shard: str = "", seed: int = 0, chat_template: bool = True, skip_lower: bool = True,
            progress: bool = True) -> NeuronSetup:
    """Validate every parameter, load the prompts, run the clean pass, resolve the neuron set and the targets.
    Raises ValueError (one clear message) on bad input; writes nothing."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use 'add' (add V) or 'ablate' (subtract V: the neuron zeroed)")
    if activation_scale not in SCALES:
        raise ValueError(f"unknown activation_scale {activation_scale!r}; use one of {list(SCALES)}")
    if (not isinstance(thresholds, (list, tuple)) or len(thresholds) != 2
            or not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in thresholds)
            or not 0 <= float(thresholds[0]) <= float(thresholds[1]) <= 1):
        raise ValueError(f"thresholds must be [low, high] with 0 <= low <= high <= 1 (got {thresholds!r}); default [0.3, 0.7]")
    for name, value in (("batch_size", batch_size), ("topk", topk)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer (got {value!r})")
    shard_t = parse_shard(shard)
    check_mlp_site(arch)
    if neurons is not None and neurons_file:
        raise ValueError("give either neurons (an explicit list) or neurons_file, not both")
    explicit = None
    if neurons is not None:
        explicit = validate_neurons(arch, neurons, "the neurons parameter")
    elif neurons_file:
        explicit = validate_neurons(arch, read_neuron_file(neurons_file), f"neurons_file {neurons_file}")
    elif selector not in SELECTORS:
        raise ValueError(f"unknown neuron selector {selector!r}; use one of {list(SELECTORS)}")
    else:                                # validate n_neurons and layers before the (slower) clean pass
        select_neurons(arch, "random", n_neurons, layers, seed=seed)
    prompts = load_prompts(out_dir, tokenizer, arch, n_prompts, chat_template)
    if targets is not None:
        if not isinstance(targets, (list, tuple)) or len(targets) != len(prompts):
            raise ValueError(f"targets must be None (clean top prediction) or a list of {len(prompts)} entries "
                             f"{{target, distractor}}, one per prompt (got {targets!r:.200})")
        pairs = []
        for p, entry in enumerate(targets):
            if isinstance(entry, dict):
                if "target" not in entry:
                    raise ValueError(f"targets[{p}] has no 'target' key: {entry!r}")
                t = _token_id(tokenizer, arch, entry["target"], "target", p)
                d = entry.get("distractor")
                d = None if d is None else _token_id(tokenizer, arch, d, "distractor", p)
                if d == t:
                    raise ValueError(f"targets[{p}]: the distractor is the target itself ({entry!r}); give another "
                                     f"distractor or leave it out (then the clean top prediction is used)")
                pairs.append((t, d))
            else:
                pairs.append((_token_id(tokenizer, arch, entry, "target", p), None))
    clean = clean_pass(model, arch, prompts, progress=progress)
    top2 = clean.logits.topk(2, dim=-1).indices.tolist()
    if targets is None:
        target_ids, distractor_ids, source = [t[0] for t in top2], [t[1] for t in top2], "clean top prediction"
    else:
        target_ids = [t for t, _ in pairs]
        distractor_ids = [d if d is not None else (top[0] if top[0] != t else top[1])
                          for (t, d), top in zip(pairs, top2)]
        source = "params targets"
    if explicit is None:
        explicit = select_neurons(arch, selector, n_neurons, layers, clean.acts, seed)
    params = dict(out_dir=str(out_dir), model=arch.source, n_prompts=n_prompts, neurons=neurons,
                  neurons_file=neurons_file, selector=selector, n_neurons=n_neurons, layers=layers, mode=mode,
                  activation_scale=activation_scale, targets=targets, thresholds=list(thresholds),
                  batch_size=batch_size, topk=topk, shard=shard, seed=seed, chat_template=chat_template,
                  prompt_source=prompts.source)
    return NeuronSetup(model, tokenizer, arch, Path(out_dir), prompts, clean, explicit, mode, activation_scale,
                       target_ids, distractor_ids, source, (float(thresholds[0]), float(thresholds[1])),
                       batch_size, topk, shard_t, skip_lower, params)


# ----------------------------------------------------------------------------- computation (resumable)

def _plan(setup: NeuronSetup, neurons: list[Neuron]) -> list[tuple[int, int, int]]:
    """Batches (prompt, start, stop) over `neurons` (sorted by layer, so a batch mostly shares its layer)."""
    rows = setup.batch_size - 1                 # one row per batch is the clean reference
    rows = max(rows, 1)
    return [(p, s, min(s + rows, len(neurons))) for p in range(len(setup.prompts))
            for s in range(0, len(neurons), rows)]


def compute_batch(setup: NeuronSetup, neurons: list[Neuron], prompt: int,
                  directions: torch.Tensor | None = None) -> pd.DataFrame:
    """Direct, total and indirect effects of `neurons` on prompt `prompt`: one incremental forward (plus a clean
    reference row in the same batch, so a zero V gives an effect at rounding level, < 1e-6) and one matrix step."""
    arch, clean = setup.arch, setup.clean
    dirs = neuron_directions(arch, neurons) if directions is None else directions
    actual, scale = neuron_scales(clean, neurons, setup.activation_scale)
    sign = 1.0 if setup.mode == "add" else -1.0
    a = scale[:, prompt].to(dirs.dtype)
    vectors = sign * dirs * a[:, None]                                                  # [N, H]
    layers = torch.tensor([n.layer for n in neurons])
    vec_b = torch.cat([torch.zeros_like(vectors[:1]), vectors])
    lay_b = torch.cat([layers.min()[None], layers])
    total = total_logits_incremental(setup.model, arch, clean, prompt, lay_b, vec_b, setup.skip_lower)
    direct = direct_logits(arch, clean.h_final[prompt], vec_b)
    t, d = setup.target_ids[prompt], setup.distractor_ids[prompt]
    m = _batch_rows(total[1:], direct[1:], total[0], direct[0], t, d, setup.topk)
    clean_probs = torch.softmax(total[0], -1)
    frame = pd.DataFrame({
        "neuron_id": [n.id for n in neurons], "layer": layers.numpy(), "neuron": [n.neuron for n in neurons],
        "prompt": prompt, "prompt_id": setup.prompts.prompt_ids[prompt], "target_id": t, "distractor_id": d,
        "activation": actual[:, prompt].double().cpu().numpy(), "scale": scale[:, prompt].double().cpu().numpy(),
        "v_norm": vectors.float().norm(dim=-1).double().cpu().numpy(),
        "clean_target_logit": float(total[0, t]), "clean_target_prob": float(clean_probs[t]), **m})
    frame["direct_ratio"] = direct_ratio(frame["direct"], frame["indirect"], frame["total"])
    frame["aligned"] = (frame["direct"] * frame["indirect"]) > 0
    return frame


def read_effects_csv(path: str | Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={c: str for c in _LIST_COLUMNS}, keep_default_na=False,
                       na_values={"direct": [""], "total": [""]})


def compute_effects(setup: NeuronSetup, neurons: list[Neuron], parts_dir: Path | None = None,
                    progress: bool = True, desc: str = "neuron effects") -> pd.DataFrame:
    """All (neuron, prompt) rows for `neurons`, batch by batch; with parts_dir every finished batch is saved there
    (batch-<k>.csv, next to plan.json holding the fingerprint) and a rerun resumes from them."""
    plan = _plan(setup, neurons)
    dirs = neuron_directions(setup.arch, neurons)
    fingerprint = setup.fingerprint()
    if parts_dir is not None:
        plan_file = parts_dir / "plan.json"
        expect = {"fingerprint": fingerprint, "neurons": [n.id for n in neurons], "plan": plan}
        if plan_file.exists() and json.loads(plan_file.read_text()) != json.loads(json.dumps(expect)):
            print(f"[neurons] {parts_dir} holds checkpoints of different parameters: discarding them")
            shutil.rmtree(parts_dir)
        parts_dir.mkdir(parents=True, exist_ok=True)
        if not plan_file.exists():
            save_json(plan_file, expect)
    frames = []
    done = 0
    for k, (p, s, e) in enumerate(tqdm(plan, desc=desc, unit="batch", disable=not progress)):
        part = parts_dir / f"batch-{k:05d}.csv" if parts_dir is not None else None
        if part is not None and part.exists():
            frames.append(read_effects_csv(part))
            done += 1
            continue
        frame = compute_batch(setup, neurons[s:e], p, dirs[s:e])
        if part is not None:
            save_csv(part, frame)
        frames.append(frame)
    if done and progress:
        print(f"[neurons] resumed: {done} of {len(plan)} batches were already done")
    effects = pd.concat(frames, ignore_index=True)
    return effects.sort_values(["layer", "neuron", "prompt"], kind="stable").reset_index(drop=True)


# ----------------------------------------------------------------------------- summaries

def summarize_neurons(effects: pd.DataFrame, thresholds=(0.3, 0.7)) -> list[dict]:
    """One entry per neuron (see module docstring); classification from the mean direct_ratio over prompts,
    consistency = fraction of prompts whose own class agrees; reading 'reinforcing' when direct and indirect have
    the same sign on at least half of the prompts, else 'opposing'."""
    out = []
    for (layer, neuron), g in effects.groupby(["layer", "neuron"], sort=True):
        ratio = g["direct_ratio"].to_numpy(float)
        mean_ratio = float(ratio.mean())
        cls = str(classify(mean_ratio, thresholds))
        per_class = classify(ratio, thresholds)
        aligned = g["aligned"].to_numpy(bool)
        tokens: dict[int, list[float]] = {}
        for ids, effs in zip(g["top_total_ids"], g["top_total_effects"]):
            for i, e in zip(str(ids).split(), str(effs).split()):
                tokens.setdefault(int(i), []).append(float(e))
        top = sorted(tokens.items(), key=lambda kv: (-len(kv[1]), -abs(np.mean(kv[1]))))[:10]
        out.append({
            "id": f"L{int(layer)}/N{int(neuron)}", "layer": int(layer), "neuron": int(neuron), "n_prompts": len(g),
            "effect_summary": {
                "direct_ratio_mean": mean_ratio, "direct_ratio_std": float(ratio.std()),
                "direct_ratio_median": float(np.median(ratio)), "classification": cls,
                "consistency": float((per_class == cls).mean()),
                "mean_direct": float(g["direct"].mean()), "mean_indirect": float(g["indirect"].mean()),
                "mean_total": float(g["total"].mean()), "mean_abs_direct": float(g["direct"].abs().mean()),
                "mean_abs_indirect": float(g["indirect"].abs().mean()),
                "mean_abs_total": float(g["total"].abs().mean()), "mean_diff_total": float(g["diff_total"].mean()),
                "mean_dprob_total": float(g["dprob_total"].mean()), "mean_activation": float(g["activation"].mean()),
                "top_tokens": [{"id": i, "n_prompts": len(v), "mean_effect": float(np.mean(v))} for i, v in top]},
            "sign_alignment": {"aligned_fraction": float(aligned.mean()), "n_aligned": int(aligned.sum()),
                               "reading": "reinforcing" if aligned.mean() >= 0.5 else "opposing"},
            "per_prompt_breakdown": [
                {"prompt": int(r.prompt), "prompt_id": int(r.prompt_id), "target_id": int(r.target_id),
                 "direct": float(r.direct), "indirect": float(r.indirect), "total": float(r.total),
                 "diff_total": float(r.diff_total), "dprob_total": float(r.dprob_total),
                 "direct_ratio": float(r.direct_ratio), "class": str(c), "aligned": bool(r.aligned)}
                for r, c in zip(g.itertuples(), per_class)]})
    return out


def summaries_frame(summaries: list[dict]) -> pd.DataFrame:
    """One row per neuron with the scalar summary fields (for tables and figures)."""
    rows = []
    for s in summaries:
        e = {k: v for k, v in s["effect_summary"].items() if k != "top_tokens"}
        rows.append({"id": s["id"], "layer": s["layer"], "neuron": s["neuron"], "n_prompts": s["n_prompts"], **e,
                     "aligned_fraction": s["sign_alignment"]["aligned_fraction"],
                     "reading": s["sign_alignment"]["reading"]})
    return pd.DataFrame(rows)


def layer_summary(summaries: list[dict], n_layers: int) -> pd.DataFrame:
    """Per layer: class counts and fractions, mean / median direct_ratio, mean |effects|, aligned fraction."""
    frame = summaries_frame(summaries)
    rows = []
    for l in range(n_layers):
        g = frame[frame["layer"] == l] if len(frame) else frame
        row = {"layer": l, "n_neurons": len(g)}
        for c in CLASSES:
            k = int((g["classification"] == c).sum()) if len(g) else 0
            row[f"n_{c}"] = k
            row[f"frac_{c}"] = k / len(g) if len(g) else np.nan
        for col in ("direct_ratio_mean", "mean_abs_direct", "mean_abs_indirect", "mean_abs_total", "aligned_fraction"):
            row[col if col != "direct_ratio_mean" else "mean_direct_ratio"] = float(g[col].mean()) if len(g) else np.nan
        row["median_direct_ratio"] = float(g["direct_ratio_mean"].median()) if len(g) else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def layer_trend(summaries: list[dict], n_layers: int) -> dict:
    """Does 'early layers routing-dominant, late layers logit-dominant' hold? Two readings:
    trend_holds: the neurons' mean direct_ratio rises with the layer (Spearman rho > 0, p < 0.05) and the first third
    of the layers has a lower mean ratio than the last third; classes_hold (the strong claim): the most common class
    in the first third of the layers is routing-dominant AND in the last third logit-dominant."""
    from scipy.stats import spearmanr
    frame = summaries_frame(summaries)
    third = max(1, n_layers // 3)
    early = frame[frame["layer"] < third]
    late = frame[frame["layer"] >= n_layers - third]
    rho, p = (spearmanr(frame["layer"], frame["direct_ratio_mean"]) if frame["layer"].nunique() > 1
              else (np.nan, np.nan))
    major = lambda g: g["classification"].value_counts().idxmax() if len(g) else "none"
    e_mean = float(early["direct_ratio_mean"].mean()) if len(early) else np.nan
    l_mean = float(late["direct_ratio_mean"].mean()) if len(late) else np.nan
    return {"spearman_rho_layer_vs_direct_ratio": float(rho), "p_value": float(p), "n_neurons": len(frame),
            f"mean_direct_ratio_layers_0-{third - 1}": e_mean,
            f"mean_direct_ratio_layers_{n_layers - third}-{n_layers - 1}": l_mean,
            f"most_common_class_layers_0-{third - 1}": major(early),
            f"most_common_class_layers_{n_layers - third}-{n_layers - 1}": major(late),
            "trend_holds": bool(np.isfinite(rho) and rho > 0 and p < 0.05 and e_mean < l_mean),
            "classes_hold": bool(major(early) == CLASSES[0] and major(late) == CLASSES[2])}


def top_neurons(summaries: list[dict], tokenizer, k: int = 10) -> pd.DataFrame:
    """The k neurons with the largest mean |total| target-logit effect, with their most affected tokens decoded."""
    frame = summaries_frame(summaries).sort_values("mean_abs_total", ascending=False).head(k)
    by_id = {s["id"]: s for s in summaries}
    frame["top_tokens"] = [", ".join(f"{tokenizer.decode([t['id']])!r} ({t['mean_effect']:+.3g})"
                                     for t in by_id[i]["effect_summary"]["top_tokens"][:5]) for i in frame["id"]]
    cols = ["id", "layer", "mean_total", "mean_direct", "mean_indirect", "mean_abs_total", "direct_ratio_mean",
            "classification", "consistency", "reading", "top_tokens"]
    return frame[cols].reset_index(drop=True)


# ----------------------------------------------------------------------------- run: shards, merge, artifacts

@dataclass
class NeuronResult:
    complete: bool                       # False for a shard run (only its shard file was written)
    effects: pd.DataFrame | None = None
    summaries: list | None = None
    layers: pd.DataFrame | None = None
    paths: dict = field(default_factory=dict)
    seconds: float = 0.0
    message: str = ""

    def summary_table(self) -> pd.DataFrame:
        return summaries_frame(self.summaries) if self.summaries is not None else pd.DataFrame()


def _shard_name(i: int, n: int) -> str:
    return f"shard-{i}-of-{n}"


def _existing_shards(shard_dir: Path) -> dict[tuple[int, int], dict]:
    metas = {}
    for path in sorted(shard_dir.glob("shard-*-of-*.json")):
        m = re.fullmatch(r"shard-(\d+)-of-(\d+)\.json", path.name)
        if m:
            metas[(int(m.group(1)), int(m.group(2)))] = json.loads(path.read_text())
    return metas


def _merge_shards(setup: NeuronSetup, metas: dict) -> pd.DataFrame:
    counts = sorted({n for _, n in metas})
    where = setup.shard_dir
    if len(counts) > 1:
        raise ArtifactError(f"{where} holds shards of different splits (of {counts}); keep one complete set "
                            f"(delete the others) or delete the folder to compute everything in this run")
    n = counts[0]
    fp = setup.fingerprint()
    wrong = sorted(i for (i, _), meta in metas.items() if meta.get("fingerprint") != fp)
    if wrong:
        raise ArtifactError(f"shards {wrong} of {n} in {where} were computed with different parameters (model, prompts, "
                            f"neuron set, mode, activation_scale or targets) than this run: rerun all {n} shards with "
                            f"these parameters, or delete {where} to compute everything in this run")
    missing = [i for i in range(1, n + 1) if (i, n) not in metas]
    if missing:
        raise ArtifactError(f"incomplete shard set in {where}: shards {missing} of {n} are missing; rerun them "
                            f"(--set shard=<i>/{n} for i in {missing}, e.g. sbatch --array="
                            f"{','.join(map(str, missing))} ...), then rerun this merge with shard ''")
    frames = [read_effects_csv(where / f"{_shard_name(i, n)}.csv") for i in range(1, n + 1)
              if metas[(i, n)].get("n_rows", 1) > 0]                 # more shards than neurons: empty shards
    effects = pd.concat(frames, ignore_index=True)
    expected = len(setup.neurons) * len(setup.prompts)
    if len(effects) != expected:
        raise ArtifactError(f"the {n} shards in {where} hold {len(effects)} rows, expected {expected}: rerun the shards")
    return effects.sort_values(["layer", "neuron", "prompt"], kind="stable").reset_index(drop=True)


def run(setup: NeuronSetup, progress: bool = True) -> NeuronResult:
    """Shard run: compute this shard's neurons (resumable), write <out_dir>/neuron_effects_shards/shard-i-of-n.{csv,json}
    and stop. Otherwise: merge the shard files when present (refusing incomplete or mismatched sets), else compute
    everything (resumable); then write neuron_effects.csv, neuron_summaries.json and layer_summary.csv."""
    t0 = time.perf_counter()
    from lib.store import ensure_writable_dir
    ensure_writable_dir(setup.out_dir)
    if setup.shard is not None:
        i, n = setup.shard
        mine = setup.shard_neurons(setup.shard)
        base = setup.shard_dir / _shard_name(i, n)
        if not mine:
            effects = pd.DataFrame()
        else:
            effects = compute_effects(setup, mine, setup.shard_dir / f"{_shard_name(i, n)}.parts", progress,
                                      desc=f"shard {i}/{n}")
        save_csv(base.with_suffix(".csv"), effects)
        save_json(base.with_suffix(".json"), {"fingerprint": setup.fingerprint(), "shard": f"{i}/{n}",
                                              "n_neurons_total": len(setup.neurons),
                                              "neurons": [x.id for x in mine], "n_rows": len(effects),
                                              "seconds": time.perf_counter() - t0, "params": setup.params})
        shutil.rmtree(setup.shard_dir / f"{_shard_name(i, n)}.parts", ignore_errors=True)
        return NeuronResult(False, effects=effects, paths={"shard": base.with_suffix(".csv")},
                            seconds=time.perf_counter() - t0,
                            message=f"shard {i}/{n}: {len(mine)} neurons x {len(setup.prompts)} prompts written to "
                                    f"{base.with_suffix('.csv')}; run again with shard '' to merge")
    metas = _existing_shards(setup.shard_dir) if setup.shard_dir.exists() else {}
    if metas:
        effects = _merge_shards(setup, metas)
        how = f"merged {len(metas)} shards"
    else:
        parts = setup.shard_dir / "full.parts"
        effects = compute_effects(setup, setup.neurons, parts, progress)
        how = "computed"
    effects["prompt_class"] = classify(effects["direct_ratio"], setup.thresholds)
    summaries = summarize_neurons(effects, setup.thresholds)
    layers = layer_summary(summaries, setup.arch.n_layers)
    paths = {"effects": save_csv(setup.out_dir / EFFECTS_FILE, effects),
             "summaries": save_json(setup.out_dir / SUMMARIES_FILE, summaries),
             "layers": save_csv(setup.out_dir / LAYERS_FILE, layers)}
    if not metas:
        shutil.rmtree(setup.shard_dir / "full.parts", ignore_errors=True)
        with contextlib.suppress(OSError):
            setup.shard_dir.rmdir()
    return NeuronResult(True, effects, summaries, layers, paths, time.perf_counter() - t0,
                        f"{how}: {len(setup.neurons)} neurons x {len(setup.prompts)} prompts")


# ----------------------------------------------------------------------------- live verification

def verify(setup: NeuronSetup, n_neurons: int = 4, n_prompts: int = 2) -> pd.DataFrame:
    """Check table on a few neurons (spread over the layers) and prompts: fast batched last-position total effects
    vs whole-prompt forwards (one per neuron, injection by hook), and the algebraic direct effect vs an explicit
    frozen-downstream run; max |difference| over the whole vocabulary."""
    arch, clean, model = setup.arch, setup.clean, setup.model
    pick = np.unique(np.linspace(0, len(setup.neurons) - 1, min(n_neurons, len(setup.neurons))).round().astype(int))
    neurons = [setup.neurons[i] for i in pick]
    dirs = neuron_directions(arch, neurons)
    _, scale = neuron_scales(clean, neurons, setup.activation_scale)
    sign = 1.0 if setup.mode == "add" else -1.0
    layers = torch.tensor([n.layer for n in neurons])
    rows = []
    for p in range(min(n_prompts, len(setup.prompts))):
        vec = sign * dirs * scale[:, p].to(dirs.dtype)[:, None]
        vec_b = torch.cat([torch.zeros_like(vec[:1]), vec])
        fast = total_logits_incremental(model, arch, clean, p, torch.cat([layers.min()[None], layers]), vec_b,
                                        setup.skip_lower)
        fast_eff = fast[1:] - fast[0]
        alg = direct_logits(arch, clean.h_final[p], vec_b)
        alg_eff = alg[1:] - alg[0]
        ids = setup.prompts.input_ids[p]
        for j, nrn in enumerate(neurons):
            full = total_logits_full(model, arch, ids, torch.tensor([nrn.layer, nrn.layer]),
                                     torch.stack([torch.zeros_like(vec[j]), vec[j]]))
            frozen = frozen_logits(model, arch, ids, nrn.layer, torch.stack([torch.zeros_like(vec[j]), vec[j]]))
            full_eff, frozen_eff = full[1] - full[0], frozen[1] - frozen[0]
            rows.append({"neuron": nrn.id, "prompt": p, "max_abs_total_effect": float(full_eff.abs().max()),
                         "batched_vs_full_max_abs_diff": float((fast_eff[j] - full_eff).abs().max()),
                         "max_abs_direct_effect": float(frozen_eff.abs().max()),
                         "algebraic_vs_frozen_max_abs_diff": float((alg_eff[j] - frozen_eff).abs().max())})
    frame = pd.DataFrame(rows)
    tol = 1e-4 if next(model.parameters()).dtype == torch.float32 else 5e-2
    frame["ok"] = (frame["batched_vs_full_max_abs_diff"] <= tol) & (frame["algebraic_vs_frozen_max_abs_diff"] <= tol)
    return frame
