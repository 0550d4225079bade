"""MoDeGPT (Lin et al., ICLR 2025; docs/methods.md#modegpt-modegpt): structured compression that shrinks each layer's own
dimensions, with no extra matrices and no gradients.

Per decoder layer l, with one sparsity φ_l for all its modules (``part`` chooses which):

- **MLP** (Type I, Nyström): keep the ``(1 − φ_l)·d_int`` intermediate channels of largest ridge leverage
  under the covariance of the intermediate activation (the input of ``down_proj``), slice gate/up to them
  and refit down by least squares.
- **Query–key** (Type II, CR): keep ``(1 − φ_l)·head_dim`` dims of every head by the product of the query
  and key covariances' column-norms: in RoPE pairs (j, j + head_dim/2), one mask per KV group. The
  covariances are of q_proj/k_proj's outputs before RoPE (``qk_covariance: pre_rope``, the reference's
  choice) or after it (``post_rope``).
- **Value–output** (Type III, SVD): keep ``(1 − φ_l)·head_dim`` value dims per head from the SVD of
  ``√C W_V W_O`` whitened by the attention input's covariance; a v_proj bias is folded into o_proj's
  (attention rows sum to one), so the new value projection has none.

The attention block is replaced by ``model.attention.ShrunkAttention`` (RoPE on the kept pairs, the
original score scale). φ comes from one model-level decision: block influence (mean 1 − cos between a
layer's input and output hidden states, on the original model) through MoDeGPT's softmax with smoothing ε
and a cap, mean ``ratio``. Each kind of unit is rounded so that its total over the layers is exactly
``round(ratio · L · width)`` (largest remainders): MLP channels, query–key dims (pairs with RoPE), value
dims; so the removed parameters meet ``ratio`` of the targeted blocks' within one unit of each kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .. import timing
from ..config.configs import field
from ..contract import Compressor, Decision, Group, LayerContext, ModelView, Outcome
from ..errors import CompressorError
from ..model.attention import ShrunkAttention
from ..model.modules import dense_module
from ..parallel.distributed import all_reduce_stats
from ..stats.accumulators import DistanceStats, Request
from . import modegpt_math as mg


@dataclass
class MoDeGPTConfig:
    ratio: float = field(
        0.2, "mean fraction of each layer's modules removed (per layer by block influence)"
    )
    part: Literal["all", "mlp", "attention"] = field(
        "all", "which modules: all, mlp (Type I) or attention (Types II and III)"
    )
    qk_covariance: Literal["pre_rope", "post_rope"] = field(
        "pre_rope", "query/key covariances of q_proj/k_proj's outputs before or after RoPE"
    )
    ridge_mlp: float = field(
        1e-2, "λ of the ridge leverage scores, absolute on the covariance (reference 1e-2)"
    )
    ridge_qk: float = field(1e-6, "ridge of the query/key covariances' square roots (reference 1e-6)")
    ridge_vo: float = field(1e-4, "ridge of the attention input covariance's square root (reference 1e-4)")
    smoothing: float = field(0.15, "ε of the softmax allocation over block influence (reference 0.15)")
    max_sparsity: float = field(0.8, "cap on one layer's removed fraction (reference 0.8)")

    def __post_init__(self) -> None:
        if not 0 <= self.ratio < 1:
            raise ValueError(f"ratio must be in [0, 1); got {self.ratio}")
        if not 0 < self.max_sparsity < 1 or self.ratio > self.max_sparsity:
            raise ValueError(f"max_sparsity must be in (0, 1) and at least ratio; got {self.max_sparsity}")
        if self.smoothing <= 0 or min(self.ridge_mlp, self.ridge_qk, self.ridge_vo) <= 0:
            raise ValueError("smoothing and the ridges must be positive")


@timing.timed("block_influence")
def block_influence(view: ModelView) -> list[float]:
    """Per decoder layer: mean over calibration tokens of 1 − cos(input, output hidden state)."""
    influence = []
    for visit in view.walk():
        before = visit.inputs()
        distance = DistanceStats(measure="cosine")
        for x, y in zip(before, visit.forward()):  # (batch, seq, hidden) each
            distance.add(x, y)
        all_reduce_stats([distance])
        influence.append(distance.mean)
    return influence


def kept_counts(sparsity: torch.Tensor, width: int, ratio: float) -> list[int]:
    """Units kept per layer: ``width · (1 − φ_l)`` rounded so that exactly ``round(ratio · L · width)``
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
    summary = ("structured: fewer MLP channels (Nyström), query/key dims (CR, RoPE pairs) and value dims "
               "(SVD) per layer; sparsity by block influence")
    paper = "MoDeGPT (Lin et al., ICLR 2025, arXiv:2408.09632)"
    mergeable = False  # shrunk attention has no dense equivalent in the model's config

    def __init__(self, config: MoDeGPTConfig) -> None:
        super().__init__(config)
        self.group = {"all": "blocks", "mlp": "mlp", "attention": "attention"}[config.part]

    def requests(self) -> tuple[Request, ...]:
        found: tuple[Request, ...] = ()
        if self.config.part in ("all", "mlp"):
            found += (Request("gram", role="down"),)  # the intermediate activation's Σ hᵀh
        if self.config.part in ("all", "attention"):
            where = "output" if self.config.qk_covariance == "pre_rope" else "rotated"
            found += (Request("gram", role="q", where=where, per_head=True),
                      Request("gram", role="k", where=where, per_head=True),
                      Request("gram", role="v"),  # the attention input's Σ xᵀx
                      # a fused q/k/v linear (GPT-2): per head over its q, k and v heads; its input
                      Request("gram", role="qkv", where="output", per_head=True), Request("gram", role="qkv"))
        return found

    def decide(self, view: ModelView) -> Decision:
        if view.batches is None:
            raise CompressorError("modegpt needs calibration data (block influence and covariances)")
        arch = view.arch
        layers = sorted({view.layer_of(name) for name in view.shapes})
        units: dict[str, int] = {}  # kind of unit → its count per layer (the full width)
        if self.config.part in ("all", "mlp"):
            widths = sorted({view.shapes[n][1] for n in view.shapes if _is_down(arch, n)})
            if not widths:
                raise CompressorError("modegpt's MLP step found no MLP down projection among the targets")
            if len(widths) == 1:
                units["channels"] = widths[0]
            else:  # a mixture of experts: routed experts, shared experts and dense MLPs of their own widths
                units.update({f"channels_{width}": width for width in widths})
        if self.config.part in ("all", "attention"):
            if self.config.qk_covariance == "post_rope" and not arch.rope:
                raise CompressorError(f"qk_covariance post_rope: {arch.family} has no rotary embedding")
            units["qk_pairs" if arch.rope else "qk_dims"] = arch.head_dim // 2 if arch.rope else arch.head_dim
            units["v_dims"] = arch.head_dim
        influence = block_influence(view)
        chosen = torch.tensor([influence[i] for i in layers])
        sparsity = mg.allocate_sparsity(chosen, self.config.ratio, self.config.smoothing, self.config.max_sparsity)
        counts = {unit: kept_counts(sparsity, width, self.config.ratio) for unit, width in units.items()}
        if "qk_pairs" in counts:
            counts["qk_dims"] = [2 * pairs for pairs in counts.pop("qk_pairs")]
        keep = {layer: {unit: kept[i] for unit, kept in counts.items()} for i, layer in enumerate(layers)}
        return Decision({
            "influence": {str(i): influence[i] for i in layers},
            "sparsity": {str(i): float(s) for i, s in zip(layers, sparsity)},
            **{f"kept_{unit}": {str(i): k[unit] for i, k in keep.items()} for unit in counts},
            "widths": {"channels": units.get("channels", widths if self.config.part != "attention" else None),
                       "head_dim": None if arch is None else arch.head_dim},
        }, values={"keep": keep})  # layer → {"channels", "qk_dims", "v_dims"} kept

    def compress(self, group: Group, ctx: LayerContext) -> dict[str, Outcome]:
        if group.kind == "attention":
            return self.compress_attention(group, ctx)
        return self.compress_mlp(group, ctx)

    def compress_mlp(self, group: Group, ctx: LayerContext) -> dict[str, Outcome]:
        down = group.members["down"]
        stats = group.stats[Request("gram", role="down")]
        covariance = stats.gram / max(stats.n_tokens, 1)  # (d_int, d_int), as the reference normalizes
        kept_of = group.decision.values["keep"][ctx.layer_index]
        keep = kept_of.get("channels", kept_of.get(f"channels_{down.weight.shape[1]}"))
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

    def compress_attention(self, group: Group, ctx: LayerContext) -> dict[str, Outcome]:
        keep = group.decision.values["keep"][ctx.layer_index]
        if keep["qk_dims"] >= group.arch.head_dim and keep["v_dims"] >= group.arch.head_dim:
            return {target.name: Outcome(None, note="all dims kept") for target in group.members.values()}
        return self.shrink_attention(group, ctx, keep["qk_dims"], keep["v_dims"])

    def shrink_attention(self, group: Group, ctx: LayerContext, qk_dim: int, v_dim: int) -> dict[str, Outcome]:
        """The attention block with ``qk_dim`` query/key and ``v_dim`` value dims per head: its members' new
        modules, then the ``ShrunkAttention`` that holds them."""
        arch = group.arch
        n_heads, n_kv, head_dim = arch.n_heads, arch.n_kv_heads, arch.head_dim
        where = "output" if self.config.qk_covariance == "pre_rope" else "rotated"
        (q, q_bias), (k, k_bias), (v, v_bias), (cov_q, cov_k, cov_x) = _projections(group, where)
        o = group.members["o"]
        device = q.device
        # query–key: the same kept dims for a KV head and its query heads
        kept = mg.qk_keep(cov_q, cov_k, qk_dim, arch.rope, self.config.ridge_qk).to(device)  # (n_kv, qk_dim)
        per_group = n_heads // n_kv
        q_rows = (torch.arange(n_heads, device=device)[:, None] * head_dim
                  + kept.repeat_interleave(per_group, dim=0)).reshape(-1)
        k_rows = (torch.arange(n_kv, device=device)[:, None] * head_dim + kept).reshape(-1)
        # value–output, per KV head; o_proj's bias absorbs v_proj's
        root, inv_root = mg.covariance_sqrt(cov_x, self.config.ridge_vo)
        values, outputs = [], []
        for kv in range(n_kv):
            heads = range(kv * per_group, (kv + 1) * per_group)
            value, outs = mg.vo_head(root, inv_root, v[kv * head_dim:(kv + 1) * head_dim],
                                     [o.weight[:, h * head_dim:(h + 1) * head_dim] for h in heads], v_dim)
            values.append(value)  # (v_dim, d)
            outputs.extend(outs)  # (d, v_dim) per query head
        o_bias = None if o.bias is None else o.bias.double()
        if v_bias is not None:  # Σ_h O_h b_v,kv(h): what the value bias adds to every output
            folded = o.weight.double() @ v_bias.double().view(n_kv, 1, head_dim).expand(
                n_kv, per_group, head_dim).reshape(-1)
            o_bias = folded if o_bias is None else o_bias + folded
        weights = {"q": (q[q_rows], None if q_bias is None else q_bias[q_rows]),
                   "k": (k[k_rows], None if k_bias is None else k_bias[k_rows]),
                   "v": (torch.cat(values), None), "o": (torch.cat(outputs, dim=1), o_bias)}
        names = {"q": "q_proj", "k": "k_proj", "v": "v_proj"}  # GPT-2's fused c_attn comes apart
        names.update({role: path.rsplit(".", 1)[-1] for role, path in arch.attention.roles.items() if role != "qkv"})
        block = ShrunkAttention(arch.hidden_size, n_heads, n_kv, head_dim, qk_dim, v_dim, arch.rope,
                                getattr(group.block, "layer_idx", ctx.layer_index), names,
                                {role: bias is not None for role, (_, bias) in weights.items()},
                                scaling=_scaling(group.block, head_dim), dtype=ctx.dtype, device=device)
        with torch.no_grad():
            block.rope_dims.copy_(kept)
            for role, (weight, bias) in weights.items():
                linear = block.linear(role)
                linear.weight.copy_(weight)
                if bias is not None:
                    linear.bias.copy_(bias)
        extra = {"kept_qk_dims": qk_dim, "kept_v_dims": v_dim}
        outcomes = {target.name: Outcome(block.linear(role), extra=extra)
                    for role, target in group.members.items() if role != "qkv"}
        if "qkv" in group.members:  # one member became three linears
            parts = nn.ModuleDict({role: block.linear(role) for role in "qkv"})
            outcomes[group.members["qkv"].name] = Outcome(parts, note="split into q_proj, k_proj, v_proj", extra=extra)
        outcomes[group.name] = Outcome(block)  # after its members: the block holds the same linears
        return outcomes


def _is_down(arch, name: str) -> bool:
    """Whether a target is an MLP's down projection: by the architecture's roles, or an expert's (or a shared
    expert's) ``down_proj`` in a mixture of experts."""
    role = arch.role_of(name) if arch is not None else None  # None: a MoE whose attention has no roles
    return (role or (0, "", ""))[2] == "down" or name.rsplit(".", 1)[-1] == "down_proj"


def _projections(group: Group, where: str):
    """((W_q, b_q), (W_k, b_k), (W_v, b_v), (C_q per head, C_k per head, C_x)) of an attention group, its
    q/k/v separate or fused (GPT-2's c_attn: rows q, k, v; output Gram per head over all of them)."""
    arch = group.arch
    n_heads, n_kv, head_dim = arch.n_heads, arch.n_kv_heads, arch.head_dim
    if "qkv" not in group.members:
        q, k, v = (group.members[role] for role in "qkv")
        covariances = (_covariance(group.stats[Request("gram", role="q", where=where, per_head=True)]),
                       _covariance(group.stats[Request("gram", role="k", where=where, per_head=True)]),
                       _covariance(group.stats[Request("gram", role="v")]))
        return (q.weight, q.bias), (k.weight, k.bias), (v.weight, v.bias), covariances
    fused = group.members["qkv"]
    sizes = [n_heads * head_dim, n_kv * head_dim, n_kv * head_dim]
    weights = fused.weight.split(sizes)
    biases = fused.bias.split(sizes) if fused.bias is not None else (None, None, None)
    per_head = _covariance(group.stats[Request("gram", role="qkv", where="output", per_head=True)])
    covariances = (per_head[:n_heads], per_head[n_heads:n_heads + n_kv],
                   _covariance(group.stats[Request("gram", role="qkv")]))
    return (*zip(weights, biases), covariances)


def _scaling(block: nn.Module | None, head_dim: int) -> float:
    """The block's score scale: its ``scaling`` (Llama, Qwen2, OPT), or GPT-2's flags."""
    if hasattr(block, "scaling"):
        return float(block.scaling)
    scale = head_dim ** -0.5 if getattr(block, "scale_attn_weights", True) else 1.0
    if getattr(block, "scale_attn_by_inverse_layer_idx", False):
        scale /= float(block.layer_idx + 1)
    return scale


def _covariance(stats) -> torch.Tensor:
    """Σ xᵀx / N, as the reference normalizes (its ridges are absolute)."""
    return stats.gram / max(stats.n_tokens, 1)
