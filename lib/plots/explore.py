"""Figures of the explorer (notebooks/00_explore.ipynb): one head, one ranking variant.

Input: a lib.explore.RunData, whose methods give the tables drawn here (this module does not import lib.explore)."""
from __future__ import annotations

import numpy as np
from matplotlib.ticker import MaxNLocator

from lib.plots.common import layer_colors, new_figure


def _message(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=9, color="0.35", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _grid_heatmap(fig, ax, grid, mark, title, cbar_label, cmap="viridis", centered=False):
    finite = grid[np.isfinite(grid)]
    kwargs = {}
    if centered and finite.size:
        m = float(np.abs(finite).max()) or 1.0
        kwargs = {"vmin": -m, "vmax": m}
    image = ax.imshow(grid, aspect="auto", origin="lower", cmap=cmap, interpolation="nearest", **kwargs)
    if mark is not None:
        ax.scatter([mark[1]], [mark[0]], marker="x", s=60, color="red", linewidths=2, label="selected head")
        ax.legend(loc="upper right", fontsize=7, framealpha=0.8)
    ax.set(xlabel="head", ylabel="layer", title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(image, ax=ax, label=cbar_label)


def head_panel(run, idx: int, mode: str | None):
    """2 x 2: the head's activation over generation steps (every prompt and the mean), its synergy and redundancy
    with every other head (PhiID `mode`, head as source) on the layer x head grid, its score under each variant."""
    layer, head = divmod(idx, run.n_heads)
    fig, axes = new_figure(11, 7.5, ncols=2, nrows=2)
    fig.suptitle(f"{run.model or run.out_dir.name}: head L{layer}H{head} (index {idx})")
    ax = axes[0, 0]
    if run.activations is None:
        _message(ax, "no activations in this run: run notebook 01_extract_activations")
    else:
        series = run.activations[:, idx, :]
        steps = np.arange(series.shape[1])
        for s in series:
            ax.plot(steps, s, color="0.6", lw=0.6, alpha=0.6)
        ax.plot(steps, series.mean(axis=0), color=layer_colors(run.n_layers)[layer], lw=2,
                label=f"mean over {len(series)} prompts")
        ax.plot([], [], color="0.6", lw=0.6, label="one prompt")
        ax.set(xlabel="generation step (token)", ylabel="head output L2 norm", title="Activation during generation")
        ax.legend(fontsize=8)
    if mode is None or mode not in run.phiid:
        for ax in axes[0, 1], axes[1, 0]:
            _message(ax, f"no PhiID ({mode or 'any mode'}) in this run: run notebook 02_phiid")
    else:
        row = run.phiid_row(idx, mode)
        for ax, column, atom, cmap in ((axes[0, 1], "synergy", "sts", "viridis"),
                                       (axes[1, 0], "redundancy", "rtr", "magma")):
            grid = row[column].to_numpy().reshape(run.n_layers, run.n_heads)
            _grid_heatmap(fig, ax, grid, (layer, head), f"{column.capitalize()} with each target head ({mode})",
                          f"{column} {atom} (nats)", cmap=cmap)
    ax = axes[1, 1]
    ranks = run.head_ranks(idx)
    if ranks.empty:
        _message(ax, "no rankings in this run: run notebook 04_ranking_variants")
    else:
        y = np.arange(len(ranks))
        ax.barh(y, ranks["score"], color="tab:blue")
        for yi, (score, rank, of) in enumerate(zip(ranks["score"], ranks["rank"], ranks["of"])):
            text = f"#{rank}/{of}" if rank == rank and rank is not None else "undefined"
            ax.text(min(score if np.isfinite(score) else 0, 1.0) + 0.02, yi, text, va="center", fontsize=8)
        ax.set_yticks(y, ranks["variant"])
        ax.invert_yaxis()
        ax.set_xlim(0, 1.25)
        ax.set(xlabel="variant score (0 to 1, higher = more synergistic)", title="Score and rank under each variant")
    return fig


def variant_panel(run, variant: str):
    """1 x 2: a variant's per-layer profile (mean +- sd over heads, every head as a dot) and its layer x head map."""
    fig, axes = new_figure(11, 3.8, ncols=2)
    prof = run.variant_profile(variant)
    ax = axes[0]
    colors = layer_colors(run.n_layers)
    r = run.rankings
    jitter = (r["head"].to_numpy() / max(run.n_heads - 1, 1) - 0.5) * 0.3
    ax.scatter(r["layer"] + jitter, r[variant], s=10, c=colors[r["layer"].to_numpy(int)], alpha=0.7, label="one head")
    ax.errorbar(prof["layer"], prof["mean"], yerr=prof["sd"], color="black", marker="o", lw=1.5, capsize=3,
                label="layer mean ± sd")
    ax.set(xlabel="layer", ylabel="score (0 to 1, higher = more synergistic)", title=f"{variant}: layer profile",
           ylim=(-0.05, 1.05))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    _grid_heatmap(fig, axes[1], run.variant_grid(variant), None, f"{variant}: score per head",
                  "score (0 to 1)", cmap="viridis")
    return fig
