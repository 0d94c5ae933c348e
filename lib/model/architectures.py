"""Everything the project knows about architectures (nothing else does): ArchInfo names, for every layer, the
modules the rest of the project hooks or reads: the attention output projection (its input is the heads' outputs
concatenated), the query/key/value projections (and their layout), the MLP down projection (its input is the
neuron activations), the final norm and the unembedding. To support another architecture, add one entry to
ARCHITECTURES below."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from lib.model.checksums import ModelSpecError

__all__ = ["ARCHITECTURES", "SITES", "ArchInfo", "arch_info", "PROJECTION_SITES", "ArchSpec"]


# ----------------------------------------------------------------------------- architecture table

@dataclass(frozen=True)
class ArchSpec:
    """Where things are in one family of Hugging Face causal LMs (paths relative to the CausalLM module)."""
    layers: str                 # the list of transformer blocks
    attn: str                   # attention module, relative to a block
    attn_out: str               # output projection, relative to a block
    mlp_down: str               # MLP down projection, relative to a block
    final_norm: str
    qkv_layout: str             # "separate" (q_proj/k_proj/v_proj), "neox_fused" or "gpt2_fused"
    qkv: tuple[str, ...]        # projection paths relative to a block (one path when fused)
    embed: str
    mlp: str = "mlp"            # the MLP module, relative to a block
    softcaps_logits: bool = True  # the LM head applies the config's final_logit_softcapping (if the config has one)


_LLAMA_LIKE = ArchSpec(
    layers="model.layers", attn="self_attn", attn_out="self_attn.o_proj", mlp_down="mlp.down_proj",
    final_norm="model.norm", qkv_layout="separate",
    qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), embed="model.embed_tokens")

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    # Gemma 3 multimodal checkpoints (e.g. google/gemma-3-4b-it): the text decoder inside the conditional model
    "gemma3": ArchSpec(
        layers="model.language_model.layers", attn="self_attn", attn_out="self_attn.o_proj", mlp_down="mlp.down_proj",
        final_norm="model.language_model.norm", qkv_layout="separate",
        qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), embed="model.language_model.embed_tokens",
        softcaps_logits=False),   # Gemma3ForConditionalGeneration returns lm_head(h) uncapped (its text config has a cap)
    "gpt_neox": ArchSpec(
        layers="gpt_neox.layers", attn="attention", attn_out="attention.dense", mlp_down="mlp.dense_4h_to_h",
        final_norm="gpt_neox.final_layer_norm", qkv_layout="neox_fused",
        qkv=("attention.query_key_value",), embed="gpt_neox.embed_in"),
    "gpt2": ArchSpec(
        layers="transformer.h", attn="attn", attn_out="attn.c_proj", mlp_down="mlp.c_proj",
        final_norm="transformer.ln_f", qkv_layout="gpt2_fused",
        qkv=("attn.c_attn",), embed="transformer.wte"),
}


# Named places in every block where lib.model.hooks reads or replaces a tensor: name -> what the tensor is, its shape,
# and which hook sees it ("pre": the module's first positional input; "post": its output, element 0 of a tuple).
SITES: dict[str, str] = {
    "head_out": "input of the attention output projection [batch, pos, n_heads * head_dim], heads concatenated "
                "(head h = columns h*head_dim:(h+1)*head_dim) (pre-hook)",
    "attn_out": "output of the attention output projection [batch, pos, d_model] (forward hook)",
    "mlp_act": "input of the MLP down projection [batch, pos, d_mlp] = the neuron activations (pre-hook)",
    "mlp_out": "output of the MLP module [batch, pos, d_model], before any post-MLP norm (forward hook)",
    "resid_post": "output of a transformer block: the residual stream after the block [batch, pos, d_model] (forward hook)",
}
# The attention's projections (per-sample gradients of their weights): not every layout has every one of them.
PROJECTION_SITES: dict[str, str] = {
    "qkv_in": "input of the query/key/value projection(s) [batch, pos, d_model]: what the attention reads (pre-hook)",
    "q_out": "output of the query projection, or of the fused query/key/value projection (GPT-NeoX, GPT-2) "
             "(forward hook)",
    "k_out": "output of the key projection; separate q/k/v projections only (forward hook)",
    "v_out": "output of the value projection; separate q/k/v projections only (forward hook)",
}
_SITE_MODULES = {"head_out": ("attn_out", "pre"), "attn_out": ("attn_out", "post"), "mlp_act": ("mlp_down", "pre"),
                 "mlp_out": ("mlp", "post"), "resid_post": ("", "post"), "qkv_in": ("qkv", "pre"),
                 "q_out": ("qkv", "post"), "k_out": ("qkv", "post"), "v_out": ("qkv", "post")}
_QKV_INDEX = {"qkv_in": 0, "q_out": 0, "k_out": 1, "v_out": 2}


def _get(module: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


@dataclass
class ArchInfo:
    """Shapes and module locations of a loaded causal LM. Heads are numbered layer-major: idx = layer * n_heads + head."""
    model_type: str
    n_layers: int
    n_heads: int                # query heads per layer (what the output projection's input holds)
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    d_mlp: int
    vocab_size: int
    spec: ArchSpec
    model: nn.Module = field(repr=False)
    parallel_residual: bool = False
    final_logit_softcap: float | None = None
    source: str = ""            # the spec this model was loaded from
    weights_id: str = ""        # checksum of the weights file, or a description for random models
    _unembedding32: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def total_heads(self) -> int:
        return self.n_layers * self.n_heads

    def layers(self) -> list[nn.Module]:
        return list(_get(self.model, self.spec.layers))

    def attn_out(self, layer: int) -> nn.Module:
        """Attention output projection of `layer`; its input is [.., n_heads * head_dim], heads concatenated."""
        return _get(self.layers()[layer], self.spec.attn_out)

    def attention(self, layer: int) -> nn.Module:
        return _get(self.layers()[layer], self.spec.attn)

    def mlp(self, layer: int) -> nn.Module:
        """The MLP module of `layer` (its output is [.., hidden], before any post-MLP norm)."""
        return _get(self.layers()[layer], self.spec.mlp)

    def site(self, name: str, layer: int) -> tuple[nn.Module, str]:
        """The module a hook site lives on and the hook kind: (module, "pre" | "post"). Sites: see SITES."""
        if name not in SITES and name not in PROJECTION_SITES:
            raise ValueError(f"unknown hook site {name!r}; sites: {sorted(SITES)} (lib.model.architectures.SITES) and "
                             f"{sorted(PROJECTION_SITES)} (lib.model.architectures.PROJECTION_SITES)")
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer} out of range for site {name!r}: the model has {self.n_layers} layers")
        path, kind = _SITE_MODULES[name]
        block = self.layers()[layer]
        if path == "qkv":
            index = _QKV_INDEX[name]
            if index >= len(self.spec.qkv):
                raise ValueError(f"site {name!r} needs separate q/k/v projections; {self.model_type} has the fused "
                                 f"layout {self.spec.qkv_layout!r} (its one projection is site 'q_out')")
            return _get(block, self.spec.qkv[index]), kind
        return (_get(block, getattr(self.spec, path)) if path else block), kind

    def mlp_down(self, layer: int) -> nn.Module:
        """MLP down projection of `layer`; its input is the neuron activations [.., d_mlp]."""
        return _get(self.layers()[layer], self.spec.mlp_down)

    def qkv_modules(self, layer: int) -> tuple[nn.Module, ...]:
        return tuple(_get(self.layers()[layer], p) for p in self.spec.qkv)

    def final_norm(self) -> nn.Module:
        return _get(self.model, self.spec.final_norm)

    def unembed(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def unembedding_matrix(self) -> torch.Tensor:
        """[vocab, hidden]"""
        return self.unembed().weight

    def down_proj_weight(self, layer: int) -> torch.Tensor:
        """[hidden, d_mlp]: column n is neuron n's output direction (GPT-2's Conv1D is stored transposed)."""
        weight = self.mlp_down(layer).weight
        return weight.T if self.spec.qkv_layout == "gpt2_fused" else weight

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm, unembedding and (when the config has it) final logit soft-capping. [.., hidden] -> [.., vocab]"""
        return self.logits_from_normed(self.final_norm()(hidden))

    def base_model(self) -> nn.Module:
        """The decoder stack without the LM head (Hugging Face `model.base_model`). Its `last_hidden_state` has the
        final norm already applied (true of every architecture in ARCHITECTURES): use logits_from_normed on it."""
        return self.model.base_model

    def logits_from_normed(self, normed: torch.Tensor, float32: bool = False) -> torch.Tensor:
        """Unembedding and soft-capping of hidden states that already went through the final norm (base_model output).
        float32=True: computed in float32 whatever the model's dtype (a float32 copy of the unembedding is kept)."""
        if float32:
            weight, bias = self.unembedding_float32()
            logits = normed.float() @ weight.T
            if bias is not None:
                logits += bias
        else:
            logits = self.unembed()(normed)
        return self.soft_cap(logits)

    def soft_cap(self, logits: torch.Tensor) -> torch.Tensor:
        """Final logit soft-capping (Gemma 2/3: cap * tanh(z / cap)); the identity for models without it."""
        if self.final_logit_softcap:
            logits = torch.tanh(logits / self.final_logit_softcap) * self.final_logit_softcap
        return logits

    def unembedding_float32(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight [vocab, hidden], bias [vocab] or None) in float32: the parameters themselves for a float32 model,
        else a copy made once (and again only after the weight changes in place)."""
        weight, bias = self.unembedding_matrix(), getattr(self.unembed(), "bias", None)
        if weight.dtype == torch.float32:
            return weight, None if bias is None else bias.float()
        key = (weight.data_ptr(), weight._version)
        if self._unembedding32 is None or self._unembedding32[0] != key:
            self._unembedding32 = (key, weight.float(), None if bias is None else bias.float())
        return self._unembedding32[1], self._unembedding32[2]

    def head_map(self) -> tuple[list[int], list[int]]:
        """(layer, head) of every head index, layer-major."""
        return ([l for l in range(self.n_layers) for _ in range(self.n_heads)],
                [h for _ in range(self.n_layers) for h in range(self.n_heads)])

    @property
    def weights_transposed(self) -> bool:
        """True when projection weights are stored [in, out] (GPT-2's Conv1D), False for nn.Linear's [out, in]."""
        return self.spec.qkv_layout == "gpt2_fused"

    def block_param_slices(self, layer: int) -> dict[str, tuple[torch.Tensor, Callable[[int], tuple]]]:
        """For QK-OV: the weight tensor holding each of Q, K, V, O of `layer` and a function head -> index slices.

        Q is sliced by query head; K and V by KV head (h in range(n_kv_heads)); O by query head (columns).
        """
        d, hq, hkv = self.head_dim, self.n_heads, self.n_kv_heads
        layout = self.spec.qkv_layout
        o_weight = self.attn_out(layer).weight
        if layout == "separate":
            q, k, v = (m.weight for m in self.qkv_modules(layer))           # [out, in]
            rows = lambda h: (slice(h * d, (h + 1) * d), slice(None))
            return {"Q": (q, rows), "K": (k, rows), "V": (v, rows),
                    "O": (o_weight, lambda h: (slice(None), slice(h * d, (h + 1) * d)))}
        if layout == "neox_fused":
            qkv = self.qkv_modules(layer)[0].weight                          # [heads * 3 * d, in], per head [q|k|v]
            part = lambda j: (lambda h: (slice((3 * h + j) * d, (3 * h + j + 1) * d), slice(None)))
            return {"Q": (qkv, part(0)), "K": (qkv, part(1)), "V": (qkv, part(2)),
                    "O": (o_weight, lambda h: (slice(None), slice(h * d, (h + 1) * d)))}
        if layout == "gpt2_fused":
            qkv = self.qkv_modules(layer)[0].weight                          # Conv1D [in, 3 * hidden]: [q | k | v]
            hid = hq * d
            cols = lambda j: (lambda h: (slice(None), slice(j * hid + h * d, j * hid + (h + 1) * d)))
            return {"Q": (qkv, cols(0)), "K": (qkv, cols(1)), "V": (qkv, cols(2)),
                    "O": (o_weight, lambda h: (slice(h * d, (h + 1) * d), slice(None)))}   # Conv1D [in, out]
        raise ModelSpecError(f"unknown qkv layout {layout!r}")

    def kv_head(self, head: int) -> int:
        """The KV head query head `head` reads under grouped-query attention (query heads grouped consecutively)."""
        return head // (self.n_heads // self.n_kv_heads)

    def head_weight_slices(self, layer: int, head: int) -> dict[str, tuple[torch.Tensor, tuple]]:
        """The weights of one query head: {"q"|"k"|"v"|"o": (parameter, index)}; parameter[index] is that head's
        part ([head_dim, d_model] rows of Q/K/V, [d_model, head_dim] columns of O; transposed for GPT-2's Conv1D).
        K and V index the KV head this query head reads (shared with the other query heads of its group)."""
        if not 0 <= head < self.n_heads:
            raise ValueError(f"head {head} out of range: layer {layer} has {self.n_heads} query heads")
        slices = self.block_param_slices(layer)
        kv = self.kv_head(head)
        return {part.lower(): (weight, index(kv if part in "KV" else head)) for part, (weight, index) in slices.items()}


def arch_info(model: nn.Module, source: str = "", weights_id: str = "") -> ArchInfo:
    """Describe a loaded Hugging Face causal LM; fails for an architecture not in ARCHITECTURES."""
    model_type = model.config.model_type
    config = model.config.get_text_config()      # multimodal configs keep the decoder's settings in text_config
    if model_type not in ARCHITECTURES:
        raise ModelSpecError(
            f"unsupported architecture {model_type!r}; supported: {sorted(ARCHITECTURES)}. "
            f"To add one, add an ArchSpec entry to ARCHITECTURES in lib/model/architectures.py (module paths of its layers, "
            f"attention output projection, MLP down projection, final norm, unembedding, q/k/v projections)")
    spec = ARCHITECTURES[model_type]
    n_heads = config.num_attention_heads if hasattr(config, "num_attention_heads") else config.n_head
    n_layers = config.num_hidden_layers if hasattr(config, "num_hidden_layers") else config.n_layer
    hidden = config.hidden_size if hasattr(config, "hidden_size") else config.n_embd
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or hidden // n_heads     # Gemma3: explicit; Qwen2: may be None
    d_mlp = (getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden)
    info = ArchInfo(
        model_type=model_type, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
        hidden_size=hidden, d_mlp=d_mlp, vocab_size=model.get_output_embeddings().weight.shape[0], spec=spec,
        model=model, parallel_residual=bool(getattr(config, "use_parallel_residual", False)),
        final_logit_softcap=getattr(config, "final_logit_softcapping", None) if spec.softcaps_logits else None,
        source=source, weights_id=weights_id)
    o_in = info.attn_out(0).weight.shape[0 if spec.qkv_layout == "gpt2_fused" else 1]
    if o_in != n_heads * head_dim:
        raise ModelSpecError(f"{model_type}: output projection input {o_in} != heads {n_heads} x head_dim {head_dim}")
    return info
