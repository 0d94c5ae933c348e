"""Oracle head ordering: each head's MEASURED importance by attribution patching (a positive control for C5 / C6).

For prompt q the clean greedy tokens x_1..x_T of notebook 01 are teacher-forced (input prompt + x_1..x_{T-1}, the
T predicting positions are the last T positions, as in lib.experiments.ablation), and

    L_q = -(1/T) sum_t log p(x_t | prompt, x_<t)                          [nats/token]

z_{h,i} is head h's slice of the attention output projection's INPUT at position i (the lib.model.heads hook point,
the same tensor the ablation zeroes), g_{h,i} = dL_q / dz_{h,i}. One forward and one backward per prompt batch
give, for every head (sum over the real, unpadded positions i of the sequence; prompts averaged):

    score[h]  = mean_q sum_i | g_{h,i} . z_{h,i} |    (the oracle: ordering key, higher = more important)
    signed[h] = mean_q sum_i  -g_{h,i} . z_{h,i}      (first-order estimate of the change in L when head h is
                                                       zeroed at every position)

-g_{h,i} . z_{h,i} is the first-order estimate of the NLL change when head h is zeroed at position i alone
(L(z - z_{h,i}) - L(z) ~ -g . z); `score` adds the magnitudes of these per-position effects, so effects of
opposite sign at different positions do not cancel. The test checks both against finite differences of L when
the slice is scaled by (1 - eps) (the directional derivative along -z).

Prompts: `select_oracle_rows` takes the LAST k prompts of every category of activations.npz, and notebook 05
(lib.experiments.ablation.load_inputs) leaves the oracle's prompts out of its own selection when the oracle is one of its
variants, so the oracle is never scored on the prompts it was computed from.

    res = compute_oracle(model, arch, run, n_prompts=24)     # run: lib.experiments.extract.ActivationRun
    res.save(out_dir)                                        # oracle.npz (lib.storage.artifacts)
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from lib.storage import artifacts
from lib.experiments.extract import left_pad
from lib.model.hooks import hooks
from lib.model.architectures import ArchInfo
from lib.storage.store import ArtifactError
from lib.storage.notebooks import NB

__all__ = ["select_oracle_rows", "sequences", "compute_oracle", "run_oracle", "load_oracle", "summary"]


@dataclass
class OracleResult:
    score: np.ndarray          # float64 [heads]: mean over prompts of sum_i |g . z|
    signed: np.ndarray         # float64 [heads]: mean over prompts of sum_i -g . z
    per_prompt: np.ndarray     # float64 [prompts, heads]: sum_i |g . z| of each prompt
    nll: np.ndarray            # float64 [prompts]: L_q, nats/token
    prompt_ids: np.ndarray     # int64 [prompts]: ids (in the paper's 60) of the prompts used
    rows: np.ndarray           # int64 [prompts]: their rows in activations.npz
    head_layer: np.ndarray
    head_index: np.ndarray
    model: str
    extraction_key: str
    seconds: float

    def arrays(self) -> dict:
        return dict(score=self.score, signed=self.signed, per_prompt=self.per_prompt, nll=self.nll,
                    prompt_ids=self.prompt_ids, rows=self.rows, head_layer=self.head_layer,
                    head_index=self.head_index, model=self.model, extraction_key=self.extraction_key,
                    seconds=float(self.seconds))

    def save(self, out_dir):
        return artifacts.save("oracle", out_dir, self.arrays())


def select_oracle_rows(category: np.ndarray, n_prompts: int) -> list[int]:
    """The last n prompts spread over the categories (mirror of lib.experiments.ablation.select_prompt_rows, which takes the
    first ones): per category the last k rows, earlier categories taking the remainder. -> sorted rows."""
    category = np.asarray(category)
    if isinstance(n_prompts, bool) or not isinstance(n_prompts, (int, np.integer)) or not 1 <= n_prompts <= len(category):
        raise ValueError(f"oracle_prompts must be an integer in [1, {len(category)}] (prompts of activations.npz "
                         f"used for the oracle's gradients); got {n_prompts!r}")
    cats = list(dict.fromkeys(category.tolist()))
    base, extra = divmod(int(n_prompts), len(cats))
    picked = []
    for k, c in enumerate(cats):
        rows = np.flatnonzero(category == c).tolist()
        want = base + (1 if k < extra else 0)
        picked += rows[len(rows) - want:] if want else []
    if len(picked) < n_prompts:                       # a short category: fill from the end of the others
        picked += [r for r in range(len(category) - 1, -1, -1) if r not in picked][:n_prompts - len(picked)]
    return sorted(picked)


def sequences(run, rows) -> tuple[list[list[int]], int]:
    """Teacher-forced inputs prompt + x_1..x_{T-1} of the given rows of an ActivationRun -> (sequences, T)."""
    ids, lengths, tokens = run.prompt_input_ids, run.prompt_lengths, run.tokens
    seqs = [np.concatenate([ids[r, ids.shape[1] - lengths[r]:], tokens[r, :-1]]).tolist() for r in rows]
    return seqs, int(tokens.shape[1])


def batch_attribution(model, arch: ArchInfo, seqs: list[list[int]], targets: torch.Tensor, pad_id: int):
    """One forward + backward of a batch. targets int64 [batch, T]. -> (abs [batch, heads], signed [batch, heads],
    nll [batch]): sum over real positions of |g . z| and of -g . z per head, and L of each row."""
    device = next(model.parameters()).device
    ids, attn = (t.to(device) for t in left_pad(seqs, pad_id))
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    T, n_heads, d = targets.shape[1], arch.n_heads, arch.head_dim
    acts, deltas = [], []

    def tap(layer, z):                                # z [batch, pos, n_heads * head_dim]
        delta = torch.zeros_like(z, requires_grad=True)
        acts.append(z.detach())
        deltas.append(delta)
        return z + delta

    frozen = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(False)
        with torch.enable_grad(), hooks(arch, {"head_out": tap}):
            hidden = arch.base_model()(input_ids=ids, attention_mask=attn, position_ids=pos,
                                       use_cache=False).last_hidden_state[:, -T:]
            logits = arch.logits_from_normed(hidden)
            logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
            logp = logits.log_softmax(-1).gather(-1, targets.to(device)[..., None])[..., 0]      # [batch, T]
            nll = -logp.mean(-1)                                                                # [batch]
            grads = torch.autograd.grad(nll.sum(), deltas)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    real = attn.to(acts[0].dtype)[:, :, None]                                                    # [batch, pos, 1]
    gz = [(g * z).unflatten(-1, (n_heads, d)).sum(-1) * real for g, z in zip(grads, acts)]       # [batch, pos, n_heads]
    gz = torch.cat(gz, dim=-1).double()                                                          # [batch, pos, heads]
    return gz.abs().sum(1).cpu().numpy(), (-gz).sum(1).cpu().numpy(), nll.detach().double().cpu().numpy()


def compute_oracle(model, arch: ArchInfo, run, n_prompts: int = 24, batch_size: int = 8,
                   extraction_key: str = "", progress: bool = True) -> OracleResult:
    """Attribution-patching importance of every head on the last n_prompts prompts of each category of `run`
    (lib.experiments.extract.ActivationRun of the run's model); see the module docstring for the formula."""
    from tqdm.auto import tqdm
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"oracle_batch_size must be a positive integer (prompts per forward + backward); "
                         f"got {batch_size!r}")
    if len(run.head_layer) != arch.total_heads:
        raise ArtifactError(f"the activations have {len(run.head_layer)} heads but the model has "
                            f"{arch.total_heads}: they come from another model; rerun 01 with one model")
    category = np.array([p.category for p in run.prompts])
    rows = select_oracle_rows(category, n_prompts)
    seqs, T = sequences(run, rows)
    t0 = time.perf_counter()
    parts = []
    for s in tqdm(range(0, len(rows), batch_size), desc="oracle gradients", unit="batch", disable=not progress):
        targets = torch.as_tensor(run.tokens[rows[s:s + batch_size]], dtype=torch.long)
        parts.append(batch_attribution(model, arch, seqs[s:s + batch_size], targets, run.pad_token_id))
    per_prompt, signed, nll = (np.concatenate(a) for a in zip(*parts))
    return OracleResult(score=per_prompt.mean(0), signed=signed.mean(0), per_prompt=per_prompt, nll=nll,
                        prompt_ids=np.array([run.prompts[r].prompt_id for r in rows], dtype=np.int64),
                        rows=np.array(rows, dtype=np.int64), head_layer=np.asarray(run.head_layer),
                        head_index=np.asarray(run.head_index), model=run.model, extraction_key=extraction_key,
                        seconds=time.perf_counter() - t0)


def run_oracle(out_dir, model, arch: ArchInfo, run, enabled: bool = True, n_prompts: int = 24,
               batch_size: int = 8) -> OracleResult | None:
    """Notebook 01: compute and save oracle.npz for the run's model, or (enabled False, or a network-free spec
    whose model is None) remove a stale one so that notebook 04 does not pick up an oracle of an earlier run.
    -> the result, or None."""
    path = artifacts.path("oracle", out_dir)
    if not enabled or model is None:
        path.unlink(missing_ok=True)
        return None
    key = artifacts.load("activations", out_dir, keys=["extraction_key"]).get("extraction_key", "")
    result = compute_oracle(model, arch, run, n_prompts, batch_size, extraction_key=str(key))
    result.save(out_dir)
    return result


def load_oracle(out_dir, head_layer, head_index, extraction_key: str | None = None) -> dict | None:
    """oracle.npz of a run folder checked against the run's head map (and extraction key when both have one), or
    None when the run has none (01 ran with oracle: false, or a random-init / baseline tag, which never has one)."""
    path = artifacts.path("oracle", out_dir)
    if not path.exists():
        return None
    d = artifacts.load_file("oracle", path)
    if not (np.array_equal(d["head_layer"], head_layer) and np.array_equal(d["head_index"], head_index)):
        raise ArtifactError(f"{path} has another head map than the run's activations: it comes from another model; "
                            f"rerun {NB.EXTRACT} (python -m lib.run --params <run>.yaml --only "
                            f"{NB.EXTRACT} --force)")
    theirs = str(d["extraction_key"])
    if extraction_key and theirs and theirs != str(extraction_key):
        raise ArtifactError(f"{path} was computed from another extraction (key {theirs}) than activations.npz "
                            f"({extraction_key}): rerun {NB.EXTRACT}")
    return d


def summary(result: OracleResult, top: int = 10):
    """Table of the `top` most important heads: layer.head, score, signed estimate, share of the total score."""
    import pandas as pd
    order = np.argsort(-result.score, kind="stable")[:top]
    return pd.DataFrame({"head": [f"{result.head_layer[h]}.{result.head_index[h]}" for h in order],
                         "score": result.score[order], "signed_dnll": result.signed[order],
                         "share": result.score[order] / result.score.sum()})
