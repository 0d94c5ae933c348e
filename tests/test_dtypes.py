"""bfloat16 on CPU against float32 (the same weights, cast), and the CUDA paths against CPU where a GPU exists.

Stated tolerances (tiny random models; bfloat16 keeps 8 bits of mantissa, ~3 significant digits):
- head-norm activations: relative difference <= 2e-2 per value (measured ~5e-3), same greedy tokens;
- ablation KL (hidden states cast to float32, float32 unembedding and log-softmax): relative <= 5e-2 (measured ~8e-3).
"""
import copy

import numpy as np
import pytest
import torch

from lib.experiments import ablation as A
from lib.experiments.extract import extract_activations
from lib.model.architectures import arch_info
from lib.model.loading import load_model
from lib.model.prompts import select_prompts
from tests.test_ablation import write_run

SPECS = ["random:llama", "random:gpt2", "random:gemma2", "random:gemma3_multimodal"]
NO_CUDA = "needs a CUDA device (torch.cuda.is_available() is False here); run on a GPU node"


def converted(spec, dtype=torch.bfloat16, device="cpu"):
    """(float32 model, tokenizer, arch) and the same weights as `dtype` on `device` with their ArchInfo."""
    model, tokenizer, arch = load_model(spec, device="cpu")
    other = copy.deepcopy(model).to(device=device, dtype=dtype)
    return (model, tokenizer, arch), (other, arch_info(other, source=spec))


def kl_both(tmp_path, spec, reference, other):
    (model, _, arch), (model2, arch2) = reference, other
    inputs, _ = A.prepare(write_run(tmp_path, arch, spec), model=spec, variants=["rank_diff"])
    masks = torch.ones(2, arch.total_heads)
    masks[0, [1, arch.n_heads + 1, arch.total_heads - 3]] = 0.0
    masks[1, ::2] = 0.0
    prompts = list(range(len(inputs.prompts)))
    out = []
    for m, a in ((model, arch), (model2, arch2)):
        engine = A.DivergenceEngine(m, a, inputs, batch_size=5)
        out.append(engine.divergence(prompts, masks, engine.clean(prompts)))
    return out


def activations_both(spec, reference, other):
    (model, tokenizer, arch), (model2, arch2) = reference, other
    prompts = select_prompts(4)
    runs = [extract_activations(m, tokenizer, a, prompts, n_tokens=5, batch_size=4, progress=False)
            for m, a in ((model, arch), (model2, arch2))]
    return runs


@pytest.mark.parametrize("spec", SPECS)
def test_bfloat16_extraction_matches_float32(spec):
    reference, other = converted(spec)
    assert next(other[0].parameters()).dtype == torch.bfloat16
    f32, bf16 = activations_both(spec, reference, other)
    assert bf16.activations.dtype == np.float32 and np.isfinite(bf16.activations).all()
    assert (bf16.tokens == f32.tokens).all()
    np.testing.assert_allclose(bf16.activations, f32.activations, rtol=2e-2, atol=0)


@pytest.mark.parametrize("spec", SPECS)
def test_bfloat16_ablation_kl_matches_float32(tmp_path, spec):
    reference, other = converted(spec)
    kl32, kl16 = kl_both(tmp_path, spec, reference, other)
    assert kl16.dtype == np.float64 and (kl32 > 1e-5).all()          # a real effect to compare
    np.testing.assert_allclose(kl16, kl32, rtol=5e-2, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_extraction_and_ablation_match_cpu(tmp_path, dtype):
    spec = "random:llama"
    reference, other = converted(spec, dtype=dtype, device="cuda")
    f32, gpu = activations_both(spec, reference, other)
    assert (gpu.tokens == f32.tokens).all()
    np.testing.assert_allclose(gpu.activations, f32.activations, rtol=2e-2 if dtype == torch.bfloat16 else 1e-4)
    kl_cpu, kl_gpu = kl_both(tmp_path, spec, reference, other)
    np.testing.assert_allclose(kl_gpu, kl_cpu, rtol=5e-2 if dtype == torch.bfloat16 else 1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_cuda_phiid_torch_backend_matches_numpy():
    from lib.estimators.phiid import phiid_all_pairs
    X = np.random.default_rng(0).standard_normal((3, 6, 60)).cumsum(-1)
    cpu = phiid_all_pairs(X, backend="numpy", warn=False)
    gpu = phiid_all_pairs(X, backend="torch", warn=False)
    np.testing.assert_allclose(gpu["sts"], cpu["sts"], rtol=1e-7, atol=1e-9 * np.nanmax(np.abs(cpu["sts"])))
