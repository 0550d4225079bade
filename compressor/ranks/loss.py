"""Ranks by truncation loss (SVD-LLM V2's mechanism, arXiv:2503.12340; docs/methods.md#rank-rules): the parameter budget goes where
truncation costs least.

For a targeted ``W`` (m, n) with spectrum ``σ`` (min(m, n),) of the matrix the method truncates (``W S``
with a whitening, else ``W``), keeping rank r loses ``Σ_{j ≥ r} σ_j²``: with SVD-LLM's whitening that is
exactly the squared output error ``‖(W − W_r) X‖²`` on the calibration inputs. Divided by ``Σ σ²`` (the
output energy) it is the relative output error², comparable between matrices of different scale::

    loss_i(r)   = Σ_{j ≥ r} σ_j² / Σ_j σ_j²          r = 1 … ⌈break-even⌉ − 1, or dense (loss 0)
    params_i(r) = r (m + n)                          (dense: m n)

With ``normalize=False`` the loss is the absolute ``Σ_{j ≥ r} σ_j²``: the right comparison when the spectra are
of a problem already in common units, such as rows weighted by √Fisher (LoRD's ``output_weight: fisher``),
where it approximates the increase of the model's loss and a per-matrix normalization would undo that.

The ranks minimize ``Σ_i loss_i(r_i)`` subject to ``Σ_i params_i(r_i) ≤ budget`` through the Lagrangian
``min_r loss_i(r) + λ · params_i(r)`` per matrix, with λ bisected (removed parameters grow with λ) to the
smallest λ that meets the budget: exact on the lower convex hull of each matrix's (params, loss) curve,
which is where a Lagrangian lands; the budget is met to within one hull step of one matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import CompressorError


@dataclass
class Choice:
    """One matrix's candidate ranks (1 … R, R < break-even) and their losses and parameters."""

    shape: tuple[int, int]
    loss: Tensor  # (R + 1,) fp64: (relative) loss at rank 1 … R, then 0 for dense
    params: Tensor  # (R + 1,) fp64: r (m + n) for rank r, then m n for dense

    @classmethod
    def of(cls, spectrum: Tensor, shape: tuple[int, int], normalize: bool = True) -> "Choice":
        m, n = shape
        energy = spectrum.double().square()  # (k,) descending
        total = float(energy.sum()) if normalize else 1.0
        tail = energy.flip(0).cumsum(0).flip(0)  # tail[r] = Σ_{j ≥ r} σ_j²
        ranks = torch.arange(1, len(energy) + 1, dtype=torch.float64)
        below = ranks * (m + n) < m * n  # ranks that save parameters
        kept = int(below.sum())
        loss = tail[1:kept + 1] / total if total > 0 else torch.zeros(kept, dtype=torch.float64)
        if len(loss) < kept:  # rank k = min(m, n) loses nothing (only when it is below break-even)
            loss = torch.cat([loss, torch.zeros(kept - len(loss), dtype=torch.float64)])
        return cls(shape, torch.cat([loss, torch.zeros(1, dtype=torch.float64)]),
                   torch.cat([ranks[:kept] * (m + n), torch.tensor([float(m * n)], dtype=torch.float64)]))

    def pick(self, price: float) -> int:
        """Index of the candidate minimizing ``loss + price · params`` (the last one: dense)."""
        return int(torch.argmin(self.loss + price * self.params))

    def rank_at(self, index: int) -> int | None:
        """The rank of candidate ``index``; None for dense."""
        return None if index == len(self.loss) - 1 else index + 1


def allocate(spectra: dict[str, Tensor], shapes: dict[str, tuple[int, int]], removed_params: float,
             normalize: bool = True) -> dict:
    """name → rank (None: stays dense) removing at least ``removed_params`` with the least total relative
    (``normalize``) or absolute loss; with the solved price λ, the parameters removed and the total loss."""
    choices = {name: Choice.of(spectra[name], shapes[name], normalize) for name in shapes}
    before = sum(m * n for m, n in shapes.values())
    floor = sum(float(c.params[0]) for c in choices.values())  # every matrix at rank 1
    if removed_params > before - floor:
        raise CompressorError(f"cannot remove {removed_params:,.0f} of {before:,} targeted parameters "
                              "by factorization (rank 1 everywhere removes less)")

    def removed(price: float) -> float:
        return before - sum(float(c.params[c.pick(price)]) for c in choices.values())

    low, high = 0.0, 1.0
    while removed(high) < removed_params:
        high *= 2
        if high > 1e30:
            raise CompressorError("the loss rank rule could not meet its budget")
    for _ in range(200):  # to fp64 resolution of λ
        middle = (low + high) / 2
        if middle in (low, high):
            break
        low, high = (low, middle) if removed(middle) >= removed_params else (middle, high)
    ranks = {name: c.rank_at(c.pick(high)) for name, c in choices.items()}
    total_loss = sum(float(c.loss[c.pick(high)]) for c in choices.values())
    return {"ranks": ranks, "price": high, "removed_params": removed(high), "total_loss": total_loss}
