"""Low-rank factors stored in integers: the ``factor_bits`` option of the factorizing methods (LoRD and its
variants, FWSVD, WeLore).

``factor_bits: 8`` stores each factor of ``W ≈ up·down`` as symmetric per-row int8 with one scale per row
(``up`` (m, r): per output row; ``down`` (r, n): per rank component), in the ``low_rank`` kind's
``QuantizedLinear`` children, so a factorization's bytes on disk are about half its 16-bit ones at the same
rank. The rounding is error-aware under the method's own objective ‖diag(s) (W − up·down) S‖_F
(``integer_factors``): ``down`` is rounded first by GPTQ with the input Gram G = S Sᵀ as its Hessian (a whitened
``down`` = Σ^½ Vᵀ S⁻¹ has large entries along inputs that barely vary; GPTQ puts the rounding error where G
does not see it; plain rounding without a whitening), then ``up`` is refit in closed form against the rounded
``down`` (``quant.refit_up``: row by row, so output-side row weights change nothing) and rounded last. LoRD's
``gram_side: output`` has no input Gram: its factors are rounded as unwhitened ones.
The rank rules still count parameters (``ratio`` is the fraction of parameters removed, each integer one
parameter), so the bytes removed are more than ``ratio``: pick the ratio for the bytes wanted.

CURing keeps actual columns and rows of W (its C and R) and MoDeGPT shrinks dense matrices: neither stores
factors this option applies to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..config.configs import field
from ..kernels import hessian, quant
from ..model.modules import LowRankLinear
from .quantize import gptq

GPTQ_DAMP = 0.01  # λ = 1% of mean(diag G), GPTQ's default


@dataclass
class FactorBits:
    """Mixin for factorizing methods' configs: how the low-rank factors are stored."""

    factor_bits: Literal[16, 8] = field(
        16, "bits of the stored low-rank factors: 16 (floats in the model dtype) or 8 (symmetric per-row int8, "
        "one scale per row; down rounded by GPTQ under the input Gram, up refit to it: about half the bytes "
        "at the same rank)")


def integer_factors(weight: Tensor, down: Tensor, bits: int, gram: Tensor | None = None,
                    scale_dtype: torch.dtype | None = None) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Symmetric per-row ``bits``-bit factors of ``weight`` (m, n) ≈ up·down from a factorization's ``down``
    (r, n) and the input Gram ``gram`` (n, n) of its objective (None: unwhitened): ``down`` by GPTQ under
    ``gram`` (round-to-nearest without one), ``up`` refit against the rounded ``down`` and rounded to nearest.
    Returns ((q_up (m, r) int8, scale_up (m, 1)), (q_down (r, n) int8, scale_down (r, 1))), each scale rounded
    to ``scale_dtype`` before its integers are computed."""
    if gram is None:
        q_down, scale_down, _ = quant.rtn(down, bits, True, None, scale_dtype)
    else:
        h_inv_upper, dead = hessian.inverse_hessian_factor(gram.to(down.device), GPTQ_DAMP)
        q_down, scale_down, _ = gptq(down, h_inv_upper, dead, bits, True, None, scale_dtype=scale_dtype)
    down_hat = quant.dequantize(q_down, scale_down, None)  # (r, n) fp32, as stored
    q_up, scale_up, _ = quant.rtn(quant.refit_up(weight, down_hat, gram), bits, True, None, scale_dtype)
    return (q_up, scale_up), (q_down, scale_down)


def low_rank_module(weight: Tensor, up: Tensor, down: Tensor, bias: Tensor | None, dense_class: str,
                    dtype: torch.dtype, factor_bits: int, gram: Tensor | None = None) -> LowRankLinear:
    """The ``low_rank`` module of the factors ``up`` (m, r), ``down`` (r, n) of ``weight`` (m, n), the target
    the factorization fit (W, or LoRD's refit map): floats for ``factor_bits`` 16, else ``integer_factors``
    under the objective's input Gram ``gram`` (n, n) (None: unwhitened)."""
    if factor_bits >= 16:
        return LowRankLinear.from_factors(up, down, bias, dense_class, dtype=dtype)
    up_q, down_q = integer_factors(weight, down, factor_bits, gram, scale_dtype=dtype)
    return LowRankLinear.from_integer_factors(up_q, down_q, factor_bits, bias, dense_class, dtype=dtype)
