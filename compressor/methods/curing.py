"""CURing: CUR decomposition of the least important decoder layers (Park & Moon, arXiv:2501.04211).

Two stages (docs/methods.md#curing-curing):

1. **Layer selection.** One calibration pass through the decoder layers gives, for each layer l, the
   angular distance ``d_l = arccos(cos(h_in, h_out)) / π`` between the hidden state entering it and the
   one leaving it, averaged over the calibration windows. Layers 1 … L−2 are candidates (never the first
   or the last); the ``n_layers`` with the smallest ``d_l`` (the layers that change the residual stream
   least) are compressed. ``distance_tokens: last`` compares the last token of each window, as the
   reference code does with its last non-pad token (our windows carry no padding, so it is the window's
   last position); ``all`` averages over every token. The reference's other rules, ``last`` (the last
   ``n_layers`` candidates) and ``random`` (seeded), are there for comparison.

2. **CUR of each targeted W (m, n)** of a chosen layer (q_proj, k_proj, gate_proj in the paper):

   - score S (m, n): ``wanda`` ``|W|·rms(x)`` (the paper), ``signed`` ``W·rms(x)`` (v2's ``cov_fast``),
     ``covariance`` ``W·Σ^½`` with ``Σ = E[xxᵀ]`` (v2's ``cov``), ``weight`` ``|W|``;
   - rank r: ``paper`` ``min(break-even, max_rank)`` where the CUR break-even is the largest r with
     ``r(m+n) + r² < mn``; ``energy`` (v2) the smallest r whose leading singular values of S hold the
     fraction ``energy`` of ‖S‖²_F, kept dense if that exceeds the break-even. ``rank_multiple`` rounds
     the energy rank up and the break-even down (v2 uses 128). A matrix never becomes larger: whenever
     the final r gives ``r(m+n) + r² ≥ mn`` it stays dense;
   - DEIM (Sorensen & Embree) on the top-r left / right singular vectors of S picks r rows and r columns;
     the SVD is exact (``deim: exact``) or a seeded randomized range finder (``randomized``, v2's
     ``svd_lowrank(q = r + 20, niter = 2)``);
   - ``C = W[:, cols]`` (m, r), ``R = W[rows, :]`` (r, n), ``U = C⁺ (W D) (R D)⁺`` (r, r), the least-squares
     link minimising ‖(W − C U R) D‖_F, with D = I for wanda / weight (v1), ``diag(rms)`` for signed and
     ``Σ^½`` for covariance (v2). Everything in fp64; C and R are exact slices of the weight.

Reference code, two generations (lukepark327/CURing): v1 (be039c36, the paper's "8.03B → 7.32B") and v2
(HEAD). Defaults follow v1: wanda score, paper rank with max_rank 256, exact SVD for DEIM, and the
statistics (Σx² per input channel) taken from the original model in the same calibration pass that
measures the distances (``statistics: selection``), so the layer walk needs no forward pass at all.
``statistics: walk`` instead collects them during the layer walk on the chosen layers only (then
``propagate`` applies). Deliberate departures from both codes: DEIM is the textbook one (both codes use
cheaper updates that are not interpolatory after the second pick), U is always computed in fp64 with a
relative pinv cut-off of 1e-6 (v2's), ``Σ`` is the uncentred second moment (what the output error
‖(W − Ŵ) Xᵀ‖ measures; v2 subtracts the mean), and a rank that would not save parameters keeps the
matrix dense instead of growing it (v2 with ``min_rank`` can) or aborting the run (v2's energy rule).

```yaml
steps:
  - method: curing
    targets: [self_attn.q_proj, self_attn.k_proj, mlp.gate_proj]
    config: {n_layers: 10, score: wanda, rank_rule: paper, max_rank: 256}
```
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .. import timing
from ..config.configs import field
from ..contract import Decision, LayerContext, LinearCompressor, ModelView, Outcome, Target
from ..errors import CompressorError
from ..kernels import linalg
from ..kernels.linalg import symmetric_sqrt
from ..model.modules import CURLinear
from ..model.targets import names_by_layer
from ..parallel.distributed import all_reduce_stats
from ..stats.accumulators import DistanceStats, Request, TensorStats, inputs
from ..stats.hooks import Collector, Watch

Score = Literal["wanda", "signed", "covariance", "weight"]
PINV_RTOL = 1e-6  # relative cut-off of the pseudo-inverses of C and R D (v2's rcond for fp32 weights)


@dataclass
class CURingConfig:
    n_layers: int = field(10, "number of decoder layers to compress (never the first or the last)")
    layer_selection: Literal["angular", "last", "random"] = field(
        "angular", "angular: smallest angular distance between a layer's input and output hidden states; "
        "last: the last n_layers candidates; random: seeded sample")
    distance_tokens: Literal["last", "all"] = field(
        "last", "hidden states compared: the last token of each window (reference) or every token")
    statistics: Literal["selection", "walk"] = field(
        "selection", "selection: input statistics of the original model from the layer-selection pass (v1, "
        "one pass; holds them for every candidate layer until the choice, Grams too for score covariance); "
        "walk: collected during the layer walk on the chosen layers only (honours propagate)")
    score: Score = field("wanda", "row/column score: wanda |W|·rms(x), signed W·rms(x) (v2 cov_fast), "
                                  "covariance W·Σ^½ (v2 cov), weight |W|")
    deim: Literal["exact", "randomized"] = field(
        "exact", "singular vectors for DEIM: full SVD, or randomized range finder (v2's svd_lowrank)")
    oversample: int = field(20, "extra random directions of deim: randomized")
    power_iterations: int = field(2, "power iterations of deim: randomized")
    rank_rule: Literal["paper", "energy"] = field(
        "paper", "paper: min(CUR break-even, max_rank); energy: smallest rank holding `energy` of ‖S‖²_F")
    max_rank: int | None = field(256, "upper bound on the rank (the paper's 256); null for none")
    min_rank: int | None = field(None, "lower bound on the rank (v2); a rank that saves nothing stays dense")
    energy: float = field(0.88, "fraction of ‖S‖²_F kept by rank_rule: energy (v2 uses 0.85–0.89)")
    rank_multiple: int = field(1, "round the energy rank up and the break-even down to a multiple (v2: 128)")
    seed: int = field(0, "seed of layer_selection: random and deim: randomized")

    def __post_init__(self) -> None:
        if self.n_layers < 1:
            raise ValueError(f"n_layers must be ≥ 1; got {self.n_layers}")
        for name in ("max_rank", "min_rank"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be ≥ 1 or null; got {value}")
        if not 0.0 < self.energy <= 1.0:
            raise ValueError(f"energy must be in (0, 1]; got {self.energy}")
        if self.rank_multiple < 1 or self.oversample < 0 or self.power_iterations < 0:
            raise ValueError("rank_multiple must be ≥ 1, oversample and power_iterations ≥ 0")


# ----------------------------------------------------------------------------------------------------------
# Layer selection


def candidate_layers(n_total: int) -> list[int]:
    """Layers CURing may compress: all but the first and the last."""
    return list(range(1, n_total - 1))


def select_layers(rule: str, n_total: int, count: int, distances: dict[int, float] | None = None,
                  seed: int = 0) -> list[int]:
    """The ``count`` layers to compress among ``candidate_layers(n_total)``, ascending.

    angular: smallest ``distances[l]`` (ties by index); last: the last ``count`` candidates; random: seeded.
    """
    candidates = candidate_layers(n_total)
    if count > len(candidates):
        raise CompressorError(f"curing: n_layers {count} is more than the {len(candidates)} candidate layers "
                              f"of a {n_total}-layer model (the first and the last are never compressed)")
    if rule == "angular":
        chosen = sorted(candidates, key=lambda index: (distances[index], index))[:count]
    elif rule == "last":
        chosen = candidates[-count:]
    elif rule == "random":
        chosen = random.Random(seed).sample(candidates, count)
    else:
        raise CompressorError(f"curing: unknown layer_selection {rule!r}")
    return sorted(chosen)


@timing.timed("selection")
def selection_pass(view: ModelView, *, last_layer: int, distance_layers: set[int], collect: dict[int, list[str]],
                   kinds: frozenset[str], tokens: str = "last") -> tuple[dict[int, float], dict[str, TensorStats]]:
    """One walk through decoder layers 0 … ``last_layer`` of the unmodified model (the rest never runs: no
    final norm, no head). Returns (layer → mean angular distance between its input and output hidden
    states, for ``distance_layers``; linear name → input statistics ``kinds``, for ``collect[layer]``)."""
    distances: dict[int, float] = {}
    statistics: dict[str, TensorStats] = {}
    for visit in view.walk(last_layer=last_layer):
        names = collect.get(visit.index, [])
        collector = Collector([Watch(n, visit.module(n), "input", kinds) for n in names])
        inputs_ = visit.inputs()
        outputs = visit.forward(collector=collector)
        if visit.index in distance_layers:
            distance = DistanceStats()
            for before, after in zip(inputs_, outputs):  # (batch, seq, hidden) each
                distance.add(before, after, tokens)
            all_reduce_stats([distance])
            distances[visit.index] = distance.mean
        statistics.update({name: stats.to(visit.offload) for (name, _), stats in collector.result().items()})
    return distances, statistics


# ----------------------------------------------------------------------------------------------------------
# Ranks and parameter counts


def cur_parameters(rank: int, m: int, n: int) -> int:
    """Parameters of C (m, r), U (r, r) and R (r, n)."""
    return rank * (m + n) + rank * rank


def cur_break_even(m: int, n: int) -> int:
    """The largest r with ``r(m+n) + r² < mn``: ``⌊(√(m² + 6mn + n²) − (m+n)) / 2⌋``, strictly below."""
    rank = int((math.sqrt(m * m + 6 * m * n + n * n) - (m + n)) / 2)
    while rank > 0 and cur_parameters(rank, m, n) >= m * n:
        rank -= 1
    while cur_parameters(rank + 1, m, n) < m * n:
        rank += 1
    return rank


def energy_rank(singular_values: Tensor, energy: float) -> int:
    """The smallest r with ``Σ_{i<r} σ_i² ≥ energy · Σ σ_i²`` (σ descending)."""
    power = singular_values.double().square()
    total = float(power.sum())
    if not total > 0:
        return 1
    cumulative = torch.cumsum(power, 0) / total
    target = torch.tensor(min(energy, 1.0) - 1e-12, dtype=cumulative.dtype, device=cumulative.device)
    return min(int(torch.searchsorted(cumulative, target)) + 1, power.numel())


def choose_rank(m: int, n: int, rule: str = "paper", *, max_rank: int | None = 256,
                min_rank: int | None = None, multiple: int = 1, singular_values: Tensor | None = None,
                energy: float = 0.88) -> tuple[int | None, str]:
    """(rank, note) for an (m, n) weight; rank None means the matrix stays dense (the note says why)."""
    limit = (cur_break_even(m, n) // multiple) * multiple
    if rule == "paper":
        rank, note = limit, f"break-even {limit}"
    elif rule == "energy":
        wanted = -(-energy_rank(singular_values, energy) // multiple) * multiple
        if wanted > limit:
            return None, f"energy rank {wanted} > break-even {limit}: kept dense"
        rank, note = wanted, f"energy {energy} rank {wanted}, break-even {limit}"
    else:
        raise CompressorError(f"curing: unknown rank_rule {rule!r}")
    if max_rank is not None and rank > max_rank:
        rank, note = max_rank, note + f", max_rank {max_rank}"
    if min_rank is not None and rank < min_rank:
        rank, note = min_rank, note + f", min_rank {min_rank}"
    rank = min(rank, m, n)
    if rank < 1 or cur_parameters(rank, m, n) >= m * n:
        return None, f"rank {rank} saves no parameters ({note}): kept dense"
    return rank, note


# ----------------------------------------------------------------------------------------------------------
# Scores, DEIM and the CUR factors


def activation_scales(stats: TensorStats | None, score: str) -> tuple[Tensor | None, Tensor | None]:
    """(rms (n,) = √(Σx²/N), Σ^½ (n, n) of ``Σ = XᵀX/N``) from the statistics, where ``score`` uses them."""
    if score == "weight":
        return None, None
    if stats is None:
        raise CompressorError(f"curing: score {score!r} needs calibration statistics")
    tokens = max(stats.n_tokens, 1)
    if score == "covariance":
        return None, symmetric_sqrt(stats.gram.double() / tokens)
    return (stats.sq_norm.double() / tokens).clamp_min(0).sqrt(), None


def score_matrix(weight: Tensor, score: str, rms: Tensor | None = None, root: Tensor | None = None) -> Tensor:
    """The importance matrix S (m, n) whose singular vectors DEIM reads."""
    if score == "wanda":
        return weight.abs() * rms[None, :].to(weight)
    if score == "signed":
        return weight * rms[None, :].to(weight)
    if score == "covariance":
        return weight @ root.to(weight)
    if score == "weight":
        return weight.abs()
    raise CompressorError(f"curing: unknown score {score!r}")


def least_squares_weighting(score: str, rms: Tensor | None, root: Tensor | None) -> Tensor | None:
    """D of ``U = C⁺ (W D) (R D)⁺``: None (identity), a vector (diagonal) or a matrix."""
    return {"signed": rms, "covariance": root}.get(score)


def randomized_svd(matrix: Tensor, rank: int, oversample: int = 20, power_iterations: int = 2,
                   seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Leading ``rank`` singular triplets of ``matrix`` (m, n) by a seeded randomized range finder
    (Halko, Martinsson & Tropp) with QR-stabilised power iterations: (m, r), (r,), (n, r)."""
    m, n = matrix.shape
    width = min(rank + oversample, m, n)
    generator = torch.Generator().manual_seed(seed)
    probe = torch.randn(n, width, generator=generator, dtype=matrix.dtype).to(matrix.device)  # (n, q)
    basis = torch.linalg.qr(matrix @ probe).Q  # (m, q)
    for _ in range(power_iterations):
        basis = torch.linalg.qr(matrix.T @ basis).Q  # (n, q)
        basis = torch.linalg.qr(matrix @ basis).Q  # (m, q)
    left, values, right_h = torch.linalg.svd(basis.T @ matrix, full_matrices=False)  # (q, q), (q,), (q, n)
    return (basis @ left)[:, :rank], values[:rank], right_h[:rank].T


def singular_vectors(matrix: Tensor, rank: int, method: str = "exact", oversample: int = 20,
                     power_iterations: int = 2, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Leading ``rank`` left (m, r) and right (n, r) singular vectors of ``matrix`` (m, n)."""
    if method == "randomized":
        left, _, right = randomized_svd(matrix, rank, oversample, power_iterations, seed)
        return left, right
    left, _, right_h = linalg.svd(matrix)
    return left[:, :rank], right_h[:rank].T


def deim(vectors: Tensor) -> Tensor:
    """DEIM indices (r,) of the rows of ``vectors`` (m, r), r ≤ m distinct rows (Chaturantabut & Sorensen).

    Step j picks the row where the interpolation residual of column j is largest, the residual being
    column j minus its interpolation by the columns before it on the rows picked so far. Kept as
    residuals, these steps are Gaussian elimination with partial pivoting (Sorensen & Embree, §3): the
    picked rows are the pivot rows of ``vectors``' LU factorization, in order, so LAPACK's ``getrf`` does
    all r steps in one call. ``vectors[picked]`` is nonsingular whenever the columns are independent.
    """
    m, r = vectors.shape
    _, swaps = torch.linalg.lu_factor(vectors)  # LAPACK row interchanges (min(m, r),), 1-based
    order = list(range(m))
    for step, swap in enumerate(swaps.tolist()):
        order[step], order[swap - 1] = order[swap - 1], order[step]
    return torch.tensor(order[:r], dtype=torch.long)


def cur_factors(weight: Tensor, rows: Tensor, cols: Tensor, weighting: Tensor | None = None,
                rtol: float = PINV_RTOL) -> tuple[Tensor, Tensor, Tensor]:
    """C = W[:, cols] (m, r), U (r, r), R = W[rows, :] (r, n) with ``U = C⁺ (W D) (R D)⁺``."""
    cols, rows = cols.to(weight.device), rows.to(weight.device)
    C, R = weight[:, cols], weight[rows, :]  # (m, r), (r, n)
    if weighting is None:
        target, rows_weighted = weight, R
    elif weighting.dim() == 1:
        target, rows_weighted = weight * weighting[None, :].to(weight), R * weighting[None, :].to(weight)
    else:
        target, rows_weighted = weight @ weighting.to(weight), R @ weighting.to(weight)
    U = torch.linalg.pinv(C, rtol=rtol) @ target @ torch.linalg.pinv(rows_weighted, rtol=rtol)  # (r, r)
    return C, U, R


# ----------------------------------------------------------------------------------------------------------
# The compressor


def score_kinds(score: str) -> frozenset[str]:
    return {"wanda": frozenset({"sq_norm"}), "signed": frozenset({"sq_norm"}),
            "covariance": frozenset({"gram"}), "weight": frozenset()}[score]


class CURing(LinearCompressor):
    name = "curing"
    Config = CURingConfig
    summary = "CUR (actual rows and columns by DEIM) of the layers whose hidden state changes least"
    paper = "arXiv:2501.04211"

    def __init__(self, config: CURingConfig) -> None:
        super().__init__(config)
        self.selection_stats: dict[str, TensorStats] = {}

    def requests(self) -> tuple[Request, ...]:
        return inputs(*sorted(score_kinds(self.config.score))) if self.config.statistics == "walk" else ()

    @property
    def uses_data(self) -> bool:
        return self.config.layer_selection == "angular" or bool(score_kinds(self.config.score))

    def decide(self, view: ModelView) -> Decision:
        """The layers to compress (and, with statistics: selection, their targets' input statistics)."""
        config = self.config
        n_total = _n_layers(view)
        by_layer = names_by_layer(view.model, view.shapes)
        angular = config.layer_selection == "angular"
        selected, distances = None, {}
        if not angular:  # known before any data is seen
            selected = select_layers(config.layer_selection, n_total, config.n_layers, seed=config.seed)
        kinds = score_kinds(config.score) if config.statistics == "selection" else frozenset()
        if angular or kinds:
            if view.batches is None:
                raise CompressorError("curing needs calibration data (layer selection or statistics)")
            layers_with_stats = candidate_layers(n_total) if angular else selected
            collect = {i: by_layer.get(i, []) for i in layers_with_stats} if kinds else {}
            distances, self.selection_stats = selection_pass(
                view, last_layer=n_total - 2 if angular else max(selected),
                distance_layers=set(candidate_layers(n_total)) if angular else set(), collect=collect,
                kinds=kinds, tokens=config.distance_tokens)
        if angular:
            selected = select_layers("angular", n_total, config.n_layers, distances)
        keep = [name for i in selected for name in by_layer.get(i, [])]
        kept = set(keep)
        self.selection_stats = {k: v for k, v in self.selection_stats.items() if k in kept}
        return Decision({"layers": selected, "distances": distances}, targets=keep,
                        values={"layers": selected, "distances": distances})

    def compress_linear(self, target: Target, ctx: LayerContext) -> Outcome:
        config = self.config
        weight = target.weight.double()  # (m, n)
        m, n = weight.shape
        stats = target.stats if config.statistics == "walk" else self.selection_stats.get(target.name)
        rms, root = activation_scales(stats, config.score)
        scores = score_matrix(weight, config.score, rms, root)  # (m, n)
        full_svd = linalg.svd(scores) if config.deim == "exact" else None
        spectrum = None
        if config.rank_rule == "energy":
            spectrum = full_svd[1] if full_svd is not None else torch.linalg.svdvals(scores)
        rank, note = choose_rank(m, n, config.rank_rule, max_rank=config.max_rank,
                                 min_rank=config.min_rank, multiple=config.rank_multiple,
                                 singular_values=spectrum, energy=config.energy)
        extra = {"layer_distance": target.decision.values["distances"].get(ctx.layer_index)}
        if rank is None:
            return Outcome(None, note=note, extra=extra)
        if full_svd is not None:
            left, right = full_svd[0][:, :rank], full_svd[2][:rank].T  # (m, r), (n, r)
        else:
            left, right = singular_vectors(scores, rank, "randomized", config.oversample,
                                           config.power_iterations, config.seed)
        rows, cols = deim(left), deim(right)
        C, U, R = cur_factors(weight, rows, cols, least_squares_weighting(config.score, rms, root))
        module = CURLinear.from_factors(C, U, R, rows, cols, target.bias, target.dense_class, dtype=ctx.dtype)
        return Outcome(module, rank=rank, note=f"CUR rank {rank} ({note})", extra=extra)


def _n_layers(view: ModelView) -> int:
    from ..model.targets import decoder_layers

    return len(decoder_layers(view.model)[1])
