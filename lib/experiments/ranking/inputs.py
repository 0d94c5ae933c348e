"""The inputs of a run's ranking: activations and PhiID files, their preprocessing and checks."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lib.storage import artifacts
from lib.experiments import diagnostics as dg
from lib.estimators.phiid import load_phiid
from lib.storage.store import ArtifactError
from lib.experiments.ranking.scores import (DEFAULT_VARIANTS, NEEDS_TDMI, PairStats, PerPromptStats, VARIANTS,
                                            VariantScore, _atom_names, check_variants, mmi_pair_means,
                                            per_prompt_stats, phiid_pair_stats, preprocess, variant_score)
from lib.storage.notebooks import NB

__all__ = ["RankingInputs", "load_inputs"]


# ------------------------------------------------------------------------------------------- inputs of a run

@dataclass
class RankingInputs:
    """Activations of one run plus the PhiID each selected variant needs (lazy, cached).

    files: PhiID mode -> loaded phiid_<mode>.npz dict; for the variants without preprocessing these are used
    for the full-data scores (checked against a recomputation from the activations when per-prompt arrays
    are computed). Everything else is computed with lib.estimators.phiid."""
    X: np.ndarray
    head_layer: np.ndarray
    head_index: np.ndarray
    n_layers: int
    n_heads: int
    variants: tuple
    tau: int = 1
    redundancy: str = "MMI"
    backend: str = "numpy"
    files: dict = field(default_factory=dict)
    progress: bool = False
    _full: dict = field(default_factory=dict, repr=False)
    _per_prompt: dict = field(default_factory=dict, repr=False)
    _prepared: dict = field(default_factory=dict, repr=False)
    _autocorr: np.ndarray | None = field(default=None, repr=False)

    @property
    def labels(self):
        return dg.head_labels(self.head_layer, self.head_index)

    @property
    def sources(self) -> list[tuple]:
        return sorted({VARIANTS[v].source for v in self.variants}, key=str)

    def autocorr_per_prompt(self) -> np.ndarray:
        if self._autocorr is None:
            self._autocorr = dg.lag_autocorrelation(self.X, 1)
        return self._autocorr

    def autocorr(self, prompts=None) -> np.ndarray:
        """Per-head lag-1 autocorrelation: mean over the (given) prompts where it is defined."""
        r = self.autocorr_per_prompt() if prompts is None else self.autocorr_per_prompt()[np.asarray(prompts)]
        ok = np.isfinite(r)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(ok, r, 0.0).sum(0) / ok.sum(0)

    def prepared(self, how) -> np.ndarray:
        if how not in self._prepared:
            self._prepared[how] = preprocess(self.X, how)
        return self._prepared[how]

    def per_prompt(self, how) -> PerPromptStats:
        """Per-prompt sts, rtr, TDMI of the (preprocessed) series [prompts, pairs], computed once."""
        if how not in self._per_prompt:
            self._per_prompt[how] = per_prompt_stats(self.prepared(how), self.tau, self.redundancy, self.backend,
                                                     progress=self.progress)
        return self._per_prompt[how]

    def full(self, source) -> PairStats:
        mode, how = source
        if source not in self._full:
            if how is None and mode in self.files:
                f = self.files[mode]
                self._full[source] = PairStats.from_atoms(f, f["degenerate"])
            else:
                self._full[source] = self.half(source, np.arange(self.X.shape[0]))
        return self._full[source]

    def half(self, source, prompts) -> PairStats:
        """PhiID of a prompt subset: the mean of per-prompt values (per_prompt mode), or the mode computed on
        the subset's prompts (concat, pooled)."""
        mode, how = source
        prompts = np.asarray(prompts)
        if mode == "per_prompt":
            return self.per_prompt(how).mean(prompts)
        return phiid_pair_stats(self.prepared(how)[prompts], mode, self.tau, self.redundancy, self.backend)

    def scores(self, stats_of=None, autocorr=None) -> dict[str, VariantScore]:
        """Scores of every selected variant; stats_of(source) -> PairStats (default: full data)."""
        stats_of = stats_of or self.full
        autocorr = self.autocorr() if autocorr is None else autocorr
        cache = {}
        out = {}
        for name in self.variants:
            src = VARIANTS[name].source
            if src not in cache:
                cache[src] = stats_of(src)
            out[name] = variant_score(name, cache[src], self.head_layer, self.n_layers, autocorr, self.labels)
        return out


def check_file_matches(ph: dict, computed: PairStats, rtol=1e-6, atol=1e-8) -> None:
    """A phiid_<mode>.npz must equal the PhiID recomputed from the activations (same mode)."""
    f = PairStats.from_atoms(ph, ph["degenerate"])
    name = Path(ph.get("path", "phiid.npz")).name
    fix = (f"{name} and the activations come from different runs (or another tau / redundancy): rerun "
           f"{NB.PHIID} on this run (python -m lib.run --params <run>.yaml --only {NB.PHIID} --force)")
    if not np.array_equal(f.valid, computed.valid):
        raise ArtifactError(f"{name} marks {int((~f.valid).sum())} degenerate pairs but the activations give "
                            f"{int((~computed.valid).sum())}: {fix}")
    for atom in ("sts", "rtr"):
        a, b = getattr(f, atom)[f.valid], getattr(computed, atom)[f.valid]
        if not np.allclose(a, b, rtol=rtol, atol=atol):
            raise ArtifactError(f"{name}: atom {atom} differs from the PhiID recomputed from the activations "
                                f"(max |diff| {np.max(np.abs(a - b)):.3g} nats): {fix}")


def load_inputs(out_dir, variants=DEFAULT_VARIANTS, tag: str = "", tau: int = 1, redundancy: str = "MMI",
                backend: str = "numpy", progress: bool = False, verify: bool = True) -> RankingInputs:
    """Activations and PhiID files of a run (or of a baseline `tag`), checked, for the chosen variants.

    Fails before any score is computed when a variant needs a phiid_<mode>.npz that notebook 02 did not
    write, when the files come from different runs (head count, head map, model; with verify=True (MMI) each
    file is also compared with the PhiID recomputed from the activations), or when tau / redundancy differ
    from those of the files."""
    variants = check_variants(variants)
    acts = dg.load_activations(out_dir, tag)
    files = {}
    for mode in sorted({VARIANTS[v].mode for v in variants if VARIANTS[v].preprocess is None}):
        users = [v for v in variants if VARIANTS[v].mode == mode and VARIANTS[v].preprocess is None]
        atoms = tuple(_atom_names()) if mode == "per_prompt" else ("sts", "rtr")
        if mode == "per_prompt" and not NEEDS_TDMI & set(users):
            atoms = ("sts", "rtr")
        ph = load_phiid(out_dir, mode, tag, activations=acts, atoms=atoms,
                        needed_by=f"ranking variant(s) {', '.join(users)}")
        for key, want in (("tau", tau), ("redundancy", redundancy)):
            got = artifacts.scalar(ph, key)
            if got is not None and str(got) != str(want):
                raise ArtifactError(f"{ph['path'].name} was computed with {key}={got!r} but this notebook has "
                                    f"{key}={want!r}: set {key}: {got!r} in its parameters (or rerun {NB.PHIID} "
                                    f"with {key}={want!r})")
        files[mode] = ph
    inputs = RankingInputs(X=np.asarray(acts["activations"], dtype=np.float64), head_layer=acts["head_layer"],
                           head_index=acts["head_index"], n_layers=acts["n_layers"], n_heads=acts["n_heads"],
                           variants=variants, tau=tau, redundancy=redundancy, backend=backend, files=files,
                           progress=progress)
    if verify and redundancy == "MMI":
        for mode, ph in files.items():
            computed = inputs.per_prompt(None).mean() if mode == "per_prompt" else mmi_pair_means(inputs.X, mode, tau)
            check_file_matches(ph, computed)
    return inputs
