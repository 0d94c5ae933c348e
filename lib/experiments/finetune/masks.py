"""Which weights a head-restricted fine-tuning may move, and an optimiser that moves nothing else.

A head's trainable slice is its query-projection rows, its output-projection columns and, by the GQA policy `kv`,
the key/value rows of its KV head:
    kv="any"       a KV head is trainable when ANY of the query heads that share it is selected (on SmolLM2, 3 query
                   heads per KV head: 71-77 of the 90 KV heads are trained by EVERY half of the heads, so the
                   conditions share most of their K/V weights)
    kv="all"       only when ALL of them are selected
    kv="majority"  only when MORE THAN HALF of them are selected (2 of 3 on SmolLM2): each KV head goes to the
                   condition that holds most of its query heads, so two complementary selections (synergistic and
                   redundant halves) never share a KV head. The main job's setting: on SmolLM2 (rankings of a
                   small 01-04 run) synergistic shares 0 KV heads with redundant (57 of 90 under "any") and a
                   weight Jaccard of 0.34-0.36 with the random halves (0.45-0.48 under "any"), as much as their
                   query heads overlap; the cost: conditions train slightly different numbers of KV heads (42-48)
    kv="none"      K and V stay frozen: a condition trains only the Q rows and O columns of its own query heads
                   (every condition trains the same number of weights)
Head slices come from ArchInfo.block_param_slices (Q/K/V/O per head), never from module names here.
Biases, norms, MLPs and embeddings stay frozen.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lib.model.architectures import ArchInfo

__all__ = ["KV_POLICIES", "kv_heads_selected", "head_masks", "MaskedAdamW", "selected_units", "weight_deltas",
           "overlap"]

KV_POLICIES = ("any", "all", "majority", "none")
BLOCKS = ("Q", "K", "V", "O")


@dataclass
class HeadMask:
    """One weight tensor and the boolean mask [same shape] of its entries that may change."""
    param: torch.nn.Parameter
    mask: torch.Tensor
    layer: int


def kv_heads_selected(arch: ArchInfo, query_heads: list[int], kv: str) -> list[int]:
    """KV heads (within one layer) that are trainable for the selected query heads of that layer."""
    if kv not in KV_POLICIES:
        raise ValueError(f"kv policy must be one of {list(KV_POLICIES)} (how K/V heads shared by several query heads "
                         f"under grouped-query attention are treated); got {kv!r}")
    group = arch.n_heads // arch.n_kv_heads
    chosen = set(query_heads)
    members = {g: set(range(g * group, (g + 1) * group)) for g in range(arch.n_kv_heads)}
    if kv == "none":
        return []
    tests = {"any": lambda m: bool(m & chosen), "all": lambda m: m <= chosen,
             "majority": lambda m: 2 * len(m & chosen) > len(m)}
    test = tests[kv]
    return [g for g, m in members.items() if test(m)]


def head_masks(arch: ArchInfo, heads: list[int], kv: str = "any") -> list[HeadMask]:
    """Masks over the attention weight tensors of every layer for the selected heads (layer-major indices).
    Tensors shared by Q, K and V (fused layouts) get one combined mask."""
    bad = [h for h in heads if not 0 <= int(h) < arch.total_heads]
    if bad:
        raise ValueError(f"head indices {bad[:5]} out of range [0, {arch.total_heads}) for this model")
    by_param: dict[int, HeadMask] = {}
    for layer in range(arch.n_layers):
        local = sorted(int(h) - layer * arch.n_heads for h in heads if int(h) // arch.n_heads == layer)
        slices = arch.block_param_slices(layer)
        units = {"Q": local, "O": local, "K": kv_heads_selected(arch, local, kv)}
        units["V"] = units["K"]
        for block in BLOCKS:
            weight, index = slices[block]
            entry = by_param.setdefault(id(weight), HeadMask(weight, torch.zeros_like(weight, dtype=torch.bool), layer))
            for h in units[block]:
                entry.mask[index(h)] = True
    return list(by_param.values())


class MaskedAdamW(torch.optim.AdamW):
    """AdamW over the masked tensors only: gradients are zeroed outside the masks before every step, and the
    entries outside the masks are put back to their values at construction after every step (so weight decay or
    any numerical path cannot move them: they stay bit-identical)."""

    def __init__(self, masks: list[HeadMask], lr: float, weight_decay: float = 0.0, **kwargs):
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr must be a positive number (learning rate of AdamW, e.g. 1.0e-4); got {lr!r}")
        self.masks = [m for m in masks if bool(m.mask.any())]
        self.frozen = [m.param.detach().clone() for m in self.masks]
        for m in self.masks:
            m.param.requires_grad_(True)
        params = [m.param for m in self.masks] or [torch.nn.Parameter(torch.zeros(1))]
        super().__init__(params, lr=lr, weight_decay=weight_decay, **kwargs)

    @torch.no_grad()
    def step(self, closure=None):
        for m in self.masks:
            if m.param.grad is not None:
                m.param.grad.mul_(m.mask)
        loss = super().step(closure)
        for m, frozen in zip(self.masks, self.frozen):
            m.param.copy_(torch.where(m.mask, m.param, frozen))
        return loss

    def state_bytes(self) -> int:
        """Bytes held by the optimiser state (exp_avg, exp_avg_sq, step)."""
        return sum(t.numel() * t.element_size() for s in self.state.values() for t in s.values()
                   if torch.is_tensor(t))

    def release(self) -> None:
        """Freeze the tensors again (requires_grad False), as load_model leaves every weight."""
        for m in self.masks:
            m.param.requires_grad_(False)
            m.param.grad = None


def selected_units(arch: ArchInfo, heads: list[int], kv: str) -> set[tuple[int, int, str]]:
    """(layer, head, block) of every trainable slice: query heads for Q/O, KV heads for K/V."""
    out = set()
    for layer in range(arch.n_layers):
        local = [int(h) - layer * arch.n_heads for h in heads if int(h) // arch.n_heads == layer]
        out |= {(layer, h, b) for h in local for b in ("Q", "O")}
        out |= {(layer, g, b) for g in kv_heads_selected(arch, local, kv) for b in ("K", "V")}
    return out


def weight_deltas(arch: ArchInfo, before: dict[int, torch.Tensor]) -> list[dict]:
    """Frobenius norm of the change of every head's Q, K, V, O slice against `before` (id(param) -> original).
    Rows: layer, head (query head for Q/O, KV head for K/V), block, delta_norm."""
    rows = []
    for layer in range(arch.n_layers):
        for block, (weight, index) in arch.block_param_slices(layer).items():
            if id(weight) not in before:
                continue
            n_units = arch.n_kv_heads if block in ("K", "V") else arch.n_heads
            for h in range(n_units):
                diff = (weight.detach()[index(h)].float() - before[id(weight)][index(h)].float())
                rows.append({"layer": layer, "head": h, "block": block,
                             "delta_norm": float(torch.linalg.vector_norm(diff))})
    return rows


def trained_sets(layout, heads: list[int], kv: str) -> tuple[set, set]:
    """(query heads, KV heads) a condition trains: query heads as global indices (layer-major), KV heads as
    (layer, KV head). layout: anything with n_layers, n_heads, n_kv_heads (an ArchInfo)."""
    units = selected_units(layout, heads, kv)
    query = {layer * layout.n_heads + h for layer, h, b in units if b == "Q"}
    return query, {(layer, g) for layer, g, b in units if b == "K"}


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else float("nan")


def overlap(layout, heads_a: list[int], heads_b: list[int], kv: str) -> dict:
    """How much two conditions train the same weights under the GQA policy kv. A query slice (Q rows + O columns)
    and a KV slice (K rows + V rows) both hold 2 x head_dim x hidden weights, so the weight overlap counts slices:
    param_jaccard = (shared query + shared KV) / (union query + union KV). Jaccard is NaN for two empty sets."""
    qa, ka = trained_sets(layout, heads_a, kv)
    qb, kb = trained_sets(layout, heads_b, kv)
    union = len(qa | qb) + len(ka | kb)
    return {"kv": kv, "query_a": len(qa), "query_b": len(qb), "query_shared": len(qa & qb),
            "query_jaccard": _jaccard(qa, qb), "kv_a": len(ka), "kv_b": len(kb), "kv_shared": len(ka & kb),
            "kv_jaccard": _jaccard(ka, kb),
            "param_jaccard": (len(qa & qb) + len(ka & kb)) / union if union else float("nan")}
