"""Mixture-of-experts layers, with each expert's projections as targets of their own.

``transformers`` 5 keeps a layer's routed experts as one module of fused 3-D parameters (``gate_up_proj``
(E, 2I, H) with gate rows first, ``down_proj`` (E, H, I)), which no linear target matches. ``unfuse(model)``
replaces every such module by ``modules.Experts``, where expert ``e`` holds ``gate_proj``, ``up_proj`` and
``down_proj`` linears (``…mlp.experts.<e>.gate_proj``) computing the same routed sum: the router, its top-k
and the weighting stay the family's, each expert sees exactly the tokens routed to it (so its statistics are
its own), and at full rank the layer's output is reproduced. ``fuse`` puts the family's own module back
(``--merge``). Shared experts are ordinary MLPs already and stay as they are.

Only the layout those families share is unfused (concatenated gate/up, not transposed, no biases, a gated
activation, no per-expert norm: Mixtral, Qwen2/Qwen3-MoE, DeepSeek-V3, OLMoE, ...); ``check`` refuses any
other (gpt-oss's transposed, biased, clamped experts) with one line, before any weight is read.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..errors import CompressorError
from .modules import Experts

try:  # transformers' default gated activation of fused experts, act(gate) · up
    from transformers.integrations.moe import _default_apply_gate as _DEFAULT_GATE
except ImportError:  # a transformers without it: no class carries one
    _DEFAULT_GATE = None

_SUPPORTED = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True,
              "has_post_expert_norm": False}


def is_fused(module: nn.Module) -> bool:
    """A module of fused experts: 3-D ``gate_up_proj`` and ``down_proj`` parameters."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == down.dim() == 3


def fused_experts(model: nn.Module) -> dict[str, nn.Module]:
    """Name → every module of fused experts in ``model``."""
    return {name: module for name, module in model.named_modules() if is_fused(module)}


def unsupported(module: nn.Module) -> str | None:
    """Why ``module`` (fused experts) cannot be unfused, or None."""
    for flag, wanted in _SUPPORTED.items():
        if getattr(module, flag, wanted) != wanted:
            return f"{flag.replace('_', ' ')}: {getattr(module, flag)}"
    if type(module).__dict__.get("_apply_gate", _DEFAULT_GATE) is not _DEFAULT_GATE:
        return "its own gated activation"
    experts, rows, hidden = module.gate_up_proj.shape
    if rows % 2 or tuple(module.down_proj.shape) != (experts, hidden, rows // 2):
        return f"gate_up_proj {list(module.gate_up_proj.shape)} and down_proj {list(module.down_proj.shape)}"
    return None


def _activation(model: nn.Module, module: nn.Module) -> str:
    config = getattr(module, "config", None) or getattr(model, "config", None)
    text = getattr(config, "get_text_config", lambda: config)()
    act = getattr(text, "hidden_act", None) or getattr(text, "hidden_activation", None)
    if not isinstance(act, str):
        raise CompressorError(f"{type(module).__name__}: the experts' activation is not named in the config")
    return act


def check(model: nn.Module) -> None:
    """Refuse (one line) a model whose fused experts ``unfuse`` cannot rebuild exactly."""
    for name, module in fused_experts(model).items():
        reason = unsupported(module)
        if reason is not None:
            raise CompressorError(f"{name} ({type(module).__name__}): experts of this layout ({reason}) cannot be "
                                  "compressed yet; only the concatenated gate/up layout of Mixtral, Qwen-MoE and "
                                  "DeepSeek-V3 is supported")


def unfuse(model: nn.Module) -> int:
    """Replace every module of fused experts by ``Experts`` holding the same weights (copies per expert, on
    the parameters' device: meta stays meta); returns how many were replaced."""
    check(model)
    found = fused_experts(model)
    for name, module in found.items():
        experts, rows, hidden = module.gate_up_proj.shape
        gate_up, down = module.gate_up_proj.detach(), module.down_proj.detach()
        unfused = Experts(experts, hidden, rows // 2, _activation(model, module), dtype=gate_up.dtype,
                          device=gate_up.device)
        for index in range(experts):
            expert = unfused.expert(index)
            expert.gate_proj.weight = nn.Parameter(gate_up[index, : rows // 2].clone(), requires_grad=False)
            expert.up_proj.weight = nn.Parameter(gate_up[index, rows // 2:].clone(), requires_grad=False)
            expert.down_proj.weight = nn.Parameter(down[index].clone(), requires_grad=False)
        unfused.fused_class = (type(module), getattr(module, "config", None))
        model.set_submodule(name, unfused)
    return len(found)


def routed_linears(layer: nn.Module, prefix: str) -> set[str]:
    """The qualified names of the linears inside ``layer``'s experts (``prefix``: the layer's name): modules
    that see only the tokens routed to them, so their inputs do not pair token by token with another run's."""
    return {f"{prefix}.{name}.{child}" for name, module in layer.named_modules() if isinstance(module, Experts)
            for child, sub in module.named_modules() if child and isinstance(sub, nn.Linear)}


def expert_of(name: str) -> tuple[str, int] | None:
    """(the experts module's name, the expert's index) of a linear inside one (``…experts.3.gate_proj``)."""
    parts = name.split(".")
    return (".".join(parts[:-2]), int(parts[-2])) if len(parts) > 2 and parts[-2].isdigit() else None


@contextmanager
def calibrating_all(layer: nn.Module, prefix: str, names: set[str] | None = None) -> Iterator[None]:
    """Within the block, the experts of ``layer`` (``prefix``: its name) that hold one of the linears ``names``
    (None: every expert) also run on every token, for statistics only (``Experts.calibrate_all``): the layer's
    output is unchanged."""
    chosen: dict[str, set[int]] = {}
    for name in names if names is not None else routed_linears(layer, prefix):
        found = expert_of(name)
        if found is not None:
            chosen.setdefault(found[0], set()).add(found[1])
    modules = {name: layer.get_submodule(name[len(prefix) + 1:]) for name in chosen}
    try:
        for name, module in modules.items():
            module.calibrate_all = frozenset(chosen[name])
        yield
    finally:
        for module in modules.values():
            module.calibrate_all = None
