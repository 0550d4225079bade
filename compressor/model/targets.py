"""Architecture facts found from the model itself: where the decoder layers are, which linears
they hold, and which of those a recipe step targets.

No per-architecture driver: the decoder stack is the ``nn.ModuleList`` whose length is the config's
layer count (Llama/Qwen2/Mistral ``model.layers``, OPT ``model.decoder.layers``, GPT-2
``transformer.h``), and linears are ``nn.Linear`` or GPT-2's ``Conv1D``.
"""

from __future__ import annotations

import re

from torch import nn

from ..errors import CompressorError
from .modules import LINEAR_TYPES, MODULE_KINDS

_KNOWN_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "model.language_model.layers", "gpt_neox.layers")


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(prefix, layers): the decoder stack, e.g. ("model.layers", ModuleList of 30)."""
    for path in _KNOWN_PATHS:
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList):
            return path, layers
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and n_layers:
            return name, module
    raise CompressorError(f"cannot find the decoder layers of {type(model).__name__}")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, LINEAR_TYPES) or getattr(module, "kind", None) in MODULE_KINDS


def layer_linears(layer: nn.Module, prefix: str) -> dict[str, nn.Module]:
    """Fully qualified name → linear (dense or already compressed) inside one decoder layer."""
    found: dict[str, nn.Module] = {}
    for name, module in layer.named_modules():
        if not name or any(name.startswith(done + ".") for done in found):
            continue
        if is_linear(module):
            found[f"{prefix}.{name}"] = module
    return found


def decoder_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Fully qualified name → every linear (dense or compressed) inside the decoder layers, in model order."""
    prefix, _ = decoder_layers(model)
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not name.startswith(prefix + ".") or any(name.startswith(done + ".") for done in found):
            continue
        if is_linear(module):
            found[name] = module
    return found


def layer_index(model: nn.Module, name: str) -> int:
    """The decoder layer index of a module name inside the decoder stack."""
    prefix, _ = decoder_layers(model)
    return int(name[len(prefix) + 1:].split(".")[0])


def matches(name: str, pattern: str) -> bool:
    """A pattern is a name suffix on a dot boundary ("mlp.down_proj", "q_proj") or a regex ("re:...")."""
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def select(names: list[str], targets: list[str], ignore: list[str]) -> list[str]:
    """Names matched by any target and by no ignore pattern (ignore always wins)."""
    chosen = [n for n in names if (not targets or any(matches(n, t) for t in targets))]
    return [n for n in chosen if not any(matches(n, i) for i in ignore)]
