"""MoDeGPT (Lin et al., ICLR 2025; methods.md §6): structured compression that shrinks each layer's own
dimensions, with no extra matrices and no gradients.

This step compresses the **MLP** (``part: mlp``, Type I): in each decoder layer it keeps the intermediate
channels of largest ridge leverage under the covariance of the intermediate activation (the input of
``down_proj``), slices gate/up to them and refits down by least squares (``modegpt_math``). The share of
channels removed per layer comes from one model-level decision: block influence (mean 1 − cos between a
layer's input and output hidden states, on the original model) through MoDeGPT's softmax allocation with
smoothing ε and a cap, so that the mean over layers is ``ratio``; per-layer counts are rounded so that
the total removed channels are exactly ``round(ratio · L · d_int)`` (largest remainders).

The attention parts (query–key by CR in RoPE pairs, value–output by SVD) are the next step of the
MoDeGPT issue; their math is in ``modegpt_math`` already.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..contract import Compressor, Decision, Group, LayerContext, ModelView, Outcome
from ..errors import CompressorError
from ..model.modules import dense_module
from ..plan.configs import field
from ..stats.accumulators import DistanceStats, Request
from ..walk.layers import DEFAULT_STREAM
from . import modegpt_math as mg


@dataclass
class MoDeGPTConfig:
    ratio: float = field(
        0.2, "mean fraction of each layer's MLP channels removed (per-layer by block influence)"
    )
    part: Literal["mlp"] = field("mlp", "which modules: mlp (Type I, Nyström)")
    ridge_mlp: float = field(
        1e-2, "λ of the ridge leverage scores, absolute on the covariance (reference 1e-2)"
    )
    smoothing: float = field(0.15, "ε of the softmax allocation over block influence (reference 0.15)")
    max_sparsity: float = field(0.8, "cap on one layer's removed fraction (reference 0.8)")

    def __post_init__(self) -> None:
        if not 0 <= self.ratio < 1:
            raise ValueError(f"ratio must be in [0, 1); got {self.ratio}")
        if not 0 < self.max_sparsity < 1 or self.ratio > self.max_sparsity:
            raise ValueError(f"max_sparsity must be in (0, 1) and at least ratio; got {self.max_sparsity}")
        if self.smoothing <= 0 or self.ridge_mlp <= 0:
            raise ValueError("smoothing and ridge_mlp must be positive")


def block_influence(view: ModelView) -> list[float]:
    """Per decoder layer: mean over calibration tokens of 1 − cos(input, output hidden state)."""
    influence = []
    for visit in view.walk():
        before = [item.hidden for item in visit.streams[DEFAULT_STREAM].inputs]
        distance = DistanceStats(measure="cosine")
        for x, y in zip(before, visit.forward()):  # (batch, seq, hidden) each
            distance.add(x, y)
        influence.append(distance.mean)
    return influence


def kept_counts(sparsity: torch.Tensor, width: int, ratio: float) -> list[int]:
    """Channels kept per layer: ``width · (1 − φ_l)`` rounded so that exactly ``round(ratio · L · width)``
    are removed in all (largest remainders), at least one kept per layer."""
    removed = sparsity.double() * width
    total = round(ratio * len(sparsity) * width)
    floor = removed.floor()
    extra = total - int(floor.sum())
    order = torch.argsort(removed - floor, descending=True)
    counts = floor.clone()
    counts[order[: max(extra, 0)]] += 1
    return [max(1, width - int(c)) for c in counts]


class MoDeGPT(Compressor):
    name = "modegpt"
    Config = MoDeGPTConfig
    summary = ("structured: keep MLP channels by ridge leverage, refit down (Nyström); "
               "per-layer sparsity by influence")
    paper = "MoDeGPT (Lin et al., ICLR 2025, arXiv:2408.09632)"
    group = "mlp"

    def __init__(self, config: MoDeGPTConfig) -> None:
        super().__init__(config)
        self.keep: dict[int, int] = {}  # layer → intermediate channels kept

    def requests(self) -> tuple[Request, ...]:
        return (Request("gram", role="down"),)  # the intermediate activation's Σ hᵀh

    def decide(self, view: ModelView) -> Decision:
        if view.batches is None:
            raise CompressorError("modegpt needs calibration data (block influence and covariances)")
        layers = sorted({view.layer_of(name) for name in view.shapes})
        widths = {
            view.shapes[name][1]
            for name in view.shapes
            if (view.arch.role_of(name) or (0, "", ""))[2] == "down"
        }
        if len(widths) != 1:
            raise CompressorError(
                f"modegpt needs one MLP width across the targeted layers; found {sorted(widths)}"
            )
        (width,) = widths
        influence = block_influence(view)
        chosen = torch.tensor([influence[i] for i in layers])
        sparsity = mg.allocate_sparsity(
            chosen, self.config.ratio, self.config.smoothing, self.config.max_sparsity
        )
        counts = kept_counts(sparsity, width, self.config.ratio)
        self.keep = dict(zip(layers, counts))
        return Decision(
            {
                "influence": {str(i): influence[i] for i in layers},
                "sparsity": {str(i): float(s) for i, s in zip(layers, sparsity)},
                "kept_channels": {str(i): k for i, k in self.keep.items()},
                "width": width,
            }
        )

    def compress(self, group: Group, ctx: LayerContext) -> dict[str, Outcome]:
        down = group.members["down"]
        stats = group.stats[Request("gram", role="down")]
        covariance = stats.gram / max(stats.n_tokens, 1)  # (d_int, d_int), as the reference normalizes
        keep = self.keep[ctx.layer_index]
        if keep >= down.weight.shape[1]:  # nothing removed: the refit would only add the ridge's error
            return {target.name: Outcome(None, note="all channels kept") for target in group.members.values()}
        kept = mg.mlp_keep(covariance, keep, self.config.ridge_mlp).to(down.weight.device)
        outcomes = {}
        for role, target in group.members.items():
            if role == "down":
                weight = mg.nystrom_down(covariance, kept, target.weight)  # (d, keep)
                bias = target.bias
            else:  # gate, up: their rows of the kept channels
                weight, bias = target.weight[kept], None if target.bias is None else target.bias[kept]
            module = dense_module(
                weight.to(ctx.dtype).clone(),
                None if bias is None else bias.to(ctx.dtype).clone(),
                target.dense_class,
            )
            outcomes[target.name] = Outcome(module, extra={"kept_channels": keep})  # a width, not a rank
        return outcomes
