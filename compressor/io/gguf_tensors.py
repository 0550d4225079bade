"""A loaded (compressed) model's weights as the tensors of a llama.cpp GGUF file, before any type is chosen.

Each weight becomes one ``Weight``: a float tensor, or a ``Grid`` (the integers, scales and zero points of a
quantized linear whose grid a GGML block type holds exactly, ``kernels.gguf_blocks``). What llama.cpp
cannot hold as it is changes on the way, and is counted for the command's report:

- low-rank and CUR layers are merged to dense (llama.cpp has no factorized linear);
- a quantized linear no block type holds (another group size or bit width; NormalFloat) is dequantized and
  listed in ``inexact``: the exporter refuses it unless ``--type`` asks for a re-quantization;
- a compensated linear (EoRA, LQ-LoRA) gives its base to the model and its low-rank path to ``loras``
  (the ``--adapter-to`` file), or, without an adapter, is merged to dense (``merged_compensation``);
- routed experts (transformers' fused ``gate_up_proj`` / ``down_proj``, or our unfused ``Experts``) become
  one stacked tensor per projection, ``blk.N.ffn_{gate,up,down}_exps`` (experts, out, in).

Names follow ``gguf.TensorNameMap`` for the family's architecture; rows move as ``gguf_arch`` says (q/k
permutation, Gemma's 1 + w norms). MoDeGPT's shrunk attention is refused: llama.cpp has one head width.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..errors import CompressorError
from ..kernels import gguf_blocks, quant
from ..model.modules import (
    CompensatedLinear,
    CURLinear,
    Experts,
    LowRankLinear,
    NormalFloatLinear,
    QuantizedLinear,
    ShrunkAttention,
    weight_of,
)
from . import gguf_arch

LAYER = re.compile(r"\.(?:layers|h)\.(\d+)\.")


@dataclass
class Grid:
    """An exactly representable quantized weight: q (..., out, in) int8, scale and zero_point (..., out, G)."""

    q: Tensor
    scale: Tensor
    zero_point: Tensor | None
    kind: str  # the GGML type that holds it: Q4_0, Q4_1, Q8_0

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape)

    def map_rows(self, fn: Callable[[Tensor], Tensor]) -> "Grid":
        """The grid with ``fn`` applied to every part (a function of dim -2, the rows, only)."""
        zero = None if self.zero_point is None else fn(self.zero_point)
        return Grid(fn(self.q), fn(self.scale), zero, self.kind)

    def dense(self) -> Tensor:
        """The dequantized weight (..., out, in) fp32."""
        q, scale, zero = self.q.reshape(-1, self.q.shape[-1]), self.scale.reshape(-1, self.scale.shape[-1]), \
            None if self.zero_point is None else self.zero_point.reshape(-1, self.zero_point.shape[-1])
        return quant.dequantize(q, scale, zero, gguf_blocks.BLOCK).reshape(self.q.shape)


Weight = Tensor | Grid


@dataclass
class Collected:
    """The model's tensors under GGUF names, and what the conversion did."""

    tensors: dict[str, Weight] = field(default_factory=dict)
    loras: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # gguf name → (A (r, in), B (out, r))
    merged_factorized: int = 0            # low-rank / CUR layers merged to dense
    merged_compensation: int = 0          # compensated layers whose low-rank path was merged (no adapter)
    inexact: list[str] = field(default_factory=list)  # quantized layers no block type holds (dequantized)


def linear_weight(module: nn.Module, name: str, out: Collected) -> Weight:
    """The (out, in) weight of any linear kind: a ``Grid`` where a block type holds it exactly."""
    if isinstance(module, QuantizedLinear):
        kind = gguf_blocks.exact_type(module.bits, module.group_size, module.symmetric, module.in_features)
        if kind is not None:
            q, zero = module.integers()
            return Grid(q, module.weight_scale.detach().float(), zero, kind)
        out.inexact.append(f"{name} ({module.bits}-bit, group {module.group_size}, "
                           f"{'symmetric' if module.symmetric else 'asymmetric'})")
        return module.dense_weight().detach().float()
    if isinstance(module, NormalFloatLinear):
        out.inexact.append(f"{name} ({module.bits}-bit NormalFloat)")
        return module.dense_weight().detach().float()
    if isinstance(module, (LowRankLinear, CURLinear)):
        out.merged_factorized += 1
        return module.dense_weight().detach()
    return weight_of(module).detach()


def _model_tensors(model: nn.Module, adapter: bool, out: Collected) -> tuple[dict[str, Weight], dict[str, Any]]:
    """(transformers name → Weight, transformers weight name → (A, B) lora) of every tensor of ``model``."""
    tensors: dict[str, Weight] = {}
    loras: dict[str, tuple[Tensor, Tensor]] = {}
    owned: set[str] = set()
    for name, module in model.named_modules():
        if any(name.startswith(f"{o}.") for o in owned):
            continue
        if isinstance(module, ShrunkAttention):
            raise CompressorError(f"GGUF export: {name} is MoDeGPT's shrunk attention (fewer dims per head than "
                                  "the config); llama.cpp holds one head width per model")
        if isinstance(module, Experts):
            continue  # its linears are walked as modules of their own (``<experts>.<e>.gate_proj``)
        if getattr(module, "kind", None) is None:
            continue
        owned.add(name)
        base = module.base if isinstance(module, CompensatedLinear) else module
        weight = linear_weight(base, name, out)
        if isinstance(module, CompensatedLinear):
            down, up = module.lora.down.weight.detach().float(), module.lora.up.weight.detach().float()
            if adapter:
                loras[f"{name}.weight"] = (down, up)
            else:
                weight = (weight.dense() if isinstance(weight, Grid) else weight.float()) + up @ down
                out.merged_compensation += 1
        tensors[f"{name}.weight"] = weight
        if module.bias is not None:
            tensors[f"{name}.bias"] = module.bias.detach()
    seen: set[int] = set()
    for key, tensor in model.state_dict(keep_vars=True).items():
        module_name = key.rsplit(".", 1)[0]
        if module_name in owned or any(module_name.startswith(f"{o}.") for o in owned):
            continue
        if id(tensor) in seen:
            continue  # a tied weight (lm_head → embed_tokens): llama.cpp reuses token_embd
        seen.add(id(tensor))
        owner = model.get_submodule(module_name) if module_name else model
        if key.endswith(".weight") and isinstance(owner, nn.Module) and owner.__class__.__name__ == "Conv1D":
            tensors[key] = weight_of(owner).detach()
        else:
            tensors[key] = tensor.detach()
    return tensors, loras


def _stack(weights: list[Weight]) -> Weight:
    """One (experts, out, in) weight of per-expert (out, in) ones: a stacked grid where all share a kind."""
    if all(isinstance(w, Grid) for w in weights) and len({w.kind for w in weights}) == 1:
        zeros = [w.zero_point for w in weights]
        return Grid(torch.stack([w.q for w in weights]), torch.stack([w.scale for w in weights]),
                    None if zeros[0] is None else torch.stack(zeros), weights[0].kind)
    return torch.stack([w.dense() if isinstance(w, Grid) else w.float() for w in weights])


EXPERT_KEY = re.compile(r"^(?P<layer>.*\.layers\.(?P<bid>\d+))\.mlp\.experts\.(?:(?P<e>\d+)\.)?(?P<proj>\w+?)"
                        r"(?:\.weight)?$")


def _experts(tensors: dict[str, Weight]) -> dict[str, Weight]:
    """The routed experts' tensors (fused or unfused) as ``blk.N.ffn_{gate,up,down}_exps.weight``; they leave
    ``tensors``."""
    stacked: dict[str, Weight] = {}
    per_expert: dict[tuple[str, str], dict[int, Weight]] = {}
    for key in [k for k in tensors if ".mlp.experts." in k]:
        match = EXPERT_KEY.match(key)
        if match is None:
            raise CompressorError(f"GGUF export: no llama.cpp tensor for {key}")
        bid, proj, weight = match["bid"], match["proj"], tensors.pop(key)
        if match["e"] is None:  # transformers' fused parameters
            if proj == "gate_up_proj":
                gate, up = weight.chunk(2, dim=-2)  # (E, 2I, H): gate first
                stacked[f"blk.{bid}.ffn_gate_exps.weight"] = gate
                stacked[f"blk.{bid}.ffn_up_exps.weight"] = up
            elif proj == "down_proj":
                stacked[f"blk.{bid}.ffn_down_exps.weight"] = weight
            else:
                raise CompressorError(f"GGUF export: no llama.cpp tensor for {key}")
        else:
            per_expert.setdefault((bid, proj), {})[int(match["e"])] = weight
    for (bid, proj), experts in per_expert.items():
        role = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}.get(proj)
        if role is None:
            raise CompressorError(f"GGUF export: no llama.cpp tensor for expert projection {proj} of layer {bid}")
        stacked[f"blk.{bid}.ffn_{role}_exps.weight"] = _stack([experts[e] for e in sorted(experts)])
    return stacked


def _split(tensors: dict[str, Weight], loras: dict[str, Any], family: gguf_arch.Family, config: Any,
           out: Collected) -> dict[str, Weight]:
    """``tensors`` with the family's split tensors replaced by their parts (a quantized one dequantized and
    listed in ``inexact``: its groups run along the input that a split transposes)."""
    result: dict[str, Weight] = {}
    for key, weight in tensors.items():
        parts = family.split_tensor(key, lambda w=weight: w.dense() if isinstance(w, Grid) else w, config)
        if parts is None:
            result[key] = weight
            continue
        if key in loras:
            raise CompressorError(f"GGUF export: the adapter of {key} is not written; llama.cpp splits that matrix "
                                  "per head (merge the compensation with --type instead)")
        if isinstance(weight, Grid) and len(parts) > 1:
            out.inexact.append(f"{key} (split per head for llama.cpp)")
        result.update(parts)
    return result


def _transform(gguf_name: str, weight: Weight, config: Any, family: gguf_arch.Family) -> Weight:
    """The family's changes of one tensor on the way into GGUF (q/k row order, Gemma's 1 + w norms)."""
    if family.permute_qk and re.search(r"\.attn_[qk]\.(weight|bias)$", gguf_name):
        heads = config.num_attention_heads if ".attn_q." in gguf_name \
            else (getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        def rows(t: Tensor) -> Tensor:
            return gguf_arch.permute_rows(t.unsqueeze(-1), heads).squeeze(-1) if t.dim() == 1 \
                else gguf_arch.permute_rows(t, heads)
        return weight.map_rows(rows) if isinstance(weight, Grid) else rows(weight)
    if family.qkv_order is not None and re.search(r"\.attn_qkv\.(weight|bias)$", gguf_name):
        order = family.qkv_order(config)
        def reorder(t: Tensor) -> Tensor:
            return t.index_select(-2 if t.dim() > 1 else 0, order.to(t.device))
        return weight.map_rows(reorder) if isinstance(weight, Grid) else reorder(weight)
    if family.norm_plus_one and gguf_name.endswith("norm.weight"):
        return weight.float() + 1
    return weight


def collect(model: nn.Module, family: gguf_arch.Family, adapter: bool) -> Collected:
    """Every tensor of ``model`` under its GGUF name, transformed for llama.cpp (``adapter``: compensation
    paths go to ``loras`` instead of being merged)."""
    import gguf

    out = Collected()
    config = model.config
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, family.arch), layers)
    tensors, loras = _model_tensors(model, adapter, out)
    experts = _experts(tensors) if family.experts else {}
    if family.split_tensor is not None:
        tensors = _split(tensors, loras, family, config, out)
    mapped: dict[str, str] = {}
    for key in tensors:
        if key.endswith(".rotary_emb.inv_freq") or key.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise CompressorError(f"GGUF export: no llama.cpp tensor for {key} in a {config.model_type} model")
        mapped[key] = gguf_name
    for key, gguf_name in mapped.items():
        out.tensors[gguf_name] = _transform(gguf_name, tensors[key], config, family)
    for gguf_name, weight in experts.items():
        out.tensors[gguf_name] = weight
    for key, (down, up) in loras.items():
        if key not in mapped:
            raise CompressorError(f"GGUF export: the adapter of {key} (an expert's linear) is not written; llama.cpp "
                                  "adapters here cover dense linears only")
        out.loras[mapped[key]] = (down, _transform(mapped[key], up, config, family))
    return out
