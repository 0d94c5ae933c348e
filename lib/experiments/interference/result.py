"""The interference result: scores per variant and block, tables (top pairs, summary), its artifacts
(interference.npz, top_conflicts.csv, interference_summary.csv, figures, manifest section) and loading."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from lib.storage import artifacts
from lib.storage.store import run_folder
from lib.storage.notebooks import NB

__all__ = ["BLOCKS", "KV_BLOCKS", "VARIANTS", "DEFAULT_EPS", "VARIANT_UNITS", "InterferenceResult"]

BLOCKS = ("Q", "K", "V", "O")
KV_BLOCKS = ("K", "V")
VARIANTS = ("magnitude", "signed", "symmetric", "pooled")
DEFAULT_EPS = 1e-30
FIGURES = ("heatmaps", "layers", "pairs", "fisher")
SAVED_FIGURES = ("heatmaps", "layers")
VARIANT_UNITS = {
    "magnitude": "nats per unit weight", "pooled": "nats per unit weight",
    "signed": "dimensionless", "symmetric": "dimensionless",
}


@dataclass
class InterferenceResult:
    """Scores per variant and block: [n_a, n_b, n_layers, heads] (heads = n_kv_heads for K and V), float32."""
    scores: dict[str, dict[str, np.ndarray]]
    ids_a: list[str]
    ids_b: list[str]
    task_a: str
    task_b: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    loss_a: np.ndarray
    loss_b: np.ndarray
    fisher_mass: dict[str, np.ndarray]          # block -> [layers, heads]: sum of F_A over the head's slice
    eps: float = DEFAULT_EPS
    ridge: float = 0.0
    method: str = "hooks"
    model: str = ""
    texts_a: list[str] = field(default_factory=list)
    texts_b: list[str] = field(default_factory=list)
    source_a: str = ""
    source_b: str = ""
    seconds: dict = field(default_factory=dict)
    out_dir: Path | None = field(default=None, repr=False)     # where save() wrote it (figures go there too)

    @property
    def variants(self) -> list[str]:
        return list(self.scores)

    @property
    def n_a(self) -> int:
        return len(self.ids_a)

    @property
    def n_b(self) -> int:
        return len(self.ids_b)

    @property
    def empty(self) -> bool:
        return self.n_a == 0 or self.n_b == 0

    def heads(self, block: str) -> int:
        return self.n_kv_heads if block in KV_BLOCKS else self.n_heads

    def layer_head_mean(self, block: str, variant: str = "magnitude") -> np.ndarray:
        """[layers, heads] mean over all (i, j) pairs; zeros (not NaN) when there are no pairs."""
        s = self.scores[variant][block]
        if self.empty:
            return np.zeros(s.shape[2:], dtype=np.float32)
        return s.mean(axis=(0, 1))

    def pair_totals(self, variant: str = "magnitude", blocks: Sequence[str] = BLOCKS) -> np.ndarray:
        """[n_a, n_b]: each pair's score summed over layers, heads and the given blocks."""
        return sum(self.scores[variant][b].sum(axis=(2, 3)) for b in blocks)

    def top_pairs(self, k: int = 20, variants: Sequence[str] | None = None):
        """The k strongest entries per (variant, block), with the true sample ids. For `signed` the most negative
        (conflicts; only scores < 0 are listed); for the others the largest. head is a query head for Q/O and a KV head for K/V."""
        import pandas as pd
        rows = []
        for variant in variants or self.variants:
            for block in BLOCKS:
                s = self.scores[variant][block]
                if s.size == 0:
                    continue
                flat = s.ravel() if variant != "signed" else -s.ravel()
                take = min(k, flat.size if variant != "signed" else int((flat > 0).sum()))   # signed: only < 0
                if take == 0:
                    continue
                best = np.argpartition(-flat, take - 1)[:take]
                best = best[np.argsort(-flat[best], kind="stable")]
                for rank, f in enumerate(best):
                    i, j, layer, head = np.unravel_index(f, s.shape)
                    rows.append({"variant": variant, "block": block, "rank": rank + 1,
                                 "sample_a": self.ids_a[i], "sample_b": self.ids_b[j], "layer": int(layer),
                                 "head": int(head), "head_kind": "kv" if block in KV_BLOCKS else "query",
                                 "score": float(s[i, j, layer, head]),
                                 "text_a": (self.texts_a[i] if self.texts_a else "")[:80],
                                 "text_b": (self.texts_b[j] if self.texts_b else "")[:80]})
        columns = ["variant", "block", "rank", "sample_a", "sample_b", "layer", "head", "head_kind", "score",
                   "text_a", "text_b"]
        return pd.DataFrame(rows, columns=columns)

    def summary(self):
        """Per (variant, block): mean and max score, the (layer, head) with the highest mean and its share of the
        block's total, the layer with the highest mean, the fraction of negative scores. Zeros when no pairs."""
        import pandas as pd
        rows = []
        for variant in self.variants:
            for block in BLOCKS:
                s = self.scores[variant][block]
                m = self.layer_head_mean(block, variant)
                row = {"variant": variant, "block": block, "heads_per_layer": self.heads(block),
                       "n_pairs": self.n_a * self.n_b, "mean": 0.0, "max": 0.0, "top_layer": -1, "top_head": -1,
                       "top_head_share": 0.0, "top_layer_by_mean": -1, "fraction_negative": 0.0}
                if not self.empty:
                    order = -np.abs(m) if variant == "signed" else -m
                    layer, head = np.unravel_index(int(np.argmin(order)), m.shape)
                    total = np.abs(m).sum()
                    row.update(mean=float(s.mean()), max=float(s.max()), top_layer=int(layer), top_head=int(head),
                               top_head_share=float(abs(m[layer, head]) / total) if total > 0 else 0.0,
                               top_layer_by_mean=int(np.argmax(np.abs(m).mean(1))),
                               fraction_negative=float((s < 0).mean()))
                rows.append(row)
        return pd.DataFrame(rows)

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {f"scores__{v}__{b}": self.scores[v][b] for v in self.variants for b in BLOCKS}
        arrays.update({f"fisher_mass__{b}": self.fisher_mass[b] for b in BLOCKS})
        arrays.update(
            ids_a=np.array(self.ids_a, dtype=str), ids_b=np.array(self.ids_b, dtype=str),
            texts_a=np.array(self.texts_a, dtype=str), texts_b=np.array(self.texts_b, dtype=str),
            loss_a=self.loss_a.astype(np.float32), loss_b=self.loss_b.astype(np.float32),
            variants=np.array(self.variants, dtype=str), blocks=np.array(BLOCKS, dtype=str),
            n_layers=np.int64(self.n_layers), n_heads=np.int64(self.n_heads), n_kv_heads=np.int64(self.n_kv_heads),
            eps=np.float64(self.eps), ridge=np.float64(self.ridge), task_a=np.array(self.task_a),
            task_b=np.array(self.task_b), model=np.array(self.model), method=np.array(self.method),
            source_a=np.array(self.source_a), source_b=np.array(self.source_b))
        return arrays

    def save(self, out_dir: str | Path, top_k: int = 20, record: dict | None = None) -> dict[str, Path]:
        """interference.npz, top_conflicts.csv, interference_summary.csv in out_dir (validated before writing) and
        the manifest section NB.INTERFERENCE (what was computed, timings, plus `record`)."""
        arrays = self.to_arrays()
        for key, value in arrays.items():
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                raise ValueError(f"refusing to write {artifacts.path('interference', out_dir).name}: {key} holds "
                                 f"non-finite values (raise eps or ridge)")
        top, summary = self.top_pairs(top_k), self.summary()
        self.out_dir = run_folder(out_dir)
        paths = {"npz": artifacts.save("interference", out_dir, arrays),
                 "top_conflicts": artifacts.save("top_conflicts", out_dir, top),
                 "summary": artifacts.save("interference_summary", out_dir, summary)}
        self._record(record or {})
        return paths

    def _record(self, extra: dict) -> None:
        from lib.storage.store import update_manifest
        update_manifest(self.out_dir, NB.INTERFERENCE, {
            "model": self.model, "task_a": self.task_a, "task_b": self.task_b, "source_a": self.source_a,
            "source_b": self.source_b, "n_a": self.n_a, "n_b": self.n_b, "variants": self.variants, "eps": self.eps,
            "ridge": self.ridge, "grad_method": self.method, "timings": self.seconds, **extra})

    def figure(self, name: str, variant: str = "magnitude"):
        """A figure of this result (FIGURES: heatmaps, layers, pairs, fisher); heatmaps (per variant) and layers are
        also saved as interference_<name>[_<variant>].png next to the saved result. Returns the Figure."""
        from lib.plots import interference as plots
        draw = {"heatmaps": lambda: plots.block_heatmaps(self, variant), "layers": lambda: plots.layer_profiles(self),
                "pairs": lambda: plots.pair_matrix(self, variant), "fisher": lambda: plots.fisher_profile(self)}
        if name not in draw:
            raise ValueError(f"unknown interference figure {name!r}; choose one of {list(FIGURES)}")
        fig = draw[name]()
        if name in SAVED_FIGURES:
            if self.out_dir is None:
                raise ValueError("save() the result first: its figures are written next to its artifacts")
            artifacts.save("interference_figure", self.out_dir, fig,
                           figure=f"{name}_{variant}" if name == "heatmaps" else name)
        return fig

    @classmethod
    def load(cls, path: str | Path) -> "InterferenceResult":
        """From a run folder or an interference file."""
        path = Path(path)
        d = artifacts.load("interference", path) if path.is_dir() else artifacts.load_file("interference", path)
        variants = [str(v) for v in d["variants"]]
        return cls(scores={v: {b: d[f"scores__{v}__{b}"] for b in BLOCKS} for v in variants},
                   ids_a=[str(i) for i in d["ids_a"]], ids_b=[str(i) for i in d["ids_b"]],
                   task_a=str(d["task_a"]), task_b=str(d["task_b"]), n_layers=int(d["n_layers"]),
                   n_heads=int(d["n_heads"]), n_kv_heads=int(d["n_kv_heads"]), loss_a=d["loss_a"],
                   loss_b=d["loss_b"], fisher_mass={b: d[f"fisher_mass__{b}"] for b in BLOCKS},
                   eps=float(d["eps"]), ridge=float(d["ridge"]), method=str(d["method"]), model=str(d["model"]),
                   texts_a=[str(t) for t in d["texts_a"]], texts_b=[str(t) for t in d["texts_b"]],
                   source_a=str(d["source_a"]), source_b=str(d["source_b"]))

