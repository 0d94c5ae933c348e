"""lib.plots.topology.network_drawing: every kept pair drawn as one segment between its two heads (one artist)."""
import matplotlib

matplotlib.use("Agg")

import numpy as np
from matplotlib.collections import LineCollection, PathCollection

from lib.estimators.networks import threshold_proportional
from lib.plots.topology import module_layout, network_drawing


def test_every_kept_pair_is_one_segment_between_its_heads():
    rng = np.random.default_rng(0)
    heads, layer = 120, np.repeat(np.arange(10), 12)
    W = np.abs(rng.normal(size=(heads, heads)))
    W = threshold_proportional(np.triu(W, 1) + np.triu(W, 1).T, 0.1)
    modules = np.arange(heads) % 4
    fig = network_drawing(W, layer, modules)
    ax = fig.axes[0]
    (edges,) = [c for c in ax.collections if isinstance(c, LineCollection)]
    i, j = np.nonzero(np.triu(W, 1))
    pos = module_layout(modules, layer)
    segments = np.array(edges.get_segments())
    assert len(segments) == len(i) == round(0.1 * heads * (heads - 1) / 2)
    assert np.allclose(segments[:, 0], pos[i]) and np.allclose(segments[:, 1], pos[j])
    # the strongest pair is the widest and most opaque; heads are one scatter of 120 points
    k = np.argmax(W[i, j])
    assert edges.get_linewidths()[k] == max(edges.get_linewidths()) == 1.5
    assert edges.get_colors()[k][3] == 0.6
    (nodes,) = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert len(nodes.get_offsets()) == heads
