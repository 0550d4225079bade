"""NormalFloat quantization with double-quantized block scales (LQ-LoRA, Guo et al., 2024, arXiv:2311.12023;
QLoRA's NF4 generalized to b bits; docs/methods.md#normalfloat-storage).

A configuration ``NFConfig(bits b, block_size B0, scale_bits b0, group_size B1, scale_dtype b1)``. For a weight
``W`` (m, n), flattened row-major into ``numel = m·n`` values::

    blocks of B0 consecutive values:        s_j = max |w| over block j              (blocks,)
    offset = min_j s_j                       (one fp32 per matrix)
    groups of B1 consecutive block scales:  a_g = max_j∈g (s_j − offset), rounded to b1   (groups,)
    scale codes  c_j = clamp(round((s_j − offset) · (2^b0 − 1) / a_g), 0, 2^b0 − 1)          (unsigned b0 bits)
    dequantized  ŝ_j = offset + c_j / ((2^b0 − 1) / a_g)
    weight codes q_i = the nearest of the 2^b NF levels to w_i / ŝ_j   (bucketize on the midpoints)
    Ŵ_i = level[q_i] · ŝ_j

Where this follows the reference code (HanGuo97/lq-lora ``blockwise_absmax`` and
``NFDoubleQuantizedTensorContainer``) rather than the paper's prose: the offset is the *minimum* block scale
of the whole matrix (not a mean), the weights are quantized against the dequantized scales ŝ (so the
codes see the scale they are decoded with), and the b0-bit integers are pytorch_quantization's unsigned fake
quantization (``round(x · (2^b0 − 1) / amax)``, clamped), re-implemented here (docs/methods.md#normalfloat-storage). A block of
zeros has ŝ = 0 and codes of the level 0. Unlike the reference, ``numel`` need not be a multiple of B0·B1:
the last block and the last group may be short (zero padding never raises an absmax).

Storage: the paper's per-parameter accounting is ``b + b0/B0 + b1/(B0·B1)`` (``nominal_bits``; NF4 with
(b0, b1, B0, B1) = (8, fp32, 64, 256) is 4.127). ``stored_bits(config, numel)`` counts what a
``NormalFloatLinear`` actually stores for a matrix: the codes and scale codes packed in int32 words, every
group absmax in b1 bits and the 32-bit offset. That exact count is what the bit allocation budgets with.

For 4 bits, codes against the exact (not double-quantized) block absmax equal bitsandbytes' NF4 codes: the
levels are the same quantiles (bitsandbytes' ``create_normal_map``), rounding is to the nearest level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from ..errors import CompressorError
from ..portable.modeling_compressor import (  # noqa: F401  (decoding is defined once, where outputs carry it)
    NF_OFFSET,
    SCALE_DTYPES,
    SCALE_STORAGE,
    block_scales,
    dequantize_normal_float,
    nf_layout,
    normal_float_levels,
    unpack_codes,
)
from .quant import pack_int32

BITS = (2, 3, 4, 5, 6, 7, 8)
SCALE_BITS = {"fp32": 32, "fp16": 16, "bf16": 16}


@dataclass(frozen=True)
class NFConfig:
    """One NormalFloat configuration: (b, B0, b0, B1, b1)."""

    bits: int = 4  # b: bits per weight code
    block_size: int = 64  # B0: consecutive weights per absmax scale
    scale_bits: int = 8  # b0: bits per double-quantized block scale
    group_size: int = 256  # B1: block scales per second-level absmax
    scale_dtype: str = "fp32"  # b1: the dtype of each second-level absmax

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise CompressorError(f"NormalFloat bits must be one of {', '.join(map(str, BITS))}; got {self.bits}")
        if self.scale_bits not in BITS:
            raise CompressorError(f"scale_bits must be one of {', '.join(map(str, BITS))}; got {self.scale_bits}")
        if self.block_size < 1 or self.group_size < 1:
            raise CompressorError(f"block sizes must be ≥ 1; got {self.block_size}, {self.group_size}")
        if self.scale_dtype not in SCALE_BITS:
            raise CompressorError(f"scale_dtype must be one of {', '.join(SCALE_BITS)}; got {self.scale_dtype!r}")

    @property
    def label(self) -> str:
        """A short name: ``nf3-B64-s8-g256-fp32``."""
        return f"nf{self.bits}-B{self.block_size}-s{self.scale_bits}-g{self.group_size}-{self.scale_dtype}"


def nominal_bits(config: NFConfig) -> float:
    """The paper's bits per parameter ``b + b0/B0 + b1/(B0·B1)`` (reference ``estimate_storage_from_config``)."""
    return config.bits + config.scale_bits / config.block_size + \
        SCALE_BITS[config.scale_dtype] / (config.block_size * config.group_size)


def stored_bits(config: NFConfig, numel: int) -> int:
    """Bits a ``NormalFloatLinear`` stores for a weight of ``numel`` values: codes and scale codes packed in
    int32 words, the group maxima in b1 and the 32-bit offset (shape and bias not counted)."""
    blocks, groups = nf_layout(numel, config.block_size, config.group_size)
    return (32 * math.ceil(numel * config.bits / 32) + 32 * math.ceil(blocks * config.scale_bits / 32)
            + groups * SCALE_BITS[config.scale_dtype] + 32)


@dataclass
class NFCodes:
    """A quantized weight: everything a ``NormalFloatLinear`` stores, unpacked."""

    config: NFConfig
    shape: tuple[int, int]  # (m, n)
    codes: Tensor  # (m·n,) int64 in [0, 2^b)
    scale_codes: Tensor  # (blocks,) int64 in [0, 2^b0)
    group_absmax: Tensor  # (groups,) in the b1 dtype
    offset: Tensor  # (1,) fp32

    def scales(self) -> Tensor:
        """The dequantized block scales ŝ (blocks,) fp32."""
        return block_scales(self.scale_codes, self.group_absmax, self.offset, self.config.group_size,
                            self.config.scale_bits)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Ŵ (m, n)."""
        return dequantize_normal_float(self.codes, self.scales(), self.config.bits, self.config.block_size,
                                       self.shape, dtype)

    def packed(self) -> dict[str, Tensor]:
        """The ``NormalFloatLinear`` buffers (integer tensors) holding these codes."""
        c = self.config
        return {"weight_codes": pack_stream(self.codes, c.bits), "scale_codes": pack_stream(self.scale_codes,
                                                                                            c.scale_bits),
                "group_absmax": self.group_absmax.to(SCALE_DTYPES[c.scale_dtype]).view(SCALE_STORAGE[c.scale_dtype]),
                "scale_offset": self.offset.float().reshape(1).view(torch.int32)}


def pack_stream(codes: Tensor, bits: int) -> Tensor:
    """Unsigned b-bit codes (size,) → one little-endian bit stream of int32 words (ceil(size·b/32),)."""
    signed = codes.to(torch.int64).view(1, -1) - (1 << (bits - 1))
    return pack_int32(signed, bits).reshape(-1)


COUNTED_LEVELS = 16  # up to this many levels (4 bits), the index is counted (faster than bucketize on a CPU)


def nearest_level(scaled: Tensor, levels: Tensor) -> Tensor:
    """Index of the nearest of ``levels`` (ascending) for every value of ``scaled``: ``bucketize`` on the
    midpoints (a value exactly on a midpoint takes the lower level, as the reference's ``right=False``).
    With at most ``COUNTED_LEVELS`` levels the same index is the number of midpoints strictly below the value,
    summed over one comparison per midpoint (about 4× faster than ``bucketize`` at 3 bits on one CPU thread);
    a NaN takes the last level either way."""
    midpoints = (levels[1:] + levels[:-1]) / 2
    if levels.numel() > COUNTED_LEVELS or scaled.is_cuda:
        return torch.bucketize(scaled, midpoints.to(scaled.device), right=False)
    index = torch.zeros(scaled.shape, dtype=torch.uint8, device=scaled.device)
    for midpoint in midpoints.tolist():  # scaled > midpoint, or NaN (bucketize puts NaN past every boundary)
        index += ~(scaled <= midpoint)
    return index.to(torch.int64)


def blockwise_absmax(flat: Tensor, block_size: int) -> Tensor:
    """max |w| of every block of ``block_size`` consecutive values of ``flat`` (numel,) → (blocks,)."""
    blocks = math.ceil(flat.numel() / block_size)
    short = blocks * block_size - flat.numel()
    grouped = (F.pad(flat, (0, short)) if short else flat).view(blocks, block_size)
    # max |w| from the extremes, no |w| copy: the same values (a NaN propagates; + 0 makes a −0 max +0, as abs)
    return torch.maximum(grouped.amax(1), grouped.amin(1).neg_()).add_(0.0)


def double_quantize(absmax: Tensor, config: NFConfig) -> tuple[Tensor, Tensor, Tensor]:
    """(scale codes (blocks,) int64, group absmax (groups,) in b1, offset (1,) fp32) of block scales (blocks,)."""
    offset = absmax.min().reshape(1)
    shifted = absmax - offset  # ≥ 0
    groups = math.ceil(shifted.numel() / config.group_size)
    padded = F.pad(shifted, (0, groups * config.group_size - shifted.numel()))
    group_absmax = padded.view(groups, config.group_size).amax(1).to(SCALE_DTYPES[config.scale_dtype])
    top = float(2 ** config.scale_bits - 1)
    per_block = group_absmax.float().repeat_interleave(config.group_size)[: shifted.numel()]
    factor = torch.where(per_block > 0, top / per_block, torch.zeros_like(per_block))  # amax 0 → code 0
    codes = torch.round(shifted * factor).clamp(0, top).to(torch.int64)
    return codes, group_absmax, offset


def quantize(weight: Tensor, config: NFConfig) -> NFCodes:
    """NormalFloat codes of ``weight`` (m, n) under ``config`` (computed in fp32)."""
    m, n = weight.shape
    flat = weight.detach().float().reshape(-1)  # (m·n,)
    scale_codes, group_absmax, offset = double_quantize(blockwise_absmax(flat, config.block_size), config)
    scales = block_scales(scale_codes, group_absmax, offset, config.group_size, config.scale_bits)  # (blocks,)
    codes = quantize_blocks(flat, scales, config.block_size, normal_float_levels(config.bits))
    return NFCodes(config, (m, n), codes, scale_codes, group_absmax, offset)


def quantize_blocks(flat: Tensor, scales: Tensor, block_size: int, levels: Tensor) -> Tensor:
    """The nearest level's index (numel,) int64 of every value of ``flat`` (numel,) divided by its block's
    scale (blocks,); a block of scale 0 (all zeros) gets the level 0."""
    numel, short = flat.numel(), scales.numel() * block_size - flat.numel()
    blocks = (F.pad(flat, (0, short)) if short else flat).view(scales.numel(), block_size)
    empty = ~(scales > 0)  # (blocks,): such a block's values (a zero or NaN scale) become 0
    scaled = blocks / torch.where(empty, torch.ones_like(scales), scales)[:, None]  # (blocks, block_size)
    if bool(empty.any()):
        scaled.masked_fill_(empty[:, None], 0.0)
    return nearest_level(scaled, levels).reshape(-1)[:numel]


def fake_quantize(weight: Tensor, config: NFConfig) -> Tensor:
    """Ŵ (m, n) fp32: ``quantize`` then dequantize."""
    return quantize(weight, config).dequantize()
