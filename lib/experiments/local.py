"""When in the generation do heads integrate? Token-level (local) PhiID aligned with the generated tokens.

For every head, lib.estimators.phiid.phiid_local_head_means gives the local synergy `sts` and redundancy `rtr` at every
transition t -> t + tau of every prompt, averaged over all the head's partners ([heads, prompts, steps - tau]).
Each transition is attributed to its future step s = t + tau. Activations step s is the forward pass that reads
token s - 1 (the last prompt token for s = 0) and produces generated token s, so transition t aligns with: the
token read at step s (`token_ids` = tokens[s - 1]; its kinds), the entropy (nats) of the next-token distribution
computed at step s and the surprisal -log p(tokens[s]) (nats) of the token it produced. Entropy and surprisal come
from a teacher-forced clean pass over the prompt and the generated tokens of notebook 01 (same model, no cache;
`greedy_agreement` = the fraction of steps where the teacher-forced argmax is the generated token, ~1 for the run's
own tokens).

Token kinds (a step may have several): punctuation (decoded text only punctuation), digit (contains a digit),
first_answer (the first generated token that is not whitespace or special), end_of_turn (a special token, e.g.
<|im_end|>), after_end_of_turn (steps after the first end-of-turn), digit_numerical (a digit in a numerical-
reasoning prompt), other (none of the first five).

Statistics (every number with its uncertainty and its null):
* correlation of per-step synergy (per head and per layer mean) with entropy and surprisal: Pearson r over every
  (prompt, step); null = the same r after circularly shifting the entropy/surprisal series within each prompt by
  an independent random offset (n_null shifts): null mean, 95% band, two-sided p;
* mean local synergy / redundancy (mean over heads) at the steps of each token kind: bootstrap 95% CI over
  prompts; null = the kind's steps circularly shifted within each prompt (same count per prompt, position
  structure broken): null mean, 95% band, p;
* the profile over generation steps (mean over prompts and heads, bootstrap CI over prompts).
"""
from __future__ import annotations

import time
import unicodedata
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from lib.storage import artifacts
from lib.estimators.phiid import phiid_local_head_means
from lib.storage.store import ArtifactError
from lib.storage.notebooks import NB

__all__ = ["KINDS", "teacher_forced_steps", "token_kinds", "step_correlations", "kind_means", "step_profile",
           "correlation_summary", "run_local", "load_local"]

NOTEBOOK = NB.LOCAL
KINDS = ("punctuation", "digit", "first_answer", "end_of_turn", "after_end_of_turn", "digit_numerical", "other")
ATOMS = ("sts", "rtr")
NUMERICAL_CATEGORY = "Numerical"   # prompt categories containing this word count as arithmetic prompts
MIN_GREEDY_AGREEMENT = 0.5


# ------------------------------------------------------------------------------------------- teacher-forced pass

def _prompt_sequences(prompt_input_ids, prompt_lengths, tokens):
    """Unpadded prompt ids followed by the generated tokens but the last -> list of id lists."""
    width = prompt_input_ids.shape[1]
    return [list(prompt_input_ids[p, width - n:]) + list(tokens[p, :-1]) for p, n in enumerate(prompt_lengths)]


def teacher_forced_steps(model, prompt_input_ids, prompt_lengths, tokens, pad_id, batch_size=8):
    """Clean teacher-forced pass -> (entropy [prompts, steps], surprisal [prompts, steps], greedy [prompts, steps]
    bool). Step s: the next-token distribution that produced tokens[:, s] (nats)."""
    import torch

    from lib.experiments.extract import left_pad
    steps = tokens.shape[1]
    sequences = _prompt_sequences(prompt_input_ids, prompt_lengths, tokens)
    device = next(model.parameters()).device
    entropy, surprisal, greedy = (np.empty(tokens.shape) for _ in range(3))
    for start in range(0, len(sequences), batch_size):
        ids, mask = (t.to(device) for t in left_pad(sequences[start:start + batch_size], pad_id))
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False,
                           logits_to_keep=steps).logits[:, -steps:].double()
        logp = torch.log_softmax(logits, dim=-1)
        target = torch.as_tensor(tokens[start:start + batch_size], device=device)
        rows = slice(start, start + len(target))
        entropy[rows] = (-(logp.exp() * logp).sum(-1)).cpu().numpy()
        surprisal[rows] = (-logp.gather(-1, target[..., None])[..., 0]).cpu().numpy()
        greedy[rows] = (logp.argmax(-1) == target).cpu().numpy()
    return entropy, surprisal, greedy.astype(bool)


# ------------------------------------------------------------------------------------------- token kinds

def _is_punctuation(text):
    text = text.strip()
    return bool(text) and all(unicodedata.category(c).startswith("P") for c in text)


def token_kinds(tokens, texts, special_ids, categories):
    """tokens [prompts, steps]; texts: id -> decoded text; special_ids: set of end-of-turn / special ids;
    categories [prompts] -> dict kind (KINDS) -> bool [prompts, steps]."""
    decoded = np.vectorize(lambda t: texts[int(t)], otypes=[object])(tokens)
    special = np.isin(tokens, list(special_ids))
    kinds = {"punctuation": np.vectorize(_is_punctuation, otypes=[bool])(decoded) & ~special,
             "digit": np.vectorize(lambda s: any(c.isdigit() for c in s), otypes=[bool])(decoded) & ~special,
             "end_of_turn": special}
    visible = ~special & np.vectorize(lambda s: bool(s.strip()), otypes=[bool])(decoded)
    first = np.zeros_like(special)
    rows = np.flatnonzero(visible.any(axis=1))
    first[rows, visible[rows].argmax(axis=1)] = True
    kinds["first_answer"] = first
    kinds["after_end_of_turn"] = np.cumsum(special, axis=1) - special > 0
    numerical = np.array([NUMERICAL_CATEGORY in str(c) for c in categories])
    kinds["digit_numerical"] = kinds["digit"] & numerical[:, None]
    kinds["other"] = ~np.any([kinds[k] for k in KINDS[:5]], axis=0)
    return {k: kinds[k] for k in KINDS}


def decoded_texts(tokenizer, tokens):
    """id -> decoded text for every id in tokens."""
    return {int(t): tokenizer.decode([int(t)]) for t in np.unique(tokens)}


# ------------------------------------------------------------------------------------------- statistics

def _nanmean(values, axis):
    """np.nanmean without the all-NaN warning (all-NaN slices give NaN)."""
    finite = np.isfinite(values)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(finite, values, 0.0).sum(axis) / finite.sum(axis)


def _shifted(series, offsets):
    """series [prompts, N] circularly shifted per prompt by offsets [n_null, prompts] -> [n_null, prompts, N]."""
    N = series.shape[1]
    index = (np.arange(N)[None, None, :] - offsets[..., None]) % N
    return np.take_along_axis(np.broadcast_to(series, (len(offsets),) + series.shape), index, axis=2)


def _offsets(n_null, prompts, N, seed):
    return np.random.default_rng(seed).integers(1, max(N, 2), size=(n_null, prompts))


def _standardize(values, finite):
    """Centre and scale each unit over its finite entries; non-finite entries become 0 (left out)."""
    v = np.where(finite, values, 0.0)
    n = finite.sum(-1, keepdims=True)
    v = np.where(finite, v - v.sum(-1, keepdims=True) / np.maximum(n, 1), 0.0)
    norm = np.sqrt((v * v).sum(-1, keepdims=True))
    return v / np.where(norm > 0, norm, np.nan)


def step_correlations(values, target, n_null=200, seed=0):
    """Pearson r of each unit's per-step series with a per-step target, against a circular-shift null.
    values [units, prompts, N], target [prompts, N] -> DataFrame [unit, r, null_mean, null_lo, null_hi, p, n]."""
    units, P, N = values.shape
    flat = values.reshape(units, P * N)
    ok = np.isfinite(flat) & np.isfinite(target).reshape(1, -1)
    z = _standardize(flat, ok)
    t = np.where(np.isfinite(target), target, _nanmean(target, axis=None))
    shifted = np.concatenate([t[None], _shifted(t, _offsets(n_null, P, N, seed))]).reshape(n_null + 1, P * N)
    shifted = shifted - shifted.mean(-1, keepdims=True)
    shifted /= np.linalg.norm(shifted, axis=-1, keepdims=True)
    r = np.nan_to_num(z) @ shifted.T                                   # [units, 1 + n_null]
    observed, null = r[:, 0], r[:, 1:]
    p = (1 + (np.abs(null) >= np.abs(observed)[:, None]).sum(1)) / (1 + n_null)
    return pd.DataFrame({"unit": np.arange(units), "r": observed, "null_mean": null.mean(1),
                         "null_lo": np.quantile(null, 0.025, axis=1), "null_hi": np.quantile(null, 0.975, axis=1),
                         "p": p, "n": ok.sum(1)})


def _masked_mean(values, mask):
    """values [P, N], masks [..., P, N] -> mean of values where mask (NaN if empty)."""
    finite = np.isfinite(values)
    m = mask & finite
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.where(m, values, 0.0)).sum((-2, -1)) / m.sum((-2, -1))


def kind_means(values, kinds, n_boot=1000, n_null=200, seed=0):
    """Mean of a per-step series (e.g. head-mean local sts) [prompts, N] at the steps of each kind (dict kind ->
    bool [prompts, N]) -> DataFrame [kind, n_steps, n_prompts, mean, ci_lo, ci_hi, all_steps_mean, null_mean,
    null_lo, null_hi, p]; CI: bootstrap over prompts; null: kind steps circularly shifted within each prompt."""
    rng = np.random.default_rng(seed)
    P, N = values.shape
    boot = rng.integers(0, P, size=(n_boot, P))
    offsets = _offsets(n_null, P, N, seed + 1)
    overall = float(_nanmean(values, axis=None))
    rows = []
    for kind, mask in kinds.items():
        observed = float(_masked_mean(values, mask))
        b = _masked_mean(values[boot], mask[boot])
        null = _masked_mean(values, _shifted(mask, offsets))
        null = null[np.isfinite(null)]
        p = ((1 + (np.abs(null - overall) >= abs(observed - overall)).sum()) / (1 + len(null))
             if np.isfinite(observed) and len(null) else np.nan)
        rows.append({"kind": kind, "n_steps": int(mask.sum()), "n_prompts": int(mask.any(1).sum()),
                     "mean": observed, "ci_lo": np.nanquantile(b, 0.025) if np.isfinite(b).any() else np.nan,
                     "ci_hi": np.nanquantile(b, 0.975) if np.isfinite(b).any() else np.nan,
                     "all_steps_mean": overall,
                     "null_mean": null.mean() if len(null) else np.nan,
                     "null_lo": np.quantile(null, 0.025) if len(null) else np.nan,
                     "null_hi": np.quantile(null, 0.975) if len(null) else np.nan, "p": p})
    return pd.DataFrame(rows)


def step_profile(values, n_boot=1000, seed=0):
    """values [prompts, N] -> DataFrame [step, mean, ci_lo, ci_hi] (bootstrap over prompts)."""
    rng = np.random.default_rng(seed)
    boot = _nanmean(values[rng.integers(0, len(values), size=(n_boot, len(values)))], axis=1)
    return pd.DataFrame({"step": np.arange(values.shape[1]), "mean": _nanmean(values, axis=0),
                         "ci_lo": np.nanquantile(boot, 0.025, axis=0), "ci_hi": np.nanquantile(boot, 0.975, axis=0)})


def layer_means(values, head_layer, n_layers):
    """[heads, prompts, N] -> [layers, prompts, N] mean over each layer's heads (NaN-aware)."""
    out = np.full((n_layers,) + values.shape[1:], np.nan)
    for layer in range(n_layers):
        rows = values[np.asarray(head_layer) == layer]
        if len(rows):
            out[layer] = _nanmean(rows, axis=0)
    return out


# ------------------------------------------------------------------------------------------- one run folder

@dataclass
class LocalTagResult:
    """Local PhiID of one activations file aligned with its tokens. atoms: "sts"/"rtr" -> [heads, prompts, N]
    (N = steps - tau, entry t = transition t -> t + tau); entropy, surprisal [prompts, N] at the future step;
    token_ids [prompts, N] the token read at the future step; kinds: kind -> bool [prompts, N]; layer: atom -> [layers, prompts, N];
    tables: correlations (per head and layer), kinds, profile."""
    tag: str
    atoms: dict
    n_partners: np.ndarray
    entropy: np.ndarray
    surprisal: np.ndarray
    token_ids: np.ndarray
    texts: dict
    kinds: dict
    head_layer: np.ndarray
    head_index: np.ndarray
    n_layers: int
    model: str
    categories: np.ndarray
    greedy_agreement: float
    seconds: float
    layer: dict = field(default_factory=dict)
    tables: dict = field(default_factory=dict)

    def head_mean(self, atom="sts"):
        """[prompts, N] mean over layers of the layer means."""
        return _nanmean(self.layer[atom], axis=0)

    def strip_rows(self, prompt):
        """Layer-mean local sts and rtr of one prompt: {"sts": [N], "rtr": [N]} (nats)."""
        return {atom: self.head_mean(atom)[prompt] for atom in ATOMS}

    def token_text(self, prompt):
        return [self.texts[int(t)] for t in self.token_ids[prompt]]


def _check_tokens(acts, tokenizer, where):
    tokens = acts["tokens"]
    if tokens.shape != (acts["activations"].shape[0], acts["activations"].shape[2]):
        raise ArtifactError(f"{where}: tokens have shape {tokens.shape} but the activations are [prompts, heads, "
                            f"steps] = {acts['activations'].shape}: the file mixes two runs; rerun "
                            f"{NB.EXTRACT}")
    if tokens.min() < 0 or tokens.max() >= len(tokenizer):
        raise ArtifactError(f"{where}: token ids up to {tokens.max()} but the model's tokenizer has {len(tokenizer)} "
                            f"tokens: these tokens come from another model's run; pass the run's model")


def _check_agreement(greedy, where, model):
    agreement = float(greedy.mean())
    if agreement < MIN_GREEDY_AGREEMENT:
        raise ArtifactError(f"{where}: the teacher-forced argmax of {model} reproduces only {agreement:.0%} of the "
                            f"generated tokens (the run's own tokens give ~100%): the tokens come from another "
                            f"run or model; pass the model (and seed, for random_init) that notebook 01 used")
    return agreement


def _load_model(model, tag, dtype, device, seed):
    from lib.model.loading import load_model
    if tag not in ("", "random_init"):
        raise ValueError(f"tag {tag!r}: local synergy is computed for the run's model ('') and its random_init "
                         f"copy only")
    return load_model(model, dtype=dtype, device=device, random_init=tag == "random_init", seed=seed)


def analyse_tag(out_dir, model, tag="", tau=1, redundancy="MMI", mode="per_prompt", n_null=200, n_boot=1000,
                batch_size=8, dtype="float32", device="auto", seed=0, progress=False):
    """Local PhiID of activations[__tag].npz, the teacher-forced pass and every table -> LocalTagResult."""
    t0 = time.perf_counter()
    acts = artifacts.load("activations", out_dir, tag)
    where = artifacts.path("activations", out_dir, tag).name
    net, tokenizer, _ = _load_model(model, tag, dtype, device, seed)
    _check_tokens(acts, tokenizer, where)
    local = phiid_local_head_means(acts["activations"], tau=tau, redundancy=redundancy, mode=mode, atoms=ATOMS,
                                   progress=progress)
    entropy, surprisal, greedy = teacher_forced_steps(net, acts["prompt_input_ids"], acts["prompt_lengths"],
                                                      acts["tokens"], int(acts["pad_token_id"]), batch_size)
    agreement = _check_agreement(greedy, where, model)
    texts = decoded_texts(tokenizer, acts["tokens"])
    kinds = token_kinds(acts["tokens"], texts, set(tokenizer.all_special_ids), acts["prompt_category"])
    read = slice(tau - 1, acts["tokens"].shape[1] - 1)           # token read at the future step t + tau
    res = LocalTagResult(tag, local.atoms, local.n_partners, entropy[:, tau:], surprisal[:, tau:],
                         acts["tokens"][:, read], texts, {k: v[:, read] for k, v in kinds.items()},
                         acts["head_layer"], acts["head_index"], int(acts["n_layers"]), str(acts["model"]),
                         acts["prompt_category"], agreement, 0.0)
    _add_tables(res, n_null, n_boot, seed)
    res.seconds = time.perf_counter() - t0
    return res


def _add_tables(res, n_null, n_boot, seed):
    res.layer = {a: layer_means(res.atoms[a], res.head_layer, res.n_layers) for a in ATOMS}
    frames = []
    for target in ("entropy", "surprisal"):
        y = getattr(res, target)
        for unit, values in (("layer", res.layer["sts"]), ("head", res.atoms["sts"])):
            t = step_correlations(values, y, n_null, seed)
            t.insert(0, "target", target)
            t.insert(0, "unit_kind", unit)
            t["layer"] = t["unit"] if unit == "layer" else np.asarray(res.head_layer)[t["unit"]]
            frames.append(t)
    res.tables["correlations"] = pd.concat(frames, ignore_index=True)
    kind_frames = []
    for atom in ATOMS:
        t = kind_means(res.head_mean(atom), res.kinds, n_boot, n_null, seed)
        t.insert(0, "atom", atom)
        kind_frames.append(t)
    res.tables["kinds"] = pd.concat(kind_frames, ignore_index=True)
    res.tables["profile"] = pd.concat({a: step_profile(res.head_mean(a), n_boot, seed) for a in ATOMS},
                                      names=["atom"]).reset_index(level=0).reset_index(drop=True)


def correlation_summary(res):
    """Per target: the head-mean-over-layers view: layer rows of the correlation table (r, null band, p)."""
    t = res.tables["correlations"]
    return t[t["unit_kind"] == "layer"].pivot(index="layer", columns="target", values=["r", "null_lo", "null_hi", "p"])


def _arrays(res, tau, redundancy, mode):
    kinds = np.stack([res.kinds[k] for k in KINDS])
    return {"sts": res.atoms["sts"], "rtr": res.atoms["rtr"], "n_partners": res.n_partners,
            "head_layer": np.asarray(res.head_layer, np.int64), "head_index": np.asarray(res.head_index, np.int64),
            "entropy": res.entropy, "surprisal": res.surprisal, "token_ids": np.asarray(res.token_ids, np.int64),
            "kinds": kinds, "kind_names": np.array(KINDS), "tau": np.int64(tau), "redundancy": np.str_(redundancy),
            "mode": np.str_(mode), "model": np.str_(res.model), "greedy_agreement": np.float64(res.greedy_agreement),
            "seconds": np.float64(res.seconds)}


def _summary(res):
    corr = res.tables["correlations"]
    return {"model": res.model, "greedy_agreement": res.greedy_agreement, "seconds": round(res.seconds, 3),
            "n_prompts": int(res.entropy.shape[0]), "n_transitions": int(res.entropy.shape[1]),
            "layer_correlations": corr[corr["unit_kind"] == "layer"].to_dict(orient="records"),
            "head_correlations_significant": {
                t: int(((g["p"] < 0.05) & (g["unit_kind"] == "head")).sum()) for t, g in corr.groupby("target")},
            "kinds": res.tables["kinds"].to_dict(orient="records")}


def run_local(out_dir, model, tags=("", "random_init"), tau=1, redundancy="MMI", mode="per_prompt", n_null=200,
              n_boot=1000, batch_size=8, dtype="float32", device="auto", seed=0, progress=False):
    """Notebook 11: every tag present among `tags` (missing baselines are skipped, the run's own file is
    required), then local_phiid[__tag].npz and local_summary.json (written only after every tag succeeded)
    and a manifest entry. -> dict tag -> LocalTagResult."""
    from lib.storage.store import update_manifest
    present = set(artifacts.tags("activations", out_dir))
    chosen = [t for t in tags if t in present or t == ""]
    results = {t: analyse_tag(out_dir, model, t, tau, redundancy, mode, n_null, n_boot, batch_size, dtype, device,
                              seed, progress) for t in chosen}
    for tag, res in results.items():
        artifacts.save("local_phiid", out_dir, _arrays(res, tau, redundancy, mode), tag=tag)
    summary = {"tau": tau, "redundancy": redundancy, "mode": mode, "n_null": n_null, "n_boot": n_boot,
               "kinds": list(KINDS), "tags": {t or "trained": _summary(r) for t, r in results.items()}}
    artifacts.save("local_summary", out_dir, summary)
    update_manifest(out_dir, NOTEBOOK, {"tau": tau, "redundancy": redundancy, "mode": mode, "tags": chosen,
                                        "files": [artifacts.path("local_phiid", out_dir, t).name for t in chosen]
                                        + ["local_summary.json"]})
    return results


def load_local(out_dir, tag=""):
    """local_phiid[__tag].npz -> dict of arrays (see lib.storage.artifacts)."""
    return artifacts.load("local_phiid", out_dir, tag)
