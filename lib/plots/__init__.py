"""Every figure of the project. One module per notebook topic; each function returns a matplotlib Figure.

Figures are meant for papers: labelled axes with units, legends, layer colours consistent across notebooks.
"""
from lib.plots.common import LAYER_CMAP, layer_colors, new_figure, style  # noqa: F401

__all__ = ["LAYER_CMAP", "layer_colors", "new_figure", "style"]
