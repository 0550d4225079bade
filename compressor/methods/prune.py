"""Pruning: Wanda (Sun et al., 2023, arXiv:2306.11695) and SparseGPT (Frantar & Alistarh, 2023,
arXiv:2301.00774), unstructured or N:M (2:4) — the compressors EoRA compensates in its paper.

Both zero weights of ``W`` (m, n) and emit a dense linear of the original class holding the zeros
(stored densely; ``eora`` can then add a low-rank path to it).

- **Wanda**: score ``|W_ij| · ‖X_j‖₂`` (``‖X_j‖²`` = Σ_t x_tj², the ``sq_norm`` statistic); each output row
  drops its ``sparsity · n`` lowest-scoring weights (unstructured), or, in every run of M consecutive input
  weights, its M − N lowest (N:M). Remaining weights are unchanged.
- **SparseGPT**: the GPTQ loop (``quantize.inverse_hessian_factor`` of ``H = 2·XᵀX/N``, damped) with
  "round to zero" for the pruned weights: for column j, ``e_j = (w_j − p_j) / U_jj`` with ``p_j`` = w_j with
  its pruned entries zeroed, and ``w_{j+1:} −= e_j · U_{j, j+1:}`` updates the weights not yet visited.
  The mask comes from ``w² / U_jj²`` (OBS saliency): unstructured, per block of ``block_size`` columns
  the lowest ``sparsity`` fraction of the block (the paper's adaptive mask selection); N:M, per row the
  M − N lowest of each group of M columns, chosen when the loop reaches the group.

```yaml
steps:
  - method: prune
    config: {algorithm: sparsegpt, pattern: "2:4"}
```
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..config.configs import field
from ..contract import LayerContext, LinearCompressor, Outcome, Target
from ..kernels.hessian import hessian_in, inverse_hessian_factor
from ..kernels.one_thread import serial
from ..model.modules import dense_module
from ..stats.accumulators import Request, inputs


@dataclass
class PruneConfig:
    algorithm: Literal["wanda", "sparsegpt"] = field("sparsegpt",
                                                     "wanda (|W|·‖X‖ scores) or sparsegpt (OBS updates)")
    pattern: str = field("2:4", "N:M (keep N of every M consecutive input weights, e.g. 2:4) or unstructured")
    sparsity: float = field(0.5, "fraction of weights removed, for pattern: unstructured")
    damp: float = field(0.01, "SparseGPT: damping λ = damp · mean(diag H)")
    block_size: int = field(128, "SparseGPT: columns per lazy-update block (and per mask-selection block)")

    def __post_init__(self) -> None:
        if self.pattern != "unstructured":
            try:
                keep, group = (int(v) for v in self.pattern.split(":"))
            except ValueError:
                raise ValueError(f"pattern must be 'unstructured' or N:M such as 2:4; "
                                 f"got {self.pattern!r}") from None
            if not 0 < keep < group:
                raise ValueError(f"pattern {self.pattern}: need 0 < N < M")
        if not 0 <= self.sparsity < 1:
            raise ValueError(f"sparsity must be in [0, 1); got {self.sparsity}")
        if not 0 <= self.damp < 1:
            raise ValueError(f"damp must be in [0, 1); got {self.damp}")
        if self.n_m is not None and self.block_size % self.n_m[1]:
            raise ValueError(f"block_size {self.block_size} must be a multiple of M = {self.n_m[1]}")

    @property
    def n_m(self) -> tuple[int, int] | None:
        """(N kept, M group) or None for unstructured."""
        if self.pattern == "unstructured":
            return None
        keep, group = self.pattern.split(":")
        return int(keep), int(group)


def lowest_in_groups(scores: Tensor, keep: int, group: int) -> Tensor:
    """Mask (m, n), True where a weight is pruned: the ``group − keep`` lowest scores of every run of
    ``group`` consecutive columns (a short last run prunes the same fraction, rounded down)."""
    m, n = scores.shape
    mask = torch.zeros(m, n, dtype=torch.bool, device=scores.device)
    for start in range(0, n, group):
        block = scores[:, start:start + group]
        drop = block.shape[1] * (group - keep) // group
        if drop:
            lowest = torch.topk(block, drop, dim=1, largest=False).indices
            mask[:, start:start + group].scatter_(1, lowest, True)
    return mask


def wanda_mask(weight: Tensor, sq_norm: Tensor, n_m: tuple[int, int] | None, sparsity: float) -> Tensor:
    """Mask (m, n) of the weights Wanda prunes; ``sq_norm`` (n,) = Σ_t x_tj²."""
    scores = weight.abs() * sq_norm.to(weight.device, torch.float32).sqrt()[None, :]
    if n_m is not None:
        return lowest_in_groups(scores, *n_m)
    drop = int(weight.shape[1] * sparsity)
    mask = torch.zeros_like(weight, dtype=torch.bool)
    if drop:
        mask.scatter_(1, torch.topk(scores, drop, dim=1, largest=False).indices, True)
    return mask


def sparsegpt(weight: Tensor, h_inv_upper: Tensor, dead: Tensor, n_m: tuple[int, int] | None, sparsity: float,
              block_size: int = 128) -> Tensor:
    """SparseGPT of ``weight`` (m, n) → the pruned and updated weight (m, n), fp32."""
    with serial(weight.numel()):  # a matrix of small-model width on one thread from start to end (see gptq)
        return _sparsegpt(weight, h_inv_upper, dead, n_m, sparsity, block_size)


def _sparsegpt(weight: Tensor, h_inv_upper: Tensor, dead: Tensor, n_m: tuple[int, int] | None, sparsity: float,
               block_size: int) -> Tensor:
    m, n = weight.shape
    w = weight.float().clone()
    w[:, dead] = 0
    diag = torch.diagonal(h_inv_upper)  # (n,)
    for start in range(0, n, block_size):
        end = min(start + block_size, n)
        block = w[:, start:end].clone()  # (m, b)
        errors = torch.zeros_like(block)
        h_block = h_inv_upper[start:end, start:end]
        saliency = block.square() / diag[start:end].square()[None, :]
        if n_m is None:
            drop = int(saliency.numel() * sparsity)
            mask = torch.zeros_like(block, dtype=torch.bool)
            if drop:
                mask.view(-1)[torch.topk(saliency.view(-1), drop, largest=False).indices] = True
        else:
            mask = torch.zeros_like(block, dtype=torch.bool)
        with serial():  # thousands of small operations: threads would wait on each other at every one
            for i in range(end - start):
                if n_m is not None and i % n_m[1] == 0:  # a group starts here: chosen on the updated weights
                    group = slice(i, i + n_m[1])
                    current = block[:, group].square() / diag[start:end][group].square()[None, :]
                    mask[:, group] = lowest_in_groups(current, *n_m)
                column = block[:, i]
                pruned = column.masked_fill(mask[:, i], 0.0)
                error = (column - pruned) / h_block[i, i]
                block[:, i:] -= error[:, None] * h_block[i, i:][None, :]
                block[:, i] = pruned
                errors[:, i] = error
        w[:, start:end] = block
        with serial(m * (n - end)):  # the trailing columns' update: threaded where it is large
            w[:, end:] -= errors @ h_inv_upper[start:end, end:]
    return w


class Prune(LinearCompressor):
    name = "prune"
    Config = PruneConfig
    summary = "pruning to N:M (2:4) or unstructured sparsity: wanda | sparsegpt (kept dense, zeros stored)"
    paper = "arXiv:2301.00774"

    def requests(self) -> tuple[Request, ...]:
        return inputs("sq_norm") if self.config.algorithm == "wanda" else inputs("gram")

    def _factor(self, target: Target) -> tuple[Tensor, Tensor]:
        """(H⁻¹ factor, dead channels), shared by the linears reading the same input."""
        with hessian_in(target.stats.gram.to(target.weight.device), target.stats.n_tokens) as h:  # scratch
            return inverse_hessian_factor(h, self.config.damp, overwrite=True)

    def compress_linear(self, target: Target, ctx: LayerContext) -> Outcome:
        cfg = self.config
        if cfg.algorithm == "wanda":
            mask = wanda_mask(target.weight, target.stats.sq_norm, cfg.n_m, cfg.sparsity)
            pruned = target.weight.masked_fill(mask, 0.0)
        else:
            pruned = sparsegpt(target.weight, *ctx.per_input(self, target, self._factor), cfg.n_m, cfg.sparsity,
                               cfg.block_size)
        module = dense_module(pruned.to(ctx.dtype), target.bias, target.dense_class)
        zeros = float((pruned == 0).float().mean())
        return Outcome(module, note=f"{zeros:.1%} zeros", extra={"sparsity": round(zeros, 4)})
