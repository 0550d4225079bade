"""MoDeGPT's attention block with fewer query/key and value dims per head than its model's config says.

The block's layout, RoPE at the kept dims and forward pass are defined once in
``modeling_compressor.ShrunkAttention`` (the file outputs carry for ``trust_remote_code`` loading; its
docstring describes the shapes); this subclass adds what only compressor needs. ``rotate_half`` and
``rope_at`` (with ``gather_rope``) are the helpers its forward uses; the statistics hooks share ``rotate_half``.
"""

from __future__ import annotations

from torch import nn

from ..portable import modeling_compressor as portable
from ..portable.modeling_compressor import gather_rope, rope_at, rotate_half

__all__ = ["ShrunkAttention", "gather_rope", "rope_at", "rotate_half", "not_reproduced"]

_QK_NORMS = ("q_norm", "k_norm", "q_layernorm", "k_layernorm")


class ShrunkAttention(portable.ShrunkAttention):
    """Multi-head / grouped-query attention with ``qk_dim`` query/key and ``v_dim`` value dims per head."""

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _partial_rotary(config) -> float | None:
    rope = getattr(config, "rope_parameters", None) or {}
    for value in (getattr(config, "partial_rotary_factor", None), getattr(config, "rotary_pct", None),
                  rope.get("partial_rotary_factor") if isinstance(rope, dict) else None):
        if value is not None and float(value) < 1:
            return float(value)
    return None


def not_reproduced(model: nn.Module, block: nn.Module) -> str | None:
    """What of ``block`` (a decoder layer's attention in ``model``) ``ShrunkAttention`` would not compute
    (None: it computes that attention exactly at full width): query/key norms (Qwen3, OLMo 2, Gemma 3), logit
    soft-capping (Gemma 2), partial rotary embeddings (Phi, StableLM, GPT-NeoX). Score scaling (Gemma 2's
    query_pre_attn_scalar, Granite's multiplier) is the block's own ``scaling``, and sliding windows come in
    the attention mask, both of which it uses."""
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)()
    norms = [name for name, _ in block.named_children() if name in _QK_NORMS]
    if norms:
        return f"query/key norms ({', '.join(norms)})"
    if getattr(config, "attn_logit_softcapping", None):
        return f"attention logit soft-capping ({config.attn_logit_softcapping})"
    partial = _partial_rotary(config)
    if partial is not None:
        return f"rotary embeddings on {partial:g} of each head"
    if _interleaved_rotary(model, config):
        return "interleaved rotary embeddings"
    return None


def _interleaved_rotary(model: nn.Module, config) -> bool:
    """Whether the model's rotary embedding pairs dims (2i, 2i + 1) (Cohere) rather than (i, i + d/2), the
    ``rotate_half`` pairing the smaller attention rotates by: its cos at a few positions, from a fresh copy of
    the rotary module on the CPU (the model may be a skeleton on the meta device)."""
    import torch

    rotary = next((m for m in model.modules() if "Rotary" in type(m).__name__), None)
    if rotary is None:
        return False
    try:
        fresh = type(rotary)(config=config)
        cos, _ = fresh(torch.zeros(1, 4, 1), torch.arange(4)[None])  # (1, 4, d)
    except Exception:  # noqa: BLE001 - a rotary module of another signature: assume the usual pairing
        return False
    half = cos.shape[-1] // 2
    return not torch.allclose(cos[..., :half], cos[..., half:])
