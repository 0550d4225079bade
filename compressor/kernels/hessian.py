"""The damped inverse Hessian that GPTQ and SparseGPT share (Frantar et al., arXiv:2210.17323 and
arXiv:2301.00774): ``H = 2·XᵀX / N`` of a linear's squared output error, from the summed input Gram,
and the upper Cholesky factor of ``(H + λI)⁻¹`` their column loops read.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import CompressorError


def hessian(gram: Tensor, n_tokens: int) -> Tensor:
    """``H = 2·XᵀX / N`` (n, n) in fp64 from the summed Gram."""
    return gram.double() * (2.0 / max(n_tokens, 1))


def inverse_hessian_factor(h: Tensor, damp: float, overwrite: bool = False) -> tuple[Tensor, Tensor]:
    """(upper Cholesky factor of (H + λI)⁻¹ (n, n) fp32, dead-channel mask (n,)), computed in fp64.

    ``overwrite``: ``h`` (fp64) is the caller's scratch copy and is damped in place. Memory: at most two
    n×n fp64 matrices at once besides it (the damping is added on the diagonal, never through an identity
    matrix; each factor is freed once the next exists), which at n = 14,336 is 1.6 GB per matrix."""
    h = h.double() if overwrite else h.double().clone()
    diagonal = torch.diagonal(h)
    dead = diagonal == 0
    diagonal[dead] = 1.0
    diagonal.add_(damp * diagonal.mean())  # H + λI with λ = damp · mean(diag H)
    lower, info = torch.linalg.cholesky_ex(h)
    del h, diagonal
    if int(info) != 0:
        raise CompressorError("GPTQ: the damped Hessian is not positive definite; raise damp")
    inverse = torch.cholesky_inverse(lower)
    del lower
    upper = torch.linalg.cholesky(inverse, upper=True)
    del inverse
    return upper.float(), dead
