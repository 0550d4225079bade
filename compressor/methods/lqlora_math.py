"""LQ-LoRA's decomposition ``W ≈ Q + L1 L2`` (Guo, Greengard, Xing, Kim; ICLR 2024, arXiv:2311.12023;
docs/methods.md#lq-lora-lqlora), as pure functions of tensors.

For a weight ``W`` (m, n), a rank k and a NormalFloat configuration c (``kernels.normal_float``)::

    Q = 0
    for t = 1 … T:
        L1 (m, k), L2 (k, n) = SVD_k(W − Q)          # √Σ on both factors; randomized (seeded) or exact
        Q = NF_c(W − L1 L2)                          # quantize the residual of the low-rank part
        e_t = ‖W − Q − L1 L2‖_F                       # Fisher variant: ‖√F ⊙ (W − Q − L1 L2)‖_F
        stop when e_t ≥ e_{t−1}
    return the iterate of least error

The Fisher-weighted variant (data-aware, the paper's §3.3) weights the low-rank fit on both sides with the
row and column sums of the empirical Fisher ``F`` (m, n), ``r_i = √(Σ_j F_ij + eps)``,
``c_j = √(Σ_i F_ij + eps)`` (``stats.fisher.diagonal_weight``): ``SVD_k(diag(r) (W − Q) diag(c))``, then
``L1 = diag(r)⁻¹ U Σ^½``, ``L2 = Σ^½ Vᵀ diag(c)⁻¹`` (``linalg.whitened_svd`` with ``left`` and a diagonal
whitening); the quantizer is not weighted; the error that picks the iterate is ``‖√F ⊙ E‖_F``.

Where this departs from the reference code (HanGuo97/lq-lora ``lowrank_quantized_sparse_decomposition``):

- it returns the *best* iterate; the reference breaks when the error grows and returns that worse iterate
  (its own TODO says so). The errors up to the returned iterate are therefore non-increasing;
- it stops on ``e_t ≥ e_{t−1}`` rather than ``>``: with a seeded sketch an equal error is a fixed point
  (the same Q gives the same L), which the reference would repeat to the iteration limit; ``tolerance``
  (default 0, the paper's rule) stops once the relative decrease is below it;
- the randomized SVD draws its Gaussian from its own seeded generator (``linalg.Sketch``), so the
  decomposition is reproducible (``torch.svd_lowrank`` uses the global RNG): the bit allocation's error of
  a (matrix, configuration) is the error of the module that is then built;
- the Fisher weights use sums instead of the reference's means (the same factors up to ``eps``) and the
  shared floor of ``linalg.diagonal`` (1e-6 of the largest), so a row or column of zero Fisher never
  divides by zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..kernels import linalg
from ..kernels import normal_float as nf
from ..kernels.one_thread import serial
from ..stats.fisher import diagonal_weight


@dataclass
class Decomposition:
    """``W ≈ Q + up @ down`` and how the iterations went."""

    codes: nf.NFCodes  # Q
    up: Tensor | None  # L1 (m, k) fp32; None at rank 0
    down: Tensor | None  # L2 (k, n) fp32
    error: float  # the returned iterate's error (Fisher-weighted in the Fisher variant)
    errors: list[float] = field(default_factory=list)  # e_1 … e_t, one per iteration run
    best: int = 0  # index into ``errors`` of the returned iterate

    def approximation(self) -> Tensor:
        """Q + L1 L2 (m, n) fp32."""
        q = self.codes.dequantize()
        return q if self.up is None else q + self.up.float() @ self.down.float()


def reconstruction_error(weight: Tensor, approx: Tensor, fisher_root: Tensor | None = None) -> float:
    """‖W − Ŵ‖_F, or ‖√F ⊙ (W − Ŵ)‖_F with ``fisher_root`` = √F (m, n); in fp64."""
    delta = weight.double() - approx.double()
    if fisher_root is not None:
        delta = delta * fisher_root.double()
    return float(torch.linalg.matrix_norm(delta))


def fisher_weights(fisher: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(row weights r (m,), column weights c (n,), √F (m, n)) of a Fisher (m, n), fp32."""
    fisher = torch.nan_to_num(fisher.float(), nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0)
    rows = diagonal_weight(fisher, "out", eps).float()
    cols = diagonal_weight(fisher, "in", eps).float()
    return rows, cols, fisher.sqrt()


def quantization_error(weight: Tensor, config: nf.NFConfig, fisher: Tensor | None = None) -> float:
    """The error of NormalFloat quantization alone (no low-rank part): ‖W − NF_c(W)‖_F (or √F-weighted)."""
    root = None if fisher is None else torch.nan_to_num(fisher.float()).clamp_min(0).sqrt()
    return reconstruction_error(weight, nf.fake_quantize(weight, config), root)


def initial_low_rank(weight: Tensor, rank: int, *, sketch: linalg.Sketch | None = linalg.Sketch(),
                     fisher: Tensor | None = None, eps: float = 1e-6,
                     svd_dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """The first iterate's low-rank part ``SVD_k(W − 0)``: (L1 (m, k), L2 (k, n)) fp32. It does not depend on
    the NormalFloat configuration, so the pricing computes it once per matrix and every configuration's
    ``decompose`` starts from it (``start``), with the numbers of a decomposition that computes it itself."""
    weight = weight.detach().float()
    rows = whitening = None
    if fisher is not None:
        rows, cols, _ = fisher_weights(fisher.to(weight.device), eps)
        whitening = linalg.diagonal(cols)
    with serial():  # one torch thread: the same bits on any machine (and no threads waiting on busy cores)
        up, down, _ = linalg.whitened_svd(weight, rank, whitening, svd_dtype, left=rows, sketch=sketch)
    return up.float(), down.float()


def decompose(weight: Tensor, rank: int, config: nf.NFConfig, *, iterations: int = 100,
              sketch: linalg.Sketch | None = linalg.Sketch(), fisher: Tensor | None = None, eps: float = 1e-6,
              tolerance: float = 0.0, svd_dtype: torch.dtype = torch.float32,
              start: tuple[Tensor, Tensor] | None = None) -> Decomposition:
    """LQ-LoRA's alternating decomposition of ``weight`` (m, n) at ``rank`` (0: quantization alone) under
    ``config``; ``sketch`` None: exact SVD; ``fisher`` (m, n): the Fisher-weighted variant. ``start``: the first
    iterate's low-rank part (L1 (m, k), L2 (k, n)) instead of ``SVD_k(W)`` (``initial_low_rank`` gives the one
    this would compute: the same decomposition; another, e.g. a neighbouring configuration's, warm-starts it).
    Runs on one torch thread (``serial``): its iterates, and so where it stops, are the same bits whatever the
    machine's thread count (threaded reductions round differently and change the path)."""
    with serial():
        return _decompose(weight, rank, config, iterations, sketch, fisher, eps, tolerance, svd_dtype, start)


def _decompose(weight: Tensor, rank: int, config: nf.NFConfig, iterations: int, sketch: linalg.Sketch | None,
               fisher: Tensor | None, eps: float, tolerance: float, svd_dtype: torch.dtype,
               start: tuple[Tensor, Tensor] | None) -> Decomposition:
    weight = weight.detach().float()
    rows = whitening = root = None
    if fisher is not None:
        rows, cols, root = fisher_weights(fisher.to(weight.device), eps)
        whitening = linalg.diagonal(cols)
    if rank == 0:
        codes = nf.quantize(weight, config)
        error = reconstruction_error(weight, codes.dequantize(), root)
        return Decomposition(codes, None, None, error, [error], 0)
    weight64 = weight.double()  # (m, n): converted once, not per iteration (the same error as reconstruction_error)
    root64 = None if root is None else root.double()
    best: Decomposition | None = None
    errors: list[float] = []
    residual_q = torch.zeros_like(weight)  # Q of the previous iterate (dequantized)
    for _ in range(max(1, iterations)):
        if start is not None and not errors:
            up, down = start
        else:
            up, down, _ = linalg.whitened_svd(weight - residual_q, rank, whitening, svd_dtype, left=rows,
                                              sketch=sketch)
        up, down = up.float(), down.float()
        low_rank = up @ down  # (m, n)
        codes = nf.quantize(weight - low_rank, config)
        residual_q = codes.dequantize()
        error = fp64_error(weight64, residual_q + low_rank, root64)
        errors.append(error)
        if best is None or error < best.error:
            best = Decomposition(codes, up, down, error, errors, len(errors) - 1)
        previous = errors[-2] if len(errors) > 1 else math.inf
        if error >= previous * (1 - tolerance):
            break
    best.errors = errors
    return best


def fp64_error(weight64: Tensor, approx: Tensor, root64: Tensor | None) -> float:
    """``reconstruction_error`` with W (m, n) and √F (m, n) already in fp64 (the same number, less conversion)."""
    delta = weight64 - approx.double()
    if root64 is not None:
        delta = delta * root64
    return float(torch.linalg.matrix_norm(delta))
