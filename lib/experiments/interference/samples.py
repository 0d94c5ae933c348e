"""Task samples for QK-OV interference: from the extraction run (prompts + clean continuations), generated here,
or from texts / files. Each sample has a stable id, a prompt (context only) and a scored continuation."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from lib.storage import artifacts
from lib.model.architectures import ArchInfo
from lib.model.prompts import CATEGORIES, all_prompts
from lib.storage.store import ArtifactError
from lib.storage.notebooks import NB

__all__ = ["SOURCES", "MIN_SAMPLES_FOR_FISHER", "TEXT_SEPARATOR", "Sample", "TaskSamples",
           "samples_from_activations", "samples_from_generation", "sample_from_text", "samples_from_texts",
           "samples_from_file", "load_task_samples"]

SOURCES = ("auto", "activations", "generate", "texts")
MIN_SAMPLES_FOR_FISHER = 10
TEXT_SEPARATOR = "|||"


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


_SAMPLE_KEYS = ["tokens", "prompt_input_ids", "prompt_lengths", "prompt_ids", "prompt_category", "prompt_text", "model"]


def _activations_problem(path: Path, arch: ArchInfo, task_a: str, task_b: str, need_a: int, need_b: int,
                         max_samples: int) -> str | None:
    """Why the activations file cannot serve as the sample source (None when it can)."""
    if not path.exists():
        return f"{path} does not exist (run {NB.EXTRACT} first, or use generated/text samples)"
    try:
        data = artifacts.load_file("activations", path, keys=_SAMPLE_KEYS)
    except ArtifactError as e:
        return f"{path} cannot serve ({e})"
    made_by = str(data["model"])
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
    data = artifacts.load_file("activations", path, keys=_SAMPLE_KEYS)
    made_by = str(data["model"]) if "model" in data else ""
    if model_source and made_by and made_by != model_source:
        raise ArtifactError(f"{path} was produced by model {made_by!r} but this run uses {model_source!r}: rerun "
                            f"{NB.EXTRACT} with this model, or use sample_source='generate'")
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
    continuation has the same length. Sample id = "prompt-<index in the paper's 60>", as from the activations file.
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
    - "activations": the prompts of categories task_a/task_b in the run's activations file (notebook 01) with their clean
      continuations; a clear error when the file is missing, from another model, or has fewer than
      min_samples_for_fisher task-A prompts. Zero task-B prompts give an empty task B (a warning later).
    - "generate": the paper's prompts of the two categories with n_new_tokens greedy tokens generated now.
    - "auto": texts when any were given; else the activations file when it can serve (>= min_samples_for_fisher task-A
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
    path = artifacts.path("activations", out_dir)
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
            raise ValueError(f"cannot take the samples from activations: {problem}. Fix: rerun {NB.EXTRACT} "
                             f"with more prompts per category, lower min_samples_for_fisher, or use "
                             f"sample_source='generate' or 'texts'")
        log(f"[interference] NOTE: {problem}; generating {n_new_tokens}-token greedy continuations of the paper's "
            f"prompts of both categories instead")
    a = samples_from_generation(model, tokenizer, task_a, n_new_tokens, chat_template, max_samples)
    b = samples_from_generation(model, tokenizer, task_b, n_new_tokens, chat_template, max_samples)
    log(f"[interference] generated samples: {len(a)} for A ({task_a!r}), {len(b)} for B ({task_b!r})")
    return a, b

