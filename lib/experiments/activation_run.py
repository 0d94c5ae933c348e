"""ActivationRun: what notebook 01 extracts (per-head output norms during generation, with the tokens and prompts
they came from) and how it is saved through lib.storage.artifacts. A plain container below lib.experiments.extract, so that network-free
sources (lib.experiments.synthetic) build the same object without importing the extraction code.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lib.storage import artifacts
from lib.model.prompts import Prompt

__all__ = ["ActivationRun"]


@dataclass
class ActivationRun:
    """Everything notebook 01 writes to activations.npz (see to_arrays for the keys)."""
    activations: np.ndarray        # float32 [prompts, heads, steps]: L2 norm of each head's output
    tokens: np.ndarray             # int64 [prompts, steps]: generated token ids
    prompt_input_ids: np.ndarray   # int64 [prompts, max_prompt_len], left-padded with pad_token_id
    prompt_lengths: np.ndarray     # int64 [prompts]
    prompts: list[Prompt]
    head_layer: np.ndarray         # int64 [heads]
    head_index: np.ndarray         # int64 [heads]
    n_layers: int
    n_heads: int
    n_kv_heads: int
    pad_token_id: int
    model: str
    chat_template: bool
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    end_of_turn_ids: np.ndarray | list[int] | None = None   # [ids]: the tokenizer's end-of-turn tokens (None: not known)

    def save(self, out_dir, tag: str = "", extraction_key: str | None = None, manifest: dict | None = None):
        """Write the activations file (tag "" = the run's model) atomically and, when `manifest` is given, notebook
        01's manifest section for it (the given entries plus the architecture, generation time and file name)."""
        from lib.storage.store import update_manifest
        arrays = self.to_arrays() if extraction_key is None else {**self.to_arrays(), "extraction_key": extraction_key}
        path = artifacts.save("activations", out_dir, arrays, tag=tag)
        if manifest is not None:
            update_manifest(out_dir, f"{artifacts.artifact('activations').producer}{'__' + tag if tag else ''}", {
                **manifest, "n_layers": self.n_layers, "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads,
                "seconds_generation": round(self.seconds, 2), "artifact": path.name})
        return path

    def to_arrays(self) -> dict:
        return dict(
            activations=self.activations, tokens=self.tokens, prompt_input_ids=self.prompt_input_ids,
            prompt_lengths=self.prompt_lengths, prompt_ids=np.array([p.prompt_id for p in self.prompts]),
            prompt_category=np.array([p.category for p in self.prompts]),
            prompt_text=np.array([p.text for p in self.prompts]), head_layer=self.head_layer,
            head_index=self.head_index, n_layers=self.n_layers, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
            pad_token_id=self.pad_token_id, model=self.model, chat_template=self.chat_template,
            seconds=self.seconds,
            **({} if self.end_of_turn_ids is None else {"end_of_turn_ids": np.asarray(self.end_of_turn_ids, np.int64)}))
