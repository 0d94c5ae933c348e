"""The per-head hook against a hand-written softmax(QK^T/sqrt d)V on every architecture, and head masks against
weight-level ablation."""
import numpy as np
import pytest
import torch

from lib.model.heads import HeadHooks, head_mask
from tests import manual_attention
from tests.conftest import cached_model

TEXT = ["The cat sat on the mat and then it went to sleep", "Two plus three is"]


def manual_norms(spec: str, input_ids, attention_mask):
    """Per-head output norms at the last position from the hand-written attention: [batch, total_heads]."""
    model, _, arch = cached_model(spec, manual_attention.NAME)
    manual_attention.captured.clear()
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    per_layer = [manual_attention.captured[id(arch.attention(l))][0][:, :, -1].norm(dim=-1) for l in range(arch.n_layers)]
    return torch.cat(per_layer, dim=1), logits


def batch(tokenizer):
    tokenizer.padding_side = "left"
    enc = tokenizer(TEXT, return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


def test_hook_norms_equal_manual_attention(tiny_arch):
    name, model, tokenizer, arch = tiny_arch                       # eager attention
    input_ids, attention_mask = batch(tokenizer)
    expected, manual_logits = manual_norms(f"random:{name}", input_ids, attention_mask)
    with torch.no_grad(), HeadHooks(arch, record=True) as hooks:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        recorded = hooks.pop_norms()
    # the hand-written attention is the model's attention: same logits
    assert torch.allclose(manual_logits, logits, atol=1e-5), (manual_logits - logits).abs().max()
    assert recorded.shape == (2, arch.n_layers * arch.n_heads)
    np.testing.assert_allclose(recorded.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)


def test_hook_on_smollm2_sdpa_matches_manual(smollm2):
    model, tokenizer, arch = smollm2
    assert (arch.n_layers, arch.n_heads, arch.n_kv_heads, arch.head_dim) == (30, 9, 3, 64)
    input_ids, attention_mask = batch(tokenizer)
    expected, _ = manual_norms("bundled:smollm2-135m", input_ids, attention_mask)
    with torch.no_grad(), HeadHooks(arch, record=True) as hooks:
        model(input_ids=input_ids, attention_mask=attention_mask)
        recorded = hooks.pop_norms()
    np.testing.assert_allclose(recorded.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)


def test_mask_equals_zeroing_output_projection_columns(tiny_arch):
    name, model, tokenizer, arch = tiny_arch
    input_ids, attention_mask = batch(tokenizer)
    removed = [1, arch.n_heads + 2, arch.total_heads - 1]           # heads in three layers
    mask = head_mask(2, arch.total_heads, [removed, []])           # row 0 ablated, row 1 clean
    with torch.no_grad():
        clean = model(input_ids=input_ids, attention_mask=attention_mask).logits
        with HeadHooks(arch, mask=mask):
            masked = model(input_ids=input_ids, attention_mask=attention_mask).logits
        # independent ablation: zero the weights that read those heads' slices
        saved = {}
        for idx in removed:
            layer, head = divmod(idx, arch.n_heads)
            weight, cols = arch.block_param_slices(layer)["O"]
            saved[(layer, head)] = weight[cols(head)].clone()
            weight[cols(head)] = 0.0
        try:
            weight_ablated = model(input_ids=input_ids, attention_mask=attention_mask).logits
        finally:
            for (layer, head), value in saved.items():
                weight, cols = arch.block_param_slices(layer)["O"]
                weight[cols(head)] = value
        after = model(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(masked[0], weight_ablated[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked[1], clean[1], atol=1e-5, rtol=1e-5)   # per-row: the other row untouched
    assert (masked[0] - clean[0]).abs().max() > 1e-4                        # the ablation did something
    assert torch.equal(after, clean)                                        # hooks removed on exit


def test_hooks_removed_even_on_error(tiny_arch):
    _, model, tokenizer, arch = tiny_arch
    with pytest.raises(ZeroDivisionError):
        with HeadHooks(arch, record=True):
            1 / 0
    assert all(len(arch.attn_out(l)._forward_pre_hooks) == 0 for l in range(arch.n_layers))


def test_mask_row_count_mismatch_is_an_error(tiny_arch):
    _, model, tokenizer, arch = tiny_arch
    input_ids, attention_mask = batch(tokenizer)
    with pytest.raises(ValueError, match="mask has 3 rows"):
        with HeadHooks(arch, mask=torch.ones(3, arch.total_heads)):
            model(input_ids=input_ids, attention_mask=attention_mask)


def test_cluster_layouts_hook_and_mask(cluster_arch):
    """Multimodal Gemma 3 (decoder under model.language_model), Gemma 2 (attention soft-capping), Mistral (sliding
    window): the head hook equals the hand attention, and the mask equals zeroing weights."""
    test_hook_norms_equal_manual_attention(cluster_arch)
    test_mask_equals_zeroing_output_projection_columns(cluster_arch)
