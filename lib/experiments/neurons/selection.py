"""Which neurons and which prompts: neuron ids, neuron files, selectors, and the run's prompts."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from lib.storage import artifacts
from lib.model.architectures import ArchInfo
from lib.storage.store import ArtifactError
from lib.storage.notebooks import NB

__all__ = ["MODES", "SCALES", "SELECTORS", "Neuron", "check_mlp_site", "validate_neurons", "read_neuron_file",
           "select_neurons", "PromptSet", "load_prompts"]

MODES = ("add", "ablate")
SCALES = ("actual", "mean", "unit")
SELECTORS = ("top_activation", "random")


# ----------------------------------------------------------------------------- neuron sets

@dataclass(frozen=True, order=True)
class Neuron:
    layer: int
    neuron: int

    @property
    def id(self) -> str:
        return f"L{self.layer}/N{self.neuron}"


_ID_RE = re.compile(r"^\s*L(-?\d+)\s*/\s*N(-?\d+)\s*$", re.IGNORECASE)


def check_mlp_site(arch: ArchInfo) -> None:
    """Fail clearly when the architecture's MLP down projection (the neuron site) cannot be found or has the wrong
    shape; names the architecture and the module path tried."""
    path = getattr(arch.spec, "mlp_down", None)
    fix = ("add or correct the ArchSpec.mlp_down entry for it in lib/model/architectures.py (the module whose input is the "
           "neuron activations, [.., d_mlp], and whose output is added to the residual stream)")
    if not path:
        raise ValueError(f"the MLP site of architecture {arch.model_type!r} is unknown (no mlp_down path): {fix}")
    try:
        weight = arch.down_proj_weight(0)
    except (AttributeError, IndexError, TypeError) as e:
        raise ValueError(f"the MLP site of architecture {arch.model_type!r} is unknown: no module at "
                         f"{path!r} in its blocks ({type(e).__name__}: {e}); {fix}") from None
    if tuple(weight.shape) != (arch.hidden_size, arch.d_mlp):
        raise ValueError(f"the MLP site of architecture {arch.model_type!r} is unknown: {path!r} has a weight of "
                         f"shape {tuple(weight.shape)}, expected [hidden {arch.hidden_size}, d_mlp {arch.d_mlp}] "
                         f"(a mixture-of-experts or fused MLP?); {fix}")


def _parse_neuron(item: Any) -> tuple[int, int]:
    if isinstance(item, str):
        m = _ID_RE.match(item)
        if not m:
            raise ValueError(f"cannot read neuron {item!r}: write 'L<layer>/N<neuron>' (e.g. 'L3/N12') or [layer, neuron]")
        return int(m.group(1)), int(m.group(2))
    if isinstance(item, dict) and {"layer", "neuron"} <= set(item):
        item = (item["layer"], item["neuron"])
    if isinstance(item, (list, tuple)) and len(item) == 2:
        layer, neuron = item
        ok = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (layer, neuron))
        if ok:
            return int(layer), int(neuron)
    raise ValueError(f"cannot read neuron {item!r}: write [layer, neuron] with two integers, or 'L<layer>/N<neuron>'")


def validate_neurons(arch: ArchInfo, items, source: str = "neurons") -> list[Neuron]:
    """Parse and check a neuron list -> sorted, de-duplicated list of Neuron. Raises ValueError naming the bad entry."""
    check_mlp_site(arch)
    parsed = [_parse_neuron(it) for it in (items or [])]
    if not parsed:
        raise ValueError(f"empty neuron set (from {source}): give neurons = [[layer, neuron], ...], a neurons_file, "
                         f"or a selector with n_neurons > 0")
    for layer, neuron in parsed:
        if not 0 <= layer < arch.n_layers:
            raise ValueError(f"neuron L{layer}/N{neuron} (from {source}): layer {layer} does not exist; the model "
                             f"has {arch.n_layers} layers (0..{arch.n_layers - 1})")
        if not 0 <= neuron < arch.d_mlp:
            raise ValueError(f"neuron L{layer}/N{neuron} (from {source}): index {neuron} is out of range for layer "
                             f"{layer}, which has d_mlp = {arch.d_mlp} neurons (0..{arch.d_mlp - 1})")
    return sorted({Neuron(l, n) for l, n in parsed})


def read_neuron_file(path: str | Path) -> list:
    """Neuron list from a file: .json (list of [layer, neuron] or 'L3/N12'), .csv (columns layer, neuron), or text
    (one neuron per line: 'L3/N12', '3 12' or '3,12'; '#' starts a comment)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"neurons_file {str(path)!r} does not exist")
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        return data["neurons"] if isinstance(data, dict) and "neurons" in data else data
    if path.suffix == ".csv":
        frame = pd.read_csv(path)
        if not {"layer", "neuron"} <= set(frame.columns):
            raise ValueError(f"{path}: a neuron CSV needs columns 'layer' and 'neuron' (has {list(frame.columns)})")
        return [(int(l), int(n)) for l, n in zip(frame["layer"], frame["neuron"])]
    items = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = re.split(r"[,\s]+", line)
        items.append(line if len(parts) == 1 else tuple(int(p) for p in parts) if all(
            re.fullmatch(r"-?\d+", p) for p in parts) else line)
    return items


def _split_evenly(n: int, k: int) -> list[int]:
    base, extra = divmod(n, k)
    return [base + (1 if i < extra else 0) for i in range(k)]


def select_neurons(arch: ArchInfo, selector: str = "top_activation", n_neurons: int = 32,
                   layers: list[int] | None = None, activations: torch.Tensor | None = None,
                   seed: int = 0) -> list[Neuron]:
    """n_neurons split evenly over `layers` (default all; earlier layers get the remainder), chosen per layer by
    "top_activation" (largest mean |activation| at the last position over the prompts; needs `activations`
    [prompts, layers, d_mlp]) or "random" (seeded uniform sample without replacement)."""
    check_mlp_site(arch)
    if selector not in SELECTORS:
        raise ValueError(f"unknown neuron selector {selector!r}; use one of {list(SELECTORS)}")
    if not isinstance(n_neurons, int) or isinstance(n_neurons, bool) or n_neurons <= 0:
        raise ValueError(f"empty neuron set: n_neurons must be a positive integer (got {n_neurons!r})")
    chosen = list(range(arch.n_layers)) if layers is None else list(layers)
    if not chosen:
        raise ValueError("empty neuron set: `layers` is an empty list; give None (all layers) or some layer indices")
    for l in chosen:
        if not isinstance(l, (int, np.integer)) or not 0 <= l < arch.n_layers:
            raise ValueError(f"layer {l!r} does not exist; the model has {arch.n_layers} layers (0..{arch.n_layers - 1})")
    if n_neurons > len(chosen) * arch.d_mlp:
        raise ValueError(f"n_neurons={n_neurons} but the chosen layers hold only {len(chosen) * arch.d_mlp} neurons")
    counts = _split_evenly(n_neurons, len(chosen))
    if max(counts) > arch.d_mlp:
        raise ValueError(f"n_neurons={n_neurons} over {len(chosen)} layers needs {max(counts)} per layer > d_mlp {arch.d_mlp}")
    rng = np.random.default_rng(seed)
    out = []
    for layer, k in zip(chosen, counts):
        if k == 0:
            continue
        if selector == "random":
            picks = rng.choice(arch.d_mlp, size=k, replace=False)
        else:
            if activations is None:
                raise ValueError("selector 'top_activation' needs the clean activations (run clean_pass first)")
            score = activations[:, layer].abs().float().mean(0)
            picks = torch.topk(score, k).indices.cpu().numpy()
        out.extend(Neuron(int(layer), int(n)) for n in picks)
    return sorted(set(out))


# ----------------------------------------------------------------------------- prompts

@dataclass
class PromptSet:
    input_ids: list[torch.Tensor]     # each 1-D LongTensor, the prompt exactly as fed (chat template applied)
    prompt_ids: list[int]             # index in the paper's 60
    texts: list[str]
    categories: list[str]
    source: str                       # where they came from (the activations file, or select_prompts + tokenizer)

    def __len__(self) -> int:
        return len(self.input_ids)


_PROMPT_KEYS = ["prompt_input_ids", "prompt_lengths", "prompt_ids", "prompt_text", "prompt_category", "model"]


def load_prompts(out_dir: str | Path, tokenizer, arch: ArchInfo, n_prompts: int = 4,
                 chat_template: bool = True) -> PromptSet:
    """The prompts of the run: from the run's activations file (notebook 01) when it exists (prompt_input_ids / prompt_lengths: the
    same chat-templated inputs as the extraction; the paper's even split over categories when the file holds those
    prompts, otherwise evenly spaced rows), else lib.model.prompts.select_prompts(n_prompts) encoded with the tokenizer
    (with its chat template when chat_template=True, as notebook 01 does)."""
    from lib.model.prompts import select_prompts
    if not isinstance(n_prompts, int) or isinstance(n_prompts, bool) or n_prompts <= 0:
        raise ValueError(f"n_prompts must be a positive integer (got {n_prompts!r})")
    path = artifacts.path("activations", out_dir)
    if path.exists():
        data = artifacts.load("activations", out_dir, keys=_PROMPT_KEYS)
        made_with = str(data["model"]) if "model" in data else None
        if made_with is not None and arch.source and made_with != arch.source:
            raise ArtifactError(f"{path} was made with model {made_with!r} but this run uses {arch.source!r}: use "
                                f"the same model, or another out_dir (without {path.name} the prompts are "
                                f"taken from lib.model.prompts)")
        total = len(data["prompt_lengths"])
        if n_prompts > total:
            raise ValueError(f"n_prompts={n_prompts} but {path} holds only {total} prompts; use n_prompts <= {total}")
        ids_in_file = [int(i) for i in data.get("prompt_ids", np.arange(total))]
        wanted = [p.prompt_id for p in select_prompts(n_prompts)] if n_prompts <= 60 else []
        if wanted and all(w in ids_in_file for w in wanted):
            rows = [ids_in_file.index(w) for w in wanted]
        else:
            rows = sorted(set(np.linspace(0, total - 1, n_prompts).round().astype(int).tolist()))
        ids = [torch.as_tensor(data["prompt_input_ids"][r, -int(data["prompt_lengths"][r]):], dtype=torch.long)
               for r in rows]
        texts = [str(data["prompt_text"][r]) if "prompt_text" in data else "" for r in rows]
        cats = [str(data["prompt_category"][r]) if "prompt_category" in data else "" for r in rows]
        bad = [int(t.max()) for t in ids if int(t.max()) >= arch.vocab_size]
        if bad:
            raise ArtifactError(f"{path}: token id {bad[0]} >= vocabulary {arch.vocab_size}: the file is from another "
                                f"tokenizer; regenerate it with {NB.EXTRACT} for this model")
        return PromptSet(ids, [ids_in_file[r] for r in rows], texts, cats, f"{path} (prompt_input_ids)")
    from lib.experiments.extract import encode_prompts
    prompts = select_prompts(n_prompts)
    encoded = encode_prompts(tokenizer, [p.text for p in prompts], chat_template)
    return PromptSet([torch.as_tensor(e, dtype=torch.long) for e in encoded], [p.prompt_id for p in prompts],
                     [p.text for p in prompts], [p.category for p in prompts],
                     f"lib.model.prompts.select_prompts({n_prompts}) + tokenizer (chat_template={bool(chat_template)})")
