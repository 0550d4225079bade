"""Which linears a recipe step targets: every linear inside the decoder stack (``architecture.decoder_layers``),
dense (``nn.Linear``, GPT-2's ``Conv1D``) or already compressed, matched by dot-bounded parts of their names
(suffixes, or paths inside them such as ``experts``) or ``re:`` regexes.
"""

from __future__ import annotations

import re

from torch import nn

from ..errors import quote
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


MAX_PATTERNS = 1000  # target and ignore patterns of one step: one "re:" pattern matches any number of names
MAX_PATTERN_CHARS = 1000


def check_patterns(patterns: list[str]) -> None:
    """Raise ValueError for too many patterns, a pattern too long, or a ``re:`` pattern that is not a valid
    regular expression (the patterns of a step are matched against every linear's name: bounded work)."""
    if len(patterns) > MAX_PATTERNS:
        raise ValueError(f"{len(patterns):,} target and ignore patterns, over the {MAX_PATTERNS:,} a step may "
                         "have; match many names with one 're:' pattern")
    for pattern in patterns:
        if len(pattern) > MAX_PATTERN_CHARS:
            raise ValueError(f"target {quote(pattern)} is longer than the {MAX_PATTERN_CHARS:,} characters a "
                             "pattern may have")
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except (re.error, RecursionError, OverflowError) as exc:
                raise ValueError(f"target {quote(pattern)} is not a valid regular expression ({exc})") from None


def linear_roles(linears: dict[str, nn.Module]) -> list[str]:
    """The distinct names of the decoder linears within their layer ("self_attn.q_proj", "mlp.down_proj")."""
    roles: dict[str, None] = {}
    for name in linears:
        parts = name.split(".")
        digits = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        roles[".".join(parts[digits + 1:]) if digits is not None else name] = None
    return list(roles)


class Patterns:
    """Matches a name against a list of patterns, each compiled once. A pattern is a dot-bounded part of the
    name: a suffix ("mlp.down_proj", "q_proj") or a path inside it ("experts", "shared_expert", "layers.3");
    or a regex ("re:...", searched)."""

    def __init__(self, patterns: list[str]):
        self.parts = {p for p in patterns if not p.startswith("re:")}
        self.regexes = [re.compile(p[3:]) for p in patterns if p.startswith("re:")]

    def __call__(self, name: str) -> bool:
        if self.parts and not self.parts.isdisjoint(_dotted_parts(name)):
            return True
        return any(regex.search(name) for regex in self.regexes)


def _dotted_parts(name: str) -> set[str]:
    """Every run of consecutive dot-separated pieces of ``name`` ("a.b.c": a, b, c, a.b, b.c, a.b.c)."""
    pieces = name.split(".")
    return {".".join(pieces[i:j]) for i in range(len(pieces)) for j in range(i + 1, len(pieces) + 1)}


def select(names: list[str], targets: list[str], ignore: list[str]) -> list[str]:
    """Names matched by any target and by no ignore pattern (ignore always wins)."""
    wanted, unwanted = Patterns(targets), Patterns(ignore)
    return [n for n in names if (not targets or wanted(n)) and not unwanted(n)]
