"""Figures of notebook 08 (network topology of synergy and redundancy). Each function returns a Figure."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.collections import LineCollection
from matplotlib.colors import Normalize
from matplotlib.ticker import MaxNLocator

from lib.plots.common import LAYER_CMAP, new_figure

__all__ = ["network_drawings", "measure_bars", "threshold_sweep", "modules_vs_layers", "strength_by_layer",
           "differences"]

NET_COLORS = {"syn": "C3", "red": "C0"}
NET_LABELS = {"syn": "synergy (sts)", "red": "redundancy (rtr)"}
MEASURE_LABELS = {"efficiency": "global efficiency (unitless)", "modularity": "modularity Q (Louvain, gamma 1)",
                  "nmi_layers": "NMI modules vs layer bands (0-1)"}


def module_layout(modules: np.ndarray, head_layer: np.ndarray) -> np.ndarray:
    """[heads] modules and layers -> [heads, 2] positions: module centres on a circle (bigger modules further
    apart), each module's heads on a small circle around its centre ordered by layer."""
    ids, sizes = np.unique(modules, return_counts=True)
    angles = 2 * np.pi * np.cumsum(sizes) / sizes.sum() - np.pi * sizes / sizes.sum()
    pos = np.zeros((len(modules), 2))
    for m, size, angle in zip(ids, sizes, angles):
        members = np.flatnonzero(modules == m)
        members = members[np.argsort(head_layer[members], kind="stable")]
        radius = 0.35 * np.sqrt(size / sizes.max())
        theta = 2 * np.pi * np.arange(size) / max(size, 1)
        pos[members] = np.c_[np.cos(angle) + radius * np.cos(theta), np.sin(angle) + radius * np.sin(theta)]
    return pos


def network_drawing(W, head_layer, modules, ax=None, title: str = ""):
    """Fig 3b: the strongest pairs of W [heads, heads] (already thresholded) as edges (width and opacity by
    weight), heads coloured by layer, placed by module (module_layout)."""
    fig, ax = new_figure(5.2, 5.0) if ax is None else (ax.figure, ax)
    head_layer = np.asarray(head_layer)
    pos = module_layout(np.asarray(modules), head_layer)
    i, j = np.nonzero(np.triu(W, 1))
    w = W[i, j] / W.max() if len(i) else np.zeros(0)
    colours = np.c_[np.full((len(w), 3), 0.3), 0.1 + 0.5 * w]                 # grey 0.3, opacity by weight
    # one artist for every edge (a Line2D per edge took minutes at 1,152 heads: 66,298 edges per network)
    ax.add_collection(LineCollection(np.stack([pos[i], pos[j]], axis=1), colors=colours, linewidths=0.3 + 1.2 * w,
                                     zorder=1))
    norm = Normalize(0, max(int(head_layer.max()), 1))
    sc = ax.scatter(pos[:, 0], pos[:, 1], c=head_layer, cmap=LAYER_CMAP, norm=norm, s=18, edgecolor="k",
                    linewidth=0.3, zorder=2)
    fig.colorbar(sc, ax=ax, shrink=0.7, label="layer", ticks=MaxNLocator(integer=True))
    ax.set_title(title or f"strongest {len(i)} pairs, {len(np.unique(modules))} modules")
    ax.set_aspect("equal")
    ax.set_axis_off()
    return fig


def network_drawings(networks: dict, modules_table, tag: str = "trained", fraction: float = 0.1):
    """Fig 3b for both networks of one tag: top `fraction` of pairs, layout by that threshold's modules."""
    from lib.estimators import networks as tp
    fig, axes = new_figure(11, 5.0, ncols=2)
    nets = networks["" if tag == "trained" else tag]
    for ax, net in zip(axes, tp.NETWORKS):
        rows = modules_table[(modules_table["tag"] == tag) & (modules_table["network"] == net)]
        top = tp.threshold_proportional(nets[net], fraction)
        network_drawing(top, nets["head_layer"], rows["module_top"].to_numpy(), ax=ax,
                        title=f"{NET_LABELS[net]}: top {fraction:.0%} of pairs, coloured by layer")
    fig.suptitle(f"Strongest connections ({tag}); heads grouped by Louvain module of the thresholded network")
    return fig


def _band_err(mean, lo, hi) -> list:
    """errorbar's yerr of a band around its mean; a band that collapses onto the mean (a null whose networks are
    all equal) can put the mean a rounding error outside it: those arms are 0."""
    return [[max(mean - lo, 0.0)], [max(hi - mean, 0.0)]]


def measure_bars(summary, tag: str = "trained"):
    """Fig 3c: efficiency and modularity of syn and red (full networks) with each null's mean and 95% band."""
    fig, axes = new_figure(8.5, 3.6, ncols=2)
    t = summary[summary["tag"] == tag]
    for ax, measure in zip(axes, ("efficiency", "modularity")):
        for x, net in enumerate(("syn", "red")):
            row = t[(t["network"] == net) & (t["measure"] == measure)].iloc[0]
            ax.bar(x, row["observed"], color=NET_COLORS[net], width=0.6, label=f"{NET_LABELS[net]} observed")
            if np.isfinite(row["null_mean"] if row["null_mean"] is not None else np.nan):
                ax.errorbar(x + 0.38, row["null_mean"], yerr=_band_err(row["null_mean"], row["null_lo"], row["null_hi"]),
                            fmt="o", color="k", ms=4, capsize=4,
                            label="null mean and 95% band" if x == 0 else None)
        ax.set_xticks([0, 1], ["syn", "red"])
        ax.set_ylabel(MEASURE_LABELS[measure])
        ax.set_title(f"{measure} ({tag})")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="outside lower center", ncols=3)
    fig.suptitle("Synergy vs redundancy network, against strength-preserving nulls")
    return fig


def threshold_sweep(sweep):
    """Efficiency and modularity against the fraction of pairs kept, syn vs red, one line style per tag."""
    fig, axes = new_figure(9.5, 3.6, ncols=2)
    styles = dict(zip(dict.fromkeys(sweep["tag"]), ["-", "--", ":", "-."] * 10))
    for ax, measure in zip(axes, ("efficiency", "modularity")):
        levels = sorted(set(sweep["threshold"]))
        for (tag, net), t in sweep.groupby(["tag", "network"], sort=False):
            ax.plot([levels.index(p) for p in t["threshold"]], t[measure], styles[tag], marker="o", ms=3,
                    color=NET_COLORS[net], label=f"{net}, {tag}")
        ax.set_xticks(range(len(levels)), [f"{100 * p:g}%" for p in levels])
        ax.set_xlabel("strongest pairs kept (% of all pairs)")
        ax.set_ylabel(MEASURE_LABELS[measure])
    axes[0].legend(fontsize=7)
    fig.suptitle("Threshold sweep")
    return fig


def modules_vs_layers(modules_table, summary, tag: str = "trained"):
    """Heads per (module, layer) for both full networks of one tag, with the module-band NMI and its null."""
    fig, axes = new_figure(10, 3.6, ncols=2)
    for ax, net in zip(axes, ("syn", "red")):
        rows = modules_table[(modules_table["tag"] == tag) & (modules_table["network"] == net)]
        counts = np.zeros((rows["module"].max() + 1, rows["layer"].max() + 1))
        np.add.at(counts, (rows["module"], rows["layer"]), 1)
        im = ax.imshow(counts, aspect="auto", origin="lower", cmap="Greys", interpolation="nearest", vmin=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(im, ax=ax, label="heads")
        s = summary[(summary["tag"] == tag) & (summary["network"] == net) & (summary["measure"] == "nmi_layers")]
        r = s.iloc[0]
        band = "" if r["null_lo"] is None or not np.isfinite(r["null_lo"]) else \
            f", null 95% [{r['null_lo']:.2f}, {r['null_hi']:.2f}]"
        ax.set_title(f"{NET_LABELS[net]}: NMI {r['observed']:.2f}{band}", fontsize=9)
        ax.set_xlabel("layer")
        ax.set_ylabel("module (Louvain, full network)")
    fig.suptitle(f"Modules vs layers ({tag})")
    return fig


def strength_by_layer(strength):
    """Mean node strength per layer (nats summed over a head's pairs) with 95% CI, syn vs red, per tag."""
    tags = list(dict.fromkeys(strength["tag"]))
    fig, axes = new_figure(4.6 * len(tags), 3.6, ncols=len(tags), squeeze=False)
    for ax, tag in zip(axes[0], tags):              # one panel (own y axis) per tag: their scales can differ 100x
        for net, t in strength[strength["tag"] == tag].groupby("network", sort=False):
            ax.fill_between(t["layer"], t["ci_lo"], t["ci_hi"], color=NET_COLORS[net], alpha=0.15)
            ax.plot(t["layer"], t["strength"], "-", color=NET_COLORS[net], marker="o", ms=3, label=net)
        ax.set_xlabel("layer")
        ax.set_ylabel("node strength (nats, sum over pairs)")
        ax.set_title(tag or "trained", fontsize=10)
        ax.legend(fontsize=7, title="mean, 95% CI band")
    fig.suptitle("Node strength by layer (mean and 95% CI over the layer's heads)", fontsize=10)
    return fig


def differences(topology_json: dict):
    """Efficiency syn - red and modularity red - syn per tag, each with its null's 95% band (the C4 test); the
    efficiency difference with its bootstrap CI over prompts when the run has one."""
    fig, axes = new_figure(9, 3.4, ncols=2)
    tags = list(topology_json["tags"])
    for ax, key in zip(axes, ("efficiency_syn_minus_red", "modularity_red_minus_syn")):
        for x, tag in enumerate(tags):
            d = topology_json["tags"][tag][key]
            ax.bar(x, d["observed"], color="C2" if tag == "" else "0.6", width=0.6)
            ci = (d.get("bootstrap") or {}).get("ci95")
            if ci is not None:
                err = [[max(d["observed"] - ci[0], 0)], [max(ci[1] - d["observed"], 0)]]
                ax.errorbar(x, d["observed"], yerr=err, fmt="none", color="C3", capsize=4,
                            label="observed, 95% bootstrap CI over prompts" if x == 0 else None)
            if d["null"]["ci95"] is not None:
                lo, hi = d["null"]["ci95"]
                ax.errorbar(x + 0.38, d["null"]["mean"], yerr=_band_err(d["null"]["mean"], lo, hi),
                            fmt="o", color="k", ms=4, capsize=4, label="null mean and 95% band" if x == 0 else None)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xticks(range(len(tags)), [t or "trained" for t in tags], rotation=20)
        ax.set_ylabel(key.replace("_", " ") + " (unitless)")
    axes[0].legend(fontsize=7)
    fig.suptitle("Trained vs baselines: network differences against the null")
    return fig
