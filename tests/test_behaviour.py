"""lib.experiments.behaviour on tiny random Llamas: unperturbed conditions reproduce the baseline exactly, huge noise destroys a
model that was right, weights are restored after every batch, resume, statistics against hand values, bad input."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from lib.storage import artifacts
from lib.experiments import behaviour, tasks
from lib.model.architectures import arch_info
from lib.model.loading import load_model
from lib.storage.store import ArtifactError

SPEC = "random:llama"


def _rankings(out_dir, n_layers=4, n_heads=4, seed=0):
    rng = np.random.default_rng(seed)
    total = n_layers * n_heads
    df = pd.DataFrame({"head_idx": np.arange(total), "layer": np.repeat(np.arange(n_layers), n_heads),
                       "head": np.tile(np.arange(n_heads), n_layers), "rank_diff": rng.random(total),
                       "balance": rng.random(total)})
    artifacts.save("rankings", out_dir, df)
    return df


@pytest.fixture
def run_dir(tmp_path):
    _rankings(tmp_path)
    return tmp_path


def _lively(model):
    """Re-draw the projection weights with std 0.25 (seeded) so that attention heads shape the greedy tokens."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.25)
    return model


@pytest.fixture(scope="module")
def tiny():
    """random:llama (4 layers x 4 heads) whose heads matter for the generated tokens."""
    model, tok, _ = load_model(SPEC, device="cpu")
    _lively(model)
    return model, tok, arch_info(model, source=SPEC, weights_id="random tiny llama, lively")


def _plan(out_dir, **kw):
    args = dict(model=SPEC, variants=["rank_diff"], fraction=0.25, n_random=3, perturbations=["zero", "noise"],
                sigmas=[0.5], n_problems=6, difficulty=1, max_new_tokens=6, batch_size=4)
    return behaviour.prepare(out_dir, **{**args, **kw})


def _texts(result, key):
    return [r["text"] for r in result.rows if r["condition"] == key]


def test_sigma_zero_and_no_heads_reproduce_the_baseline_exactly(run_dir, tiny):
    model, tok, arch = tiny
    plan = _plan(run_dir)
    everything = tuple(range(arch.total_heads))
    plan.conditions = [plan.conditions[0],
                       behaviour.Condition("random", "", 100, (), "zero"),
                       behaviour.Condition("random", "", 101, everything, "zero"),
                       behaviour.Condition("random", "", 102, (0, 5), "zero"),
                       behaviour.Condition("synergistic", "rank_diff", -1, everything, "noise", 0.0),
                       behaviour.Condition("random", "", 103, (), "noise", 3.0),
                       behaviour.Condition("redundant", "rank_diff", -1, everything, "noise", 3.0)]
    result = behaviour.run_behaviour(model, tok, arch, plan, progress=False)
    base = _texts(result, "baseline")
    assert len(base) == 6
    for key in ("zero:random:seed=100", "noise/0:synergistic:rank_diff", "noise/3:random:seed=103"):
        assert _texts(result, key) == base, key
    # the perturbations do reach the model (otherwise the equalities above would be vacuous)
    assert _texts(result, "zero:random:seed=101") != base
    assert _texts(result, "noise/3:redundant:rank_diff") != base


def test_rows_do_not_depend_on_their_batch_neighbours(tiny):
    model, tok, arch = tiny
    problems = tasks.generate_problems(5, "test", 2, 0)
    prompts = [tasks.encode_problem(tok, p) for p in problems]
    width = max(map(len, prompts)) + 2
    stop = behaviour.eos_ids(model, tok)
    together = behaviour.greedy_generate(model, arch, prompts, width, 7, tok.pad_token_id, stop)
    alone = [behaviour.greedy_generate(model, arch, [p], width, 7, tok.pad_token_id, stop)[0] for p in prompts]
    assert together == alone
    mask = torch.ones(5, arch.total_heads)
    mask[2, :8] = 0
    masked = behaviour.greedy_generate(model, arch, prompts, width, 7, tok.pad_token_id, stop, mask)
    assert [m for i, m in enumerate(masked) if i != 2] == [t for i, t in enumerate(together) if i != 2]
    assert masked[2] == behaviour.greedy_generate(model, arch, [prompts[2]], width, 7, tok.pad_token_id, stop,
                                                  mask[2:3])[0]


def test_generation_matches_a_plain_loop_without_cache(tiny):
    """Independent check of the cached, row-dropping loop: full forward of the growing sequence at every step."""
    model, tok, arch = tiny
    prompt = tasks.encode_problem(tok, tasks.generate_problems(1, "test", 1, 0)[0])
    got = behaviour.greedy_generate(model, arch, [prompt], len(prompt), 6, tok.pad_token_id, {-1})[0]
    seq = list(prompt)
    with torch.inference_mode():
        for _ in range(6):
            seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    assert got == seq[len(prompt):]


def test_weights_restored_bit_exactly_after_every_batch(run_dir, tiny):
    model, tok, arch = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    def check(unit):
        seen.append(unit.name)
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), (unit.name, k)

    plan = _plan(run_dir, sigmas=[0.5, 2.0])
    behaviour.run_behaviour(model, tok, arch, plan, progress=False, on_unit=check)
    n_noise = sum(c.perturbation == "noise" for c in plan.conditions)
    assert len(seen) == (1 + 1 + n_noise) * 2            # (baseline, zero group, noise conditions) x 2 problem batches


def _digit_model():
    """random:llama whose unembedding only scores digit tokens: its replies are numbers, so a task whose gold
    answers are its own replies has baseline accuracy 1."""
    model, tok, _ = load_model(SPEC, device="cpu")
    _lively(model)
    digits = tok.convert_tokens_to_ids(list("0123456789"))
    weight = torch.zeros_like(model.lm_head.weight)
    weight[digits] = torch.randn(len(digits), weight.shape[1], generator=torch.Generator().manual_seed(1))
    model.lm_head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    model.lm_head.weight = torch.nn.Parameter(weight, requires_grad=False)
    return model, tok, arch_info(model, source=SPEC, weights_id="digit test model")


def test_huge_sigma_on_all_heads_gives_accuracy_zero(run_dir):
    model, tok, arch = _digit_model()
    problems = tasks.generate_problems(8, "test", 2, 0)
    prompts = [tasks.encode_problem(tok, p) for p in problems]
    ids = behaviour.greedy_generate(model, arch, prompts, max(map(len, prompts)), 5, tok.pad_token_id, set())
    golds = [tasks.check_answer(tasks.reply_text(tok.decode(i)), "0").extracted for i in ids]
    assert all(g and g.isdigit() for g in golds)
    task = run_dir / "self.jsonl"
    task.write_text("".join(json.dumps({"question": p.question, "answer": g}) + "\n" for p, g in zip(problems, golds)))
    plan = _plan(run_dir, task=str(task), n_problems=None, fraction=1.0, perturbations=["noise"], sigmas=[1e4],
                 max_new_tokens=5)
    result = behaviour.run_behaviour(model, tok, arch, plan, progress=False)
    t = result.table.set_index("condition")
    assert t.loc["baseline", "accuracy"] == 1.0
    assert t.loc["noise/10000:synergistic:rank_diff", "accuracy"] == 0.0
    assert (t[t.kind == "random"].accuracy == 0).all()


def test_resume_after_interruption_gives_the_same_result(run_dir, tiny):
    model, tok, arch = tiny
    full = behaviour.run_behaviour(model, tok, arch, _plan(run_dir, seed=1), progress=False)
    out = run_dir / "second"
    out.mkdir()
    _rankings(out)

    def stop_after_three(unit, calls=[]):
        calls.append(unit)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        behaviour.run_behaviour(model, tok, arch, _plan(out, seed=1), progress=False, on_unit=stop_after_three)
    ckpt = list(out.glob("behaviour_checkpoint_*.jsonl"))
    assert len(ckpt) == 1
    with open(ckpt[0], "a") as f:
        f.write('{"unit": "torn')                              # a write cut short by a kill
    resumed = behaviour.run_behaviour(model, tok, arch, _plan(out, seed=1), progress=False)
    assert resumed.rows == full.rows
    assert resumed.units_computed == full.units_computed - 3


def test_statistics_against_hand_values():
    lo, hi = behaviour.clopper_pearson(0, 10)
    assert lo == 0 and hi == pytest.approx(1 - 0.025 ** (1 / 10))
    lo, hi = behaviour.clopper_pearson(10, 10)
    assert hi == 1 and lo == pytest.approx(0.025 ** (1 / 10))
    lo, hi = behaviour.clopper_pearson(5, 10)
    assert (lo, hi) == (pytest.approx(0.187086, abs=1e-6), pytest.approx(0.812914, abs=1e-6))
    a = np.array([1, 1, 1, 1, 1, 0, 1, 0], dtype=bool)
    b = np.array([0, 0, 0, 0, 0, 0, 1, 0], dtype=bool)
    assert behaviour.mcnemar(a, b) == pytest.approx(2 * 0.5 ** 5)          # 5 discordant pairs, all one way
    assert behaviour.mcnemar(a, a) == 1.0
    assert behaviour.percentile_among(0.3, np.array([0.2, 0.3, 0.4, 0.5])) == pytest.approx(37.5)
    cond = np.zeros(50, dtype=bool)
    rnd = np.ones((3, 50), dtype=bool)
    assert behaviour.paired_difference_ci(cond, rnd) == [-1.0, -1.0]


# ----------------------------------------------------------------------------- dose calibration, validity, C6 statistic

def test_pick_sigma_interpolates_the_crossing_in_log_sigma():
    # two points: relative 0.9 at sigma 0.1, 0.5 at sigma 1; target 0.7 is half way -> log10 sigma = -0.5
    sigma, at, note = behaviour.pick_sigma([0.1, 1.0], [0.9, 0.5], 0.7)
    assert sigma == pytest.approx(10 ** -0.5, abs=5e-4) and at == 0.7 and "interpolated" in note
    # the monotone curve r = 1 - sigma / 2 on the main job's grid: 0.76 is crossed between 0.2 (0.9) and 0.5 (0.75)
    grid = [0.05, 0.1, 0.2, 0.5, 1.0]
    sigma, _, _ = behaviour.pick_sigma(grid, [1 - g / 2 for g in grid], 0.76)
    hand = math.exp(math.log(0.2) + (0.9 - 0.76) / (0.9 - 0.75) * (math.log(0.5) - math.log(0.2)))   # 0.4704
    assert sigma == pytest.approx(hand, abs=5e-4) and sigma == 0.47
    # a grid point exactly at the target is chosen as is
    assert behaviour.pick_sigma(grid, [1.0, 0.9, 0.76, 0.5, 0.1], 0.76)[0] == 0.2
    # not monotone: the first crossing counts (between 0.05 and 0.1, not between 0.2 and 0.5)
    sigma, _, _ = behaviour.pick_sigma(grid[:4], [0.9, 0.7, 0.8, 0.5], 0.76)
    assert 0.05 < sigma < 0.1


def test_pick_sigma_off_the_grid_says_so():
    sigma, at, note = behaviour.pick_sigma([0.1, 1.0], [0.95, 0.9], 0.76)
    assert (sigma, at) == (1.0, 0.9) and "largest sigma" in note
    sigma, at, note = behaviour.pick_sigma([0.1, 1.0], [0.5, 0.1], 0.76)
    assert (sigma, at) == (0.1, 0.5) and "smallest sigma" in note
    sigma, at, note = behaviour.pick_sigma([0.1, 1.0], [math.nan, math.nan], 0.76)
    assert sigma == 0.1 and math.isnan(at) and "baseline accuracy 0" in note


@pytest.mark.parametrize("baseline, random, n, valid, word", [
    (23, [1, 2, 1], 60, False, "floor"),          # margin max(2, 3) = 3: mean 1.3 <= 3
    (23, [3, 3], 60, False, "floor"),             # exactly at the margin
    (23, [4, 3], 60, True, "more than 3"),        # 3.5 > 3
    (23, [21, 22, 20], 60, False, "ceiling"),     # 21 >= 23 - 3
    (23, [17, 15], 60, True, "more than 3"),
    (10, [2, 3], 20, True, "more than 2"),        # n = 20: margin max(2, 1) = 2
    (3, [1, 1], 60, False, "of 0) and ceiling"),   # the baseline itself is near the floor
    (60, [52, 56], 100, True, "more than 5"),     # n = 100: margin 5
])
def test_floor_ceiling_rule(baseline, random, n, valid, word):
    v = behaviour.floor_ceiling(baseline, np.array(random), n)
    assert v["valid"] is valid and word in v["reason"]
    assert f"{np.mean(random):.1f}/{n}" in v["reason"] and f"baseline {baseline}/{n}" in v["reason"]


def test_relative_difference_against_an_exact_bootstrap():
    # 2 problems: A (syn wrong, random right, baseline right), B (all right). value (0.5 - 1) / 1 = -0.5; resamples
    # AA (1/4): -1, AB/BA (1/2): -0.5, BB (1/4): 0 -> 95% CI [-1, 0], sd sqrt(0.125)
    syn, rnd, base = np.array([0, 1], bool), np.array([[1, 1], [1, 1]], bool), np.array([1, 1], bool)
    r = behaviour.relative_difference(syn, rnd, base, n_boot=4000)
    assert r["value"] == -0.5 and r["ci95"] == [-1.0, 0.0] and r["n_boot"] == 4000
    assert r["se"] == pytest.approx(math.sqrt(0.125), abs=0.015)
    # baseline right everywhere: the relative CI is the absolute paired CI (same resamples, divided by 1)
    rng = np.random.default_rng(3)
    syn, rnd = rng.random(40) < 0.3, rng.random((4, 40)) < 0.5
    r = behaviour.relative_difference(syn, rnd, np.ones(40, bool), seed=7)
    assert r["ci95"] == behaviour.paired_difference_ci(syn, rnd, seed=7)
    assert r["value"] == pytest.approx(syn.mean() - rnd.mean())
    # baseline right on half the problems: value divided by 0.5; each replicate by its own baseline accuracy
    base = np.arange(40) % 2 == 0
    r = behaviour.relative_difference(syn, rnd, base, n_boot=300, seed=1)
    assert r["value"] == pytest.approx((syn.mean() - rnd.mean()) / 0.5)
    idx = np.random.default_rng(1).integers(0, 40, size=(300, 40))
    reps = np.array([(syn[i].mean() - rnd[:, i].mean()) / base[i].mean() for i in idx])
    assert r["ci95"] == [pytest.approx(np.quantile(reps, 0.025)), pytest.approx(np.quantile(reps, 0.975))]
    assert r["se"] == pytest.approx(reps.std(ddof=1))
    # no correct baseline answer: undefined
    r = behaviour.relative_difference(syn, rnd, np.zeros(40, bool))
    assert math.isnan(r["value"]) and all(math.isnan(x) for x in r["ci95"])
    assert behaviour.relative_accuracy(np.array([[1, 1, 0, 0], [1, 0, 0, 0]], bool), np.ones(4, bool))[0] == 0.375


def _self_task(run_dir, model, tok, arch, n=8):
    """A task whose gold answers are the digit model's own replies (baseline accuracy 1)."""
    problems = tasks.generate_problems(n, "test", 2, 0)
    prompts = [tasks.encode_problem(tok, p) for p in problems]
    ids = behaviour.greedy_generate(model, arch, prompts, max(map(len, prompts)), 5, tok.pad_token_id, set())
    golds = [tasks.check_answer(tasks.reply_text(tok.decode(i)), "0").extracted for i in ids]
    task = run_dir / "self.jsonl"
    task.write_text("".join(json.dumps({"question": p.question, "answer": g}) + "\n" for p, g in zip(problems, golds)))
    return str(task)


def test_calibration_picks_the_sigma_and_the_main_run_uses_it(run_dir):
    model, tok, arch = _digit_model()
    task = _self_task(run_dir, model, tok, arch)
    plan = _plan(run_dir, task=task, n_problems=None, perturbations=["noise"], max_new_tokens=5, calibrate=True,
                 calibration_sigmas=[1e4, 1e-3], calibration_problems=6, calibration_sets=2, n_random=2)
    assert plan.calibration.sigmas == (1e-3, 1e4) and plan.calibration.n_problems == 6
    with pytest.raises(ValueError, match="calibrate"):
        behaviour.run_behaviour(model, tok, arch, plan, progress=False)
    cal = behaviour.calibrate(model, tok, arch, plan, progress=False)
    t = cal.table.set_index(["kind", "seed", "sigma"])
    assert t.loc[("baseline", -1, 0.0), "accuracy"] == 1.0 and (cal.table.n_problems == 6).all()
    assert sorted(cal.table[cal.table.kind == "random"].seed.unique()) == [1000, 1001]      # not the main sets
    # a tiny noise leaves the greedy digits alone, a huge one destroys them (checked, then used by hand below)
    assert t.loc[("random_mean", -1, 1e-3), "relative_accuracy"] == 1.0
    assert t.loc[("random_mean", -1, 1e4), "relative_accuracy"] == 0.0
    hand = 10 ** (-3 + (1 - 0.76) / (1 - 0) * 7)                  # log10 sigma from -3 to 4: 0.0479
    assert cal.sigma == pytest.approx(hand, abs=5e-4) and (cal.table.chosen_sigma == cal.sigma).all()
    main = cal.apply(plan)
    assert {c.sigma for c in main.conditions if c.perturbation == "noise"} == {cal.sigma}
    assert len(main.conditions) == 1 + 3 + 2
    result = behaviour.run_behaviour(model, tok, arch, main, progress=False)
    result.save(run_dir)
    saved = artifacts.load("behaviour_calibration", run_dir)
    assert len(saved) == 1 + 2 * (2 + 1) and saved.chosen_sigma.eq(cal.sigma).all()
    claim = artifacts.load("behaviour_summary", run_dir)["claim"]
    assert claim["calibration"]["calibrated"] is True and claim["calibration"]["sigma"] == cal.sigma
    c = result.correct
    syn, red = (result.index(k, "noise", cal.sigma, "rank_diff")[0] for k in ("synergistic", "redundant"))
    rnd = c[result.index("random", "noise", cal.sigma)]
    assert claim["value"] == pytest.approx((c[syn].mean() - rnd.mean()) / 1.0)          # baseline 8/8
    assert claim["by_variant"]["rank_diff"]["redundant"]["value"] == pytest.approx(c[red].mean() - rnd.mean())
    assert claim["calibration"]["relative_accuracy_random"] == pytest.approx(rnd.mean())
    v = behaviour.floor_ceiling(8, rnd.sum(-1), 8)
    assert claim["validity"] == {"valid": v["valid"], "reason": v["reason"]}
    assert claim["sample_sizes"] == {"problems": 8, "random_sets": 2, "heads_per_set": 4, "heads_total": 16,
                                     "variants": 1, "calibration_problems": 6, "calibration_random_sets": 2,
                                     "calibration_sigmas": 2}


def test_params_rules_of_09():
    from lib.pipeline.params import problems
    ok = {"calibrate": True, "calibration_sigmas": [0.05, 1], "calibration_problems": 30, "calibration_sets": 2,
          "target_relative_accuracy": 0.76, "perturbations": ["noise", "zero"], "sigmas": [0.0, 1.0], "n_random": 6,
          "fraction": 0.25, "max_new_tokens": 4, "n_problems": None, "difficulty": 0}
    assert problems("09_task_behaviour", ok) == []
    bad = problems("09_task_behaviour", {**ok, "calibration_sigmas": [0, 1], "target_relative_accuracy": 1.0,
                                         "calibration_sets": 0, "perturbations": ["zero"], "calibrate": "yes"})
    assert len(bad) == 4 and all(m.startswith("09_task_behaviour: ") for m in bad)      # no cross rule: not True
    assert any("calibration_sigmas=[0, 1] has entries that are not numbers > 0: [0]" in m for m in bad)
    cross = problems("09_task_behaviour", {**ok, "perturbations": ["zero"]})
    assert len(cross) == 1 and "has no 'noise'" in cross[0]
    assert problems("09_task_behaviour", {**ok, "perturbations": ["zero"], "calibrate": False}) == []


@pytest.mark.slow
def test_notebook_09_with_calibration_on_the_tiny_params(tmp_path):
    """The notebook through the runner with params/tiny.yaml and calibration on (a random model: baseline 0, so the
    smallest sigma is used and the comparison is flagged at the floor)."""
    import subprocess
    import sys
    from lib import REPO_ROOT
    _rankings(tmp_path)
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **__import__("os").environ}
    proc = subprocess.run([sys.executable, "-m", "lib.run", "--params", "params/tiny.yaml", "--only",
                           "09_task_behaviour", "--quiet", "--set", f"out_dir={tmp_path}",
                           "--set", "09_task_behaviour.calibrate=true",
                           "--set", "09_task_behaviour.calibration_sigmas=[0.1, 1.0]",
                           "--set", "09_task_behaviour.calibration_problems=4",
                           "--set", "09_task_behaviour.calibration_sets=2"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cal = artifacts.load("behaviour_calibration", tmp_path)
    assert len(cal) == 1 + 2 * 3 and set(cal.sigma) == {0.0, 0.1, 1.0} and (cal.n_problems == 4).all()
    claim = artifacts.load("behaviour_summary", tmp_path)["claim"]
    assert claim["calibration"]["calibrated"] is True and claim["calibration"]["sigma"] in (0.1, 1.0)
    base = artifacts.load("behaviour", tmp_path).set_index("condition").loc["baseline", "n_correct"]
    assert claim["validity"]["valid"] is False or base > 2


def test_conditions_sizes_and_layer_matching(run_dir):
    plan = _plan(run_dir, variants=["rank_diff", "balance"], fraction=0.5, n_random=4)
    df = artifacts.load("rankings", run_dir)
    top = tuple(sorted(np.argsort(-df.rank_diff.to_numpy(), kind="stable")[:8].tolist()))
    syn = [c for c in plan.conditions if c.kind == "synergistic" and c.variant == "rank_diff"][0]
    red = [c for c in plan.conditions if c.kind == "redundant" and c.variant == "rank_diff"][0]
    lm = [c for c in plan.conditions if c.kind == "layer_matched" and c.variant == "rank_diff"][0]
    assert syn.heads == top and set(red.heads) == set(range(16)) - set(top)
    assert np.array_equal(np.bincount(np.array(lm.heads) // 4, minlength=4), np.bincount(np.array(top) // 4, minlength=4))
    assert all(len(c.heads) == 8 for c in plan.conditions if c.kind != "baseline")
    assert len({c.key for c in plan.conditions}) == len(plan.conditions)
    assert sum(c.kind == "random" for c in plan.conditions) == 4 * 2      # zero + one noise sigma


def test_outputs_and_claim_block(run_dir, tiny):
    model, tok, arch = tiny
    result = behaviour.run_behaviour(model, tok, arch, _plan(run_dir), progress=False)
    paths = result.save(run_dir)
    assert [p.name for p in paths] == ["behaviour.csv", "behaviour_calibration.csv", "behaviour_generations.jsonl",
                                       "behaviour_summary.json"]
    assert artifacts.load("behaviour_calibration", run_dir).empty          # calibrate=False: header only
    table = artifacts.load("behaviour", run_dir)
    assert len(table) == len(result.plan.conditions) and table.n_problems.eq(6).all()
    gens = artifacts.load("behaviour_generations", run_dir)
    assert len(gens) == 6 * len(result.plan.conditions)
    assert all(tasks.check_answer(g["text"], g["gold"]).correct == g["correct"] for g in gens)
    claim = artifacts.load("behaviour_summary", run_dir)["claim"]
    assert set(claim) == {"id", "statistic", "value", "ci95", "null", "direction", "paper", "n", "details", "se",
                          "paper_effect", "paper_effect_note", "validity", "sample_sizes", "by_variant", "calibration"}
    assert claim["id"] == "C6" and claim["direction"] == "less" and claim["n"] == 6
    assert set(claim["null"]) == {"name", "value", "ci95"} and claim["null"]["value"] == 0
    assert set(claim["paper"]) == {"value", "text"}
    assert claim["paper"]["value"] == pytest.approx((28 - 44) / 58, abs=1e-3)
    assert claim["paper_effect"] == -0.276 and "(28 - 44) / 58" in claim["paper_effect_note"]
    c = result.correct
    syn = result.index("synergistic", "zero", 0.0, "rank_diff")[0]
    rnd = result.index("random", "zero", 0.0)
    absolute = claim["details"]["absolute"]
    assert absolute["value"] == pytest.approx(c[syn].mean() - c[rnd].mean(-1).mean())
    assert absolute["ci95"][0] <= absolute["value"] + 1e-12 and absolute["value"] <= absolute["ci95"][1] + 1e-12
    assert {"baseline", "per_variant", "per_setting", "validity_per_setting"} <= set(claim["details"])
    assert set(claim["validity"]) == {"valid", "reason"} and set(claim["by_variant"]) == {"rank_diff"}
    assert claim["sample_sizes"]["problems"] == 6 and claim["sample_sizes"]["random_sets"] == 3
    assert claim["calibration"]["calibrated"] is False and claim["calibration"]["target"] == 0.76
    assert math.isfinite(table.accuracy.sum())


# ----------------------------------------------------------------------------- bad input: one clear error each,
# nothing written

def _listing(d):
    return sorted(p.name for p in d.rglob("*"))


@pytest.mark.parametrize("kw, error, match", [
    ({"variants": ["nope"]}, ValueError, "unknown ranking variant"),
    ({"variants": "rank_diff"}, ValueError, "non-empty list"),
    ({"fraction": 0.0}, ValueError, r"fraction .* \(0, 1\]"),
    ({"fraction": 1.5}, ValueError, r"fraction .* \(0, 1\]"),
    ({"sigmas": [1.0, -0.1]}, ValueError, "sigma must be >= 0"),
    ({"perturbations": ["shuffle"]}, ValueError, "perturbations"),
    ({"n_random": 0}, ValueError, "n_random"),
    ({"max_new_tokens": 0}, ValueError, "max_new_tokens"),
    ({"calibrate": True, "perturbations": ["zero"]}, ValueError, "has no 'noise'"),
    ({"calibrate": True, "calibration_sigmas": [0.0, 1.0]}, ValueError, "calibration_sigmas"),
    ({"calibrate": True, "calibration_problems": 0}, ValueError, "calibration_problems"),
    ({"calibrate": True, "calibration_sets": 0}, ValueError, "calibration_sets"),
    ({"calibrate": True, "target_relative_accuracy": 1.0}, ValueError, r"target_relative_accuracy .* \(0, 1\)"),
    ({"calibrate": "yes"}, ValueError, "calibrate must be true or false"),
])
def test_bad_settings(run_dir, kw, error, match):
    before = _listing(run_dir)
    with pytest.raises(error, match=match):
        _plan(run_dir, **kw)
    assert _listing(run_dir) == before


@pytest.mark.parametrize("content, match", [
    ("", "empty"),
    ('{"question": "q", "answer": 1}\n{broken\n', "not valid JSON"),
    ('{"question": "What is 2+2?"}\n', "no 'answer' field"),
])
def test_bad_task_files(run_dir, content, match):
    f = run_dir / "task.jsonl"
    f.write_text(content)
    before = _listing(run_dir)
    with pytest.raises(tasks.TaskError, match=match):
        _plan(run_dir, task=str(f))
    assert _listing(run_dir) == before


def test_rankings_of_another_model(tmp_path, tiny):
    model, tok, arch = tiny
    _rankings(tmp_path, n_layers=6, n_heads=4)
    plan = _plan(tmp_path)
    before = _listing(tmp_path)
    with pytest.raises(ArtifactError, match="rankings come from another model"):
        behaviour.run_behaviour(model, tok, arch, plan, progress=False)
    assert _listing(tmp_path) == before


def test_rankings_named_for_another_model_in_activations(run_dir):
    np.savez(run_dir / "activations.npz", model=np.array("bundled:smollm2-135m"))
    before = _listing(run_dir)
    with pytest.raises(ArtifactError, match="ranks the heads of model 'bundled:smollm2-135m'"):
        _plan(run_dir)
    assert _listing(run_dir) == before


def test_missing_rankings(tmp_path):
    with pytest.raises(ArtifactError, match="run 04_ranking_variants first"):
        _plan(tmp_path)
    assert _listing(tmp_path) == []
