"""An independent attention implementation for tests: softmax(Q K^T * scale + mask) V per head, written out by
hand and plugged into transformers' attention interface, so the project's hook can be compared with it."""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

NAME = "manual_for_tests"
captured: dict[int, list[torch.Tensor]] = {}     # id(attention module) -> per-call head outputs [b, heads, s, d]


def manual_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [b, hq, s, d], key/value [b, hkv, s_k, d] (GQA: each KV head serves hq/hkv query heads)."""
    repeats = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(repeats, dim=1)
    value = value.repeat_interleave(repeats, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    if kwargs.get("softcap"):
        scores = torch.tanh(scores / kwargs["softcap"]) * kwargs["softcap"]
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    heads = torch.matmul(torch.softmax(scores.float(), dim=-1).to(value.dtype), value)
    captured.setdefault(id(module), []).append(heads.detach())
    return heads.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, manual_attention)
AttentionMaskInterface.register(NAME, eager_mask)
