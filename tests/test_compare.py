"""lib/compare.py on two copies of the shared tiny run: tables against the runs' own files read directly (json,
pandas, numpy), the refusals naming the difference, the report and the index links."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from lib import compare


def _copy(src, dest):
    shutil.copytree(src, dest, symlinks=True)
    return dest


def _set_npz(path, **changes):
    with np.load(path, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    data.update({k: np.asarray(v) for k, v in changes.items()})
    np.savez(path, **data)


def test_tables_match_the_runs_files(tiny_run, tmp_path):
    other = _copy(tiny_run, tmp_path / "tiny-b")
    views = compare.load_runs([tiny_run, other])
    matrix = compare.claims_matrix(views)
    claims = json.loads((tiny_run / "claims.json").read_text())["claims"]
    assert len(matrix) == 2 * len(claims)
    for c in claims:
        row = matrix[(matrix["claim"] == c["id"]) & (matrix["run"] == tiny_run.name)].iloc[0]
        assert row["verdict"] == c["verdict"]
        if c.get("value") is not None:
            assert row["effect [95% CI]"].startswith(f"{c['value']:.3g}")
    grid = compare.verdict_grid(matrix)
    assert list(grid.columns) == sorted([tiny_run.name, "tiny-b"]) and (grid[tiny_run.name] == grid["tiny-b"]).all()

    profile = compare.depth_profile(views[0])
    rank = pd.read_csv(tiny_run / "rankings.csv")
    expected = rank.groupby("layer")["rank_diff"].mean().to_numpy()
    np.testing.assert_allclose(profile["score"], expected)
    n_layers = int(rank["layer"].max()) + 1
    np.testing.assert_allclose(profile["depth"], (np.arange(n_layers) + 0.5) / n_layers)
    with np.load(tiny_run / "ranking_surrogates.npz") as z:
        sur = z["rank_diff"]                                           # [surrogates, heads]
    layer0 = sur[:, rank["layer"].to_numpy() == 0].mean(1)
    assert profile["null_lo"][0] == pytest.approx(np.percentile(layer0, 2.5))
    assert profile["null_hi"][0] == pytest.approx(np.percentile(layer0, 97.5))

    diag = json.loads((tiny_run / "diagnostics.json").read_text())
    table = compare.syn_red_table(views)
    trained = table[(table["run"] == tiny_run.name) & (table["weights"] == "trained")].iloc[0]
    assert trained["syn-red Spearman"] == pytest.approx(diag["syn_red"]["head_spearman"])

    curves = compare.ablation_curves(views[0])
    abl = pd.read_csv(tiny_run / "ablation.csv")
    rand = abl[abl["ordering"] == "random"].groupby("fraction")["kl_mean"].mean()
    np.testing.assert_allclose(curves.set_index("fraction")["random_mean"], rand.to_numpy())
    assert set(compare.prompt_sets(views)["prompts"]) == {len(views[0].prompts)}


def test_refusals_name_the_difference(tiny_run, tmp_path):
    other = _copy(tiny_run, tmp_path / "tiny-b")
    _set_npz(other / "phiid_per_prompt.npz", tau=2)
    with pytest.raises(compare.CompareError, match=r"PhiID setting 'tau' \(1 vs 2\)"):
        compare.load_runs([tiny_run, other])
    third = _copy(tiny_run, tmp_path / "tiny-c")
    with np.load(third / "activations.npz") as z:
        texts = z["prompt_text"].copy()
    texts[0] = "Something else entirely."
    _set_npz(third / "activations.npz", prompt_text=texts)
    with pytest.raises(compare.CompareError, match="different prompt lists: prompt id"):
        compare.load_runs([tiny_run, third])
    with pytest.raises(compare.CompareError, match="not a finished run"):
        compare.load_runs([tiny_run, tmp_path / "nothing"])
    with pytest.raises(compare.CompareError, match="share a folder name"):
        compare.load_runs([tiny_run, tiny_run])


def test_only_the_template_differs_is_stated_not_refused(tiny_run, tmp_path):
    other = _copy(tiny_run, tmp_path / "tiny-b")
    _set_npz(other / "activations.npz", chat_template=False)
    sets = compare.prompt_sets(compare.load_runs([tiny_run, other])).set_index("run")
    assert sets.loc[tiny_run.name, "chat template"] == "yes" and sets.loc["tiny-b", "chat template"].startswith("no")


def test_report_and_index_links(tiny_run_copy, tmp_path):
    runs = tmp_path / "outputs"
    a = _copy(tiny_run_copy, runs / "tiny-a")
    b = _copy(tiny_run_copy, runs / "tiny-b")
    html = compare.render([a, b], runs / "compare")
    assert html.exists() and "Claims matrix" in html.read_text()
    assert "what-this-shows-12_compare_models" in html.read_text()          # the page ends with its box
    executed = json.loads((runs / "compare" / "12_compare_models.ipynb").read_text())
    errors = [o for c in executed["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"
              or o.get("name") == "stderr"]
    assert not errors, errors
    for run in (a, b):
        index = (run / "html" / "index.html").read_text()
        assert "../../compare/12_compare_models.html" in index


def _matrix(rows):
    return pd.DataFrame([{"claim": c, "run": r, "verdict": v, "effect [95% CI]": e} for c, r, v, e in rows])


def test_claim_sentences_on_planted_verdicts():
    found, against = compare.claim_sentences(_matrix([
        ("C1", "a", "ruled out", "0.9 [0.8, 1]"), ("C1", "b", "ruled out", "0.93 [0.88, 0.96]"),
        ("C2", "a", "ruled out", "0.01"), ("C2", "b", "underpowered", "0.05"),
        ("C5", "a", "ruled out", "0.66"), ("C5", "b", "supported", "1.9"),
        ("C6", "a", "invalid", "-"), ("C6", "b", "underpowered", "-")]))
    assert found == ["C1: ruled out in every run: a ruled out (0.9 [0.8, 1]); b ruled out (0.93 [0.88, 0.96]).",
                     "C2: ruled out where a run decides it, not decided in the others: a ruled out (0.01); "
                     "b underpowered (0.05)."]
    assert against[0] == "C5: the runs disagree: a ruled out (0.66); b supported (1.9)."
    assert against[1].startswith("C6: no run decides it")
    assert len(against) == 2                       # one run supports a claim: no "supports nothing" sentence
    assert compare.claim_sentences(_matrix([("C1", "a", "ruled out", "0.9")]))[1] == [
        "No run supports any claim of the paper."]


def test_ablation_and_profile_sentences_read_the_ci_against_one():
    auc = pd.DataFrame({"run": ["a", "a", "b", "c"], "max_fraction": [0.2, 0.4, 0.4, 0.4],
                        "auc_ratio": [2.0, 0.658, 1.37, 1.5], "ci_low": [1.5, 0.451, 0.773, 1.1],
                        "ci_high": [2.5, 0.957, 2.73, 1.9]})
    a, b, c = compare.ablation_sentences(auc)
    assert a.index("2 [1.5, 2.5] over 0-20% of heads (more than random)") < a.index(
        "0.658 [0.451, 0.957] over 0-40% of heads (less than random)")                # every window, narrowest first
    assert "(CI includes 1)" in b and c.endswith("(more than random).")
    p = pd.DataFrame({"run": "a", "depth": [1 / 6, 0.5, 5 / 6], "score": [0.1, 0.5, 0.2],
                      "null_lo": [0.0, 0.0, 0.0], "null_hi": [0.2, 0.3, 0.3]})
    assert compare.profile_sentences([p]) == ["a: highest layer mean 0.5 at depth 0.50 (band 0 to 0.3); 1 of 3 "
                                              "layers above their band."]


def test_summary_box_names_its_origin_and_reads_every_table():
    from lib.pipeline.conclusions import to_html
    matrix = _matrix([("C1", "a", "ruled out", "0.9")])
    syn_red = pd.DataFrame({"run": ["a", "a"], "weights": ["trained", "random_init"], "syn-red Spearman": [0.9, 0.1],
                            "ci_lo": [0.85, None], "ci_hi": [0.95, None]})
    auc = pd.DataFrame({"run": ["a"], "max_fraction": [0.4], "auc_ratio": [0.5], "ci_low": [0.4], "ci_high": [0.6]})
    prof = pd.DataFrame({"run": "a", "depth": [0.5], "score": [1.0], "null_lo": [0.0], "null_hi": [0.5]})
    box = to_html(compare.summary(matrix, syn_red, auc, [prof]))
    assert "id='what-this-shows-12_compare_models'" in box and "by lib/compare.py from" in box
    assert "a trained 0.9 [0.85, 0.95]" in box and "a random-init 0.1;" not in box and "a random-init 0.1." in box
    assert "1 of 1 layers above" in box and "(less than random)" in box and "C1: ruled out in every run" in box
