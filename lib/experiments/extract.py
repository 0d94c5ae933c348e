"""Per-head activations during greedy generation.

For every prompt the model generates exactly `n_tokens` tokens greedily (no stop at EOS: equal-length series),
batched with left padding, an explicit attention mask and position ids, and a KV cache. At every step the head
hook (lib.model.heads) records each head's L2 norm at the newest position; step t is the forward pass that produced
generated token t (step 0 is the prompt pass).
"""
from __future__ import annotations

import time

import numpy as np
import torch
from tqdm.auto import tqdm

from lib.storage import artifacts
from lib.model.heads import HeadHooks
from lib.model.architectures import ArchInfo
from lib.experiments.activation_run import ActivationRun  # noqa: F401  (re-exported: lib.experiments.extract.ActivationRun)
from lib.model.prompts import Prompt, end_of_turn_ids

__all__ = ["encode_prompts", "left_pad", "generate_batch", "extract_activations", "compare_batched",
           "extraction_key", "extract_to_file", "extract_baselines", "load_run", "generated_texts",
           "layer_statistics", "batched_vs_single"]


def encode_prompts(tokenizer, texts: list[str], chat_template: bool) -> list[list[int]]:
    """Token ids of each prompt, with the tokenizer's chat template (user turn + assistant header) when asked."""
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat_template=True but this tokenizer has no chat template; set chat_template: false")
        return [list(tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                                   tokenize=True, return_dict=False)) for t in texts]
    return [tokenizer(t, add_special_tokens=True).input_ids for t in texts]


def left_pad(sequences: list[list[int]], pad_id: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> input_ids [batch, width] left-padded, attention_mask [batch, width] (1 = real token); width defaults
    to the longest sequence."""
    width = max(len(s) for s in sequences) if width is None else width
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.as_tensor(seq)
        mask[row, width - len(seq):] = 1
    return ids, mask


@torch.inference_mode()
def generate_batch(model, arch: ArchInfo, prompt_ids: list[list[int]], n_tokens: int, pad_id: int,
                   record: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Greedy generation of exactly n_tokens for each prompt of one batch.

    Returns tokens [batch, n_tokens] and head norms [batch, total_heads, n_tokens] (None when record=False).
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    input_ids, attention_mask = (t.to(device) for t in left_pad(prompt_ids, pad_id))
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    generated = []
    cache = DynamicCache(config=model.config)                               # filled in place by every forward
    with HeadHooks(arch, record=record) as hooks:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    cache=cache, use_cache=True, logits_to_keep=1)
        for step in range(n_tokens):
            next_token = out.logits[:, -1].argmax(-1)                      # [batch]
            generated.append(next_token)
            if step == n_tokens - 1:
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(prompt_ids), 1)], dim=1)
            position_ids = position_ids[:, -1:] + 1
            out = model(input_ids=next_token[:, None], attention_mask=attention_mask, position_ids=position_ids,
                        cache=cache, use_cache=True, logits_to_keep=1)
        norms = hooks.pop_norms() if record else None
    if norms is not None and norms.ndim == 2:                               # n_tokens == 1
        norms = norms[..., None]
    return torch.stack(generated, dim=1), norms


def extract_activations(model, tokenizer, arch: ArchInfo, prompts: list[Prompt], n_tokens: int = 100,
                        batch_size: int = 60, chat_template: bool = False, progress: bool = True) -> ActivationRun:
    """Generate `n_tokens` greedily for every prompt and record every head's output norm at every step."""
    if not prompts:
        raise ValueError("empty prompt list: select at least one prompt (n_prompts >= 1)")
    if not isinstance(n_tokens, int) or n_tokens <= 0:
        raise ValueError(f"n_tokens must be a positive integer (got {n_tokens!r}); the paper uses 100")
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer (got {batch_size!r}); e.g. 60 on CPU, 8-64 on a GPU")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = encode_prompts(tokenizer, [p.text for p in prompts], chat_template)
    tokens, norms = [], []
    t0 = time.perf_counter()
    batches = range(0, len(prompts), batch_size)
    for start in tqdm(batches, desc=f"generate {n_tokens} tokens", unit="batch", disable=not progress):
        batch_tokens, batch_norms = generate_batch(model, arch, encoded[start:start + batch_size], n_tokens, pad_id)
        tokens.append(batch_tokens.cpu())
        norms.append(batch_norms.cpu())
    seconds = time.perf_counter() - t0
    prompt_input_ids, _ = left_pad(encoded, pad_id)
    head_layer, head_index = arch.head_map()
    return ActivationRun(
        activations=torch.cat(norms).numpy().astype(np.float32), tokens=torch.cat(tokens).numpy().astype(np.int64),
        prompt_input_ids=prompt_input_ids.numpy(), prompt_lengths=np.array([len(e) for e in encoded]),
        prompts=list(prompts), head_layer=np.array(head_layer), head_index=np.array(head_index),
        n_layers=arch.n_layers, n_heads=arch.n_heads, n_kv_heads=arch.n_kv_heads, pad_token_id=int(pad_id),
        model=arch.source, chat_template=bool(chat_template), seconds=seconds,
        end_of_turn_ids=end_of_turn_ids(tokenizer))


def compare_batched(batched: ActivationRun, single: ActivationRun) -> list[dict]:
    """Per prompt: do batched and one-at-a-time generation give the same tokens, and where do they first differ?"""
    rows = []
    for i, prompt in enumerate(batched.prompts):
        same = batched.tokens[i] == single.tokens[i]
        first = int(np.argmin(same)) if not same.all() else None
        rows.append({"prompt_id": prompt.prompt_id, "category": prompt.category, "same_tokens": bool(same.all()),
                     "first_difference_step": first,
                     "max_abs_norm_diff_before_divergence": float(np.abs(
                         batched.activations[i, :, :first or None] - single.activations[i, :, :first or None]).max())})
    return rows


def top2_margins(model, arch: ArchInfo, run: ActivationRun) -> np.ndarray:
    """Logit gap between the best and second-best token at every generated step, teacher-forced on the run's
    tokens, one prompt at a time: [prompts, steps]. Small gaps are where batching noise can flip a greedy choice."""
    device = next(model.parameters()).device
    margins = []
    with torch.inference_mode():
        for i in range(len(run.prompts)):
            prompt = run.prompt_input_ids[i, -run.prompt_lengths[i]:]
            ids = torch.as_tensor(np.concatenate([prompt, run.tokens[i, :-1]]), device=device)[None]
            logits = model(input_ids=ids).logits[0, len(prompt) - 1:].float()
            top = logits.topk(2, dim=-1).values
            margins.append((top[:, 0] - top[:, 1]).cpu().numpy())
    return np.stack(margins)


# ----------------------------------------------------------------------------- notebook 01 entry point

def extraction_key(model: str, weights_id: str, prompts: list[Prompt], n_tokens: int, chat_template: bool,
                   dtype: str, random_init: bool, seed: int, revision: str | None) -> str:
    """Hash of everything that defines an extraction's result (batch size does not, beyond float rounding)."""
    import hashlib
    import json
    return hashlib.sha256(json.dumps([model, weights_id, [p.prompt_id for p in prompts], n_tokens, chat_template,
                                      dtype, random_init, seed, revision]).encode()).hexdigest()[:12]


def extract_to_file(out_dir, model: str, n_prompts: int = 60, n_tokens: int = 100, batch_size: int = 60,
                    chat_template: bool = True, random_init: bool = False, seed: int = 0, dtype: str = "float32",
                    device: str = "auto", revision: str | None = None, tag: str = "", progress: bool = True):
    """Load the model, generate, and write the activations file (lib.storage.artifacts "activations", baseline `tag`)
    atomically, with a manifest section; resumes from finished batches.

    Batches are checkpointed (lib.storage.artifacts "extract_checkpoint", key = hash of everything that defines the
    result), so a killed extraction continues where it stopped; an activations file that already holds the same
    extraction is reused. Returns (ActivationRun, ArchInfo, tokenizer, model).

    Network-free specs (synthetic:..., file:...; lib.experiments.synthetic) write their activations without a model and
    return (ActivationRun, lib.experiments.synthetic.NoNetwork, None, None)."""
    from lib.model.loading import load_model
    from lib.model.prompts import select_prompts
    from lib.storage.store import ensure_writable_dir
    from lib.experiments.synthetic import is_network_free, write_run

    for name, value in (("n_tokens", n_tokens), ("batch_size", batch_size), ("n_prompts", n_prompts)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer (got {value!r})")
    if is_network_free(model):
        return write_run(out_dir, model, n_prompts, n_tokens, seed=seed, random_init=random_init, tag=tag)
    prompts = select_prompts(n_prompts)
    out_dir = ensure_writable_dir(out_dir)
    model_obj, tokenizer, arch = load_model(model, dtype=dtype, device=device, revision=revision,
                                            random_init=random_init, seed=seed)
    key = extraction_key(model, arch.weights_id, prompts, n_tokens, chat_template, dtype, random_init, seed, revision)
    reused = _reuse_existing(out_dir, tag, key, prompts)
    if reused is not None:
        return reused, arch, tokenizer, model_obj
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = encode_prompts(tokenizer, [p.text for p in prompts], chat_template)
    t0 = time.perf_counter()
    tokens, norms = _generate_resumable(model_obj, arch, encoded, n_tokens, pad_id, batch_size, out_dir, key,
                                        f"generate {n_tokens} tokens ({tag or 'model'})", progress)
    head_layer, head_index = arch.head_map()
    prompt_input_ids, _ = left_pad(encoded, pad_id)
    run = ActivationRun(
        activations=np.concatenate(norms).astype(np.float32), tokens=np.concatenate(tokens).astype(np.int64),
        prompt_input_ids=prompt_input_ids.numpy(), prompt_lengths=np.array([len(e) for e in encoded]),
        prompts=prompts, head_layer=np.array(head_layer), head_index=np.array(head_index), n_layers=arch.n_layers,
        n_heads=arch.n_heads, n_kv_heads=arch.n_kv_heads, pad_token_id=int(pad_id), model=model,
        chat_template=bool(chat_template), seconds=time.perf_counter() - t0,
        end_of_turn_ids=end_of_turn_ids(tokenizer))
    run.save(out_dir, tag, key, {
        "model": model, "revision": revision, "random_init": random_init, "seed": seed, "dtype": dtype,
        "device": str(next(model_obj.parameters()).device), "weights_id": arch.weights_id,
        "n_prompts": len(prompts), "n_tokens": n_tokens, "batch_size": batch_size, "chat_template": chat_template})
    _remove_checkpoints(out_dir, key)
    return run, arch, tokenizer, model_obj


def _reuse_existing(out_dir, tag: str, key: str, prompts: list[Prompt]) -> ActivationRun | None:
    """The run stored in the activations file when it holds exactly this extraction (same key), else None."""
    existing = artifacts.path("activations", out_dir, tag)
    if not existing.exists():
        return None
    if str(artifacts.load_file("activations", existing, keys=["extraction_key"]).get("extraction_key", "")) != key:
        return None
    print(f"[extract] {existing.name} already holds this extraction (key {key}); reusing it")
    return _run_from_arrays(artifacts.load_file("activations", existing), prompts)


def _generate_resumable(model_obj, arch: ArchInfo, encoded: list[list[int]], n_tokens: int, pad_id: int,
                        batch_size: int, out_dir, key: str, desc: str, progress: bool):
    """Generate every batch, or read it from its checkpoint. -> (tokens, norms): lists of per-batch arrays
    [batch, steps] and [batch, heads, steps]."""
    tokens, norms = [], []
    for start in tqdm(range(0, len(encoded), batch_size), desc=desc, unit="batch", disable=not progress):
        where = dict(key=key, start=start, batch_size=batch_size)
        if artifacts.path("extract_checkpoint", out_dir, **where).exists():
            saved = artifacts.load("extract_checkpoint", out_dir, **where)
            batch_tokens, batch_norms = saved["tokens"], saved["norms"]
        else:
            t_batch, n_batch = generate_batch(model_obj, arch, encoded[start:start + batch_size], n_tokens, pad_id)
            batch_tokens, batch_norms = t_batch.cpu().numpy(), n_batch.cpu().float().numpy()
            artifacts.save("extract_checkpoint", out_dir, dict(tokens=batch_tokens, norms=batch_norms), **where)
        tokens.append(batch_tokens)
        norms.append(batch_norms)
    return tokens, norms


def _remove_checkpoints(out_dir, key: str) -> None:
    """Delete the finished extraction's checkpoint folder (and the checkpoints folder when it is left empty)."""
    import shutil
    ckpt_dir = artifacts.path("extract_checkpoint", out_dir, key=key, start=0, batch_size=1).parent
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    if ckpt_dir.parent.exists() and not any(ckpt_dir.parent.iterdir()):
        ckpt_dir.parent.rmdir()


def extract_baselines(out_dir, model: str, baseline_random_init: bool = True, revisions=(), random_init: bool = False,
                      **settings) -> dict[str, ActivationRun]:
    """Notebook 01's baselines, each extracted like the run's model (extract_to_file, same settings) into its own
    activations file: the randomly re-initialised copy (tag random_init) when baseline_random_init, and every
    training checkpoint in `revisions` (tag rev-<revision>). -> {tag: ActivationRun}, in that order.
    Network-free specs: lib.experiments.synthetic.baseline_plan (planted-core: its no-core twin as random_init)."""
    from lib.storage.artifacts import RANDOM_INIT, revision_tag
    from lib.experiments.synthetic import baseline_plan, is_network_free
    if is_network_free(model):
        pairs, note = baseline_plan(model, baseline_random_init, revisions)
        if note:
            print(f"[extract] {note}")
        plan = [(tag, init, None) for tag, init in pairs]
    else:
        plan = ([(RANDOM_INIT, True, None)] if baseline_random_init else []) + \
            [(revision_tag(r), random_init, r) for r in revisions]
    runs = {}
    for tag, init, revision in plan:
        runs[tag], *_ = extract_to_file(out_dir, model, random_init=init, revision=revision, tag=tag, **settings)
    return runs


def _run_from_arrays(saved: dict, prompts: list[Prompt]) -> ActivationRun:
    return ActivationRun(
        activations=saved["activations"], tokens=saved["tokens"], prompt_input_ids=saved["prompt_input_ids"],
        prompt_lengths=saved["prompt_lengths"], prompts=prompts, head_layer=saved["head_layer"],
        head_index=saved["head_index"], n_layers=int(saved["n_layers"]), n_heads=int(saved["n_heads"]),
        n_kv_heads=int(saved["n_kv_heads"]), pad_token_id=int(saved["pad_token_id"]), model=str(saved["model"]),
        chat_template=bool(saved["chat_template"]), seconds=float(saved["seconds"]),
        end_of_turn_ids=saved.get("end_of_turn_ids"))


def load_run(out_dir, tag: str = "") -> ActivationRun:
    """The ActivationRun stored in a run folder's activations file (tag "" or a baseline tag)."""
    saved = artifacts.load("activations", out_dir, tag)
    prompts = [Prompt(int(i), str(c), str(t))
               for i, c, t in zip(saved["prompt_ids"], saved["prompt_category"], saved["prompt_text"])]
    return _run_from_arrays(saved, prompts)


def generated_texts(run: ActivationRun, tokenizer, max_chars: int = 160):
    """A table of prompts and their generated continuations (pandas DataFrame); without a tokenizer (network-free
    specs) the token ids."""
    import pandas as pd
    decode = (lambda ids: tokenizer.decode(ids, skip_special_tokens=False)) if tokenizer is not None else \
        (lambda ids: "token ids " + " ".join(map(str, ids)))
    rows = [{"prompt_id": p.prompt_id, "category": p.category, "prompt": p.text,
             "generated": decode(run.tokens[i])[:max_chars]}
            for i, p in enumerate(run.prompts)]
    return pd.DataFrame(rows)


def layer_statistics(activations: np.ndarray, head_layer: np.ndarray):
    """Per-layer statistics of head norms (pandas DataFrame). activations: [prompts, heads, steps]."""
    import pandas as pd
    rows = []
    for layer in np.unique(head_layer):
        values = activations[:, head_layer == layer]
        rows.append({"layer": int(layer), "mean_norm": values.mean(), "sd_norm": values.std(),
                     "min_norm": values.min(), "max_norm": values.max(),
                     "mean_sd_over_steps": values.std(axis=-1).mean()})
    return pd.DataFrame(rows)


def batched_vs_single(run: ActivationRun, model, tokenizer, arch: ArchInfo, n_prompts: int):
    """Regenerate the first `n_prompts` prompts one at a time and compare with the batched run (DataFrame).

    Where the tokens differ, the table gives the first differing step and the top-1 vs top-2 logit gap there
    (teacher-forced on the batched tokens): padding changes float rounding (different matmul shapes and masked
    positions), which flips a greedy choice only where two candidates are nearly tied.
    Without a model (network-free specs) there is nothing to regenerate: an empty table.
    """
    import pandas as pd
    if model is None:
        print(f"{run.model}: no network, nothing to regenerate one prompt at a time (check skipped)")
        return pd.DataFrame()
    subset = ActivationRun(**{**run.__dict__, "activations": run.activations[:n_prompts],
                              "tokens": run.tokens[:n_prompts], "prompts": run.prompts[:n_prompts],
                              "prompt_input_ids": run.prompt_input_ids[:n_prompts],
                              "prompt_lengths": run.prompt_lengths[:n_prompts]})
    single = extract_activations(model, tokenizer, arch, subset.prompts, n_tokens=run.tokens.shape[1],
                                 batch_size=1, chat_template=run.chat_template, progress=False)
    rows = compare_batched(subset, single)
    margins = top2_margins(model, arch, subset)
    for row, margin in zip(rows, margins):
        step = row["first_difference_step"]
        row["logit_gap_at_difference"] = float(margin[step]) if step is not None else None
        row["smallest_logit_gap"] = float(margin.min())
    return pd.DataFrame(rows)
