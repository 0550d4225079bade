"""Bit allocation: one configuration per matrix under an average bits-per-parameter budget, solved exactly
as a 0-1 integer program (LQ-LoRA's §3.2 ILP, docs/methods.md#bit-allocation) with SciPy's ``milp`` (HiGHS).

For matrices i = 1 … M with ``numel_i`` parameters and configurations c = 1 … C, given each pair's
error ``cost_ic`` (computed once) and the bits it stores ``bits_ic``::

    minimize    Σ_ic cost_ic · x_ic
    subject to  Σ_c x_ic = 1                        for every matrix i      (one configuration each)
                Σ_ic bits_ic · x_ic ≤ budget · Σ_i numel_i                   (the average budget)
                x_ic ∈ {0, 1}

One binary per (matrix, configuration). The reference code solves it with Gurobi (a licence the pip
package's size limit rules out for LLaMA-sized programs; its SciPy path fails) and splits the program
into chunks, each with its share of the budget, which is no longer the exact optimum; here it is solved
whole, with ``mip_rel_gap = 0``. Costs are rescaled to a sum of row minima of 1000 (a constant factor
changes no argmin, and keeps HiGHS's absolute gap of 1e-6 far below any difference that matters) and the
storage row to bits per parameter. The solution is checked against the budget in exact integer
arithmetic; if HiGHS's feasibility tolerance let it over by a hair, the budget row is tightened by the
excess and the program solved again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import CompressorError


@dataclass
class Allocation:
    """The configuration index chosen for each matrix, and what it costs."""

    choice: list[int]  # (M,) index into the configurations
    objective: float  # Σ cost of the choice (unscaled)
    bits: int  # Σ bits stored
    params: int  # Σ numel
    status: str  # "optimal", or "time limit (best found)"

    @property
    def bits_per_param(self) -> float:
        return self.bits / self.params if self.params else 0.0


def _milp():
    try:
        from scipy.optimize import Bounds, LinearConstraint, milp
        from scipy.sparse import csr_array
    except ImportError:
        raise CompressorError("bit allocation needs SciPy ≥ 1.9 (scipy.optimize.milp): pip install scipy") from None
    return milp, LinearConstraint, Bounds, csr_array


def allocate(costs: np.ndarray, bits: np.ndarray, numel: np.ndarray, budget: float,
             time_limit: float | None = 60.0) -> Allocation:
    """The least-cost choice of one configuration per matrix whose stored bits average at most ``budget``
    per parameter. ``costs``, ``bits``: (M, C); ``numel``: (M,). Raises if no choice meets the budget."""
    costs = np.asarray(costs, dtype=np.float64)
    bits = np.asarray(bits, dtype=np.int64)
    numel = np.asarray(numel, dtype=np.int64)
    if costs.shape != bits.shape or costs.ndim != 2 or numel.shape != (costs.shape[0],):
        raise CompressorError(f"bit allocation: costs {costs.shape}, bits {bits.shape} and numel {numel.shape} "
                              "do not describe the same matrices")
    if not np.isfinite(costs).all():
        raise CompressorError("bit allocation: a cost is not finite")
    m, c = costs.shape
    total = int(numel.sum())
    limit = budget * total  # bits
    cheapest = int(bits.min(axis=1).sum())
    if cheapest > limit:
        raise CompressorError(f"the budget {budget} bits per parameter is below the cheapest configuration "
                              f"({cheapest / total:.4f} bits per parameter)")
    milp, LinearConstraint, Bounds, csr_array = _milp()
    scale = max(float(costs.min(axis=1).sum()), 1e-300) / 1000.0
    objective = (costs / scale).reshape(-1)
    rows = np.repeat(np.arange(m), c)
    one_each = LinearConstraint(csr_array((np.ones(m * c), (rows, np.arange(m * c))), shape=(m, m * c)), 1, 1)
    storage = (bits / total).reshape(1, -1)  # bits per parameter
    bound = budget
    for _ in range(4):
        result = milp(objective, constraints=[one_each, LinearConstraint(storage, -np.inf, bound)],
                      integrality=np.ones(m * c), bounds=Bounds(0, 1),
                      options={"mip_rel_gap": 0.0, **({"time_limit": time_limit} if time_limit else {})})
        if result.x is None:
            raise CompressorError(f"bit allocation failed: {result.message}")
        choice = np.asarray(result.x).reshape(m, c).argmax(axis=1)
        used = int(bits[np.arange(m), choice].sum())
        if used <= limit:
            status = "optimal" if result.status == 0 else f"time limit (best found: {result.message})"
            return Allocation([int(i) for i in choice], float(costs[np.arange(m), choice].sum()), used, total,
                              status)
        bound -= 2 * (used - limit) / total  # over by HiGHS's tolerance: tighten by the excess
    raise CompressorError("bit allocation: the solver's choice exceeds the budget after tightening")


def brute_force(costs: np.ndarray, bits: np.ndarray, numel: np.ndarray, budget: float) -> tuple[float, list[int]]:
    """(least cost, choice) by enumerating every choice: Cᴹ of them, for tests on small programs."""
    import itertools

    costs, bits = np.asarray(costs, dtype=np.float64), np.asarray(bits, dtype=np.int64)
    limit = budget * int(np.asarray(numel).sum())
    best: tuple[float, list[int]] = (np.inf, [])
    for choice in itertools.product(range(costs.shape[1]), repeat=costs.shape[0]):
        index = (np.arange(costs.shape[0]), np.array(choice))
        if bits[index].sum() <= limit and costs[index].sum() < best[0]:
            best = (float(costs[index].sum()), list(choice))
    return best
