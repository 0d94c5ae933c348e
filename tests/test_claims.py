"""lib.claims: every verdict follows its documented rule on planted inputs, and claims.json of a tiny run.

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

from lib import REPO_ROOT, artifacts, report
from lib import claims as C
from lib.ablation import AblationResult, Ordering, RANDOM_VARIANT
from lib.diagnostics import inverted_u_test
from lib.store import save_npz


# ----------------------------------------------------------------------------- rules as functions

def test_verdict_rules_follow_their_documented_thresholds():
    assert C.verdict_distinct((-0.6, -0.2), (0.7, 0.9)) == "supported"
    assert C.verdict_distinct((0.85, 0.92), (0.88, 0.95)) == "not supported"      # like the null
    assert C.verdict_distinct((0.55, 0.7), (0.0, 0.2)) == "not supported"         # shares most rank variance
    assert C.verdict_distinct((0.1, 0.6), (0.3, 0.5)) == "inconclusive"
    assert C.verdict_inverted_u("inverted U", "inverted U") == "supported"
    assert C.verdict_inverted_u("inverted U", "no depth trend") == "not supported"
    assert C.verdict_inverted_u("monotone increasing", None) == "not supported"
    assert C.verdict_inverted_u("inverted U", None) == "inconclusive"
    assert C.verdict_emerges("inverted U", "no depth trend") == "supported"
    assert C.verdict_emerges("inverted U", "inverted U") == "not supported"
    assert C.verdict_emerges("no depth trend", "no depth trend") == "not supported"
    assert C.verdict_emerges("inverted U", None) == "not tested"
    assert C.verdict_vs_null(0.05, (0.03, 0.07), 0.0, (-0.01, 0.01), "greater") == "supported"
    assert C.verdict_vs_null(0.0, (-0.005, 0.008), 0.0, (-0.01, 0.01), "greater") == "not supported"
    assert C.verdict_vs_null(0.01, (-0.005, 0.03), 0.0, (-0.01, 0.01), "greater") == "inconclusive"
    assert C.verdict_vs_null(-0.16, (-0.25, -0.08), 0.0, (-0.05, 0.05), "less") == "supported"
    assert C.verdict_vs_null(0.02, (-0.02, 0.06), 0.0, (-0.05, 0.05), "less") == "not supported"
    assert C.verdict_vs_null(1.2, None, 0.0, (-0.5, 0.5), "greater", n=2) == "inconclusive"
    assert C.verdict_vs_null(1.2, None, 0.0, (-0.5, 0.5), "greater", n=5) == "supported"
    # beyond the null band but on the wrong side of zero (syn less efficient than red): not the claim
    assert C.verdict_vs_null(-0.063, None, -0.066, (-0.068, -0.064), "greater", n=16) == "not supported"
    assert C.verdict_vs_null(0.04, (0.02, 0.06), 0.05, (0.06, 0.08), "less") == "not supported"
    with pytest.raises(ValueError, match="direction"):
        C.verdict_vs_null(1, None, 0, None, "bigger", n=5)
    assert C.verdict_ablation((1.2, 1.5), 100.0, (1.1, 1.3)) == "supported"
    assert C.verdict_ablation((1.2, 1.5), 100.0, (0.9, 1.2)) == "inconclusive"    # explained by the layers
    assert C.verdict_ablation((0.85, 0.97), 2.5) == "not supported"
    assert C.verdict_ablation((0.9, 1.1), 50.0) == "inconclusive"
    assert set(C.VERDICT_RULES) == set(C.CLAIMS) == set(C.PAPER_FIGURES) == {f"C{i}" for i in range(1, 8)}


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


def write_heads(out_dir: Path, X, tag: str = "", tokens=None) -> None:
    H = X.shape[1]
    layer = np.repeat(np.arange(N_LAYERS), HEADS_PER_LAYER)
    tokens = np.ones(X.shape[::2], np.int64) * 7 if tokens is None else tokens
    save_npz(artifacts.path("activations", out_dir, tag=tag), activations=X.astype(np.float32), tokens=tokens,
             head_layer=layer, head_index=np.tile(np.arange(HEADS_PER_LAYER), N_LAYERS), n_layers=N_LAYERS,
             n_heads=HEADS_PER_LAYER, model="random:llama")
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
    assert c1.verdict == "not supported" and c1.value == pytest.approx(ev.r)
    assert c1.null["ci95"] == pytest.approx([lo, hi]) and c1.ci95[0] <= ev.r <= c1.ci95[1]
    pv = C.profile_verdicts(ev, n_boot=500)
    assert pv["beyond_null"]["verdict"] != "inverted U"
    assert C.verdict_inverted_u(pv["raw"]["verdict"], pv["beyond_null"]["verdict"]) == "not supported"


def test_head_evidence_truncates_at_the_first_end_of_turn(artefact_run, tmp_path):
    X = np.asarray(artifacts.load("activations", artefact_run, keys=["activations"])["activations"], float)
    tokens = np.full(X.shape[::2], 7, np.int64)
    from lib.models import bundled_tokenizer
    from lib.prompts import end_of_turn_ids
    eot = end_of_turn_ids(bundled_tokenizer())[0]
    tokens[0, 30], tokens[1, 5], tokens[2, 40] = eot, eot, eot          # prompt 1 ends too early: left out
    write_heads(tmp_path, X, tokens=tokens)
    ev = C.head_evidence(tmp_path, truncate_at_eos=True, n_surrogates=2)
    assert ev.n_prompts == X.shape[0] - 1 and ev.steps == "31-80 (median 80)"
    # = the mean over the kept prompts of each cut series' own PhiID, computed one prompt at a time
    from lib import ranking as rk
    cuts = {0: 31, 2: 41, **{p: 80 for p in range(3, X.shape[0])}}
    each = [rk.per_prompt_stats(X[[p]][:, :, :n]) for p, n in cuts.items()]
    with np.errstate(invalid="ignore"):
        sts = np.nanmean(np.where(np.stack([e.valid[0] for e in each]), np.stack([e.sts[0] for e in each]), np.nan), 0)
    layer = ev.head_layer
    syn = np.array([np.nanmean(np.concatenate([sts[(i == h)], sts[(j == h)]])) for h in range(len(layer))
                    for i, j in [np.triu_indices(len(layer), 1)]])
    assert np.allclose(ev.syn, syn, rtol=1e-8, atol=1e-10)


def ranking_summary(out_dir, raw_scores, beyond_scores):
    layer = np.repeat(np.arange(N_LAYERS), HEADS_PER_LAYER)
    rows = lambda s: [{"variant": "rank_diff", **inverted_u_test(s, layer, N_LAYERS, 500).as_row()}]  # noqa: E731
    artifacts.save("ranking_summary", out_dir, {"variants": ["rank_diff"], "n_heads": len(layer),
                                                "inverted_u": rows(raw_scores),
                                                "inverted_u_beyond_null": rows(beyond_scores)})


def test_planted_inverted_u_is_supported_and_one_made_by_the_null_is_not(tmp_path):
    rng = np.random.default_rng(2)
    depth = np.repeat(np.linspace(0, 1, N_LAYERS), HEADS_PER_LAYER)
    bump = 1 - (2 * depth - 1) ** 2 + 0.1 * rng.standard_normal(len(depth))
    ranking_summary(tmp_path, bump, bump - 0.2)
    c2 = C.claim_c2(tmp_path)
    assert c2.verdict == "supported" and c2.details["raw_verdict"] == "inverted U"
    assert c2.ci95[0] > 0 and c2.source == ["ranking_summary"]
    ranking_summary(tmp_path, bump, 0.1 * rng.standard_normal(len(depth)))        # the null carries the shape
    assert C.claim_c2(tmp_path).verdict == "not supported"


def test_c3_needs_the_random_init_copy(artefact_run):
    ev = C.head_evidence(artefact_run, n_surrogates=4)
    assert C.claim_c3(ev, None, {}).verdict == "not tested"
    rand = C.head_evidence(artefact_run, tag="random_init", n_surrogates=4)
    c3 = C.claim_c3(ev, rand, {}, n_boot=300)
    assert c3.verdict == C.verdict_emerges(c3.details["trained"]["beyond_null"], c3.details["random_init"]["beyond_null"])
    assert c3.verdict == "not supported"                  # the planted shape is no beyond-null inverted U


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


def test_ablation_ranking_equal_to_a_random_order_is_not_supported_or_inconclusive(tmp_path):
    planted_ablation(tmp_path, rank_scale=None)
    c5 = C.claim_c5(tmp_path, n_boot=1000)
    assert c5.verdict in ("inconclusive", "not supported")
    assert 0 < c5.details["percentile_among_random"] < 100 and c5.details["range"] == "0-40%"
    assert c5.verdict == C.verdict_ablation(c5.ci95, c5.details["percentile_among_random"],
                                            c5.details["layer_matched"]["ci95"])


def test_ablation_ranking_beating_random_and_layer_matched_orders_is_supported(tmp_path):
    planted_ablation(tmp_path, rank_scale=3.0)
    c5 = C.claim_c5(tmp_path, n_boot=1000)
    assert c5.verdict == "supported" and c5.details["percentile_among_random"] == 100.0
    assert c5.value == pytest.approx(3.0 / np.mean(1 + 0.3 * np.random.default_rng(0).standard_normal(20)), rel=0.2)
    assert "full" in c5.details["per_variant"]["ranking:rank_diff"]
    planted_ablation(tmp_path, rank_scale=3.0, matched_scale=3.0)        # the layers explain it
    assert C.claim_c5(tmp_path, n_boot=1000).verdict == "inconclusive"


def test_ablation_absent_is_not_tested(tmp_path):
    c5 = C.claim_c5(tmp_path)
    assert c5.verdict == "not tested" and "05_ablation" in c5.reason


# ----------------------------------------------------------------------------- experiment blocks (C4, C6, C7)

def block(cid, value, ci, null_ci, direction, n=30):
    return {"claim": {"id": cid, "statistic": "planted", "value": value, "ci95": ci,
                      "null": {"name": "planted null", "value": 0.0, "ci95": null_ci}, "direction": direction,
                      "paper": {"value": None, "text": "planted paper figure"}, "n": n, "details": {"k": 1}}}


@pytest.fixture
def declared(monkeypatch):
    for cid, name in C.EXPERIMENT_ARTIFACTS.items():
        monkeypatch.setitem(artifacts.ARTIFACTS, name, artifacts.Artifact(name, f"{name}.json", C.CLAIMS[cid][1], "planted"))


def test_experiment_blocks_give_their_rule_verdicts(tmp_path, declared):
    for cid in ("C4", "C6", "C7"):
        c = C.claim_from_block(cid, tmp_path)
        assert c.verdict == "not tested" and C.CLAIMS[cid][1] in c.reason
    artifacts.save("topology", tmp_path, block("C4", 0.04, [0.03, 0.05], [-0.01, 0.01], "greater"))
    artifacts.save("behaviour_summary", tmp_path, block("C6", 0.01, [-0.03, 0.05], [-0.05, 0.05], "less"))
    artifacts.save("finetune_summary", tmp_path, block("C7", 1.5, None, [-0.8, 0.8], "greater", n=2))
    c4, c6, c7 = (C.claim_from_block(cid, tmp_path) for cid in ("C4", "C6", "C7"))
    assert (c4.verdict, c6.verdict, c7.verdict) == ("supported", "not supported", "inconclusive")
    assert c4.paper["text"] == "planted paper figure" and c4.details == {"k": 1} and c4.source == ["topology"]
    assert "no CI" in c7.reason
    artifacts.save("topology", tmp_path, {"efficiency": 1})
    assert "no valid 'claim' block" in C.claim_from_block("C4", tmp_path).reason


def test_undeclared_experiment_is_not_tested(tmp_path, monkeypatch):
    monkeypatch.delitem(artifacts.ARTIFACTS, "topology", raising=False)
    c = C.claim_from_block("C4", tmp_path)
    assert c.verdict == "not tested" and "lib/artifacts.py" in c.reason


# ----------------------------------------------------------------------------- claims.json of a tiny run

# tiny_run: the session's tiny run (tests/conftest.py), read-only

@pytest.mark.slow(reason="reads the session's tiny pipeline run")
def test_claims_json_of_a_tiny_run_follows_the_rules(tiny_run):
    data = json.loads((tiny_run / "claims.json").read_text())
    assert "arXiv 2601.06851" in data["paper"]
    claims = {c["id"]: c for c in data["claims"]}
    assert list(claims) == [f"C{i}" for i in range(1, 8)]
    for c in claims.values():
        assert c["verdict"] in C.VERDICTS and c["rule"] == C.VERDICT_RULES[c["id"]] and c["paper"]["text"]
        assert c["claim"] and c["test"] and c["source"]
        assert c["verdict"] != "not tested" or c["reason"]
    c1, c3, c5 = claims["C1"], claims["C3"], claims["C5"]
    assert C.verdict_distinct(c1["ci95"], c1["null"]["ci95"]) == c1["verdict"]
    assert c1["ci95"][0] <= c1["value"] <= c1["ci95"][1] and c1["n"] > 3
    assert "random_init" in c1["details"]
    assert c3["verdict"] == C.verdict_emerges(c3["details"]["trained"]["beyond_null"],
                                             c3["details"]["random_init"]["beyond_null"])
    m = c5["details"]["layer_matched"]
    assert m["n"] == 2 and c5["verdict"] == C.verdict_ablation(c5["ci95"], c5["details"]["percentile_among_random"],
                                                              m["ci95"] if m["ci95"][0] is not None else None)
    assert claims["C2"]["verdict"] in C.VERDICTS
    for cid in ("C4", "C6", "C7"):
        if not artifacts.path(C.EXPERIMENT_ARTIFACTS[cid], tiny_run).exists() \
                if C.EXPERIMENT_ARTIFACTS[cid] in artifacts.ARTIFACTS else True:
            assert claims[cid]["verdict"] == "not tested"


def test_write_claims_on_a_planted_run_writes_every_claim_and_the_manifest_entry(artefact_run, tmp_path):
    import shutil
    from lib.store import read_manifest
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
    assert verdicts["C1"] == "not supported" and verdicts["C5"] == "supported"
    assert verdicts["C3"] == "not tested" and verdicts["C2"] == "not tested"      # no random-init copy, no 04
    reasons = {c["id"]: c["reason"] for c in data["claims"]}
    assert "04_ranking_variants" in reasons["C2"] and "random-init" in reasons["C3"]
    assert "Q4_1 GGUF" in data["weights"]
    entry = read_manifest(tmp_path)["sections"]["claims"]
    assert entry["verdicts"] == verdicts and "Q4_1 GGUF" in entry["weights"]
    stamp = path.stat().st_mtime_ns
    assert C.write_claims(tmp_path, n_surrogates=3, n_boot=200).stat().st_mtime_ns == stamp     # inputs unchanged
    planted_ablation(tmp_path, rank_scale=None)                                               # 05 rerun
    again = json.loads(C.write_claims(tmp_path, n_surrogates=3, n_boot=200).read_text())
    assert {c["id"]: c["verdict"] for c in again["claims"]}["C5"] in ("inconclusive", "not supported")


@pytest.mark.slow(reason="reads the session's tiny pipeline run")
def test_executed_tiny_run_notebooks_have_no_stderr_output(tiny_run):
    executed = sorted(tiny_run.glob("[0-9][0-9]_*.ipynb"))
    assert executed
    noisy = {p.name: report.stderr_cells(p) for p in executed if report.stderr_cells(p)}
    assert not noisy, f"executed notebooks with stderr output (cells): {noisy}"
