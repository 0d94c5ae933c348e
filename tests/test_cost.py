"""lib/pipeline/cost.py: the cost estimate of --check against hand counts; model size from safetensors headers."""
from __future__ import annotations

import json

import pytest

from lib.pipeline import cost
from lib.model.loading import load_model, meta_parameter_count, model_dims
from lib.pipeline.steps import build_steps, load_params
from lib.run import main

# 01: 12 prompts x 24 tokens in one batch, with a random-init copy and 2 prompts regenerated alone; 05: random:llama
# (4 layers x 4 heads = 16 heads), step 2; 09: 2 variants, 3 random sets, noise at 2 sigmas and zero
TINY = """model: random:llama
dtype: float32
01_extract_activations: {n_prompts: 12, n_tokens: 24, batch_size: 12, baseline_random_init: true, n_single_check: 2}
02_phiid: {modes: [per_prompt, concat, pooled]}
05_ablation: {variants: [rank_diff, balance], n_random: 3, n_matched: 2, include_reverse: true, step_size: 2,
              batch_size: 32}
09_task_behaviour: {variants: [rank_diff, balance], n_random: 3, perturbations: [noise, zero], sigmas: [0.5, 2.0],
                    n_problems: 8, max_new_tokens: 6, batch_size: 16}
"""
P = cost.PROMPT_TOKENS


@pytest.fixture
def tiny_steps(tmp_path):
    path = tmp_path / "costrun.yaml"
    path.write_text(TINY)
    return build_steps(*load_params(path))


@pytest.fixture
def tiny_params() -> int:
    model, _, _ = load_model("random:llama", device="cpu")
    return sum(p.numel() for p in model.parameters())


def rows_of(steps) -> dict:
    return {r["notebook"]: r for r in cost.estimates(steps)[0]}


def test_counts_match_a_hand_computation(tiny_steps, monkeypatch, tmp_path):
    monkeypatch.setenv(cost.RATE_ENV, str(tmp_path / "none.json"))
    rows = rows_of(tiny_steps)
    # 01: 2 models x 1 batch x 24 steps + 2 single prompts x 24 steps + the oracle (default on: 6 prompts in one
    # batch of 8); (2 x 12 + 2) sequences of P + 24 tokens, the oracle's forward + backward over 6 x (P + 23)
    assert (rows["01_extract_activations"]["forwards"], rows["01_extract_activations"]["tokens"]) == \
        (96 + 1, 26 * (P + 24) + 3 * 6 * (P + 23))
    # 02: 16 * 15 / 2 pairs x 3 modes x 2 activation files, on CPU
    assert rows["02_phiid"]["pairs"] == 720 and rows["02_phiid"]["gpu_hours"] == "CPU"
    # 05: points 0, 2, ..., 16 (9); orderings 2 rankings + 2 reverse + 3 random + 2 matched of each of the 4 = 15;
    # each point batched alone: the first and last one mask (12 rows, 1 forward), the 7 others 15 masks (180 rows,
    # 6 forwards); the clean pass 1; the check 3 x 2 prompts x 2 one-prompt forwards = 12. Rows: masks 7 x 15 + 2
    # + the clean pass = 108, x 12 prompts, + the check's 12; sequences of P + 24 - 1 tokens
    assert rows["05_ablation"]["forwards"] == 1 + 7 * 6 + 1 + 1 + 12 == 57
    assert rows["05_ablation"]["tokens"] == (108 * 12 + 12) * (P + 23)
    # 09: baseline + 9 head sets (3 per variant + 3 random) x (2 sigmas + zero) = 28 conditions x 8 problems
    assert rows["09_task_behaviour"]["forwards"] == -(-28 * 8 // 16) * 6
    assert rows["09_task_behaviour"]["tokens"] == 28 * 8 * (P + 6)


def test_parameter_count_from_safetensors_headers_equals_the_loaded_model(tmp_path):
    model, _, _ = load_model("random:llama", device="cpu")
    model.save_pretrained(tmp_path / "tiny")
    dims = model_dims(str(tmp_path / "tiny"))
    assert dims.n_params == sum(p.numel() for p in model.parameters())
    assert "safetensors" in dims.source and (dims.n_layers, dims.n_heads, dims.n_kv_heads) == (4, 4, 2)
    assert meta_parameter_count(model.config) == dims.n_params


def test_gpu_hours_follow_the_formula_with_a_rate_file(tiny_steps, tiny_params, monkeypatch, tmp_path):
    rate = tmp_path / "rate.json"
    rate.write_text(json.dumps({"flop_per_s": 2.5e12, "device": "Test GPU", "dtype": "float32", "date": "2026-01-01"}))
    monkeypatch.setenv(cost.RATE_ENV, str(rate))
    rows = rows_of(tiny_steps)
    tokens = (108 * 12 + 12) * (P + 23)          # 05 as in test_counts_match_a_hand_computation
    assert rows["05_ablation"]["gpu_hours"] == pytest.approx(tokens * 2 * tiny_params / 2.5e12 / 3600, rel=1e-12)
    # memory: float32 weights + K and V of 4 layers x 2 KV heads x 16 dims for 32 rows x (P + 23) tokens
    kv = 2 * 4 * 2 * 16 * 32 * (P + 23) * 4
    assert rows["05_ablation"]["memory_gib"] == pytest.approx((tiny_params * 4 + kv) / 2 ** 30)
    assert "2.5e+12 FLOP/s measured on Test GPU" in cost.cost_table(tiny_steps)


def test_gpu_hours_add_the_forward_latency_per_forward(tiny_steps, tiny_params, monkeypatch, tmp_path):
    rate = tmp_path / "rate.json"
    rate.write_text(json.dumps({"flop_per_s": 2.5e12, "forward_latency_s": 0.02, "device": "Test GPU"}))
    monkeypatch.setenv(cost.RATE_ENV, str(rate))
    rows = rows_of(tiny_steps)
    # 05: the FLOP time of its tokens plus 57 forwards (test_counts_match_a_hand_computation) x 20 ms; 09: 84 greedy
    # steps (224 rows in 14 batches of 16, x 6 tokens) x 20 ms beside 224 rows of P + 6 tokens
    tokens = (108 * 12 + 12) * (P + 23)
    assert rows["05_ablation"]["gpu_hours"] == pytest.approx((tokens * 2 * tiny_params / 2.5e12 + 57 * 0.02) / 3600)
    assert rows["09_task_behaviour"]["gpu_hours"] == pytest.approx(
        (28 * 8 * (P + 6) * 2 * tiny_params / 2.5e12 + 84 * 0.02) / 3600)


def test_missing_rate_file_says_how_to_measure(tiny_steps, monkeypatch, tmp_path):
    monkeypatch.setenv(cost.RATE_ENV, str(tmp_path / "absent.json"))
    table = cost.cost_table(tiny_steps)
    assert ("GPU-hours: no measured rate (run benchmarks/gpu_check.py --save-rate slurm/rate.json on a GPU node)"
            in table)
    assert all(r["gpu_hours"] is None for r in cost.estimates(tiny_steps)[0] if r["device"] == "GPU")


def test_bad_rate_file_is_refused(monkeypatch, tmp_path):
    (tmp_path / "rate.json").write_text('{"flop_per_s": "fast"}')
    with pytest.raises(ValueError, match="flop_per_s.*positive number"):
        cost.read_rate(tmp_path / "rate.json")


def test_uncached_model_names_the_download(tmp_path, monkeypatch):
    path = tmp_path / "hf.yaml"
    path.write_text("model: nobody-here/no-such-model\n01_extract_activations: {n_prompts: 6}\n05_ablation: {}\n")
    monkeypatch.setenv(cost.RATE_ENV, str(tmp_path / "absent.json"))
    table = cost.cost_table(build_steps(*load_params(path)))
    assert "huggingface-cli download nobody-here/no-such-model" in table
    assert any(line.startswith("05_ablation") and " ? " in line for line in table.splitlines())


def test_check_cli_prints_the_table(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv(cost.RATE_ENV, str(tmp_path / "absent.json"))
    assert main(["--params", "params/tiny.yaml", "--check"]) == 0
    out = capsys.readouterr().out
    assert "valid; pipeline" in out and "cost estimate" in out and cost.NO_RATE in out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line[:2].isdigit()}
    assert set(lines) == {s.stem for s in (cost.REPO_ROOT / "notebooks").glob("[01][0-9]_*.ipynb")} - {"00_explore", "12_compare_models"}
    assert lines["05_ablation"][1] == "GPU" and lines["02_phiid"][1:5] == ["CPU", "-", "-", "CPU"]


def test_gpu_check_save_rate_writes_what_read_rate_reads(tmp_path):
    import argparse
    import importlib.util
    spec = importlib.util.spec_from_file_location("gpu_check", cost.REPO_ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    args = argparse.Namespace(device="cpu", dtype="float32", model="random:llama", rate_rows=2, rate_seq_len=8)
    written = gpu_check.save_rate(args, tmp_path / "rate.json")
    rate = cost.read_rate(tmp_path / "rate.json")
    assert rate == written and rate["flop_per_s"] > 0 and rate["tokens"] == 16
    assert rate["flop_per_s"] == pytest.approx(2 * rate["n_params"] * 16 / rate["seconds"])
    assert {"device", "dtype", "date", "model"} <= set(rate)


def test_host_terms_follow_a_hand_computation(monkeypatch, tmp_path):
    path = tmp_path / "host.yaml"
    path.write_text(TINY + "03_phiid_diagnostics: {}\n04_ranking_variants: {}\n08_topology: {}\n")
    tiny_steps = build_steps(*load_params(path))
    rate = tmp_path / "rate.json"
    rate.write_text(json.dumps({"flop_per_s": 2.5e12, "forward_latency_s": 0.02, "device": "Test", "date": "d",
                                "notebook_fixed_s": 12.5, "base_rss_gib": 0.5}))
    monkeypatch.setenv(cost.RATE_ENV, str(rate))
    rows = rows_of(tiny_steps)
    # random:llama: 16 heads, 120 pairs; 02: one 128-byte row per pair, 3 modes x 2 activation files
    assert rows["02_phiid"]["host_gib"] == pytest.approx(0.5 + 120 * 128 * 3 * 2 / 2 ** 30)
    assert rows["02_phiid"]["seconds"] == 12.5                                    # CPU notebook: the fixed term only
    # 03: one table + 5 float64 [16, 16] + 3 [500, 16]; 04 (defaults: 8 variants incl. detrended and first_difference,
    # n_jobs 1): 3 tables + 8 float64 [120 pairs, 12 prompts x 24 tokens]; 08 (n_null 10): a table + 11 [16, 16]
    # networks x 2 activation files
    assert rows["03_phiid_diagnostics"]["host_gib"] == pytest.approx(0.5 + (120 * 128 + 8 * (5 * 256 + 3 * 500 * 16)) / 2 ** 30)
    assert rows["04_ranking_variants"]["host_gib"] == pytest.approx(0.5 + (3 * 120 * 128 + 8 * 8 * 120 * 288) / 2 ** 30)
    assert rows["08_topology"]["host_gib"] == pytest.approx(0.5 + (120 * 128 + 8 * 256 * 11 * 2) / 2 ** 30)
    # 05 on device auto (not the CPU): no weights on the host; seconds = fixed + its GPU time
    assert rows["05_ablation"]["host_gib"] == 0.5
    assert rows["05_ablation"]["seconds"] == pytest.approx(12.5 + 3600 * rows["05_ablation"]["gpu_hours"])
    assert "fixed 12.5 s per notebook, kernel base 0.5 GiB, measured on Test d" in cost.cost_table(tiny_steps)


def test_host_terms_default_without_calibration_and_add_the_model_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv(cost.RATE_ENV, str(tmp_path / "absent.json"))
    path = tmp_path / "cpu.yaml"
    path.write_text(TINY.replace("dtype: float32", "dtype: float32\ndevice: cpu"))
    steps = build_steps(*load_params(path))
    rows = rows_of(steps)
    fixed, base = cost.DEFAULT_CALIBRATION["notebook_fixed_s"], cost.DEFAULT_CALIBRATION["base_rss_gib"]
    assert rows["02_phiid"]["seconds"] == fixed and rows["05_ablation"]["seconds"] is None     # no rate: unknown
    assert rows["05_ablation"]["host_gib"] == pytest.approx(base + rows["05_ablation"]["memory_gib"])
    assert "defaults (no calibration" in cost.cost_table(steps)


def test_diagnostics_bootstrap_memory_is_within_2x_of_its_term():
    """Measured small case: the peak of lib's pair-level cluster bootstrap (tracemalloc) at 256 heads (the term's
    constants were fitted at 96 and 192) against host_arrays_gib's heads^2 + resamples x heads float64 term (the
    pair table itself excluded: allocated before)."""
    import tracemalloc

    import numpy as np

    from lib.experiments.diagnostics import pair_bootstrap_correlation
    heads = 256
    i, j = np.triu_indices(heads, 1)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=i.size), rng.normal(size=i.size)
    tracemalloc.start()
    pair_bootstrap_correlation(i, j, a, b, n_heads=heads, n_boot=cost.PAIR_BOOT)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    term = 8 * (cost.BOOT_ARRAYS[0] * heads * heads + cost.BOOT_ARRAYS[1] * cost.PAIR_BOOT * heads)
    assert term / 1.5 <= peak <= 1.5 * term, (peak, term)


def test_diagnostics_counts_claim_c1s_surrogates_for_each_copy():
    from types import SimpleNamespace
    from lib.pipeline import cost
    dims = SimpleNamespace(total_heads=270)
    pairs = 270 * 269 // 2
    run = {"01_extract_activations": {"baseline_random_init": True}}
    # by hand: the pair table once, then (data + 20 surrogates) for the model and for its random-init copy
    assert cost.diagnostics({"c1_surrogates": 20}, run, dims).pairs == pairs * (1 + 2 * 21)
    assert cost.diagnostics({"c1_surrogates": 5}, {"01_extract_activations": {}}, dims).pairs == pairs * (1 + 6)
