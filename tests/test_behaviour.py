"""lib.behaviour on tiny random Llamas: unperturbed conditions reproduce the baseline exactly, huge noise destroys a
model that was right, weights are restored after every batch, resume, statistics against hand values, bad input."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from lib import artifacts, behaviour, tasks
from lib.models import arch_info, load_model
from lib.store import ArtifactError

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
    assert [p.name for p in paths] == ["behaviour.csv", "behaviour_generations.jsonl", "behaviour_summary.json"]
    table = artifacts.load("behaviour", run_dir)
    assert len(table) == len(result.plan.conditions) and table.n_problems.eq(6).all()
    gens = artifacts.load("behaviour_generations", run_dir)
    assert len(gens) == 6 * len(result.plan.conditions)
    assert all(tasks.check_answer(g["text"], g["gold"]).correct == g["correct"] for g in gens)
    claim = artifacts.load("behaviour_summary", run_dir)["claim"]
    assert set(claim) == {"id", "statistic", "value", "ci95", "null", "direction", "paper", "n", "details"}
    assert claim["id"] == "C6" and claim["direction"] == "less" and claim["n"] == 6
    assert set(claim["null"]) == {"name", "value", "ci95"} and claim["null"]["value"] == 0
    assert set(claim["paper"]) == {"value", "text"} and claim["paper"]["value"] == pytest.approx(-0.16)
    c = result.correct
    syn = result.index("synergistic", "zero", 0.0, "rank_diff")[0]
    rnd = result.index("random", "zero", 0.0)
    assert claim["value"] == pytest.approx(c[syn].mean() - c[rnd].mean(-1).mean())
    assert claim["ci95"][0] <= claim["value"] + 1e-12 and claim["value"] <= claim["ci95"][1] + 1e-12
    assert {"baseline", "per_variant", "per_setting"} <= set(claim["details"])
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
