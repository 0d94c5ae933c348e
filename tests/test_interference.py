"""QK-OV interference (lib.experiments.interference): scores against explicit loops, per-sample gradients against single-sample
backward passes, head slices against what the attention modules actually compute, GQA, fused QKV, empty task B."""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

from lib.experiments import interference as I
from tests.conftest import cached_model

TEXTS_A = ["What is 2 + 2? ||| It is 4.", "Add 3 and 5. ||| The sum is 8.", "Count to three ||| one two three",
           "Half of ten is ||| five", "If I have 7 apples and eat 2, how many are left? ||| Five apples are left."]
TEXTS_B = ["Correct the error: he go home. ||| He goes home.", "Fix: she have a cat ||| She has a cat.",
           "They was late for the bus and missed the first class of the day."]


def tiny(arch_name: str):
    return cached_model(f"random:{arch_name}", "eager")


def tasks(tokenizer, ids_a=None, ids_b=None):
    return (I.samples_from_texts(tokenizer, TEXTS_A, "math", "A", ids_a),
            I.samples_from_texts(tokenizer, TEXTS_B, "grammar", "B", ids_b))


@pytest.fixture(scope="module")
def llama_run():
    model, tokenizer, arch = tiny("llama")
    a, b = tasks(tokenizer)
    ga = I.per_sample_gradients(model, arch, a, "hooks", batch_size=3)
    gb = I.per_sample_gradients(model, arch, b, "hooks", batch_size=2)
    return model, tokenizer, arch, a, b, ga, gb


def manual_loss_and_grads(model, weights, sample):
    """Single-sample backward pass with the loss written out: mean NLL of the continuation tokens."""
    ids = torch.tensor([sample.prompt_ids + sample.continuation_ids])
    p = len(sample.prompt_ids)
    for w in weights:
        w.requires_grad_(True)
    try:
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[0, p - 1:-1].float(), ids[0, p:])
        grads = torch.autograd.grad(loss, weights)
    finally:
        for w in weights:
            w.requires_grad_(False)
    return float(loss.detach()), grads


# ----------------------------------------------------------------------------- the score as a matrix product

@pytest.mark.parametrize("variant", I.VARIANTS)
def test_matrix_form_equals_explicit_pair_loop(variant):
    gen = torch.Generator().manual_seed(0)
    g_a, g_b = torch.randn(6, 50, generator=gen, dtype=torch.float64), torch.randn(4, 50, generator=gen, dtype=torch.float64)
    g_a[:, 3] = 0.0                                           # a direction no task-A sample moves: 0/0 -> 0
    fisher_a = (g_a ** 2).mean(0)
    fisher = (fisher_a + (g_b ** 2).mean(0)) / 2 if variant == "pooled" else fisher_a
    eps, ridge = 1e-12, 0.01
    denom = I.fisher_denominator(fisher, eps, ridge).double()
    got = I.pair_scores(g_a, g_b, denom, variant)
    want = torch.zeros(6, 4, dtype=torch.float64)
    for i in range(6):
        for j in range(4):
            for k in range(50):
                f = max(float(fisher[k]), eps) + ridge
                gi, gj = float(g_a[i, k]), float(g_b[j, k])
                want[i, j] += {"magnitude": gi * gi / f * abs(gj), "pooled": gi * gi / f * abs(gj),
                               "signed": gi * gj / f, "symmetric": np.sqrt(gi * gi * gj * gj) / f}[variant]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(got).all()
    if variant == "magnitude":                                # asymmetric: swapping the roles changes the score
        swapped = I.pair_scores(g_b, g_a, I.fisher_denominator((g_b ** 2).mean(0), eps, ridge).double())
        assert not torch.allclose(swapped.T, got)


def test_model_scores_equal_per_pair_loop_over_manual_slices(llama_run):
    """Each (layer, head, block) score of the result equals a per-pair loop over that head's rows / columns, sliced
    here by hand (Q rows per query head, K/V rows per KV head, O columns per query head)."""
    model, tokenizer, arch, a, b, ga, gb = llama_run
    result = I.interference_from_gradients(arch, ga, gb, min_samples_for_fisher=2, eps=1e-30, ridge=0.0)
    d = arch.head_dim
    for layer in (0, arch.n_layers - 1):
        q, k, v = arch.qkv_modules(layer)
        o = arch.attn_out(layer)
        names = {id(m.weight): n for n, (_, m) in ga.weights.items()}
        for block, module, n_h, by_cols in (("Q", q, 4, False), ("K", k, 2, False), ("V", v, 2, False), ("O", o, 4, True)):
            GA, GB = ga.full(names[id(module.weight)]).double(), gb.full(names[id(module.weight)]).double()
            assert result.scores["magnitude"][block].shape == (5, 3, arch.n_layers, n_h)
            for h in range(n_h):
                sl = (slice(None), slice(None), slice(h * d, (h + 1) * d)) if by_cols else (slice(None), slice(h * d, (h + 1) * d))
                A, B = GA[sl].reshape(5, -1), GB[sl].reshape(3, -1)
                F = (A ** 2).mean(0).clamp_min(1e-30)
                for i in range(5):
                    for j in range(3):
                        want = float(((A[i] ** 2) / F * B[j].abs()).sum())
                        got = float(result.scores["magnitude"][block][i, j, layer, h])
                        assert got == pytest.approx(want, rel=2e-5), (block, layer, h, i, j)


@pytest.mark.parametrize("arch_name", ["llama", "gpt2", "gpt_neox"])
def test_head_additivity(arch_name):
    """Sum over heads (and over the Q/K/V blocks of a fused tensor) of head-sliced scores == the unsliced score."""
    model, tokenizer, arch = tiny(arch_name)
    a, b = tasks(tokenizer)
    ga, gb = I.per_sample_gradients(model, arch, a), I.per_sample_gradients(model, arch, b)
    eps, ridge = 1e-30, 1e-9
    result = I.interference_from_gradients(arch, ga, gb, min_samples_for_fisher=2, eps=eps, ridge=ridge)
    names = {id(m.weight): n for n, (_, m) in ga.weights.items()}
    for layer in range(arch.n_layers):
        by_tensor: dict[str, list[str]] = {}
        for block, (weight, _) in arch.block_param_slices(layer).items():
            by_tensor.setdefault(names[id(weight)], []).append(block)
        expected_groups = 2 if arch.spec.qkv_layout != "separate" else 4
        assert len(by_tensor) == expected_groups
        for name, blocks in by_tensor.items():
            A, B = ga.full(name).flatten(1).double(), gb.full(name).flatten(1).double()
            fa = (A ** 2).mean(0)
            for variant in I.VARIANTS:
                f = (fa + (B ** 2).mean(0)) / 2 if variant == "pooled" else fa
                whole = I.pair_scores(A, B, f.clamp_min(eps) + ridge, variant).numpy()
                summed = sum(result.scores[variant][bl][:, :, layer, :].astype(np.float64).sum(-1) for bl in blocks)
                np.testing.assert_allclose(summed, whole, rtol=1e-5, atol=1e-5 * np.abs(whole).max(),
                                           err_msg=f"{arch_name} layer {layer} {blocks} {variant}")


# ----------------------------------------------------------------------------- per-sample gradients

@pytest.fixture(scope="module")
def llama64():
    """The tiny llama in float64 (single-sample backward passes are then exact to ~1e-15, a sharp reference), 3
    samples of different lengths, and each sample's loss and gradients from its own backward pass."""
    model, tokenizer, arch = tiny("llama")
    model = copy.deepcopy(model).double()
    arch = I.ArchInfo(**{**arch.__dict__, "model": model})
    a = I.samples_from_texts(tokenizer, TEXTS_A[2:], "math", "A")   # 3 lengths: right padding inside one batch
    names = list(I.projection_weights(arch))
    weights = [I.projection_weights(arch)[n][1].weight for n in names]
    reference = [manual_loss_and_grads(model, weights, sample) for sample in a.samples]
    return model, arch, a, names, weights, reference


@pytest.mark.parametrize("method", ["hooks", "vmap", "loop"])
def test_per_sample_gradients_equal_single_sample_backward(method, llama64):
    model, arch, a, names, weights, reference = llama64
    g = I.per_sample_gradients(model, arch, a, method, batch_size=3)
    assert list(g.weights) == names
    for i, (loss, grads) in enumerate(reference):
        assert g.losses[i] == pytest.approx(loss, rel=1e-6)
        for n, want in zip(names, grads):
            got = g.full(n)[i]
            diff = float((got - want).abs().max())
            assert diff <= 1e-6, f"{method} sample {i} {n}: max |difference| {diff:.3g}"
    assert not any(w.requires_grad for w in weights) and all(w.grad is None for w in weights)


def test_per_sample_gradients_float32_agree_with_single_backward():
    """The float32 path (what runs in practice): equal to single-sample backward passes up to float32 rounding of
    differently shaped matrix products (padding, batch), and stored in float32."""
    model, tokenizer, arch = tiny("llama")
    a, _ = tasks(tokenizer)
    g = I.per_sample_gradients(model, arch, a, "hooks", batch_size=5)
    names = list(g.weights)
    weights = [g.weights[n][1].weight for n in names]
    for i in (0, 4):
        _, grads = manual_loss_and_grads(model, weights, a.samples[i])
        for n, want in zip(names, grads):
            got = g.full(n)[i]
            assert got.dtype == torch.float32
            assert float((got - want).abs().max()) <= 2e-5 * float(want.abs().max()) + 1e-9, n


def test_half_precision_model_accumulates_in_float32():
    model, tokenizer, arch = cached_model("random:llama", "eager", "bfloat16")
    a, b = tasks(tokenizer)
    g = I.per_sample_gradients(model, arch, a)
    assert all(g.full(n).dtype == torch.float32 for n in g.names(0))
    result = I.compute_interference(model, arch, a, b, min_samples_for_fisher=2, progress=False)
    for variant in result.variants:
        for block in I.BLOCKS:
            s = result.scores[variant][block]
            assert s.dtype == np.float32 and np.isfinite(s).all()
    assert (result.scores["magnitude"]["V"] > 0).any()


def test_query_reparametrisation_leaves_contributions_unchanged(llama_run):
    """Query projection scaled by 2 (q_proj.weight -> 2W, its output halved: the same function), so the gradients
    of the new weight halve. C_i/F is unchanged; the magnitude score halves, only through |g_j| (by design);
    signed and symmetric do not change; K, V, O are untouched."""
    model, tokenizer, arch, a, b, ga, gb = llama_run
    scaled = copy.deepcopy(model)
    scaled_arch = I.ArchInfo(**{**arch.__dict__, "model": scaled})
    for layer in range(arch.n_layers):
        q = scaled_arch.qkv_modules(layer)[0]
        q.weight.data.mul_(2.0)
        q.register_forward_hook(lambda m, args, out: out * 0.5)
    sa = I.per_sample_gradients(scaled, scaled_arch, a, batch_size=3)
    sb = I.per_sample_gradients(scaled, scaled_arch, b, batch_size=2)
    name = next(n for n in ga.names(1) if ".q_proj." in n)
    base_g, new_g = ga.full(name), sa.full(name)
    torch.testing.assert_close(new_g, 0.5 * base_g, rtol=1e-5, atol=1e-9)
    ratio = lambda g: I.normalised_contributions(g, I.fisher_denominator(g.square().mean(0), 1e-30))
    torch.testing.assert_close(ratio(new_g), ratio(base_g), rtol=1e-5, atol=1e-6)
    base = I.interference_from_gradients(arch, ga, gb, min_samples_for_fisher=2, eps=1e-30)
    new = I.interference_from_gradients(scaled_arch, sa, sb, min_samples_for_fisher=2, eps=1e-30)
    np.testing.assert_allclose(new.scores["magnitude"]["Q"], 0.5 * base.scores["magnitude"]["Q"], rtol=1e-4)
    for variant in ("signed", "symmetric"):
        np.testing.assert_allclose(new.scores[variant]["Q"], base.scores[variant]["Q"], rtol=1e-4,
                                   atol=1e-4 * np.abs(base.scores[variant]["Q"]).max())
    for block in ("K", "V", "O"):
        np.testing.assert_allclose(new.scores["magnitude"][block], base.scores["magnitude"][block], rtol=1e-4)


# ----------------------------------------------------------------------------- slices vs the modules' computation

def head_outputs(model, arch, layer, ids):
    """The input of the attention output projection at `layer` (heads concatenated): [T, n_heads, head_dim]."""
    seen = {}
    handle = arch.attn_out(layer).register_forward_pre_hook(lambda m, args: seen.update(x=args[0].detach().clone()))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        handle.remove()
    return seen["x"][0].reshape(ids.shape[1], arch.n_heads, arch.head_dim)


@pytest.mark.parametrize("arch_name", ["llama", "gpt_neox", "gpt2", "gemma3"])
def test_head_slices_match_the_attention_computation(arch_name):
    """Perturbing one head's Q slice changes only that query head's output; one KV head's K or V slice changes only
    the query heads of its group (GQA); an O slice acts only on its head's part of the output projection input."""
    model, tokenizer, arch = tiny(arch_name)
    model = copy.deepcopy(model)
    arch = I.ArchInfo(**{**arch.__dict__, "model": model})
    ids = torch.tensor([tokenizer("The quick brown fox jumps over the lazy dog again and again")["input_ids"]])
    layer = 1
    base = head_outputs(model, arch, layer, ids)
    group = arch.n_heads // arch.n_kv_heads
    slices = arch.block_param_slices(layer)
    for block in ("Q", "K", "V"):
        weight, slicer = slices[block]
        for h in range(arch.n_kv_heads if block in I.KV_BLOCKS else arch.n_heads):
            saved = weight.data.clone()
            weight.data[slicer(h)] += 0.5 * torch.randn_like(weight.data[slicer(h)])
            out = head_outputs(model, arch, layer, ids)
            weight.data.copy_(saved)
            changed = {q for q in range(arch.n_heads) if (out[:, q] - base[:, q]).abs().max() > 1e-6}
            expected = {h} if block == "Q" else set(range(h * group, (h + 1) * group))
            assert changed == expected, f"{arch_name} {block} head {h}: changed query heads {changed}"
            for q in set(range(arch.n_heads)) - expected:
                assert torch.equal(out[:, q], base[:, q])
    o, slicer = slices["O"]
    x = torch.randn(3, arch.n_heads * arch.head_dim)
    project = arch.attn_out(layer)
    for h in range(arch.n_heads):
        only_h = torch.zeros_like(x)
        only_h[:, h * arch.head_dim:(h + 1) * arch.head_dim] = x[:, h * arch.head_dim:(h + 1) * arch.head_dim]
        with torch.no_grad():
            before, before_h = project(x), project(only_h)
            saved = o.data.clone()
            o.data[slicer(h)] += torch.randn_like(o.data[slicer(h)])
            after, after_h = project(x), project(only_h)
            o.data.copy_(saved)
        torch.testing.assert_close(after - before, after_h - before_h, rtol=1e-5, atol=1e-5)
        assert (after - before).abs().max() > 1e-3


def test_gqa_scores_are_per_kv_head_not_copied(llama_run):
    model, tokenizer, arch, a, b, ga, gb = llama_run
    assert (arch.n_heads, arch.n_kv_heads) == (4, 2)
    result = I.interference_from_gradients(arch, ga, gb, min_samples_for_fisher=2)
    for block in I.BLOCKS:
        n_h = 2 if block in ("K", "V") else 4
        for variant in I.VARIANTS:
            assert result.scores[variant][block].shape == (5, 3, arch.n_layers, n_h)
    k = result.scores["magnitude"]["K"]
    assert not np.allclose(k[..., 0], k[..., 1])             # two distinct KV heads, each computed from its own rows
    assert result.heads("K") == 2 and result.fisher_mass["V"].shape == (arch.n_layers, 2)


def test_slice_shape_assertion_names_parameter_layer_head_block():
    model, tokenizer, arch = tiny("llama")
    names = {id(m.weight): n for n, (_, m) in I.projection_weights(arch).items()}
    I.check_block_slices(arch, 0, names)
    too_many_heads = I.ArchInfo(**{**arch.__dict__, "n_heads": 5})
    with pytest.raises(AssertionError, match=r"parameter model\.layers\.0\.self_attn\.q_proj\.weight \(layer 0, "
                                             r"head 4, block Q\): slice shape \(0, 64\)"):
        I.check_block_slices(too_many_heads, 0, names)
    wrong_head_dim = I.ArchInfo(**{**arch.__dict__, "head_dim": 8})
    with pytest.raises(AssertionError, match=r"q_proj\.weight \(layer 0, blocks Q\): the head slices leave elements out"):
        I.check_block_slices(wrong_head_dim, 0, names)


# ----------------------------------------------------------------------------- outputs, ids, empty and bad input

def test_top_conflicts_carry_the_true_sample_ids(llama_run, tmp_path):
    model, tokenizer, arch, *_ = llama_run
    ids_a = ["zeta", "alpha", "prompt-41", "q7", "m"]
    ids_b = ["b-9", "b-1", "x"]
    a, b = tasks(tokenizer, ids_a, ids_b)
    result = I.compute_interference(model, arch, a, b, min_samples_for_fisher=2, progress=False)
    paths = result.save(tmp_path, top_k=4)
    import pandas as pd
    top = pd.read_csv(paths["top_conflicts"])
    assert set(top.sample_a) <= set(ids_a) and set(top.sample_b) <= set(ids_b)
    for _, row in top.iterrows():
        s = result.scores[row.variant][row.block]
        assert s[ids_a.index(row.sample_a), ids_b.index(row.sample_b), row.layer, row["head"]] == pytest.approx(row.score, rel=1e-6)
    for variant in result.variants:
        for block in I.BLOCKS:
            s, rows = result.scores[variant][block], top[(top.variant == variant) & (top.block == block)]
            if variant == "signed":                           # conflicts only: the negative scores, most negative first
                assert len(rows) == min(4, int((s < 0).sum())) and (rows.score < 0).all()
                best = s.min()
            else:
                assert len(rows) == 4
                best = s.max()
            if len(rows):
                assert rows.sort_values("rank").score.iloc[0] == pytest.approx(best, rel=1e-6)
    back = I.InterferenceResult.load(tmp_path)
    assert back.ids_a == ids_a and back.ids_b == ids_b
    np.testing.assert_array_equal(back.scores["signed"]["K"], result.scores["signed"]["K"])
    summary = pd.read_csv(paths["summary"])
    assert len(summary) == len(I.VARIANTS) * 4 and summary["mean"].notna().all()


def test_empty_task_b_gives_empty_results_and_a_warning_never_nan(llama_run, tmp_path):
    from lib.plots import interference as plots
    model, tokenizer, arch, a, *_ = llama_run
    empty = I.TaskSamples("nothing", [])
    with pytest.warns(UserWarning, match="task B 'nothing' has no samples"):
        result = I.compute_interference(model, arch, a, empty, min_samples_for_fisher=2, progress=False)
    assert result.scores["magnitude"]["Q"].shape == (5, 0, arch.n_layers, arch.n_heads)
    assert result.scores["pooled"]["V"].shape == (5, 0, arch.n_layers, arch.n_kv_heads)
    for variant in result.variants:
        for block in I.BLOCKS:
            m = result.layer_head_mean(block, variant)
            assert np.isfinite(m).all() and not m.any()
    assert result.summary().select_dtypes("number").notna().all().all()
    assert np.isfinite(result.fisher_mass["Q"]).all()
    result.save(tmp_path)
    assert I.InterferenceResult.load(tmp_path).scores["signed"]["O"].shape == (5, 0, arch.n_layers, arch.n_heads)
    for fig in (plots.block_heatmaps(result), plots.layer_profiles(result), plots.pair_matrix(result)):
        assert fig.axes


def test_too_few_task_a_samples_is_a_clear_error_before_any_work(llama_run, tmp_path):
    model, tokenizer, arch, a, b, *_ = llama_run
    with pytest.raises(ValueError, match=r"task A 'math' has 5 sample\(s\).*min_samples_for_fisher=10"):
        I.compute_interference(model, arch, a, b, progress=False)          # library default: 10
    with pytest.raises(ValueError, match="eps must be > 0"):
        I.compute_interference(model, arch, a, b, eps=0.0, min_samples_for_fisher=2, progress=False)
    with pytest.raises(ValueError, match="unknown variants"):
        I.compute_interference(model, arch, a, b, variants=["fancy"], min_samples_for_fisher=2, progress=False)
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- sample sources

def fake_activations(path, tokenizer, per_category: int, model_spec: str):
    from lib.model.prompts import all_prompts
    prompts = [p for p in all_prompts() if p.prompt_id % 10 < per_category]
    encoded = [tokenizer(p.text)["input_ids"] for p in prompts]
    width = max(map(len, encoded))
    rng = np.random.default_rng(0)
    np.savez(path, tokens=rng.integers(3, 1000, (len(prompts), 5)),
             prompt_input_ids=np.array([[2] * (width - len(e)) + e for e in encoded]),
             prompt_lengths=np.array([len(e) for e in encoded]), prompt_ids=np.array([p.prompt_id for p in prompts]),
             prompt_category=np.array([p.category for p in prompts]), prompt_text=np.array([p.text for p in prompts]),
             model=np.array(model_spec))
    return prompts, encoded


def test_sample_sources_activations_auto_fallback_and_errors(tmp_path):
    model, tokenizer, arch = tiny("llama")
    cat_a, cat_b = "Basic Numerical Reasoning", "Syntax and Grammar Correction"
    kwargs = dict(out_dir=tmp_path, task_a=cat_a, task_b=cat_b, n_new_tokens=2, log=lambda m: logs.append(m))
    logs: list[str] = []
    with pytest.raises(ValueError, match="does not exist"):
        I.load_task_samples(model, tokenizer, arch, source="activations", min_samples_for_fisher=2, **kwargs)
    prompts, encoded = fake_activations(tmp_path / "activations.npz", tokenizer, 2, "random:llama")
    a, b = I.load_task_samples(model, tokenizer, arch, source="auto", min_samples_for_fisher=2, **kwargs)
    assert a.ids == ["prompt-20", "prompt-21"] and b.ids == ["prompt-0", "prompt-1"]
    assert list(a.samples[0].prompt_ids) == encoded[[p.prompt_id for p in prompts].index(20)]
    assert "activations" in a.source and len(a.samples[0].continuation_ids) == 5
    with pytest.raises(ValueError, match=r"holds 2 prompt\(s\) of task A .* fewer than min_samples_for_fisher=3"):
        I.load_task_samples(model, tokenizer, arch, source="activations", min_samples_for_fisher=3, **kwargs)
    logs.clear()
    a, b = I.load_task_samples(model, tokenizer, arch, source="auto", min_samples_for_fisher=3, max_samples=3, **kwargs)
    assert any("fewer than min_samples_for_fisher=3" in m and "generating" in m for m in logs)
    assert a.ids == ["prompt-20", "prompt-21", "prompt-22"] and a.source.startswith("generated")
    assert all(len(s.continuation_ids) == 2 for s in a.samples + b.samples)
    fake_activations(tmp_path / "activations.npz", tokenizer, 2, "random:gpt2")
    logs.clear()
    a, _ = I.load_task_samples(model, tokenizer, arch, source="auto", min_samples_for_fisher=2, max_samples=2, **kwargs)
    assert any("'random:gpt2'" in m for m in logs) and a.source.startswith("generated")
    with pytest.raises(ValueError, match="unknown task category"):
        I.load_task_samples(model, tokenizer, arch, source="generate", **{**kwargs, "task_a": "Cooking"})
    a, b = I.load_task_samples(model, tokenizer, arch, source="auto", texts_a=TEXTS_A, texts_b=[],
                               max_continuation_tokens=2, **kwargs)
    assert a.ids[0] == "A-000" and len(b) == 0 and max(len(s.continuation_ids) for s in a.samples) == 2


def test_text_and_file_samples(tmp_path):
    _, tokenizer, _ = tiny("llama")
    s = I.sample_from_text(tokenizer, "x", "Say hi ||| hi there")
    assert tokenizer.decode(s.continuation_ids).strip() == "hi there" and tokenizer.decode(s.prompt_ids) == "Say hi"
    whole = I.sample_from_text(tokenizer, "y", "a whole text scored as language modelling")
    assert len(whole.prompt_ids) == 1 and len(whole.continuation_ids) > 3
    path = tmp_path / "b.jsonl"
    path.write_text('{"id": "q1", "prompt": "Fix: he go", "continuation": "He goes"}\n{"id": "q2", "text": "plain text here"}\n')
    task = I.samples_from_file(tokenizer, path)
    assert task.ids == ["q1", "q2"] and task.name == "b"
    with pytest.raises(ValueError, match="duplicate sample ids"):
        I.samples_from_texts(tokenizer, ["a b c", "d e f"], "t", "A", ids=["same", "same"])
    with pytest.raises(ValueError, match="too few tokens"):
        I.sample_from_text(tokenizer, "z", "hi")
