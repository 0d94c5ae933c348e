"""The ablation engine: heads removed one at a time, cumulatively, KL divergence of the next-token
distribution against the intact model per prompt and fraction, batched over prompts."""
from __future__ import annotations

import numpy as np
import torch

from lib.experiments.extract import left_pad
from lib.model.heads import HeadHooks
from lib.model.hooks import patched_weights
from lib.model.architectures import ArchInfo
from lib.experiments.ablation.plan import AblationInputs, AblationPlan

__all__ = ["DivergenceEngine", "removal_masks", "perturbed_heads"]


# ----------------------------------------------------------------------------- computation

class DivergenceEngine:
    """Teacher-forced divergence on the T predicting positions for (head mask, prompt) rows.

    Only the base model runs on all positions; the unembedding (in float32) runs on the T predicting positions,
    `logit_rows` rows at a time, so no [rows, positions, vocab] tensor of a whole forward batch exists.

    Without final-logit soft-capping the logits are affine in the final hidden state, z = W h + b, so
        KL_t = sum_v p_c (log p_c - log p_a) = u_c . (h_c - h_a) + S_c (lse_a - lse_c),
    with u_c = W^T p_c, S_c = sum_v p_c (1 up to rounding) and lse = logsumexp(z) (accumulated in float64 from a
    float32 exp-sum): the clean cache is [T, hidden] per prompt and each ablated position costs its logits and one
    logsumexp ("linear" method). With soft-capping the clean p and log p [T, vocab] are cached and
    KL_t = sum_v p_c (log p_c - log p_a) directly ("direct" method). Rows are ordered by prompt length so each
    forward pads little; the clean rows go through exactly the same path (an all-ones mask), so identical rows give
    bitwise identical numbers and the divergence of an unablated model is exactly 0.
    """

    def __init__(self, model, arch: ArchInfo, inputs: AblationInputs, batch_size: int = 32,
                 logit_rows: int | None = None, logit_chunk_mb: float = 32.0, method: str = "auto"):
        self.model, self.arch, self.inputs = model, arch, inputs
        self.device = next(model.parameters()).device
        self.T = inputs.n_tokens
        self.V = arch.vocab_size
        self.batch_size = batch_size
        self.logit_rows = logit_rows or max(1, int(logit_chunk_mb * 2 ** 20 // (self.T * self.V * 4)))
        self.seqs = [np.concatenate([p, t[:-1]]) for p, t in zip(inputs.prompts, inputs.tokens)]
        self.base = arch.base_model()
        self.W = arch.unembedding_float32()[0]                                        # [vocab, hidden] float32
        self.softcap = arch.final_logit_softcap
        if method == "auto":
            method = "direct" if self.softcap else "linear"
        if method not in ("linear", "direct") or (method == "linear" and self.softcap):
            raise ValueError(f"method must be 'auto', 'direct' or (without logit soft-capping) 'linear'; got {method!r}")
        self.method = method

    def ones(self, n: int = 1) -> torch.Tensor:
        return torch.ones(n, self.arch.total_heads, device=self.device)

    def clean_bytes_per_prompt(self) -> int:
        return 2 * self.T * self.V * 4 if self.method == "direct" else 2 * self.T * self.arch.hidden_size * 8

    def _rows(self, prompts: list[int], n_masks: int) -> list[tuple[int, int]]:
        rows = [(m, p) for m in range(n_masks) for p in prompts]
        return sorted(rows, key=lambda r: len(self.seqs[r[1]]))          # stable: ties keep (mask, prompt) order

    @torch.inference_mode()
    def hidden_chunks(self, prompts: list[int], masks: torch.Tensor):
        """Yield (rows [(mask i, prompt p)], final-normed hidden float32 [len(rows), T, hidden]) for all
        mask x prompt rows; `logit_rows` rows at a time."""
        rows = self._rows(prompts, len(masks))
        masks = masks.to(self.device)
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start:start + self.batch_size]
            ids, attn = left_pad([self.seqs[p].tolist() for _, p in batch], self.inputs.pad_token_id)
            ids, attn = ids.to(self.device), attn.to(self.device)
            pos = (attn.cumsum(-1) - 1).clamp(min=0)
            with HeadHooks(self.arch, mask=masks[[m for m, _ in batch]]):
                hidden = self.base(input_ids=ids, attention_mask=attn, position_ids=pos,
                                   use_cache=False).last_hidden_state[:, -self.T:]
            for s in range(0, len(batch), self.logit_rows):
                yield batch[s:s + self.logit_rows], hidden[s:s + self.logit_rows].float()

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """float32 logits [.., vocab] from final-normed hidden states (ArchInfo.logits_from_normed in float32)."""
        return self.arch.logits_from_normed(h, float32=True)

    @staticmethod
    def _exp_lse(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """In place: z -> exp(z - max); returns (that, logsumexp(z) in float64)."""
        m = z.amax(-1, keepdim=True)
        e = z.sub_(m).exp_()
        return e, m[..., 0].double() + e.sum(-1).double().log()

    @torch.inference_mode()
    def clean(self, prompts: list[int]) -> dict:
        """Cache of the unablated model for these prompts (compute once per prompt chunk)."""
        k = {p: i for i, p in enumerate(prompts)}
        if self.method == "linear":
            shape = (len(prompts), self.T)
            out = {"h": torch.empty(*shape, self.arch.hidden_size, dtype=torch.float64, device=self.device),
                   "u": torch.empty(*shape, self.arch.hidden_size, dtype=torch.float64, device=self.device),
                   "S": torch.empty(shape, dtype=torch.float64, device=self.device),
                   "lse": torch.empty(shape, dtype=torch.float64, device=self.device)}
            for batch, h in self.hidden_chunks(prompts, self.ones()):
                e, lse = self._exp_lse(self.logits(h))
                p = e.div_(e.sum(-1, keepdim=True))
                idx = [k[pp] for _, pp in batch]
                out["h"][idx], out["lse"][idx] = h.double(), lse
                out["S"][idx], out["u"][idx] = p.sum(-1, dtype=torch.float64), (p @ self.W).double()
            return out
        logp = torch.empty(len(prompts), self.T, self.V, dtype=torch.float32, device=self.device)
        for batch, h in self.hidden_chunks(prompts, self.ones()):
            z = self.logits(h)
            logp[[k[pp] for _, pp in batch]] = z - torch.logsumexp(z, -1, keepdim=True)
        return {"logp": logp, "p": logp.exp()}

    @torch.inference_mode()
    def divergence(self, prompts: list[int], masks: torch.Tensor, clean: dict) -> np.ndarray:
        """float64 [len(masks), len(prompts)]: mean over the T positions of KL(clean || masked), nats."""
        k = {p: i for i, p in enumerate(prompts)}
        out = np.full((len(masks), len(prompts)), np.nan)
        for batch, h in self.hidden_chunks(prompts, masks):
            idx = [k[p] for _, p in batch]
            z = self.logits(h)
            if self.method == "linear":
                _, lse = self._exp_lse(z)
                dh = clean["h"][idx] - h.double()
                kl = (clean["u"][idx] * dh).sum(-1) + clean["S"][idx] * (lse - clean["lse"][idx])
            else:
                z -= torch.logsumexp(z, -1, keepdim=True)
                kl = torch.linalg.vecdot(clean["p"][idx], torch.sub(clean["logp"][idx], z, out=z)).double()
            kl = kl.mean(-1).cpu().numpy()
            for r, (m, p) in enumerate(batch):
                out[m, k[p]] = kl[r]
        return out


def removal_masks(plan: AblationPlan, group: list[int], point: int, device="cpu") -> tuple[torch.Tensor, list[int]]:
    """Distinct head masks of the orderings in `group` at `point` -> (masks [m, heads], mask index per ordering)."""
    n = int(plan.n_removed[point])
    keys, index = {}, []
    for o in group:
        key = tuple(sorted(plan.orderings[o].order[:n]))
        index.append(keys.setdefault(key, len(keys)))
    masks = torch.ones(len(keys), plan.total_heads, device=device)
    for key, m in keys.items():
        if key:
            masks[m, list(key)] = 0.0
    return masks, index


def _noise_seed(seed: int, head: int, part: int) -> int:
    return int(np.random.SeedSequence([seed, head, part]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _head_noise(seed: int, head: int, part: int, shape, sigma: float) -> torch.Tensor:
    """N(0, sigma^2) float32 noise of one weight slice, fixed by (seed, head, part)."""
    gen = torch.Generator().manual_seed(_noise_seed(seed, head, part))
    return torch.randn(shape, generator=gen, dtype=torch.float32) * sigma


def perturbed_heads(arch: ArchInfo, heads, sigma: float, seed: int):
    """Context: add N(0, sigma^2) noise to the Q rows and O columns of `heads` (noise fixed by (seed, head));
    the exact original weights are restored on exit (lib.model.hooks.patched_weights)."""
    patches = []
    for h in heads:
        slices = arch.head_weight_slices(*divmod(int(h), arch.n_heads))
        for part, key in enumerate(("q", "o")):
            add = lambda w, h=int(h), part=part: w + _head_noise(seed, h, part, w.shape, sigma).to(w.device, w.dtype)
            patches.append((slices[key], add))
    return patched_weights(patches)


def zeroed_heads(arch: ArchInfo, heads):
    """Context: the output-projection columns of `heads` set to zero (the heads removed at the weights, no hook);
    restored bit-exactly on exit."""
    return patched_weights([(arch.head_weight_slices(*divmod(int(h), arch.n_heads))["o"], torch.zeros_like)
                            for h in heads])
