"""Replacement modules the compressors emit, and how to rebuild them on reload.

The stored layout and forward pass of each kind are defined once, in ``modeling_compressor`` (the file
copied into outputs for ``trust_remote_code`` loading); the classes here subclass them with what only
compressor needs: building from factors or integers, ``dense_weight()`` for ``--merge``, parameter counts.
Each kind has ``spec()`` (plain data recorded in compression.json and config.json) and ``empty(**spec)``
(an uninitialized module of the right shapes, filled by ``load_state_dict``). ``MODULE_KINDS`` is the
closed set the loader knows: ``low_rank`` (``up @ down``; with ``factor_bits`` 8 each factor a per-row
symmetric int8 ``QuantizedLinear``), ``quantized`` (packed integers,
compressed-tensors layout), ``normal_float`` (blockwise NormalFloat codes with double-quantized scales,
LQ-LoRA's), ``cur`` (``C @ U @ R``), ``compensated`` (any base linear plus a low-rank
``lora`` path, what EoRA emits) and ``shrunk_attention`` (an attention block with fewer dims per head,
MoDeGPT's; it has no dense equivalent in the model's config, so no merge).

Weights are always handled as (out, in) = (m, n), the ``nn.Linear`` layout; GPT-2's ``Conv1D`` stores
(in, out) and is converted at the edges (``weight_of`` / ``dense_module``).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ..kernels import normal_float, quant
from ..portable import modeling_compressor as portable
from ..portable.modeling_compressor import shape_of, spec_of
from .attention import ShrunkAttention

LINEAR_TYPES = (nn.Linear, Conv1D)
__all__ = ["LINEAR_TYPES", "CURLinear", "CompensatedLinear", "Experts", "LowRankLinear", "MODULE_KINDS", "NormalFloatLinear",
           "QuantizedLinear", "ShrunkAttention", "dense_module", "dequantized", "from_spec", "merge", "shape_of", "spec_of", "weight_of"]


def weight_of(module: nn.Module) -> Tensor:
    """The (out, in) weight of a dense linear (a view, not a copy)."""
    if isinstance(module, Conv1D):
        return module.weight.T
    return module.weight


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


class LowRankLinear(portable.LowRankLinear):
    """``y = (x downᵀ) upᵀ + b``, down (r, in), up (out, r) (``modeling_compressor.LowRankLinear``)."""

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

    @classmethod
    def from_integer_factors(cls, up: tuple[Tensor, Tensor], down: tuple[Tensor, Tensor], bits: int,
                             bias: Tensor | None, dense_class: str = "Linear",
                             dtype: torch.dtype | None = None) -> "LowRankLinear":
        """From symmetric per-row integer factors (``quant.integer_factors``): ``up`` = (q (out, r) int8,
        scale (out, 1)), ``down`` = (q (r, in) int8, scale (r, 1)); ``factor_bits`` = ``bits``."""
        (q_up, scale_up), (q_down, scale_down) = up, down
        out_features, rank = q_up.shape
        dtype = dtype or scale_up.dtype
        module = cls(q_down.shape[1], out_features, rank, bias is not None, dense_class, dtype=dtype, device="meta",
                     factor_bits=bits)
        for name, q, scale, b in (("down", q_down, scale_down, None), ("up", q_up, scale_up, bias)):
            zero = torch.zeros_like(scale, dtype=torch.int32)  # symmetric: not stored
            setattr(module, name, QuantizedLinear.from_integers(q, scale.to(dtype), zero, bits, None, True, b,
                                                                dtype=dtype))
        return module

    def factors(self) -> tuple[Tensor, Tensor]:
        """(up (out, r), down (r, in)) as the forward uses them (integer factors dequantized)."""
        return tuple(f.dense_weight() if self.factor_bits < 16 else f.weight for f in (self.up, self.down))

    def dense_weight(self) -> Tensor:
        """``up @ down`` (out, in), computed in fp32 at least."""
        up, down = self.factors()
        dtype = torch.promote_types(up.dtype, torch.float32)
        return (up.to(dtype) @ down.to(dtype)).to(up.dtype)

    def num_parameters(self) -> int:
        """The factors' elements (integers or floats) and the bias."""
        bias = 0 if self.bias is None else self.bias.numel()
        return self.rank * (self.in_features + self.out_features) + bias


class CURLinear(portable.CURLinear):
    """``y = ((x Rᵀ) Uᵀ) Cᵀ + b``, C (out, r), U (r, r), R (r, in) (``modeling_compressor.CURLinear``)."""

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

    def dense_weight(self) -> Tensor:
        """``C @ U @ R`` (out, in), computed in fp32 at least."""
        dtype = torch.promote_types(self.C.dtype, torch.float32)
        return (self.C.to(dtype) @ self.U.to(dtype) @ self.R.to(dtype)).to(self.C.dtype)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class QuantizedLinear(portable.QuantizedLinear):
    """``y = x Ŵᵀ + b`` from compressed-tensors' packed integers (``modeling_compressor.QuantizedLinear``);
    inside ``dequantized(model)`` the weight is dequantized once (the evaluation path)."""

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


class NormalFloatLinear(portable.NormalFloatLinear):
    """``y = x Ŵᵀ + b`` from blockwise NormalFloat codes (``modeling_compressor.NormalFloatLinear``); inside
    ``dequantized(model)`` the weight is dequantized once (the evaluation path)."""

    @classmethod
    def from_codes(cls, codes: "normal_float.NFCodes", bias: Tensor | None, dense_class: str = "Linear",
                   dtype: torch.dtype | None = None) -> "NormalFloatLinear":
        """From ``kernels.normal_float.quantize``'s codes of an (out, in) weight."""
        out_features, in_features = codes.shape
        c = codes.config
        module = cls(in_features, out_features, c.bits, c.block_size, c.scale_bits, c.group_size, c.scale_dtype,
                     bias is not None, dense_class, dtype=dtype or torch.float32, device=codes.codes.device)
        for name, tensor in codes.packed().items():
            getattr(module, name).copy_(tensor)
        if bias is not None:
            module.bias.data.copy_(bias.detach())
        return module


def from_spec(spec: dict[str, Any], dtype: torch.dtype | None = None, device: Any = None) -> nn.Module:
    """An empty module of the shapes ``spec`` describes (the inverse of ``spec_of``), of this module's classes."""
    return portable.from_spec(spec, dtype, device, MODULE_KINDS)


class CompensatedLinear(portable.CompensatedLinear):
    """``y = base(x) + lora(x)``: a compressed (quantized, pruned) linear plus a bias-free low-rank ``lora``
    (``modeling_compressor.CompensatedLinear``)."""

    def dense_weight(self) -> Tensor:
        """``W_base + up @ down`` (out, in), in the dtype of the low-rank factors."""
        base = self.base.dense_weight() if hasattr(self.base, "dense_weight") else weight_of(self.base)
        dtype = torch.promote_types(base.dtype, torch.float32)
        return (base.to(dtype) + self.lora.dense_weight().to(dtype)).to(self.lora.up.weight.dtype)


class Experts(portable.Experts):
    """A layer's routed experts with each expert's projections as linears of their own
    (``modeling_compressor.Experts``; ``model.experts.unfuse`` builds it from the family's fused module)."""

    fused_class: tuple[type, Any] | None = None  # (the family's experts class, its config), set by unfuse

    def merged(self) -> nn.Module:
        """The family's own fused module holding every expert's dense weights (``--merge``)."""
        if self.fused_class is None:
            raise ValueError("these experts were not unfused from a known module; they cannot be fused back")
        cls, config = self.fused_class
        with torch.device("meta"):
            fused = cls(config)
        dense = [[merge(p) if hasattr(p, "dense_weight") else p for p in (e.gate_proj, e.up_proj, e.down_proj)]
                 for e in (self.expert(i) for i in range(self.num_experts))]
        fused.gate_up_proj = nn.Parameter(torch.stack([torch.cat([g.weight, u.weight]) for g, u, _ in dense]).detach(),
                                          requires_grad=False)
        fused.down_proj = nn.Parameter(torch.stack([d.weight for _, _, d in dense]).detach(), requires_grad=False)
        return fused


MODULE_KINDS: dict[str, type[nn.Module]] = {
    cls.kind: cls for cls in (LowRankLinear, CURLinear, QuantizedLinear, NormalFloatLinear, CompensatedLinear,
                              ShrunkAttention, Experts)
}
# dequantized from packed codes on each call (the portable classes: the integer factors of a reloaded low-rank
# module are those, not this module's subclasses)
QUANTIZED_KINDS = (portable.QuantizedLinear, portable.NormalFloatLinear)


@contextmanager
def dequantized(model: nn.Module) -> Iterator[int]:
    """Within the block every quantized module (``QuantizedLinear``, ``NormalFloatLinear``, a low-rank module's
    integer factors) of ``model`` dequantizes its weight once and reuses it:
    the same numbers as dequantizing on each call, a dense layer's speed, the memory of a dense weight more.
    Yields how many modules it caches. For evaluation; the stored (packed) tensors are not touched."""
    quantized = [m for m in model.modules() if isinstance(m, QUANTIZED_KINDS)]
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
    if hasattr(module, "merged"):  # a container (experts): the family's own module
        return module.merged()
    return dense_module(module.dense_weight().detach(), None if module.bias is None else module.bias.detach(),
                        module.dense_class)
