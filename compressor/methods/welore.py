"""WeLore: data-free, non-uniform ranks from the singular-value spectrum (Jaiswal et al., 2024,
arXiv:2407.11239; VITA-Group/WeLore, docs/methods.md#welore-welore).

Before the layer walk, ``decide`` takes the spectrum of every targeted ``W`` (m, n) and solves one
threshold τ on the min-max normalised spectra for the budget (``welore_rule``): each matrix loses the
ranks whose normalised singular value is below τ. Matrices that lose enough (low-rank components, LRC)
become ``up = U_k Σ_k^½`` (m, k), ``down = Σ_k^½ V_kᵀ`` (k, n) by plain SVD (the ``linalg`` kernel
without whitening); the others (N-LRC) stay dense. No calibration data.

Budgets (one of): ``rank_reduction``, the paper's knob (``--model_rank 50`` = 0.5: Σ ranks below τ /
Σ min(m, n), the construction of its Llama-2 τ table); ``ratio``, the fraction of the targeted
matrices' parameters removed; ``threshold``, τ itself. Where this differs from the reference code:

- the guard (default on) keeps a matrix dense when its factors would not save parameters; the paper's
  code factorises every matrix with one pruned rank (``min_ratio = 0``), so a square matrix that loses
  less than half its rank grows. With the guard, the effective rank reduction (N-LRC matrices count as
  unpruned) is below the ``rank_reduction`` budget; both are logged, next to the parameter reduction;
- spectra and factors are computed in fp64 (``svd_dtype``), the paper's in fp32, factors stored in the
  model's dtype (the paper's in bf16);
- τ is solved by bisection for any model; the reference code only has a table for Llama-2 7B/13B.

Each log entry carries ``lrc``, ``tau``, ``pruned_ranks``, ``full_rank``, ``rank_reduction`` and
``param_reduction``; ``compressor inspect`` notes LRC / N-LRC per matrix and sums both reductions.

```yaml
steps:
  - method: welore
    config: {rank_reduction: 0.5}          # or {ratio: 0.1}: 10% of the targeted parameters removed
```
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..config.configs import field
from ..contract import Decision, LayerContext, LinearCompressor, ModelView, Outcome, Target
from ..errors import CompressorError
from ..kernels import linalg
from ..ranks import welore as welore_rule
from .factor_bits import FactorBits, low_rank_module

BUDGETS = ("rank_reduction", "ratio", "threshold")


@dataclass
class WeLoreConfig(FactorBits):
    rank_reduction: float | None = field(None, "target rank reduction Σ pruned / Σ min(m,n) over the targeted "
                                         "matrices, before the LRC test (the paper's --model_rank / 100; "
                                         "default 0.5)")
    ratio: float | None = field(None, "target fraction of the targeted matrices' parameters removed, after the "
                                "LRC test and guard")
    threshold: float | None = field(None, "τ itself: prune normalised singular values below it")
    min_ratio: float = field(0.0, "LRC only if pruned / min(m,n) > min_ratio (the paper's --min_ratio)")
    guard: bool = field(True, "keep a matrix dense when its factors would not save parameters (the paper has none)")
    svd_dtype: Literal["float64", "float32"] = field("float64", "precision of the spectra and the SVD")

    def __post_init__(self) -> None:
        chosen = [name for name in BUDGETS if getattr(self, name) is not None]
        if not chosen:
            self.rank_reduction = 0.5
        if len(chosen) > 1:
            raise ValueError(f"set only one of {', '.join(BUDGETS)}; got {', '.join(chosen)}")
        for name in ("rank_reduction", "ratio"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1); got {value}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1]; got {self.threshold}")
        if not 0.0 <= self.min_ratio < 1.0:
            raise ValueError(f"min_ratio must be in [0, 1); got {self.min_ratio}")


def welore_factors(weight: torch.Tensor, rank: int, svd_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(up (m, k), down (k, n)) of the truncated SVD of ``weight`` (m, n), √Σ on both sides."""
    up, down, _ = linalg.whitened_svd(weight, rank, linalg.identity(), svd_dtype)
    return up, down


class WeLore(LinearCompressor):
    name = "welore"
    Config = WeLoreConfig
    summary = "data-free non-uniform ranks: one threshold on the normalised spectra; LRC factorised, N-LRC dense"
    paper = "arXiv:2407.11239"

    @property
    def dtype(self) -> torch.dtype:
        return torch.float64 if self.config.svd_dtype == "float64" else torch.float32

    def decide(self, view: ModelView) -> Decision:
        spectra = welore_rule.weight_spectra(view, self.dtype)
        c = self.config
        if c.threshold is not None:
            solution = welore_rule.allocate(spectra, view.shapes, c.threshold, c.min_ratio, c.guard)
        else:
            budget = welore_rule.budget(rank_reduction=c.rank_reduction, ratio=c.ratio, model_ratio=None,
                                        shapes=view.shapes, model_params=0)
            solution = welore_rule.solve(spectra, view.shapes, min_ratio=c.min_ratio, guard=c.guard, **budget)
        return Decision(solution.record(), values={"welore": solution})

    def compress_linear(self, target: Target, ctx: LayerContext) -> Outcome:
        solution = target.decision.values.get("welore")  # τ and every matrix's allocation
        if solution is None:
            raise CompressorError("welore has no plan; run it through the pipeline")
        allocation = solution.allocations[target.name]
        extra, note = allocation.extra(solution.tau), allocation.note(solution.tau)
        if not allocation.lrc:
            return Outcome(None, note=note, extra=extra)
        up, down = welore_factors(target.weight, allocation.rank, self.dtype)
        module = low_rank_module(target.weight, up, down, target.bias, target.dense_class, ctx.dtype,
                                 self.config.factor_bits)
        return Outcome(module, rank=allocation.rank, note=note, extra=extra)
