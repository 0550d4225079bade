"""Typed statistics requests and the additive accumulators that answer them.

A compressor asks for statistics with ``Request``s: *what* (``gram`` Σ xᵀx, ``cross_gram`` Σ x_refᵀ x between
the original model's input of the module and the one it now sees, ``abs_mean`` Σ|x| / N,
``sq_norm`` Σ x², ``angular_distance`` between a decoder layer's input and output hidden states), *where*
(a module's ``input`` or ``output``, a q/k linear's output ``rotated`` by RoPE, or the decoder ``layer``), *of which member* of its group (``role``:
"linear" for one-linear groups, a role such as "q" or "down", or "block" for the attention / MLP module)
and at what granularity (``per_head``: output Grams per attention head).

Every accumulator is a plain sum, so partial accumulations merge exactly (``merge``): two halves of the
calibration data accumulated apart and merged equal one pass over all of it. That is what a run spread
over several processes sums. Per tensor ``x`` (tokens, features), accumulated over the calibration data:

- ``gram``: Σ xᵀx (f, f), each batch computed in fp32 and added into an fp64 accumulator (``precision:
  float32``: an fp32 one, as GPTQ's reference keeps its Hessian);
  per head: (heads, d, d) with x reshaped to (tokens, heads, d);
- ``cross_gram``: Σ x_refᵀ x (f, f), likewise, where x_ref is the same token's input of the module in the
  original model (the walk's reference stream: ``walk.layers``), x the one in the model as compressed so far;
- ``drift_cross``: Σ (r_ref − r)ᵀ x (h, f) of a module that writes into the residual stream (a block's last
  linear: o, down), where r (tokens, h) is the residual stream its output is added to (the input of its
  block's norm) in the model as compressed so far and r_ref the same in the original model (reference stream):
  how far the stream has drifted, against the module's input (the block-output refit);
- ``abs_sum``: Σ |x| (f,)   → ``abs_mean`` (ASVD's activation scale);
- ``sq_sum``: Σ x² (f,)     → ``sq_norm`` (Wanda / CURing scores; the Gram's diagonal when a Gram exists);
- ``x_sum``: Σ x (f,)       → ``mean`` (with an output Gram: the bias taken out of it, ``gram_about``).

``Request.matrices`` narrows a request to the wide targets (more inputs than outputs) or to the others, so a
method can take the smaller of a linear's input and output Grams (LoRD's ``gram_side: auto``: at Llama-3's
width down_proj's output Gram is 2048² where its input Gram is 8192²).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Statistic = Literal["gram", "cross_gram", "drift_cross", "abs_mean", "sq_norm", "mean", "angular_distance"]
TENSOR_STATISTICS = ("gram", "cross_gram", "drift_cross", "abs_mean", "sq_norm", "mean")
Matrices = Literal["all", "wide", "not_wide"]
# need the reference stream's tensors of the same batch (a module's input, or the residual stream it writes into)
PAIRED_STATISTICS = ("cross_gram", "drift_cross")


@dataclass(frozen=True)
class Request:
    """One statistic a compressor needs for each of its groups."""

    statistic: Statistic
    # "layer": hidden states entering → leaving it; "rotated": a q/k linear's output after RoPE
    where: Literal["input", "output", "rotated", "layer"] = "input"
    role: str = "linear"  # the group member: "linear", a role ("q", "down"), or "block"
    per_head: bool = False  # output Gram per attention head
    tokens: Literal["all", "last"] = "all"  # angular_distance: every token, or each window's last
    matrices: Matrices = "all"  # which targets it is for: all, wide (in > out features) or not_wide ones
    # gram: summed in fp64 (batch products in fp32), or all in fp32 (GPTQ's reference; half the memory).
    # Modules whose requests differ get fp64.
    precision: Literal["float64", "float32"] = "float64"

    def __post_init__(self) -> None:
        if self.where == "layer" and self.statistic != "angular_distance":
            raise ValueError(f"{self.statistic} is a module statistic; where must be input or output")
        if self.statistic == "angular_distance" and self.where != "layer":
            raise ValueError("angular_distance compares a layer's input and output: where must be 'layer'")
        if self.per_head and (self.statistic != "gram" or self.where not in ("output", "rotated")):
            raise ValueError("per_head applies to output Grams")
        if self.where == "rotated" and not self.per_head:
            raise ValueError("a rotated output is per head: set per_head")
        if self.statistic in PAIRED_STATISTICS and (self.where != "input" or self.per_head):
            raise ValueError(f"{self.statistic} pairs a module's inputs: where must be input, not per head")
        if self.matrices != "all" and self.where == "layer":
            raise ValueError("matrices narrows module statistics; a layer statistic has no matrix")
        if self.precision != "float64" and self.statistic != "gram":
            raise ValueError("precision applies to gram")


def for_matrix(matrices: Matrices, shape: tuple[int, int]) -> bool:
    """Whether a request narrowed to ``matrices`` applies to a linear of ``shape`` (out, in)."""
    wide = shape[1] > shape[0]
    return matrices == "all" or (matrices == "wide") == wide


def inputs(*statistics: Statistic) -> tuple[Request, ...]:
    """Requests of statistics of each linear's input (what every one-linear method asks)."""
    return tuple(Request(s) for s in statistics)


FP32_GRAM = "gram_fp32"  # a marker among a watch's kinds: every gram request on it asked precision float32
GRAM_BLOCK_BYTES = 64 << 20  # a batch's x̃ᵀx larger than this (f > 4096) is made and added in column blocks
SYMMETRIC_MIN_FEATURES = 512  # from this width a batch's x̃ᵀx is made as its upper block triangle, mirrored
SYMMETRIC_BLOCKS = 4  # column blocks of that triangle: 10 of the 16 blocks of the whole product


def _add_gram(total: Tensor | None, x: Tensor) -> Tensor:
    """``total + xᵀx`` (f, f) fp64 for a batch ``x`` (tokens, f) fp32. The product is symmetric, so from
    ``SYMMETRIC_MIN_FEATURES`` only its upper block triangle is computed (``xᵀ[:, :e] x[:, s:e]`` per column
    block) and mirrored: about 60% of the full product's time. A wide one is added block by block in place
    (at f = 8192 the whole batch product is 256 MB of fp32 and, for the first batch, its fp64 copy another
    512 MB). Each block's entries are the same dot products as the whole product's, and that product is
    symmetric bit for bit (BLAS may round a block's differently; on this project's CPU BLAS, MKL, every block
    equals the whole product's entries bit for bit: tests/test_stats.py checks it)."""
    features = x.shape[1]
    if features * features * 4 <= GRAM_BLOCK_BYTES:
        return _add(total, _symmetric_gram(x) if features >= SYMMETRIC_MIN_FEATURES else x.T @ x)
    if total is None:
        total = torch.zeros(features, features, dtype=torch.float64, device=x.device)
    step = max(1, GRAM_BLOCK_BYTES // (4 * features))
    for start in range(0, features, step):
        end = min(features, start + step)
        total[:end, start:end].add_(x[:, :end].T @ x[:, start:end])
    _mirror_upper(total, step)
    return total


def _symmetric_gram(x: Tensor) -> Tensor:
    """``xᵀx`` (f, f) fp32 of ``x`` (tokens, f): its upper block triangle computed, the rest mirrored."""
    features = x.shape[1]
    gram = torch.empty(features, features, dtype=x.dtype, device=x.device)
    step = -(-features // SYMMETRIC_BLOCKS)
    for start in range(0, features, step):
        end = min(features, start + step)
        gram[:end, start:end] = x[:, :end].T @ x[:, start:end]
    return _mirror_upper(gram, step)


def _mirror_upper(matrix: Tensor, step: int) -> Tensor:
    """``matrix`` (f, f) with the blocks below its diagonal blocks of width ``step`` copied from above."""
    for start in range(step, matrix.shape[0], step):
        end = min(matrix.shape[0], start + step)
        matrix[start:end, :start] = matrix[:start, start:end].T
    return matrix


def _add(total: Tensor | None, batch: Tensor) -> Tensor:
    """``total + batch`` into the fp64 ``total`` (the first batch becomes it). A fp32 ``batch`` is added
    in place without an fp64 copy of it: the same sums, and a (f, f) fp64 matrix less at the peak."""
    return batch.double() if total is None else total.add_(batch)


SUMS = ("gram", "cross", "drift", "abs_sum", "sq_sum", "x_sum")  # TensorStats' tensor sums


@dataclass
class TensorStats:
    """Sums over the tensors one module reads (or writes); shared by the modules that read the same one."""

    n_tokens: int = 0
    gram: Tensor | None = None  # (f, f) fp64 Σ xᵀx, or (heads, d, d) per head
    cross: Tensor | None = None  # (f, f) fp64 Σ x_refᵀ x (rows: the reference input's features)
    drift: Tensor | None = None  # (h, f) fp64 Σ (r_ref − r)ᵀ x: the residual stream's drift against the input
    abs_sum: Tensor | None = None  # (f,) fp64 Σ |x|
    sq_sum: Tensor | None = None  # (f,) fp64 Σ x²
    x_sum: Tensor | None = None  # (f,) fp64 Σ x

    @property
    def mean(self) -> Tensor:
        return self.x_sum / max(self.n_tokens, 1)

    def gram_about(self, offset: Tensor | None) -> Tensor:
        """Σ (x − c)(x − c)ᵀ (f, f) fp64 about ``offset`` c (f,), from the Gram and the mean:
        Σ x xᵀ − N (x̄ cᵀ + c x̄ᵀ) + N c cᵀ. A linear's output Gram about its bias is W G Wᵀ (``gram_side``)."""
        if self.gram is None:
            raise ValueError("no Gram was accumulated")
        gram = self.gram.double()
        if offset is None:
            return gram
        if self.x_sum is None:
            raise ValueError("a Gram about an offset needs the mean as well")
        offset, mean = offset.double().to(gram.device), self.mean.to(gram.device)
        cross = torch.outer(mean, offset)  # (f, f): x̄ cᵀ
        return gram - self.n_tokens * (cross + cross.T) + self.n_tokens * torch.outer(offset, offset)

    @property
    def abs_mean(self) -> Tensor:
        return self.abs_sum / max(self.n_tokens, 1)

    @property
    def sq_norm(self) -> Tensor:
        return self.sq_sum if self.sq_sum is not None else torch.diagonal(self.gram).clone()

    def add(self, x: Tensor, kinds: frozenset[str], heads: int | None = None, reference: Tensor | None = None,
            residual: tuple[Tensor, Tensor] | None = None) -> None:
        """Accumulate a batch x (..., f); ``heads``: Grams per head of x viewed as (..., heads, f / heads);
        ``reference`` (..., f): the same tokens' input in the original model (for ``cross_gram``); ``residual``
        (r_ref, r), each (..., h): the residual stream the module writes into, in the original model and as it
        now is (for ``drift_cross``)."""
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, f)
        self.n_tokens += x.shape[0]
        if "gram" in kinds:
            if heads:
                per_head = x.reshape(x.shape[0], heads, -1).transpose(0, 1)  # (heads, tokens, d)
                batch = per_head.transpose(1, 2) @ per_head  # (heads, d, d)
                self.gram = _add(self.gram, batch)
            elif FP32_GRAM in kinds:  # (f, f) all in fp32, added in place: one f×f matrix, no temporary
                self.gram = x.T @ x if self.gram is None else self.gram.addmm_(x.T, x)
            else:  # (f, f): x̃ᵀx in fp32 per batch, summed in fp64
                self.gram = _add_gram(self.gram, x)
        if "cross_gram" in kinds:
            if reference is None:
                raise ValueError("cross_gram needs the reference input of the same batch")
            paired = reference.detach().reshape(-1, x.shape[-1]).float()  # (tokens, f)
            if paired.shape != x.shape:
                raise ValueError(f"cross_gram: reference batch {tuple(paired.shape)} ≠ batch {tuple(x.shape)}")
            self.cross = _add(self.cross, paired.T @ x)  # (f, f)
        if "drift_cross" in kinds:
            self.drift = _add(self.drift, drift_product(x, residual))  # (h, f)
        if "abs_mean" in kinds:
            self.abs_sum = _add(self.abs_sum, x.abs().sum(0))
        if "sq_norm" in kinds and "gram" not in kinds:
            self.sq_sum = _add(self.sq_sum, x.square().sum(0))
        if "mean" in kinds:
            self.x_sum = _add(self.x_sum, x.sum(0))

    def merge(self, other: "TensorStats") -> "TensorStats":
        """Add another partial accumulation of the same statistics into this one (in place)."""
        self.n_tokens += other.n_tokens
        for name in SUMS:
            mine, theirs = getattr(self, name), getattr(other, name)
            if theirs is not None:
                setattr(self, name, theirs.clone() if mine is None else mine.add_(theirs.to(mine.device)))
        return self

    def sums(self) -> tuple[Tensor, list[Tensor]]:
        """What summing across ranks adds (``parallel.distributed.all_reduce_stats``): the count as a fp64
        tensor (1,), and the sums themselves, which are summed in place; ``set_counts`` takes the count back."""
        return (torch.tensor([float(self.n_tokens)], dtype=torch.float64),
                [value for value in (getattr(self, name) for name in SUMS) if value is not None])

    def set_counts(self, counts: Tensor) -> None:
        self.n_tokens = int(counts.item())

    def to(self, device: torch.device) -> "TensorStats":
        for name in SUMS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        return self


def drift_product(x: Tensor, residual: tuple[Tensor, Tensor] | None) -> Tensor:
    """(r_ref − r)ᵀ x (h, f) fp32 of one batch: x (tokens, f) fp32, ``residual`` (r_ref, r) each (..., h)."""
    if residual is None:
        raise ValueError("drift_cross needs the residual stream of the same batch in both models")
    reference, now = (r.detach().reshape(-1, r.shape[-1]).float() for r in residual)  # (tokens, h) each
    if reference.shape != now.shape or reference.shape[0] != x.shape[0]:
        raise ValueError(f"drift_cross: residual batches {tuple(reference.shape)}, {tuple(now.shape)} do not pair "
                         f"with the input batch {tuple(x.shape)}")
    return (reference - now).T @ x


class PendingStats(TensorStats):
    """``TensorStats`` of a routed expert's linear that keeps the batches it saw (its routed tokens, in the
    model's dtype) and sums them when a sum is first read (``settle``): after a layer's statistics pass its E
    experts hold their inputs, N·k tokens in all (N calibration tokens, top-k routing), not E (f, f) Grams; each
    expert's Gram exists from its group's decomposition to its release (``unsettle`` drops the sums again
    between steps, ``release_group`` drops the whole). The sums are the ones ``TensorStats.add`` makes batch by
    batch in the same order: equal bit for bit to an eager accumulation."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[tuple[Tensor, frozenset[str], int | None]] = []
        self.settled = True  # no batch yet: nothing to sum

    def add(self, x: Tensor, kinds: frozenset[str], heads: int | None = None, reference: Tensor | None = None,
            residual: tuple[Tensor, Tensor] | None = None) -> None:
        if kinds & set(PAIRED_STATISTICS):
            raise ValueError("routed experts' statistics are not paired with a reference stream")
        x = x.detach().reshape(-1, x.shape[-1])  # (tokens, f)
        self.batches.append((x, kinds, heads))
        self.n_tokens += x.shape[0]
        self.settled = False

    def settle(self) -> None:
        """Sum the kept batches into the sums (once; again after ``unsettle``)."""
        if object.__getattribute__(self, "settled"):
            return
        self.settled = True
        tokens, self.n_tokens = self.n_tokens, 0
        for x, kinds, heads in self.batches:
            TensorStats.add(self, x, kinds, heads)
        assert self.n_tokens == tokens

    def unsettle(self) -> None:
        """Drop the sums (the batches stay): the next read sums them again. Once summed across ranks, the sums
        are all there is: kept."""
        if not self.batches:
            return
        for name in SUMS:
            setattr(self, name, None)
        self.settled = False

    def sums(self) -> tuple[Tensor, list[Tensor]]:
        """As ``TensorStats.sums``; the sums across ranks then replace this rank's batches (a run spread over
        ranks holds every expert's sums from its statistics pass on)."""
        self.settle()
        self.batches = []
        return super().sums()

    def __getattribute__(self, name: str):
        if name in SUMS:
            object.__getattribute__(self, "settle")()
        return object.__getattribute__(self, name)


def angular_distance(a: Tensor, b: Tensor) -> Tensor:
    """``arccos(cos(a, b)) / π`` along the last dimension: (..., d), (..., d) → (...), in [0, 1]."""
    cosine = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    return torch.arccos(cosine.clamp(-1.0, 1.0)) / torch.pi


def cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """``1 − cos(a, b)`` along the last dimension (ShortGPT's block influence): (..., d), (..., d) → (...)."""
    return 1 - torch.nn.functional.cosine_similarity(a, b, dim=-1)


DISTANCES = {"angular": angular_distance, "cosine": cosine_distance}
DISTANCE_CHUNK = 1 << 18  # elements of one chunk of hidden states whose distances are taken together


@dataclass
class DistanceStats:
    """Σ and count of a distance between a layer's input and output hidden states: ``angular``
    (CURing's layer choice) or ``cosine`` (1 − cos, MoDeGPT's block influence)."""

    total: float = 0.0
    count: int = 0
    measure: Literal["angular", "cosine"] = "angular"

    def add(self, before: Tensor, after: Tensor, tokens: str = "all") -> None:
        """One batch of hidden states (batch, seq, hidden) entering and leaving the layer, in fp64, a few
        hundred tokens at a time (each token's distance is its own: the same values as all at once, with
        fp64 copies that stay in cache)."""
        if tokens == "last":
            before, after = before[:, -1], after[:, -1]  # (batch, hidden)
        a, b = before.reshape(-1, before.shape[-1]), after.reshape(-1, after.shape[-1])  # (tokens, hidden)
        rows = max(1, DISTANCE_CHUNK // a.shape[1])
        distance = torch.cat([DISTANCES[self.measure](a[start:start + rows].double(), b[start:start + rows].double())
                              for start in range(0, a.shape[0], rows)]).reshape(before.shape[:-1])
        self.total, self.count = self.total + float(distance.sum()), self.count + distance.numel()

    def merge(self, other: "DistanceStats") -> "DistanceStats":
        self.total, self.count = self.total + other.total, self.count + other.count
        return self

    def sums(self) -> tuple[Tensor, list[Tensor]]:
        """What summing across ranks adds: (Σ distance, count) as a fp64 tensor (2,), no other tensor."""
        return torch.tensor([self.total, float(self.count)], dtype=torch.float64), []

    def set_counts(self, counts: Tensor) -> None:
        self.total, self.count = float(counts[0]), int(counts[1])

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0
