"""Integer weight quantization: the grid, round-to-nearest, dequantization and int32 packing.

Pure functions on (out, in) = (m, n) weights. The conventions are compressed-tensors' (what vLLM and
``transformers`` read), which coincide with GPTQ's up to a constant offset:

- ``bits`` b ∈ [2, 8]; integers are stored signed, ``q ∈ [q_min, q_max] = [−2^(b−1), 2^(b−1) − 1]``;
- the range always contains 0: ``w_min = min(min w, 0)``, ``w_max = max(max w, 0)`` per group;
- asymmetric: ``scale = (w_max − w_min) / (q_max − q_min)``,
  ``zero_point = clamp(round(q_min − w_min / scale), q_min, q_max)``;
- symmetric: ``scale = max(|w_min|, w_max) / ((q_max − q_min) / 2)``, ``zero_point = 0``;
- ``q = clamp(round(w / scale) + zero_point, q_min, q_max)``, ``ŵ = (q − zero_point) · scale``.

Groups are ``group_size`` consecutive input columns sharing one (scale, zero_point) per output row;
``group_size=None`` is per-channel (one group of all n columns). A last group shorter than
``group_size`` (n not divisible) is allowed here; compressed-tensors itself requires divisibility.
A group that is all zeros gets scale 1 (any scale represents it exactly).

Packing (compressed-tensors ``pack-quantized``, dense cross-element): each row's values are shifted to
unsigned (``q + 2^(b−1)``) and element i occupies bits [i·b, (i+1)·b) of the row's little-endian bit
stream of int32 words, so a row of n values takes ``ceil(n·b / 32)`` words. Zero points are packed the
same way along the output dimension (dim 0).

Unpacking and dequantizing (``unpack_int32``, ``dequantize``, ``expand_groups``) are defined in
``portable.modeling_compressor``, the file outputs carry for loading without this package, and re-exported here.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor
from torch.nn import functional as F

from ..errors import CompressorError
from ..portable.modeling_compressor import (  # noqa: F401  (dequantizing is defined once, where outputs carry it)
    bit_layout,
    dequantize,
    expand_groups,
    n_groups,
    packed_width,
    unpack_int32,
)
from .linalg import row_chunks

QUANT_CHUNK_ELEMENTS = 1 << 20  # rows of a quantizing / packing chunk: about 1M values (8 MB per int64 temporary)

MIN_BITS, MAX_BITS = 2, 8
MIN_SERVABLE_GROUP = 16  # below this, suggest per-channel scales rather than tiny groups


def check_bits(bits: int) -> None:
    if not MIN_BITS <= bits <= MAX_BITS:
        raise CompressorError(f"bits must be in {MIN_BITS}..{MAX_BITS}; got {bits}")


def servable_group_size(widths: Iterable[int], requested: int) -> int | None:
    """The largest power of two ≤ ``requested`` that divides every input width in ``widths``: a group size
    compressed-tensors can describe (it needs whole groups) and vLLM's kernels take (powers of two);
    None (per channel, always describable) where no power of two from 16 up divides them all."""
    common = math.gcd(*widths)
    size = 1 << (max(requested, 1).bit_length() - 1)  # the largest power of two ≤ requested
    while size >= MIN_SERVABLE_GROUP:
        if common % size == 0:
            return size
        size //= 2
    return None


def qrange(bits: int) -> tuple[int, int]:
    """(q_min, q_max) of the signed b-bit grid."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def group_range(weight: Tensor, group_size: int | None) -> tuple[Tensor, Tensor]:
    """(w_min, w_max), each (m, G), with 0 always inside the range."""
    m, n = weight.shape
    size = group_size or n
    groups = n_groups(n, group_size)
    # zero padding of a short last group never widens its range, which contains 0 anyway
    padded = F.pad(weight, (0, groups * size - n)).view(m, groups, size)
    return padded.amin(-1).clamp_max(0), padded.amax(-1).clamp_min(0)


def quant_params(weight: Tensor, bits: int, symmetric: bool, group_size: int | None = None,
                 scale_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """(scale (m, G) float, zero_point (m, G) int32) of min-max quantization.

    ``scale_dtype``: the dtype the scale is stored in; the scale is rounded to it so that the integers
    are computed against exactly the stored value.
    """
    check_bits(bits)
    q_min, q_max = qrange(bits)
    w_min, w_max = group_range(weight.float(), group_size)
    if symmetric:
        scale = torch.maximum(-w_min, w_max) / ((q_max - q_min) / 2)
    else:
        scale = (w_max - w_min) / (q_max - q_min)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if scale_dtype is not None:
        scale = scale.to(scale_dtype).float()
    if symmetric:
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        zero_point = torch.round(q_min - w_min / scale).clamp(q_min, q_max).to(torch.int32)
    return scale, zero_point


def quantize(weight: Tensor, scale: Tensor, zero_point: Tensor, bits: int,
             group_size: int | None = None) -> Tensor:
    """Integers q (m, n) int8 of ``weight`` (m, n) on the grid given by per-group scale/zero_point (m, G)
    (in row chunks: the per-column expansions of the scales stay bounded)."""
    chunks = row_chunks(*weight.shape, elements=QUANT_CHUNK_ELEMENTS)
    if len(chunks) > 1:
        return torch.cat([quantize(weight[rows], scale[rows], zero_point[rows], bits, group_size) for rows in chunks])
    q_min, q_max = qrange(bits)
    n = weight.shape[1]
    scale = expand_groups(scale.float(), n, group_size)
    zero_point = expand_groups(zero_point, n, group_size)
    return (torch.round(weight.float() / scale) + zero_point).clamp(q_min, q_max).to(torch.int8)


def rtn(weight: Tensor, bits: int, symmetric: bool, group_size: int | None = None,
        scale_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Round-to-nearest: (q (m, n) int8, scale (m, G), zero_point (m, G) int32)."""
    scale, zero_point = quant_params(weight, bits, symmetric, group_size, scale_dtype)
    return quantize(weight, scale, zero_point, bits, group_size), scale, zero_point


# --- packing ---------------------------------------------------------------------------------------------


def pack_int32(values: Tensor, bits: int, dim: int = 1) -> Tensor:
    """Signed b-bit integers (rows, cols) → int32 words, packed along ``dim`` (1: columns, 0: rows)."""
    check_bits(bits)
    if dim == 0:
        return pack_int32(values.T, bits, 1).T.contiguous()
    chunks = row_chunks(*values.shape, elements=QUANT_CHUNK_ELEMENTS)  # the int64 temporaries stay bounded
    if len(chunks) > 1:
        return torch.cat([_pack_rows(values[rows], bits) for rows in chunks])
    return _pack_rows(values, bits)


def _pack_rows(values: Tensor, bits: int) -> Tensor:
    rows, cols = values.shape
    units = math.ceil(cols / 32)
    unsigned = values.to(torch.int64) + (1 << (bits - 1))  # [0, 2^b)
    unsigned = F.pad(unsigned, (0, units * 32 - cols)).view(rows, units, 32)
    word, offset = bit_layout(bits, values.device)
    # one spare word per unit catches the high bits of the last element (dropped below)
    words = torch.zeros(rows, units, bits + 1, dtype=torch.int64, device=values.device)
    index = word.expand(rows, units, 32)
    words.scatter_add_(2, index, (unsigned << offset) & 0xFFFFFFFF)
    spill = offset + bits > 32  # elements that straddle two words: their high bits go to the next word
    if bool(spill.any()):
        high_bits = unsigned[..., spill] >> (32 - offset[spill])
        words.scatter_add_(2, (word[spill] + 1).expand(rows, units, -1), high_bits)
    words = words[..., :bits].reshape(rows, units * bits)[:, :packed_width(cols, bits)]
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


# --- low-rank factors in integers --------------------------------------------------------------------------


def refit_up(weight: Tensor, down: Tensor, gram: Tensor | None = None) -> Tensor:
    """``up`` (m, r) minimizing ‖(W − up·down) S‖_F, S Sᵀ = ``gram`` G (n, n) (None: the identity), for
    ``weight`` W (m, n) and a fixed ``down`` (r, n), in fp64: ``W G downᵀ (down G downᵀ)⁺``. Each row of W is
    its own least-squares problem, so a weight on the output rows (FWSVD's ``out`` axis, LoRD's Fisher rows)
    leaves the minimizer unchanged."""
    d = down.double()
    w = weight.double().to(d.device)
    g_dt = d.T if gram is None else gram.to(device=d.device, dtype=torch.float64) @ d.T  # (n, r)
    return (w @ g_dt) @ torch.linalg.pinv(d @ g_dt, hermitian=True)  # (m, r)
