"""Gemma 3 specifics on the real bundled Gemma-3-270M weights (bundled:gemma3-270m): the layout (explicit head_dim,
1 KV head, q/k norms, post-attention and post-feed-forward norms, sliding-window layers, logit handling), extraction
against one prompt at a time, the per-head hook against a hand-written attention (sliding window included), head
ablation against zeroed weights through the post-attention norm, and neuron ablation through the post-feed-forward
norm against a whole forward with an independent hook."""
import numpy as np
import pytest
import torch

from lib.experiments import neurons as N
from lib.experiments.extract import compare_batched, extract_activations
from lib.model.heads import HeadHooks
from lib.model.prompts import select_prompts
from tests import manual_attention
from tests import test_heads as heads_tests
from tests.test_neurons import _zeroed_logits

SPEC = "bundled:gemma3-270m"


def test_layout_norms_and_logits(gemma3):
    model, tokenizer, arch = gemma3
    assert (arch.model_type, arch.n_layers, arch.n_heads, arch.n_kv_heads, arch.head_dim) == ("gemma3_text", 18, 4, 1, 256)
    assert arch.hidden_size == 640 and arch.vocab_size == 262144 and arch.total_heads == 72
    assert arch.head_dim * arch.n_heads != arch.hidden_size            # explicit head_dim, not hidden / heads
    block = arch.layers()[0]
    for name in ("q_norm", "k_norm"):
        assert hasattr(arch.attention(0), name)
    for name in ("post_attention_layernorm", "post_feedforward_layernorm", "pre_feedforward_layernorm"):
        assert hasattr(block, name)
    kinds = model.config.layer_types
    assert "sliding_attention" in kinds and "full_attention" in kinds
    assert tokenizer.chat_template is None                              # a base model
    assert arch.final_logit_softcap == model.config.final_logit_softcapping
    ids = tokenizer(["The capital of France is"], return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    # final norm + unembedding (+ soft-capping when set) of the last hidden state reproduce the model's logits
    recomputed = arch.logits_from_normed(out.hidden_states[-1][0, -1])
    torch.testing.assert_close(recomputed, out.logits[0, -1], atol=1e-3, rtol=1e-4)
    top = [tokenizer.decode(t).strip() for t in out.logits[0, -1].topk(10).indices]
    assert "Paris" in top, top                                          # trained weights (random: 1 in 26,000)


def test_batched_equals_one_at_a_time_on_gemma3(gemma3):
    model, tokenizer, arch = gemma3
    prompts = select_prompts(6)
    batched = extract_activations(model, tokenizer, arch, prompts, n_tokens=12, batch_size=6, chat_template=False,
                                  progress=False)
    single = extract_activations(model, tokenizer, arch, prompts, n_tokens=12, batch_size=1, chat_template=False,
                                 progress=False)
    assert batched.activations.shape == (6, 72, 12)
    rows = compare_batched(batched, single)
    same = [r for r in rows if r["same_tokens"]]
    assert len(same) >= 5
    for r in same:
        i = [p.prompt_id for p in prompts].index(r["prompt_id"])
        np.testing.assert_allclose(batched.activations[i], single.activations[i], rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("window", [None, 4])
def test_hook_matches_manual_attention_with_sliding_window(gemma3, window):
    """sdpa + the project's hook vs the hand-written softmax(QK^T * scale + mask)V (q/k norms applied before it by
    the model); window 4 < the prompt length makes the 15 sliding layers mask differently from the full ones."""
    from tests.conftest import cached_model
    model, tokenizer, arch = gemma3
    manual, _, manual_arch = cached_model(SPEC, manual_attention.NAME)
    input_ids, attention_mask = heads_tests.batch(tokenizer)
    saved = (model.config.sliding_window, manual.config.sliding_window)
    try:
        if window:
            model.config.sliding_window = manual.config.sliding_window = window
        manual_attention.captured.clear()
        with torch.no_grad():
            manual_logits = manual(input_ids=input_ids, attention_mask=attention_mask).logits
            with HeadHooks(arch, record=True) as hooks:
                logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
                recorded = hooks.pop_norms()
    finally:
        model.config.sliding_window, manual.config.sliding_window = saved
    expected = torch.cat([manual_attention.captured[id(manual_arch.attention(l))][0][:, :, -1].norm(dim=-1)
                          for l in range(arch.n_layers)], dim=1)
    torch.testing.assert_close(manual_logits[:, -1], logits[:, -1], atol=2e-3, rtol=1e-3)
    np.testing.assert_allclose(recorded.numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)
    if window:
        with torch.no_grad():
            full = model(input_ids=input_ids, attention_mask=attention_mask).logits
        assert (full[:, -1] - logits[:, -1]).abs().max() > 1e-2       # the window changed the computation


def test_head_mask_equals_zeroed_weights(gemma3):
    """Zeroing a head's slice of the o_proj input = zeroing its o_proj columns, before post_attention_layernorm."""
    model, tokenizer, arch = gemma3
    heads_tests.test_mask_equals_zeroing_output_projection_columns(("gemma3", model, tokenizer, arch))


def test_neuron_ablation_through_post_feedforward_norm(gemma3, tmp_path):
    model, tokenizer, arch = gemma3
    setup = N.prepare(model, tokenizer, arch, out_dir=tmp_path, n_prompts=1, mode="ablate", chat_template=False,
                      selector="top_activation", n_neurons=3, layers=[0, 9, 17], progress=False)
    frame = N.compute_batch(setup, setup.neurons, 0)
    ids = setup.prompts.input_ids[0]
    with torch.no_grad():
        clean = model(input_ids=ids[None], logits_to_keep=1).logits[0, -1].float()
    target = setup.target_ids[0]
    for row, nrn in zip(frame.itertuples(), setup.neurons):
        effect = _zeroed_logits(model, arch, ids, nrn.layer, nrn.neuron) - clean
        assert abs(row.total - float(effect[target])) < 1e-3 * max(1.0, float(effect.abs().max()))
