"""MoDeGPT's attention block with fewer query/key and value dims per head than its model's config says.

The block's layout, RoPE at the kept dims and forward pass are defined once in
``modeling_compressor.ShrunkAttention`` (the file outputs carry for ``trust_remote_code`` loading; its
docstring describes the shapes); this subclass adds what only compressor needs. ``rotate_half`` and
``rope_at`` (with ``gather_rope``) are the helpers its forward uses; the statistics hooks share ``rotate_half``.
"""

from __future__ import annotations

from ..portable import modeling_compressor as portable
from ..portable.modeling_compressor import gather_rope, rope_at, rotate_half

__all__ = ["ShrunkAttention", "gather_rope", "rope_at", "rotate_half"]


class ShrunkAttention(portable.ShrunkAttention):
    """Multi-head / grouped-query attention with ``qk_dim`` query/key and ``v_dim`` value dims per head."""

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
