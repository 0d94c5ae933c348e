"""Figures of the explorer (the notebook NB.EXPLORE of lib.storage.notebooks): one head, one ranking variant.

Input: a lib.pipeline.explore.RunData, whose methods give the tables drawn here (this module does not import lib.pipeline.explore)."""
from __future__ import annotations

import numpy as np
from matplotlib.ticker import MaxNLocator

from lib.plots.common import layer_colors
from lib.storage.notebooks import NB

__all__ = ["head_panel", "variant_panel", "prompt_panel"]


def new_figure(width: float, height: float, ncols: int = 1, nrows: int = 1):
    """A figure outside pyplot (the explorer renders it itself, lib.pipeline.explore.show): widget callbacks then draw into
    figures that no pyplot hook of the kernel (matplotlib-inline's, run between cells) can touch."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=True) if (nrows, ncols) != (1, 1) else fig.subplots()


def _message(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=9, color="0.35", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _grid_heatmap(fig, ax, grid, mark, title, cbar_label, cmap="viridis", limits=None, mark_label=""):
    """A layer x head map; `mark` (layer, head) gets a hollow red square, named in the title (no legend on the
    data); `limits` (vmin, vmax) clip the colours, the colour bar shows the clipping."""
    kwargs = {"vmin": limits[0], "vmax": limits[1]} if limits else {}
    image = ax.imshow(grid, aspect="auto", origin="lower", cmap=cmap, interpolation="nearest", **kwargs)
    if mark is not None:
        from matplotlib.patches import Rectangle
        ax.add_patch(Rectangle((mark[1] - 0.5, mark[0] - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
        title = f"{title}\nred square: {mark_label or f'L{mark[0]}H{mark[1]}'}"
    ax.set(xlabel="head", ylabel="layer", title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    finite = grid[np.isfinite(grid)]
    clipped = limits and finite.size and (finite.min() < limits[0] or finite.max() > limits[1])
    fig.colorbar(image, ax=ax, label=cbar_label, extend="both" if clipped else "neither")


def _legend_above(ax, **kwargs):
    """Legend in the margin above the axes (never over the data)."""
    ax.legend(loc="lower left", bbox_to_anchor=(0, 1.01), ncol=3, fontsize=7, frameon=False, borderaxespad=0,
              **kwargs)


def head_panel(run, idx: int, mode: str | None, clim: str = "shared", prompt: int | None = None):
    """2 x 2: the head's activation over generation steps (mean over prompts with its 10-90th percentile band,
    and the selected prompt), its synergy and redundancy with every other head (PhiID `mode`, head as source) on
    the layer x head grid with `clim` colour limits (see RunData.color_limits), its score under each variant."""
    layer, head = divmod(idx, run.n_heads)
    fig, axes = new_figure(11, 8, ncols=2, nrows=2)
    fig.suptitle(f"{run.model or run.out_dir.name}: head L{layer}H{head} (index {idx})")
    ax = axes[0, 0]
    if run.activations is None:
        _message(ax, f"no activations in this run: run notebook {NB.EXTRACT}")
    else:
        series = run.activations[:, idx, :].astype(float)
        steps = np.arange(series.shape[1])
        lo, hi = np.percentile(series, [10, 90], axis=0)
        color = layer_colors(run.n_layers)[layer]
        ax.fill_between(steps, lo, hi, color=color, alpha=0.25, lw=0, label="10-90th percentile of prompts")
        ax.plot(steps, series.mean(axis=0), color=color, lw=2, marker=".", ms=3,
                label=f"mean over {len(series)} prompts")
        if prompt is not None and 0 <= prompt < len(series):
            ax.plot(steps, series[prompt], color="black", lw=0.8, alpha=0.8, label=f"prompt {prompt}")
        ax.set(xlabel="generation step (token)", ylabel="head output L2 norm")
        ax.set_title("Activation during generation", pad=18)
        _legend_above(ax)
    if mode is None or mode not in run.phiid:
        for ax in axes[0, 1], axes[1, 0]:
            _message(ax, f"no PhiID ({mode or 'any mode'}) in this run: run notebook {NB.PHIID}")
    else:
        row = run.phiid_row(idx, mode)
        for ax, column, key, atom, cmap in ((axes[0, 1], "synergy", "syn", "sts", "viridis"),
                                            (axes[1, 0], "redundancy", "red", "rtr", "magma")):
            grid = row[column].to_numpy().reshape(run.n_layers, run.n_heads)
            limits = run.color_limits(mode, key, idx, clim)
            _grid_heatmap(fig, ax, grid, (layer, head), f"{column.capitalize()} with each target head ({mode})",
                          f"{column} {atom} (nats), {'shared' if clim == 'shared' else 'this head'}'s limits",
                          cmap=cmap, limits=limits, mark_label=f"L{layer}H{head} (source, undefined with itself)")
    ax = axes[1, 1]
    ranks = run.head_ranks(idx)
    if ranks.empty:
        _message(ax, f"no rankings in this run: run notebook {NB.RANKING}")
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


def variant_panel(run, variant: str, idx: int | None = None):
    """1 x 2: a variant's per-layer profile (mean +- sd over heads, every head as a dot, the selected head
    circled) and its layer x head map (the selected head marked)."""
    fig, axes = new_figure(11, 4.2, ncols=2)
    prof = run.variant_profile(variant)
    ax = axes[0]
    colors = layer_colors(run.n_layers)
    r = run.rankings
    jitter = (r["head"].to_numpy() / max(run.n_heads - 1, 1) - 0.5) * 0.3
    ax.scatter(r["layer"] + jitter, r[variant], s=10, c=colors[r["layer"].to_numpy(int)], alpha=0.7, label="one head")
    ax.errorbar(prof["layer"], prof["mean"], yerr=prof["sd"], color="black", marker="o", lw=1.5, capsize=3,
                label="layer mean ± sd")
    mark = None
    if idx is not None:
        mark = divmod(int(idx), run.n_heads)
        sel = r["head_idx"].to_numpy() == idx
        ax.scatter((r["layer"] + jitter)[sel], r[variant][sel], s=80, facecolors="none", edgecolors="red",
                   linewidths=2, label=f"L{mark[0]}H{mark[1]}")
    ax.set(xlabel="layer", ylabel="score (0 to 1, higher = more synergistic)", ylim=(-0.05, 1.05))
    ax.set_title(f"{variant}: layer profile", pad=18)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend_above(ax)
    _grid_heatmap(fig, axes[1], run.variant_grid(variant), mark, f"{variant}: score per head",
                  "score (0 to 1)", cmap="viridis", limits=(0.0, 1.0))
    return fig


def prompt_panel(run, idx: int, prompt: int, table):
    """The head over one prompt's generation: its activation (left axis) and, when notebook 11 ran, its local
    synergy at each step (right axis), the generated tokens as tick labels. table: lib.pipeline.explore.prompt_tokens."""
    layer, head = divmod(idx, run.n_heads)
    fig, ax = new_figure(11, 3.6)
    steps = table["step"].to_numpy()
    ax.plot(steps, table["activation"], color="tab:blue", marker="o", ms=3, lw=1, label="activation (L2 norm)")
    ax.set(xlabel="generated token (step)", ylabel="head output L2 norm")
    ax.set_title(f"L{layer}H{head} over prompt {prompt}", pad=18)
    handles = ax.get_legend_handles_labels()
    local = table["local_synergy"].to_numpy(float)
    if np.isfinite(local).any():
        ax2 = ax.twinx()
        ax2.plot(steps, local, color="tab:red", marker="s", ms=3, lw=1, label="local synergy sts (notebook 11)")
        ax2.axhline(0, color="tab:red", lw=0.5, ls=":")
        ax2.set_ylabel("local synergy sts (nats)", color="tab:red")
        handles = [a + b for a, b in zip(handles, ax2.get_legend_handles_labels())]
    ax.legend(*handles, loc="lower left", bbox_to_anchor=(0, 1.01), ncol=2, fontsize=7, frameon=False,
              borderaxespad=0)
    labels = [t.replace("\n", "⏎") if t else "" for t in table["token"]]
    if any(labels):
        every = max(1, len(steps) // 60)
        ax.set_xticks(steps[::every], [repr(t)[1:-1][:8] for t in labels[::every]], rotation=90, fontsize=6)
    return fig
