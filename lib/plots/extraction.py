"""Figures of notebook 01: head output norms during generation."""
from __future__ import annotations

import numpy as np

from lib.plots.common import new_figure

__all__ = ["mean_norm_heatmap", "layer_norm_profile", "head_time_series"]


def mean_norm_heatmap(activations: np.ndarray, n_layers: int, n_heads: int, title: str = ""):
    """Layer x head heatmap of the mean L2 norm of each head's output. activations: [prompts, heads, steps]."""
    mean = activations.mean(axis=(0, 2)).reshape(n_layers, n_heads)
    fig, ax = new_figure(max(4.0, 0.45 * n_heads + 2), max(3.0, 0.22 * n_layers + 1.5))
    image = ax.imshow(mean, aspect="auto", cmap="magma", origin="lower")
    ax.set(xlabel="head", ylabel="layer", title=title or "Mean head output norm (over prompts and steps)")
    ax.set_xticks(range(n_heads))
    fig.colorbar(image, ax=ax, label="mean L2 norm of head output")
    return fig


def layer_norm_profile(activations: np.ndarray, head_layer: np.ndarray):
    """Mean head norm per layer with the spread across heads (mean +- sd of per-head means)."""
    per_head = activations.mean(axis=(0, 2))
    layers = np.unique(head_layer)
    mean = np.array([per_head[head_layer == l].mean() for l in layers])
    sd = np.array([per_head[head_layer == l].std() for l in layers])
    fig, ax = new_figure(6, 3.5)
    ax.plot(layers, mean, marker="o", label="mean over heads")
    ax.fill_between(layers, mean - sd, mean + sd, alpha=0.25, label="+-1 sd across heads")
    ax.set(xlabel="layer", ylabel="head output L2 norm", title="Head output norm by layer")
    ax.legend()
    return fig


def head_time_series(activations: np.ndarray, head_layer: np.ndarray, head_index: np.ndarray,
                     heads: list[int], prompt: int = 0, prompt_label: str = ""):
    """Norm of a few heads over the generated steps of one prompt."""
    fig, ax = new_figure(7, 3.5)
    for k, h in enumerate(dict.fromkeys(heads)):             # one distinct colour per head (not per layer)
        ax.plot(activations[prompt, h], color=f"C{k % 10}", lw=1.2, marker="o", ms=2,
                label=f"L{head_layer[h]} H{head_index[h]}")
    ax.set(xlabel="generation step (token)", ylabel="head output L2 norm",
           title=f"Head norms during generation{': ' + prompt_label if prompt_label else ''}")
    ax.legend(ncol=2, fontsize=8, title="layer / head")
    return fig
