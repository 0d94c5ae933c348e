"""Neuron effects: the fast paths against independent whole-model references on six architectures and SmolLM2,
the metrics against hand computation, neuron sets, prompts, shards / merge / resume, and bad input."""
import copy
import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

from lib.storage import artifacts
from lib.experiments import neurons as N
from lib.storage.checkpoints import CheckpointMismatch, differences, parse_shard
from lib.experiments.neurons import pipeline
from lib.experiments.extract import encode_prompts
from lib.model.architectures import arch_info
from lib.model.prompts import select_prompts
from lib.storage.store import ArtifactError, save_npz
from tests.conftest import cached_model

TOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on the shared 2-core machine two OpenMP threads per process contend badly (measured
    8x slower under load); restored after this module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- independent references (batch 1)

def _out_hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _inject(layer_module, v):
    def hook(module, args, output):
        h = _out_hidden(output).clone()
        h[:, -1] += v
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h
    return layer_module.register_forward_hook(hook)


@torch.no_grad()
def ref_clean(model, arch, ids):
    """Clean whole-prompt forward: (logits at the last position, {site index: output at the last position}) for
    every layer's attention output projection and MLP down projection (site 2*l and 2*l+1)."""
    sites = [m for l in range(arch.n_layers) for m in (arch.attn_out(l), arch.mlp_down(l))]
    saved = {}
    handles = [m.register_forward_hook(lambda mod, a, o, i=i: saved.__setitem__(i, o[:, -1].clone()))
               for i, m in enumerate(sites)]
    try:
        logits = model(input_ids=ids[None], logits_to_keep=1).logits[0, -1].float()
    finally:
        for h in handles:
            h.remove()
    return logits, saved


@torch.no_grad()
def ref_total(model, arch, ids, layer, v, clean):
    """Whole prompt, all layers, V added to block `layer`'s output at the last position: effect [V]."""
    handle = _inject(arch.layers()[layer], v)
    try:
        pert = model(input_ids=ids[None], logits_to_keep=1).logits[0, -1].float()
    finally:
        handle.remove()
    return pert - clean[0]


@torch.no_grad()
def ref_frozen(model, arch, ids, layer, v, clean):
    """V injected after `layer`; every later attention output projection and MLP down projection output patched
    to its clean value at the last position: effect [V]."""
    def patch(i):
        def hook(mod, a, o):
            o = o.clone()
            o[:, -1] = clean[1][i]
            return o
        return hook
    handles = [m.register_forward_hook(patch(2 * l + j)) for l in range(layer + 1, arch.n_layers)
               for j, m in enumerate((arch.attn_out(l), arch.mlp_down(l)))]
    handles.append(_inject(arch.layers()[layer], v))
    try:
        pert = model(input_ids=ids[None], logits_to_keep=1).logits[0, -1].float()
    finally:
        for h in handles:
            h.remove()
    return pert - clean[0]


def _prompts(tokenizer, n=2):
    texts = [p.text for p in select_prompts(n)]
    ids = encode_prompts(tokenizer, texts, True)
    return N.PromptSet([torch.tensor(i) for i in ids], list(range(n)), texts, [""] * n, "test")


def _check_against_references(model, arch, prompts, neurons, scale, min_effect, tol=TOL):
    clean = N.clean_pass(model, arch, prompts)
    dirs = N.neuron_directions(arch, neurons)
    layers = torch.tensor([n.layer for n in neurons])
    worst_total = worst_direct = biggest = 0.0
    for p in range(len(prompts)):
        vec = dirs * scale[:, p, None].to(dirs.dtype)
        vec_b = torch.cat([torch.zeros_like(vec[:1]), vec])
        lay_b = torch.cat([layers.min()[None], layers])
        fast = {skip: N.total_logits_incremental(model, arch, clean, p, lay_b, vec_b, skip) for skip in (True, False)}
        alg = N.direct_logits(arch, clean.h_final[p], vec_b)
        ref = ref_clean(model, arch, prompts.input_ids[p])
        for j, n in enumerate(neurons):
            total = ref_total(model, arch, prompts.input_ids[p], n.layer, vec[j], ref)
            frozen = ref_frozen(model, arch, prompts.input_ids[p], n.layer, vec[j], ref)
            for logits in fast.values():
                worst_total = max(worst_total, float((logits[j + 1] - logits[0] - total).abs().max()))
            worst_direct = max(worst_direct, float((alg[j + 1] - alg[0] - frozen).abs().max()))
            biggest = max(biggest, float(total.abs().max()), float(frozen.abs().max()))
    assert biggest > min_effect, f"effects too small ({biggest}) for the comparison to mean anything"
    assert worst_total < tol, f"batched last-position total effect vs full forward: {worst_total}"
    assert worst_direct < tol, f"algebraic direct effect vs frozen-downstream run: {worst_direct}"
    return clean


# ----------------------------------------------------------------------------- exactness on every architecture

def test_fast_paths_equal_whole_model_references(tiny_arch, tmp_path):
    name, model, tokenizer, arch = tiny_arch
    prompts = _prompts(tokenizer, 2)
    assert min(len(i) for i in prompts.input_ids) > 20          # longer than gemma3's sliding window (16)
    neurons = [N.Neuron(l, n) for l in range(arch.n_layers) for n in (3, arch.d_mlp - 1)]
    scale = torch.full((len(neurons), 2), 40.0)                # big V: effects of order 0.1-1 on tiny models
    clean = _check_against_references(model, arch, prompts, neurons, scale, 1e-2)
    # the clean pass: h_final = last block output reproduces the model's logits; activations = down_proj input
    with torch.no_grad():
        full = model(input_ids=prompts.input_ids[0][None]).logits[0, -1].float()
    assert float((clean.logits[0] - full).abs().max()) < 1e-4
    got = {}
    h = arch.mlp_down(1).register_forward_pre_hook(lambda m, a: got.__setitem__("a", a[0][0, -1].clone()))
    with torch.no_grad():
        model(input_ids=prompts.input_ids[1][None])
    h.remove()
    torch.testing.assert_close(clean.acts[1, 1], got["a"], atol=1e-5, rtol=1e-4)
    # the rows written to neuron_effects.csv: indirect + direct == total, target effects as the references say
    setup = N.prepare(model, tokenizer, arch, out_dir=tmp_path, n_prompts=1, neurons=[n.id for n in neurons],
                      activation_scale="unit", progress=False)
    frame = N.compute_batch(setup, setup.neurons, 0)
    np.testing.assert_allclose(frame["direct"] + frame["indirect"], frame["total"], rtol=0, atol=1e-12)
    ids, t = setup.prompts.input_ids[0], setup.target_ids[0]
    ref = ref_clean(model, arch, ids)
    for row, n in zip(frame.itertuples(), setup.neurons):
        v = arch.down_proj_weight(n.layer)[:, n.neuron]
        assert row.total == pytest.approx(float(ref_total(model, arch, ids, n.layer, v, ref)[t]), abs=TOL)
        assert row.direct == pytest.approx(float(ref_frozen(model, arch, ids, n.layer, v, ref)[t]), abs=TOL)


@pytest.mark.parametrize("arch_name", ["gemma3", "gpt_neox"])
def test_fast_paths_with_sdpa_attention(arch_name):
    model, tokenizer, arch = cached_model(f"random:{arch_name}")
    neurons = [N.Neuron(0, 5), N.Neuron(2, 7), N.Neuron(arch.n_layers - 1, 1)]
    _check_against_references(model, arch, _prompts(tokenizer, 2), neurons, torch.full((3, 2), 40.0), 1e-2)


def test_lower_blocks_are_skipped_and_restored():
    model, tokenizer, arch = cached_model("random:qwen3")
    prompts = _prompts(tokenizer, 1)
    clean = N.clean_pass(model, arch, prompts)
    calls = []
    handles = [arch.attention(l).register_forward_hook(lambda m, a, o, l=l: calls.append(l)) for l in range(4)]
    vec = N.neuron_directions(arch, [N.Neuron(2, 0)]) * 30
    N.total_logits_incremental(model, arch, clean, 0, torch.tensor([2]), vec, skip_lower=True)
    assert calls == [3]                                     # blocks 0-2 come from the cache, only block 3 runs
    calls.clear()
    N.total_logits_incremental(model, arch, clean, 0, torch.tensor([2]), vec, skip_lower=False)
    assert calls == [0, 1, 2, 3]
    for h in handles:
        h.remove()
    assert all("forward" not in block.__dict__ for block in arch.layers())


def test_smollm2_actual_activations(smollm2):
    model, tokenizer, arch = smollm2
    prompts = _prompts(tokenizer, 1)
    clean = N.clean_pass(model, arch, prompts)
    neurons = [N.Neuron(l, int(clean.acts[0, l].abs().argmax())) for l in (0, 15, 29)]
    _, scale = N.neuron_scales(clean, neurons, "actual")
    _check_against_references(model, arch, prompts, neurons, scale, 1e-3)
    # float32 leaves 5e-5..8e-5 of summation-order noise here (residual entries in the hundreds); in float64 the two
    # computations agree far below float32 resolution, which shows the fast paths are exact, not just close
    model64 = copy.deepcopy(model).double()
    _check_against_references(model64, arch_info(model64, source=arch.source), prompts, neurons, scale, 1e-3, tol=1e-5)


# ----------------------------------------------------------------------------- metrics of a batch

def test_compute_batch_metrics_match_hand_computation(tmp_path):
    model, tokenizer, arch = cached_model("random:llama")
    setup = N.prepare(model, tokenizer, arch, out_dir=tmp_path, n_prompts=2, selector="random", n_neurons=6,
                      activation_scale="unit", mode="ablate", topk=4, progress=False)
    frame = N.compute_batch(setup, setup.neurons, 1)
    ids = setup.prompts.input_ids[1]
    t, d = setup.target_ids[1], setup.distractor_ids[1]
    top2 = setup.clean.logits[1].topk(2).indices.tolist()
    ref = ref_clean(model, arch, ids)
    assert (t, d) == tuple(top2)                                   # default target / distractor
    for row, n in zip(frame.itertuples(), setup.neurons):
        v = -arch.down_proj_weight(n.layer)[:, n.neuron]          # ablate, unit scale
        total = ref_total(model, arch, ids, n.layer, v, ref)
        direct = ref_frozen(model, arch, ids, n.layer, v, ref)
        assert row.total == pytest.approx(float(total[t]), abs=TOL)
        assert row.direct == pytest.approx(float(direct[t]), abs=TOL)
        assert row.direct + row.indirect == pytest.approx(row.total, abs=1e-12)
        assert row.diff_total == pytest.approx(float(total[t] - total[d]), abs=TOL)
        assert row.diff_indirect == pytest.approx(float((total - direct)[t] - (total - direct)[d]), abs=TOL)
        assert row.max_abs_total == pytest.approx(float(total.abs().max()), abs=TOL)
        assert row.mean_abs_direct == pytest.approx(float(direct.abs().mean()), abs=TOL)
        clean = setup.clean.logits[1]
        assert row.dprob_total == pytest.approx(float(torch.softmax(clean + total, -1)[t] - torch.softmax(clean, -1)[t]),
                                                abs=1e-6)
        top = [int(x) for x in row.top_total_ids.split()]
        effs = [float(x) for x in row.top_total_effects.split()]
        assert len(top) == 4 and set(top[:2]) == set(total.abs().topk(2).indices.tolist())
        np.testing.assert_allclose(effs, total[top].numpy(), atol=TOL)
        ratio = abs(row.direct) / (abs(row.direct) + abs(row.indirect))
        assert row.direct_ratio == pytest.approx(ratio if abs(row.total) >= 1e-6 else 0.5)
        assert row.aligned == (row.direct * row.indirect > 0)
        assert row.scale == 1.0 and row.activation == pytest.approx(float(setup.clean.acts[1, n.layer, n.neuron]))


def test_zero_vector_gives_exactly_zero_effect(tmp_path):
    model, tokenizer, arch = cached_model("random:qwen2")
    setup = N.prepare(model, tokenizer, arch, out_dir=tmp_path, n_prompts=1, neurons=[[1, 4], [2, 9]],
                      progress=False)
    setup.clean.acts[0, 1, 4] = 0.0                                # this neuron is silent: V = 0
    frame = N.compute_batch(setup, setup.neurons, 0)
    row = frame.iloc[0]
    # the clean reference row sits in the same batch: only rounding is left (identical rows of one GEMM may differ
    # in the last bit), and the 1e-6 rule turns that into "no effect to split"
    assert row.direct == 0.0 and abs(row.total) < 1e-6 and row.max_abs_total < 1e-6
    assert row.direct_ratio == 0.5 and not row.aligned
    assert frame.iloc[1].max_abs_total > 1e-4


def test_targets_from_params(tmp_path):
    model, tokenizer, arch = cached_model("random:llama")
    targets = [{"target": " the", "distractor": " a"}, {"target": " and"}]
    setup = N.prepare(model, tokenizer, arch, out_dir=tmp_path, n_prompts=2, neurons=["L0/N1"], targets=targets,
                      progress=False)
    the, a, and_ = (tokenizer.encode(s, add_special_tokens=False)[0] for s in (" the", " a", " and"))
    assert setup.target_ids == [the, and_]
    top = setup.clean.logits[1].topk(2).indices.tolist()
    assert setup.distractor_ids == [a, top[0] if top[0] != and_ else top[1]]


# ----------------------------------------------------------------------------- summaries

def _synthetic(direct, indirect, layer=0, neuron=0):
    n = len(direct)
    d, i = np.asarray(direct, float), np.asarray(indirect, float)
    return pd.DataFrame({"layer": layer, "neuron": neuron, "prompt": range(n), "prompt_id": range(n),
                         "target_id": 5, "direct": d, "indirect": i, "total": d + i, "diff_total": d + i,
                         "dprob_total": 0.0, "activation": 1.0, "top_total_ids": "7 8", "top_total_effects": "0.5 -0.1",
                         "direct_ratio": N.direct_ratio(d, i, d + i), "aligned": d * i > 0})


def test_direct_ratio_and_classes():
    np.testing.assert_allclose(N.direct_ratio([1, 0, 3, 1e-8, 2], [3, 2, 1, -1e-8, -2]), [0.25, 0, 0.75, 0.5, 0.5])
    assert list(N.classify([0.29, 0.3, 0.7, 0.71])) == ["routing-dominant", "mixed", "mixed", "logit-dominant"]
    assert list(N.classify([0.45, 0.55], (0.5, 0.5))) == ["routing-dominant", "logit-dominant"]


def test_neuron_and_layer_summaries():
    a = _synthetic([1.0, 1.0, 3.0, 0.9], [-3.0, 3.0, 1.0, 0.1], layer=0, neuron=2)   # ratios .25 .25 .75 .9
    b = _synthetic([0.1, 0.2], [-1.0, -1.0], layer=2, neuron=0)
    summaries = N.summarize_neurons(pd.concat([a, b], ignore_index=True), (0.3, 0.7))
    s = summaries[0]
    assert s["id"] == "L0/N2" and s["n_prompts"] == 4
    e = s["effect_summary"]
    ratios = np.array([0.25, 0.25, 0.75, 0.9])
    assert e["direct_ratio_mean"] == pytest.approx(ratios.mean()) and e["direct_ratio_std"] == pytest.approx(ratios.std())
    assert e["direct_ratio_median"] == pytest.approx(0.5) and e["classification"] == "mixed"   # mean 0.5375
    assert e["consistency"] == 0.0                              # no single prompt is "mixed"
    assert s["sign_alignment"] == {"aligned_fraction": 0.75, "n_aligned": 3, "reading": "reinforcing"}
    assert [p["class"] for p in s["per_prompt_breakdown"]] == ["routing-dominant"] * 2 + ["logit-dominant"] * 2
    assert e["top_tokens"][0] == {"id": 7, "n_prompts": 4, "mean_effect": 0.5}
    t = summaries[1]
    assert t["effect_summary"]["classification"] == "routing-dominant" and t["effect_summary"]["consistency"] == 1.0
    assert t["sign_alignment"]["reading"] == "opposing"
    layers = N.layer_summary(summaries, 3)
    assert list(layers["n_neurons"]) == [1, 0, 1]
    assert list(layers["n_mixed"]) == [1, 0, 0] and list(layers["n_routing-dominant"]) == [0, 0, 1]
    assert layers.loc[0, "mean_direct_ratio"] == pytest.approx(ratios.mean())
    assert np.isnan(layers.loc[1, "mean_direct_ratio"])


def test_layer_trend_readings():
    def summaries(ratios_by_layer):
        frames = [_synthetic([r, r], [1 - r, 1 - r], layer=l, neuron=j)
                  for l, ratios in enumerate(ratios_by_layer) for j, r in enumerate(ratios)]
        return N.summarize_neurons(pd.concat(frames, ignore_index=True))
    strong = N.layer_trend(summaries([[0.1, 0.2, 0.5], [0.2, 0.25, 0.4], [0.4, 0.5, 0.6], [0.5, 0.6, 0.5],
                                      [0.8, 0.9, 0.5], [0.75, 0.95, 0.85]]), 6)
    assert strong["trend_holds"] and strong["classes_hold"]
    assert strong["most_common_class_layers_0-1"] == "routing-dominant"
    assert strong["mean_direct_ratio_layers_4-5"] == pytest.approx(np.mean([0.8, 0.9, 0.5, 0.75, 0.95, 0.85]))
    weak = N.layer_trend(summaries([[0.1, 0.2, 0.5], [0.2, 0.25, 0.4], [0.4, 0.5, 0.6], [0.5, 0.6, 0.5],
                                    [0.5, 0.6, 0.8], [0.65, 0.6, 0.5]]), 6)        # rises, but ends "mixed"
    assert weak["trend_holds"] and not weak["classes_hold"]
    flat = N.layer_trend(summaries([[0.5, 0.4]] * 6), 6)
    assert not flat["trend_holds"] and not flat["classes_hold"]


# ----------------------------------------------------------------------------- neuron sets and prompts

def test_neuron_sets_from_list_file_and_selectors(tmp_path):
    model, tokenizer, arch = cached_model("random:llama")
    got = N.validate_neurons(arch, ["L2/N5", [0, 7], (2, 5), {"layer": 1, "neuron": 0}])
    assert [n.id for n in got] == ["L0/N7", "L1/N0", "L2/N5"]          # sorted, duplicates dropped
    (tmp_path / "a.txt").write_text("# picked by hand\nL3/N1\n0 4\n2,9  # comment\n")
    (tmp_path / "a.csv").write_text("layer,neuron\n3,1\n0,4\n2,9\n")
    (tmp_path / "a.json").write_text(json.dumps(["L3/N1", [0, 4], [2, 9]]))
    for f in ("a.txt", "a.csv", "a.json"):
        assert [n.id for n in N.validate_neurons(arch, N.read_neuron_file(tmp_path / f))] == ["L0/N4", "L2/N9", "L3/N1"]
    acts = torch.randn(3, arch.n_layers, arch.d_mlp)
    top = N.select_neurons(arch, "top_activation", 7, activations=acts)
    per_layer = [2, 2, 2, 1]
    expect = sorted(N.Neuron(l, int(i)) for l in range(4)
                    for i in np.argsort(-acts[:, l].abs().mean(0).numpy())[:per_layer[l]])
    assert top == expect
    r1, r2 = (N.select_neurons(arch, "random", 20, layers=[1, 3], seed=s) for s in (0, 0))
    assert r1 == r2 and len(r1) == 20 and {n.layer for n in r1} == {1, 3}
    assert N.select_neurons(arch, "random", 20, layers=[1, 3], seed=1) != r1


def test_prompts_from_activations_file(tmp_path):
    model, tokenizer, arch = cached_model("random:llama")
    prompts = select_prompts(60)
    enc = encode_prompts(tokenizer, [p.text for p in prompts], True)
    width = max(map(len, enc))
    padded = np.full((60, width), 2, dtype=np.int64)
    for i, e in enumerate(enc):
        padded[i, width - len(e):] = e
    save_npz(tmp_path / "activations.npz", prompt_input_ids=padded, prompt_lengths=np.array([len(e) for e in enc]),
             prompt_ids=np.arange(60), prompt_text=np.array([p.text for p in prompts]),
             prompt_category=np.array([p.category for p in prompts]), model=arch.source)
    got = N.load_prompts(tmp_path, tokenizer, arch, 6)
    assert got.prompt_ids == [0, 10, 20, 30, 40, 50] and "activations.npz" in got.source
    for pid, ids in zip(got.prompt_ids, got.input_ids):
        assert ids.tolist() == enc[pid]
    with pytest.raises(ArtifactError, match="was made with model"):
        N.load_prompts(tmp_path, tokenizer, dataclasses.replace(arch, source="random:gpt2"), 6)
    with pytest.raises(ValueError, match="holds only 60"):
        N.load_prompts(tmp_path, tokenizer, arch, 61)
    fallback = N.load_prompts(tmp_path / "elsewhere", tokenizer, arch, 6)
    assert [i.tolist() for i in fallback.input_ids] == [enc[i] for i in range(0, 60, 10)]


# ----------------------------------------------------------------------------- bad input: one clear error, nothing written

@pytest.mark.parametrize("kwargs, message", [
    (dict(neurons=[[1, 128]]), r"L1/N128.*index 128 is out of range for layer 1.*d_mlp = 128"),
    (dict(neurons=["L4/N0"]), r"layer 4 does not exist; the model has 4 layers"),
    (dict(selector="random", layers=[0, 9]), r"layer 9 does not exist"),
    (dict(neurons=[]), r"empty neuron set"),
    (dict(n_neurons=0), r"empty neuron set"),
    (dict(targets=[{"target": " the"}, {"target": " the", "distractor": " xylophonequark"}]),
     r"distractor ' xylophonequark' of prompt 1 tokenises to 4 tokens \[' xyl'"),
    (dict(targets=[{"target": " the"}]), r"targets must be None .* list of 2 entries"),
    (dict(targets=[{"target": " the", "distractor": " the"}, {"target": " a"}]), r"distractor is the target itself"),
    (dict(mode="zero"), r"unknown mode 'zero'"),
    (dict(shard="3/2"), r"shard must be"),
    (dict(thresholds=[0.8, 0.2]), r"thresholds must be"),
])
def test_bad_input_raises_and_writes_nothing(tmp_path, kwargs, message):
    model, tokenizer, arch = cached_model("random:llama")
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        setup = N.prepare(model, tokenizer, arch, out_dir=out, n_prompts=2, progress=False, **kwargs)
        N.run(setup, progress=False)
    assert not out.exists()


def test_unknown_mlp_site_names_the_architecture(tmp_path):
    model, tokenizer, arch = cached_model("random:llama")
    moe = dataclasses.replace(arch, model_type="mixtral", spec=dataclasses.replace(arch.spec, mlp_down="block_sparse_moe"))
    with pytest.raises(ValueError, match=r"MLP site of architecture 'mixtral' is unknown.*'block_sparse_moe'"):
        N.prepare(model, tokenizer, moe, out_dir=tmp_path / "run", n_prompts=2, neurons=[[0, 1]], progress=False)
    wrong = dataclasses.replace(arch, model_type="fused", spec=dataclasses.replace(arch.spec, mlp_down="self_attn.o_proj"))
    with pytest.raises(ValueError, match=r"'fused' is unknown.*shape"):
        N.check_mlp_site(wrong)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- shards, merge, resume

def _setup(out, **kw):
    model, tokenizer, arch = cached_model("random:llama")
    args = dict(out_dir=out, n_prompts=2, selector="random", n_neurons=8, batch_size=3, activation_scale="unit",
                progress=False)
    return N.prepare(model, tokenizer, arch, **{**args, **kw})


def test_shards_merge_to_the_full_result_and_resume(tmp_path, monkeypatch):
    full = N.run(_setup(tmp_path / "full"))
    assert full.complete and len(full.effects) == 16
    assert not artifacts.parts_dir("neuron_effects", tmp_path / "full").parent.exists()   # checkpoints removed
    on_disk = N.read_effects_csv(artifacts.path("neuron_effects", tmp_path / "full"))
    summaries = json.loads(artifacts.path("neuron_summaries", tmp_path / "full").read_text())
    assert len(summaries) == 8 and {s["id"] for s in summaries} == set(on_disk["neuron_id"])
    assert len(pd.read_csv(artifacts.path("layer_summary", tmp_path / "full"))) == 4

    out = tmp_path / "sharded"
    # shard 1 of 2 is killed after two batches, then resumed: only the missing batches are computed
    calls = {"n": 0}
    real = N.compute_batch

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(pipeline, "compute_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        N.run(_setup(out, shard="1/2"))
    assert len(list(artifacts.parts_dir("neuron_effects", out, (1, 2)).glob("batch-*.csv"))) == 2
    monkeypatch.setattr(pipeline, "compute_batch", lambda *a, **k: (calls.__setitem__("n", calls["n"] + 1), real(*a, **k))[1])
    calls["n"] = 0
    first = N.run(_setup(out, shard="1/2"))
    assert not first.complete and calls["n"] == 2                   # 4 neurons x 2 prompts / 2 rows = 4 batches
    with pytest.raises(ArtifactError, match=r"shards \[2\] of 2 are missing"):
        N.run(_setup(out))
    assert not artifacts.path("neuron_effects", out).exists()
    N.run(_setup(out, shard="2/2"))
    merged = N.run(_setup(out))
    assert merged.complete and merged.message.startswith("merged 2 shards")
    # other batch compositions: equal up to float32 rounding (identical rows of different GEMM shapes may differ
    # in the last bits)
    assert (merged.effects["neuron_id"] == full.effects["neuron_id"]).all()
    assert (merged.effects["prompt"] == full.effects["prompt"]).all()
    assert full.effects["total"].abs().min() > 1e-4
    cols = ["direct", "indirect", "total", "diff_total", "dprob_total", "direct_ratio"]
    pd.testing.assert_frame_equal(merged.effects[cols], full.effects[cols], atol=1e-5, rtol=1e-3)
    # a shard computed with other parameters is refused
    N.run(_setup(out, shard="2/2", mode="ablate"))
    with pytest.raises(ArtifactError, match=r"shards \[2\] of 2 .* different parameters"):
        N.run(_setup(out))


def test_more_shards_than_neurons(tmp_path):
    for i in (1, 2, 3):
        assert not N.run(_setup(tmp_path, neurons=[[0, 1], [3, 2]], shard=f"{i}/3")).complete
    merged = N.run(_setup(tmp_path, neurons=[[0, 1], [3, 2]]))
    assert merged.complete and list(merged.effects["neuron_id"].unique()) == ["L0/N1", "L3/N2"]


def test_checkpoint_of_other_settings_is_refused_naming_what_differs(tmp_path, monkeypatch):
    real, calls = pipeline.compute_batch, {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(pipeline, "compute_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        N.run(_setup(tmp_path))
    monkeypatch.setattr(pipeline, "compute_batch", real)
    with pytest.raises(CheckpointMismatch, match=r'mode: "add" \(checkpoint\) vs "ablate" \(this run\)') as err:
        N.run(_setup(tmp_path, mode="ablate"))
    assert "batch_size" not in str(err.value) and "rm -r" in str(err.value)
    with pytest.raises(CheckpointMismatch, match=r"batch_size: 3 \(checkpoint\) vs 4 \(this run\)"):
        N.run(_setup(tmp_path, batch_size=4))
    assert not artifacts.path("neuron_effects", tmp_path).exists()
    assert N.run(_setup(tmp_path)).complete                          # the matching settings resume


def test_shard_specs_and_setting_differences():
    assert parse_shard("") is None and parse_shard(" 2 / 4 ") == (2, 4)
    for bad in ("0/4", "5/4", "2-4", "x"):
        with pytest.raises(ValueError, match="1 <= i <= n"):
            parse_shard(bad)
    assert differences({"a": 1, "b": [1, 2]}, {"a": 1, "b": (1, 2)}) == []      # compared as JSON
    assert differences({"a": 1}, {"a": 2, "c": 0}) == ["a", "c"]


# ----------------------------------------------------------------------------- ablate = activation zeroed at mlp_act

def _zeroed_logits(model, arch, ids, layer, neuron):
    """Whole-prompt forward with the neuron's down-projection input set to 0 at the last position (an independent
    hook, not lib.model.hooks): logits [V] at the last position."""
    def zero(module, args):
        act = args[0].clone()
        act[:, -1, neuron] = 0.0
        return (act,) + tuple(args[1:])
    handle = arch.mlp_down(layer).register_forward_pre_hook(zero)
    try:
        with torch.no_grad():
            return model(input_ids=ids[None], logits_to_keep=1).logits[0, -1].float()
    finally:
        handle.remove()


@pytest.mark.parametrize("arch_name", ["llama", "gemma3", "gpt_neox", "gpt2"])
def test_ablate_zeroes_the_activation_at_the_down_projection_input(arch_name, tmp_path):
    model, tokenizer, arch = cached_model(f"random:{arch_name}")
    setup = N.prepare(model, tokenizer, arch, out_dir=tmp_path, n_prompts=2, mode="ablate",
                      selector="top_activation", n_neurons=arch.n_layers, progress=False)   # the top one per layer
    for p in range(2):
        frame = N.compute_batch(setup, setup.neurons, p)
        ids = setup.prompts.input_ids[p]
        with torch.no_grad():
            clean = model(input_ids=ids[None], logits_to_keep=1).logits[0, -1].float()
        target = setup.target_ids[p]
        for row, nrn in zip(frame.itertuples(), setup.neurons):
            effect = _zeroed_logits(model, arch, ids, nrn.layer, nrn.neuron) - clean
            assert abs(row.total - float(effect[target])) < 1e-4 * max(1.0, float(effect.abs().max()))
            assert abs(row.activation) > 1e-2 and float(effect.abs().max()) > 1e-4     # a neuron that was on
    check = N.verify(setup, 3, 2)
    assert check["ok"].all(), check
    if arch_name == "gemma3":   # the MLP output passes post_feedforward_layernorm: a residual push of -a W is not it
        push = dataclasses.replace(setup, mode="add", activation_scale="actual")
        push.clean = copy.copy(setup.clean)
        push.clean.acts = -setup.clean.acts
        pushed = N.compute_batch(push, setup.neurons, 0)
        zeroed = N.compute_batch(setup, setup.neurons, 0)
        assert (pushed["total"] - zeroed["total"]).abs().max() > 1e-3


def test_cache_api_without_deprecation(capfd):
    import warnings
    model, tokenizer, arch = cached_model("random:llama")
    prompts = _prompts(tokenizer, 1)
    capfd.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clean = N.clean_pass(model, arch, prompts)
        N.total_logits_incremental(model, arch, clean, 0, torch.tensor([0, 1]),
                                   N.neuron_directions(arch, [N.Neuron(1, 0), N.Neuron(1, 1)]))
    assert "deprecated" not in capfd.readouterr().err
