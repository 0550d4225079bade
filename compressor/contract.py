"""The contract every compressor follows.

A compressor is a class with a ``name`` (its recipe key), a ``Config`` dataclass (unknown keys are
errors; ``Config.validate(shapes)``, if defined, checks values against the targeted shapes before any
weight is read) and three methods:

- ``requests()``: the statistics it needs for each group, as typed ``Request``s (what, where, of which
  member, per head); empty = data-free. ``uses_data`` is true when it needs calibration data at all
  (requests, or a model-level pass such as a Fisher or a layer selection).
- ``decide(view)`` (optional): model-level decisions before the layer walk, from the whole model
  (``ModelView``: the weights, the targets' shapes, the calibration batches, walks over the original
  model). Returns a ``Decision``: a JSON-able record written to compression.json (solved ratios,
  per-module ranks, chosen layers, τ), optionally the subset of targets to compress, and what ``compress``
  reads back: ``ranks`` (target → rank) and ``values`` (a solved plan, kept widths), which reach each
  group and target as ``decision``. Decisions travel as this data, never as attributes set on the
  compressor.
- ``compress(group, ctx)`` (``LinearCompressor.compress_linear(target, ctx)`` for one-linear methods): turn one ``Group`` (one linear, or the named roles of an MLP or attention
  block of one decoder layer) into replacements: name → ``Outcome`` (a module of any shape, or None to
  keep). Keys are member names or the block's name (a replacement for the whole block).

``group`` (class attribute) says what a group is: ``linear`` (each targeted linear alone), ``mlp``
({gate, up, down} of a layer; OPT and GPT-2 have no gate) or ``attention`` ({q, k, v, o}, or GPT-2's
fused {qkv, o}), with the architecture's heads, kv heads, head_dim and RoPE in ``group.arch``; ``blocks``
is both (each layer's attention group, then its MLP group; ``group.kind`` says which). ``group`` may be
set per instance from the config. A
compressor never swaps modules itself and never walks layers: the pipeline does both, in one place each.
The math lives in pure functions next to each compressor; ``compress`` is a thin wrapper.

In a run spread over ranks (``distributed``) the same contract holds unchanged: every statistic a compressor
receives is already summed over all ranks' windows; ``decide`` runs on every rank (its walks collect through
the shared ``Collector``, which sums) and rank 0's ``Decision`` is the one applied; ``compress`` runs only on
the group's owner rank, so it must depend on nothing but the group (its ``decision`` included), ``ctx`` and
the statistics ``decide`` computed (its result is sent to the other ranks, so a replacement module must be
picklable).

The seven methods on this contract:

| method   | group     | requests                              | decide                                  |
|----------|-----------|---------------------------------------|-----------------------------------------|
| LoRD     | linear    | none / abs_mean / gram of the input (of the output for wide matrices: gram_side) | ranks (uniform, model_ratio, WeLore τ or least truncation loss on whitened spectra of the original model); Fisher row weights (output_weight) |
| FWSVD    | linear    | none (uses_data: the Fisher pass)     | ranks; the Fisher per target (cached)   |
| WeLore   | linear    | none                                  | τ on the weight spectra; LRC / N-LRC and ranks per matrix |
| CURing   | linear    | sq_norm or gram (statistics: walk)    | layers by angular distance (a walk over the original model); restricts targets |
| EoRA     | linear    | gram of the input (space: eigen)      | rank checks; sees ``Target.original`` and the earlier step's module |
| MoDeGPT  | blocks (or mlp / attention) | input Gram of down; per-head Grams of q/k outputs (or rotated); input Gram of v | per-layer sparsity from block influence; smaller linears, attention replaced by ``ShrunkAttention`` |
| LQ-LoRA  | linear    | none (uses_data: the Fisher pass, if weighted) | the exact integer program over every matrix's NF configuration (bits, block sizes, scale precision) at a fixed rank, from each pair's decomposition error |
| quantize, prune | linear | gram / sq_norm of the input     | –                                       |
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, TypeVar

import torch
from torch import Tensor, nn

from .stats.accumulators import Request, TensorStats

if TYPE_CHECKING:
    from .model.architecture import Architecture
    from .walk.layers import Visit

T = TypeVar("T")


@dataclass
class Decision:
    """A model-level decision (``decide``, before the walk) as data: what goes into compression.json, the
    targets left to compress, and what ``compress`` reads back through ``Target.decision`` /
    ``Group.decision`` (in a run of several ranks, rank 0's decision reaches every rank). Statistics that
    ``decide`` computed for later use (a Fisher pass's per-target scales) are not decisions: every rank has
    its own, summed across ranks, so they stay with the compressor."""

    record: dict[str, Any] = field(default_factory=dict)
    targets: list[str] | None = None  # None: every target of the step
    ranks: dict[str, int | None] = field(default_factory=dict)  # target name → its rank (None: kept dense)
    values: dict[str, Any] = field(default_factory=dict)  # anything else compress reads (a solved plan, widths)


@dataclass
class Target:
    """One linear of the current group, as the step sees it."""

    name: str  # fully qualified, e.g. "model.layers.7.mlp.down_proj"
    module: nn.Module  # current module: dense, or the output of an earlier step
    weight: Tensor  # (out, in) current effective weight, fp32, on the compute device
    original: Tensor  # (out, in) weight before the first step touched this layer, in the layer's dtype
    bias: Tensor | None  # (out,)
    stats: TensorStats | None  # statistics of its input, if the compressor requested any
    dense_class: str = "Linear"  # "Linear" or "Conv1D": what --merge writes back
    output_stats: TensorStats | None = None  # statistics of its output, if the compressor requested any
    decision: Decision = field(default_factory=Decision)  # the step's model-level decision


@dataclass
class Group:
    """What one ``compress`` call acts on: members by role, inside one decoder layer."""

    kind: str  # "linear" | "mlp" | "attention"
    name: str  # the linear's name, or the block's ("model.layers.3.mlp"; the layer's own name if none)
    members: dict[str, Target]  # role → target ("linear" for one-linear groups)
    block: nn.Module | None  # the MLP or attention module (None for one-linear groups or OPT's MLP)
    stats: dict[Request, TensorStats]  # every request answered for this group
    arch: "Architecture | None" = None
    decision: Decision = field(default_factory=Decision)  # the step's model-level decision

    @property
    def target(self) -> Target:
        """The one member of a one-linear group."""
        return self.members["linear"]


@dataclass
class Outcome:
    """What a compressor decided for one name: a replacement module, or None to keep it."""

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
    memo: dict = field(default_factory=dict)  # per layer: results shared between the layer's groups

    def per_input(self, owner: object, target: Target, compute: Callable[[Target], T]) -> T:
        """``compute(target)`` memoized on the target's input within this layer: modules that read the same
        input (q/k/v, gate/up) share one statistics object, so a Hessian factor or an eigendecomposition of
        their Gram is computed once for all of them."""
        shared_by = id(target.stats) if target.stats is not None else target.name  # no statistics: its own
        key = (id(owner), compute.__name__, shared_by)
        if key not in self.memo:  # the statistics are kept alive with the value, so no id is reused
            self.memo[key] = (target.stats, compute(target))
        return self.memo[key][1]


@dataclass
class ModelView:
    """What ``decide`` sees: the loaded model and this step's part of the plan."""

    model: nn.Module
    shapes: dict[str, tuple[int, int]]  # target name → (out, in), in model order
    model_params: int
    batches: list[Tensor] | None  # the step's calibration token ids, (batch, seq) each
    device: torch.device
    arch: "Architecture | None" = None

    def walk(self, last_layer: int | None = None) -> Iterator["Visit"]:
        """A walk over the original model (propagate original) on this step's calibration data."""
        from .walk.layers import DEFAULT_STREAM, walk

        streams = {DEFAULT_STREAM: self.batches} if self.batches is not None else None
        return walk(self.model, streams, device=self.device, propagate="original", last_layer=last_layer)

    def layers(self, last_layer: int | None = None) -> Iterator["Visit"]:
        """A data-free walk (no forward): each decoder layer's modules in turn, read from disk when the model
        is streamed. Read weights through it (``visit.module(name)``), not through ``model``."""
        from .walk.layers import walk

        return walk(self.model, None, device=self.device, last_layer=last_layer)

    def layer_of(self, name: str) -> int:
        """The decoder layer index of a target name."""
        from .model.targets import layer_index

        return layer_index(self.model, name)


class Compressor:
    """Base class. Subclasses set ``name``, ``Config``, ``summary``, ``paper`` and implement ``compress``."""

    name: ClassVar[str]
    Config: ClassVar[type]
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    group: ClassVar[str] = "linear"
    mergeable: ClassVar[bool] = True  # whether --merge can write its output as the model's own modules
    # whether a layer's groups are independent pieces of single-threaded work (no shared memo, no threads of
    # their own): the pipeline then compresses them at once on worker threads (``parallel.threads``)
    parallel_groups: ClassVar[bool] = False

    def __init__(self, config: Any) -> None:
        self.config = config

    def requests(self) -> tuple[Request, ...]:
        """Statistics needed for each group; empty = data-free."""
        return ()

    @property
    def uses_data(self) -> bool:
        """Whether a run needs calibration data (statistics, or a pass of ``decide``)."""
        return bool(self.requests())

    def decide(self, view: ModelView) -> Decision | None:
        """Optional model-level decisions before the layer walk."""
        return None

    def compress(self, group: Group, ctx: LayerContext) -> dict[str, Outcome]:
        raise NotImplementedError

    def preview(self, shapes: dict[str, tuple[int, int]], model_params: int) -> dict[str, dict] | None:
        """``--dry-run``: name → {rank, params, bits} each target will have, where the config alone decides
        it (no weights, no data); None where calibration data or the weights decide (a global rank rule,
        a chosen layer subset). ``bits``: stored bits per original weight (quantized kinds). The default
        answers for a uniform rank rule (``ranks.RankRule``); other kinds override it."""
        from .ranks.uniform import RankRule, preview_ranks

        if isinstance(self.config, RankRule):
            return preview_ranks(self.config, shapes, model_params)
        return None


class LinearCompressor(Compressor):
    """A compressor of one linear at a time (``group: linear``): implement ``compress_linear``."""

    def compress(self, group: Group, ctx: LayerContext) -> dict[str, Outcome]:
        target = group.target
        return {target.name: self.compress_linear(target, ctx)}

    def compress_linear(self, target: Target, ctx: LayerContext) -> Outcome:
        raise NotImplementedError
