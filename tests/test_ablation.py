"""lib.experiments.ablation: behaviour divergence under cumulative head ablation, checked against naive computations."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lib.experiments import ablation as A
from lib.storage import artifacts
from lib.model.loading import load_model
from lib.storage.store import ArtifactError, save_npz

T = 10
PROMPT_LENGTHS = (5, 9, 7, 6)


@pytest.fixture(scope="module")
def tiny():
    return load_model("random:llama")


def left_padded_prompts(rng, prompt_lengths) -> np.ndarray:
    """[prompts, max length] random token ids (3-1999) left-padded with id 2."""
    width = max(prompt_lengths)
    ids = np.full((len(prompt_lengths), width), 2, dtype=np.int64)
    for i, n in enumerate(prompt_lengths):
        ids[i, width - n:] = rng.integers(3, 2000, n)
    return ids


def write_run(folder: Path, arch, spec: str = "random:llama", seed: int = 0, prompt_lengths=PROMPT_LENGTHS,
              n_tokens: int = T, n_heads_rankings: int | None = None) -> Path:
    """A synthetic run folder: activations.npz (random prompts/tokens, left-padded) and rankings.csv."""
    rng = np.random.default_rng(seed)
    ids = left_padded_prompts(rng, prompt_lengths)
    layer, head = arch.head_map()
    save_npz(folder / "activations.npz", tokens=rng.integers(3, 2000, (len(prompt_lengths), n_tokens)),
             prompt_input_ids=ids, prompt_lengths=np.array(prompt_lengths), prompt_ids=np.arange(len(prompt_lengths)),
             prompt_category=np.array(["a", "b"] * (len(prompt_lengths) // 2) + ["a"] * (len(prompt_lengths) % 2)),
             head_layer=np.array(layer), head_index=np.array(head), n_layers=arch.n_layers, n_heads=arch.n_heads,
             n_kv_heads=arch.n_kv_heads, pad_token_id=2, model=spec, chat_template=False,
             activations=np.zeros((len(prompt_lengths), arch.total_heads, n_tokens), dtype=np.float32))
    h = n_heads_rankings or arch.total_heads
    pd.DataFrame({"head_idx": np.arange(h), "layer": np.arange(h) // arch.n_heads, "head": np.arange(h) % arch.n_heads,
                  "rank_diff": rng.random(h), "balance": rng.random(h)}).to_csv(folder / "rankings.csv", index=False)
    return folder


def naive_divergence(model, arch, inputs, removed, perturb=None, clean=None) -> np.ndarray:
    """Per prompt, one at a time, full logits, float64 log-softmax; heads removed by zeroing their output-projection
    weight columns (no hook), or weights changed by `perturb` (a context manager factory). `clean`: a list to
    fill with (or reuse) the clean log-probs."""
    from contextlib import nullcontext
    saved = []
    with torch.no_grad():
        for h in removed:
            layer, head = divmod(int(h), arch.n_heads)
            weight, index = arch.block_param_slices(layer)["O"]
            saved.append((weight, index(head), weight[index(head)].clone()))
            weight[index(head)] = 0.0

    def logp(i):
        ids = torch.as_tensor(np.concatenate([inputs.prompts[i], inputs.tokens[i, :-1]]))[None]
        with torch.inference_mode():
            logits = model(input_ids=ids).logits[0, len(inputs.prompts[i]) - 1:]
        return logits.double().log_softmax(-1)

    try:
        with perturb() if perturb else nullcontext():
            ablated = [logp(i) for i in range(len(inputs.prompts))]
    finally:
        with torch.no_grad():
            for weight, idx, original in saved:
                weight[idx] = original
    if clean is None:
        clean = []
    if not clean:
        clean.extend(logp(i) for i in range(len(inputs.prompts)))
    return np.array([(c.exp() * (c - a)).sum(-1).mean().item() for c, a in zip(clean, ablated)])


# ----------------------------------------------------------------------------- plan

def test_points_and_orderings(tmp_path, tiny):
    _, _, arch = tiny
    assert A.make_points(16, step_size=5).tolist() == [0, 5, 10, 15, 16]
    assert A.make_points(16).tolist() == list(range(17))
    assert A.make_points(16, fractions=[0.5, 0.25, 1.0]).tolist() == [0, 4, 8, 16]
    inputs, plan = A.prepare(write_run(tmp_path, arch), model="random:llama", variants=["balance"], n_random=3,
                             step_size=4, seed=7)
    ranks = inputs.rankings.set_index("head_idx")["balance"]
    kinds = [o.kind for o in plan.orderings]
    assert kinds == ["ranking", "random", "random", "random", "reverse"]
    rank_order = plan.orderings[0].order
    assert list(ranks.loc[list(rank_order)]) == sorted(ranks, reverse=True)          # most synergistic first
    assert plan.orderings[-1].order == rank_order[::-1]
    seeds = [o.seed for o in plan.orderings if o.kind == "random"]
    assert seeds == [7, 8, 9]
    for o in plan.orderings:
        assert sorted(o.order) == list(range(16))
    assert plan.orderings[1].order == tuple(np.random.default_rng(7).permutation(16).tolist())
    assert len({o.order for o in plan.orderings[1:4]}) == 3


def test_prompt_selection_spreads_over_categories():
    cats = np.array(["x"] * 4 + ["y"] * 4 + ["z"] * 4)
    assert A.select_prompt_rows(cats, 6) == [0, 1, 4, 5, 8, 9]
    assert A.select_prompt_rows(cats, 4) == [0, 1, 4, 8]
    assert A.select_prompt_rows(cats, None) == list(range(12))


# ----------------------------------------------------------------------------- divergence against truth

@pytest.mark.parametrize("spec", ["random:llama", "random:qwen3", "random:gpt2", "random:gpt_neox", "random:gemma3",
                                  "random:gemma3_multimodal", "random:gemma2", "random:mistral"])
def test_batched_divergence_equals_naive(tmp_path, spec):
    model, _, arch = load_model(spec)
    ids = torch.randint(3, 2000, (2, 9))
    with torch.inference_mode():                     # ArchInfo.base_model + logits_from_normed = the full model
        normed = arch.base_model()(input_ids=ids, use_cache=False).last_hidden_state
        torch.testing.assert_close(arch.logits_from_normed(normed), model(input_ids=ids).logits, rtol=0, atol=0)
    inputs, _ = A.prepare(write_run(tmp_path, arch, spec), model=spec, variants=["rank_diff"])
    rng = np.random.default_rng(3)
    removed = [rng.choice(arch.total_heads, k, replace=False).tolist() for k in (1, arch.total_heads - 2)]
    masks = torch.ones(len(removed), arch.total_heads)
    for m, r in enumerate(removed):
        masks[m, r] = 0.0
    engine = A.DivergenceEngine(model, arch, inputs, batch_size=5, logit_rows=2)   # batches mix masks and lengths
    assert engine.method == ("direct" if arch.final_logit_softcap else "linear")
    prompts = list(range(len(inputs.prompts)))
    got = engine.divergence(prompts, masks, engine.clean(prompts))
    clean = []
    for m, r in enumerate(removed):
        truth = naive_divergence(model, arch, inputs, r, clean=clean)
        assert truth.min() > 1e-5                                   # a real effect, not a trivially small one
        # float32 logits: "linear" is within ~1e-8 nats of the float64 truth, "direct" (soft-capped) within ~3e-7
        np.testing.assert_allclose(got[m], truth, rtol=2e-4, atol=1e-7 if engine.method == "linear" else 6e-7)


def test_linear_and_direct_methods_agree(tmp_path, tiny):
    model, _, arch = tiny
    inputs, _ = A.prepare(write_run(tmp_path, arch), model="random:llama", variants=["rank_diff"])
    masks = torch.ones(2, arch.total_heads)
    masks[0, [1, 6, 11]] = 0.0
    masks[1, :8] = 0.0
    prompts = [0, 1, 2, 3]
    out = {}
    for method in ("linear", "direct"):
        engine = A.DivergenceEngine(model, arch, inputs, batch_size=8, method=method)
        out[method] = engine.divergence(prompts, masks, engine.clean(prompts))
    np.testing.assert_allclose(out["linear"], out["direct"], rtol=1e-4)


def test_padding_matches_one_prompt_at_a_time(tmp_path, tiny):
    model, _, arch = tiny
    inputs, _ = A.prepare(write_run(tmp_path, arch), model="random:llama", variants=["rank_diff"])
    masks = torch.ones(3, arch.total_heads)
    masks[0, [0, 5]] = 0.0
    masks[1, 3:12] = 0.0
    prompts = [0, 1, 2, 3]
    batched = A.DivergenceEngine(model, arch, inputs, batch_size=64)
    single = A.DivergenceEngine(model, arch, inputs, batch_size=1)
    a = batched.divergence(prompts, masks, batched.clean(prompts))
    b = single.divergence(prompts, masks, single.clean(prompts))
    assert a[2].max() < 1e-7 and b[2].max() == 0.0           # unablated row (float noise only when padded)
    np.testing.assert_allclose(a[:2], b[:2], rtol=1e-5)


def run_plan(tmp_path, arch, model, **kwargs):
    kwargs = {"variants": ["rank_diff"], "n_random": 2, "step_size": 4, **kwargs}
    inputs, plan = A.prepare(tmp_path, model="random:llama", **kwargs)
    return inputs, plan, A.run_ablation(model, arch, inputs, plan, batch_size=kwargs.get("batch_size", 32),
                                        progress=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny):
    """One uninterrupted, unsharded run (step 4: points 0, 4, 8, 12, 16) for the identity tests."""
    model, _, arch = tiny
    folder = write_run(tmp_path_factory.mktemp("reference"), arch)
    return run_plan(folder, arch, model, batch_size=6)


def test_curves_zero_at_start_and_all_heads_equals_zeroed_o_proj(tiny, reference):
    model, _, arch = tiny
    inputs, plan, result = reference
    assert result.complete and result.n_removed[0] == 0 and result.n_removed[-1] == arch.total_heads
    assert (result.kl[:, 0] == 0.0).all()                                        # exactly 0, every ordering
    all_heads = naive_divergence(model, arch, inputs, range(arch.total_heads))
    for k in range(len(plan.orderings)):
        np.testing.assert_allclose(result.kl[k, -1], all_heads, rtol=2e-4)
    # a middle point of one random ordering against the naive computation
    k, j = 1, 2
    truth = naive_divergence(model, arch, inputs, plan.orderings[k].order[:plan.n_removed[j]])
    np.testing.assert_allclose(result.kl[k, j], truth, rtol=2e-4)
    frame = result.to_frame()
    assert list(frame.columns[:7]) == ["ordering", "variant", "seed", "n_removed", "fraction", "kl_mean", "kl_sem"]
    row = frame[(frame.ordering == "random") & (frame.seed == plan.orderings[k].seed) & (frame.n_removed == plan.n_removed[j])]
    assert row.kl_mean.item() == pytest.approx(truth.mean(), rel=2e-4)
    assert row.kl_sem.item() == pytest.approx(truth.std(ddof=1) / 2, rel=2e-3)


# ----------------------------------------------------------------------------- resume and shards

def test_resume_after_interruption_is_identical(tmp_path, tiny, reference):
    model, _, arch = tiny
    run_dir = write_run(tmp_path, arch)
    inputs, plan = A.prepare(run_dir, model="random:llama", variants=["rank_diff"], n_random=2, step_size=4)

    class Killed(Exception):
        pass

    def kill_after(n):
        if n == 3:
            raise Killed

    with pytest.raises(Killed):
        A.run_ablation(model, arch, inputs, plan, batch_size=6, progress=False, on_unit=kill_after)
    (path,) = run_dir.glob(artifacts.path("ablation_checkpoint", "", digest="*").name)
    ckpt = A.Checkpoint.load(path)
    assert ckpt.units_done() == (3, len(plan.units())) and not ckpt.complete
    calls = []
    resumed = A.run_ablation(model, arch, inputs, plan, batch_size=6, progress=False, on_unit=calls.append)
    assert len(calls) == len(plan.units()) - 3                                    # only the missing units
    np.testing.assert_array_equal(resumed.kl, reference[2].kl)


def test_shards_merge_to_the_single_run(tmp_path, tiny, reference):
    model, _, arch = tiny
    run_dir = write_run(tmp_path, arch)
    for i in (1, 3):
        part = run_plan(run_dir, arch, model, shard=f"{i}/3", batch_size=6)[2]
        assert not part.complete and artifacts.path("ablation_checkpoint", run_dir, shard=(i, 3)).exists()
    with pytest.raises(ArtifactError, match=r"missing shards \[2\] of 3.*shard='2/3'"):
        run_plan(run_dir, arch, model)
    assert not artifacts.path("ablation", run_dir).exists()
    run_plan(run_dir, arch, model, shard="2/3", batch_size=6)
    merged = run_plan(run_dir, arch, model)[2]
    assert merged.complete
    np.testing.assert_array_equal(merged.kl, reference[2].kl)
    # a shard computed with other settings is refused, naming the difference
    with pytest.raises(ArtifactError, match="other settings.*n_removed"):
        run_plan(run_dir, arch, model, step_size=5)


def test_incomplete_shard_is_refused(tmp_path, tiny):
    model, _, arch = tiny
    write_run(tmp_path, arch)
    inputs, plan = A.prepare(tmp_path, model="random:llama", variants=["rank_diff"], n_random=1, step_size=8,
                             shard="1/2")

    def stop(n):
        if n == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        A.run_ablation(model, arch, inputs, plan, progress=False, on_unit=stop)
    run_plan(tmp_path, arch, model, n_random=1, step_size=8, shard="2/2")
    with pytest.raises(ArtifactError, match=r"shard 1/2 \(1 of 2 units done\).*shard='1/2'"):
        run_plan(tmp_path, arch, model, n_random=1, step_size=8)


# ----------------------------------------------------------------------------- noise perturbation

def test_noise_perturbation(tmp_path, tiny):
    model, _, arch = tiny
    write_run(tmp_path, arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    heads = [1, 6]
    with A.perturbed_heads(arch, heads, 0.5, seed=3):
        changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
        q = arch.block_param_slices(1)["Q"]
        o = arch.block_param_slices(1)["O"]
        diff_q = (q[0] - before_param(model, q[0], before)).abs()
        diff_o = (o[0] - before_param(model, o[0], before)).abs()
    d = arch.head_dim
    assert changed == {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight",
                       "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.o_proj.weight"}
    assert (diff_q[2 * d:3 * d] > 0).all() and diff_q[:2 * d].sum() == 0 and diff_q[3 * d:].sum() == 0   # head 6 = (1, 2)
    assert (diff_o[:, 2 * d:3 * d] > 0).all() and diff_o[:, :2 * d].sum() == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())   # restored exactly

    inputs, plan, result = run_plan(tmp_path, arch, model, perturbation="noise", noise_sigma=0.3, step_size=8)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert (result.kl[:, 0] == 0).all() and (result.kl[:, 1:] > 0).all()
    k, j = 2, 1
    order = plan.orderings[k].order[:plan.n_removed[j]]
    truth = naive_divergence(model, arch, inputs, [], perturb=lambda: A.perturbed_heads(arch, order, 0.3, plan.seed))
    np.testing.assert_allclose(result.kl[k, j], truth, rtol=2e-4)
    np.testing.assert_allclose(result.kl[:, -1], np.broadcast_to(result.kl[0, -1], result.kl[:, -1].shape), rtol=1e-5)


def before_param(model, tensor, before):
    name = next(n for n, p in model.named_parameters() if p is tensor)
    return before[name]


# ----------------------------------------------------------------------------- tables

def synthetic_result(kl_rank, kl_random, kl_reverse, fractions_n=(0, 2, 4)):
    orderings = ([A.Ordering("ranking", "v", -1, tuple(range(4)))]
                 + [A.Ordering("random", A.RANDOM_VARIANT, s, tuple(range(4))) for s in range(len(kl_random))]
                 + [A.Ordering("reverse", "v", -1, tuple(range(4)))])
    kl = np.stack([kl_rank, *kl_random, kl_reverse])
    return A.AblationResult(orderings, np.array(fractions_n), 4, kl, np.arange(kl.shape[2]),
                            np.array(["c"] * kl.shape[2]))


def test_fraction_table_and_auc_ratio():
    rng = np.random.default_rng(0)
    base = np.array([[0.0] * 5, rng.random(5), 1 + rng.random(5)])          # [points, prompts]
    randoms = [base * (1 + 0.1 * s) for s in range(3)]
    result = synthetic_result(2 * base, randoms, 0.5 * base)
    table = result.fraction_table(fractions=[0.25, 0.5, 1.0])
    rnd_means = np.array([r.mean(-1) for r in randoms])                     # [seeds, points]
    at_quarter = rnd_means[:, 1] / 2                                        # 0.25 = halfway between 0 and 0.5
    row = table[table.fraction == 0.25].iloc[0]
    assert not row.on_grid and row.random_mean == pytest.approx(at_quarter.mean())
    assert row.random_sd == pytest.approx(at_quarter.std(ddof=1))
    row = table[table.fraction == 1.0].iloc[0]
    assert row.ranking_kl == pytest.approx(2 * base[2].mean()) and row.reverse_kl == pytest.approx(0.5 * base[2].mean())
    assert row.ratio == pytest.approx(2 * base[2].mean() / rnd_means[:, 2].mean())
    auc = result.auc_table(n_boot=500, resample_orders=False)
    rank = auc[auc.ordering == "ranking"].iloc[0]
    x = np.array([0, 0.5, 1.0])
    manual = np.trapezoid(2 * base.mean(-1), x) / np.mean([np.trapezoid(r.mean(-1), x) for r in randoms])
    assert rank.auc_ratio == pytest.approx(manual)
    assert rank.ci_low <= rank.auc_ratio <= rank.ci_high and rank.ci_high - rank.ci_low < 0.05  # ratio fixed per prompt
    rev = auc[auc.ordering == "reverse"].iloc[0]
    assert rev.auc_ratio == pytest.approx(manual / 4)
    joint = result.auc_table(n_boot=500).query("ordering == 'ranking'").iloc[0]   # random orders resampled too
    assert joint.auc_ratio == pytest.approx(manual) and joint.ci_high - joint.ci_low > 0.1
    assert rank.percentile == 100.0 and rev.percentile == 0.0


def test_auc_over_part_of_the_range_matches_hand_trapezoid():
    kl = np.array([[0.0, 1.0, 3.0], [0.0, 2.0, 2.0]])[:, :, None] * np.ones((1, 1, 2))   # [orderings, points, prompts]
    orderings = [A.Ordering("ranking", "v", -1, (0, 1, 2, 3)), A.Ordering("random", A.RANDOM_VARIANT, 0, (3, 2, 1, 0))]
    result = A.AblationResult(orderings, np.array([0, 2, 4]), 4, kl, np.arange(2), np.array(["c", "c"]))
    # ranking over [0, 0.75]: 0..0.5 -> (0 + 1) / 2 * 0.5 = 0.25; 0.5..0.75 (KL 1 -> 2 at 0.75) -> 1.5 * 0.25
    assert result.prompt_auc(0.75)[0] == pytest.approx([0.25 + 0.375] * 2)
    assert result.prompt_auc(0.5)[1] == pytest.approx([0.5, 0.5])
    assert result.prompt_auc()[0] == pytest.approx([0.25 + 1.0] * 2)
    with pytest.raises(ValueError, match="max_fraction"):
        result.prompt_auc(1.5)


def test_ranking_equal_to_a_random_order_sits_inside_the_random_spread():
    rng = np.random.default_rng(3)
    curves = [np.vstack([np.zeros(8), (1 + 0.3 * rng.standard_normal()) * rng.random((2, 8)).cumsum(0)]) for _ in range(21)]
    result = synthetic_result(curves[0], curves[:20], curves[20])              # ranking = random order 0
    row = result.auc_table(n_boot=1000).query("ordering == 'ranking'").iloc[0]
    per_order = result.prompt_auc()[1:21].mean(-1)
    expected = 100 * (np.mean(per_order < per_order[0]) + 0.5 / 20)            # itself counts as a tie
    assert row.percentile == pytest.approx(expected) and 0 < row.percentile < 100


def test_layer_matched_orders_keep_every_prefix_histogram():
    layers = np.repeat(np.arange(5), 4)
    rankings = pd.DataFrame({"head_idx": np.arange(20), "layer": layers, "head": np.tile(np.arange(4), 5),
                             "v": np.random.default_rng(0).random(20)})
    orders = A.make_orderings(rankings, ["v"], n_random=2, include_reverse=True, seed=7, n_matched=3)
    assert [o.kind for o in orders] == ["ranking", "random", "random", "reverse"] + ["matched"] * 3 + \
        ["matched_reverse"] * 3
    for target, matched in ((orders[0], orders[4:7]), (orders[3], orders[7:10])):
        own = np.array(target.order)
        for o in matched:
            m = np.array(o.order)
            assert sorted(m) == list(range(20)) and o.label == f"{o.kind}:v:seed={o.seed}"
            assert all(np.array_equal(np.bincount(layers[own[:k]], minlength=5), np.bincount(layers[m[:k]], minlength=5))
                       for k in range(21))
        assert len({o.order for o in matched} | {target.order}) == 4          # differ from their target and each other


def test_each_ordering_is_layer_matched_to_its_own_layer_sequence_planted():
    """Planted: 3 layers x 2 heads (head h in layer h // 2); scores put the ranking at heads 4 5 0 2 1 3, i.e.
    layers 2 2 0 1 0 1, so its reverse 3 1 2 0 5 4 runs through layers 1 0 1 0 2 2 (written out by hand)."""
    score = np.zeros(6)
    score[[4, 5, 0, 2, 1, 3]] = [6, 5, 4, 3, 2, 1]
    rankings = pd.DataFrame({"head_idx": np.arange(6), "layer": np.arange(6) // 2, "head": np.arange(6) % 2,
                             "v": score / 6, "w": score[::-1] / 6})
    orders = A.make_orderings(rankings, ["v", "w"], n_random=0, include_reverse=True, seed=0, n_matched=4)
    layer_of = lambda o: [h // 2 for h in o.order]                          # noqa: E731
    assert orders[0].order == (4, 5, 0, 2, 1, 3) and orders[2].order == (3, 1, 2, 0, 5, 4)
    for o in orders:
        if o.variant == "v" and o.kind == "matched":
            assert layer_of(o) == [2, 2, 0, 1, 0, 1]
        if o.variant == "v" and o.kind == "matched_reverse":
            assert layer_of(o) == [1, 0, 1, 0, 2, 2]
    by = {(o.kind, o.variant): o for o in orders if o.kind in ("ranking", "reverse")}
    for o in orders:                                                          # variant w: its own sequences too
        if o.variant == "w" and o.kind.startswith("matched"):
            target = by[("ranking" if o.kind == "matched" else "reverse", "w")]
            assert layer_of(o) == layer_of(target)
    assert sum(o.kind.startswith("matched") for o in orders) == 2 * 2 * 4


def test_auc_table_rows_for_every_ordering_against_its_own_matched_controls():
    """Planted curves: random orders' AUC x 1, 1.5, 2 (per prompt); ranking x 3; reverse x 0.5; the ranking's
    matched orders x 2 and the reverse's x 1 -> ratios by hand."""
    base = np.array([[0.0] * 6, np.linspace(1, 2, 6), np.linspace(2, 4, 6)])              # [points, prompts]
    o = lambda kind, variant, seed=-1: A.Ordering(kind, variant, seed, tuple(range(4)))    # noqa: E731
    orderings = ([o("ranking", "v"), o("reverse", "v")] + [o("random", A.RANDOM_VARIANT, s) for s in range(3)]
                 + [o("matched", "v", s) for s in range(2)] + [o("matched_reverse", "v", s) for s in range(2)])
    factors = [3, 0.5, 1, 1.5, 2, 2, 2, 1, 1]
    kl = np.stack([f * base for f in factors])
    result = A.AblationResult(orderings, np.array([0, 2, 4]), 4, kl, np.arange(6), np.array(["c"] * 6))
    auc = result.auc_table(n_boot=400).set_index("ordering")
    assert auc.loc["ranking", "auc_ratio"] == pytest.approx(3 / 1.5)
    assert auc.loc["reverse", "auc_ratio"] == pytest.approx(0.5 / 1.5)
    assert auc.loc["ranking", "matched_ratio"] == pytest.approx(3 / 2)            # vs its own matched orders
    assert auc.loc["reverse", "matched_ratio"] == pytest.approx(0.5 / 1)          # vs the reverse's own
    assert (auc.n_matched == 2).all() and (auc.n_random == 3).all()
    assert auc.loc["ranking", "matched_se"] == pytest.approx(0, abs=1e-12)        # identical matched orders, fixed ratio
    ratios = np.array([1, 1.5, 2]) / 1.5                                          # the random orders' own ratios
    assert auc.loc["ranking", "random_band_low"] == pytest.approx(np.quantile(ratios, 0.025))
    assert auc.loc["ranking", "random_band_high"] == pytest.approx(np.quantile(ratios, 0.975))
    # se: the bootstrap sd, which resampling the random orders makes positive here; with them fixed the ratio is
    # the same for every prompt resample, so se = 0
    assert auc.loc["ranking", "se"] > 0.05
    fixed = result.auc_table(n_boot=400, resample_orders=False).set_index("ordering")
    assert fixed.loc["ranking", "se"] == pytest.approx(0, abs=1e-12)


def test_se_is_the_sd_of_the_bootstrap_ratio():
    rng = np.random.default_rng(5)
    base = np.array([[0.0] * 30, rng.random(30), 1 + rng.random(30)])
    result = synthetic_result(base * (1 + rng.random(30)), [base, base * 1.1], base)
    row = result.auc_table(n_boot=4000, resample_orders=False).query("ordering == 'ranking'").iloc[0]
    auc = result.prompt_auc()
    idx = np.random.default_rng(0).integers(0, 30, size=(4000, 30))                   # the table's resample
    boot = auc[0, idx].mean(-1) / auc[1:3][:, idx].mean(-1).mean(0)
    assert row.se == pytest.approx(boot.std(ddof=1), rel=1e-9)
    assert row.ci_high - row.ci_low == pytest.approx(2 * 1.96 * row.se, rel=0.15)     # near normal here


def test_bootstrap_ci_widens_with_prompt_heterogeneity():
    rng = np.random.default_rng(1)
    base = np.array([[0.0] * 40, rng.random(40), 1 + rng.random(40)])
    factor = np.where(np.arange(40) % 2 == 0, 0.5, 3.0)                       # ranking hurts some prompts more
    result = synthetic_result(base * factor, [base, base * 1.05], base)
    row = result.auc_table(n_boot=1000).query("ordering == 'ranking'").iloc[0]
    assert row.ci_low < row.auc_ratio < row.ci_high and row.ci_high - row.ci_low > 0.2


def test_save_load_roundtrip_and_figures(tmp_path, tiny):
    model, _, arch = tiny
    write_run(tmp_path, arch)
    result = run_plan(tmp_path, arch, model, step_size=8, variants=["rank_diff", "balance"])[2]
    result.save(tmp_path)
    loaded = A.AblationResult.load(tmp_path)
    np.testing.assert_array_equal(loaded.kl, result.kl)
    assert [o.label for o in loaded.orderings] == [o.label for o in result.orderings]
    csv = pd.read_csv(artifacts.path("ablation", tmp_path), keep_default_na=False)
    assert len(csv) == len(result.orderings) * len(result.n_removed)
    assert set(csv.variant) == {"rank_diff", "balance", A.RANDOM_VARIANT}
    from lib.plots.ablation import plot_ablation_curves, plot_prompt_auc_ratios
    fig = plot_ablation_curves(result)
    ax = fig.axes[0]
    assert "fraction of heads" in ax.get_xlabel() and "nats" in ax.get_ylabel()
    labels = ax.get_legend_handles_labels()[1]
    assert any("random" in lab for lab in labels) and sum("reverse" in lab for lab in labels) == 2
    assert plot_prompt_auc_ratios(result).axes[0].get_xlabel()


# ----------------------------------------------------------------------------- bad input

def listing(folder: Path):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("kwargs, pattern", [
    ({"variants": ["nope"]}, r"variant\(s\) \['nope'\] not in .*available: \['rank_diff', 'balance'\].*04_ranking_variants"),
    ({"step_size": 0}, r"step_size must be an integer in \[1, 16\]"),
    ({"step_size": 17}, r"step_size must be an integer in \[1, 16\]"),
    ({"step_size": None, "fractions": [0.0, 0.5]}, r"fractions must lie in \(0, 1\].*\[0.0\]"),
    ({"step_size": None, "fractions": [0.5, 1.5]}, r"fractions must lie in \(0, 1\].*\[1.5\]"),
    ({"shard": "3/2"}, r"shard must be '' .* 1 <= i <= n.*'3/2'"),
    ({"perturbation": "noise"}, r"noise_sigma > 0"),
    ({"model": "random:gpt2"}, r"greedy tokens of model 'random:llama'.*model='random:gpt2'"),
])
def test_bad_parameters_fail_clearly_and_write_nothing(tmp_path, tiny, kwargs, pattern):
    write_run(tmp_path, tiny[2])
    before = listing(tmp_path)
    params = {"model": "random:llama", "variants": ["rank_diff"], "step_size": 1, **kwargs}
    with pytest.raises(ValueError, match=pattern):
        A.prepare(tmp_path, **params)
    assert listing(tmp_path) == before


def test_bad_artifacts_fail_clearly_and_write_nothing(tmp_path, tiny):
    arch = tiny[2]
    write_run(tmp_path, arch, n_heads_rankings=20)                             # rankings of another model
    before = listing(tmp_path)
    with pytest.raises(ArtifactError, match="rankings.csv has 20 heads but .*activations.npz has 16"):
        A.prepare(tmp_path, model="random:llama", variants=["rank_diff"])
    (tmp_path / "activations.npz").unlink()
    with pytest.raises(ArtifactError, match="missing artifact .*activations.npz.*01_extract_activations"):
        A.prepare(tmp_path, model="random:llama", variants=["rank_diff"])
    assert listing(tmp_path) == [p for p in before if p != "activations.npz"]


@pytest.mark.slow(reason="kills a process with SIGKILL and reruns it")
def test_resume_after_sigkill_is_identical(tmp_path, tiny, reference):
    """A separate process killed with SIGKILL after 2 points; the rerun resumes and matches the reference."""
    import subprocess
    import sys
    model, _, arch = tiny
    write_run(tmp_path, arch)
    script = f"""
import os, signal
from lib.experiments import ablation as A
from lib.model.loading import load_model
model, _, arch = load_model("random:llama")
inputs, plan = A.prepare({str(tmp_path)!r}, model="random:llama", variants=["rank_diff"], n_random=2, step_size=4)
def kill(n):
    if n == 2:
        os.kill(os.getpid(), signal.SIGKILL)
A.run_ablation(model, arch, inputs, plan, batch_size=6, progress=False, on_unit=kill)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    (path,) = tmp_path.glob(artifacts.path("ablation_checkpoint", "", digest="*").name)
    assert A.Checkpoint.load(path).units_done()[0] == 2
    inputs, plan = A.prepare(tmp_path, model="random:llama", variants=["rank_diff"], n_random=2, step_size=4)
    calls = []
    resumed = A.run_ablation(model, arch, inputs, plan, batch_size=6, progress=False, on_unit=calls.append)
    assert len(calls) == len(plan.units()) - 2
    np.testing.assert_array_equal(resumed.kl, reference[2].kl)


def test_random_band_never_drawn_below_zero_on_the_log_axis():
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.collections import PolyCollection
    from lib.plots.ablation import plot_ablation_curves
    base = np.array([[0.0] * 3, [0.01] * 3, [1.0] * 3])                      # [points, prompts]
    result = synthetic_result(base, [base * 0.05, base * 2.0, base * 0.1], base * 0.5)   # sd > mean at every point
    fig = plot_ablation_curves(result)
    for ax in fig.axes[:2]:
        bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
        assert bands
        lowest = min(p.vertices[:, 1].min() for b in bands for p in b.get_paths())
        assert lowest >= 0 and (ax.get_yscale() != "log" or lowest >= ax.get_ylim()[0] * (1 - 1e-9) > 0)
    assert fig.axes[1].get_yscale() == "log"
