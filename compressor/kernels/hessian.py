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


def inverse_hessian_factor(h: Tensor, damp: float) -> tuple[Tensor, Tensor]:
    """(upper Cholesky factor of (H + λI)⁻¹ (n, n) fp32, dead-channel mask (n,)), computed in fp64."""
    h = h.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h += damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    lower, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise CompressorError("GPTQ: the damped Hessian is not positive definite; raise damp")
    inverse = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(inverse, upper=True).float(), dead
