"""compressor's compressed modules and loader, in one file that needs only ``torch`` and ``transformers``.

This file is copied verbatim into every non-merged output directory as ``modeling_compressor.py`` and
named in its config.json's ``auto_map``, so that on a machine without compressor ::

    AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)

rebuilds the compressed model (the base family's own class, e.g. ``LlamaForCausalLM``, with the compressed
modules swapped in) with the same numbers as ``compressor.load``. Inside the package it is the one
definition of each module's stored layout and forward pass (``compressor.model.modules`` subclasses these
classes to add building and merging) and of the loader (``compressor.load`` calls ``load_compressed``).
It must therefore import nothing from compressor (tests/test_remote_code.py loads outputs without it).

config.json of an output carries a ``compressor`` entry: ``modules`` (name → spec, parents before
children: what each module is and its shapes), ``adapter`` (the folder of the PEFT adapter holding
compensation paths, or null) and, where stock transformers would not rebuild the model, ``base_model_type``
with ``model_type`` set to ``compressor-<base>``, which stock loaders refuse unless the code is trusted.

Module kinds (weights are (out, in) = (m, n), the ``nn.Linear`` layout):

- ``dense``: ``nn.Linear`` or GPT-2's ``Conv1D`` of a new shape (or a compensated module's base);
- ``low_rank``: ``up(down(x))``, down (r, in), up (out, r) + bias; with ``factor_bits`` 8 each factor is stored
  as a per-row symmetric ``quantized`` linear;
- ``cur``: ``((x Rᵀ) Uᵀ) Cᵀ + b``, C (out, r), U (r, r), R (r, in), kept row/col indices (r,);
- ``quantized``: compressed-tensors ``pack-quantized`` buffers, dequantized on each call;
- ``normal_float``: blockwise NormalFloat codes with double-quantized scales (LQ-LoRA), dequantized on each call;
- ``compensated``: ``base(x) + lora(x)``; in the files the base's tensors sit under the module's own name
  and the low-rank path (lora_A = down, lora_B = up) in the PEFT adapter;
- ``shrunk_attention``: attention with ``qk_dim`` query/key and ``v_dim`` value dims per head (MoDeGPT);
- ``experts``: a layer's routed experts with each expert's gate/up/down as a linear of its own (child specs
  follow it), computing what transformers' fused experts compute.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import torch
from safetensors.torch import load_file  # a dependency of transformers
from torch import Tensor, nn
from torch.nn import functional as F
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.pytorch_utils import Conv1D

CONFIG_KEY = "compressor"  # config.json's entry: modules, adapter (, base_model_type, why, load)
MARK_PREFIX = "compressor-"  # model_type prefix of outputs stock transformers must refuse
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


# --- the quantization grid: dequantizing compressed-tensors' pack-quantized tensors ---------------------


def n_groups(n: int, group_size: int | None) -> int:
    """Groups of ``group_size`` input columns in a row of n (1: per channel)."""
    return 1 if not group_size else math.ceil(n / group_size)


def packed_width(n: int, bits: int) -> int:
    """int32 words holding n values of ``bits`` bits."""
    return math.ceil(n * bits / 32)


def expand_groups(values: Tensor, n: int, group_size: int | None) -> Tensor:
    """Per-group values (m, G) → per-column (m, n)."""
    if not group_size:
        return values[:, :1].expand(-1, n)
    return values.repeat_interleave(group_size, dim=1)[:, :n]


def bit_layout(bits: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """For the 32 elements of one packing unit (= ``bits`` int32 words): word index and bit offset, (32,) each."""
    start = torch.arange(32, dtype=torch.int64, device=device) * bits
    return start // 32, start % 32


def unpack_int32(packed: Tensor, bits: int, size: int, dim: int = 1) -> Tensor:
    """int32 words → signed b-bit integers (int8), ``size`` of them along ``dim``: element i of a row is bits
    [i·b, (i+1)·b) of the row's little-endian bit stream, stored unsigned (q + 2^(b−1))."""
    if dim == 0:
        return unpack_int32(packed.T, bits, size, 1).T.contiguous()
    step = max(1, (1 << 20) // max(size, 1))  # row chunks of ~1M values: the int64 temporaries stay ~8 MB each
    if packed.shape[0] > step:
        return torch.cat([_unpack_rows(packed[start:start + step], bits, size)
                          for start in range(0, packed.shape[0], step)])
    return _unpack_rows(packed, bits, size)


def _unpack_rows(packed: Tensor, bits: int, size: int) -> Tensor:
    rows, width = packed.shape
    units = math.ceil(size / 32)
    words = packed.to(torch.int64) & 0xFFFFFFFF
    words = F.pad(words, (0, units * bits + 1 - width)).view(rows, -1)
    word, offset = bit_layout(bits, packed.device)
    unit_base = (torch.arange(units, dtype=torch.int64, device=packed.device) * bits)[:, None]  # (units, 1)
    low = words[:, unit_base + word] >> offset  # (rows, units, 32)
    high = words[:, unit_base + word + 1] << (32 - offset)
    unsigned = torch.where(offset + bits > 32, low | high, low) & ((1 << bits) - 1)
    return (unsigned.reshape(rows, units * 32)[:, :size] - (1 << (bits - 1))).to(torch.int8)


def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor | None, group_size: int | None = None,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """``(q − zero_point) · scale`` (m, n) in ``dtype`` (computed in fp32 at least); scale, zero_point (m, G).
    Row by row in chunks, so the fp32 temporaries stay bounded whatever the matrix."""
    step = max(1, (1 << 20) // max(q.shape[1], 1))
    if q.shape[0] > step:
        out = torch.empty(q.shape, dtype=dtype, device=q.device)
        for start in range(0, q.shape[0], step):
            rows = slice(start, start + step)
            out[rows] = dequantize(q[rows], scale[rows], None if zero_point is None else zero_point[rows],
                                   group_size, dtype)
        return out
    n = q.shape[1]
    work = torch.promote_types(scale.dtype, torch.float32)
    values = q.to(work)
    if zero_point is not None:
        values = values - expand_groups(zero_point, n, group_size).to(work)
    return (values * expand_groups(scale.to(work), n, group_size)).to(dtype)


# --- NormalFloat: dequantizing LQ-LoRA's blockwise, double-quantized NF codes -----------------------------

NF_OFFSET = 0.9677083  # the extreme quantile of the NF grid (bitsandbytes' and LQ-LoRA's constant)
SCALE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SCALE_STORAGE = {"fp32": torch.int32, "fp16": torch.int16, "bf16": torch.int16}  # the raw bits of each


def normal_float_levels(bits: int) -> Tensor:
    """The 2^b NormalFloat levels (2^b,) fp32, ascending, in [−1, 1] with an exact 0: normal quantiles at
    ``linspace(1 − NF_OFFSET, 0.5, 2^(b−1))`` ∪ ``linspace(0.5, NF_OFFSET, 2^(b−1) + 1)`` (0.5 once), scaled
    so that the extreme quantile is ±1. Computed in fp64 on the CPU (the same numbers on every device)."""
    half = 2 ** (bits - 1)
    left = torch.linspace(1 - NF_OFFSET, 0.5, half, dtype=torch.float64)[:-1]
    right = torch.linspace(0.5, NF_OFFSET, half + 1, dtype=torch.float64)
    quantiles = torch.cat([left, right])
    extreme = torch.special.erfinv(torch.tensor(2 * NF_OFFSET - 1, dtype=torch.float64))
    return (torch.special.erfinv(2 * quantiles - 1) / extreme).float()


def nf_layout(numel: int, block_size: int, group_size: int) -> tuple[int, int]:
    """(blocks, groups): first-level blocks of ``block_size`` consecutive weights and second-level groups of
    ``group_size`` consecutive block scales in a weight of ``numel`` elements (the last of each may be short)."""
    blocks = math.ceil(numel / block_size)
    return blocks, math.ceil(blocks / group_size)


def block_scales(scale_codes: Tensor, group_absmax: Tensor, offset: Tensor, group_size: int,
                 scale_bits: int) -> Tensor:
    """The dequantized absmax scale of every block (blocks,) fp32 from its unsigned ``scale_bits``-bit code
    (blocks,), its group's absmax (groups,) and the one offset (1,): ``offset + c / ((2^b0 − 1) / absmax)``
    (pytorch_quantization's unsigned fake quantization, which LQ-LoRA uses; a zero absmax gives the offset)."""
    top = float(2 ** scale_bits - 1)
    per_block = group_absmax.float().repeat_interleave(group_size)[: scale_codes.numel()]  # (blocks,)
    return offset.float() + scale_codes.float() / (top / per_block)


def unpack_codes(packed: Tensor, bits: int, size: int) -> Tensor:
    """A flat stream of int32 words → ``size`` unsigned b-bit codes (size,) int64 (``unpack_int32`` of one row)."""
    return unpack_int32(packed.view(1, -1), bits, size)[0].to(torch.int64) + (1 << (bits - 1))


def dequantize_normal_float(codes: Tensor, scales: Tensor, bits: int, block_size: int, shape: tuple[int, int],
                            dtype: torch.dtype = torch.float32) -> Tensor:
    """``level[code] · scale`` of every weight, (out, in) in ``dtype``: ``codes`` (numel,) of the row-major
    flattened weight, ``scales`` (blocks,) of its consecutive blocks of ``block_size`` weights."""
    out_features, in_features = shape
    numel = out_features * in_features
    blocks = scales.numel()
    levels = normal_float_levels(bits).to(scales.device)
    values = F.pad(levels[codes], (0, blocks * block_size - numel)).view(blocks, block_size)
    return (values * scales[:, None]).reshape(-1)[:numel].view(out_features, in_features).to(dtype)


# --- the modules -------------------------------------------------------------------------------------------


class RankedLinear(nn.Module):
    """What the factorized kinds (low-rank, CUR) share: (in, out, rank, bias, dense class) as their spec, an
    empty module of those shapes, and their repr."""

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "rank": self.rank, "bias": self.bias is not None, "dense_class": self.dense_class}

    @classmethod
    def empty(cls, in_features: int, out_features: int, rank: int, bias: bool, dense_class: str = "Linear",
              dtype: torch.dtype | None = None, device: Any = None, **_: Any) -> "RankedLinear":
        return cls(in_features, out_features, rank, bias, dense_class, dtype=dtype, device=device)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class LowRankLinear(RankedLinear):
    """``y = (x downᵀ) upᵀ + b``: a rank-r factorization ``W ≈ up @ down`` of a linear.

    down: (r, in) ("A", lora_A), up: (out, r) ("B", lora_B). Stored as two ``nn.Linear`` so the
    state dict reads ``<name>.down.weight``, ``<name>.up.weight``, ``<name>.up.bias``. With ``factor_bits``
    below 16 (8: the factorizing methods' ``factor_bits: 8``) each factor is a symmetric per-row
    ``QuantizedLinear`` instead (``<name>.down.weight_packed``, ``.weight_scale``, ``.weight_shape``; the bias
    is ``<name>.up.bias``), dequantized on each call; the spec then records ``factor_bits``.
    """

    kind = "low_rank"

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 dense_class: str = "Linear", dtype: torch.dtype | None = None, device: Any = None,
                 factor_bits: int = 16) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.dense_class, self.factor_bits = dense_class, factor_bits
        if factor_bits < 16:  # per-row symmetric integers: (r, in) and (out, r), one scale per row
            self.down = QuantizedLinear(in_features, rank, factor_bits, None, True, False, dtype=dtype, device=device)
            self.up = QuantizedLinear(rank, out_features, factor_bits, None, True, bias, dtype=dtype, device=device)
        else:
            self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)  # (r, in)
            self.up = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)  # (out, r)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))

    @property
    def bias(self) -> Tensor | None:
        return self.up.bias

    def spec(self) -> dict[str, Any]:
        spec = super().spec()
        return spec if self.factor_bits == 16 else {**spec, "factor_bits": self.factor_bits}

    @classmethod
    def empty(cls, in_features: int, out_features: int, rank: int, bias: bool, dense_class: str = "Linear",
              dtype: torch.dtype | None = None, device: Any = None, factor_bits: int = 16,
              **_: Any) -> "LowRankLinear":
        return cls(in_features, out_features, rank, bias, dense_class, dtype=dtype, device=device,
                   factor_bits=factor_bits)

    def extra_repr(self) -> str:
        bits = "" if self.factor_bits == 16 else f", factor_bits={self.factor_bits}"
        return super().extra_repr() + bits



class CURLinear(RankedLinear):
    """``y = ((x Rᵀ) Uᵀ) Cᵀ + b``: a CUR decomposition ``W ≈ C @ U @ R`` of a linear (CURing).

    C: (out, r) actual columns ``W[:, col_indices]``, R: (r, in) actual rows ``W[row_indices, :]``,
    U: (r, r) the small linking matrix. ``row_indices`` and ``col_indices`` (r,) int64 buffers record
    which rows and columns of the original weight were kept. Parameters: r·(out + in) + r² (+ bias).
    """

    kind = "cur"

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 dense_class: str = "Linear", dtype: torch.dtype | None = None, device: Any = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.dense_class = dense_class
        factory = {"dtype": dtype, "device": device}
        self.C = nn.Parameter(torch.empty(out_features, rank, **factory))  # (out, r)
        self.U = nn.Parameter(torch.empty(rank, rank, **factory))  # (r, r)
        self.R = nn.Parameter(torch.empty(rank, in_features, **factory))  # (r, in)
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None  # (out,)
        self.register_buffer("row_indices", torch.empty(rank, dtype=torch.long, device=device))  # (r,)
        self.register_buffer("col_indices", torch.empty(rank, dtype=torch.long, device=device))  # (r,)

    def forward(self, x: Tensor) -> Tensor:
        hidden = F.linear(x, self.R)  # (..., r)
        hidden = F.linear(hidden, self.U)  # (..., r)
        return F.linear(hidden, self.C, self.bias)  # (..., out)



class QuantizedLinear(nn.Module):
    """``y = x Ŵᵀ + b`` with ``Ŵ = (q − zero_point) · scale`` dequantized from packed integers on each call
    (or from ``cached_weight`` when set: compressor's evaluation dequantizes once).

    Buffers use compressed-tensors' ``pack-quantized`` names and layouts:
    ``weight_packed`` (out, ceil(in·bits/32)) int32, ``weight_scale`` (out, G) in the model dtype,
    ``weight_zero_point`` (ceil(out·bits/32), G) int32 packed along the output dim (asymmetric only),
    ``weight_shape`` (2,) int64 = (out, in); G = ceil(in / group_size), or 1 per channel.
    """

    kind = "quantized"

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None, symmetric: bool,
                 bias: bool = False, dense_class: str = "Linear", dtype: torch.dtype | None = None,
                 device: Any = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric, self.dense_class = bits, group_size or None, symmetric, dense_class
        groups = n_groups(in_features, self.group_size)
        dtype = dtype or torch.float32
        self.register_buffer("weight_packed", torch.zeros(out_features, packed_width(in_features, bits),
                                                          dtype=torch.int32, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=dtype, device=device))
        if not symmetric:
            self.register_buffer("weight_zero_point", torch.zeros(packed_width(out_features, bits), groups,
                                                                  dtype=torch.int32, device=device))
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self.cached_weight: Tensor | None = None  # never saved (not a buffer)

    def integers(self) -> tuple[Tensor, Tensor | None]:
        """(q (out, in) int8, zero_point (out, G) int32 or None)."""
        q = unpack_int32(self.weight_packed, self.bits, self.in_features)
        if self.symmetric:
            return q, None
        return q, unpack_int32(self.weight_zero_point, self.bits, self.out_features, dim=0).to(torch.int32)

    def dense_weight(self) -> Tensor:
        """The dequantized weight (out, in), in the dtype of the scale."""
        q, zero_point = self.integers()
        return dequantize(q, self.weight_scale, zero_point, self.group_size, dtype=self.weight_scale.dtype)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.cached_weight if self.cached_weight is not None else self.dense_weight()
        return F.linear(x, weight.to(x.dtype), self.bias)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                "bias": self.bias is not None, "dense_class": self.dense_class}

    @classmethod
    def empty(cls, in_features: int, out_features: int, bits: int, group_size: int | None, symmetric: bool,
              bias: bool, dense_class: str = "Linear", dtype: torch.dtype | None = None, device: Any = None,
              **_: Any) -> "QuantizedLinear":
        return cls(in_features, out_features, bits, group_size, symmetric, bias, dense_class, dtype=dtype,
                   device=device)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}")


class NormalFloatLinear(nn.Module):
    """``y = x Ŵᵀ + b`` with ``Ŵ`` dequantized on each call (or from ``cached_weight``) from blockwise
    NormalFloat codes with double-quantized scales (LQ-LoRA's quantizer, QLoRA's NF generalized to b bits).

    The (out, in) weight is flattened row-major into blocks of ``block_size`` (B0) weights, each with an
    absmax scale; the scales, less their minimum ``offset``, are quantized to unsigned ``scale_bits`` (b0)
    integers in groups of ``group_size`` (B1) with a per-group absmax stored in ``scale_dtype`` (b1). Buffers
    (all integer, so no dtype cast touches them; the group absmax and offset are their floats' raw bits):

    - ``weight_codes`` (ceil(out·in·b/32),) int32: the b-bit codes, one little-endian bit stream;
    - ``scale_codes`` (ceil(blocks·b0/32),) int32: the blocks' b0-bit scale codes, the same way;
    - ``group_absmax`` (groups,) int32 (fp32) or int16 (fp16 / bf16);
    - ``scale_offset`` (1,) int32: the fp32 offset; ``weight_shape`` (2,) int64 = (out, in).
    """

    kind = "normal_float"

    def __init__(self, in_features: int, out_features: int, bits: int, block_size: int, scale_bits: int,
                 group_size: int, scale_dtype: str, bias: bool = False, dense_class: str = "Linear",
                 dtype: torch.dtype | None = None, device: Any = None) -> None:
        super().__init__()
        if scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"unknown scale_dtype {scale_dtype!r}")
        self.in_features, self.out_features, self.dense_class = in_features, out_features, dense_class
        self.bits, self.block_size, self.scale_bits = bits, block_size, scale_bits
        self.group_size, self.scale_dtype = group_size, scale_dtype
        blocks, groups = nf_layout(in_features * out_features, block_size, group_size)
        dtype = dtype or torch.float32
        words = {"weight_codes": math.ceil(in_features * out_features * bits / 32),
                 "scale_codes": math.ceil(blocks * scale_bits / 32)}
        for name, size in words.items():
            self.register_buffer(name, torch.zeros(size, dtype=torch.int32, device=device))
        self.register_buffer("group_absmax", torch.zeros(groups, dtype=SCALE_STORAGE[scale_dtype], device=device))
        self.register_buffer("scale_offset", torch.zeros(1, dtype=torch.int32, device=device))
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], device=device))
        # the dtype the weight is dequantized to: an empty float buffer follows model.to(dtype), is never saved
        self.register_buffer("dtype_marker", torch.empty(0, dtype=dtype, device=device), persistent=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self.cached_weight: Tensor | None = None  # never saved (not a buffer)

    def scales(self) -> Tensor:
        """The dequantized absmax scale of every block (blocks,) fp32."""
        blocks, _ = nf_layout(self.in_features * self.out_features, self.block_size, self.group_size)
        codes = unpack_codes(self.scale_codes, self.scale_bits, blocks)
        absmax = self.group_absmax.view(SCALE_DTYPES[self.scale_dtype])
        return block_scales(codes, absmax, self.scale_offset.view(torch.float32), self.group_size, self.scale_bits)

    def codes(self) -> Tensor:
        """The NF code of every weight of the row-major flattened weight (out·in,) int64."""
        return unpack_codes(self.weight_codes, self.bits, self.in_features * self.out_features)

    def dense_weight(self) -> Tensor:
        """The dequantized weight (out, in), in the module's dtype."""
        return dequantize_normal_float(self.codes(), self.scales(), self.bits, self.block_size,
                                       (self.out_features, self.in_features), self.dtype_marker.dtype)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.cached_weight if self.cached_weight is not None else self.dense_weight()
        return F.linear(x, weight.to(x.dtype), self.bias)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "bits": self.bits, "block_size": self.block_size, "scale_bits": self.scale_bits,
                "group_size": self.group_size, "scale_dtype": self.scale_dtype, "bias": self.bias is not None,
                "dense_class": self.dense_class}

    @classmethod
    def empty(cls, in_features: int, out_features: int, bits: int, block_size: int, scale_bits: int,
              group_size: int, scale_dtype: str, bias: bool, dense_class: str = "Linear",
              dtype: torch.dtype | None = None, device: Any = None, **_: Any) -> "NormalFloatLinear":
        return cls(in_features, out_features, bits, block_size, scale_bits, group_size, scale_dtype, bias,
                   dense_class, dtype=dtype, device=device)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nf{self.bits}, "
                f"block_size={self.block_size}, scale_bits={self.scale_bits}, group_size={self.group_size}, "
                f"scale_dtype={self.scale_dtype}")


def shape_of(module: nn.Module) -> tuple[int, int]:
    """(out, in) of any linear, dense or compressed."""
    if isinstance(module, Conv1D):
        return module.nf, module.weight.shape[0]
    return module.out_features, module.in_features  # nn.Linear and the compressed kinds


def spec_of(module: nn.Module) -> dict[str, Any]:
    """``spec()`` of a compressed kind, or of a dense linear (kind "dense")."""
    if hasattr(module, "spec"):
        return module.spec()
    out_features, in_features = shape_of(module)
    return {"kind": "dense", "in_features": in_features, "out_features": out_features,
            "bias": module.bias is not None, "dense_class": type(module).__name__}


class CompensatedLinear(nn.Module):
    """``y = base(x) + lora(x)``: a compressed (quantized, pruned) linear plus a low-rank correction.

    ``base`` is any linear (dense, or a compressed kind) and keeps the bias; ``lora`` is a bias-free
    ``LowRankLinear`` (``lora.down`` = lora_A (r, in), ``lora.up`` = lora_B (out, r)).
    """

    kind = "compensated"

    def __init__(self, base: nn.Module, lora: LowRankLinear) -> None:
        super().__init__()
        self.out_features, self.in_features = shape_of(base)
        self.dense_class = getattr(base, "dense_class", type(base).__name__)
        self.base, self.lora = base, lora

    @property
    def rank(self) -> int:
        return self.lora.rank

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.lora(x)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "dense_class": self.dense_class, "rank": self.rank, "base": spec_of(self.base),
                "lora": self.lora.spec()}

    @classmethod
    def empty(cls, base: dict[str, Any], lora: dict[str, Any], dtype: torch.dtype | None = None, device: Any = None,
              kinds: dict[str, type[nn.Module]] | None = None, **_: Any) -> "CompensatedLinear":
        return cls(from_spec(base, dtype, device, kinds), from_spec(lora, dtype, device, kinds))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def rotate_half(x: Tensor) -> Tensor:
    """transformers' convention: (x1, x2) → (−x2, x1) over the two halves of the last dim."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def gather_rope(cos: Tensor, sin: Tensor, dims: Tensor) -> tuple[Tensor, Tensor]:
    """``cos``/``sin`` (batch, seq, d) at the kept dims ``dims`` (n_kv, k) of each KV head (sorted, closed under
    j ↔ j + d/2): (batch, seq, n_kv, 1, k) each, laid out to broadcast over a KV head's query heads."""
    batch, seq = cos.shape[:2]
    flat, shape = dims.reshape(-1), (batch, seq, dims.shape[0], 1, dims.shape[1])
    return cos.index_select(-1, flat).view(shape), sin.index_select(-1, flat).view(shape)


def rope_at(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of ``x`` (batch, seq, n_kv, group, k): each KV head's query heads (or its key,
    group 1) at the dims ``gather_rope`` gathered ``cos``/``sin`` (batch, seq, n_kv, 1, k) at."""
    return x * cos + rotate_half(x) * sin


class ShrunkAttention(nn.Module):
    """Multi-head / grouped-query attention with ``qk_dim`` query/key and ``v_dim`` value dims per head.

    MoDeGPT keeps, per layer, ``qk_dim`` of each head's ``head_dim`` query/key dims and ``v_dim`` of its value
    dims; transformers' attention classes reshape by ``head_dim`` and rotate all of it, so such a layer needs
    its own forward. The block holds plain linears under its own child names (so the checkpoint keys are the
    model's: ``…self_attn.q_proj.weight``) and one integer buffer:

    - ``rope_dims`` (n_kv, qk_dim): the original dims each KV head (and all its query heads) keeps, sorted.
      With RoPE they come in ``rotate_half`` pairs (j, j + head_dim/2), so the kept vector ``[P, P + head_dim/2]``
      rotates by ``rotate_half`` on its own halves, with cos/sin gathered at those dims per head. Without RoPE
      (OPT) the buffer only records which dims were kept.

    Shapes: q_proj (n_heads·qk_dim, hidden), k_proj (n_kv·qk_dim, hidden), v_proj (n_kv·v_dim, hidden),
    o_proj (hidden, n_heads·v_dim). The score scale stays the original ``head_dim ** -0.5``. Attention runs in
    ``scaled_dot_product_attention`` with transformers' mask (boolean or additive) or causal when none is given;
    the KV cache holds the smaller keys and values (``Cache.update`` sizes layers lazily).
    """

    kind = "shrunk_attention"

    def __init__(self, hidden_size: int, n_heads: int, n_kv_heads: int, head_dim: int, qk_dim: int, v_dim: int,
                 rope: bool, layer_idx: int, names: dict[str, str], bias: dict[str, bool],
                 scaling: float | None = None, dtype: torch.dtype | None = None, device: Any = None) -> None:
        super().__init__()
        if n_heads % n_kv_heads or (rope and qk_dim % 2):
            raise ValueError(f"bad attention geometry: {n_heads} heads over {n_kv_heads} KV heads, qk_dim {qk_dim}")
        self.hidden_size, self.n_heads, self.n_kv_heads, self.head_dim = hidden_size, n_heads, n_kv_heads, head_dim
        self.qk_dim, self.v_dim, self.rope, self.layer_idx = qk_dim, v_dim, rope, layer_idx
        self.scaling = head_dim ** -0.5 if scaling is None else scaling
        self.names, self.bias_of = dict(names), dict(bias)
        shapes = {"q": (hidden_size, n_heads * qk_dim), "k": (hidden_size, n_kv_heads * qk_dim),
                  "v": (hidden_size, n_kv_heads * v_dim), "o": (n_heads * v_dim, hidden_size)}
        for role, (fan_in, fan_out) in shapes.items():
            self.add_module(names[role], nn.Linear(fan_in, fan_out, bias=bias[role], dtype=dtype, device=device))
        self.register_buffer("rope_dims", torch.zeros(n_kv_heads, qk_dim, dtype=torch.long, device=device))

    def linear(self, role: str) -> nn.Linear:
        return getattr(self, self.names[role])

    def forward(self, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor] | None = None,
                attention_mask: Tensor | None = None, cache: Any = None, **kwargs: Any) -> tuple[Tensor, None]:
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        batch, seq, _ = hidden_states.shape  # (batch, seq, hidden)
        group = self.n_heads // self.n_kv_heads
        q = self.linear("q")(hidden_states)  # (batch, seq, n_heads·qk_dim)
        k = self.linear("k")(hidden_states)  # (batch, seq, n_kv·qk_dim)
        v = self.linear("v")(hidden_states).view(batch, seq, self.n_kv_heads, self.v_dim).transpose(1, 2)
        if self.rope:  # rotated before the heads move forward: cos/sin gathered once, no permutes
            if position_embeddings is None:
                raise ValueError("a rotary attention block needs position_embeddings")
            cos, sin = position_embeddings  # (batch, seq, head_dim)
            if cos.shape[-1] != self.head_dim:
                raise ValueError(f"rotary embedding of {cos.shape[-1]} dims for heads of {self.head_dim}")
            cos, sin = gather_rope(cos, sin, self.rope_dims)  # (batch, seq, n_kv, 1, qk_dim)
            q = rope_at(q.view(batch, seq, self.n_kv_heads, group, self.qk_dim), cos, sin)  # query heads by KV head
            k = rope_at(k.view(batch, seq, self.n_kv_heads, 1, self.qk_dim), cos, sin)
        q = q.view(batch, seq, self.n_heads, self.qk_dim).transpose(1, 2)  # (batch, heads, seq, qk_dim)
        k = k.view(batch, seq, self.n_kv_heads, self.qk_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = attention_mask[:, :, :, : k.shape[-2]]
        causal = attention_mask is None and seq > 1
        # PyTorch's fused CPU/GPU kernels need one head width for q, k and v: zero dims make them equal
        # (a zero query/key dim adds nothing to a score; a zero value dim is sliced off the output)
        width = max(self.qk_dim, self.v_dim)
        if self.qk_dim < width:
            q, k = F.pad(q, (0, width - self.qk_dim)), F.pad(k, (0, width - self.qk_dim))
        elif self.v_dim < width:
            v = F.pad(v, (0, width - self.v_dim))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, is_causal=causal,
                                             scale=self.scaling, enable_gqa=group > 1)  # (batch, heads, seq, width)
        if width > self.v_dim:
            out = out[..., : self.v_dim]
        out = out.transpose(1, 2).reshape(batch, seq, self.n_heads * self.v_dim)
        return self.linear("o")(out), None

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "hidden_size": self.hidden_size, "n_heads": self.n_heads,
                "n_kv_heads": self.n_kv_heads, "head_dim": self.head_dim, "qk_dim": self.qk_dim, "v_dim": self.v_dim,
                "rope": self.rope, "layer_idx": self.layer_idx, "names": self.names, "bias": self.bias_of,
                "scaling": self.scaling}

    @classmethod
    def empty(cls, dtype: torch.dtype | None = None, device: Any = None, **spec: Any) -> "ShrunkAttention":
        spec.pop("kind", None)
        spec.pop("kinds", None)
        return cls(**spec, dtype=dtype, device=device)

    def extra_repr(self) -> str:
        return (f"heads={self.n_heads}, kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, "
                f"qk_dim={self.qk_dim}, v_dim={self.v_dim}, rope={self.rope}")


# --- mixture of experts: each expert's projections as linears of their own ---------------------------------


class ExpertMLP(nn.Module):
    """One routed expert, ``down_proj(act(gate_proj(x)) · up_proj(x))``: gate/up (I, H), down (H, I)."""

    def __init__(self, hidden_size: int, intermediate_size: int, dtype: torch.dtype | None = None,
                 device: Any = None) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False, dtype=dtype, device=device)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False, dtype=dtype, device=device)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False, dtype=dtype, device=device)


class Experts(nn.Module):
    """A layer's routed experts, expert ``e`` as child ``"<e>"`` with ``gate_proj``, ``up_proj`` and
    ``down_proj`` linears of its own (any of them may be a compressed module), in place of transformers'
    fused experts (``gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I)). Called as those are, with the
    tokens (tokens, H), the router's top-k expert indices (tokens, k) and weights (tokens, k): each expert
    runs on the tokens routed to it and its output, times the token's routing weight, is summed per token,
    as transformers' eager experts compute it. The router, top-k and weighting stay the family's."""

    kind = "experts"
    container = True  # its experts' linears are modules of their own in the manifest
    calibrate_all: frozenset[int] | None = None  # calibration only: experts that also see every token

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, act: str,
                 dtype: torch.dtype | None = None, device: Any = None) -> None:
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size, self.act = \
            num_experts, hidden_size, intermediate_size, act
        for index in range(num_experts):
            self.add_module(str(index), ExpertMLP(hidden_size, intermediate_size, dtype, device))

    def expert(self, index: int) -> ExpertMLP:
        return getattr(self, str(index))

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        from transformers.activations import ACT2FN

        act_fn = ACT2FN[self.act]
        final = torch.zeros_like(hidden_states)  # (tokens, H)
        with torch.no_grad():
            mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)  # (E + 1, k, tokens)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        everyone = self.calibrate_all or frozenset()
        for index in sorted(everyone):  # statistics of every token (its hooks see them); the output is not used
            self._run(self.expert(index), hidden_states, act_fn, hooks=True)
        for index in hit[:, 0].tolist():
            if index == self.num_experts:
                continue
            position, token = torch.where(mask[index])
            x = hidden_states[token]  # (routed, H)
            out = self._run(self.expert(index), x, act_fn, hooks=index not in everyone)
            out = out * top_k_weights[token, position, None]
            final.index_add_(0, token, out.to(final.dtype))
        return final

    @staticmethod
    def _run(expert: ExpertMLP, x: Tensor, act_fn: Any, hooks: bool) -> Tensor:
        """``down(act(gate(x)) · up(x))``; without ``hooks`` the linears' forward hooks do not see it."""
        call = (lambda module, t: module(t)) if hooks else (lambda module, t: module.forward(t))
        return call(expert.down_proj, act_fn(call(expert.gate_proj, x)) * call(expert.up_proj, x))

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_experts": self.num_experts, "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size, "act": self.act}

    @classmethod
    def empty(cls, dtype: torch.dtype | None = None, device: Any = None, **spec: Any) -> "Experts":
        spec.pop("kind", None)
        spec.pop("kinds", None)
        return cls(**spec, dtype=dtype, device=device)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}"


MODULE_KINDS: dict[str, type[nn.Module]] = {
    cls.kind: cls for cls in (LowRankLinear, CURLinear, QuantizedLinear, NormalFloatLinear, CompensatedLinear,
                              ShrunkAttention, Experts)
}


def from_spec(spec: dict[str, Any], dtype: torch.dtype | None = None, device: Any = None,
              kinds: dict[str, type[nn.Module]] | None = None) -> nn.Module:
    """An empty module of the shapes ``spec`` describes (the inverse of ``spec_of``), of the class ``kinds``
    maps its kind to (default ``MODULE_KINDS``)."""
    kinds = MODULE_KINDS if kinds is None else kinds
    if spec["kind"] == "dense":
        if spec["dense_class"] == "Conv1D":
            return Conv1D(spec["out_features"], spec["in_features"]).to(dtype=dtype, device=device)
        return nn.Linear(spec["in_features"], spec["out_features"], bias=spec["bias"], dtype=dtype, device=device)
    kind = kinds.get(spec["kind"])
    if kind is None:
        raise ValueError(f"unknown module kind {spec['kind']!r}")
    return kind.empty(**spec, dtype=dtype, device=device, kinds=kinds)


# --- the loader --------------------------------------------------------------------------------------------


def _conversions(model: nn.Module) -> tuple[list[Any], list[Any]]:
    """transformers' load-time (renamings, converters) for ``model``'s class; none in transformers 4 or for a
    class it does not know."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:  # transformers 4: files and models share their names
        return [], []
    try:
        transforms = get_model_conversion_mapping(model)
    except Exception:  # noqa: BLE001 - a model class transformers does not know: its own names
        transforms = []
    return ([t for t in transforms if isinstance(t, WeightRenaming)],
            [t for t in transforms if isinstance(t, WeightConverter)])


def _expert_roles(converters: list[Any]) -> dict[str, tuple[str, str, str]]:
    """Each expert projection's role (``gate_proj``, ``up_proj``, ``down_proj``) → (the checkpoint's name for
    it, e.g. Mixtral's ``w1``; the converter's source pattern; the fused tensor), from the converters that
    fuse experts (``…experts.*.w1.weight`` + ``…experts.*.w3.weight`` → ``…experts.gate_up_proj``)."""
    roles: dict[str, tuple[str, str, str]] = {}
    for converter in converters:
        sources, targets = list(converter.source_patterns), list(converter.target_patterns)
        if len(targets) != 1:
            continue
        if targets[0].endswith("experts.gate_up_proj") and len(sources) == 2:
            names = ("gate_proj", "up_proj")
        elif targets[0].endswith("experts.down_proj") and len(sources) == 1:
            names = ("down_proj",)
        else:
            continue
        for role, source in zip(names, sources):
            stored = re.search(r"experts\.\*\.(\w+)\.weight$", source)
            if stored is not None:
                roles[role] = (stored.group(1), source, targets[0])
    return roles


_EXPERT_TENSOR = r"\.experts\.(\d+)\.({})\."  # …experts.<e>.<projection>.<tensor>


def _rename_expert_projections(keys: Any, mapping: dict[str, str]) -> dict[str, str]:
    """key → the key with its expert projection renamed by ``mapping`` (``…experts.3.gate_proj.weight_packed``
    → ``…experts.3.w1.weight_packed``), for the keys that name one."""
    mapping = {old: new for old, new in mapping.items() if old != new}
    if not mapping:
        return {}
    pattern = re.compile(_EXPERT_TENSOR.format("|".join(map(re.escape, mapping))))
    renamed = {}
    for key in keys:
        found = pattern.search(key)
        if found is not None:
            start, end = found.span(2)
            renamed[key] = key[:start] + mapping[found.group(2)] + key[end:]
    return renamed


def stored_expert_names(model: nn.Module, keys: Any) -> dict[str, str]:
    """Model tensor name → the name the family's checkpoints give it, for every tensor of an unfused expert's
    projection whose name differs (Mixtral: ``…experts.<e>.gate_proj.<t>`` → ``…experts.<e>.w1.<t>``, for a
    dense ``weight`` and compressed-tensors' ``weight_packed``/``weight_scale``/… alike), before
    transformers' own renames (``mlp`` → ``block_sparse_moe``) are reverted. What serving stacks read: the
    per-expert names of the family's checkpoints."""
    _, converters = _conversions(model)
    return _rename_expert_projections(keys, {role: stored for role, (stored, _, _) in _expert_roles(converters).items()})


def checkpoint_names(model: nn.Module, keys: Any) -> tuple[dict[str, str], dict[str, list[str]]]:
    """How ``model`` reads a checkpoint of tensors ``keys``, as ``from_pretrained`` does: (model tensor name →
    the checkpoint key it is read from, model tensor name → the checkpoint keys ``from_pretrained`` fuses into
    it). ``transformers`` 5 renames some families' keys (GPT-NeoX's ``embed_out`` is the model's ``lm_head``,
    Mixtral's ``block_sparse_moe`` its ``mlp``) and fuses experts' projections into 3-D tensors; each tensor of
    an expert's own projection, as unfused experts name it (``…experts.<e>.gate_proj.weight``, or its
    compressed tensors), is mapped to the tensor it is (Mixtral's ``…experts.<e>.w1.weight``). Identity where
    there is no conversion (and in transformers 4)."""
    from_keys = list(keys)
    renamings, converters = _conversions(model)
    if not renamings and not converters:
        return {key: key for key in from_keys}, {}
    from transformers.core_model_loading import rename_source_key

    roles = _expert_roles(converters)
    unstored = {stored: role for role, (stored, _, _) in roles.items()}
    names: dict[str, str] = {}
    fused: dict[str, list[str]] = {}
    for key in from_keys:
        name, pattern = rename_source_key(key, renamings, converters)
        if pattern is None:
            names.setdefault(_rename_expert_projections([name], unstored).get(name, name), key)
            continue
        fused.setdefault(name, []).append(key)
        expert = _expert_name(key, name, pattern, roles)
        if expert is not None:
            names.setdefault(expert, key)
    return names, fused


def _expert_name(key: str, fused: str, pattern: str, roles: dict[str, tuple[str, str, str]]) -> str | None:
    """The unfused name of the expert projection the checkpoint tensor ``key`` is (None: not one), read
    through the converter ``pattern`` into ``fused`` (``…experts.gate_up_proj`` or ``…experts.down_proj``)."""
    role = next((role for role, (_, source, _) in roles.items() if source == pattern), None)
    if role is None:
        return None
    index = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), key)
    if index is None:
        return None
    return f"{fused.rsplit('.', 1)[0]}.{index.group(1)}.{role}.weight"


def renamed_state(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A checkpoint's tensors under ``model``'s names (``checkpoint_names``); tensors ``from_pretrained`` would
    fuse are left out (outputs hold experts unfused, or are stock checkpoints ``from_pretrained`` reads)."""
    names, _ = checkpoint_names(model, state)
    return {name: state[key] for name, key in names.items()}


def base_config(data: dict[str, Any], **kwargs: Any):
    """The base family's transformers config (e.g. ``LlamaConfig``) of config.json's ``data``, marked with
    ``compressor-<base>`` or not, without the ``compressor`` entry. ``kwargs`` go to ``from_dict``."""
    data = dict(data)
    entry = data.pop(CONFIG_KEY, None) or {}
    if data["model_type"].startswith(MARK_PREFIX):
        data["model_type"] = entry["base_model_type"]
    return CONFIG_MAPPING[data["model_type"]].from_dict(data, **kwargs)


def checkpoint_state(folder: str) -> dict[str, Tensor]:
    """All tensors of ``folder``'s model.safetensors, or of its shards."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as file:
            names = sorted(set(json.load(file)["weight_map"].values()))
    else:
        names = ["model.safetensors"]
    state: dict[str, Tensor] = {}
    for name in names:
        state.update(load_file(os.path.join(folder, name)))
    return state


def state_for_modules(state: dict[str, Tensor], specs: dict[str, dict[str, Any]],
                      adapter: str | None) -> dict[str, Tensor]:
    """The checkpoint's tensors under the names of the modules: a compensated module's base tensors move
    under ``<name>.base.`` and its factors come from the adapter folder (``lora.down`` = lora_A,
    ``lora.up`` = lora_B)."""
    compensated = [name for name, spec in specs.items() if spec["kind"] == "compensated"]
    if not compensated or not adapter:
        return state
    state = dict(state)
    for name in compensated:
        prefix = f"{name}."
        for key in [k for k in state if k.startswith(prefix)]:
            state[f"{name}.base.{key[len(prefix):]}"] = state.pop(key)
    for key, tensor in load_file(os.path.join(adapter, ADAPTER_WEIGHTS)).items():
        name, part = key[len(PEFT_PREFIX):].rsplit(".", 2)[0], key.rsplit(".", 2)[1]
        state[f"{name}.lora.{'down' if part == 'lora_A' else 'up'}.weight"] = tensor
    return state


def is_tied(model: nn.Module, key: str) -> bool:
    """True for the output head of a model whose input and output embeddings are tied."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return False
    head = model.get_output_embeddings()
    return head is not None and key.endswith("weight") and model.get_submodule(key.rsplit(".", 1)[0]) is head


def load_compressed(folder: str, config: PretrainedConfig, specs: dict[str, dict[str, Any]], adapter: str | None,
                    dtype: torch.dtype, device: Any = "cpu",
                    kinds: dict[str, type[nn.Module]] | None = None) -> nn.Module:
    """The model of ``config``'s family with the modules ``specs`` describes swapped in and every tensor read
    from ``folder`` (and from the ``adapter`` folder), in eval mode. Raises ``ValueError`` where the files do
    not match the specs."""
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    for name, spec in sorted(specs.items(), key=lambda item: item[0].count(".")):  # parents before children
        model.set_submodule(name, from_spec(spec, dtype=dtype, kinds=kinds))
    state = state_for_modules(renamed_state(model, checkpoint_state(folder)), specs, adapter)
    result = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in result.missing_keys if k not in tied and not is_tied(model, k)]
    if missing or result.unexpected_keys:
        raise ValueError(f"{folder}: checkpoint does not match its module specs "
                         f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")
    model.tie_weights()
    return model.to(device).eval()


def local_folder(name_or_path: str, **hub: Any) -> str:
    """``name_or_path`` if it is a directory, else a local snapshot of that Hub repository."""
    if os.path.isdir(name_or_path):
        return str(name_or_path)
    from huggingface_hub import snapshot_download

    keys = ("revision", "cache_dir", "token", "local_files_only", "force_download", "proxies")
    return snapshot_download(str(name_or_path), **{k: hub[k] for k in keys if hub.get(k) is not None})


def config_data(folder: str) -> dict[str, Any]:
    with open(os.path.join(folder, "config.json")) as file:
        return json.load(file)


# --- what auto_map names -----------------------------------------------------------------------------------


class CompressorConfig(PretrainedConfig):
    """``AutoConfig`` of a marked (``compressor-<base>``) output: ``from_pretrained`` returns the base family's
    config, so the model is that family's class."""

    model_type = "compressor"

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, **kwargs: Any):
        data, kwargs = PretrainedConfig.get_config_dict(pretrained_model_name_or_path, **kwargs)
        return base_config(data, **kwargs)


class CompressorForCausalLM(PreTrainedModel):
    """``AutoModelForCausalLM`` of an output: ``from_pretrained`` returns the base family's model (e.g.
    ``LlamaForCausalLM``) with the compressed modules of config.json's ``compressor`` entry swapped in.
    Supports ``dtype`` (default: config.json's) and a single-device ``device_map`` ("auto": cuda if there is
    one); other ``from_pretrained`` options are ignored."""

    config_class = PretrainedConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, *args: Any, config: Any = None,
                        dtype: Any = None, torch_dtype: Any = None, device_map: Any = None, **kwargs: Any):
        folder = local_folder(pretrained_model_name_or_path, **kwargs)
        data = config_data(folder)
        data.pop("auto_map", None)  # the model returned is the base family's own class
        entry = data.get(CONFIG_KEY) or {}
        config = base_config(data)
        dtype = dtype if dtype is not None else torch_dtype
        if dtype is None or dtype == "auto":
            dtype = getattr(config, "dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if isinstance(device_map, dict):
            raise ValueError("compressor outputs load on one device: pass device_map='cuda' (or a torch.device)")
        if device_map == "auto":
            device_map = "cuda" if torch.cuda.is_available() else "cpu"
        adapter = os.path.join(folder, entry["adapter"]) if entry.get("adapter") else None
        return load_compressed(folder, config, entry.get("modules", {}), adapter, dtype, device_map or "cpu")
