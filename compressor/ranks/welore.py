"""WeLore's rank rule (Jaiswal et al., 2024, arXiv:2407.11239): one global threshold τ on every matrix's
min-max normalised singular-value spectrum gives each matrix its own rank. The one implementation,
used by the ``welore`` compressor and by LoRD's ``rank_rule: welore``.

For a targeted ``W`` (m, n) with spectrum ``σ`` (min(m, n),), from ``svd(W)`` or, with a whitening,
from ``svd(W S)`` (docs/methods.md#the-whitened-truncated-svd)::

    σ̃ = (σ − σ_min) / (σ_max − σ_min)          # in [0, 1]; per matrix, so τ is not comparable across models
    pruned = #{ j : σ̃_j < τ }                   # ranks below the threshold
    rank   = min(m, n) − pruned                 # ≥ 1: σ̃_max = 1 is never below τ ≤ 1

A matrix is low-rank-component (LRC, factorised at ``rank``) when ``pruned / min(m, n) > min_ratio``
and, with the guard on, ``rank·(m + n) < m·n`` (the factors store fewer parameters); otherwise it is
N-LRC and stays dense. The paper's code has no guard (``min_ratio = 0`` factorises every matrix with
one pruned rank, so a square matrix that loses less than half its rank *grows*).

τ is solved by bisection over the midpoints between the sorted normalised values (exact: the counts
only change at those values) for one of two budgets:

- ``rank_reduction``: Σ pruned / Σ min(m, n) over all targeted matrices, counted *before* the LRC
  test: the construction of the paper's τ table (``adaptive_rank_pruning``), where ``min_ratio = 0``
  and no guard make that equal to the effective reduction. With the guard, the effective rank
  reduction (N-LRC matrices count as unpruned) is lower; both are reported.
- ``removed_params``: parameters removed from the targeted matrices, after the LRC test (honest
  accounting; monotone in τ, and nearly continuous, because a matrix crossing break-even starts
  with a small saving).

The τ whose count is closest to the budget is taken (ties: the one that meets it), so a rank budget
is met within one rank when the normalised values are distinct. Rank reduction and parameter
reduction differ: a square matrix saves nothing until it loses half its rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from ..errors import CompressorError
from ..model.modules import weight_of
from .uniform import saves_parameters


def normalized(spectrum: Tensor) -> Tensor:
    """Min-max normalised singular values (k,), fp64.

    A spectrum flat to working precision (spread ≤ k·eps_fp32·σ_max: fp32 rounding noise, which the
    normalisation would blow up to [0, 1]), or a zero one, normalises to ones: nothing is pruned.
    """
    s = spectrum.detach().double().cpu()
    low, high = float(s.min()), float(s.max())
    if not high - low > s.numel() * torch.finfo(torch.float32).eps * high:
        return torch.ones_like(s)
    return (s - low) / (high - low)


@dataclass
class Allocation:
    """What the rule decided for one matrix."""

    shape: tuple[int, int]  # (m, n)
    pruned: int  # #{σ̃ < τ}: ranks below the threshold, whether or not the matrix is factorised
    lrc: bool  # factorised (low-rank component) or kept dense (N-LRC)

    @property
    def full(self) -> int:
        return min(self.shape)

    @property
    def rank(self) -> int:
        """The kept rank min(m, n) − pruned (what an LRC matrix is factorised at)."""
        return self.full - self.pruned

    @property
    def params_before(self) -> int:
        m, n = self.shape
        return m * n

    @property
    def params_after(self) -> int:
        m, n = self.shape
        return self.rank * (m + n) if self.lrc else m * n

    def extra(self, tau: float) -> dict:
        """The log entry's fields (``Outcome.extra``)."""
        return {"rank_rule": "welore", "tau": tau, "lrc": self.lrc, "pruned_ranks": self.pruned,
                "full_rank": self.full, "rank_reduction": self.pruned / self.full if self.lrc else 0.0,
                "param_reduction": 1.0 - self.params_after / self.params_before}

    def note(self, tau: float) -> str:
        below = f"{self.pruned}/{self.full} ranks below τ={tau:.4g}"
        if self.lrc:
            return f"LRC: {below}"
        m, n = self.shape
        reason = "none pruned" if not self.pruned else "no saving" if not saves_parameters(self.rank, m, n) \
            else "below min_ratio"
        return f"N-LRC: {below} ({reason}): kept dense"


def classify(shape: tuple[int, int], pruned: int, min_ratio: float = 0.0, guard: bool = True) -> bool:
    """LRC (True) or N-LRC: enough of the rank pruned, and (guard) the factors save parameters."""
    m, n = shape
    rank = min(m, n) - pruned
    return pruned / min(m, n) > min_ratio and (not guard or saves_parameters(rank, m, n))


@dataclass
class Plan:
    """τ and every matrix's allocation. ``summary`` adds the attempted rank reduction (before the LRC
    test) to what ``ranks.reduction`` recomputes from the log."""

    tau: float
    allocations: dict[str, Allocation]

    def summary(self) -> dict:
        alloc = list(self.allocations.values())
        full = sum(a.full for a in alloc)
        before = sum(a.params_before for a in alloc)
        after = sum(a.params_after for a in alloc)
        return {
            "rank_rule": "welore", "tau": self.tau, "matrices": len(alloc), "lrc": sum(a.lrc for a in alloc),
            "attempted_rank_reduction": sum(a.pruned for a in alloc) / full if full else 0.0,
            "rank_reduction": sum(a.pruned for a in alloc if a.lrc) / full if full else 0.0,
            "param_reduction": 1.0 - after / before if before else 0.0,
            "params_removed": before - after,
        }

    def record(self) -> dict:
        """The decision as compression.json records it: the summary and every matrix's kept rank (None: dense)."""
        return {**self.summary(), "ranks": {name: a.rank if a.lrc else None for name, a in self.allocations.items()}}


def allocate(spectra: dict[str, Tensor], shapes: dict[str, tuple[int, int]], tau: float,
             min_ratio: float = 0.0, guard: bool = True) -> Plan:
    """Apply threshold ``tau`` to every matrix (spectra: name → singular values, any order)."""
    allocations = {}
    for name, spectrum in spectra.items():
        pruned = int((normalized(spectrum) < tau).sum())
        allocations[name] = Allocation(shapes[name], pruned, classify(shapes[name], pruned, min_ratio, guard))
    return Plan(tau, allocations)


def solve(spectra: dict[str, Tensor], shapes: dict[str, tuple[int, int]], *, rank_reduction: float | None = None,
          removed_params: float | None = None, min_ratio: float = 0.0, guard: bool = True) -> Plan:
    """The plan whose τ meets one budget: ``rank_reduction`` (Σ pruned / Σ min(m, n), before the LRC test)
    or ``removed_params`` (parameters removed from the targeted matrices, after it)."""
    if (rank_reduction is None) == (removed_params is None):
        raise ValueError("give exactly one of rank_reduction, removed_params")
    names = list(spectra)
    ascending = [torch.sort(normalized(spectra[n])).values for n in names]  # (k,) each
    values = torch.unique(torch.cat(ascending))  # sorted; the counts change only at these values
    # τ midway between consecutive values (0: nothing pruned): the same counts as τ = a value, but a
    # tiny perturbation of the spectra (another accumulation order) does not flip the value at τ
    candidates = torch.cat([values.new_zeros(1), (values[:-1] + values[1:]) / 2])

    def pruned(tau: float) -> list[int]:
        probe = torch.tensor([tau], dtype=torch.float64)
        return [int(torch.searchsorted(a, probe, side="left")) for a in ascending]  # #{σ̃ < τ}

    if rank_reduction is not None:
        goal = rank_reduction * sum(min(shapes[n]) for n in names)

        def measure(tau: float) -> float:
            return float(sum(pruned(tau)))
    else:
        goal = removed_params

        def measure(tau: float) -> float:
            total = 0
            for name, p in zip(names, pruned(tau)):
                if classify(shapes[name], p, min_ratio, guard):
                    m, n = shapes[name]
                    total += m * n - (min(m, n) - p) * (m + n)
            return float(total)

    index = _bisect(lambda i: measure(float(candidates[i])) >= goal, len(candidates))
    if index == len(candidates):
        reach = measure(float(candidates[-1]))
        raise CompressorError(f"the WeLore budget is out of reach: at most {reach:,.0f} "
                              f"{'ranks' if rank_reduction is not None else 'parameters'} can go (asked {goal:,.0f})")
    if index > 0:  # the closer of the two values that bracket the budget
        below, above = measure(float(candidates[index - 1])), measure(float(candidates[index]))
        if goal - below < above - goal:
            index -= 1
    return allocate(spectra, shapes, float(candidates[index]), min_ratio, guard)


def _bisect(meets: Callable[[int], bool], size: int) -> int:
    """The smallest i in [0, size) with ``meets(i)`` (monotone), or ``size`` if none."""
    low, high = 0, size
    while low < high:
        mid = (low + high) // 2
        if meets(mid):
            high = mid
        else:
            low = mid + 1
    return low


def budget(*, rank_reduction: float | None, ratio: float | None, model_ratio: float | None,
           shapes: dict[str, tuple[int, int]], model_params: int) -> dict:
    """``solve``'s keyword for the package's budget knobs: ``rank_reduction`` (global rank reduction),
    ``ratio`` (fraction of the targeted matrices' parameters removed), ``model_ratio`` (of the whole model)."""
    if rank_reduction is not None:
        return {"rank_reduction": rank_reduction}
    if ratio is not None:
        return {"removed_params": ratio * sum(m * n for m, n in shapes.values())}
    if model_ratio is not None:
        return {"removed_params": model_ratio * model_params}
    raise CompressorError("the WeLore rule needs a budget: rank_reduction, ratio or model_ratio")


def _weight(module: nn.Module) -> Tensor:
    """The (out, in) weight of a dense or already compressed linear."""
    return (module.dense_weight() if hasattr(module, "dense_weight") else weight_of(module)).detach()


def _rows_scaled(weight: Tensor, row_scales: dict[str, Tensor] | None, name: str) -> Tensor:
    """``diag(row_scales[name]) W`` (an output-side weight), or W."""
    scale = (row_scales or {}).get(name)
    return weight if scale is None else weight * scale.to(device=weight.device, dtype=weight.dtype)[:, None]


Measure = Callable[[str, Tensor, object], Tensor]  # (name, D W S (m, n), its Whitening S) → (k,) per component


def singular_values(name: str, work: Tensor, whitening) -> Tensor:
    """The default ``Measure``: the singular values of the matrix truncated."""
    return torch.linalg.svdvals(work)


def weight_spectra(view, dtype: torch.dtype = torch.float64,
                   row_scales: dict[str, Tensor] | None = None,
                   measure: Measure = singular_values) -> dict[str, Tensor]:
    """name → singular values (min(m, n),) of the current weight of each target of ``view`` (a
    ``contract.ModelView``; data-free, its layers read one at a time), rows scaled by ``row_scales`` where
    given; ``measure``: another per-component value of that matrix (its whitening: the identity)."""
    from ..kernels.linalg import identity
    from ..model.targets import names_by_layer

    names = list(view.shapes)
    by_layer = names_by_layer(view.model, names)
    spectra = {}
    for visit in view.layers(last_layer=max(by_layer, default=-1)):  # data-free: no forward
        for name in by_layer.get(visit.index, []):
            weight = _weight(visit.module(name)).to(device=view.device, dtype=dtype)  # (m, n)
            spectra[name] = measure(name, _rows_scaled(weight, row_scales, name), identity()).cpu()
    return {name: spectra[name] for name in names}


def whitened_spectra(view, kinds: frozenset[str], whitening: Callable,
                     dtype: torch.dtype = torch.float64,
                     row_scales: dict[str, Tensor] | None = None,
                     output_side: Callable[[tuple[int, int]], bool] | None = None,
                     measure: Measure = singular_values) -> dict[str, Tensor]:
    """name → singular values of ``W S`` with ``S = whitening(stats)``, the input statistics ``kinds`` taken
    on the *original* model (``view.walk``, SVD-LLM's profiling) for every target of ``view`` (a
    ``contract.ModelView``), rows scaled by ``row_scales`` where given (an output-side weight). Targets whose
    shape ``output_side`` accepts get them from their output Gram instead (√ of the eigenvalues of
    ``W G Wᵀ``: the same values, no (n, n) matrix). Each layer's statistics are dropped once its spectra are known.
    ``measure``: another per-component value of ``D W S`` than its singular values (input-side targets only)."""
    from ..kernels.linalg import output_spectrum
    from ..model.targets import names_by_layer
    from ..stats.hooks import Collector, Watch

    by_layer = names_by_layer(view.model, view.shapes)
    outputs = {n for n, shape in view.shapes.items() if output_side is not None and output_side(shape)}
    spectra = {}
    for visit in view.walk(last_layer=max(by_layer, default=-1)):
        names = by_layer.get(visit.index, [])
        collector = Collector([Watch(n, visit.module(n), "output", frozenset({"gram", "mean"})) if n in outputs
                               else Watch(n, visit.module(n), "input", kinds) for n in names])
        visit.forward(collector=collector)
        for (name, where), stats in collector.result().items():
            module = visit.module(name)
            weight = _weight(module).to(device=view.device, dtype=dtype)  # (m, n)
            if where == "output":
                bias = None if module.bias is None else module.bias.detach()
                gram = stats.gram_about(bias).to(device=view.device, dtype=dtype)  # (m, m): W G Wᵀ
                scale = (row_scales or {}).get(name)
                if scale is not None:  # diag(d) W G Wᵀ diag(d), as _rows_scaled does to W
                    scale = scale.to(device=view.device, dtype=dtype)
                    gram = scale[:, None] * gram * scale[None, :]
                spectra[name] = output_spectrum(gram)[: min(weight.shape)].cpu()
                continue
            white = whitening(stats)
            spectra[name] = measure(name, white.apply(_rows_scaled(weight, row_scales, name)), white).cpu()
    missing = set(view.shapes) - set(spectra)
    if missing:
        raise CompressorError(f"no statistics were collected for {sorted(missing)[0]} (and {len(missing) - 1} more)")
    return spectra
