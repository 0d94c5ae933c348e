"""The per-head hook: the "head_out" site (input of every attention output projection), through lib.model.hooks.

The input of a layer's output projection is the attention heads' outputs concatenated,
[batch, positions, n_heads * head_dim], head h occupying columns h*head_dim : (h+1)*head_dim; for head h that slice
is softmax(Q_h K_h^T / sqrt(d) + mask) V_h (with K/V shared across query heads under grouped-query attention).
The same hook therefore
  (a) records each head's L2 norm at the newest position (capture; hook point "attn_out.input"), and
  (b) scales heads per batch row by a mask [batch, total_heads] (1 = keep, 0 = remove), so capture and ablation
      are one mechanism and one batch can carry many different ablations.

    with HeadHooks(arch, record=True) as hooks:
        model(input_ids)
        head_norms = hooks.pop_norms()          # [batch, total_heads]

Heads are indexed layer-major: idx = layer * n_heads + head (ArchInfo.head_map()).
"""
from __future__ import annotations

import torch

from lib.model.hooks import hooks
from lib.model.architectures import ArchInfo

__all__ = ["HeadHooks", "head_mask"]


class HeadHooks:
    """Context manager installing the per-head hook (site "head_out" of lib.model.hooks) on every layer; always removes
    it on exit.

    record: store the L2 norm of every head at the last position of each forward pass.
    mask:   None, or a tensor [batch, total_heads] multiplying each head's output (set or change it any time
            with `hooks.mask = ...`; it must match the batch of the next forward pass).
    """

    def __init__(self, arch: ArchInfo, record: bool = False, mask: torch.Tensor | None = None):
        self.arch = arch
        self.record = record
        self.mask = mask
        self._context = None
        self._norms: list[torch.Tensor] = []     # per layer of the current forward: [batch, n_heads]
        self._steps: list[torch.Tensor] = []     # finished forwards: [batch, total_heads]

    def __enter__(self) -> "HeadHooks":
        self._context = hooks(self.arch, {"head_out": self._hook})
        self._context.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        context, self._context = self._context, None
        context.__exit__(*exc)

    def _hook(self, layer: int, z: torch.Tensor) -> torch.Tensor | None:
        """z: [batch, pos, n_heads * head_dim] -> the masked heads (or None when there is no mask)."""
        n_heads, head_dim = self.arch.n_heads, self.arch.head_dim
        if self.mask is not None:
            scale = self.mask[:, layer * n_heads:(layer + 1) * n_heads].to(z.dtype)    # [batch, n_heads]
            if scale.shape[0] != z.shape[0]:
                raise ValueError(f"head mask has {scale.shape[0]} rows but the batch has {z.shape[0]}")
            z = (z.unflatten(-1, (n_heads, head_dim)) * scale[:, None, :, None]).flatten(-2)
        if self.record:
            last = z[:, -1].unflatten(-1, (n_heads, head_dim))       # [batch, n_heads, head_dim]
            self._norms.append(torch.linalg.vector_norm(last.float(), dim=-1))
            if layer == self.arch.n_layers - 1:
                self._steps.append(torch.cat(self._norms, dim=1))
                self._norms = []
        return z if self.mask is not None else None

    def pop_norms(self) -> torch.Tensor:
        """Head norms of the forward passes since the last call: [batch, total_heads] for one pass,
        [batch, total_heads, passes] for several (stacked on the last axis), on the model's device."""
        if not self._steps:
            raise RuntimeError("no forward pass recorded (record=True and a forward inside the context are needed)")
        steps, self._steps = self._steps, []
        return steps[0] if len(steps) == 1 else torch.stack(steps, dim=-1)


def head_mask(n_rows: int, total_heads: int, removed: list[list[int]] | None = None,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """Mask [n_rows, total_heads] of ones with zeros at `removed[row]` head indices."""
    mask = torch.ones(n_rows, total_heads, device=device)
    for row, heads in enumerate(removed or []):
        if len(heads):
            mask[row, torch.as_tensor(heads, dtype=torch.long)] = 0.0
    return mask
