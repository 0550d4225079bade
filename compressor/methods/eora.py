"""EoRA: eigenspace low-rank compensation of a compressed linear (Liu et al., 2024, arXiv:2410.21271).

After an earlier step replaced ``W`` (m, n) by a compressed ``W_c`` (quantized, pruned), EoRA adds a
rank-r path ``B A`` that minimizes the output error on the calibration inputs (docs/methods.md#eora-eora):

    ΔW = W − W_c                                   (fp32 residual, ``Target.original − Target.weight``)
    G = XᵀX = Q Λ Qᵀ                                (eigh in fp64; eigenvalues ≤ λ_max·cutoff dropped:
                                                     truncated pseudo-inverse, GPTQModel's fix)
    U Σ Vᵀ = svd(ΔW · Q Λ^½)
    B = U_r Σ_r^½ (m, r),   A = Σ_r^½ V_rᵀ Λ^-½ Qᵀ (r, n),   y = x W_cᵀ + (x Aᵀ) Bᵀ

This is ``linalg.whitened_svd`` of ΔW with the ``eigh`` whitening. ``rank`` is the rank of the module's one
low-rank path: when the earlier step already left a path of rank k (``quantize`` with ``preserve_rank``, SRR's
preserve-then-quantize), EoRA fits the remaining r − k ranks to ``W − W_c − L_k`` and appends them to that
path (one adapter of rank r, the bytes of EoRA at rank r). ``space: weight`` is the plain-SVD
baseline (best rank-r approximation of ΔW itself, data-free). The Gram is a plain sum over the
calibration tokens, not the reference code's fixed-denominator running average (docs/methods.md#eora-eora).
The result is a ``CompensatedLinear`` (the compressed module as ``base``, the factors as ``lora``),
exportable as a PEFT LoRA adapter with ``lora_A = A``, ``lora_B = B``, ``lora_alpha = r``.

```yaml
statistics: once            # the Gram of the original layer, shared with the quantizer (one pass)
steps:
  - method: quantize
    config: {algorithm: gptq, bits: 4, group_size: 128}
  - method: eora
    config: {rank: 64, space: eigen}
```
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..config.configs import field
from ..contract import LayerContext, LinearCompressor, Outcome, Target
from ..errors import CompressorError
from ..kernels import linalg
from ..model.modules import CompensatedLinear, LowRankLinear
from ..stats.accumulators import Request, inputs


@dataclass
class EoRAConfig:
    rank: int = field(64, "rank r of the compensation path B (m, r) @ A (r, n)")
    space: Literal["eigen", "weight"] = field(
        "eigen", "eigen: EoRA, SVD of ΔW in the eigenspace of the input Gram; weight: plain SVD of ΔW "
        "(the baseline)")
    cutoff: float | None = field(None, "eigen: eigenvalues ≤ λ_max·cutoff are dropped (default n·eps_fp32)")
    svd_dtype: Literal["float64", "float32"] = field("float64", "precision of the SVD")

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be ≥ 1; got {self.rank}")
        if self.cutoff is not None and not 0 <= self.cutoff < 1:
            raise ValueError(f"cutoff must be in [0, 1); got {self.cutoff}")

    def validate(self, shapes: dict[str, tuple[int, int]]) -> None:
        for name, (m, n) in shapes.items():
            if self.rank > min(m, n):
                raise ValueError(f"rank {self.rank} is larger than min(m, n) = {min(m, n)} of {name} ({m}×{n})")


def eora_factors(residual: Tensor, rank: int, gram: Tensor | None, cutoff: float | None = None,
                 svd_dtype: torch.dtype = torch.float64,
                 whitening: linalg.Whitening | None = None) -> tuple[Tensor, Tensor]:
    """(B (m, r), A (r, n)) minimizing ‖(ΔW − B A) Xᵀ‖_F (``gram`` = XᵀX),
    or ‖ΔW − B A‖_F if ``gram`` is None. ``whitening``: ``linalg.eigh(gram, cutoff)`` already computed."""
    if whitening is None:
        whitening = linalg.eigh(gram, cutoff) if gram is not None else linalg.identity()
    up, down, _ = linalg.whitened_svd(residual.float(), rank, whitening, svd_dtype)
    return up, down


class EoRA(LinearCompressor):
    name = "eora"
    Config = EoRAConfig
    summary = "low-rank compensation of an earlier step's error: eigen (EoRA) | weight (plain SVD of ΔW)"
    paper = "arXiv:2410.21271"

    def requests(self) -> tuple[Request, ...]:
        return inputs("gram") if self.config.space == "eigen" else ()

    def preview(self, shapes: dict[str, tuple[int, int]], model_params: int) -> dict[str, dict]:
        """A compensation path of rank r beside what the earlier steps left ("added")."""
        return {name: {"rank": self.config.rank, "path_rank": self.config.rank} for name in shapes}

    def _whitening(self, target: Target) -> linalg.Whitening:
        if self.config.space == "weight":
            return linalg.identity()
        return linalg.eigh(target.stats.gram, self.config.cutoff)

    def compress_linear(self, target: Target, ctx: LayerContext) -> Outcome:
        residual = target.original.float() - target.weight  # (m, n) fp32
        if not bool(residual.any()):
            return Outcome(None, note="no residual: an earlier step left this linear unchanged")
        rank, carried = self.config.rank, _carried_path(target.module)
        have = carried.rank if carried is not None else 0
        if have > rank:
            raise CompressorError(f"eora: rank {rank} is less than the rank {have} of the low-rank path the earlier "
                                  f"step left on {target.name}; give eora a rank of at least {have}")
        if have == rank:  # kept as it is, but a rank-r compensated linear (the log says so, not "unchanged")
            return Outcome(target.module, rank=rank, extra={"carried_rank": have},
                           note=f"the earlier step's low-rank path already has rank {rank}")
        whitening = ctx.per_input(self, target, self._whitening)
        dtype = torch.float64 if self.config.svd_dtype == "float64" else torch.float32
        up, down = eora_factors(residual, rank - have, None, svd_dtype=dtype, whitening=whitening)
        if carried is None:
            lora = LowRankLinear.from_factors(up, down, None, target.dense_class, dtype=ctx.dtype)
            return Outcome(CompensatedLinear(target.module, lora), rank=rank)
        kept_up, kept_down = carried.factors()  # (m, k), (k, n): the path as stored, first
        lora = LowRankLinear.from_factors(torch.cat([kept_up.to(ctx.dtype), up.to(ctx.dtype)], dim=1),
                                          torch.cat([kept_down.to(ctx.dtype), down.to(ctx.dtype)]), None,
                                          target.dense_class, dtype=ctx.dtype)
        return Outcome(CompensatedLinear(target.module.base, lora), rank=rank, extra={"carried_rank": have})


def _carried_path(module: torch.nn.Module) -> LowRankLinear | None:
    """The low-rank path an earlier step left on the module (a ``CompensatedLinear``'s), or None."""
    return module.lora if isinstance(module, CompensatedLinear) else None
