"""How the model runs while it is calibrated: eval mode without a KV cache (``calibration_mode``), and the
modules outside the decoder stack (``outside_layers``: embeddings, rotary, final norm, head)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


@contextmanager
def calibration_mode(model: nn.Module, gradients: bool = False) -> Iterator[None]:
    """Eval mode, no KV cache, and no_grad (or, with ``gradients``, grads on: the Fisher pass); everything
    restored on exit."""
    was_training, config = model.training, getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    model.eval()
    if config is not None:
        config.use_cache = False
    try:
        with torch.set_grad_enabled(gradients):
            yield
    finally:
        model.train(was_training)
        if config is not None:
            config.use_cache = use_cache


def outside_layers(model: nn.Module, layers: nn.ModuleList) -> list[nn.Module]:
    """The largest submodules that do not contain the decoder stack (embeddings, rotary, norm, head)."""

    def visit(module: nn.Module) -> list[nn.Module]:
        if module is layers:
            return []
        if not any(sub is layers for sub in module.modules()):
            return [module]
        return [found for child in module.children() for found in visit(child)]

    return visit(model)
