"""Rank rules shared by every low-rank method.

A rule turns a matrix shape (m, n) into a rank. Exactly one of these is set in a method's config:

- ``ratio``: fraction of the matrix's parameters removed (SVD-LLM): ``r = int((1 − ρ)·m·n / (m + n))``.
- ``rank``: the same explicit rank everywhere.
- ``rank_reduction``: LoRD's ``1 − r / min(m, n)``: ``r = int((1 − rr)·min(m, n))``.
- ``model_ratio``: fraction of the *whole model's* parameters removed (embeddings included); solved
  once, before the layer walk, as the uniform ``ratio`` that meets it (``plan``).

``rank_rule`` says how the budget is spread: ``uniform`` (the rule above, matrix by matrix) or
``welore`` (one threshold τ on every matrix's normalised spectrum, ``welore_rule``): then ``ratio`` is
the fraction of all targeted parameters removed, ``rank_reduction`` the global Σ pruned / Σ min(m, n),
``model_ratio`` as above, and ``rank`` is not allowed. A method that offers it solves τ in ``decide``.
``loss`` (``ranks.loss``) spends a parameter budget (``ratio`` of the targeted parameters, or
``model_ratio``) where the relative truncation loss of the spectra is least; ``taylor`` the same, where the
first-order effect on the model's loss of the components dropped is least (a method that offers it: LoRD).

A factorization saves parameters only if ``r·(m + n) < m·n``; at or above that break-even rank the
matrix stays dense and the log says so. A ratio of 0 (``ratio``, ``model_ratio``) asks for the full rank:
every matrix stays dense (the formula's integer rounding would otherwise factorize matrices to save ≈1 %).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config.configs import field
from ..errors import CompressorError

RULES = ("ratio", "rank", "rank_reduction", "model_ratio")
RankRuleKind = Literal["uniform", "welore", "loss", "taylor"]


@dataclass
class RankRule:
    """Mixin for method configs: the rank rule fields and their checks."""

    ratio: float | None = field(None, "fraction of each matrix's parameters removed, r = int((1-ratio)mn/(m+n))")
    rank: int | None = field(None, "one explicit rank for every targeted matrix")
    rank_reduction: float | None = field(None, "LoRD's rank reduction 1 - r/min(m,n)")
    model_ratio: float | None = field(None, "fraction of the whole model's parameters removed (solved globally)")
    rank_rule: RankRuleKind = field("uniform", "uniform (the same rule per matrix), welore (non-uniform ranks "
                                    "from one threshold on the normalised spectra, meeting the budget globally) "
                                    "or loss (the least total relative truncation loss for the budget), or taylor "
                                    "(the least total first-order loss change |⟨G, component⟩| for the budget)")

    def __post_init__(self) -> None:
        chosen = [name for name in RULES if getattr(self, name) is not None]
        if not chosen:
            self.ratio = 0.2
            chosen = ["ratio"]
        if len(chosen) > 1:
            raise ValueError(f"set only one of {', '.join(RULES)}; got {', '.join(chosen)}")
        for name in ("ratio", "rank_reduction", "model_ratio"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1); got {value}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be ≥ 1; got {self.rank}")
        if self.rank_rule == "welore" and self.rank is not None:
            raise ValueError("rank_rule welore needs a budget (ratio, rank_reduction or model_ratio), not a rank")
        if self.rank_rule in ("loss", "taylor") and self.rule not in ("ratio", "model_ratio"):
            raise ValueError(f"rank_rule {self.rank_rule} needs a parameter budget: ratio or model_ratio")

    @property
    def rule(self) -> str:
        return next(name for name in RULES if getattr(self, name) is not None)

    def validate(self, shapes: dict[str, tuple[int, int]]) -> None:
        """Explicit ranks must fit every targeted (out, in) shape; checked before any weight is read."""
        if self.rank_rule == "uniform" and self.model_ratio is None:
            for m, n in shapes.values():
                rank_for(self, m, n)


def break_even(m: int, n: int) -> float:
    """The rank at which a factorization stores as many parameters as the dense matrix."""
    return m * n / (m + n)


def rank_for(rule: RankRule, m: int, n: int, planned_ratio: float | None = None) -> int:
    """The rank the rule asks for on an (m, n) matrix (before the break-even check)."""
    if getattr(rule, "rank_rule", "uniform") != "uniform":
        raise CompressorError(f"rank_rule {rule.rank_rule} is global: its ranks come from the method's plan")
    if rule.rank is not None:
        if rule.rank > min(m, n):
            raise CompressorError(f"rank {rule.rank} is larger than min(m, n) = {min(m, n)} of a {m}×{n} matrix")
        return rule.rank
    if rule.rank_reduction is not None:
        return max(1, int((1.0 - rule.rank_reduction) * min(m, n)))
    ratio = rule.ratio if rule.ratio is not None else planned_ratio
    if ratio is None:
        raise CompressorError("model_ratio needs a plan; run it through the pipeline")
    if ratio == 0:  # nothing to remove: the full rank, so the matrix stays dense (not int rounding's 1 %)
        return min(m, n)
    return max(1, int((1.0 - ratio) * break_even(m, n)))


def saves_parameters(rank: int, m: int, n: int) -> bool:
    return rank * (m + n) < m * n


def removed_by_ratio(ratio: float, shapes: list[tuple[int, int]]) -> int:
    """The parameters a uniform ``ratio`` removes from matrices of ``shapes`` (its integer ranks; a matrix whose
    rank would not save parameters stays dense)."""
    total = 0
    for m, n in shapes:
        r = max(1, int((1.0 - ratio) * break_even(m, n)))
        if saves_parameters(r, m, n):
            total += m * n - r * (m + n)
    return total


def plan_model_ratio(target: float, shapes: list[tuple[int, int]], model_params: int) -> float:
    """The uniform per-matrix ``ratio`` whose integer ranks remove ``target·model_params`` parameters."""

    def removed(ratio: float) -> int:
        return removed_by_ratio(ratio, shapes)

    if target == 0:
        return 0.0
    goal = target * model_params
    if removed(0.999) < goal:
        raise CompressorError(
            f"model_ratio {target} is out of reach: the targeted matrices hold only "
            f"{sum(m * n for m, n in shapes) / model_params:.1%} of the model's parameters"
        )
    low, high = 0.0, 0.999
    for _ in range(50):
        mid = (low + high) / 2
        low, high = (mid, high) if removed(mid) < goal else (low, mid)
    return high


def uniform_ranks(rule: RankRule, shapes: dict[str, tuple[int, int]],
                  model_params: int) -> tuple[dict[str, int], dict]:
    """(name → rank, the decision record) of a uniform rule over every target; ``model_ratio`` is solved
    once here as the uniform ratio that meets it (recorded as ``solved_ratio``)."""
    record: dict = {"rank_rule": "uniform", "rule": rule.rule}
    ratio = None
    if rule.model_ratio is not None:
        ratio = plan_model_ratio(rule.model_ratio, list(shapes.values()), model_params)
        record["solved_ratio"] = ratio
    chosen = {name: rank_for(rule, m, n, ratio) for name, (m, n) in shapes.items()}
    record["ranks"] = chosen
    return chosen, record


def preview_ranks(rule: RankRule, shapes: dict[str, tuple[int, int]],
                  model_params: int) -> dict[str, dict] | None:
    """name → {rank, params} a uniform rule gives (a matrix that would not save parameters stays dense:
    rank None); None for a global rule (its ranks come from the weights or data)."""
    if getattr(rule, "rank_rule", "uniform") != "uniform":
        return None
    chosen, _ = uniform_ranks(rule, shapes, model_params)
    found = {}
    for name, rank in chosen.items():
        m, n = shapes[name]
        saves = saves_parameters(rank, m, n)
        found[name] = {"rank": rank if saves else None, "params": rank * (m + n) if saves else m * n}
    return found


def reduction(log: list[dict]) -> dict:
    """Rank and parameter reduction of the targeted linears, from the walk's log entries, side by side.

    Per module: parameters before its first step and after its last; its rank loss ``min(m, n) − rank``
    from its last entry that has a rank (a dense or unranked module loses none). ``rank_reduction`` is
    Σ rank loss / Σ min(m, n) (WeLore's and LoRD's "rank reduction", over all targeted matrices),
    ``param_reduction`` is 1 − Σ after / Σ before. They differ: a square matrix saves nothing until
    it loses half its rank.
    """
    modules: dict[str, dict] = {}
    for entry in log:
        module = modules.setdefault(entry["name"], {"before": entry["params_before"], "full": min(entry["shape"]),
                                                    "lost": 0})
        module["after"] = entry["params_after"]
        if entry.get("rank") is not None:
            module["lost"] = module["full"] - entry["rank"]
    before = sum(m["before"] for m in modules.values())
    after = sum(m["after"] for m in modules.values())
    full = sum(m["full"] for m in modules.values())
    return {"targeted_modules": len(modules), "factorized": sum(1 for m in modules.values() if m["lost"] > 0),
            "targeted_params_before": before, "targeted_params_after": after,
            "param_reduction": 1.0 - after / before if before else 0.0,
            "rank_reduction": sum(m["lost"] for m in modules.values()) / full if full else 0.0}
