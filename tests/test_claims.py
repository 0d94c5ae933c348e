"""lib.pipeline.claims (python -m lib.claims): every verdict follows its documented rule on planted inputs, and
claims.json of a tiny run.

Planted inputs: head series with an autocorrelation artefact (independent AR(1) heads whose coefficient follows an
inverted U over depth: synergy and redundancy both track it, the circular-shift null keeps it), ablation curves
whose ranking IS one of the random orders, or clearly beats random and layer-matched orders, and the JSON claim
blocks of the experiment notebooks (CLAIM_INPUTS shape). The slow tests read the session's tiny run (tests/conftest.py) and
check its claims.json against the rules and its executed notebooks for stderr output (warnings, log lines).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from lib import REPO_ROOT
from lib.storage import artifacts
from lib.pipeline import claims as C, report, verdicts
from lib.pipeline.claims import block_claims
from lib.experiments.ablation import AblationResult, Ordering, RANDOM_VARIANT
from lib.experiments.diagnostics import inverted_u_test
from lib.storage.store import save_npz


# ----------------------------------------------------------------------------- rules as functions

def v(ev):
    return verdicts.decide(ev)[0]


def test_verdict_rules_follow_their_documented_thresholds():
    # C1: less than the null band AND below 0.5 is supported; like the null: ruled out at the brain's -0.4
    assert v(C.evidence_c1((-0.6, -0.2), (0.7, 0.9), 0.8)) == "supported"
    assert v(C.evidence_c1((0.85, 0.92), (0.88, 0.95), 0.91)) == "ruled out"
    assert v(C.evidence_c1((0.55, 0.7), (0.8, 0.9), 0.85)) == "ruled out"      # beyond the null, shares most variance
    assert v(C.evidence_c1((0.95, 0.99), (0.8, 0.9), 0.85)) == "opposite"      # MORE correlated than the null
    assert v(C.evidence_c1((-0.6, 0.6), (0.3, 0.5), 0.4)) == "underpowered"
    # C2 / C3: a mid - early difference against 0 with the paper's 0.1
    row = {"value": 0.2, "lo": 0.12, "hi": 0.3}
    assert v(C.evidence_profile(row, 0.1, True, "")) == "supported"
    assert v(C.evidence_profile(row, 0.1, False, "not an inverted U")) == "underpowered"
    assert v(C.evidence_profile({"value": 0.0, "lo": -0.03, "hi": 0.04}, 0.1, False, "")) == "ruled out"
    assert v(C.evidence_profile({"value": -0.2, "lo": -0.3, "hi": -0.1}, 0.1, False, "")) == "opposite"
    # experiment blocks
    ev = lambda val, ci, band, d, paper, **kw: C.block_evidence(                          # noqa: E731
        {"value": val, "ci95": ci, "null": {"value": 0.0, "ci95": band}, "direction": d, **kw}, paper)
    assert v(ev(0.05, [0.03, 0.07], [-0.01, 0.01], "greater", 0.045)) == "supported"
    assert v(ev(0.0, [-0.005, 0.008], [-0.01, 0.01], "greater", 0.045)) == "ruled out"
    assert v(ev(0.01, [-0.005, 0.06], [-0.01, 0.01], "greater", 0.045)) == "underpowered"
    assert v(ev(-0.16, [-0.25, -0.08], [-0.05, 0.05], "less", -0.276)) == "supported"
    assert v(ev(0.2, [0.1, 0.3], [-0.05, 0.05], "less", -0.276)) == "opposite"
    assert v(ev(-0.3, [-0.5, -0.1], [-0.05, 0.05], "less", -0.276,
                validity={"valid": False, "reason": "floor: random sets at 1/60"})) == "invalid"
    # the paper's own number in the block wins over the default
    assert C.block_evidence({"value": 0, "ci95": [-1, 1], "null": {"value": 0}, "direction": "less",
                             "paper_effect": -0.5}, -0.276).paper_effect == -0.5
    assert set(C.VERDICT_RULES) == set(C.CLAIMS) == set(C.PAPER_FIGURES) == set(C.PAPER_EFFECTS) \
        == {f"C{i}" for i in range(1, 8)}


def test_c4_needs_both_halves():
    assert block_claims._combine_halves("supported", "supported", "")[0] == "supported"
    assert block_claims._combine_halves("supported", "opposite", "")[0] == "opposite"
    assert block_claims._combine_halves("supported", "ruled out", "")[0] == "underpowered"
    assert block_claims._combine_halves("ruled out", "underpowered", "")[0] == "underpowered"


def test_near_duplicate_heads_by_hand():
    r = np.eye(4)
    r[0, 1] = r[1, 0] = 0.99                                   # heads 0 and 1 are near copies
    d = C.near_duplicates(r)
    assert (d["pairs"], d["heads"], d["degenerate"]) == (1, 2, False)
    assert C.near_duplicates(np.full((4, 4), 0.97))["degenerate"] is True
    X = np.random.default_rng(0).standard_normal((3, 2, 50))
    X[:, 1] = 2 * X[:, 0] + 1                                  # an affine copy: r = 1
    assert C.series_correlation(X)[0, 1] == pytest.approx(1.0)


def test_bootstrap_spearman_against_scipy_and_a_monotone_case():
    rng = np.random.default_rng(0)
    a = rng.standard_normal(200)
    b = a + rng.standard_normal(200)
    lo, hi = C.bootstrap_spearman(a, b, n_boot=2000)
    r = stats.spearmanr(a, b)[0]
    # the bootstrap distribution centres on r; scipy's own bootstrap gives the same interval to ~0.02
    ref = stats.bootstrap((a, b), lambda x, y: stats.spearmanr(x, y)[0], paired=True, n_resamples=2000,
                          method="percentile", random_state=1, vectorized=False).confidence_interval
    assert lo < r < hi and abs(lo - ref.low) < 0.03 and abs(hi - ref.high) < 0.03
    assert C.bootstrap_spearman(a, np.exp(a), n_boot=200) == (1.0, 1.0)


# ----------------------------------------------------------------------------- planted head series (C1-C3)

N_LAYERS, HEADS_PER_LAYER = 6, 4


def ar_series(phi, n_prompts, n_steps, rng):
    """[prompts, heads, steps] independent AR(1) series with coefficients phi [heads], positive (norms)."""
    X = np.zeros((n_prompts, len(phi), n_steps))
    e = rng.standard_normal(X.shape)
    for t in range(1, n_steps):
        X[:, :, t] = phi[None, :] * X[:, :, t - 1] + e[:, :, t]
    return 5.0 + X


def write_heads(out_dir: Path, X, tag: str = "", tokens=None, end_of_turn_ids=None) -> None:
    H = X.shape[1]
    layer = np.repeat(np.arange(N_LAYERS), HEADS_PER_LAYER)
    tokens = np.ones(X.shape[::2], np.int64) * 7 if tokens is None else tokens
    stored = {} if end_of_turn_ids is None else {"end_of_turn_ids": np.asarray(end_of_turn_ids, np.int64)}
    save_npz(artifacts.path("activations", out_dir, tag=tag), activations=X.astype(np.float32), tokens=tokens,
             head_layer=layer, head_index=np.tile(np.arange(HEADS_PER_LAYER), N_LAYERS), n_layers=N_LAYERS,
             n_heads=HEADS_PER_LAYER, model="random:llama", **stored)
    save_npz(artifacts.path("phiid", out_dir, tag=tag, mode="per_prompt"), sts=np.zeros((H, H)))


@pytest.fixture(scope="module")
def artefact_run(tmp_path_factory):
    """Heads whose only difference is their own autocorrelation, an inverted U over depth."""
    out = tmp_path_factory.mktemp("artefact")
    depth = np.repeat(np.linspace(0, 1, N_LAYERS), HEADS_PER_LAYER)
    phi = 0.15 + 0.7 * (1 - (2 * depth - 1) ** 2)
    write_heads(out, ar_series(phi, 10, 80, np.random.default_rng(0)))
    write_heads(out, ar_series(np.full_like(phi, 0.3), 10, 80, np.random.default_rng(1)), tag="random_init")
    return out


def test_planted_autocorrelation_artefact_is_not_supported_beyond_the_null(artefact_run):
    ev = C.head_evidence(artefact_run, n_surrogates=12)
    assert ev.r > 0.5                                     # synergy and redundancy both track the autocorrelation
    lo, hi = ev.null_band()
    assert lo > 0.3                                       # and so do they after the circular shift
    c1 = C.claim_c1(ev, n_boot=500)
    assert c1.verdict in ("ruled out", "underpowered", "opposite") and c1.value == pytest.approx(ev.r)
    assert c1.null["ci95"] == pytest.approx([lo, hi]) and c1.ci95[0] <= ev.r <= c1.ci95[1]
    pv = C.profile_verdicts(ev, n_boot=500)
    assert pv["beyond_null"]["verdict"] != "inverted U"
    assert C.claim_c2(ev, n_boot=500).verdict != "supported"


def test_head_evidence_truncates_at_the_first_end_of_turn(artefact_run, tmp_path):
    X = np.asarray(artifacts.load("activations", artefact_run, keys=["activations"])["activations"], float)
    tokens = np.full(X.shape[::2], 7, np.int64)
    from lib.model.bundled import bundled_tokenizer
    from lib.model.prompts import end_of_turn_ids
    eot = end_of_turn_ids(bundled_tokenizer())[0]
    tokens[0, 30], tokens[1, 5], tokens[2, 40] = eot, eot, eot          # prompt 1 ends too early: left out
    write_heads(tmp_path, X, tokens=tokens)
    ev = C.head_evidence(tmp_path, truncate_at_eos=True, n_surrogates=2)
    assert ev.n_prompts == X.shape[0] - 1 and ev.steps == "31-80 (median 80)"
    # = the mean over the kept prompts of each cut series' own PhiID, computed one prompt at a time
    from lib.experiments import ranking as rk
    cuts = {0: 31, 2: 41, **{p: 80 for p in range(3, X.shape[0])}}
    each = [rk.per_prompt_stats(X[[p]][:, :, :n]) for p, n in cuts.items()]
    with np.errstate(invalid="ignore"):
        sts = np.nanmean(np.where(np.stack([e.valid[0] for e in each]), np.stack([e.sts[0] for e in each]), np.nan), 0)
    layer = ev.head_layer
    syn = np.array([np.nanmean(np.concatenate([sts[(i == h)], sts[(j == h)]])) for h in range(len(layer))
                    for i, j in [np.triu_indices(len(layer), 1)]])
    assert np.allclose(ev.syn, syn, rtol=1e-8, atol=1e-10)
    # ids stored in the activations file (notebook 01 writes its tokenizer's) are used instead of the tokenizer:
    # the same cuts made by token 999, an ordinary token of the bundled tokenizer
    assert 999 not in end_of_turn_ids(bundled_tokenizer())
    write_heads(tmp_path / "stored", X, tokens=np.where(tokens == eot, 999, tokens), end_of_turn_ids=[999])
    stored = C.head_evidence(tmp_path / "stored", truncate_at_eos=True, n_surrogates=2)
    assert stored.n_prompts == ev.n_prompts and stored.steps == ev.steps and np.array_equal(stored.syn, ev.syn)


def test_notebook_01_stores_the_end_of_turn_ids_of_its_tokenizer(tiny_run):
    from lib.model.loading import spec_tokenizer
    from lib.model.prompts import END_OF_TURN_TOKENS
    for tag in artifacts.tags("activations", tiny_run):
        acts = artifacts.load("activations", tiny_run, tag=tag, keys=["end_of_turn_ids", "model"])
        tokenizer = spec_tokenizer(str(acts["model"]))
        vocab = tokenizer.get_vocab()
        expected = {tokenizer.eos_token_id} | {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}
        assert acts["end_of_turn_ids"].dtype == np.int64 and sorted(acts["end_of_turn_ids"].tolist()) == sorted(expected)


def planted_profile(scores, null_scores) -> "C.HeadEvidence":
    layer = np.repeat(np.arange(N_LAYERS), HEADS_PER_LAYER)
    return C.HeadEvidence("", np.zeros(len(layer)), np.zeros(len(layer)), scores, np.zeros(len(null_scores)),
                          np.asarray(null_scores), layer, N_LAYERS, 10, "80")


def test_planted_inverted_u_is_supported_and_one_made_by_the_null_is_not():
    rng = np.random.default_rng(2)
    depth = np.repeat(np.linspace(0, 1, N_LAYERS), HEADS_PER_LAYER)
    bump = 1 - (2 * depth - 1) ** 2 + 0.1 * rng.standard_normal(len(depth))
    c2 = C.claim_c2(planted_profile(bump, np.full((5, len(depth)), 0.2)), n_boot=500)
    assert c2.verdict == "supported" and c2.details["raw"]["shape"] == "inverted U"
    assert c2.ci95[0] > 0 and c2.power["mde"] > 0
    noise = 0.1 * rng.standard_normal((5, len(depth)))
    c2 = C.claim_c2(planted_profile(bump, bump + noise), n_boot=500)              # the null carries the shape
    assert c2.verdict in ("ruled out", "underpowered") and c2.details["raw"]["shape"] == "inverted U"


def test_c3_needs_the_random_init_copy(artefact_run):
    ev = C.head_evidence(artefact_run, n_surrogates=4)
    assert C.claim_c3(ev, None, {}).verdict == "not tested"
    rand = C.head_evidence(artefact_run, tag="random_init", n_surrogates=4)
    c3 = C.claim_c3(ev, rand, {}, n_boot=300)
    assert c3.details["trained"]["beyond_null"] != "inverted U"
    assert c3.verdict != "supported"                      # the planted shape is no beyond-null inverted U
    tb, rb = c3.details["trained_beyond_null"], c3.details["random_init_beyond_null"]
    assert c3.value == pytest.approx(tb["value"] - rb["value"])


# ----------------------------------------------------------------------------- planted ablations (C5)

def planted_ablation(out_dir, rank_scale=None, matched_scale=1.0, n_random=20, n_prompts=12, seed=0):
    """KL curves [orderings, points, prompts]: random orders with their own severity; the ranking is random
    order 0 itself (rank_scale None) or rank_scale x the mean random curve; layer-matched orders matched_scale x."""
    rng = np.random.default_rng(seed)
    x = np.array([0, 2, 4, 6, 8, 10, 20])                       # of 20 heads: 0-50%, then all
    base = (x / 20.0)[:, None] ** 1.5 * (1 + 0.5 * rng.random(n_prompts))[None, :]
    severity = 1 + 0.3 * rng.standard_normal(n_random)
    rnd = [base * s for s in severity]
    rank = rnd[0] if rank_scale is None else base * rank_scale
    order = tuple(range(20))
    orderings = ([Ordering("ranking", "rank_diff", -1, order)]
                 + [Ordering("random", RANDOM_VARIANT, k, order) for k in range(n_random)]
                 + [Ordering("reverse", "rank_diff", -1, order[::-1])]
                 + [Ordering("matched", "rank_diff", k, order) for k in range(5)])
    kl = np.stack([rank, *rnd, base * 0.5, *[base * matched_scale * (1 + 0.05 * k) for k in range(5)]])
    kl[:, -1] = kl[0, -1]                                       # everything removed: all orders coincide
    AblationResult(orderings, x, 20, kl, np.arange(n_prompts), np.array(["c"] * n_prompts)).save(out_dir)


def test_ablation_ranking_equal_to_a_random_order_is_not_supported(tmp_path):
    planted_ablation(tmp_path, rank_scale=None, seed=2)
    c5 = C.claim_c5(tmp_path, n_boot=1000)
    assert c5.verdict in ("ruled out", "underpowered")
    assert 0 < c5.details["percentile_among_random"] < 100 and c5.details["range"] == "0-40%"
    assert c5.power["mde"] > 1 and c5.sample_sizes["random_orders"] == 20
    assert c5.details["orderings"]["reverse:rank_diff"]["direction"] == "slower than random"
    assert any("most redundant" in line for line in c5.details["also"])


def test_ablation_ranking_below_random_is_opposite(tmp_path):
    planted_ablation(tmp_path, rank_scale=0.3)
    assert C.claim_c5(tmp_path, n_boot=1000).verdict == "opposite"


def test_ablation_ranking_beating_random_and_layer_matched_orders_is_supported(tmp_path):
    planted_ablation(tmp_path, rank_scale=3.0)
    c5 = C.claim_c5(tmp_path, n_boot=1000)
    assert c5.verdict == "supported" and c5.details["percentile_among_random"] == 100.0
    assert c5.value == pytest.approx(3.0 / np.mean(1 + 0.3 * np.random.default_rng(0).standard_normal(20)), rel=0.2)
    assert "full" in c5.details["per_variant"]["ranking:rank_diff"]
    planted_ablation(tmp_path, rank_scale=3.0, matched_scale=3.0)        # the layers explain it
    c5 = C.claim_c5(tmp_path, n_boot=1000)
    assert c5.verdict == "underpowered" and "layer-matched" in c5.reason


def test_ablation_absent_is_not_tested(tmp_path):
    c5 = C.claim_c5(tmp_path)
    assert c5.verdict == "not tested" and "05_ablation" in c5.reason


# ----------------------------------------------------------------------------- experiment blocks (C4, C6, C7)

def block(cid, value, ci, null_ci, direction, n=30, **extra):
    return {"claim": {"id": cid, "statistic": "planted", "value": value, "ci95": ci,
                      "null": {"name": "planted null", "value": 0.0, "ci95": null_ci}, "direction": direction,
                      "paper": {"value": None, "text": "planted paper figure"}, "n": n, "details": {"k": 1},
                      **extra}}


@pytest.fixture
def declared(monkeypatch):
    for cid, name in C.EXPERIMENT_ARTIFACTS.items():
        monkeypatch.setitem(artifacts.ARTIFACTS, name, artifacts.Artifact(name, f"{name}.json", C.CLAIMS[cid][1], "planted"))


def test_experiment_blocks_give_their_rule_verdicts(tmp_path, declared):
    for cid in ("C4", "C6", "C7"):
        c = C.claim_from_block(cid, tmp_path)
        assert c.verdict == "not tested" and C.CLAIMS[cid][1] in c.reason
    artifacts.save("topology", tmp_path, block("C4", 0.04, [0.03, 0.05], [-0.01, 0.01], "greater"))
    artifacts.save("behaviour_summary", tmp_path, block("C6", 0.01, [-0.03, 0.05], [-0.05, 0.05], "less",
                                                        sample_sizes={"problems": 60}))
    artifacts.save("finetune_summary", tmp_path, block("C7", 1.5, None, [-0.8, 0.8], "greater", n=2))
    c4, c6, c7 = (C.claim_from_block(cid, tmp_path) for cid in ("C4", "C6", "C7"))
    assert (c4.verdict, c6.verdict, c7.verdict) == ("supported", "ruled out", "supported")
    assert c4.paper["text"] == "planted paper figure" and c4.details == {"k": 1} and c4.source == ["topology"]
    assert "no CI" in c7.reason and c6.power["mde"] < -0.05
    artifacts.save("behaviour_summary", tmp_path, block("C6", -0.1, [-0.3, 0.1], [-0.05, 0.05], "less",
                                                        sample_sizes={"problems": 60}, se=0.1))
    c6 = C.claim_c6(tmp_path)
    # se 0.1: mde = -(0.05 + 2.8016 x 0.1); the paper's -0.276 needs se (0.276 - 0.05) / 2.8016: n x (0.1 / se)^2
    assert c6.verdict == "underpowered" and c6.power["mde"] == pytest.approx(-(0.05 + 0.28016), rel=1e-4)
    need = (0.1 / ((0.276 - 0.05) / 2.801585)) ** 2
    assert c6.settle["params"] == {"09_task_behaviour.n_problems": int(np.ceil(60 * need))}
    artifacts.save("finetune_summary", tmp_path, block("C7", 0.5, [-1, 2], None, "greater", details={"arm": "sft"}))
    assert C.claim_c7(tmp_path).verdict == "invalid"
    artifacts.save("topology", tmp_path, {"efficiency": 1})
    assert "no valid 'claim' block" in C.claim_from_block("C4", tmp_path).reason


def test_undeclared_experiment_is_not_tested(tmp_path):
    registry = dict(artifacts.ARTIFACTS)
    try:
        del artifacts.ARTIFACTS["topology"]
        c = C.claim_from_block("C4", tmp_path)
        assert c.verdict == "not tested" and "lib/storage/artifacts/" in c.reason
    finally:                 # in its order (monkeypatch.delitem would put it back last: the README table's order)
        artifacts.ARTIFACTS.clear()
        artifacts.ARTIFACTS.update(registry)


# ----------------------------------------------------------------------------- claims.json of a tiny run

# tiny_run: the session's tiny run (tests/conftest.py), read-only

@pytest.mark.slow(reason="reads the session's tiny pipeline run")
def test_claims_json_of_a_tiny_run_follows_the_rules(tiny_run):
    data = json.loads((tiny_run / "claims.json").read_text())
    assert "arXiv 2601.06851" in data["paper"]
    claims = {c["id"]: c for c in data["claims"]}
    assert list(claims) == [f"C{i}" for i in range(1, 8)]
    for c in claims.values():
        assert c["verdict"] in verdicts.VERDICTS and c["rule"] == C.VERDICT_RULES[c["id"]] and c["paper"]["text"]
        assert c["claim"] and c["test"] and c["source"]
        assert c["verdict"] != "not tested" or c["reason"]
    c1, c3, c5 = claims["C1"], claims["C3"], claims["C5"]
    assert v(C.evidence_c1(c1["ci95"], c1["null"]["ci95"], c1["null"]["value"])) == c1["verdict"]
    assert c1["ci95"][0] <= c1["value"] <= c1["ci95"][1] and c1["n"] > 3
    assert "random_init" in c1["details"] and c1["power"]["mde"] is not None
    assert c3["details"]["n_surrogates"] == claims["C2"]["details"]["n_surrogates"]    # one set of surrogates
    m = c5["details"]["layer_matched"]
    assert m["n"] == 2 and c5["power"]["mde"] > 1 and c5["sample_sizes"]["prompts"] >= 1
    for c in claims.values():
        assert c["verdict"] != "underpowered" or c["settle"]
    assert claims["C2"]["verdict"] in verdicts.VERDICTS
    for cid in ("C4", "C6", "C7"):
        if not artifacts.path(C.EXPERIMENT_ARTIFACTS[cid], tiny_run).exists() \
                if C.EXPERIMENT_ARTIFACTS[cid] in artifacts.ARTIFACTS else True:
            assert claims[cid]["verdict"] == "not tested"


def test_write_claims_on_a_planted_run_writes_every_claim_and_the_manifest_entry(artefact_run, tmp_path):
    import shutil
    from lib.storage.store import read_manifest
    for name in ("activations.npz", "phiid_per_prompt.npz"):
        shutil.copy(artefact_run / name, tmp_path / name)
    with np.load(tmp_path / "activations.npz") as z:
        arrays = {k: z[k] for k in z.files}
    save_npz(artifacts.path("activations", tmp_path), **{**arrays, "model": "bundled:smollm2-135m"})
    planted_ablation(tmp_path, rank_scale=3.0)
    path = C.write_claims(tmp_path, n_surrogates=3, n_boot=200)
    data = json.loads(path.read_text())
    verdicts = {c["id"]: c["verdict"] for c in data["claims"]}
    assert list(verdicts) == [f"C{i}" for i in range(1, 8)]
    assert verdicts["C1"] != "supported" and verdicts["C5"] == "supported"
    assert verdicts["C3"] == "not tested"                                          # no random-init copy
    reasons = {c["id"]: c["reason"] for c in data["claims"]}
    assert "random-init" in reasons["C3"]
    assert "Q4_1 GGUF" in data["weights"]
    entry = read_manifest(tmp_path)["sections"]["claims"]
    assert entry["verdicts"] == verdicts and "Q4_1 GGUF" in entry["weights"]
    stamp = path.stat().st_mtime_ns
    assert C.write_claims(tmp_path, n_surrogates=3, n_boot=200).stat().st_mtime_ns == stamp     # inputs unchanged
    planted_ablation(tmp_path, rank_scale=None, seed=2)                                               # 05 rerun
    again = json.loads(C.write_claims(tmp_path, n_surrogates=3, n_boot=200).read_text())
    assert {c["id"]: c["verdict"] for c in again["claims"]}["C5"] in ("ruled out", "underpowered")


@pytest.mark.slow(reason="reads the session's tiny pipeline run")
def test_executed_tiny_run_notebooks_have_no_stderr_output(tiny_run):
    executed = sorted(tiny_run.glob("[0-9][0-9]_*.ipynb"))
    assert executed
    noisy = {p.name: report.stderr_cells(p) for p in executed if report.stderr_cells(p)}
    assert not noisy, f"executed notebooks with stderr output (cells): {noisy}"


def test_a_ruled_out_claim_whose_oracle_is_not_detected_is_underpowered(tmp_path, declared):
    oracle = lambda value, ci: {"oracle": {"synergistic": {"value": value, "ci95": ci, "se": 0.05}}}   # noqa: E731
    artifacts.save("behaviour_summary", tmp_path, block("C6", 0.0, [-0.05, 0.05], [-0.02, 0.02], "less",
                                                        by_variant=oracle(-0.01, [-0.06, 0.04])))
    c6 = C.claim_c6(tmp_path)
    assert c6.verdict == "underpowered" and "oracle is not detected" in c6.reason
    artifacts.save("behaviour_summary", tmp_path, block("C6", 0.0, [-0.05, 0.05], [-0.02, 0.02], "less",
                                                        by_variant=oracle(-0.4, [-0.5, -0.3])))
    c6 = C.claim_c6(tmp_path)
    assert c6.verdict == "ruled out" and c6.details["oracle"]["verdict"] == "supported"


def test_c4_ci_is_recentred_on_the_observed_value():
    b = C.recentred({"value": 0.308, "ci95": [0.34, 0.47], "details": {}})
    assert b["ci95"] == pytest.approx([0.308 - 0.065, 0.308 + 0.065]) and b["se"] == pytest.approx(0.065 / 1.959964)
    assert b["details"]["percentile_ci95"] == [0.34, 0.47]
    assert C.recentred({"value": 1.0, "ci95": None}) == {"value": 1.0, "ci95": None}


def test_an_undefined_statistic_is_invalid_not_an_error(tmp_path, declared):
    artifacts.save("behaviour_summary", tmp_path, block("C6", None, None, [-0.05, 0.05], "less",
                                                        validity={"valid": False, "reason": "floor: baseline 0/8"}))
    c6 = C.claim_c6(tmp_path)
    assert c6.verdict == "invalid" and c6.reason == "floor: baseline 0/8"
    artifacts.save("finetune_summary", tmp_path, block("C7", None, None, None, "greater"))
    assert C.claim_c7(tmp_path).verdict == "invalid"
