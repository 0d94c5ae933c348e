"""Reports a reviewer reads without squinting: the table formatter (lib.pipeline.tables), the generated "What this shows"
boxes (lib.pipeline.conclusions) on planted numbers, and the report check of every page of the tiny run in headless
Chromium at 1,300 px (tables that fit, no NaN / None / inf or long floats, every image loaded, the box present)."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from lib.pipeline import conclusions as cc
from lib.pipeline import tables

# ----------------------------------------------------------------------------- lib.pipeline.tables


@pytest.mark.parametrize("value, text", [
    (1.23456789, "1.23"), (0.000123456, "0.000123"), (-98765.4321, "-98800"), (2.0e-7, "2.00e-07"),
    (12345678.9, "1.23e+07"), (np.int64(42), "42"), (0, "0"), (0.5, "0.5"), (True, "yes"),
    (float("nan"), "\u2013"), (None, "\u2013"), (float("inf"), "\u2013"), (np.float32(0.1), "0.1"),
])
def test_number_has_three_significant_figures_and_a_dash_for_missing(value, text):
    assert tables.number(value) == text


def test_cells_never_dump_dicts_long_paths_or_nan_lists():
    assert tables.cell([0.123456, 0.98765]) == "[0.123, 0.988]"
    assert tables.cell([None, float("nan")]) == tables.cell([]) == "\u2013"
    assert tables.cell("[nan, nan]") == tables.cell("None") == tables.cell("NaN") == "\u2013"
    assert tables.cell("Nancy") == "Nancy"
    assert tables.cell({"a": 1, "b": 0.333333}) == "a = 1; b = 0.333"
    assert tables.cell("/work/x/outputs/smollm2-135m/activations__random_init.npz") == "activations__random_init.npz"
    assert tables.cell("x" * 100, max_chars=20) == "x" * 17 + "..."


def _header_widths(html: str) -> list[int]:
    """Number of header cells in the first row of every table of `html`."""
    return [len(re.findall(r"<th[ >]", t.split("</tr>")[0])) for t in re.findall(r"<table.*?</table>", html, re.S)]


def test_missing_values_become_a_dash_with_the_reason_in_a_note():
    df = pd.DataFrame({"variant": ["a", "b"], "g": [0.5, np.nan], "ci": [[0.1, 0.9], [None, None]]})
    html = tables.to_html(df, missing="undefined: no spread between runs")
    assert "NaN" not in html and "None" not in html and "nan" not in html
    assert html.count("\u2013") == 3                          # two cells + the note's key
    assert "undefined: no spread between runs" in html
    assert "hi-note" not in tables.to_html(df.dropna())       # no missing value: no note


def test_wide_tables_are_transposed_or_split_to_at_most_max_cols_columns():
    assert tables.MAX_COLS == 12
    few_rows = pd.DataFrame(np.arange(3 * 17, dtype=float).reshape(3, 17), columns=[f"c{i}" for i in range(17)])
    html = tables.to_html(few_rows)
    assert _header_widths(html) == [1 + 3]          # transposed: c0's values head the 3 columns, c1..c16 the rows
    assert html.count("<tr") == 1 + 16 and "<th>c16</th>" in html and "<th>34</th>" in html
    many_rows = pd.DataFrame(np.ones((20, 30)), columns=[f"c{i}" for i in range(30)])
    assert _header_widths(tables.to_html(many_rows)) == [1 + 10, 1 + 10, 1 + 9]    # c0 names the rows: 29 = 10+10+9



def test_a_column_called_null_keeps_its_name():
    html = tables.to_html(pd.DataFrame({"null": ["circular shift"], "value": [None]}, index=["None"]))
    assert "<th>null</th>" in html and "<th>None</th>" in html and html.count("\u2013") == 2   # the cell + the note


def test_empty_tables_render():
    for empty in (pd.DataFrame(), pd.DataFrame(columns=["sigma", "accuracy"]), pd.DataFrame({"a": [""]})):
        assert "<table" in tables.to_html(empty)


def test_thin_keeps_the_ends_and_at_most_k_measured_values():
    x = np.linspace(0, 1, 101)
    t = tables.thin(x, 10)
    assert len(t) == 10 and t[0] == 0 and t[-1] == 1 and set(t) <= set(x)
    assert list(tables.thin([0.1, 0.2], 10)) == [0.1, 0.2]


# ----------------------------------------------------------------------------- lib.pipeline.conclusions on planted numbers

def _auc_row(ordering, ratio, lo, hi, variant="rank_diff", band=(0.8, 1.2)):
    return {"variant": variant, "ordering": ordering, "auc_ratio": ratio, "ci_low": lo, "ci_high": hi,
            "percentile": 50.0, "n_random": 5, "random_band_low": band[0], "random_band_high": band[1],
            "max_fraction": 0.4}


def test_ablation_reverse_above_the_band_produces_the_contradiction():
    found, against = cc.ablation_sentences([_auc_row("ranking", 1.0, 0.9, 1.1), _auc_row("reverse", 2.0, 1.6, 2.4)])
    text = " ".join(against)
    assert "the most redundant heads matter most here" in text
    assert "changes behaviour more than removing the most synergistic first (2 vs 1)" in text
    assert "not shown to change behaviour more than random" in text and "includes 1" in text
    assert any("AUC ratio 2 [1.6, 2.4]" in f and "above it" in f for f in found)


def test_ablation_ranking_below_the_band_is_said_to_matter_less_than_random():
    found, against = cc.ablation_sentences([_auc_row("ranking", 0.658, 0.451, 0.957), _auc_row("reverse", 0.9, 0.6, 1.28)])
    assert "below the random band; CI [0.451, 0.957] lies below 1: it changes behaviour less than random removal" \
        in against[0] and "includes 1" not in against[0]
    assert "lies above 1" in cc.ablation_sentences([_auc_row("ranking", 1.1, 1.05, 1.15, band=(0.8, 1.3))])[1][0]


def test_ablation_as_the_paper_expects_gives_no_contradiction():
    found, against = cc.ablation_sentences([_auc_row("ranking", 2.0, 1.5, 2.5), _auc_row("reverse", 0.5, 0.4, 0.6)])
    assert against == []
    assert "above it" in found[0] and "below it" in found[1]


def test_ranking_raw_shapes_that_vanish_beyond_the_null_are_reported():
    s = {"reliability": [{"variant": "rank_diff", "spearman_brown": 0.3}, {"variant": "balance", "spearman_brown": 0.9}],
         "inverted_u": [{"variant": "rank_diff", "verdict": "inverted U"}, {"variant": "balance", "verdict": "inverted U"}],
         "inverted_u_beyond_null": [{"variant": "rank_diff", "verdict": "no depth trend"},
                                    {"variant": "balance", "verdict": "inverted U"}]}
    found, against = cc.ranking_sentences(s)
    assert "2 of 2 variants show an inverted U across depth in the raw scores, 1 of 2 in the excess" in found[1]
    assert any("1 raw inverted U(s) vanish beyond the null" in a for a in against)
    assert any("rank_diff) shows 'no depth trend' beyond the null" in a for a in against)
    assert any(a.startswith("Reliability below 0.5 for rank_diff:") for a in against)


def test_behaviour_at_the_floor_is_not_testable_and_a_real_effect_is_reported():
    floor = {"claim": {"value": None, "ci95": [None, None], "n": 8, "validity": {"valid": False, "reason": "floor"},
                       "details": {"baseline": {"accuracy": 0.38}, "perturbation": "noise", "sigma": 1.0}}}
    assert cc.behaviour_sentences(floor)[1][0].startswith("Not testable at this dose: floor")
    null = {"claim": {"value": -0.05, "ci95": [-0.2, 0.1], "n": 60, "validity": {"valid": True}, "paper_effect": -0.276,
                      "details": {"baseline": {"accuracy": 0.5}, "perturbation": "noise", "sigma": 1.0}}}
    found, against = cc.behaviour_sentences(null)
    assert found[0].startswith("Baseline accuracy 50% on 60 problems")
    assert "relative difference -0.05 [-0.2, 0.1]" in against[0]


def test_diagnostics_flag_syn_red_collinearity_and_a_brainlike_untrained_copy():
    d = {"lag": 1, "syn_red": {"n_heads": 30, "head_pearson": 0.95, "pair_pearson": 0.9},
         "autocorr_vs_synergy": {"pearson": 0.2}, "autocorr_vs_redundancy": {"pearson": 0.1},
         "tdmi_vs_synergy": {"pearson": 0.8},
         "all_files": [{"tag": "(model)", "mode": "concat", "head_spearman": 0.67},
                       {"tag": "random_init", "mode": "per_prompt", "head_spearman": 0.0},
                       {"tag": "random_init", "mode": "concat", "head_spearman": -0.7, "head_spearman_lo": -0.77,
                        "head_spearman_hi": -0.63},
                       {"tag": "random_init", "mode": "pooled", "head_spearman": 0.33}]}
    found, against = cc.diagnostics_sentences(d)
    assert "correlate Pearson r = 0.95 (pairs: r = 0.9)" in found[0]
    assert len(against) == 2 and "nearly alike" in against[0]
    assert "gives r = -0.7 [-0.77, -0.63] in mode concat (trained model in that mode: r = 0.67)" in against[1]
    assert "runs from -0.7 to 0.33, changing sign" in against[1] and "not by training" in against[1]
    d["all_files"][2]["head_spearman"] = -0.2                      # no mode below -0.3: nothing to discuss
    assert len(cc.diagnostics_sentences(d)[1]) == 1


def _c1_row(copy, r, lo, hi, null=(0.94, 0.93, 0.95), where="below the band"):
    return {"copy": copy, "r": r, "ci_low": lo, "ci_high": hi, "null_mean": null[0], "null_low": null[1],
            "null_high": null[2], "r_minus_null": r - null[0], "r_vs_null": where, "heads": 270, "surrogates": 20}


def test_c1_sentences_put_r_beside_its_null_and_say_when_it_is_still_collinear():
    found, against = cc.c1_sentences([_c1_row("trained", 0.888, 0.85, 0.914),
                                      _c1_row("random_init", 0.0, -0.13, 0.13, (0.0, -0.1, 0.3), "overlaps the band")])
    assert found[0] == ("C1, trained copy: Spearman r(synergy, redundancy) = 0.888 [0.85, 0.914] over 270 heads; its "
                        "circular-shift null (20 surrogates) has mean 0.94 and 95% band [0.93, 0.95]: r's CI below "
                        "the band (r - null mean = -0.052).")
    assert "overlaps the band" in found[1]
    assert len(against) == 1 and "less alike than in surrogates" in against[0] and "CI high 0.914 >= 0.5" in against[0]
    untrained_further = _c1_row("random_init", 0.0, -0.13, 0.13, (0.724, 0.714, 0.736))
    against = cc.c1_sentences([_c1_row("trained", 0.888, 0.85, 0.914), untrained_further])[1]
    assert "more 'distinct' than the trained model (r - null mean = -0.724 vs -0.052)" in against[1]
    assert cc.c1_sentences([_c1_row("trained", -0.5, -0.6, -0.4)])[1] == []


def test_c1_against_null_matches_a_hand_computation():
    from lib.pipeline import claims
    rng = np.random.default_rng(3)
    syn = rng.normal(size=40)
    red = syn + rng.normal(size=40)
    null = np.linspace(0.2, 0.9, 20)
    ev = claims.HeadEvidence("", syn, red, np.zeros(40), null, np.zeros((20, 40)), np.zeros(40, int), 1, 6, "10")
    (row,) = claims.c1_against_null({"": ev}, n_boot=200, seed=1)
    ranks = lambda x: np.argsort(np.argsort(x))                     # no ties: Spearman = Pearson of the ranks
    r = np.corrcoef(ranks(syn), ranks(red))[0, 1]
    assert row["copy"] == "trained" and row["r"] == pytest.approx(r) and row["heads"] == 40
    assert row["null_mean"] == pytest.approx(0.55) and row["surrogates"] == 20
    assert row["null_low"] == pytest.approx(0.2 + 0.7 * 0.025) and row["null_high"] == pytest.approx(0.2 + 0.7 * 0.975)
    assert row["r_minus_null"] == pytest.approx(r - 0.55)
    assert row["ci_low"] < r < row["ci_high"]
    where = ("below the band" if row["ci_high"] < row["null_low"] else "above the band" if row["ci_low"] >
             row["null_high"] else "overlaps the band")
    assert row["r_vs_null"] == where


def test_c1_figure_draws_the_band_the_surrogates_and_r_with_its_ci():
    from lib.plots.diagnostics import c1_null
    rows = [_c1_row("trained", 0.888, 0.85, 0.914), _c1_row("random_init", -0.1, -0.2, 0.05, (0.1, -0.1, 0.3))]
    fig = c1_null(rows, {"trained": np.full(20, 0.94), "random_init": np.linspace(-0.1, 0.3, 20)})
    ax = fig.axes[0]
    from matplotlib.collections import PolyCollection
    bands = [c.get_paths()[0].get_extents() for c in ax.collections if isinstance(c, PolyCollection)]
    assert [(b.x0, b.x1) for b in bands] == [pytest.approx((0.93, 0.95)), pytest.approx((-0.1, 0.3))]
    dots = [l for l in ax.lines if l.get_marker() == "o"]
    assert sorted(np.round(dots[1].get_xdata(), 6)) == sorted(np.round(np.linspace(-0.1, 0.3, 20), 6))
    observed = [l for l in ax.lines if l.get_marker() == "D"]
    assert [float(l.get_xdata()[0]) for l in observed] == [0.888, -0.1]
    assert ax.get_xlabel().startswith("Spearman r") and [t.get_text() for t in ax.get_yticklabels()] == \
        ["trained", "random-init"]


def test_floor_and_dose_sentences():
    rows = [("baseline", "none", 0.0, 23)] + [(k, "noise", 0.29, c) for k, c in
                                              (("synergistic", 0), ("redundant", 3), ("random", 1), ("random", 2))]
    table = pd.DataFrame([{"kind": k, "perturbation": p, "sigma": s, "n_problems": 60, "n_correct": c,
                           "accuracy": c / 60} for k, p, s, c in rows])
    (line,) = cc.floor_sentences(table, margin=3.0)
    assert line.startswith("At noise sigma 0.29 every perturbed head set (4 of 4) sits at or below the floor "
                           "(3 of 60 problems = 5%): 0-5% correct, from a baseline of 38.3%.")
    table.loc[2, "n_correct"] = 10
    assert "3 of 4 perturbed head sets" in cc.floor_sentences(table, margin=3.0)[0]
    table.loc[0, "n_correct"] = 1                                   # the baseline itself at the floor
    assert "so does the unperturbed baseline" in cc.floor_sentences(table, margin=3.0)[0]
    sweep = pd.DataFrame({"kind": ["baseline", "random_mean", "random_mean"], "sigma": [0.0, 0.1, 0.5],
                          "n_problems": 60, "relative_accuracy": [1.0, 1.2, 0.0]})
    found = cc.dose_sentences([0.29], sweep)
    assert found[0] == ("Dose sweep on 60 problems at sigma 0.1, 0.5: the random sets keep 1.2 of the baseline's "
                        "accuracy at sigma 0.1 and 0 at sigma 0.5; the main run used sigma 0.29.")
    assert "measured at 3 non-zero sigma value(s) (0.1, 0.29, 0.5)" in found[1]
    assert len(cc.dose_sentences([0.29], pd.concat([sweep, sweep.assign(sigma=[0.0, 0.2, 0.3])]))) == 1


def test_floor_margin_is_two_problems_or_five_percent():
    from lib.experiments.behaviour import floor_ceiling, floor_margin
    assert [floor_margin(n) for n in (8, 40, 60, 100)] == [2.0, 2.0, 3.0, 5.0]
    assert floor_ceiling(23, [3, 3], 60)["valid"] is False and floor_ceiling(23, [4, 4], 60)["valid"] is True


def test_curve_sentences_count_the_measured_steps():
    curves = pd.DataFrame([{"method": "grpo", "condition": k, "kind": k, "seed": s, "step": t,
                            "accuracy": 0.4 + 0.05 * t * (k == "synergistic")}
                           for k in ("synergistic", "random") for s in (0, 1) for t in range(4)])
    (line,) = cc.curve_sentences(curves)
    assert line == ("grpo: test accuracy measured at steps 0, 1, 2, 3 (4 points per run, 4 runs); before training -> "
                    "step 3, mean over runs: synergistic 40% -> 55%, random 40% -> 40%.")


def test_finetune_undefined_g_is_said_not_shown_as_a_result():
    s = {"runs": [{"method": "grpo", "kind": k, "final": 0.25} for k in ("synergistic", "random")],
         "claim": {"value": None, "ci95": [None, None]}}
    found, against = cc.finetune_sentences(s)
    assert found == ["grpo: mean final test accuracy random 25%, synergistic 25% (2 runs)."]
    assert "undefined" in against[0]


def test_box_html_is_escaped_and_findable():
    html = cc.to_html(cc.Conclusion("05_ablation", findings=["a < b"], against=["x"], sources=["ablation_auc.csv"]))
    assert "id='what-this-shows-05_ablation'" in html and "a &lt; b" in html and "Against the expectation" in html
    assert "nothing to conclude" in cc.to_html(cc.Conclusion("06_neuron_effects"))
    with pytest.raises(KeyError, match="no conclusion generator for '99_x'"):
        cc.conclude("99_x", ".")


def test_pages_without_a_claim_get_their_own_box_on_top():
    from lib.pipeline import report
    box = cc.to_html(cc.Conclusion("06_neuron_effects", findings=["direct share 0.9"])).replace("'", '"')  # as nbconvert
    top = report.own_findings(f"<html><body><p>text</p>{box}</body></html>")
    assert 'id="own-findings-06_neuron_effects"' in top and ">Findings of this page</h2>" in top
    assert "direct share 0.9" in top and "what-this-shows" not in top
    assert report.own_findings("<html><body>no box</body></html>") == ""


def test_every_pipeline_notebook_ends_with_its_box():
    import json
    from lib.pipeline.steps import pipeline_notebooks
    for name, path in pipeline_notebooks().items():
        last = "".join(json.loads(path.read_text())["cells"][-1]["source"])
        assert f'conclusions.show("{name}", out_dir' in last, name
        assert name in cc.GENERATORS


# ----------------------------------------------------------------------------- the report check in Chromium

def test_long_numbers_counts_significant_digits():
    from tests.tools.browser import long_numbers
    assert long_numbers("r = 0.12345678, p = 0.000123, 1234.56, 3.1415926") == ["0.12345678", "3.1415926"]


@pytest.fixture(scope="module")
def chromium():
    from tests.tools.browser import ensure_chromium
    path, why = ensure_chromium()
    if not path:
        pytest.skip(f"no headless browser: {why}")
    return path


@pytest.mark.slow(reason="drives a headless browser")
def test_report_check_catches_each_problem(chromium, tmp_path):
    """Negative control: a page with a wide table, NaN, a long float, a broken image and no box fails on each."""
    from tests.tools.browser import page_facts, page_problems
    cells = "".join(f"<td>column_{i}_with_a_long_value</td>" for i in range(40))
    page = tmp_path / "bad.html"
    page.write_text(f"<html><body><div class='jp-OutputArea-output'><table><tr>{cells}</tr></table>"
                    f"<pre>g = NaN, r = 0.123456789</pre><img src='missing.png' alt='gone'></div></body></html>")
    problems = page_problems(page_facts(chromium, page), need_box=True)
    for expected in ("table 0 is", "'NaN'", "0.123456789", "broken image 0: gone", "0 'What this shows' boxes"):
        assert any(expected in p for p in problems), (expected, problems)
    good = tmp_path / "good.html"
    good.write_text("<html><body><div class='jp-OutputArea-output'>" + tables.to_html(pd.DataFrame(
        np.full((3, 40), 0.123456789))) + cc.to_html(cc.Conclusion("x", findings=["ok"])) + "</div></body></html>")
    assert page_problems(page_facts(chromium, good), need_box=True) == []


@pytest.mark.slow(reason="drives a headless browser over every page of the tiny run")
def test_every_page_of_the_tiny_run_passes_the_report_check(tiny_run, chromium):
    from tests.tools.browser import page_facts, page_problems
    pages = sorted((tiny_run / "html").glob("*.html"))
    assert len(pages) >= 12, pages
    found = {}
    for page in pages:
        problems = page_problems(page_facts(chromium, page), need_box=page.stem != "index")
        if page.stem in ("06_neuron_effects", "07_qkov_interference", "11_local_synergy") and \
                "id=\"own-findings-" not in page.read_text():
            problems.append("no Findings box of its own at the top")
        if problems:
            found[page.name] = problems[:5]
    assert not found, found


# ----------------------------------------------------------------------------- figures

def test_ablation_lines_break_where_nothing_was_measured():
    from lib.plots.ablation import break_gaps, unmeasured_gaps
    x = np.array([0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 1.0])
    xs, ys = break_gaps(x, x ** 2)
    assert np.isnan(xs[6]) and np.isnan(ys[6]) and xs[7] == 1.0 and ys[7] == 1.0 and len(xs) == 8
    assert unmeasured_gaps(x) == [(0.25, 1.0)]
    even = np.linspace(0, 1, 9)
    assert len(break_gaps(even, even)[0]) == 9 and unmeasured_gaps(even) == []


def test_heatmap_colour_scale_is_robust_and_logarithmic_over_decades():
    import matplotlib
    from lib.plots.phiid import colour_norm
    rng = np.random.default_rng(0)
    decades = 10 ** rng.uniform(-4, 1, size=(30, 30))              # positive, five decades
    norm, how = colour_norm(decades)
    assert isinstance(norm, matplotlib.colors.LogNorm) and "log" in how
    assert norm.vmin == pytest.approx(np.percentile(decades, 2)) and norm.vmax == pytest.approx(np.percentile(decades, 98))
    linear = rng.normal(size=(30, 30))
    linear[0, 0] = 1e6                                              # one outlier must not set the scale
    norm, how = colour_norm(linear)
    assert not isinstance(norm, matplotlib.colors.LogNorm) and norm.vmax < 5


def test_two_tags_get_two_panels_with_their_own_scale():
    from lib.plots.local import step_profiles
    from lib.plots.topology import strength_by_layer
    prof = {tag: pd.DataFrame({"atom": "sts", "step": np.arange(5), "mean": m, "ci_lo": m - 0.1, "ci_hi": m + 0.1})
            for tag, m in (("trained", np.full(5, 0.01)), ("random_init", np.full(5, 1.0)))}
    fig = step_profiles(prof)
    assert len(fig.axes) == 2 and fig.axes[0].get_ylim()[1] < 0.5 < fig.axes[1].get_ylim()[0]
    rows = [{"tag": tag, "network": net, "layer": l, "strength": s, "ci_lo": s, "ci_hi": s}
            for tag, s in (("trained", 0.01), ("random_init", 1.0)) for net in ("syn", "red") for l in range(3)]
    fig = strength_by_layer(pd.DataFrame(rows))
    assert [ax.get_title() for ax in fig.axes] == ["trained", "random_init"]


def test_accuracy_vs_sigma_shows_every_measured_dose_the_baseline_and_the_floor():
    from types import SimpleNamespace
    from lib.plots.behaviour import plot_accuracy_vs_sigma
    acc = {"synergistic": 0.0, "redundant": 0.05, "layer_matched": 0.0333}
    rows = [{"kind": "baseline", "variant": "", "perturbation": "none", "sigma": 0.0, "n_problems": 60,
             "accuracy": 0.383, "ci_low": 0.26, "ci_high": 0.52}]
    rows += [{"kind": k, "variant": "rank_diff", "perturbation": "noise", "sigma": 0.29, "n_problems": 60,
              "accuracy": a, "ci_low": 0.0, "ci_high": a + 0.06} for k, a in acc.items()]
    rows += [{"kind": "random", "variant": "", "perturbation": "noise", "sigma": 0.29, "n_problems": 60,
              "accuracy": a, "ci_low": 0.0, "ci_high": 0.1} for a in (0.0, 0.05)]
    result = SimpleNamespace(table=pd.DataFrame(rows), plan=SimpleNamespace(variants=["rank_diff"], fraction=0.25),
                             floor_margin=lambda: 3.0)
    grid = [0.1, 0.2, 0.3, 0.4, 0.5]
    sweep = pd.DataFrame([{"kind": "random", "seed": s, "sigma": x, "n_problems": 60, "accuracy": 0.4 - 0.8 * x + 0.01 * s,
                           "ci_low": 0.0, "ci_high": 0.5} for s in (0, 1) for x in grid]
                         + [{"kind": "random_mean", "seed": -1, "sigma": x, "n_problems": 60, "accuracy": 0.405 - 0.8 * x,
                             "ci_low": 0.3 - 0.8 * x, "ci_high": 0.5 - 0.8 * x} for x in grid])
    ax = plot_accuracy_vs_sigma(result, SimpleNamespace(table=sweep)).axes[0]
    lines = {l.get_label(): l for l in ax.lines} | {c.get_label(): c.lines[0] for c in ax.containers}   # errorbars
    floor = next(l for k, l in lines.items() if k.startswith("floor"))
    assert list(floor.get_ydata()) == [3 / 60, 3 / 60] and "3 of 60 problems (5%)" in floor.get_label()
    base = next(l for k, l in lines.items() if k.startswith("baseline"))
    assert list(base.get_ydata()) == [0.383, 0.383]
    mean = next(l for k, l in lines.items() if k.startswith("dose sweep: random sets' mean"))
    assert list(mean.get_xdata()) == grid and np.allclose(mean.get_ydata(), [0.405 - 0.8 * x for x in grid])
    assert len(next(l for k, l in lines.items() if k.startswith("dose sweep: each")).get_xdata()) == 10
    for kind, a in acc.items():                               # shifted along the log axis, at most by 10 %
        line = next(l for k, l in lines.items() if k.startswith(kind.replace("_", "-")))
        assert line.get_ydata()[0] == a and 0.9 * 0.29 < line.get_xdata()[0] < 1.11 * 0.29
    label, random = next((k, l) for k, l in lines.items() if k.startswith("random sets' mean, main run"))
    assert random.get_ydata()[0] == pytest.approx(0.025) and "1 sd over 2 sets" in label
    assert ax.get_xscale() == "log" and "sigma" in ax.get_xlabel() and "accuracy" in ax.get_ylabel()
