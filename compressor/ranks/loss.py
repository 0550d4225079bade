"""Ranks by truncation loss (SVD-LLM V2's mechanism, arXiv:2503.12340; docs/methods.md#rank-rules): the parameter
budget goes where truncation costs least.

For a targeted ``W`` (m, n) with spectrum ``σ`` (min(m, n),) of the matrix the method truncates (``W S``
with a whitening, else ``W``), keeping rank r loses ``Σ_{j ≥ r} σ_j²``: with SVD-LLM's whitening that is
exactly the squared output error ``‖(W − W_r) X‖²`` on the calibration inputs. Divided by ``Σ σ²`` (the
output energy) it is the relative output error², comparable between matrices of different scale::

    loss_i(r)   = Σ_{j ≥ r} σ_j² / Σ_j σ_j²          r = 1 … ⌈break-even⌉ − 1, or dense (loss 0)
    params_i(r) = r (m + n)                          (dense: m n)

With ``normalize=False`` the loss is the absolute ``Σ_{j ≥ r} σ_j²``: the right comparison when the spectra are
of a problem already in common units, such as rows weighted by √Fisher (LoRD's ``output_weight: fisher``),
where it approximates the increase of the model's loss and a per-matrix normalization would undo that.

``allocate_costs`` takes any per-component costs in place of ``σ_j²`` (``loss_i(r) = Σ_{j ≥ r} cost_j``): LoRD's
``rank_rule: taylor`` gives each whitened component its first-order effect on the model's loss.

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
        return cls.of_costs(spectrum.double().square(), shape, normalize)

    @classmethod
    def of_costs(cls, energy: Tensor, shape: tuple[int, int], normalize: bool = True) -> "Choice":
        """From each component's cost of being dropped (k,) ≥ 0, in the order components are kept (σ² for a
        spectrum: descending); ``normalize``: divided by their sum."""
        m, n = shape
        energy = energy.double()
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
    return allocate_costs({name: spectra[name].double().square() for name in shapes}, shapes, removed_params,
                          normalize)


def allocate_costs(costs: dict[str, Tensor], shapes: dict[str, tuple[int, int]], removed_params: float,
                   normalize: bool = True, fill: bool = False) -> dict:
    """``allocate`` from each matrix's per-component costs (k,) ≥ 0 in keeping order instead of its spectrum.
    ``fill``: then spend what the Lagrangian removed beyond the budget (``fill_slack``), so the parameters kept
    come within one rank of one matrix of the budget even where the hull's steps are coarse (non-monotone costs)."""
    choices = {name: Choice.of_costs(costs[name], shapes[name], normalize) for name in shapes}
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
    picks = {name: c.pick(high) for name, c in choices.items()}
    if fill:
        picks = fill_slack(choices, picks, removed(high) - removed_params)
    ranks = {name: c.rank_at(picks[name]) for name, c in choices.items()}
    total_loss = sum(float(c.loss[picks[name]]) for name, c in choices.items())
    kept = sum(float(c.params[picks[name]]) for name, c in choices.items())
    return {"ranks": ranks, "price": high, "removed_params": before - kept, "total_loss": total_loss}


def fill_slack(choices: dict[str, Choice], picks: dict[str, int], slack: float) -> dict[str, int]:
    """Greedy: while some matrix can move to a candidate of lower loss whose extra parameters fit in ``slack``
    (parameters removed beyond the budget), make the move of most loss saved per parameter added."""
    picks = dict(picks)
    for _ in range(10_000):
        best = None  # (saved per parameter, name, index)
        for name, c in choices.items():
            extra = c.params - c.params[picks[name]]  # (R + 1,)
            saved = c.loss[picks[name]] - c.loss
            fits = (extra > 0) & (extra <= slack) & (saved > 0)
            if bool(fits.any()):
                rate = torch.where(fits, saved / extra.clamp_min(1), torch.full_like(saved, -1.0))
                index = int(torch.argmax(rate))
                if best is None or float(rate[index]) > best[0]:
                    best = (float(rate[index]), name, index)
        if best is None:
            break
        _, name, index = best
        slack -= float(choices[name].params[index] - choices[name].params[picks[name]])
        picks[name] = index
    return picks
