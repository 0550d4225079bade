"""GGUF's 32-value blocks written from our integer grid, without a second rounding.

Our quantized weights are ``ŵ = (q − z) · s`` with signed ``q, z ∈ [−2^(b−1), 2^(b−1) − 1]`` and one
(s, z) per group of input columns (``kernels.quant``). Three GGML block types hold exactly that grid for
groups of 32; only the fp16 rounding of their per-block ``d`` (and ``m``) differs:

- ``Q4_0`` (18 bytes: d f16, 16 bytes of nibbles), ``w = d · (u − 8)``, u ∈ [0, 15]: 4-bit symmetric
  (z = 0, the unsigned zero 8): u = q + 8, d = s.
- ``Q4_1`` (20 bytes: d f16, m f16, nibbles), ``w = d · u + m``: 4-bit asymmetric: u = q + 8, d = s,
  m = −s · (z + 8) (the unsigned zero z + 8: m = −scale · zero in GPTQ's unsigned convention).
- ``Q8_0`` (34 bytes: d f16, 32 int8), ``w = d · q``: 8-bit symmetric: d = s.

Nibbles: element j of a block is the low nibble of byte j, element j + 16 the high nibble (ggml's layout).
Everything here is pure: integers and scales in, (rows, blocks · bytes) uint8 out, the layout
``gguf.GGUFWriter.add_tensor(..., raw_dtype=...)`` takes for an (rows, in) tensor.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

BLOCK = 32  # values per block of every type here

# (bits, symmetric) of a group-32 grid → the GGML block type that holds it exactly
EXACT_TYPES = {(4, True): "Q4_0", (4, False): "Q4_1", (8, True): "Q8_0"}


def exact_type(bits: int, group_size: int | None, symmetric: bool, in_features: int) -> str | None:
    """The GGML type ("Q4_0", "Q4_1", "Q8_0") that holds this grid exactly, or None."""
    if group_size != BLOCK or in_features % BLOCK:
        return None
    return EXACT_TYPES.get((bits, symmetric))


def _per_column(values: Tensor, n: int) -> Tensor:
    """(rows, G) per-group values → (rows, G) checked for whole blocks (G = n / 32)."""
    if values.shape[1] != n // BLOCK:
        raise ValueError(f"expected {n // BLOCK} groups per row, got {values.shape[1]}")
    return values


def _f16_bytes(values: Tensor) -> np.ndarray:
    """(rows, G) float → (rows, G, 2) uint8: the fp16 bits, little-endian."""
    return values.to(torch.float16).contiguous().numpy().view(np.uint8).reshape(*values.shape, 2)


def _nibbles(unsigned: Tensor) -> np.ndarray:
    """(rows, n) values in [0, 15] → (rows, G, 16) uint8, element j low and j + 16 high nibble of byte j."""
    rows, n = unsigned.shape
    u = unsigned.to(torch.uint8).reshape(rows, n // BLOCK, 2, BLOCK // 2).numpy()
    return u[:, :, 0, :] | (u[:, :, 1, :] << np.uint8(4))


def q4_0_blocks(q: Tensor, scale: Tensor) -> np.ndarray:
    """Q4_0 bytes (rows, n / 32 · 18) of the symmetric 4-bit grid q (rows, n) int8 ∈ [−8, 7], scale (rows, G)."""
    rows, n = q.shape
    d = _f16_bytes(_per_column(scale.float(), n))
    return np.concatenate([d, _nibbles(q.to(torch.int16) + 8)], axis=-1).reshape(rows, -1)


def q4_1_blocks(q: Tensor, scale: Tensor, zero_point: Tensor) -> np.ndarray:
    """Q4_1 bytes (rows, n / 32 · 20) of the asymmetric 4-bit grid q (rows, n) int8, scale, zero_point (rows, G):
    d = s, m = −s · (z + 8)."""
    rows, n = q.shape
    scale = _per_column(scale.float(), n)
    m = -scale * (zero_point.float() + 8)
    return np.concatenate([_f16_bytes(scale), _f16_bytes(m), _nibbles(q.to(torch.int16) + 8)],
                          axis=-1).reshape(rows, -1)


def q8_0_blocks(q: Tensor, scale: Tensor) -> np.ndarray:
    """Q8_0 bytes (rows, n / 32 · 34) of the symmetric 8-bit grid q (rows, n) int8, scale (rows, G)."""
    rows, n = q.shape
    d = _f16_bytes(_per_column(scale.float(), n))
    values = q.to(torch.int8).reshape(rows, n // BLOCK, BLOCK).numpy().view(np.uint8)
    return np.concatenate([d, values], axis=-1).reshape(rows, -1)


def exact_blocks(kind: str, q: Tensor, scale: Tensor, zero_point: Tensor | None) -> np.ndarray:
    """The bytes of ``kind`` (one of ``EXACT_TYPES``' values) for the grid (q, scale, zero_point)."""
    if kind == "Q4_0":
        return q4_0_blocks(q, scale)
    if kind == "Q4_1":
        return q4_1_blocks(q, scale, zero_point if zero_point is not None else torch.zeros_like(scale))
    if kind == "Q8_0":
        return q8_0_blocks(q, scale)
    raise ValueError(f"no exact block writer for {kind}")
