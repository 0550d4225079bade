"""Which linears a recipe step targets: every linear inside the decoder stack (``architecture.decoder_layers``),
dense (``nn.Linear``, GPT-2's ``Conv1D``) or already compressed, matched by dot-bounded parts of their names
(suffixes, or paths inside them such as ``experts``) or ``re:`` regexes.
"""

from __future__ import annotations

import re

from torch import nn

from .architecture import decoder_layers
from .experts import is_fused
from .modules import LINEAR_TYPES, MODULE_KINDS


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, LINEAR_TYPES) or (getattr(module, "kind", None) in MODULE_KINDS
                                                and not getattr(module, "container", False))


def routing(module: nn.Module) -> set[str]:
    """The names (relative to ``module``) of the routing modules in its mixture-of-experts blocks: a block's
    own linear children beside its experts (Qwen2-MoE's shared-expert gate) and its routers (transformers 5's
    ``…TopKRouter``: a 2-D ``weight`` and no children), never targets."""
    found = set()
    for name, block in module.named_modules():
        children = dict(block.named_children())
        if any(getattr(child, "kind", None) == "experts" or is_fused(child) for child in children.values()):
            dot = f"{name}." if name else ""
            found |= {f"{dot}{child}" for child, sub in children.items() if is_linear(sub) or _is_router(sub)}
    return found


def _is_router(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, nn.Parameter) and weight.dim() == 2 and not list(module.children())


def layer_linears(layer: nn.Module, prefix: str) -> dict[str, nn.Module]:
    """Fully qualified name → linear (dense or already compressed) inside one decoder layer, routing aside."""
    found: dict[str, nn.Module] = {}
    skip = routing(layer)
    for name, module in layer.named_modules():
        if not name or name in skip or any(name.startswith(done + ".") for done in found):
            continue
        if is_linear(module):
            found[f"{prefix}.{name}"] = module
    return found


def decoder_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Fully qualified name → every linear (dense or compressed) inside the decoder layers, in model order;
    not the routing of mixture-of-experts blocks (``routing``)."""
    prefix, layers = decoder_layers(model)
    found: dict[str, nn.Module] = {}
    for index, layer in enumerate(layers):
        found.update(layer_linears(layer, f"{prefix}.{index}"))
    return found


def layer_index(model: nn.Module, name: str) -> int:
    """The decoder layer index of a module name inside the decoder stack."""
    prefix, _ = decoder_layers(model)
    return int(name[len(prefix) + 1:].split(".")[0])


def names_by_layer(model: nn.Module, names) -> dict[int, list[str]]:
    """Decoder layer index → the ``names`` in it, in the order given."""
    found: dict[int, list[str]] = {}
    for name in names:
        found.setdefault(layer_index(model, name), []).append(name)
    return found


def check_pattern(pattern: str) -> None:
    """Raise ValueError for a ``re:`` pattern that is not a valid regular expression."""
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as exc:
            raise ValueError(f"target {pattern!r} is not a valid regular expression ({exc})") from None


def linear_roles(linears: dict[str, nn.Module]) -> list[str]:
    """The distinct names of the decoder linears within their layer ("self_attn.q_proj", "mlp.down_proj")."""
    roles: dict[str, None] = {}
    for name in linears:
        parts = name.split(".")
        digits = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        roles[".".join(parts[digits + 1:]) if digits is not None else name] = None
    return list(roles)


def matches(name: str, pattern: str) -> bool:
    """A pattern is a dot-bounded part of the name: a suffix ("mlp.down_proj", "q_proj") or a path inside it
    ("experts", "shared_expert", "layers.3"); or a regex ("re:...")."""
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern) or f".{pattern}." in f".{name}."


def select(names: list[str], targets: list[str], ignore: list[str]) -> list[str]:
    """Names matched by any target and by no ignore pattern (ignore always wins)."""
    chosen = [n for n in names if (not targets or any(matches(n, t) for t in targets))]
    return [n for n in chosen if not any(matches(n, i) for i in ignore)]
