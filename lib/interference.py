"""QK-OV interference: how much a sample of task A stresses the attention parameters a sample of task B would update.

For layer l, query/KV head h and block B in {Q, K, V, O} (the head's slice of that projection weight):

    M^B_{ij,l,h} = sum_{k in slice} C_{i,k} / (F_k + eps) * |g_{j,k}|

g_i: per-sample gradient of task-A sample i; C_i = g_i**2 (elementwise); F = mean over task-A samples of C_i (the
diagonal empirical Fisher of task A); g_j: per-sample gradient of task-B sample j. Diagonal, asymmetric (M_ij != M_ji),
magnitude-weighted. The per-sample loss is the mean next-token negative log-likelihood over the sample's
continuation tokens; the prompt tokens are context only. Gradients are taken of the attention projection weights
only (no biases), per sample, and are held and reduced in float32 whatever the model dtype.

Regularisation: the denominator is max(F_k, eps) + ridge. With ridge = 0 the factor C_i / F is invariant to a
rescaling of the parameterisation (it is at most n_A for a task-A sample and task-A Fisher: no blow-up); eps only
turns 0/0 (parameters no task-A sample moves) into 0. ridge > 0 damps directions with tiny Fisher (useful for the
`signed` and `symmetric` variants, whose g_i / F factor is unbounded) at the price of that invariance.

Variants (all computed with the same slices, all pairs at once, one matrix product per block-head):
    magnitude  C_i / F_A        @ |g_j|       the score above ("stress")
    signed     g_i / F_A        @  g_j        > 0 synergy (same direction), < 0 conflict
    symmetric  |g_i| / F_A      @ |g_j|       = sum sqrt(C_i C_j) / F_A
    pooled     C_i / F_pool     @ |g_j|       F_pool = (F_A + F_B) / 2

Slices come from ArchInfo.block_param_slices: Q by query head, K and V by KV head (reported per KV head, never
copied to the query heads that share it under grouped-query attention), O by query head (columns).

    A, B = load_task_samples(model, tokenizer, arch, out_dir="outputs/dev", task_a=..., task_b=...)
    result = compute_interference(model, arch, A, B, min_samples_for_fisher=10)
    result.save(out_dir)   # interference.npz, top_conflicts.csv, interference_summary.csv
"""
from __future__ import annotations

import json
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from lib.models import ArchInfo
from lib.prompts import CATEGORIES, all_prompts
from lib.store import ArtifactError, load_npz, save_csv, save_npz

BLOCKS = ("Q", "K", "V", "O")
KV_BLOCKS = ("K", "V")
VARIANTS = ("magnitude", "signed", "symmetric", "pooled")
METHODS = ("hooks", "vmap", "loop")
SOURCES = ("auto", "activations", "generate", "texts")
MIN_SAMPLES_FOR_FISHER = 10
DEFAULT_EPS = 1e-30
TEXT_SEPARATOR = "|||"
VARIANT_UNITS = {
    "magnitude": "nats per unit weight", "pooled": "nats per unit weight",
    "signed": "dimensionless", "symmetric": "dimensionless",
}


# ----------------------------------------------------------------------------- samples

@dataclass(frozen=True)
class Sample:
    """One sample: the prompt (context only) and the continuation whose tokens are scored."""
    id: str
    prompt_ids: tuple[int, ...]
    continuation_ids: tuple[int, ...]
    text: str = ""

    def __post_init__(self):
        if len(self.prompt_ids) < 1 or len(self.continuation_ids) < 1:
            raise ValueError(f"sample {self.id!r}: needs at least one prompt token and one continuation token "
                             f"(got {len(self.prompt_ids)} and {len(self.continuation_ids)})")


@dataclass
class TaskSamples:
    """A named set of samples with stable ids; `source` says where they came from (kept in the artifacts)."""
    name: str
    samples: list[Sample]
    source: str = ""

    def __post_init__(self):
        ids = [s.id for s in self.samples]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"task {self.name!r}: duplicate sample ids {dupes}; every sample needs its own id")

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def ids(self) -> list[str]:
        return [s.id for s in self.samples]

    def truncated(self, max_continuation_tokens: int) -> "TaskSamples":
        """The same samples scored on their first max_continuation_tokens continuation tokens (0 = all)."""
        if max_continuation_tokens <= 0:
            return self
        samples = [Sample(s.id, s.prompt_ids, s.continuation_ids[:max_continuation_tokens], s.text)
                   for s in self.samples]
        return TaskSamples(self.name, samples, f"{self.source}; first {max_continuation_tokens} continuation tokens")

    def table(self):
        import pandas as pd
        return pd.DataFrame({"task": self.name, "id": self.ids,
                             "prompt_tokens": [len(s.prompt_ids) for s in self.samples],
                             "continuation_tokens": [len(s.continuation_ids) for s in self.samples],
                             "text": [s.text[:80] for s in self.samples]})


def _check_category(category: str) -> None:
    if category not in CATEGORIES:
        raise ValueError(f"unknown task category {category!r}; choose one of {list(CATEGORIES)} "
                         f"(or give text samples with sample_source='texts')")


def _activations_problem(path: Path, arch: ArchInfo, task_a: str, task_b: str, need_a: int, need_b: int,
                         max_samples: int) -> str | None:
    """Why activations.npz cannot serve as the sample source (None when it can)."""
    if not path.exists():
        return f"{path} does not exist (run 01_extract_activations first, or use generated/text samples)"
    with np.load(path, allow_pickle=False) as data:
        keys = set(data.files)
        missing = {"tokens", "prompt_input_ids", "prompt_lengths", "prompt_ids", "prompt_category"} - keys
        if missing:
            return f"{path} lacks {sorted(missing)} (an older writer; rerun 01_extract_activations)"
        made_by = str(data["model"]) if "model" in keys else ""
        categories = [str(c) for c in data["prompt_category"]]
    if made_by and arch.source and made_by != arch.source:
        return f"{path} was produced by model {made_by!r}, but this run uses {arch.source!r}"
    have_a = categories.count(task_a)
    usable_a = min(have_a, max_samples) if max_samples > 0 else have_a
    if usable_a < need_a:
        return (f"{path} holds {have_a} prompt(s) of task A {task_a!r}"
                f"{f' (capped at max_samples={max_samples})' if max_samples > 0 else ''}, fewer than "
                f"min_samples_for_fisher={need_a} needed for the Fisher")
    if categories.count(task_b) < need_b:
        return f"{path} holds no prompt of task B {task_b!r}"
    return None


def samples_from_activations(path: str | Path, category: str, max_samples: int = 0,
                             model_source: str = "") -> TaskSamples:
    """The prompts of `category` in an extraction run with their clean (greedy) continuations.

    Sample id = "prompt-<index in the paper's 60>". The prompt is prompt_input_ids[i, -prompt_lengths[i]:]
    (chat template already applied); the continuation is tokens[i].
    """
    _check_category(category)
    data = load_npz(path, expect={"tokens": 2, "prompt_input_ids": 2, "prompt_lengths": 1, "prompt_ids": 1,
                                  "prompt_category": 1}, produced_by="01_extract_activations")
    made_by = str(data["model"]) if "model" in data else ""
    if model_source and made_by and made_by != model_source:
        raise ArtifactError(f"{path} was produced by model {made_by!r} but this run uses {model_source!r}: rerun "
                            f"01_extract_activations with this model, or use sample_source='generate'")
    rows = [i for i, c in enumerate(data["prompt_category"]) if str(c) == category]
    if max_samples > 0:
        rows = rows[:max_samples]
    texts = data["prompt_text"] if "prompt_text" in data else None
    samples = []
    for i in rows:
        n = int(data["prompt_lengths"][i])
        samples.append(Sample(id=f"prompt-{int(data['prompt_ids'][i])}",
                              prompt_ids=tuple(int(t) for t in data["prompt_input_ids"][i, -n:]),
                              continuation_ids=tuple(int(t) for t in data["tokens"][i]),
                              text=str(texts[i]) if texts is not None else ""))
    return TaskSamples(category, samples, source=f"activations:{path}")


def _prompt_ids(tokenizer, text: str, chat_template: bool) -> list[int]:
    if chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(text)["input_ids"])


@torch.no_grad()
def samples_from_generation(model: nn.Module, tokenizer, category: str, n_new_tokens: int = 32,
                            chat_template: bool = True, max_samples: int = 0, batch_size: int = 8) -> TaskSamples:
    """The paper's prompts of `category` with greedy continuations of exactly n_new_tokens generated now.

    Used when no extraction run can provide them. EOS is suppressed until n_new_tokens (min_new_tokens), so every
    continuation has the same length. Sample id = "prompt-<index in the paper's 60>", as from activations.npz.
    """
    _check_category(category)
    if n_new_tokens < 1:
        raise ValueError(f"n_new_tokens must be >= 1 (got {n_new_tokens})")
    prompts = [p for p in all_prompts() if p.category == category]
    if max_samples > 0:
        prompts = prompts[:max_samples]
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    samples = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        ids = [_prompt_ids(tokenizer, p.text, chat_template) for p in chunk]
        width = max(map(len, ids))
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=n_new_tokens,
                             min_new_tokens=n_new_tokens, do_sample=False, pad_token_id=pad)
        for p, x, row in zip(chunk, ids, out[:, width:].tolist()):
            samples.append(Sample(id=f"prompt-{p.prompt_id}", prompt_ids=tuple(x), continuation_ids=tuple(row),
                                  text=p.text))
    how = "chat template" if chat_template and getattr(tokenizer, "chat_template", None) else "raw prompt"
    return TaskSamples(category, samples, source=f"generated:{n_new_tokens} greedy tokens ({how})")


def sample_from_text(tokenizer, sample_id: str, text: str) -> Sample:
    """"prompt ||| continuation" scores the continuation given the prompt; a text without the separator is
    scored as a whole (every token after the first, language-modelling loss)."""
    if TEXT_SEPARATOR in text:
        prompt, continuation = text.split(TEXT_SEPARATOR, 1)
        p = list(tokenizer(prompt.strip())["input_ids"])
        c = list(tokenizer(" " + continuation.strip(), add_special_tokens=False)["input_ids"])
    else:
        ids = list(tokenizer(text)["input_ids"])
        p, c = ids[:1], ids[1:]
    if not p or not c:
        raise ValueError(f"sample {sample_id!r} ({text[:60]!r}) has too few tokens: it needs a prompt and at least "
                         f"one continuation token (write 'prompt {TEXT_SEPARATOR} continuation' or a longer text)")
    return Sample(sample_id, tuple(p), tuple(c), text=text)


def samples_from_texts(tokenizer, texts: Sequence[str], name: str, id_prefix: str,
                       ids: Sequence[str] | None = None) -> TaskSamples:
    """Text samples (see sample_from_text); id = ids[i] or "<id_prefix>-<i:03d>" (position in the list)."""
    ids = list(ids) if ids is not None else [f"{id_prefix}-{i:03d}" for i in range(len(texts))]
    return TaskSamples(name, [sample_from_text(tokenizer, i, t) for i, t in zip(ids, texts)], source="texts")


def samples_from_file(tokenizer, path: str | Path, name: str = "") -> TaskSamples:
    """A .jsonl file ({"id", "prompt", "continuation"} or {"id", "text"} per line) or a .txt file (one text per
    line, "prompt ||| continuation" or a whole text; id = "<file stem>-<line:03d>")."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"sample file {str(path)!r} does not exist")
    lines = [(n, line) for n, line in enumerate(path.read_text().splitlines()) if line.strip()]
    name = name or path.stem
    if path.suffix == ".jsonl":
        samples = []
        for n, line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n + 1}: not JSON ({e.msg})") from None
            text = (f"{row['prompt']} {TEXT_SEPARATOR} {row['continuation']}" if "prompt" in row
                    else row.get("text", ""))
            samples.append(sample_from_text(tokenizer, str(row.get("id", f"{path.stem}-{n:03d}")), text))
        return TaskSamples(name, samples, source=f"file:{path}")
    return TaskSamples(name, [sample_from_text(tokenizer, f"{path.stem}-{n:03d}", t) for n, t in lines],
                       source=f"file:{path}")


def load_task_samples(model: nn.Module, tokenizer, arch: ArchInfo, *, out_dir: str | Path, task_a: str,
                      task_b: str, source: str = "auto", texts_a: Sequence[str] = (), texts_b: Sequence[str] = (),
                      file_a: str = "", file_b: str = "", max_samples: int = 0, n_new_tokens: int = 32,
                      chat_template: bool = True, min_samples_for_fisher: int = MIN_SAMPLES_FOR_FISHER,
                      max_continuation_tokens: int = 0, log: Callable[[str], None] = print
                      ) -> tuple[TaskSamples, TaskSamples]:
    """The two sample sets, by `source`:

    - "texts": texts_a/texts_b (lists) or file_a/file_b (.jsonl/.txt); task_a/task_b are just labels.
    - "activations": the prompts of categories task_a/task_b in {out_dir}/activations.npz with their clean
      continuations; a clear error when the file is missing, from another model, or has fewer than
      min_samples_for_fisher task-A prompts. Zero task-B prompts give an empty task B (a warning later).
    - "generate": the paper's prompts of the two categories with n_new_tokens greedy tokens generated now.
    - "auto": texts when any were given; else activations.npz when it can serve (>= min_samples_for_fisher task-A
      prompts, >= 1 task-B prompt, same model); else generate, saying why.
    max_samples > 0 caps each task (first prompts in paper order); max_continuation_tokens > 0 scores only the
    first that many continuation tokens of every sample (a time knob for long continuations).
    """
    a, b = _load_task_samples(model, tokenizer, arch, out_dir, task_a, task_b, source, texts_a, texts_b, file_a,
                              file_b, max_samples, n_new_tokens, chat_template, min_samples_for_fisher, log)
    return a.truncated(max_continuation_tokens), b.truncated(max_continuation_tokens)


def _load_task_samples(model, tokenizer, arch, out_dir, task_a, task_b, source, texts_a, texts_b, file_a, file_b,
                       max_samples, n_new_tokens, chat_template, min_samples_for_fisher, log):
    if source not in SOURCES:
        raise ValueError(f"sample_source must be one of {SOURCES} (got {source!r})")
    if min_samples_for_fisher < 1:
        raise ValueError(f"min_samples_for_fisher must be >= 1 (got {min_samples_for_fisher})")
    if 0 < max_samples < min_samples_for_fisher:
        raise ValueError(f"max_samples={max_samples} < min_samples_for_fisher={min_samples_for_fisher}: the task-A "
                         f"Fisher needs at least {min_samples_for_fisher} samples; raise max_samples (0 = all) or "
                         f"lower min_samples_for_fisher")
    given = bool(list(texts_a) or list(texts_b) or file_a or file_b)
    if source == "texts" or (source == "auto" and given):
        def one(texts, file, label, prefix):
            if file and list(texts):
                raise ValueError(f"task {prefix}: give either a text list or a file, not both")
            if file:
                return samples_from_file(tokenizer, file, label)
            return samples_from_texts(tokenizer, list(texts), label, prefix)
        a, b = one(texts_a, file_a, task_a, "A"), one(texts_b, file_b, task_b, "B")
        if max_samples > 0:
            a.samples, b.samples = a.samples[:max_samples], b.samples[:max_samples]
        log(f"[interference] samples from texts: {len(a)} for A ({task_a!r}), {len(b)} for B ({task_b!r})")
        return a, b
    _check_category(task_a)
    _check_category(task_b)
    path = Path(out_dir) / "activations.npz"
    if source in ("auto", "activations"):
        # "activations" accepts an empty task B (empty results, a warning); "auto" then rather generates
        need_b = 1 if source == "auto" else 0
        problem = _activations_problem(path, arch, task_a, task_b, min_samples_for_fisher, need_b, max_samples)
        if problem is None:
            a = samples_from_activations(path, task_a, max_samples, arch.source)
            b = samples_from_activations(path, task_b, max_samples, arch.source)
            log(f"[interference] samples from {path}: {len(a)} for A ({task_a!r}), {len(b)} for B ({task_b!r})")
            return a, b
        if source == "activations":
            raise ValueError(f"cannot take the samples from activations: {problem}. Fix: rerun 01_extract_activations "
                             f"with more prompts per category, lower min_samples_for_fisher, or use "
                             f"sample_source='generate' or 'texts'")
        log(f"[interference] NOTE: {problem}; generating {n_new_tokens}-token greedy continuations of the paper's "
            f"prompts of both categories instead")
    a = samples_from_generation(model, tokenizer, task_a, n_new_tokens, chat_template, max_samples)
    b = samples_from_generation(model, tokenizer, task_b, n_new_tokens, chat_template, max_samples)
    log(f"[interference] generated samples: {len(a)} for A ({task_a!r}), {len(b)} for B ({task_b!r})")
    return a, b


# ----------------------------------------------------------------------------- per-sample gradients

def projection_weights(arch: ArchInfo) -> dict[str, tuple[int, nn.Module]]:
    """Parameter name of every attention projection weight -> (layer, module owning it). Fused tensors appear once."""
    module_names = {id(m): n for n, m in arch.model.named_modules()}
    out: dict[str, tuple[int, nn.Module]] = {}
    for layer in range(arch.n_layers):
        for module in (*arch.qkv_modules(layer), arch.attn_out(layer)):
            out[f"{module_names[id(module)]}.weight"] = (layer, module)
    return out


@contextmanager
def torch_threads(n: int):
    """Run the block with n intra-op CPU threads (n <= 0: leave torch's setting), restoring it afterwards."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def _differentiable(weights: Iterable[torch.Tensor]):
    """requires_grad on exactly these weights for the duration (restored after; no .grad is left behind)."""
    weights = list(weights)
    before = [w.requires_grad for w in weights]
    try:
        for w in weights:
            w.requires_grad_(True)
        yield
    finally:
        for w, flag in zip(weights, before):
            w.requires_grad_(flag)
            w.grad = None


def _batches(samples: Sequence[Sample], batch_size: int, device) -> list[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Length-sorted batches: (sample indices, input_ids [b, T] right-padded, target mask [b, T]).

    Right padding needs no attention mask: the models are causal, so real tokens never see the padding, and the
    padded positions carry no loss. target[b, t] = 1 when token t is a continuation token.
    """
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].prompt_ids) + len(samples[i].continuation_ids))
    out = []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        seqs = [samples[i].prompt_ids + samples[i].continuation_ids for i in idx]
        width = max(map(len, seqs))
        ids = torch.zeros(len(idx), width, dtype=torch.long)
        target = torch.zeros(len(idx), width, dtype=torch.bool)
        for r, (i, seq) in enumerate(zip(idx, seqs)):
            ids[r, :len(seq)] = torch.tensor(seq)
            target[r, len(samples[i].prompt_ids):len(seq)] = True
        out.append((idx, ids.to(device), target.to(device)))
    return out


def continuation_nll(logits: torch.Tensor, input_ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean next-token NLL over the continuation tokens, in float32. logits [b, T, V] -> [b]."""
    rows, cols = target[:, 1:].nonzero(as_tuple=True)          # token cols + 1 is predicted from position cols
    logp = torch.log_softmax(_at_least_float32(logits[rows, cols]), dim=-1)
    nll = -logp.gather(-1, input_ids[rows, cols + 1][:, None])[:, 0]
    total = torch.zeros(input_ids.shape[0], dtype=nll.dtype, device=nll.device).index_add(0, rows, nll)
    return total / target[:, 1:].sum(1).to(nll.dtype)


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


class SampleGradients:
    """Per-sample gradients (float32) of every attention projection weight, for one sample set.

    Stored per batch either as factors (input x and output gradient dy per token; the gradient of sample i is
    sum_t dy_t x_t^T) or dense, whichever is smaller; `layer(l)` materialises [n, *weight.shape] per weight.
    """

    def __init__(self, arch: ArchInfo, ids: Sequence[str], method: str):
        self.arch, self.ids, self.method = arch, list(ids), method
        self.weights = projection_weights(arch)
        self.shapes = {n: tuple(m.weight.shape) for n, (_, m) in self.weights.items()}
        self.losses = np.zeros(len(self.ids), dtype=np.float32)
        # float32 whatever the model dtype (float64 only for a float64 model, used by the tests as exact reference)
        self.dtype = torch.float64 if next(arch.model.parameters()).dtype == torch.float64 else torch.float32
        self.seconds = 0.0
        self._parts: list[tuple[list[int], dict]] = []    # (sample indices, {name: ("dense", g) | ("factors", x, dy)})

    @property
    def n(self) -> int:
        return len(self.ids)

    def names(self, layer: int) -> list[str]:
        return [n for n, (l, _) in self.weights.items() if l == layer]

    def add(self, indices: list[int], entries: dict) -> None:
        self._parts.append((list(indices), entries))

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, e in self._parts for v in e.values() for t in v[1:])

    def full(self, name: str, device=None) -> torch.Tensor:
        """[n, *shape] float32 per-sample gradients of one weight, in sample order."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        out = torch.zeros((self.n, *self.shapes[name]), dtype=self.dtype, device=device)
        for idx, entries in self._parts:
            kind, *data = entries[name]
            if kind == "dense":
                g = data[0]
            elif self.arch.weights_transposed:                  # [in, out]
                g = torch.einsum("bti,bto->bio", data[0].to(device), data[1].to(device))
            else:                                              # nn.Linear [out, in]
                g = torch.einsum("bto,bti->boi", data[1].to(device), data[0].to(device))
            out[torch.as_tensor(idx, device=out.device)] = g.to(device=out.device, dtype=self.dtype)
        return out

    def layer(self, layer: int, device=None) -> dict[str, torch.Tensor]:
        return {n: self.full(n, device) for n in self.names(layer)}


def per_sample_gradients(model: nn.Module, arch: ArchInfo, task: TaskSamples, method: str = "hooks",
                         batch_size: int = 8, progress: bool = False) -> SampleGradients:
    """Per-sample gradients of the per-sample loss w.r.t. every attention projection weight.

    method: "hooks" (one batched forward/backward; forward hooks keep each projection's input x and autograd gives
    the output gradient dy: g_i = sum_t dy_t x_t^T), "vmap" (torch.func: vmap over grad of functional_call) or
    "loop" (one backward pass per sample; the reference).
    """
    if method not in METHODS:
        raise ValueError(f"grad_method must be one of {METHODS} (got {method!r})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    out = SampleGradients(arch, task.ids, method)
    if not len(task):
        return out
    vocab = arch.vocab_size
    bad = [s.id for s in task.samples if max(s.prompt_ids + s.continuation_ids) >= vocab]
    if bad:
        raise ValueError(f"task {task.name!r}: samples {bad[:5]} hold token ids >= the model's vocabulary ({vocab}); "
                         f"they were tokenised for another model")
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    batches = _batches(task.samples, 1 if method == "loop" else batch_size, device)
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc=f"per-sample gradients {task.name[:30]} ({method})", leave=False)
    runner = {"hooks": _grads_hooks, "vmap": _grads_vmap, "loop": _grads_loop}[method]
    runner(model, out, batches)
    out.seconds = time.perf_counter() - t0
    return out


def _grads_hooks(model, out: SampleGradients, batches) -> None:
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name):
        def fn(module, args, output):
            captured[name] = (args[0], output)
        return fn

    # prepend: see the projection's own output even if another forward hook later rewrites it (the gradient then
    # flows through that hook, as it should); forward pre-hooks have already run, so x is the real input
    handles = [m.register_forward_hook(hook(n), prepend=True) for n, (_, m) in out.weights.items()]
    try:
        with _differentiable(m.weight for _, m in out.weights.values()), torch.enable_grad():
            for idx, ids, target in batches:
                captured.clear()
                logits = model(input_ids=ids, use_cache=False).logits
                losses = continuation_nll(logits, ids, target)
                names = list(captured)
                dys = torch.autograd.grad(losses.sum(), [captured[n][1] for n in names], allow_unused=True)
                length = target.shape[1] - target.flip(1).int().argmax(1)          # last continuation token + 1
                valid = (torch.arange(ids.shape[1], device=ids.device)[None] < length[:, None])[..., None]
                xs: dict[int, torch.Tensor] = {}                                   # q/k/v share one input: keep once
                entries = {}
                for name, dy in zip(names, dys):
                    x = captured[name][0]
                    dy = torch.zeros_like(captured[name][1]) if dy is None else dy
                    b, t, d_in = x.shape
                    d_out = dy.shape[-1]
                    if t * (d_in + d_out) < d_in * d_out:
                        if id(x) not in xs:
                            xs[id(x)] = _at_least_float32(x.detach() * valid).cpu()
                        entries[name] = ("factors", xs[id(x)], _at_least_float32(dy * valid).cpu())
                    else:
                        xf, dyf = _at_least_float32(x.detach() * valid), _at_least_float32(dy * valid)
                        g = (torch.einsum("bti,bto->bio", xf, dyf) if out.arch.weights_transposed
                             else torch.einsum("bto,bti->boi", dyf, xf))
                        entries[name] = ("dense", g.cpu())
                missing = set(out.weights) - set(entries)
                if missing:
                    raise RuntimeError(f"the forward pass did not run the projections {sorted(missing)[:3]}")
                out.add(idx, entries)
                out.losses[idx] = losses.detach().cpu().numpy()
                captured.clear()
    finally:
        for h in handles:
            h.remove()


def _grads_loop(model, out: SampleGradients, batches) -> None:
    names = list(out.weights)
    weights = [out.weights[n][1].weight for n in names]
    with _differentiable(weights), torch.enable_grad():
        for idx, ids, target in batches:
            loss = continuation_nll(model(input_ids=ids, use_cache=False).logits, ids, target)
            grads = torch.autograd.grad(loss.sum(), weights)
            out.add(idx, {n: ("dense", _at_least_float32(g.detach())[None].cpu()) for n, g in zip(names, grads)})
            out.losses[idx] = loss.detach().cpu().numpy()


def _grads_vmap(model, out: SampleGradients, batches) -> None:
    from torch.func import functional_call, grad_and_value, vmap

    params = {n: m.weight.detach() for n, (_, m) in out.weights.items()}
    embed = model.get_input_embeddings()

    def loss_fn(p, ids, target):
        embeds = embed(ids[None])           # inputs_embeds: HF's padding check on input_ids cannot run under vmap
        logits = functional_call(model, p, args=(), kwargs={"inputs_embeds": embeds, "use_cache": False}).logits[0]
        logp = torch.log_softmax(_at_least_float32(logits[:-1]), dim=-1)
        nll = -logp.gather(-1, ids[1:, None])[:, 0]
        w = target[1:].to(logp.dtype)
        return (nll * w).sum() / w.sum()

    fn = vmap(grad_and_value(loss_fn), in_dims=(None, 0, 0))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*batching rule.*")       # sdpa falls back to a loop under vmap
        for idx, ids, target in batches:
            grads, losses = fn(params, ids, target)
            out.add(idx, {n: ("dense", _at_least_float32(g.detach()).cpu()) for n, g in grads.items()})
            out.losses[idx] = losses.detach().cpu().numpy()


# ----------------------------------------------------------------------------- scores

def fisher_denominator(fisher: torch.Tensor, eps: float = DEFAULT_EPS, ridge: float = 0.0) -> torch.Tensor:
    """max(F, eps) + ridge, elementwise (float32, or float64 when given float64)."""
    fisher = fisher if fisher.dtype == torch.float64 else fisher.float()
    return fisher.clamp_min(eps) + ridge


def normalised_contributions(g_a: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
    """C_i / (F + eps): the dimensionless share of the Fisher each task-A sample contributes, elementwise."""
    return g_a.square() / denom


def pair_scores(g_a: torch.Tensor, g_b: torch.Tensor, denom: torch.Tensor, variant: str = "magnitude") -> torch.Tensor:
    """All (i, j) scores of one parameter slice as one matrix product. g_a [n_a, K], g_b [n_b, K], denom [K].

    magnitude/pooled: (C_A / denom) @ |G_B|^T; signed: (G_A / denom) @ G_B^T; symmetric: (|G_A| / denom) @ |G_B|^T
    (pass the pooled denominator for "pooled").
    """
    if variant in ("magnitude", "pooled"):
        return (g_a.square() / denom) @ g_b.abs().T
    if variant == "signed":
        return (g_a / denom) @ g_b.T
    if variant == "symmetric":
        return (g_a.abs() / denom) @ g_b.abs().T
    raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")


def check_block_slices(arch: ArchInfo, layer: int, names: dict[int, str]) -> None:
    """Shape assertions for every (block, head) slice of `layer`, and that the head slices of the blocks sharing a
    tensor are disjoint and cover it exactly (what makes per-head scores add up to the whole-tensor score)."""
    coverage: dict[str, torch.Tensor] = {}
    owners: dict[str, list[str]] = {}
    expected_numel = arch.head_dim * arch.hidden_size
    for block, (weight, slicer) in arch.block_param_slices(layer).items():
        name = names.get(id(weight), "?")
        n_h = arch.n_kv_heads if block in KV_BLOCKS else arch.n_heads
        cover = coverage.setdefault(name, torch.zeros(weight.shape, dtype=torch.int16))
        owners.setdefault(name, []).append(block)
        for h in range(n_h):
            part = weight[slicer(h)]
            if part.numel() != expected_numel or arch.head_dim not in part.shape:
                raise AssertionError(f"parameter {name} (layer {layer}, head {h}, block {block}): slice shape "
                                     f"{tuple(part.shape)} of tensor {tuple(weight.shape)} is not head_dim "
                                     f"{arch.head_dim} x hidden {arch.hidden_size}")
            cover[slicer(h)] += 1
    for name, cover in coverage.items():
        if not bool((cover == 1).all()):
            bad = "overlap" if bool((cover > 1).any()) else "leave elements out"
            raise AssertionError(f"parameter {name} (layer {layer}, blocks {'/'.join(owners[name])}): the head "
                                 f"slices {bad} (head_dim {arch.head_dim}, {arch.n_heads} heads, "
                                 f"{arch.n_kv_heads} KV heads, tensor {tuple(cover.shape)})")


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

    def save(self, out_dir: str | Path, top_k: int = 20) -> dict[str, Path]:
        """interference.npz, top_conflicts.csv, interference_summary.csv in out_dir (validated before writing)."""
        arrays = self.to_arrays()
        for key, value in arrays.items():
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                raise ValueError(f"refusing to write interference.npz: {key} holds non-finite values "
                                 f"(raise eps or ridge)")
        top, summary = self.top_pairs(top_k), self.summary()
        out_dir = Path(out_dir)
        return {"npz": save_npz(out_dir / "interference.npz", **arrays),
                "top_conflicts": save_csv(out_dir / "top_conflicts.csv", top),
                "summary": save_csv(out_dir / "interference_summary.csv", summary)}

    @classmethod
    def load(cls, path: str | Path) -> "InterferenceResult":
        path = Path(path)
        if path.is_dir():
            path = path / "interference.npz"
        d = load_npz(path, expect={"ids_a": 1, "ids_b": 1}, produced_by="07_qkov_interference")
        variants = [str(v) for v in d["variants"]]
        return cls(scores={v: {b: d[f"scores__{v}__{b}"] for b in BLOCKS} for v in variants},
                   ids_a=[str(i) for i in d["ids_a"]], ids_b=[str(i) for i in d["ids_b"]],
                   task_a=str(d["task_a"]), task_b=str(d["task_b"]), n_layers=int(d["n_layers"]),
                   n_heads=int(d["n_heads"]), n_kv_heads=int(d["n_kv_heads"]), loss_a=d["loss_a"],
                   loss_b=d["loss_b"], fisher_mass={b: d[f"fisher_mass__{b}"] for b in BLOCKS},
                   eps=float(d["eps"]), ridge=float(d["ridge"]), method=str(d["method"]), model=str(d["model"]),
                   texts_a=[str(t) for t in d["texts_a"]], texts_b=[str(t) for t in d["texts_b"]],
                   source_a=str(d["source_a"]), source_b=str(d["source_b"]))


def _validate(variants, eps, ridge, n_a, min_samples_for_fisher, task_a) -> list[str]:
    variants = list(variants)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ValueError(f"unknown variants {unknown or variants}; choose from {VARIANTS}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0 (got {eps}): F is clamped at eps so that 0/0 becomes 0")
    if not ridge >= 0:
        raise ValueError(f"ridge must be >= 0 (got {ridge})")
    if min_samples_for_fisher < 1:
        raise ValueError(f"min_samples_for_fisher must be >= 1 (got {min_samples_for_fisher})")
    if n_a < min_samples_for_fisher:
        raise ValueError(f"task A {task_a!r} has {n_a} sample(s) but the diagonal Fisher needs at least "
                         f"min_samples_for_fisher={min_samples_for_fisher}: give more task-A samples (more prompts "
                         f"in the extraction, sample_source='generate' or 'texts') or lower min_samples_for_fisher")
    return variants


def interference_from_gradients(arch: ArchInfo, grads_a: SampleGradients, grads_b: SampleGradients, *,
                                variants: Sequence[str] = VARIANTS, eps: float = DEFAULT_EPS, ridge: float = 0.0,
                                min_samples_for_fisher: int = MIN_SAMPLES_FOR_FISHER, task_a: str = "A",
                                task_b: str = "B", progress: bool = False, device=None) -> InterferenceResult:
    """Scores from per-sample gradients: one layer at a time, one matrix product per (block, head, variant)."""
    variants = _validate(variants, eps, ridge, grads_a.n, min_samples_for_fisher, task_a)
    if grads_b.n == 0:
        warnings.warn(f"task B {task_b!r} has no samples: the interference results are empty "
                      f"(shape [n_a, 0, layers, heads])", stacklevel=2)
    t0 = time.perf_counter()
    L, hq, hkv = arch.n_layers, arch.n_heads, arch.n_kv_heads
    n_a, n_b = grads_a.n, grads_b.n
    scores = {v: {b: np.zeros((n_a, n_b, L, hkv if b in KV_BLOCKS else hq), dtype=np.float32) for b in BLOCKS}
              for v in variants}
    fisher_mass = {b: np.zeros((L, hkv if b in KV_BLOCKS else hq), dtype=np.float32) for b in BLOCKS}
    names = {id(m.weight): n for n, (_, m) in grads_a.weights.items()}
    layers = range(L)
    if progress:
        from tqdm.auto import tqdm
        layers = tqdm(layers, desc="interference scores", leave=False)
    checked: set = set()
    # one CPU thread for the scores: thousands of small, memory-bound products and elementwise passes, where thread
    # synchronisation costs more than it gains (SmolLM2, 10 x 10 pairs, shared 2-core machine: 6 s vs 90-136 s)
    with torch_threads(1):
        for layer in layers:
            _layer_scores(arch, layer, grads_a, grads_b, variants, eps, ridge, names, checked, scores, fisher_mass,
                          device)
    return InterferenceResult(
        scores=scores, ids_a=list(grads_a.ids), ids_b=list(grads_b.ids), task_a=task_a, task_b=task_b, n_layers=L,
        n_heads=hq, n_kv_heads=hkv, loss_a=grads_a.losses.copy(), loss_b=grads_b.losses.copy(),
        fisher_mass=fisher_mass, eps=eps, ridge=ridge, method=grads_a.method, model=arch.source,
        seconds={"gradients_a": grads_a.seconds, "gradients_b": grads_b.seconds,
                 "scores": time.perf_counter() - t0})


def _layer_scores(arch, layer, grads_a, grads_b, variants, eps, ridge, names, checked, scores, fisher_mass, device):
    """Fill scores[variant][block][:, :, layer, :] and fisher_mass[block][layer] for one layer."""
    hq, hkv, n_b = arch.n_heads, arch.n_kv_heads, grads_b.n
    slices = arch.block_param_slices(layer)
    shapes = tuple((b, tuple(w.shape)) for b, (w, _) in slices.items())
    if shapes not in checked:                  # the slice checks depend only on the shapes: once per layer kind
        check_block_slices(arch, layer, names)
        checked.add(shapes)
    ga, gb = grads_a.layer(layer, device), grads_b.layer(layer, device)
    # the operands of pair_scores, elementwise over each whole tensor once; then one product per block-head
    left: dict[str, dict[str, torch.Tensor]] = {}
    right: dict[str, dict[str, torch.Tensor]] = {}
    fisher: dict[str, torch.Tensor] = {}
    for name in list(ga):
        g_a, g_b = ga.pop(name), gb.pop(name)
        c_a = g_a.square()
        fisher[name] = c_a.mean(0)
        denom = fisher_denominator(fisher[name], eps, ridge)
        ops = {}
        for v in variants:
            if v == "magnitude":
                ops[v] = c_a / denom
            elif v == "pooled":
                f_pool = (fisher[name] + g_b.square().mean(0)) / 2 if n_b else fisher[name]
                ops[v] = c_a / fisher_denominator(f_pool, eps, ridge)
            elif v == "signed":
                ops[v] = g_a / denom
            else:
                ops[v] = g_a.abs() / denom
        abs_b = g_b.abs()
        left[name] = ops
        right[name] = {v: (g_b if v == "signed" else abs_b) for v in variants}
        del g_a, g_b, c_a
    for block, (weight, slicer) in slices.items():
        name = names[id(weight)]
        for h in range(hkv if block in KV_BLOCKS else hq):
            idx = (slice(None), *slicer(h))
            fisher_mass[block][layer, h] = float(fisher[name][slicer(h)].sum())
            for v in variants:
                a, b = left[name][v][idx].flatten(1), right[name][v][idx].flatten(1)
                if a.shape[1] != arch.head_dim * arch.hidden_size:
                    raise AssertionError(f"parameter {name} (layer {layer}, head {h}, block {block}): per-sample "
                                         f"gradient slice has {a.shape[1]} elements, expected head_dim x hidden")
                scores[v][block][:, :, layer, h] = (a @ b.T).cpu().numpy()
    del ga, gb, left, right


def compute_interference(model: nn.Module, arch: ArchInfo, task_a: TaskSamples, task_b: TaskSamples, *,
                         variants: Sequence[str] = VARIANTS, eps: float = DEFAULT_EPS, ridge: float = 0.0,
                         method: str = "hooks", batch_size: int = 8,
                         min_samples_for_fisher: int = MIN_SAMPLES_FOR_FISHER, num_threads: int = 0,
                         progress: bool = True) -> InterferenceResult:
    """Per-sample gradients of both tasks, then every score (see the module docstring). Inputs are validated
    before any gradient is computed: task A needs at least min_samples_for_fisher samples; an empty task B gives
    a warning and empty results [n_a, 0, layers, heads]. num_threads > 0 sets torch's CPU threads for the
    gradient passes (0: torch's default; on a machine shared with other jobs 1 thread was faster: see the
    benchmark); the scores always use one thread."""
    _validate(variants, eps, ridge, len(task_a), min_samples_for_fisher, task_a.name)
    if method not in METHODS:
        raise ValueError(f"grad_method must be one of {METHODS} (got {method!r})")
    with torch_threads(num_threads):
        grads_a = per_sample_gradients(model, arch, task_a, method, batch_size, progress)
        grads_b = per_sample_gradients(model, arch, task_b, method, batch_size, progress)
    device = next(model.parameters()).device
    result = interference_from_gradients(arch, grads_a, grads_b, variants=variants, eps=eps, ridge=ridge,
                                         min_samples_for_fisher=min_samples_for_fisher, task_a=task_a.name,
                                         task_b=task_b.name, progress=progress, device=device)
    result.texts_a = [s.text for s in task_a.samples]
    result.texts_b = [s.text for s in task_b.samples]
    result.source_a, result.source_b = task_a.source, task_b.source
    return result
