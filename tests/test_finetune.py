"""Head-restricted fine-tuning: only the selected slices move, the masked step is a plain AdamW step where
everything is selected, GQA policies, resume, effect sizes against independent computations."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from lib.experiments.finetune.masks import MaskedAdamW, head_masks, kv_heads_selected, weight_deltas
from lib.experiments.finetune.sft import Example, SFTSettings, run_sft
from lib.experiments.finetune.stats import hedges_g, paired_bootstrap, permutation_null, permutation_p
from lib.model.loading import load_model


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


def _assert_only_selected_moved(arch, before, after, heads, kv="any"):
    selected = _selected_entries(arch, heads, kv)
    for name, value in after.items():
        outside = torch.ones_like(value, dtype=torch.bool)
        for n, idx in selected:
            if n == name:
                outside[idx] = False
        assert torch.equal(value[outside], before[name][outside]), f"{name} moved outside the selected heads"
    return [(name, idx) for name, idx in selected if not torch.equal(after[name][idx], before[name][idx])]


def _reset(model, before):
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(before[name])
            p.requires_grad_(False)


def test_only_selected_slices_move(tiny):
    model, tokenizer, arch = tiny
    heads = [1, arch.n_heads + 2]
    before = _snapshot(model)
    curve = run_sft(model, arch, heads, _examples(), lambda m: [True], SFTSettings(n_steps=3, lr=1e-2, batch_size=2,
                    eval_every=3, weight_decay=0.1), pad_id=0)
    moved = _assert_only_selected_moved(arch, before, _snapshot(model), heads)
    assert len(moved) == len(_selected_entries(arch, heads, "any")), "a selected slice did not move"
    assert curve.steps == [0, 3] and len(curve.loss) == 3
    _reset(model, before)


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


# ----------------------------------------------------------------------------------------------------------------
# whole runs: resume after SIGKILL, bad inputs, GRPO

import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402

from lib.storage import artifacts  # noqa: E402
from lib.experiments import finetune, tasks
from lib.experiments.finetune import GRPOSettings  # noqa: E402
from lib.experiments.finetune.grpo import correctness_reward, run_grpo  # noqa: E402
from lib.storage.store import ArtifactError  # noqa: E402

RUN_SCRIPT = """
import sys
from lib.experiments import finetune
from lib.experiments.finetune import SFTSettings
from lib.model.loading import load_model
out, delay = sys.argv[1], float(sys.argv[2])
model, tokenizer, arch = load_model("random:llama", device="cpu")
if delay:
    import time
    from lib.experiments.finetune import sft
    step = sft.train_step
    sft.train_step = lambda *a, **k: (time.sleep(delay), step(*a, **k))[1]
plan = finetune.prepare(out, model="random:llama", n_train=16, n_test=4, n_random=1, max_new_tokens=4,
                        sft=SFTSettings(n_steps=6, lr=1e-2, batch_size=2, eval_every=2))
finetune.run_finetune(model, tokenizer, arch, plan, progress=False)
"""


def _rankings(out_dir, arch, seed=0):
    layer, head = arch.head_map()
    scores = np.random.default_rng(seed).normal(size=arch.total_heads)
    artifacts.save("rankings", out_dir, pd.DataFrame({"head_idx": range(arch.total_heads), "layer": layer,
                                                      "head": head, "rank_diff": scores}))


def _run(out_dir, delay=0.0, **popen):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", RUN_SCRIPT, str(out_dir), str(delay)], env=env, **popen)


@pytest.mark.slow(reason="kills a fine-tuning process with SIGKILL and reruns it")
def test_resume_after_sigkill_gives_the_uninterrupted_numbers(tmp_path):
    model, tokenizer, arch = load_model("random:llama", device="cpu")
    for d in ("clean", "killed"):
        _rankings(tmp_path / d, arch)
    assert _run(tmp_path / "clean").wait(timeout=600) == 0
    proc = _run(tmp_path / "killed", delay=0.3)
    ckpts = tmp_path / "killed" / ".finetune_checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline and not any(ckpts.glob("*/*-done.pt")):      # one run finished, another started
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "finetune.csv").exists()
    assert _run(tmp_path / "killed").wait(timeout=600) == 0
    for name in ("finetune", "finetune_deltas"):
        a, b = artifacts.load(name, tmp_path / "clean"), artifacts.load(name, tmp_path / "killed")
        pd.testing.assert_frame_equal(a, b)
    assert not ckpts.exists()


@pytest.fixture(scope="module")
def llama():
    return load_model("random:llama", device="cpu")


@pytest.mark.parametrize("kwargs, match", [
    ({"fraction": 0.0}, "fraction"), ({"fraction": 1.5}, "fraction"), ({"kv": "most"}, "kv"),
    ({"sft": finetune.SFTSettings(n_steps=0)}, "n_steps"), ({"sft": finetune.SFTSettings(lr=0.0)}, "lr"),
    ({"seeds": []}, "seeds"), ({"methods": ["ppo"]}, "methods"), ({"variant": "nope"}, "unknown ranking variant"),
])
def test_bad_settings_stop_before_anything_is_written(tmp_path, llama, kwargs, match):
    _rankings(tmp_path, llama[2])
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ValueError, match=match):
        finetune.prepare(tmp_path, model="random:llama", **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_task_file_without_train_split_is_refused(tmp_path, llama):
    _rankings(tmp_path, llama[2])
    path = tmp_path / "only_test.jsonl"
    path.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": i + 1, "split": "test"}) + "\n"
                            for i in range(5)))
    with pytest.raises(tasks.TaskError, match="no problems of split 'train'"):
        finetune.prepare(tmp_path, model="random:llama", task=str(path))


def test_rankings_of_another_model_are_refused(tmp_path, llama):
    model, tokenizer, arch = load_model("random:gpt2", device="cpu")     # 4 x 4 heads, other head map? same count
    other = pd.DataFrame({"head_idx": range(12), "layer": np.repeat(np.arange(3), 4), "head": np.tile(range(4), 3),
                          "rank_diff": np.arange(12.0)})
    artifacts.save("rankings", tmp_path, other)
    plan = finetune.prepare(tmp_path, model="random:llama")
    with pytest.raises(ArtifactError, match="another model"):
        finetune.run_finetune(*llama, plan, progress=False)


def test_reward_scores_hand_written_completions():
    reward = correctness_reward(lambda text, gold: tasks.check_answer(text, gold).correct)
    completions = ["She has 12 apples left, so the answer is 12.", "The answer is \\boxed{12}.",
                   "The answer is 13.", "I do not know.", "12 + 1 = 13. The answer is 12."]
    assert reward(completions, answer=["12"] * 5) == [1.0, 1.0, 0.0, 0.0, 1.0]


@pytest.mark.slow
def test_grpo_three_steps_move_only_the_selected_heads(llama):
    model, tokenizer, arch = llama
    before = _snapshot(model)
    prompts = [f"Count: {i}, {i + 1}," for i in range(8)]
    odd_spaces = lambda text, gold: text.count(" ") % 2 == 1                     # varies between completions
    log = run_grpo(model, tokenizer, arch, [2, 9], prompts, [str(i) for i in range(8)], odd_spaces,
                   GRPOSettings(n_steps=3, lr=1e-2, n_generations=4, batch_size=4, max_completion_length=6))
    assert len(log) == 3 and all("reward" in h for h in log)
    assert any(h["reward_std"] > 0 for h in log), "no reward variance: the test cannot see an update"
    moved = _assert_only_selected_moved(arch, before, _snapshot(model), [2, 9])
    assert moved, "GRPO moved no selected slice"
    _reset(model, before)


# ----------------------------------------------------------------------------------------------------------------
# claim C7: g with its analytic CI, the SFT equivalence test, KV overlap, validity, the claim block

from types import SimpleNamespace  # noqa: E402

from lib.experiments.finetune import claim as fc  # noqa: E402
from lib.experiments.finetune.masks import overlap  # noqa: E402
from lib.experiments.finetune.run import Condition, FinetuneResult, RunRecord  # noqa: E402
from lib.experiments.finetune.stats import equivalence_verdict, hedges_g_ci, tost_paired  # noqa: E402


def test_hedges_g_ci_hand_computation():
    # g = -2.4 (above); Hedges & Olkin: var = (3 + 3) / (3 * 3) + 2.4^2 / (2 * 6) = 0.6667 + 0.48 = 1.14667
    r = hedges_g_ci([1, 2, 3], [4, 5, 6])
    assert r["se"] == pytest.approx(np.sqrt(2 / 3 + 0.48))
    assert r["ci95"] == pytest.approx([-2.4 - 1.959964 * 1.0708252, -2.4 + 1.959964 * 1.0708252], abs=1e-5)
    # 2 runs per group (the main job): means 0.55 / 0.35, sd 0.0707 each: d = 2.8284, J = 1 - 3 / 7, g = 1.6162;
    # var = 4 / 4 + g^2 / 8 = 1.3265
    r = hedges_g_ci([0.5, 0.6], [0.3, 0.4])
    assert r["g"] == pytest.approx(2 * np.sqrt(2) * 4 / 7)
    assert r["se"] == pytest.approx(np.sqrt(1 + (2 * np.sqrt(2) * 4 / 7) ** 2 / 8))
    assert (r["n_a"], r["n_b"]) == (2, 2)


def test_hedges_g_agrees_with_scipy_t_statistic():
    a, b = [0.61, 0.64, 0.58, 0.66, 0.7], [0.55, 0.57, 0.60, 0.54]
    t = scipy.stats.ttest_ind(a, b, equal_var=True).statistic          # d = t sqrt(1/na + 1/nb)
    g = t * np.sqrt(1 / 5 + 1 / 4) * (1 - 3 / (4 * 9 - 9))
    assert hedges_g_ci(a, b)["g"] == pytest.approx(g)


def test_tost_matches_scipys_two_one_sided_t_tests():
    diff = np.array([0, 0, 100, 0, -100, 0, 0, 100, 0, 0, 100, 0, 0, 0, -100, 0, 0, 0, 0, 100], float)
    t = tost_paired(diff, 10.0)
    lower = scipy.stats.ttest_1samp(diff, -10.0, alternative="greater").pvalue
    upper = scipy.stats.ttest_1samp(diff, 10.0, alternative="less").pvalue
    assert t["p_lower"] == pytest.approx(lower) and t["p_upper"] == pytest.approx(upper)
    assert t["p"] == pytest.approx(max(lower, upper))
    ci = scipy.stats.ttest_1samp(diff, 0.0).confidence_interval(0.95)
    assert t["ci95"] == pytest.approx([ci.low, ci.high])
    assert t["mean"] == pytest.approx(10.0)


def test_equivalence_verdicts_on_planted_differences():
    near_zero = tost_paired(np.r_[np.zeros(196), [100, -100, 100, -100]], 10.0)      # mean 0, small se
    assert equivalence_verdict(near_zero) == "consistent with no difference"
    shifted = tost_paired(np.r_[np.full(30, 100.0), np.zeros(10)], 10.0)            # +75 points
    assert equivalence_verdict(shifted) == "inconsistent with no difference"
    noisy = tost_paired(np.array([100, -100, 0, 100, -100, 0, 0, 100.0]), 10.0)     # 8 problems: wide CI around 0
    assert equivalence_verdict(noisy) == "inconclusive"
    flat = tost_paired(np.zeros(5), 10.0)                                           # se 0, inside the margin
    assert flat["p"] == 0.0 and equivalence_verdict(flat) == "consistent with no difference"
    with pytest.raises(ValueError, match="at least 2"):
        tost_paired([1.0], 10.0)


# Planted layout: 2 layers x 6 query heads, 2 KV heads of 3 query heads each (KV 0: heads 0-2, KV 1: heads 3-5).
LAYOUT = SimpleNamespace(n_layers=2, n_heads=6, n_kv_heads=2)
A = [0, 1, 3, 6, 7, 8]         # layer 0: 0 1 3, layer 1: 0 1 2
B = [2, 4, 5, 9, 10, 11]       # the complement of A
C = [0, 4, 6, 7, 8, 9]         # layer 0: 0 4, layer 1: 0 1 2 3


@pytest.mark.parametrize("kv, heads, expect", [
    # (query shared, query jaccard, kv_a, kv_b, kv shared, kv jaccard, weight jaccard), counted by hand
    ("any", B, (0, 0.0, 3, 3, 2, 0.5, 2 / 16)),            # A: (0,0) (0,1) (1,0); B: (0,0) (0,1) (1,1)
    ("majority", B, (0, 0.0, 2, 2, 0, 0.0, 0.0)),          # A: (0,0) (1,0); B: (0,1) (1,1)
    ("all", B, (0, 0.0, 1, 1, 0, 0.0, 0.0)),               # A: (1,0); B: (1,1)
    ("none", B, (0, 0.0, 0, 0, 0, float("nan"), 0.0)),
    ("any", C, (4, 0.5, 3, 4, 3, 0.75, 7 / 12)),           # C: every KV head
    ("majority", C, (4, 0.5, 2, 1, 1, 0.5, 5 / 10)),       # C: (1,0)
    ("none", C, (4, 0.5, 0, 0, 0, float("nan"), 4 / 8)),
])
def test_overlap_on_a_planted_head_layout(kv, heads, expect):
    o = overlap(LAYOUT, A, heads, kv)
    got = (o["query_shared"], o["query_jaccard"], o["kv_a"], o["kv_b"], o["kv_shared"], o["kv_jaccard"],
           o["param_jaccard"])
    assert got[:5] == expect[:5]
    np.testing.assert_allclose(got[5:], expect[5:])
    assert (o["query_a"], o["query_b"]) == (6, 6)


def test_majority_policy_never_shares_a_kv_head_between_complements():
    rng = np.random.default_rng(1)
    for _ in range(20):
        half = sorted(rng.permutation(12)[:6].tolist())
        rest = sorted(set(range(12)) - set(half))
        assert overlap(LAYOUT, half, rest, "majority")["kv_shared"] == 0


@pytest.mark.parametrize("final, jaccard, valid, reason", [
    ({"synergistic": [1.0, 0.975], "random": [0.95, 1.0], "redundant": [1.0, 1.0]}, {}, False, "ceiling"),
    ({"synergistic": [0.0, 0.025], "random": [0.05, 0.0], "redundant": [0.0, 0.0]}, {}, False, "floor"),
    ({"synergistic": [0.5, 0.55], "random": [1.0, 1.0], "redundant": [1.0, 1.0]}, {"random": 0.3}, True, "off the"),
    ({"synergistic": [0.4, 0.45], "random": [0.3, 0.35]}, {"random": 0.85, "redundant": 0.1}, False,
     "synergistic and random train nearly the same weights"),
    ({"synergistic": [0.4, 0.45], "random": [0.3, 0.35]}, {"random": 0.33, "redundant": 0.0}, True, "0.33 < 0.8"),
    ({}, {}, False, "no runs"),
])
def test_validity_rule_on_planted_accuracies(final, jaccard, valid, reason):
    v = fc.validity(final, jaccard)
    assert v["valid"] is valid and reason in v["reason"]


def _planted_result(tmp_path, methods, finals, seeds=(0, 1), sft_seeds=None, n_test=10):
    """A FinetuneResult with planted final accuracies {(method, kind): [per seed]} (no model, no training)."""
    model, tokenizer, arch = load_model("random:llama", device="cpu")
    _rankings(tmp_path, arch)
    plan = finetune.prepare(tmp_path, model="random:llama", n_train=16, n_test=n_test, seeds=list(seeds),
                            sft_seeds=sft_seeds, methods=methods, kv="none")
    records = []
    for method, cond, seed in plan.runs():
        acc = finals[(method, cond.kind)][plan.seeds_for(method).index(seed)]
        correct = [i < round(acc * n_test) for i in range(n_test)]
        records.append(RunRecord(method, cond, seed, [0, 4], [0.3, acc], [[False] * n_test, correct], [], []))
    layout = {"n_layers": arch.n_layers, "n_heads": arch.n_heads, "n_kv_heads": arch.n_kv_heads}
    return FinetuneResult(plan, records, 0.0, {"layout": layout})


def test_claim_block_is_grpos_g_with_the_sft_control(tmp_path):
    finals = {("grpo", "synergistic"): [0.6, 0.7], ("grpo", "random"): [0.4, 0.5], ("grpo", "redundant"): [0.2, 0.2],
              ("grpo", "layer_matched"): [0.5, 0.5], ("sft", "synergistic"): [0.5], ("sft", "random"): [0.5],
              ("sft", "redundant"): [0.5], ("sft", "layer_matched"): [0.5]}
    c = _planted_result(tmp_path, ["sft", "grpo"], finals, sft_seeds=[0]).claim()
    g = 2 * np.sqrt(2) * 4 / 7                               # means 0.65 / 0.45, sd 0.0707: d = 2.828, J = 4/7
    assert c["value"] == pytest.approx(g) and c["details"]["arm"] == "grpo"
    assert c["se"] == pytest.approx(np.sqrt(1 + g ** 2 / 8))
    assert c["ci95"] == pytest.approx([g - 1.959964 * c["se"], g + 1.959964 * c["se"]], abs=1e-5)
    assert c["null"] == {"name": "no difference between head sets (g = 0)", "value": 0.0, "ci95": None}
    assert c["paper_effect"] == 1.4 and "vs redundant ~5.0" in c["paper_effect_note"]
    assert c["sample_sizes"] == {"seeds": 2, "test_problems": 10, "steps": finetune.GRPOSettings().n_steps,
                                 "runs": {"synergistic": 2, "redundant": 2, "random": 2, "layer_matched": 2}}
    assert c["vs_redundant"]["value"] == pytest.approx(9 * 4 / 7)   # pooled sd sqrt(0.005 / 2) = 0.05: d = 0.45 / 0.05
    sft = c["sft_control"]                                     # identical SFT finals: difference 0 on every problem
    assert sft["difference_points"] == 0.0 and sft["line"].startswith("SFT: consistent with no difference")
    assert sft["changed_answers"]                              # planted: 0.3 before, 0.5 after
    assert c["validity"]["valid"] and c["overlap"]["policy"] == "none"
    mine = [r for r in c["overlap"]["rows"] if r["kv"] == "none" and r["b"] == "redundant"]
    assert mine and mine[0]["param_jaccard"] == 0.0


def test_sft_control_that_changed_no_answer_is_inconclusive():
    same = np.array([1, 0, 1, 1, 0], float)
    out = fc.sft_control(same, same, {"synergistic": 0.6}, {"synergistic": 0.6}, changed=False)
    assert out["verdict"].startswith("inconclusive") and out["line"].startswith("SFT: inconclusive")
    assert fc.sft_control(same, same, {}, {}, changed=True)["verdict"] == "consistent with no difference"


def test_claim_without_grpo_says_it_tests_the_sft_arm(tmp_path):
    finals = {("sft", "synergistic"): [0.6], ("sft", "random"): [0.4], ("sft", "redundant"): [0.3],
              ("sft", "layer_matched"): [0.4]}
    c = _planted_result(tmp_path, ["sft"], finals, seeds=[0]).claim()
    assert c["details"]["arm"] == "sft"
    assert c["value"] == pytest.approx(0.2)                    # paired difference over problems, one seed
    assert c["sft_control"]["difference_points"] == pytest.approx(20.0)


@pytest.mark.slow
def test_grpo_arm_end_to_end_writes_the_claim_block(tmp_path, llama):
    model, tokenizer, arch = llama
    _rankings(tmp_path, arch)
    plan = finetune.prepare(tmp_path, model="random:llama", n_train=16, n_test=4, n_random=1, max_new_tokens=4,
                            seeds=[0, 1], sft_seeds=[0], methods=["sft", "grpo"], kv="majority",
                            sft=finetune.SFTSettings(n_steps=2, lr=1e-2, batch_size=2, eval_every=2),
                            grpo=GRPOSettings(n_steps=2, lr=1e-2, n_generations=2, batch_size=4,
                                              max_completion_length=4))
    before = _snapshot(model)
    finetune.run_finetune(model, tokenizer, arch, plan, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    summary = artifacts.load("finetune_summary", tmp_path)
    runs = pd.DataFrame(summary["runs"])
    assert runs.groupby("method").size().to_dict() == {"grpo": 8, "sft": 4}          # 4 conditions x 2 / x 1 seeds
    assert runs.groupby("method").before.nunique().to_dict() == {"grpo": 1, "sft": 1}  # one shared baseline
    c = summary["claim"]
    assert c["details"]["arm"] == "grpo" and c["sample_sizes"]["seeds"] == 2 and c["sample_sizes"]["steps"] == 2
    for key in ("value", "ci95", "se", "null", "direction", "n", "statistic", "paper", "paper_effect",
                "paper_effect_note", "validity", "vs_redundant", "sft_control", "overlap"):
        assert key in c, key
    deltas = artifacts.load("finetune_deltas", tmp_path)
    assert not (deltas.delta_norm[~deltas.selected.astype(bool)] > 0).any(), "a slice outside the selection moved"


def test_cost_estimate_counts_sft_seeds_and_one_shared_baseline():
    from lib.pipeline import cost
    p = {"n_random": 1, "seeds": [0, 1], "methods": ["sft"], "max_new_tokens": 4, "batch_size": 8,
         "n_steps": 4, "eval_every": 8, "n_test": 40, "eval_batch_size": 40, "grpo": {}}
    seq = cost.PROMPT_TOKENS + 4
    # by hand: 4 conditions x 2 seeds runs; each 4 steps (1 forward each) + 1 final evaluation (1 batch x 4 tokens);
    # plus one shared evaluation before training
    assert cost.finetune(p, {}, None).forwards == 8 * (4 + 4) + 4
    assert cost.finetune(p, {}, None).tokens == 8 * (3 * 4 * 8 * seq + 40 * seq) + 40 * seq
    assert cost.finetune({**p, "sft_seeds": [0]}, {}, None).forwards == 4 * (4 + 4) + 4


def test_tables_show_no_g_or_p_that_is_not_a_result(tmp_path):
    """SFT with one seed: g needs >= 2 runs a side and the permutation p of 1 vs 1 run can only be 0.5 or 1, so
    both are None with the reason; GRPO's redundant runs all end at 0.2 and the layer-matched at 0.5 (no spread)."""
    finals = {("grpo", "synergistic"): [0.6, 0.7], ("grpo", "random"): [0.4, 0.5], ("grpo", "redundant"): [0.2, 0.2],
              ("grpo", "layer_matched"): [0.5, 0.5], ("sft", "synergistic"): [0.6], ("sft", "random"): [0.4],
              ("sft", "redundant"): [0.5], ("sft", "layer_matched"): [0.5]}
    result = _planted_result(tmp_path, ["sft", "grpo"], finals, sft_seeds=[0])
    t = finetune.tests_table(result).set_index(["method", "synergistic vs"])
    sft = t.loc[("sft", "random")]
    assert pd.isna(sft["Hedges g"]) and pd.isna(sft["permutation p (one-sided)"])      # shown as an en dash
    assert sft["g and p not defined because"] == "needs >= 2 runs per condition (here 1 vs 1)"
    assert sft["paired difference (points)"] == pytest.approx(20.0)          # 6 vs 4 of 10 problems
    grpo = t.loc[("grpo", "random")]                                          # by hand: means 0.65 / 0.45, sd 0.0707
    assert grpo["Hedges g"] == pytest.approx(2 * np.sqrt(2) * 4 / 7) and grpo["g and p not defined because"] == ""
    assert grpo["permutation p (one-sided)"] == pytest.approx(1 / 6)           # 1 of the 6 splits of 4 runs
    both_flat = t.loc[("grpo", "layer_matched")]                              # synergistic varies: g is defined
    assert both_flat["Hedges g"] == pytest.approx((0.65 - 0.5) / np.sqrt(0.005 / 2) * 4 / 7)
    from lib.experiments.finetune.run import undefined_because
    assert undefined_because(2, 2, float("nan")).startswith("no spread")
    claim = finetune.claim_table(result).set_index("statistic")
    assert claim.loc["g synergistic vs random (grpo)", "value"] == pytest.approx(2 * np.sqrt(2) * 4 / 7)
    assert claim["not defined because"].tolist() == ["", "", ""]
    from lib.pipeline import tables
    html = tables.to_html(finetune.tests_table(result), missing="not a result")
    assert "nan" not in html.lower() and "0.5</td>" not in html and "None" not in html


def test_claim_table_gives_the_reason_instead_of_an_undefined_g(tmp_path):
    finals = {("grpo", k): [0.5, 0.5] for k in ("synergistic", "random", "redundant", "layer_matched")}
    claim = finetune.claim_table(_planted_result(tmp_path, ["grpo"], finals)).set_index("statistic")
    row = claim.loc["g synergistic vs random (grpo)"]
    assert pd.isna(row["value"]) and pd.isna(row["95% CI"]) and pd.isna(row["se"])
    assert row["not defined because"].startswith("no spread")


def test_overlap_table_names_the_none_policy_so_it_is_not_shown_as_missing(tmp_path):
    finals = {("grpo", k): [0.5, 0.4] for k in ("synergistic", "random", "redundant", "layer_matched")}
    table = finetune.overlap_table(_planted_result(tmp_path, ["grpo"], finals))
    assert set(table.kv) == {"any", "all", "majority", "none (K/V frozen)"}
    assert (table[table["this run"] == "*"].kv == "none (K/V frozen)").all()        # _planted_result uses kv none
