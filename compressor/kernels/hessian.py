"""The damped inverse Hessian that GPTQ and SparseGPT share (Frantar et al., arXiv:2210.17323 and
arXiv:2301.00774): ``H = 2·XᵀX / N`` of a linear's squared output error, from the summed input Gram,
and the upper Cholesky factor of ``(H + λI)⁻¹`` their column loops read (on one thread: ``one_thread.serial``).
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor

from ..errors import CompressorError
from .linalg import row_chunks
from .one_thread import serial

SPILL_BYTES = 64 << 20  # a Gram this large lends its own memory to the factorization (saved to disk meanwhile)


def hessian(gram: Tensor, n_tokens: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """``H = 2·XᵀX / N`` (n, n) in ``dtype`` (fp64; fp32: GPTQ's reference) from the summed Gram."""
    return gram.to(dtype) * (2.0 / max(n_tokens, 1))


def lends_memory(gram: Tensor, dtype: torch.dtype = torch.float64) -> bool:
    """Whether ``hessian_in`` works in the Gram's own memory (a large contiguous Gram already in ``dtype``)."""
    return gram.dtype == dtype and gram.numel() * gram.element_size() >= SPILL_BYTES and gram.is_contiguous()


@contextmanager
def hessian_in(gram: Tensor, n_tokens: int, dtype: torch.dtype = torch.float64) -> Iterator[Tensor]:
    """``hessian(gram, n_tokens, dtype)`` as scratch the caller may overwrite (``inverse_hessian_factor(...,
    overwrite=True)``). A large Gram (``lends_memory``) on the CPU is that scratch itself: its bytes go to an
    anonymous temporary file first and come back on exit, so the factorization needs no n×n copy (512 MB at
    n = 8192 in fp64); on an accelerator they wait in host memory. Smaller ones get a copy. The values are
    those of ``hessian``; what the caller computed in the scratch is gone on exit."""
    if not lends_memory(gram, dtype):
        yield hessian(gram, n_tokens, dtype)
        return
    scale = 2.0 / max(n_tokens, 1)
    if gram.device.type != "cpu":
        saved = gram.to("cpu")
        try:
            yield gram.mul_(scale)
        finally:
            gram.copy_(saved)
        return
    with tempfile.TemporaryFile(prefix="compressor-gram-") as spill:
        raw = gram.view(torch.uint8).numpy()  # the Gram's bytes, no copy
        spill.write(memoryview(raw).cast("B"))
        try:
            yield gram.mul_(scale)
        finally:
            spill.seek(0)
            if spill.readinto(memoryview(raw).cast("B")) != raw.nbytes:
                raise CompressorError("could not read back a Gram saved to a temporary file (disk full?)")


def _transpose_(matrix: Tensor, block: int = 512) -> Tensor:
    """Transpose a square matrix in place, block by block (memory: two blocks)."""
    n = matrix.shape[0]
    for i in range(0, n, block):
        rows = slice(i, i + block)
        matrix[rows, rows] = matrix[rows, rows].T.clone()
        for j in range(i + block, n, block):
            cols = slice(j, j + block)
            upper = matrix[rows, cols].clone()
            matrix[rows, cols] = matrix[cols, rows].T
            matrix[cols, rows] = upper.T
    return matrix


def permute_(matrix: Tensor, perm: Tensor) -> Tensor:
    """``matrix[perm][:, perm]`` (n, n) in the matrix's own memory (act-order's permuted Hessian). A matrix under
    ``SPILL_BYTES`` goes through one permuted copy (two ``index_select``s: a quarter of the time of the chunked
    way at n = 1536); a larger one has its columns permuted in row chunks, transposed in place, twice, so the
    largest temporary is a chunk (the two indexings hold two n×n copies). Values move and are never combined:
    the same bits."""
    with serial(matrix.numel()):  # block copies: on busy cores, threads waiting on each other cost more than they save
        if matrix.numel() * matrix.element_size() < SPILL_BYTES:
            return matrix.copy_(matrix.index_select(0, perm).index_select(1, perm))
        for _ in range(2):  # Mᵀ P, then (Mᵀ P)ᵀ P = Pᵀ M P
            _transpose_(matrix)
            for rows in row_chunks(*matrix.shape):
                matrix[rows] = matrix[rows][:, perm]
    return matrix


def inverse_hessian_factor(h: Tensor, damp: float, overwrite: bool = False,
                           dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """(upper Cholesky factor of (H + λI)⁻¹ (n, n) fp32, dead-channel mask (n,)), computed in ``dtype`` (fp64;
    fp32 as GPTQ's reference, where the factor is ``h``'s own memory when overwritten).

    ``overwrite``: ``h`` (fp64) is the caller's scratch (``hessian_in``) and the whole computation happens in
    its memory: damped in place (on the diagonal, never through an identity matrix), transposed in place so
    that its storage is the column-major layout LAPACK works in, then Cholesky, inverse and Cholesky again,
    each in place (``out=``). The same LAPACK calls on the same values as out-of-place ones, so the same bits;
    besides ``h``, only the fp32 result (n×n) is allocated."""
    h = h.to(dtype) if overwrite else h.to(dtype).clone()
    diagonal = torch.diagonal(h)
    dead = diagonal == 0
    diagonal[dead] = 1.0
    diagonal.add_(damp * diagonal.mean())  # H + λI with λ = damp · mean(diag H)
    del diagonal
    # on one thread up to n = 4096 (``serial``): LAPACK's threaded steps at these sizes are short, so on busy cores
    # each waits a time slice for its second thread (12× the time at n = 1536 on 2 loaded cores); the same bits
    with serial(h.numel()):
        work = _transpose_(h).mT  # (n, n) column-major, the values of H + λI
        info = torch.zeros((), dtype=torch.int32, device=h.device)
        torch.linalg.cholesky_ex(work, out=(work, info))  # lower factor L
        if int(info) != 0:
            raise CompressorError("GPTQ: the damped Hessian is not positive definite; raise damp")
        torch.cholesky_inverse(work, out=work)  # (L Lᵀ)⁻¹
        torch.linalg.cholesky(work, upper=True, out=work)
        return work.float(), dead
