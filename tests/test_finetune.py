"""Head-restricted fine-tuning: only the selected slices move, the masked step is a plain AdamW step where
everything is selected, GQA policies, resume, effect sizes against independent computations."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from lib.finetune.masks import MaskedAdamW, head_masks, kv_heads_selected, weight_deltas
from lib.finetune.sft import Example, SFTSettings, run_sft
from lib.finetune.stats import hedges_g, paired_bootstrap, permutation_null, permutation_p
from lib.models import load_model


@pytest.fixture(scope="module", params=["llama", "gpt2", "gpt_neox"])
def tiny(request):
    model, tokenizer, arch = load_model(f"random:{request.param}", device="cpu")
    return model, tokenizer, arch


def _examples(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return [Example([int(t) for t in rng.integers(3, 500, 5)], [int(t) for t in rng.integers(3, 500, 3)])
            for _ in range(n)]


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _selected_entries(arch, heads, kv):
    """Independent of head_masks: (param name, index) of every selected slice, from block_param_slices."""
    names = {id(p): n for n, p in arch.model.named_parameters()}
    out = []
    for h in heads:
        layer, local = divmod(h, arch.n_heads)
        slices = arch.block_param_slices(layer)
        for block in ("Q", "O"):
            weight, index = slices[block]
            out.append((names[id(weight)], index(local)))
        for g in kv_heads_selected(arch, [x - layer * arch.n_heads for x in heads if x // arch.n_heads == layer], kv):
            for block in ("K", "V"):
                weight, index = slices[block]
                out.append((names[id(weight)], index(g)))
    return out


def test_only_selected_slices_move(tiny):
    model, tokenizer, arch = tiny
    heads = [1, arch.n_heads + 2]
    before = _snapshot(model)
    curve = run_sft(model, arch, heads, _examples(), lambda m: [True], SFTSettings(n_steps=3, lr=1e-2, batch_size=2,
                    eval_every=3, weight_decay=0.1), pad_id=0)
    after = _snapshot(model)
    selected = _selected_entries(arch, heads, "any")
    for name, value in after.items():
        outside = torch.ones_like(value, dtype=torch.bool)
        for n, idx in selected:
            if n == name:
                outside[idx] = False
        assert torch.equal(value[outside], before[name][outside]), f"{name} moved outside the selected heads"
    for name, idx in selected:
        assert not torch.equal(after[name][idx], before[name][idx]), f"selected slice of {name} did not move"
    assert curve.steps == [0, 3] and len(curve.loss) == 3
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(before[name])


def test_masked_step_equals_plain_adamw_when_all_heads_selected(tiny):
    model, tokenizer, arch = tiny
    before = _snapshot(model)
    ids = torch.randint(3, 500, (2, 9))
    masks = head_masks(arch, list(range(arch.total_heads)), kv="all")
    assert all(bool(m.mask.all()) for m in masks)
    tensors = [m.param for m in masks]

    def two_steps(optimiser):
        for _ in range(2):
            model(input_ids=ids, labels=ids).loss.backward()
            optimiser.step()
            optimiser.zero_grad()
        return [t.detach().clone() for t in tensors]

    masked = two_steps(MaskedAdamW(masks, lr=1e-2, weight_decay=0.01))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(before[name])
    plain = two_steps(torch.optim.AdamW(tensors, lr=1e-2, weight_decay=0.01))
    for a, b in zip(masked, plain):
        assert torch.equal(a, b)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(before[name])
            p.requires_grad_(False)


def test_no_heads_selected_changes_nothing(tiny):
    model, tokenizer, arch = tiny
    before = _snapshot(model)
    run_sft(model, arch, [], _examples(), lambda m: [False], SFTSettings(n_steps=2, lr=1e-2, batch_size=2,
            eval_every=1), pad_id=0)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_gqa_policies_on_grouped_heads():
    model, tokenizer, arch = load_model("random:llama", device="cpu")      # 4 query heads share 2 KV heads
    assert (arch.n_heads, arch.n_kv_heads) == (4, 2)
    assert kv_heads_selected(arch, [0], "any") == [0]
    assert kv_heads_selected(arch, [0], "all") == []
    assert kv_heads_selected(arch, [0, 1, 3], "all") == [0]
    assert kv_heads_selected(arch, [0, 1, 3], "any") == [0, 1]
    assert kv_heads_selected(arch, [0, 1, 2, 3], "none") == []
    with pytest.raises(ValueError, match="kv policy"):
        kv_heads_selected(arch, [0], "some")


def test_weight_deltas_name_exactly_the_moved_heads():
    model, tokenizer, arch = load_model("random:llama", device="cpu")
    masks = head_masks(arch, [5], kv="any")                                 # layer 1, query head 1 -> KV head 0
    before = {id(m.param): m.param.detach().clone() for m in masks}
    with torch.no_grad():
        for m in masks:
            m.param.add_(m.mask.float())
    moved = {(r["layer"], r["head"], r["block"]) for r in weight_deltas(arch, before) if r["delta_norm"] > 0}
    assert moved == {(1, 1, "Q"), (1, 1, "O"), (1, 0, "K"), (1, 0, "V")}


@pytest.mark.parametrize("field, value", [("n_steps", 0), ("lr", 0.0), ("lr", -1.0), ("batch_size", 0),
                                          ("eval_every", 1.5)])
def test_bad_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        SFTSettings(**{field: value}).check()


def test_hedges_g_hand_computation():
    # means 2 and 5, sd 1 each: d = -3, correction 1 - 3 / (4 * 6 - 9) = 0.8
    assert hedges_g([1, 2, 3], [4, 5, 6]) == pytest.approx(-2.4)
    assert np.isnan(hedges_g([1], [2, 3]))


def test_permutation_test_matches_scipy():
    a, b = [0.61, 0.64, 0.58, 0.66], [0.55, 0.57, 0.60, 0.54, 0.59]
    ref = scipy.stats.permutation_test((a, b), lambda x, y: np.mean(x) - np.mean(y), permutation_type="independent",
                                       alternative="greater", n_resamples=np.inf)
    assert permutation_p(a, b, alternative="greater") == pytest.approx(ref.pvalue, abs=1e-12)
    assert len(permutation_null(a, b)) == 126                                # C(9, 4) exact splits


def test_paired_bootstrap_ci_covers_the_difference():
    rng = np.random.default_rng(0)
    a, b = rng.random(200) < 0.6, rng.random(200) < 0.4
    diff, lo, hi = paired_bootstrap(a, b)
    assert diff == pytest.approx(a.mean() - b.mean())
    assert lo < diff < hi and hi - lo < 0.25
