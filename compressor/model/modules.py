"""Replacement modules the compressors emit, and how to rebuild them on reload.

Each kind has ``spec()`` (plain data recorded in compression.json) and ``empty(**spec)`` (an
uninitialized module of the right shapes, filled by ``load_state_dict``), plus ``dense_weight()``
for ``--merge``. ``MODULE_KINDS`` is the closed set the loader knows: ``low_rank`` (``up @ down``),
``quantized`` (packed integers, compressed-tensors layout), ``compensated`` (any base linear plus a
low-rank ``lora`` path, what EoRA emits) and ``shrunk_attention`` (an attention block with fewer dims per
head, MoDeGPT's; ``attention.py``; it has no dense equivalent in the model's config, so no merge).

Weights are always handled as (out, in) = (m, n), the ``nn.Linear`` layout; GPT-2's ``Conv1D`` stores
(in, out) and is converted at the edges (``weight_of`` / ``dense_module``).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ..kernels import quant
from .attention import ShrunkAttention

LINEAR_TYPES = (nn.Linear, Conv1D)


def weight_of(module: nn.Module) -> Tensor:
    """The (out, in) weight of a dense linear (a view, not a copy)."""
    if isinstance(module, Conv1D):
        return module.weight.T
    return module.weight


def shape_of(module: nn.Module) -> tuple[int, int]:
    """(out, in) of any linear, dense or compressed."""
    if isinstance(module, Conv1D):
        return module.nf, module.weight.shape[0]
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    return module.out_features, module.in_features  # compressed kinds carry the same attributes


def dense_module(weight: Tensor, bias: Tensor | None, like: str) -> nn.Module:
    """A dense module of class ``like`` ("Linear" or "Conv1D") holding ``weight`` (out, in)."""
    out_features, in_features = weight.shape
    if like == "Conv1D":
        module = Conv1D(out_features, in_features)
        module.weight = nn.Parameter(weight.T.contiguous())
        module.bias = nn.Parameter(bias.clone() if bias is not None else torch.zeros(out_features, dtype=weight.dtype))
        return module
    module = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    module.weight = nn.Parameter(weight.contiguous())
    if bias is not None:
        module.bias = nn.Parameter(bias.clone())
    return module


class LowRankLinear(nn.Module):
    """``y = (x downᵀ) upᵀ + b``: a rank-r factorization ``W ≈ up @ down`` of a linear.

    down: (r, in) ("A", lora_A), up: (out, r) ("B", lora_B). Stored as two ``nn.Linear`` so the
    state dict reads ``<name>.down.weight``, ``<name>.up.weight``, ``<name>.up.bias``.
    """

    kind = "low_rank"

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 dense_class: str = "Linear", dtype: torch.dtype | None = None, device: Any = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.dense_class = dense_class
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)  # (r, in)
        self.up = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)  # (out, r)

    @classmethod
    def from_factors(cls, up: Tensor, down: Tensor, bias: Tensor | None, dense_class: str = "Linear",
                     dtype: torch.dtype | None = None) -> "LowRankLinear":
        out_features, rank = up.shape
        dtype = dtype or up.dtype
        module = cls(down.shape[1], out_features, rank, bias is not None, dense_class, dtype=dtype, device="meta")
        module.down.weight = nn.Parameter(down.to(dtype).contiguous())
        module.up.weight = nn.Parameter(up.to(dtype).contiguous())
        if bias is not None:
            module.up.bias = nn.Parameter(bias.detach().to(dtype).clone())
        return module

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "rank": self.rank, "bias": self.up.bias is not None, "dense_class": self.dense_class}

    @classmethod
    def empty(cls, in_features: int, out_features: int, rank: int, bias: bool, dense_class: str = "Linear",
              dtype: torch.dtype | None = None, device: Any = None, **_: Any) -> "LowRankLinear":
        return cls(in_features, out_features, rank, bias, dense_class, dtype=dtype, device=device)

    def dense_weight(self) -> Tensor:
        """``up @ down`` (out, in), computed in fp32 at least."""
        dtype = torch.promote_types(self.up.weight.dtype, torch.float32)
        return (self.up.weight.to(dtype) @ self.down.weight.to(dtype)).to(self.up.weight.dtype)

    @property
    def bias(self) -> Tensor | None:
        return self.up.bias

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class CURLinear(nn.Module):
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

    @classmethod
    def from_factors(cls, C: Tensor, U: Tensor, R: Tensor, row_indices: Tensor, col_indices: Tensor,
                     bias: Tensor | None, dense_class: str = "Linear", dtype: torch.dtype | None = None) -> "CURLinear":
        out_features, rank = C.shape
        dtype = dtype or C.dtype
        module = cls(R.shape[1], out_features, rank, bias is not None, dense_class, dtype=dtype, device="meta")
        module.C = nn.Parameter(C.detach().to(dtype).contiguous())
        module.U = nn.Parameter(U.detach().to(dtype).contiguous())
        module.R = nn.Parameter(R.detach().to(dtype).contiguous())
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().to(dtype).clone())
        module.row_indices = torch.as_tensor(row_indices, dtype=torch.long, device=C.device).clone()
        module.col_indices = torch.as_tensor(col_indices, dtype=torch.long, device=C.device).clone()
        return module

    def forward(self, x: Tensor) -> Tensor:
        hidden = nn.functional.linear(x, self.R)  # (..., r)
        hidden = nn.functional.linear(hidden, self.U)  # (..., r)
        return nn.functional.linear(hidden, self.C, self.bias)  # (..., out)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "rank": self.rank, "bias": self.bias is not None, "dense_class": self.dense_class}

    @classmethod
    def empty(cls, in_features: int, out_features: int, rank: int, bias: bool, dense_class: str = "Linear",
              dtype: torch.dtype | None = None, device: Any = None, **_: Any) -> "CURLinear":
        return cls(in_features, out_features, rank, bias, dense_class, dtype=dtype, device=device)

    def dense_weight(self) -> Tensor:
        """``C @ U @ R`` (out, in), computed in fp32 at least."""
        dtype = torch.promote_types(self.C.dtype, torch.float32)
        return (self.C.to(dtype) @ self.U.to(dtype) @ self.R.to(dtype)).to(self.C.dtype)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"

class QuantizedLinear(nn.Module):
    """``y = x Ŵᵀ + b`` with ``Ŵ = (q − zero_point) · scale`` dequantized from packed integers on each call
    (or, inside ``dequantized(model)``, once: the evaluation path).

    Buffers use compressed-tensors' ``pack-quantized`` names and layouts (``quant`` module docstring):
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
        groups = quant.n_groups(in_features, self.group_size)
        dtype = dtype or torch.float32
        self.register_buffer("weight_packed", torch.zeros(out_features, quant.packed_width(in_features, bits),
                                                          dtype=torch.int32, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=dtype, device=device))
        if not symmetric:
            self.register_buffer("weight_zero_point", torch.zeros(quant.packed_width(out_features, bits), groups,
                                                                  dtype=torch.int32, device=device))
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self.cached_weight: Tensor | None = None  # set by ``dequantized``; never saved (not a buffer)

    @classmethod
    def from_integers(cls, q: Tensor, scale: Tensor, zero_point: Tensor, bits: int, group_size: int | None,
                      symmetric: bool, bias: Tensor | None, dense_class: str = "Linear",
                      dtype: torch.dtype | None = None) -> "QuantizedLinear":
        """From integers q (out, in) int8, scale (out, G) and zero_point (out, G) int32."""
        out_features, in_features = q.shape
        dtype = dtype or scale.dtype
        module = cls(in_features, out_features, bits, group_size, symmetric, bias is not None, dense_class,
                     dtype=dtype, device=q.device)
        module.weight_packed.copy_(quant.pack_int32(q, bits))
        module.weight_scale.copy_(scale)
        if not symmetric:
            module.weight_zero_point.copy_(quant.pack_int32(zero_point.to(torch.int8), bits, dim=0))
        if bias is not None:
            module.bias.data.copy_(bias.detach())
        return module

    def integers(self) -> tuple[Tensor, Tensor | None]:
        """(q (out, in) int8, zero_point (out, G) int32 or None)."""
        q = quant.unpack_int32(self.weight_packed, self.bits, self.in_features)
        if self.symmetric:
            return q, None
        return q, quant.unpack_int32(self.weight_zero_point, self.bits, self.out_features, dim=0).to(torch.int32)

    def dense_weight(self) -> Tensor:
        """The dequantized weight (out, in), in the dtype of the scale."""
        q, zero_point = self.integers()
        return quant.dequantize(q, self.weight_scale, zero_point, self.group_size, dtype=self.weight_scale.dtype)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.cached_weight if self.cached_weight is not None else self.dense_weight()
        return nn.functional.linear(x, weight.to(x.dtype), self.bias)

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


def spec_of(module: nn.Module) -> dict[str, Any]:
    """``spec()`` of a compressed kind, or of a dense linear (kind "dense") used as a base module."""
    if hasattr(module, "spec"):
        return module.spec()
    out_features, in_features = shape_of(module)
    return {"kind": "dense", "in_features": in_features, "out_features": out_features,
            "bias": module.bias is not None, "dense_class": type(module).__name__}


def from_spec(spec: dict[str, Any], dtype: torch.dtype | None = None, device: Any = None) -> nn.Module:
    """An empty module of the shapes ``spec`` describes (the inverse of ``spec_of``)."""
    if spec["kind"] == "dense":
        if spec["dense_class"] == "Conv1D":
            return Conv1D(spec["out_features"], spec["in_features"]).to(dtype=dtype, device=device)
        return nn.Linear(spec["in_features"], spec["out_features"], bias=spec["bias"], dtype=dtype, device=device)
    kind = MODULE_KINDS.get(spec["kind"])
    if kind is None:
        raise ValueError(f"unknown module kind {spec['kind']!r}")
    return kind.empty(**spec, dtype=dtype, device=device)


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

    def dense_weight(self) -> Tensor:
        """``W_base + up @ down`` (out, in), in the dtype of the low-rank factors."""
        base = self.base.dense_weight() if hasattr(self.base, "dense_weight") else weight_of(self.base)
        dtype = torch.promote_types(base.dtype, torch.float32)
        return (base.to(dtype) + self.lora.dense_weight().to(dtype)).to(self.lora.up.weight.dtype)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "dense_class": self.dense_class, "rank": self.rank, "base": spec_of(self.base),
                "lora": self.lora.spec()}

    @classmethod
    def empty(cls, base: dict[str, Any], lora: dict[str, Any], dtype: torch.dtype | None = None, device: Any = None,
              **_: Any) -> "CompensatedLinear":
        return cls(from_spec(base, dtype, device), from_spec(lora, dtype, device))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


MODULE_KINDS: dict[str, type[nn.Module]] = {
    cls.kind: cls for cls in (LowRankLinear, CURLinear, QuantizedLinear, CompensatedLinear, ShrunkAttention)
}


@contextmanager
def dequantized(model: nn.Module) -> Iterator[int]:
    """Within the block every ``QuantizedLinear`` of ``model`` dequantizes its weight once and reuses it:
    the same numbers as dequantizing on each call, a dense layer's speed, the memory of a dense weight more.
    Yields how many modules it caches. For evaluation; the stored (packed) tensors are not touched."""
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    try:
        with torch.no_grad():
            for module in quantized:
                module.cached_weight = module.dense_weight()
        yield len(quantized)
    finally:
        for module in quantized:
            module.cached_weight = None


def merge(module: nn.Module) -> nn.Module:
    """The dense module (original class) equivalent to a compressed one."""
    return dense_module(module.dense_weight().detach(), None if module.bias is None else module.bias.detach(),
                        module.dense_class)
