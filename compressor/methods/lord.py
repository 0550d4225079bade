"""LoRD: low-rank decomposition of the decoder linears (Kaushal et al., 2023, arXiv:2309.14021).

Each targeted ``W`` (m, n) becomes ``up @ down`` with ``up = U_r Σ_r^½`` (m, r) and
``down = Σ_r^½ V_rᵀ`` (r, n). ``whiten`` picks the objective from the same kernel
(``linalg.whitened_svd``):

- ``none``: plain SVD of W (LoRD as released; data-free);
- ``activation``: ASVD's diagonal scaling ``S = diag(mean|x|)^α`` (arXiv:2312.05821);
- ``gram``: SVD-LLM's truncation-aware whitening ``S = chol(XᵀX)`` (arXiv:2403.07378).

No public LoRD code exists; methods.md §2 specifies it from the paper. Ranks come from the shared rank
rules; a matrix whose rank would not save parameters stays dense.

```yaml
steps:
  - method: lord
    config: {ratio: 0.2, whiten: gram}
```
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .. import linalg, ranks
from ..base import Compressor, LayerContext, Outcome, Target
from ..configs import field
from ..modules import LowRankLinear


@dataclass
class LoRDConfig(ranks.RankRule):
    whiten: Literal["none", "activation", "gram"] = field("none", "none (plain SVD), activation (ASVD), gram (SVD-LLM)")
    alpha: float = field(0.5, "exponent of mean|x| for whiten: activation (ASVD's alpha)")
    gram_root: Literal["cholesky", "eigh"] = field("cholesky", "square root of the Gram for whiten: gram")
    svd_dtype: Literal["float64", "float32"] = field("float64", "precision of the SVD")


def lord_factors(weight: torch.Tensor, rank: int, whitening: linalg.Whitening, svd_dtype: torch.dtype):
    """(up (m, r), down (r, n)) of the whitened truncated SVD of ``weight`` (m, n)."""
    up, down, _ = linalg.whitened_svd(weight, rank, whitening, svd_dtype)
    return up, down


class LoRD(Compressor):
    name = "lord"
    Config = LoRDConfig
    summary = "truncated SVD of each linear; whiten none | activation (ASVD) | gram (SVD-LLM)"
    paper = "arXiv:2309.14021"

    def __init__(self, config: LoRDConfig) -> None:
        super().__init__(config)
        self.planned_ratio: float | None = None

    @property
    def needs(self) -> frozenset[str]:
        return {"none": frozenset(), "activation": frozenset({"abs_mean"}), "gram": frozenset({"gram"})}[
            self.config.whiten]

    def plan(self, shapes: dict[str, tuple[int, int]], model_params: int) -> None:
        if self.config.model_ratio is not None:
            self.planned_ratio = ranks.plan_model_ratio(self.config.model_ratio, list(shapes.values()), model_params)
        else:  # check explicit ranks before any work is done
            for m, n in shapes.values():
                ranks.rank_for(self.config, m, n)

    def whitening(self, target: Target) -> linalg.Whitening:
        if self.config.whiten == "activation":
            return linalg.diagonal(target.stats.abs_mean, self.config.alpha)
        if self.config.whiten == "gram":
            return linalg.from_gram(target.stats.gram, self.config.gram_root)
        return linalg.identity()

    def compress(self, target: Target, ctx: LayerContext) -> Outcome:
        m, n = target.weight.shape
        rank = ranks.rank_for(self.config, m, n, self.planned_ratio)
        if not ranks.saves_parameters(rank, m, n):
            return Outcome(None, note=f"rank {rank} ≥ break-even {ranks.break_even(m, n):.0f}: kept dense")
        dtype = torch.float64 if self.config.svd_dtype == "float64" else torch.float32
        up, down = lord_factors(target.weight, rank, self.whitening(target), dtype)
        module = LowRankLinear.from_factors(up, down, target.bias, target.dense_class, dtype=ctx.dtype)
        return Outcome(module, rank=rank)
