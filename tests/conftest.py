"""Shared fixtures. Models are cached per session: loading a tiny random model takes ~0.3 s, SmolLM2 ~0.4 s."""
from __future__ import annotations

import functools
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from lib.models import CLUSTER_ARCHS, RANDOM_ARCHS, load_model  # noqa: E402


@functools.lru_cache(maxsize=None)
def cached_model(spec: str, attn_implementation: str | None = None, dtype: str = "float32"):
    return load_model(spec, attn_implementation=attn_implementation, dtype=dtype, device="cpu")


@pytest.fixture(params=RANDOM_ARCHS)
def tiny_arch(request):
    """Each supported architecture as a tiny random model: (name, model, tokenizer, arch)."""
    model, tokenizer, arch = cached_model(f"random:{request.param}", "eager")
    return request.param, model, tokenizer, arch


@pytest.fixture(scope="session")
def smollm2():
    """The real bundled SmolLM2-135M-Instruct (sdpa attention): (model, tokenizer, arch)."""
    return cached_model("bundled:smollm2-135m")


@pytest.fixture(params=RANDOM_ARCHS + CLUSTER_ARCHS)
def every_arch(request):
    """Every tiny architecture, the cluster examples' layouts included (multimodal Gemma 3, Gemma 2, Mistral)."""
    model, tokenizer, arch = cached_model(f"random:{request.param}", "eager")
    return request.param, model, tokenizer, arch


@pytest.fixture(params=CLUSTER_ARCHS)
def cluster_arch(request):
    """The cluster examples' layouts as tiny random models: (name, model, tokenizer, arch)."""
    model, tokenizer, arch = cached_model(f"random:{request.param}", "eager")
    return request.param, model, tokenizer, arch
