"""The forest plot at the top of a run's index: every claim on one scale, as a fraction of the paper's effect."""
from __future__ import annotations

import numpy as np

from lib.plots.common import new_figure

__all__ = ["forest_rows", "forest_plot"]

VERDICT_COLORS = {"supported": "#1a7f37", "opposite": "#8250df", "ruled out": "#cf222e",
                  "underpowered": "#9a6700", "invalid": "#57606a", "not tested": "#8c959f"}


def _fraction(x, n0: float, paper: float):
    return None if x is None else (float(x) - n0) / (paper - n0)


def forest_rows(claims: list[dict]) -> list[dict]:
    """Per claim with a value and a paper effect: value, CI, null band and MDE as fractions of (paper - null),
    so that 0 is the null and 1 the paper's effect, whatever the statistic's units."""
    rows = []
    for c in claims:
        paper = (c.get("paper_effect") or {}).get("value")
        null = c.get("null") or {}
        n0 = null.get("value")
        if c.get("value") is None or paper is None or n0 is None or paper == n0:
            rows.append({"id": c["id"], "verdict": c.get("verdict", "not tested"), "value": None})
            continue
        ci = c.get("ci95") or [None, None]
        band = null.get("ci95") or [n0, n0]
        f = [_fraction(x, n0, paper) for x in (c["value"], *ci, *band, (c.get("power") or {}).get("mde"))]
        rows.append({"id": c["id"], "verdict": c.get("verdict"), "value": f[0], "ci": f[1:3],
                     "band": sorted(f[3:5]), "mde": f[5]})
    return rows


def forest_plot(claims: list[dict], width: float = 7.5):
    """Figure: one row per claim, the effect with its 95% CI as a fraction of the paper's effect (0 = null,
    1 = paper), the null band (grey), the minimum detectable effect (open triangle), the verdict as colour."""
    rows = forest_rows(claims)
    fig, ax = new_figure(width, 0.45 * len(rows) + 1.3)
    for y, r in enumerate(rows[::-1]):
        color = VERDICT_COLORS.get(r["verdict"], "#8c959f")
        ax.text(1.02, y, r["verdict"], transform=ax.get_yaxis_transform(), va="center", color=color, fontsize=9)
        if r["value"] is None:
            continue
        ax.fill_betweenx([y - 0.3, y + 0.3], *np.clip(r["band"], -3, 4), color="0.85", lw=0,
                         label="null band" if y == 0 else None)
        lo, hi = (np.nan if v is None else v for v in r["ci"])
        ax.plot(np.clip([lo, hi], -3, 4), [y, y], color=color, lw=2)
        ax.plot(np.clip(r["value"], -3, 4), y, "o", color=color, label=None)
        if r["mde"] is not None:
            ax.plot(np.clip(r["mde"], -3, 4), y, "^", mfc="none", color="k", ms=7)
    ax.axvline(0, color="0.4", lw=1, ls=":")
    ax.axvline(1, color="#0969da", lw=1.2, ls="--")
    ax.set_yticks(range(len(rows)), [r["id"] for r in rows[::-1]])
    ax.set_xlim(-3.1, 4.1)
    ax.set_xlabel("effect as a fraction of the paper's effect (0 = null, 1 = paper; clipped to [-3, 4])")
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    ax.legend(handles=[Line2D([], [], marker="o", color="0.3", label="ours, 95% CI"),
                       Patch(color="0.85", label="null band"),
                       Line2D([], [], marker="^", mfc="none", color="k", ls="", label="min. detectable (80%)"),
                       Line2D([], [], color="#0969da", ls="--", label="paper")],
              loc="upper center", bbox_to_anchor=(0.5, -0.35 if len(rows) < 4 else -0.12), ncol=4, frameon=False,
              fontsize=8)
    ax.set_title("Claims of the paper: this run's effects on the paper's scale")
    return fig
