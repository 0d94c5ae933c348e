"""Network topology of synergy and redundancy (the paper's Fig 3b-c): notebook 08.

The pairwise PhiID atoms `sts` (synergy) and `rtr` (redundancy) are the weights of two undirected weighted networks
over heads: W_ij = mean of atom[i, j] and atom[j, i] over the directions that are defined (both directions are
relabellings of one pair), negatives clipped to 0, diagonal 0; a pair undefined in both directions has no edge.

Measures (each on the full network and on the strongest p of all pairs, p in `thresholds`):
  efficiency   weighted global efficiency exactly as the Brain Connectivity Toolbox's `efficiency_wei`
               (Rubinov & Sporns 2010): lengths 1 / w on W / max(W), the mean over ordered pairs of 1 / shortest
               path length (0 for unreachable pairs). Shortest paths with scipy.sparse.csgraph (Dijkstra, C code)
               on a pruned graph: an edge longer than a two-step path through a hub between its ends lies on no
               shortest path, so dropping it changes no distance (exact, and sparse for near-complete networks).
  modularity   Louvain (gamma 1, lib/estimators/louvain.py): the best Q over `n_louvain` random node orders, with its
               module assignment; checked against bctpy's `community_louvain` and networkx's
               `louvain_communities`.
  threshold    `threshold_proportional` keeps the round(p * n (n - 1) / 2) strongest pairs, as bctpy's
               function of that name.

Null (beyond the paper): `n_null` randomised networks that keep the weight distribution exactly and every node's
strength to within `STRENGTH_TOL` (max relative error reported). The equivalent of bctpy's
`null_model_und_sign` for these networks, vectorised: that function rewires edges keeping degrees (which moves
nothing in a complete graph, the usual case here) and then reassigns the sorted weights to approximate the
strengths, one Python step per edge. Here: the weights of the unordered pairs are shuffled (isolated nodes stay
isolated), then alternately (a) scaled as W_ij x_i x_j (symmetric Sinkhorn iteration) to strengths a little past
the observed ones, s (s / current strengths)^0.5, because (b) undoes part of each scaling, and (b) replaced rank for
rank by the original weights (the exact distribution), until the strengths are within the tolerance after (b);
greedy weight swaps between pairs finish the rare network that stalls. Degrees are not kept when some pairs have
zero weight.
From the null: z-scores (observed - null mean) / null sd, one-sided empirical p-values (1 + #{null as extreme}) /
(1 + n_null), and the syn-minus-red difference of efficiency (and red-minus-syn of modularity) against the same
difference between the null networks (its 2.5 / 97.5 percentiles).

Modules vs layers: normalised mutual information 2 I(M; B) / (H(M) + H(B)) between the module assignment and
`n_bands` contiguous layer bands, against the same NMI for the null networks' modules. Node strength by layer.
Every tag of the phiid files (trained "", "random_init", checkpoints "rev-...") gets the same measures.

Cost: each null network costs its construction (about 20 rounds of a sort of all pairs), one efficiency (a sparse
Dijkstra) and n_louvain Louvain runs (numba, lib/estimators/louvain.py). `n_jobs` runs the observed measures and chunks of
NULL_CHUNK null networks in forked processes, so both networks of every tag share the processes evenly. Results
depend only on the seed, never on n_jobs. benchmarks/topology_bench.py measures the 270- and 1,152-head cases.
"""
from __future__ import annotations

import numpy as np

from lib.estimators.louvain import louvain, louvain_batch, modularity  # noqa: F401  (part of this module's API)
from lib.estimators.networks import (NETWORKS, TopologyError, check_network, check_threshold,  # noqa: F401
                                     global_efficiency, layer_bands, nmi, pair_weights, shortest_paths,
                                     strength_by_layer, strength_error, strength_null, symmetric_weights,
                                     threshold_proportional)
from lib.storage.notebooks import NB

__all__ = ["NETWORKS", "DRAW_FRACTION", "TopologyError", "pair_weights", "threshold_proportional", "shortest_paths",
           "global_efficiency", "strength_null", "nmi", "strength_by_layer", "observed_measures", "band",
           "versus_null", "modules_table", "run_topology"]


THRESHOLDS = (0.05, 0.1, 0.2, 0.5, 1.0)          # fractions of all pairs kept, strongest first
DRAW_FRACTION = 0.1                              # the Fig 3b drawing: top 10% of pairs


# ------------------------------------------------------------------------------------------------ one network

def check_settings(thresholds, n_louvain, n_null, n_bands, n_jobs=1, n_boot=0) -> tuple[float, ...]:
    """Validate the analysis settings -> thresholds as floats (TopologyError naming the bad one)."""
    thresholds = tuple(check_threshold(p) for p in thresholds)
    if not thresholds:
        raise TopologyError("thresholds is empty: give at least one fraction of pairs, e.g. [0.1, 1.0]")
    for name, value, low in (("n_null", n_null, 0), ("n_louvain", n_louvain, 1), ("n_bands", n_bands, 1),
                             ("n_jobs", n_jobs, 1), ("n_boot", n_boot, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise TopologyError(f"{name} = {value!r}: it must be an integer >= {low}")
    return thresholds


def observed_measures(W: np.ndarray, thresholds, n_louvain: int, seed) -> tuple[list[dict], np.ndarray]:
    """Efficiency and best-of-n_louvain modularity of W [n, n] kept at each threshold ->
    (rows threshold, edges, efficiency, modularity, modularity_sd_over_seeds, n_modules; modules [thresholds, n])."""
    nets = np.stack([threshold_proportional(W, p) for p in thresholds])
    n = len(W)
    modules, q = np.tile(np.arange(n), (len(nets), 1)), np.full(len(nets), np.nan)
    q_all = np.full((len(nets), 1), np.nan)
    some = np.flatnonzero(nets.sum((1, 2)) > 0)          # a threshold that keeps no pair has no modularity
    if some.size:
        modules[some], q[some], q_found = louvain_batch(nets[some], n_louvain, seed)
        q_all = np.full((len(nets), n_louvain), np.nan)
        q_all[some] = q_found
    rows = [{"threshold": p, "edges": int((np.triu(net, 1) > 0).sum()), "efficiency": global_efficiency(net),
             "modularity": float(q[t]), "modularity_sd_over_seeds": float(np.std(q_all[t])),
             "n_modules": int(modules[t].max() + 1)}
            for t, (p, net) in enumerate(zip(thresholds, nets))]
    return rows, modules


def one_null(W: np.ndarray, seed, n_louvain: int, bands: np.ndarray) -> dict:
    """One strength-preserving null of W [n, n] and its measures -> efficiency, modularity (best of n_louvain),
    nmi_layers (its modules vs the layer bands [n]), strength_error."""
    rng = np.random.default_rng(seed)
    null, error = strength_null(W, rng)
    modules, q, _ = louvain_batch(null[None], n_louvain, rng)
    return {"efficiency": global_efficiency(null), "modularity": float(q[0]), "nmi_layers": nmi(modules[0], bands),
            "strength_error": error}


def null_seeds(seed, n_null: int) -> list:
    """The seed of each null network of a network whose analysis seed is `seed`."""
    return np.random.SeedSequence([*np.atleast_1d(seed), 1]).spawn(n_null)


def stack_nulls(rows: list[dict]) -> dict:
    """[n_null] dicts of one_null -> dict of [n_null] arrays: efficiency, modularity, nmi_layers, strength_error."""
    keys = ("efficiency", "modularity", "nmi_layers", "strength_error")
    return {k: np.array([r[k] for r in rows], np.float64) for k in keys}


def band(values) -> dict:
    """Summary of null values [n]: mean, sd, 2.5 / 97.5 percentiles (None when there are none)."""
    values = np.asarray(values, np.float64)
    if values.size == 0:
        return {"mean": None, "sd": None, "ci95": None, "n": 0}
    return {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if values.size > 1 else None,
            "ci95": [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))], "n": int(values.size)}


def versus_null(observed: float, null_values, direction: str = "greater") -> dict:
    """observed against its null [n]: z = (observed - mean) / sd (None when the null is constant), one-sided
    empirical p (1 + #{null at least as extreme}) / (1 + n), and the null band."""
    null_values = np.asarray(null_values, np.float64)
    summary = {"observed": float(observed), "null": band(null_values), "z": None, "p": None}
    if null_values.size:
        extreme = null_values >= observed if direction == "greater" else null_values <= observed
        summary["p"] = float((1 + extreme.sum()) / (1 + null_values.size))
        sd, mean = summary["null"]["sd"], summary["null"]["mean"]
        if sd and sd > 1e-9 * max(abs(mean), abs(observed), 1e-300):      # a constant null has no z-score
            summary["z"] = float((observed - mean) / sd)
    return summary


# ------------------------------------------------------------------------------------------------------ inputs

def _scalar(data: dict, key: str):
    return np.asarray(data[key]).item() if key in data else None


def _fix(mode: str) -> str:
    return (f"rerun {NB.PHIID} on this run (python -m lib.run --params <run>.yaml --only {NB.PHIID} --force) so that "
            f"phiid_{mode}*.npz come from this run's activations")


def _check_provenance(ph: dict, out_dir, mode: str, tag: str, name: str) -> None:
    """The phiid file must be this mode's, computed from this tag's activations file of this run."""
    from lib.storage import artifacts
    if _scalar(ph, "mode") not in (None, mode):
        raise TopologyError(f"{name} holds PhiID of mode {_scalar(ph, 'mode')!r}, not {mode!r}: {_fix(mode)}")
    expected = artifacts.path("activations", out_dir, tag=tag)
    source = _scalar(ph, "activations_file")
    if source is not None and source != expected.name:
        raise TopologyError(f"{name} was computed from {source!r}, not {expected.name!r}: it is a file of another "
                            f"run or tag; {_fix(mode)}")
    if expected.exists():
        acts = artifacts.load("activations", out_dir, tag=tag, keys=["head_layer", "head_index", "model"])
        for key in ("head_layer", "head_index"):
            if not np.array_equal(acts[key], ph[key]):
                raise TopologyError(f"{name} and {expected.name} have different {key}: {_fix(mode)}")
        a, p = _scalar(acts, "model"), _scalar(ph, "model")
        if a is not None and p is not None and a != p:
            raise TopologyError(f"{name} was computed for model {p!r} but {expected.name} holds {a!r}: {_fix(mode)}")


def load_networks(out_dir, mode: str = "per_prompt", tag: str = "") -> dict:
    """The syn and red networks of one phiid file -> dict: syn, red [heads, heads] weights, head_layer,
    head_index [heads], file, undefined_pairs. TopologyError when the file is of another run or defines no pair."""
    from lib.storage import artifacts
    name = artifacts.path("phiid", out_dir, tag=tag, mode=mode).name
    keys = ["sts", "rtr", "degenerate", "head_layer", "head_index", "mode", "activations_file", "model"]
    ph = artifacts.load("phiid", out_dir, tag=tag, keys=keys, mode=mode)
    _check_provenance(ph, out_dir, mode, tag, name)
    n = len(ph["head_layer"])
    off = ~np.eye(n, dtype=bool)
    undefined = ph["degenerate"] | ~np.isfinite(ph["sts"]) | ~np.isfinite(ph["rtr"])
    if n < 2 or undefined[off].all():
        raise TopologyError(f"{name}: every head pair is undefined (degenerate), so there is no network: check the "
                            f"activations (constant or copied heads) and rerun 01 and 02")
    nets = {net: pair_weights(ph[atom], undefined) for net, atom in NETWORKS.items()}
    for net, W in nets.items():
        check_network(W, f"{net} ({NETWORKS[net]}, {name})")
    return {**nets, "head_layer": ph["head_layer"].astype(int), "head_index": ph["head_index"].astype(int),
            "file": name, "undefined_pairs": int((undefined & undefined.T)[off].sum() // 2)}


def load_all(out_dir, mode: str, baselines: bool = True) -> dict:
    """Networks of the trained model (tag "") and, with baselines, of every other phiid tag -> {tag: networks}."""
    from lib.storage import artifacts
    found = artifacts.tags("phiid", out_dir, mode=mode)
    if "" not in found:
        artifacts.load("phiid", out_dir, mode=mode, keys=["mode"])      # raises the missing-artifact error
    inputs = {tag: load_networks(out_dir, mode, tag) for tag in (found if baselines else [""])}
    ref = inputs[""]
    for tag, nets in inputs.items():
        if not np.array_equal(nets["head_layer"], ref["head_layer"]):
            raise TopologyError(f"{nets['file']} has another head map than {ref['file']}: {_fix(mode)}")
    return inputs


# ------------------------------------------------------------------------------------------------ the analysis

def analysis_thresholds(thresholds) -> tuple[float, ...]:
    """The sweep plus the full network (the claim, the null) and the drawn top fraction, ascending."""
    return tuple(sorted(set(thresholds) | {1.0, DRAW_FRACTION}))


def analyse_network(W, head_layer, thresholds, n_bands, observed, null) -> dict:
    """Every measure of one network W [heads, heads] from its observed_measures (rows, modules) and its nulls
    (stack_nulls): the sweep, modules, the full network against the null."""
    rows, modules = observed
    bands = layer_bands(head_layer, n_bands)
    full = thresholds.index(1.0)
    return {
        "sweep": rows, "modules": modules[full], "modules_top": modules[thresholds.index(DRAW_FRACTION)],
        "strength": W.sum(1),
        "efficiency": versus_null(rows[full]["efficiency"], null["efficiency"]),
        "modularity": versus_null(rows[full]["modularity"], null["modularity"]),
        "nmi_layers": versus_null(nmi(modules[full], bands), null["nmi_layers"]),
        "null_values": null,
        "null_strength_error_max": float(null["strength_error"].max()) if len(null["strength_error"]) else None,
    }


def _difference(a: dict, b: dict, measure: str) -> dict:
    """measure(a) - measure(b) against the same difference between their null networks (paired by index)."""
    obs = a[measure]["observed"] - b[measure]["observed"]
    null = a["null_values"][measure] - b["null_values"][measure]
    return versus_null(obs, null, "greater")


NULL_CHUNK = 4                                   # null networks per task of the process pool


def _task(task):
    """One unit of work: ("observed", W, thresholds, n_louvain, seed) -> observed_measures; ("null", W, seeds,
    n_louvain, bands) -> [one_null per seed]."""
    kind, W, *rest = task
    if kind == "observed":
        return observed_measures(W, *rest)
    seeds, n_louvain, bands = rest
    return [one_null(W, s, n_louvain, bands) for s in seeds]


def _tasks(inputs, thresholds, n_louvain, n_null, n_bands, seed):
    """Every (tag, network) unit's tasks: its observed measures, then its nulls in chunks of NULL_CHUNK ->
    (units [(tag, net)], tasks [(unit index, task)]). Seeds depend only on (seed, tag index, network)."""
    units = [(tag, net) for tag in inputs for net in NETWORKS]
    tasks = []
    for u, (tag, net) in enumerate(units):
        W, unit_seed = inputs[tag][net], [seed, list(inputs).index(tag), list(NETWORKS).index(net)]
        bands = layer_bands(inputs[tag]["head_layer"], n_bands)
        tasks.append((u, ("observed", W, thresholds, n_louvain, unit_seed)))
        seeds = null_seeds(unit_seed, n_null)
        tasks += [(u, ("null", W, seeds[k:k + NULL_CHUNK], n_louvain, bands)) for k in range(0, n_null, NULL_CHUNK)]
    return units, tasks


def _run_tasks(tasks, n_jobs: int, bar=None) -> list:
    """Results of the tasks in order; n_jobs > 1: in that many forked processes, one task at a time each."""
    def done(result, task):
        if bar is not None and task[0] == "null":
            bar.update(len(task[2]))
        return result
    if n_jobs == 1 or len(tasks) == 1:
        return [done(_task(t), t) for t in tasks]
    import multiprocessing

    from lib.estimators.louvain import compile_kernels
    compile_kernels()
    with multiprocessing.get_context("fork").Pool(min(n_jobs, len(tasks))) as pool:
        return [done(r, t) for r, t in zip(pool.imap(_task, tasks), tasks)]


def analyse_all(inputs: dict, thresholds, n_louvain, n_null, n_bands, seed, n_jobs: int = 1, bar=None) -> dict:
    """Both networks of every tag ({tag: networks}) and their differences (efficiency syn - red, modularity
    red - syn) -> {tag: {"syn": ..., "red": ..., differences}}. n_jobs > 1: the observed measures and the chunks of
    null networks run in forked processes; results do not depend on n_jobs (the seeds do not)."""
    units, tasks = _tasks(inputs, thresholds, n_louvain, n_null, n_bands, seed)
    results = _run_tasks([t for _, t in tasks], n_jobs, bar)
    observed, nulls = {}, {u: [] for u in range(len(units))}
    for (u, task), r in zip(tasks, results):
        if task[0] == "observed":
            observed[u] = r
        else:
            nulls[u] += r
    out = {tag: {} for tag in inputs}
    for u, (tag, net) in enumerate(units):
        out[tag][net] = analyse_network(inputs[tag][net], inputs[tag]["head_layer"], thresholds, n_bands,
                                        observed[u], stack_nulls(nulls[u]))
    for r in out.values():
        r["efficiency_syn_minus_red"] = _difference(r["syn"], r["red"], "efficiency")
        r["modularity_red_minus_syn"] = _difference(r["red"], r["syn"], "modularity")
    return out


# ------------------------------------------------------------------------------------- bootstrap over prompts

def _resampled_weights(values: np.ndarray, valid: np.ndarray, counts: np.ndarray, n: int) -> np.ndarray:
    """Per-prompt pair values [prompts, pairs] (NaN where undefined), valid [prompts, pairs] and prompt counts
    [prompts] of a resample -> [n, n] weights: each pair's mean over the resampled prompts where it is defined,
    clipped at 0 (no edge where it is defined in none)."""
    total = counts @ np.where(valid, values, 0.0)
    seen = counts @ valid
    mean = np.divide(total, seen, out=np.zeros_like(total), where=seen > 0)
    i, j = np.triu_indices(n, 1)
    return symmetric_weights(n, i * n + j, j * n + i, np.clip(mean, 0.0, None))


def prompt_bootstrap(out_dir, mode: str, tag: str, n_boot: int, seed) -> dict:
    """Percentile bootstrap over prompts of efficiency(syn) - efficiency(red) of the full networks: every pair's
    per-prompt sts and rtr (lib.estimators.phiid.phiid_fast_stats on the tag's activations, the same values as the phiid
    file's up to rounding), averaged over prompts drawn with replacement -> dict ci95, sd, n_boot, n_prompts,
    observed (the full-sample difference from the per-prompt values); {"skipped": reason} when there are no
    per-prompt values (another mode, a redundancy other than MMI, no activations file) or n_boot is 0."""
    from lib.storage import artifacts
    from lib.estimators.phiid import phiid_fast_stats
    ph = artifacts.load("phiid", out_dir, tag=tag, mode=mode, keys=["tau", "redundancy"])
    acts = artifacts.path("activations", out_dir, tag=tag)
    reason = ("n_boot = 0" if n_boot == 0 else f"mode {mode!r} has no per-prompt values" if mode != "per_prompt"
              else f"redundancy {_scalar(ph, 'redundancy')!r} is not MMI" if _scalar(ph, "redundancy") != "MMI"
              else f"{acts.name} is absent" if not acts.exists() else None)
    if reason:
        return {"skipped": reason}
    X = artifacts.load("activations", out_dir, tag=tag, keys=["activations"])["activations"]
    stats = phiid_fast_stats(X, tau=int(_scalar(ph, "tau")), mode="per_prompt", per_segment=True)
    P, n = X.shape[0], stats.n_heads
    valid = stats.valid.astype(np.float64)

    def difference(counts):
        return (global_efficiency(_resampled_weights(stats.sts, valid, counts, n))
                - global_efficiency(_resampled_weights(stats.rtr, valid, counts, n)))
    rng = np.random.default_rng([*np.atleast_1d(seed), 2])
    draws = np.array([difference(np.bincount(rng.integers(0, P, P), minlength=P).astype(np.float64))
                      for _ in range(n_boot)])
    return {"ci95": [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))],
            "sd": float(draws.std(ddof=1)) if n_boot > 1 else None, "n_boot": n_boot, "n_prompts": P,
            "observed": difference(np.ones(P))}


# ----------------------------------------------------------------------------------------------------- outputs

PAPER_TEXT = ("Gemma-3-4B efficiency syn 0.052 vs red 0.007, modularity syn 0.030 vs red 0.100; Qwen-3-8B "
              "efficiency 0.048 vs 0.007, modularity 0.033 vs 0.058 (text of the paper, Fig 3c)")
NULL_NAME = "strength-preserving randomised networks (weight distribution exact, node strengths within 1%)"


def _json_network(r: dict) -> dict:
    keep = ("efficiency", "modularity", "nmi_layers")
    return {**{k: r[k] for k in keep}, "sweep": r["sweep"], "n_modules": int(r["modules"].max() + 1),
            "null_strength_error_max": r["null_strength_error_max"],
            "null_values": {k: v.tolist() for k, v in r["null_values"].items()}}


def _json_tag(nets: dict, r: dict) -> dict:
    return {"file": nets["file"], "n_heads": len(nets["head_layer"]), "undefined_pairs": nets["undefined_pairs"],
            "syn": _json_network(r["syn"]), "red": _json_network(r["red"]),
            "efficiency_syn_minus_red": r["efficiency_syn_minus_red"],
            "modularity_red_minus_syn": r["modularity_red_minus_syn"]}


def _claim_numbers(t: dict) -> dict:
    """The C4 numbers of one tag: both differences with null bands, the four z-scores."""
    return {"efficiency_syn_minus_red": t["efficiency_syn_minus_red"],
            "modularity_red_minus_syn": t["modularity_red_minus_syn"],
            "z": {f"{m}_{net}": t[net][m]["z"] for net in NETWORKS for m in ("efficiency", "modularity")},
            "observed": {f"{m}_{net}": t[net][m]["observed"] for net in NETWORKS for m in ("efficiency", "modularity")}}


def claim_block(per_tag: dict, n_null: int) -> dict:
    """Claim C4 (the claims scorecard's shape): efficiency(syn) - efficiency(red) of the trained model's full
    networks, with its bootstrap CI over prompts, against the same difference between strength-preserving nulls;
    direction "greater"."""
    trained = per_tag[""]
    diff = trained["efficiency_syn_minus_red"]
    null, boot = diff["null"], diff.get("bootstrap") or {}
    ci_note = (f"95% percentile bootstrap over the {boot['n_prompts']} prompts ({boot['n_boot']} resamples)"
               if "ci95" in boot else f"no CI of the observed difference: {boot.get('skipped', 'not computed')}")
    details = {"trained": _claim_numbers(trained), "n_null": n_null, "ci_note": ci_note,
               "baselines": {tag: _claim_numbers(t) for tag, t in per_tag.items() if tag}}
    return {"id": "C4", "statistic": "global efficiency (bctpy efficiency_wei on W / max W) of the synergistic "
                                     "minus the redundant network, full weighted networks (unitless)",
            "value": diff["observed"], "ci95": boot.get("ci95"),
            "null": {"name": f"the same difference between {NULL_NAME}, n = {n_null}", "value": null["mean"],
                     "ci95": null["ci95"]},
            "direction": "greater", "paper": {"value": 0.052 - 0.007, "text": PAPER_TEXT},
            "n": int(trained["n_heads"]), "details": details}


def modules_table(inputs: dict, results: dict):
    """One row per (tag, network, head): layer, head, module (full network), module_top (top 10%), strength."""
    import pandas as pd
    frames = []
    for tag, nets in inputs.items():
        for net in NETWORKS:
            r = results[tag][net]
            frames.append(pd.DataFrame({
                "tag": tag or "trained", "network": net, "head_idx": np.arange(len(nets["head_layer"])),
                "layer": nets["head_layer"], "head": nets["head_index"], "module": r["modules"].astype(int),
                "module_top": r["modules_top"].astype(int), "strength": r["strength"]}))
    return pd.concat(frames, ignore_index=True)


def summary_table(per_tag: dict):
    """One row per (tag, network, measure): observed, null mean, null 2.5 / 97.5 %, z, p (full networks)."""
    import pandas as pd
    rows = []
    for tag, t in per_tag.items():
        for net in NETWORKS:
            for m in ("efficiency", "modularity", "nmi_layers"):
                v = t[net][m]
                rows.append({"tag": tag or "trained", "network": net, "measure": m, "observed": v["observed"],
                             "null_mean": v["null"]["mean"], "null_lo": (v["null"]["ci95"] or [None, None])[0],
                             "null_hi": (v["null"]["ci95"] or [None, None])[1], "z": v["z"], "p": v["p"]})
    return pd.DataFrame(rows)


def sweep_table(per_tag: dict):
    """One row per (tag, network, threshold): edges, efficiency, modularity, n_modules."""
    import pandas as pd
    return pd.DataFrame([{"tag": tag or "trained", "network": net, **row}
                         for tag, t in per_tag.items() for net in NETWORKS for row in t[net]["sweep"]])


def run_topology(out_dir, mode: str = "per_prompt", thresholds=THRESHOLDS, n_louvain: int = 20,
                 n_null: int = 100, n_bands: int = 3, seed: int = 0, baselines: bool = True,
                 progress: bool = False, n_jobs: int = 1, n_boot: int = 200) -> dict:
    """Notebook 08: every measure for the trained model's networks and (baselines) every other phiid tag.
    Checks every input first, then writes topology.json (with the C4 claim block) and modules.csv.
    -> dict: json (the written summary), summary, sweep, modules, strength (DataFrames), networks {tag: nets}."""
    import pandas as pd
    from lib.storage import artifacts, store
    measured = analysis_thresholds(check_settings(thresholds, n_louvain, n_null, n_bands, n_jobs, n_boot))
    inputs = load_all(out_dir, mode, baselines)
    bar = _progress(progress, n_null * len(NETWORKS) * len(inputs))
    results = analyse_all(inputs, measured, n_louvain, n_null, n_bands, seed, n_jobs, bar)
    if bar is not None:
        bar.close()
    per_tag = {tag: _json_tag(inputs[tag], r) for tag, r in results.items()}
    for k, (tag, t) in enumerate(per_tag.items()):
        t["efficiency_syn_minus_red"]["bootstrap"] = prompt_bootstrap(out_dir, mode, tag, n_boot, [seed, k])
    summary = {"mode": mode, "thresholds": list(measured), "n_louvain": n_louvain, "n_null": n_null,
               "n_boot": n_boot, "n_bands": n_bands, "seed": seed, "null": NULL_NAME, "tags": per_tag,
               "claim": claim_block(per_tag, n_null)}
    modules = modules_table(inputs, results)
    strength = pd.concat([strength_by_layer(nets[net], nets["head_layer"]).assign(tag=tag or "trained", network=net)
                          for tag, nets in inputs.items() for net in NETWORKS], ignore_index=True)
    artifacts.save("modules", out_dir, modules)
    artifacts.save("topology", out_dir, summary)
    store.update_manifest(out_dir, NB.TOPOLOGY, {k: summary[k] for k in ("mode", "thresholds", "n_louvain",
                                                                          "n_null", "n_boot", "n_bands", "seed")})
    return {"json": summary, "summary": summary_table(per_tag), "sweep": sweep_table(per_tag), "modules": modules,
            "strength": strength, "networks": inputs}


def _progress(enabled: bool, total: int):
    if not enabled or total == 0:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="null networks", unit="net")
