"""FWSVD: Fisher-weighted SVD (Hsu, Hua, Chang, Lou, Shen, Jin; ICLR 2022, arXiv:2207.00112).

The ideal objective ``min Σ_ij F_ij (W − Ŵ)_ij²`` (F: empirical Fisher of W, ``compressor.fisher``)
has no closed form; FWSVD gives every column (or row) of ``W`` (m, n) one importance, the Fisher summed
along the other axis, and solves the weighted problem exactly with the shared kernel
(``linalg.whitened_svd``, diagonal whitening, docs/methods.md#the-whitened-truncated-svd and #fwsvd-fwsvd):

    axis: in  (default)  s_j = √(Σ_i F_ij + eps)  (n,)   min ‖(W − Ŵ) diag(s)‖_F
                         svd(W diag(s)) → up = U_r Σ_r^½ (m, r), down = Σ_r^½ V_rᵀ diag(s)⁻¹ (r, n)
    axis: out            t_i = √(Σ_j F_ij + eps)  (m,)   min ‖diag(t) (W − Ŵ)‖_F
                         the same kernel on Wᵀ with diag(t), transposed back:
                         up = diag(t)⁻¹ U_r Σ_r^½ (m, r), down = Σ_r^½ V_rᵀ (r, n)

Axis: the paper weights the "rows" of its W, which in its ``x W`` layout are the input features. Every
PyTorch re-implementation (ASVD's ``fisher`` scaling, s-nlp's ``Aw_svd``, LowRankArena's BERT FWSVD)
weights the input features, i.e. the columns of ``nn.Linear.weight``: ``in`` is the default.
``eps`` (1e-6, ASVD's; the Skoltech code uses 1e-5) is added to the summed Fisher before the square
root, so zero or tiny Fisher columns (dead channels) never divide by zero; ``linalg.diagonal`` also
floors the scale at 1e-6 of its maximum when ``eps: 0``. The Fisher is the *sum* over the calibration
windows (not the mean), so ``eps`` is relative to that scale. The paper puts all of Σ_r on the up
factor; the product ``Ŵ`` is identical, here √Σ goes to both factors as in the other methods.

The Fisher pass (a backward pass per calibration window) runs once in ``decide`` and is cached on
disk; the layer walk itself then needs no data. With uniform Fisher, FWSVD is plain SVD.
``fisher_store: axis`` (default) accumulates and caches only the sums FWSVD uses: vectors, so the pass
needs little beyond the model itself (on SmolLM2-135M, model + pass stay below 2× the fp32 model; fp32
accumulators as large as the targeted weights would take a bf16 model to 2.6× its size). ``full`` keeps
and caches the whole (out, in) Fisher, which other methods (LQ-LoRA) reuse; a cached full Fisher also
serves a later ``axis`` request, so the pass never runs twice.

```yaml
steps:
  - method: fwsvd
    config: {ratio: 0.2, axis: in}
```
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..config.configs import field
from ..contract import Decision, LayerContext, LinearCompressor, ModelView, Outcome, Target
from ..errors import CompressorError
from ..kernels import linalg
from ..ranks import uniform as ranks
from ..stats import fisher as fisher_pass
from .factor_bits import FactorBits, low_rank_module

Axis = Literal["in", "out"]


@dataclass
class FWSVDConfig(ranks.RankRule, FactorBits):
    axis: Axis = field("in", "Fisher summed per input column (in, as ASVD/s-nlp do) or per output row (out)")
    eps: float = field(1e-6, "added to the summed Fisher before the square root (zero-Fisher columns)")
    checkpointing: bool = field(True, "recompute each decoder layer in the Fisher backward (less memory)")
    fisher_cache: Literal["use", "refresh", "off"] = field(
        "use", "Fisher cache on disk: use (read/write), refresh (recompute, overwrite), off")
    fisher_store: Literal["full", "axis"] = field(
        "axis", "full: accumulate and cache the (out, in) Fisher (reusable by other methods; fp32 "
        "accumulators as large as the targeted weights); axis: only its per-axis sums (same factors, "
        "vectors in memory and in the cache)")
    svd_dtype: Literal["float64", "float32"] = field("float64", "precision of the SVD")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eps < 0:
            raise ValueError(f"eps must be ≥ 0; got {self.eps}")


def fwsvd_factors(weight: Tensor, rank: int, scale: Tensor, axis: Axis,
                  svd_dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """(up (m, r), down (r, n)) minimizing ‖(W − up·down) diag(scale)‖_F (``in``, scale (n,)) or
    ‖diag(scale) (W − up·down)‖_F (``out``, scale (m,)) for ``weight`` (m, n)."""
    whitening = linalg.diagonal(scale.to(weight.device))
    if axis == "in":
        up, down, _ = linalg.whitened_svd(weight, rank, whitening, svd_dtype)
        return up, down
    up_t, down_t, _ = linalg.whitened_svd(weight.T, rank, whitening, svd_dtype)  # Wᵀ ≈ (n, r) @ (r, m)
    return down_t.T, up_t.T


def weighted_error(weight: Tensor, approx: Tensor, scale: Tensor, axis: Axis) -> float:
    """‖(W − Ŵ) diag(s)‖_F (``in``) or ‖diag(s) (W − Ŵ)‖_F (``out``): FWSVD's objective."""
    delta = weight.double() - approx.double()
    scale = scale.double().to(delta.device)
    return float((delta * (scale[None, :] if axis == "in" else scale[:, None])).norm())


class FWSVD(LinearCompressor):
    name = "fwsvd"
    Config = FWSVDConfig
    summary = "Fisher-weighted SVD: per-column (or row) Fisher weights from a cached gradient pass"
    paper = "arXiv:2207.00112"

    def __init__(self, config: FWSVDConfig) -> None:
        super().__init__(config)
        self.scales: dict[str, Tensor] = {}  # name → √(Σ F + eps), (n,) or (m,), fp64 on CPU
        self.fisher_info: dict[str, object] = {}

    @property
    def uses_data(self) -> bool:
        return True  # the Fisher pass; no per-layer statistics (no requests)

    def decide(self, view: ModelView) -> Decision:
        """Every target's rank, and its Fisher (cached) reduced at once to the per-axis scales."""
        chosen, record = ranks.uniform_ranks(self.config, view.shapes, view.model_params)
        reduce = self.config.axis if self.config.fisher_store == "axis" else None
        fisher, self.fisher_info = fisher_pass.fisher_for(view.model, view.batches, list(view.shapes), view.device,
                                                          self.config.checkpointing, self.config.fisher_cache,
                                                          reduce)
        for name in view.shapes:
            value = fisher.pop(name)  # (m, n), or already summed: (n,) / (m,)
            self.scales[name] = fisher_pass.diagonal_weight(value, self.config.axis, self.config.eps)
        record["fisher_cache"] = "hit" if self.fisher_info.get("hit") else "computed"
        return Decision(record, ranks=chosen)

    def compress_linear(self, target: Target, ctx: LayerContext) -> Outcome:
        m, n = target.weight.shape
        if target.name not in self.scales:
            raise CompressorError(f"fwsvd: no Fisher for {target.name} (decide did not run for it)")
        scale = self.scales.pop(target.name)
        rank = target.decision.ranks[target.name]
        if not ranks.saves_parameters(rank, m, n):
            return Outcome(None, note=f"rank {rank} ≥ break-even {ranks.break_even(m, n):.0f}: kept dense")
        dtype = torch.float64 if self.config.svd_dtype == "float64" else torch.float32
        up, down = fwsvd_factors(target.weight, rank, scale, self.config.axis, dtype)
        module = low_rank_module(target.weight, up, down, target.bias, target.dense_class, ctx.dtype,
                                 self.config.factor_bits, torch.diag(scale.double() ** 2) if self.config.axis == "in"
                                 and self.config.factor_bits < 16 else None)  # the input Gram of its objective
        if self.config.factor_bits < 16:
            up, down = module.factors()  # the error of the integer factors, as stored
        floor = float(scale.max()) * 1e-3
        dead = int((scale <= floor).sum())
        approx = up @ down
        total = weighted_error(target.weight, torch.zeros_like(approx), scale, self.config.axis)
        extra = {"rel_fisher_error": weighted_error(target.weight, approx, scale, self.config.axis) / total
                 if total > 0 else 0.0,
                 "fisher_cache": "hit" if self.fisher_info.get("hit") else "computed"}
        note = f"{dead} {self.config.axis}-channels with Fisher weight ≤ 1e-3·max" if dead else ""
        return Outcome(module, rank=rank, note=note, extra=extra)
