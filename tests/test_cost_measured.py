"""lib/cost.py's forward counts against the forwards lib actually runs: a hook on the model's last block counts
every forward pass (full or incremental) of notebooks 05, 06 and 07's library calls on random:llama."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from lib.experiments import ablation as A
from lib.pipeline import cost
from lib.experiments import interference
from lib.experiments import neurons as N
from lib.model.loading import load_model, model_dims
from tests.test_ablation import T, write_run


@pytest.fixture(scope="module")
def counted():
    """(model, tokenizer, arch, counter): counter[0] grows by one per forward through the last block."""
    model, tokenizer, arch = load_model("random:llama", device="cpu")
    counter = [0]
    arch.layers()[-1].register_forward_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))
    return model, tokenizer, arch, counter


ABLATION = dict(variants=["rank_diff", "balance"], n_random=2, include_reverse=True, n_matched=1, step_size=None,
                fractions=[0.25, 1.0], n_prompts=None, batch_size=5)


@pytest.mark.parametrize("perturbation", ["zero", "noise"])
def test_ablation_forwards_equal_the_engine_and_its_check(tmp_path, counted, perturbation):
    model, _, arch, counter = counted
    write_run(tmp_path, arch)                                  # 4 prompts, T tokens, 16 heads
    inputs, plan = A.prepare(tmp_path, model="random:llama", perturbation=perturbation, noise_sigma=0.05,
                             **{k: v for k, v in ABLATION.items() if k != "batch_size"})
    start = counter[0]
    result = A.run_ablation(model, arch, inputs, plan, batch_size=ABLATION["batch_size"], progress=False)
    A.verify(model, arch, inputs, plan, result)
    measured = counter[0] - start
    p = {**ABLATION, "perturbation": perturbation}
    work = cost.ablation(p, {"01_extract_activations": {"n_prompts": 4, "n_tokens": T}}, model_dims("random:llama"))
    # by hand: 10 orderings (2 rankings, 2 reverses, 2 random, 1 matched per ranking and per reverse); points 0, 4,
    # 16; 4 prompts in batches of 5. zero: clean 1 + point 0 (4 rows) 1 + point 4 (40 rows) 8 + point 16 1;
    # noise: clean 1 + 3 points x 10 orderings x 1; check: 3 x 2 prompts x 2
    assert len(plan.orderings) == 10 and plan.n_removed.tolist() == [0, 4, 16]
    assert measured == work.forwards == (1 + 1 + 8 + 1 if perturbation == "zero" else 1 + 30) + 12


def test_neuron_forwards_equal_the_clean_pass_batches_and_check(tmp_path, counted):
    model, tokenizer, arch, counter = counted
    start = counter[0]
    setup = N.prepare(model, tokenizer, arch, out_dir=tmp_path, n_prompts=3, selector="random", n_neurons=7,
                      batch_size=4, progress=False)
    result = N.run(setup, progress=False)
    N.verify(setup, 3)
    assert result.complete
    measured = counter[0] - start
    work = cost.neurons(dict(n_prompts=3, n_neurons=7, batch_size=4, n_check=3, neurons=None), {}, None)
    # by hand: 3 prompts x (2 clean + 3 batches of <= 3 neurons) + 2 checked prompts x (1 + 3 neurons x 3)
    assert measured == work.forwards == 3 * (2 + 3) + 2 * (1 + 3 * 3)


def test_interference_forwards_batch_each_task_apart(tmp_path, counted):
    model, tokenizer, arch, counter = counted
    texts_a = [f"{i} plus {i} is ||| {2 * i}" for i in range(3)]
    texts_b = ["She go home. ||| She goes home.", "They was here. ||| They were here."]
    a, b = interference.load_task_samples(model, tokenizer, arch, out_dir=tmp_path, task_a="A", task_b="B", source="texts",
                                          texts_a=texts_a, texts_b=texts_b, min_samples_for_fisher=2, log=lambda _: None)
    start = counter[0]
    interference.compute_interference(model, arch, a, b, batch_size=2, min_samples_for_fisher=2)
    measured = counter[0] - start
    p = dict(sample_source="texts", task_a_texts=texts_a, task_b_texts=texts_b, batch_size=2, n_new_tokens=0,
             grad_method="hooks")
    # by hand: task A 3 samples in batches of 2 (2 forwards), task B 2 samples (1)
    assert measured == cost.interference(p, {}, None).forwards == 3


def test_extraction_and_oracle_forwards(counted):
    from lib.experiments.extract import extract_activations
    from lib.experiments.oracle import compute_oracle
    from lib.model.prompts import select_prompts
    model, tokenizer, arch, counter = counted
    start = counter[0]
    run = extract_activations(model, tokenizer, arch, select_prompts(6), n_tokens=5, batch_size=4, progress=False)
    generated = counter[0] - start
    compute_oracle(model, arch, run, n_prompts=5, batch_size=2, progress=False)
    oracle = counter[0] - start - generated
    p = dict(model="random:llama", n_prompts=6, n_tokens=5, batch_size=4, baseline_random_init=False, revisions=[],
             n_single_check=0, oracle=True, oracle_prompts=5, oracle_batch_size=2)
    # by hand: 2 batches x 5 greedy steps (prefill, then one token per step, KV cache); the oracle ceil(5 / 2)
    assert (generated, oracle) == (10, 3) and cost.extraction(p, {}, None).forwards == 13


def test_ablation_forwards_repeat_per_prompt_chunk_for_a_soft_capped_model(tmp_path, monkeypatch):
    """random:gemma3 (text) soft-caps its logits: run_ablation caches log p and p per prompt and splits the prompts
    into chunks of max_cache_gb, each with its own clean pass and every unit again. With a cache of 3.5 prompts'
    worth, 4 prompts make chunks of 3 and 1; cost.ablation reads the same size (CLEAN_CACHE_GIB) and counts both."""
    model, _, arch = load_model("random:gemma3", device="cpu")
    assert arch.final_logit_softcap and model_dims("random:gemma3").logit_softcap
    counter = [0]
    arch.layers()[-1].register_forward_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))
    write_run(tmp_path, arch, spec="random:gemma3")
    cache_gib = 3.5 * 2 * T * arch.vocab_size * 4 / 2 ** 30
    monkeypatch.setattr(cost, "CLEAN_CACHE_GIB", cache_gib)
    inputs, plan = A.prepare(tmp_path, model="random:gemma3", perturbation="zero", noise_sigma=0.05,
                             **{k: v for k, v in ABLATION.items() if k != "batch_size"})
    result = A.run_ablation(model, arch, inputs, plan, batch_size=ABLATION["batch_size"], max_cache_gb=cache_gib,
                            progress=False)
    A.verify(model, arch, inputs, plan, result)
    p = {**ABLATION, "perturbation": "zero"}
    work = cost.ablation(p, {"01_extract_activations": {"n_prompts": 4, "n_tokens": T}}, model_dims("random:gemma3"))
    # by hand, per chunk (3 prompts, then 1): clean 1 + point 0 1 + point 4 (10 orderings x 3 rows = 30: 6 batches
    # of 5; x 1 row: 2) + point 16 1; then the check 12
    assert counter[0] == work.forwards == (1 + 1 + 6 + 1) + (1 + 1 + 2 + 1) + 12
