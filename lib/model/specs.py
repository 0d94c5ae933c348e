"""A random:<arch>[:<L>x<H>[kv<K>]] model spec read without torch (the runner checks params files with it; building
the model is lib.model.loading's): the tiny architectures, the layout's parse, and the config keywords it sets."""
from __future__ import annotations

import re

from lib.model.checksums import ModelSpecError

__all__ = ["CLUSTER_ARCHS", "LAYOUT_HEAD_DIM", "RANDOM_ARCHS", "layout_overrides", "parse_random_spec"]

RANDOM_ARCHS = ("gpt_neox", "llama", "qwen2", "qwen3", "gemma3", "gpt2")
# tiny versions of the cluster examples' layouts: google/gemma-3-4b-it as it loads (Gemma3ForConditionalGeneration,
# text decoder under model.language_model), Gemma 2 (attention and final logit soft-capping), Mistral (sliding window)
CLUSTER_ARCHS = ("gemma3_multimodal", "gemma2", "mistral")


def parse_random_spec(spec: str) -> tuple[str, tuple[int, int, int] | None]:
    """'random:<arch>[:<L>x<H>[kv<K>]]' -> (arch, (layers, query heads, KV heads) or None for the default tiny
    layout). KV heads default to H (no GQA). ModelSpecError naming the form when the layout does not parse."""
    body = spec.split(":", 1)[1] if spec.startswith("random:") else spec
    arch, _, shape = body.partition(":")
    if not shape:
        return arch, None
    m = _LAYOUT.fullmatch(shape)
    if m is None or int(m[1]) < 1 or int(m[2]) < 1 or (m[3] and not 1 <= int(m[3]) <= int(m[2])) \
            or (m[3] and int(m[2]) % int(m[3])):
        raise ModelSpecError(f"random:{arch}:{shape}: the layout must be <layers>x<heads>[kv<kv heads>] with KV heads "
                             f"dividing the heads, e.g. random:qwen3:36x32kv8")
    return arch, (int(m[1]), int(m[2]), int(m[3] or m[2]))


_LAYOUT = re.compile(r"(\d+)x(\d+)(?:kv(\d+))?")
LAYOUT_HEAD_DIM = 8           # head_dim of a random:<arch>:<L>x<H> model (RoPE needs an even size; 8 keeps 2 rotary
                              # dimensions under GPT-NeoX's rotary_pct 0.25)


def layout_overrides(arch: str, layout: tuple[int, int, int] | None) -> dict:
    """Config keywords that give a tiny config the layout (layers, heads, KV heads) with LAYOUT_HEAD_DIM-wide heads:
    hidden size = heads x head_dim where the architecture ties them (GPT-NeoX, GPT-2, Llama, Mistral), else 64."""
    if layout is None:
        return {}
    layers, heads, kv = layout
    if arch == "gpt2":
        if kv != heads:
            raise ModelSpecError(f"random:gpt2 has no grouped KV heads; give kv{heads} or leave it out")
        return dict(n_layer=layers, n_head=heads, n_embd=heads * LAYOUT_HEAD_DIM)
    if arch == "gpt_neox" and kv != heads:
        raise ModelSpecError(f"random:gpt_neox has no grouped KV heads; give kv{heads} or leave it out")
    tied = arch in ("gpt_neox", "llama", "mistral")
    hidden = heads * LAYOUT_HEAD_DIM if tied else 64
    out = dict(num_hidden_layers=layers, num_attention_heads=heads, hidden_size=hidden, intermediate_size=2 * hidden)
    if arch != "gpt_neox":
        out.update(num_key_value_heads=kv, head_dim=LAYOUT_HEAD_DIM)
    if arch in ("gemma3", "gemma3_multimodal", "gemma2"):
        out["query_pre_attn_scalar"] = LAYOUT_HEAD_DIM
    return out
