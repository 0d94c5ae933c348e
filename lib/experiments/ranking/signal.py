"""Is a ranking signal? Split-half reliability, circular-shift surrogates and agreement with the measured
oracle; the rankings file notebook 04 writes."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from lib.storage import artifacts
from lib.experiments import diagnostics as dg
from lib.storage.store import ArtifactError
from lib.experiments.ranking.inputs import RankingInputs, load_inputs
from lib.experiments.ranking.scores import (DEFAULT_VARIANTS, VARIANTS, VariantScore, check_variants, minmax,
                                            source_stats)
from lib.storage.notebooks import NB

__all__ = ["split_half_reliability", "surrogate_scores", "null_tables", "inverted_u_table", "signal_summary",
           "agreement", "rankings_frame", "profiles_frame", "baseline_profiles", "ORACLE", "oracle_score",
           "oracle_agreement", "save_rankings"]


# ------------------------------------------------------------------------------------------- is it signal?

def split_half_reliability(inputs: RankingInputs, n_splits: int = 20, seed=0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Spearman between the head scores of two random prompt halves, per variant and split.
    -> (summary [variant, r_mean, r_sd, spearman_brown, n_splits, prompts_per_half], per-split values)."""
    halves = dg.random_halves(inputs.X.shape[0], n_splits, seed)
    rows = []
    for k, (a, b) in enumerate(_progress(halves, inputs.progress, "split halves")):
        sa = inputs.scores(lambda src: inputs.half(src, a), inputs.autocorr(a))
        sb = inputs.scores(lambda src: inputs.half(src, b), inputs.autocorr(b))
        for name in inputs.variants:
            rows.append({"variant": name, "split": k, "spearman": dg.correlation(sa[name].score, sb[name].score)["spearman"]})
    per_split = pd.DataFrame(rows)
    g = per_split.groupby("variant", sort=False)["spearman"]
    summary = pd.DataFrame({"variant": list(inputs.variants)})
    summary["r_mean"] = summary["variant"].map(g.mean())
    summary["r_sd"] = summary["variant"].map(g.std(ddof=1))
    summary["spearman_brown"] = dg.spearman_brown(summary["r_mean"].to_numpy())
    summary["n_splits"] = n_splits
    summary["prompts_per_half"] = inputs.X.shape[0] // 2
    return summary, per_split


def _progress(it, on, desc):
    if not on:
        return it
    from tqdm.auto import tqdm
    return tqdm(it, desc=desc)


def _signature(inputs: RankingInputs, seed) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(inputs.X).tobytes())
    h.update(repr((inputs.variants, inputs.tau, inputs.redundancy, seed)).encode())
    return h.hexdigest()[:16]


def surrogate_scores(inputs: RankingInputs, n_surrogates: int = 100, seed=0, checkpoint=None,
                     checkpoint_every: int = 10, n_jobs: int = 1, out_dir=None) -> dict[str, np.ndarray]:
    """Circular-shift surrogates: -> variant -> [n_surrogates, heads] scores.

    Surrogate k shifts every (prompt, head) series by its own random offset (seeded by (seed, k), so a resumed
    or parallel run gives the same numbers), after the variant's preprocessing (offset = floor(u * length) with
    one u per prompt and head, shared by every preprocessing), and recomputes PhiID for every source the
    variants need. checkpoint: an .npz path (default with out_dir: the run's lib.storage.artifacts "ranking_surrogates"
    file); finished surrogates are saved there every `checkpoint_every` and reused by a rerun with the same data
    and settings. n_jobs > 1: surrogates run in that many forked processes (Linux; falls back to 1 elsewhere)."""
    names = inputs.variants
    H = len(inputs.head_layer)
    sig = _signature(inputs, seed)
    results = {n: [] for n in names}
    if checkpoint is None and out_dir is not None:
        checkpoint = artifacts.path("ranking_surrogates", out_dir)
    if checkpoint and Path(checkpoint).exists():
        ck = artifacts.load_file("ranking_surrogates", checkpoint, require=[])
        if str(ck.get("signature")) == sig and all(n in ck for n in names):
            results = {n: list(ck[n][:n_surrogates]) for n in names}
    start = len(results[names[0]])
    children = np.random.SeedSequence(int(seed)).spawn(n_surrogates)
    prepared = {how: inputs.prepared(how) for _, how in inputs.sources}
    todo = list(range(start, n_surrogates))

    def save(done):
        if checkpoint and (done % checkpoint_every == 0 or done == n_surrogates):
            artifacts.save_file("ranking_surrogates", checkpoint,
                                {"signature": sig, **{n: np.array(results[n]).reshape(-1, H) for n in names}})

    for k, sc in _map_surrogates(inputs, prepared, [children[k] for k in todo], n_jobs, todo):
        for n in names:
            results[n].append(sc[n])
        save(k + 1)
    return {n: np.array(results[n]).reshape(-1, H) for n in names}


def _one_surrogate(inputs: RankingInputs, prepared: dict, child) -> dict[str, np.ndarray]:
    fractions = np.random.default_rng(child).random(size=inputs.X.shape[:2])
    shifted = {how: _shift(Y, fractions) for how, Y in prepared.items()}
    raw = shifted[None] if None in shifted else _shift(inputs.X, fractions)
    ac = dg.head_autocorrelation(raw)
    stats_ = source_stats(shifted, inputs.sources, inputs.tau, inputs.redundancy, inputs.backend)
    sc = inputs.scores(stats_.__getitem__, ac)
    return {n: v.score for n, v in sc.items()}


_FORKED = {}


def _forked_surrogate(child):
    from threadpoolctl import threadpool_limits
    with threadpool_limits(limits=1, user_api="blas"):
        return _one_surrogate(_FORKED["inputs"], _FORKED["prepared"], child)


def _map_surrogates(inputs, prepared, children, n_jobs, indices):
    """Yield (index, scores) in index order, sequentially or from a pool of forked processes."""
    import multiprocessing as mp
    it = _progress(range(len(children)), inputs.progress, "surrogates")
    if n_jobs <= 1 or len(children) < 2 or "fork" not in mp.get_all_start_methods():
        for n in it:
            yield indices[n], _one_surrogate(inputs, prepared, children[n])
        return
    from concurrent.futures import ProcessPoolExecutor
    _FORKED.update(inputs=inputs, prepared=prepared)
    try:
        with ProcessPoolExecutor(max_workers=int(n_jobs), mp_context=mp.get_context("fork")) as pool:
            results = pool.map(_forked_surrogate, children, chunksize=1)
            for n, sc in zip(it, results):
                yield indices[n], sc
    finally:
        _FORKED.clear()


def _shift(Y, fractions):
    """Circular shift of every [prompt, head] series by floor(fraction * steps) (uniform offsets for any
    series length, so detrended and differenced series get matching offsets)."""
    return dg.shift_series(Y, np.floor(fractions * Y.shape[2]).astype(np.int64))


def null_tables(scores: dict[str, VariantScore], null: dict[str, np.ndarray], head_layer, n_layers) -> pd.DataFrame:
    """Per variant and layer: observed layer mean, null mean / sd / 95% band, z-score."""
    frames = []
    for name, s in scores.items():
        prof = dg.layer_means(null[name], head_layer, n_layers) if len(null[name]) else np.empty((0, n_layers))
        t = dg.null_band(prof, s.layer_mean)
        t.insert(0, "variant", name)
        frames.append(t)
    return pd.concat(frames, ignore_index=True)


def inverted_u_table(scores: dict[str, VariantScore], head_layer, n_layers, n_boot=1000, seed=0,
                     null: dict | None = None) -> pd.DataFrame:
    """lib.experiments.diagnostics.inverted_u_test of every variant's head scores. With `null` (surrogate_scores) the test
    runs on the excess over the null instead: score - the head's mean surrogate score, i.e. only what the
    timing between heads adds to what each head's own values and circular autocorrelation already give (a shift
    does not keep a trend: see lib.experiments.diagnostics.shift_keeping_trend)."""
    rows = []
    for name, s in scores.items():
        values = s.score if null is None else s.score - np.asarray(null[name]).mean(0)
        rows.append({"variant": name, **dg.inverted_u_test(values, head_layer, n_layers, n_boot, seed).as_row()})
    return pd.DataFrame(rows)


def signal_summary(reliability: pd.DataFrame, verdicts: pd.DataFrame, verdicts_beyond_null: pd.DataFrame | None,
                   null_table: pd.DataFrame | None) -> pd.DataFrame:
    """One row per variant: split-half reliability, inverted-U verdict of the profile, verdict of the excess
    over the surrogate null, and how far the profile leaves the null band (layers with |z| > 3)."""
    out = reliability[["variant", "r_mean", "r_sd", "spearman_brown"]].merge(
        verdicts[["variant", "verdict", "peak_depth"]], on="variant", how="outer")
    if verdicts_beyond_null is not None:
        out = out.merge(verdicts_beyond_null[["variant", "verdict", "mid_minus_early", "mid_minus_late"]].rename(
            columns={"verdict": "verdict_beyond_null", "mid_minus_early": "beyond_null_mid_minus_early",
                     "mid_minus_late": "beyond_null_mid_minus_late"}), on="variant", how="left")
    if null_table is not None:
        g = null_table.groupby("variant", sort=False)["z"]
        out["layers_abs_z_gt_3"] = out["variant"].map(g.apply(lambda z: int((np.abs(z) > 3).sum())))
        out["max_abs_z"] = out["variant"].map(g.apply(lambda z: float(np.nanmax(np.abs(z))) if np.isfinite(z).any()
                                                      else np.nan))
    return out


def agreement(scores: dict[str, VariantScore]) -> pd.DataFrame:
    """Spearman correlation between the head scores of every two variants."""
    names = list(scores)
    M = np.array([[dg.correlation(scores[a].score, scores[b].score)["spearman"] for b in names] for a in names])
    return pd.DataFrame(M, index=names, columns=names)


def rankings_frame(inputs: RankingInputs, scores: dict[str, VariantScore]) -> pd.DataFrame:
    """rankings.csv: head_idx, layer, head, one score column per variant in [0, 1] (higher = more
    synergistic), and syn / red = per-head mean sts / rtr of the per-prompt PhiID (nats)."""
    df = pd.DataFrame({"head_idx": np.arange(len(inputs.head_layer)), "layer": inputs.head_layer,
                       "head": inputs.head_index})
    for name, s in scores.items():
        df[name] = s.score
    base = inputs.full(("per_prompt", None))
    df["syn"] = dg.per_head_mean_pairs(base.sts, base.valid, base.n_heads, inputs.labels)
    df["red"] = dg.per_head_mean_pairs(base.rtr, base.valid, base.n_heads, inputs.labels)
    return df


def profiles_frame(scores: dict[str, VariantScore], n_layers: int, tag: str = "trained") -> pd.DataFrame:
    depth = dg.normalized_depth(n_layers)
    return pd.DataFrame([{"tag": tag, "variant": n, "layer": l, "depth": depth[l], "mean": s.layer_mean[l]}
                         for n, s in scores.items() for l in range(n_layers)])


def baseline_profiles(out_dir, variants=DEFAULT_VARIANTS, tau=1, redundancy="MMI", n_boot=1000, seed=0,
                      backend="numpy"):
    """Layer profiles and inverted-U verdicts of every baseline tag in out_dir (random_init, rev-<rev>),
    for the variants whose inputs the tag has. -> (profiles DataFrame, verdicts DataFrame, skipped
    [(tag, reason)])."""
    profiles, verdicts, skipped = [], [], []
    for tag in dg.available_tags(out_dir):
        usable = []
        for v in check_variants(variants):
            var = VARIANTS[v]
            needed = artifacts.path("phiid", out_dir, tag, mode=var.mode)
            if var.preprocess is None and not needed.exists():
                skipped.append((tag, f"variant {v} skipped: no {needed.name} ({NB.PHIID} modes)"))
            else:
                usable.append(v)
        if not usable:
            continue
        try:
            inp = load_inputs(out_dir, usable, tag=tag, tau=tau, redundancy=redundancy, backend=backend)
            sc = inp.scores()
        except (ValueError, ArtifactError) as e:
            skipped.append((tag, f"skipped entirely: {e}"))
            continue
        profiles.append(profiles_frame(sc, inp.n_layers, tag))
        t = inverted_u_table(sc, inp.head_layer, inp.n_layers, n_boot, seed)
        t.insert(0, "tag", tag)
        verdicts.append(t)
    cat = lambda fs: pd.concat(fs, ignore_index=True) if fs else pd.DataFrame()  # noqa: E731
    return cat(profiles), cat(verdicts), skipped


ORACLE = "oracle"             # rankings.csv column of the oracle (lib.experiments.oracle), when oracle.npz exists


def oracle_score(out_dir, inputs: RankingInputs) -> np.ndarray | None:
    """[heads] the oracle's score min-maxed to [0, 1] (higher = more important), or None when the run has no
    oracle.npz (notebook 01 ran with oracle: false). Checked against the run's head map and extraction."""
    from lib.experiments.oracle import load_oracle
    key = artifacts.load("activations", out_dir, keys=["extraction_key"]).get("extraction_key")
    d = load_oracle(out_dir, inputs.head_layer, inputs.head_index, None if key is None else str(key))
    return None if d is None else minmax(d["score"])


def oracle_agreement(scores: dict[str, VariantScore], oracle: np.ndarray | None) -> pd.DataFrame:
    """Spearman and Pearson correlation of each variant's head scores with the oracle's (empty without oracle)."""
    if oracle is None:
        return pd.DataFrame(columns=["variant", "spearman", "pearson"])
    return pd.DataFrame([{"variant": n, **{k: dg.correlation(s.score, oracle)[k] for k in ("spearman", "pearson")}}
                         for n, s in scores.items()])


def save_rankings(out_dir, inputs: RankingInputs, scores: dict, reliability=None, verdicts=None, null_table=None,
                  agreement_matrix=None, params: dict | None = None, seconds: float | None = None,
                  verdicts_beyond_null=None, oracle: np.ndarray | None = None) -> pd.DataFrame:
    """Write rankings.csv (see rankings_frame; plus the `oracle` column when `oracle` [heads] is given, see
    oracle_score) and ranking_summary.json (reliability, inverted-U verdicts, null z-scores, agreement), and a
    manifest entry for notebook 04. Returns the rankings frame."""
    from lib.storage.store import update_manifest
    df = rankings_frame(inputs, scores)
    if oracle is not None:
        if len(oracle) != len(df):
            raise ValueError(f"oracle has {len(oracle)} scores but the run has {len(df)} heads")
        df.insert(3 + len(scores), ORACLE, np.asarray(oracle, dtype=np.float64))
    summary = {"variants": list(scores), "n_prompts": int(inputs.X.shape[0]), "n_heads": int(inputs.X.shape[1]),
               "tau": inputs.tau, "redundancy": inputs.redundancy, "descriptions":
               {n: VARIANTS[n].description for n in scores},
               "layer_profiles": {n: s.layer_mean.tolist() for n, s in scores.items()},
               "oracle": oracle is not None}
    for key, frame in (("reliability", reliability), ("inverted_u", verdicts),
                       ("inverted_u_beyond_null", verdicts_beyond_null)):
        if frame is not None:
            summary[key] = frame.to_dict(orient="records")
    if null_table is not None:
        summary["null_z"] = {n: g["z"].tolist() for n, g in null_table.groupby("variant", sort=False)}
    if agreement_matrix is not None:
        summary["agreement"] = agreement_matrix.to_dict()
    files = [artifacts.save("rankings", out_dir, df).name, artifacts.save("ranking_summary", out_dir, summary).name]
    update_manifest(out_dir, NB.RANKING, {**(params or {}), "files": files,
                                                     **({"seconds": round(seconds, 3)} if seconds is not None else {})})
    return df
