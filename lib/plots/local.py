"""Figures of notebook 11 (local synergy aligned with the generated tokens). Each function returns a Figure."""
from __future__ import annotations

import numpy as np

from lib.plots.common import new_figure

__all__ = ["token_strip", "layer_step_heatmaps", "synergy_vs_targets", "kind_bars", "step_profiles"]

KIND_ORDER = ("first_answer", "punctuation", "digit", "digit_numerical", "end_of_turn", "after_end_of_turn", "other")


def token_strip(texts, rows: dict, per_line: int = 24, title: str = ""):
    """One prompt's generated tokens as coloured cells, one strip per series in `rows` (name -> [steps] values,
    e.g. layer-mean local sts and rtr, nats), the token text under each cell. texts: [steps] strings."""
    n = len(texts)
    lines = int(np.ceil(n / per_line))
    fig, axes = new_figure(min(14, 0.55 * per_line + 1.5), 1.0 + lines * len(rows) * 1.35,
                           nrows=lines * len(rows), squeeze=False)
    for r, (name, values) in enumerate(rows.items()):     # series by series: each colourbar spans its own strips
        lo, hi = np.nanmin(values), np.nanmax(values)
        for line in range(lines):
            ax = axes[r * lines + line, 0]
            seg = slice(line * per_line, min(n, (line + 1) * per_line))
            v = np.full(per_line, np.nan)
            v[:seg.stop - seg.start] = values[seg]
            im = ax.imshow(v[None], aspect="auto", cmap="magma", vmin=lo, vmax=hi)
            ax.set_yticks([0], [name])
            ax.set_xticks(range(seg.stop - seg.start),
                          [repr(t)[1:-1][:10] for t in texts[seg]],
                          rotation=60, fontsize=7, ha="right")
            ax.set_xlim(-0.5, per_line - 0.5)
        fig.colorbar(im, ax=[axes[r * lines + k, 0] for k in range(lines)], label=f"{name} (nats)",
                     shrink=0.9)
    axes[0, 0].set_title(title or "layer-mean local PhiID at each generated token (token read at the step)")
    return fig


def layer_step_heatmaps(layer_values, prompts, titles=None, label="local sts (nats)"):
    """[layers, prompts, steps] -> one [layer x step] heatmap per chosen prompt (shared colour scale)."""
    fig, axes = new_figure(4.2 * len(prompts), 3.4, ncols=len(prompts), squeeze=False)
    sel = layer_values[:, prompts]
    lo, hi = np.nanpercentile(sel, 1), np.nanpercentile(sel, 99)
    for k, p in enumerate(prompts):
        ax = axes[0, k]
        im = ax.imshow(layer_values[:, p], aspect="auto", origin="lower", cmap="magma", vmin=lo, vmax=hi)
        ax.set_xlabel("transition t -> t + tau (generation step t)")
        ax.set_ylabel("layer")
        ax.set_title(titles[k] if titles else f"prompt {p}", fontsize=9)
    fig.colorbar(im, ax=axes[0, :].tolist(), label=label)
    return fig


def synergy_vs_targets(head_mean, targets: dict, correlations, n_layers):
    """Left panels: per-step head-mean local sts against each target (entropy, surprisal; nats), every
    (prompt, step) a dot, least-squares line. Right: Pearson r per layer with the 95% circular-shift null band."""
    fig, axes = new_figure(10, 3.4 * len(targets), ncols=2, nrows=len(targets), squeeze=False)
    y = head_mean.ravel()
    for row, (name, target) in enumerate(targets.items()):
        x = target.ravel()
        ok = np.isfinite(x) & np.isfinite(y)
        ax = axes[row, 0]
        ax.scatter(x[ok], y[ok], s=4, alpha=0.3, color="C0", label="(prompt, step)")
        if ok.sum() > 2:
            slope, icpt = np.polyfit(x[ok], y[ok], 1)
            grid = np.linspace(x[ok].min(), x[ok].max(), 50)
            ax.plot(grid, slope * grid + icpt, color="C3", label=f"least squares, r = {np.corrcoef(x[ok], y[ok])[0, 1]:.2f}")
        ax.ticklabel_format(axis="x", useOffset=False)
        ax.set_xlabel(f"{name} at the future step (nats)")
        ax.set_ylabel("head-mean local sts (nats)")
        ax.legend(loc="best")
        t = correlations[(correlations["unit_kind"] == "layer") & (correlations["target"] == name)]
        ax = axes[row, 1]
        ax.fill_between(t["layer"], t["null_lo"], t["null_hi"], color="0.8", label="circular-shift null, 95%")
        ax.plot(t["layer"], t["r"], "o-", color="C0", label="observed")
        ax.axhline(0, color="0.4", lw=0.8)
        ax.set_xlabel("layer")
        ax.set_ylabel(f"Pearson r (layer-mean sts, {name})")
        ax.set_xlim(-0.5, n_layers - 0.5)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(loc="best")
    return fig


def kind_bars(kinds_table, atom="sts"):
    """Mean local atom at each token kind with its bootstrap 95% CI, against the circular-shift null band."""
    t = kinds_table[(kinds_table["atom"] == atom) & (kinds_table["n_steps"] > 0)]
    t = t.set_index("kind").reindex([k for k in KIND_ORDER if k in set(t["kind"])]).reset_index()
    fig, ax = new_figure(7, 3.4)
    x = np.arange(len(t))
    ax.bar(x - 0.2, t["null_hi"] - t["null_lo"], 0.4, bottom=t["null_lo"], color="0.8", label="shift null, 95%")
    ax.errorbar(x + 0.2, t["mean"], yerr=[t["mean"] - t["ci_lo"], t["ci_hi"] - t["mean"]], fmt="o", color="C0",
                capsize=3, label="observed, bootstrap 95% CI")
    if len(t):
        ax.axhline(t["all_steps_mean"].iloc[0], color="0.4", lw=0.8, ls="--", label="all steps")
    ax.set_xticks(x, [f"{k}\n(n={n})" for k, n in zip(t["kind"], t["n_steps"])], fontsize=8)
    ax.set_ylabel(f"head-mean local {atom} (nats)")
    ax.legend(loc="best", fontsize=8)
    return fig


def step_profiles(profiles: dict, atom="sts"):
    """profiles: label (e.g. trained, random_init) -> step_profile table; mean over prompts and heads per
    transition with bootstrap 95% CI."""
    fig, axes = new_figure(4.6 * len(profiles), 3.2, ncols=len(profiles), squeeze=False)
    for k, (ax, (label, table)) in enumerate(zip(axes[0], profiles.items())):  # own y axis: scales can differ 100x
        t = table[table["atom"] == atom]
        ax.plot(t["step"], t["mean"], color=f"C{k}", marker="o", ms=2.5, label="mean over prompts and heads")
        ax.fill_between(t["step"], t["ci_lo"], t["ci_hi"], color=f"C{k}", alpha=0.25, label="bootstrap 95% CI")
        ax.set_xlabel("transition t -> t + tau (generation step t)")
        ax.set_ylabel(f"head-mean local {atom} (nats)")
        ax.set_title(label, fontsize=10)
        ax.legend(loc="best", fontsize=8)
    return fig
