"""The plugin contract every compressor follows.

A compressor declares its ``name`` (the recipe key), its ``Config`` dataclass (unknown keys are
errors), the statistics it ``needs`` (empty = data-free), and turns the targeted linears of one
decoder layer into replacement modules. It never swaps modules itself: the pipeline does, in one
place. The math lives in pure functions next to each compressor; ``compress`` is a thin wrapper.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from .stats import LinearStats


T = TypeVar("T")


def per_input(compute: Callable[["Target"], T]) -> Callable[["Target"], T]:
    """``compute`` memoized on the target's input: within one layer, modules that read the same input
    (q/k/v, gate/up) share one statistics object (``stats`` detects it), so a Hessian factor or an
    eigendecomposition of their Gram is computed once for all of them. Make one per layer."""
    cache: dict[int, T] = {}  # id(stats) → value

    def shared(target: "Target") -> T:
        key = id(target.stats)
        if key not in cache:
            cache[key] = compute(target)
        return cache[key]

    return shared


@dataclass
class Target:
    """One targeted linear of the current layer, as the step sees it."""

    name: str  # fully qualified, e.g. "model.layers.7.mlp.down_proj"
    module: nn.Module  # current module: dense, or the output of an earlier step
    weight: Tensor  # (out, in) current effective weight, fp32, on the compute device
    original: Tensor  # (out, in) weight before the first step touched this layer, fp32
    bias: Tensor | None  # (out,)
    stats: LinearStats | None  # input statistics, if the compressor needs any
    dense_class: str = "Linear"  # "Linear" or "Conv1D": what --merge writes back


@dataclass
class Outcome:
    """What a compressor decided for one target: a replacement module, or None to keep it."""

    module: nn.Module | None
    rank: int | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class LayerContext:
    layer_index: int
    n_layers: int
    device: torch.device
    dtype: torch.dtype  # the model's dtype: what factors are cast to at the end


class Compressor:
    """Base class. Subclasses set ``name``, ``Config``, ``summary`` and implement ``compress``."""

    name: ClassVar[str]
    Config: ClassVar[type]
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""

    def __init__(self, config: Any) -> None:
        self.config = config

    @property
    def needs(self) -> frozenset[str]:
        """Statistics kinds from ``stats.STAT_KINDS`` this configuration needs; empty = data-free."""
        return frozenset()

    @property
    def needs_calibration(self) -> bool:
        """Whether ``prepare`` needs calibration batches (e.g. a Fisher pass) even without per-layer stats."""
        return bool(self.needs)

    def plan(self, shapes: dict[str, tuple[int, int]], model_params: int) -> None:
        """Optional global pass over every target's (out, in) shape, before the layer walk."""

    def prepare(self, model: nn.Module, batches: list[Tensor] | None, device: torch.device) -> None:
        """Optional whole-model pass before the layer walk (Fisher, layer selection by hidden states).

        ``batches`` are the calibration token ids, a list of (batch, seq_len) tensors.
        """

    def wants_layer(self, index: int) -> bool:
        """False for decoder layers this compressor leaves alone (no statistics are collected there)."""
        return True

    def compress_layer(self, targets: dict[str, Target], ctx: LayerContext) -> dict[str, Outcome]:
        return {name: self.compress(target, ctx) for name, target in targets.items()}

    def compress(self, target: Target, ctx: LayerContext) -> Outcome:
        raise NotImplementedError
