"""An attention block with fewer query/key and value dims per head than its model's config says.

MoDeGPT keeps, per layer, ``qk_dim`` of each head's ``head_dim`` query/key dims and ``v_dim`` of its value
dims; transformers' attention classes reshape by ``head_dim`` and rotate all of it, so such a layer needs its
own forward. ``ShrunkAttention`` holds plain linears under the block's own child names (so the checkpoint
keys are the model's: ``…self_attn.q_proj.weight``) and one integer buffer:

- ``rope_dims`` (n_kv, qk_dim): the original dims each KV head (and all its query heads) keeps, sorted. With
  RoPE they come in ``rotate_half`` pairs (j, j + head_dim/2), so the kept vector ``[P, P + head_dim/2]``
  rotates by ``rotate_half`` on its own halves, with cos/sin gathered at those dims per head. Without RoPE
  (OPT) the buffer only records which dims were kept.

Shapes: q_proj (n_heads·qk_dim, hidden), k_proj (n_kv·qk_dim, hidden), v_proj (n_kv·v_dim, hidden),
o_proj (hidden, n_heads·v_dim). The score scale stays the original ``head_dim ** -0.5``. Attention runs in
``torch.nn.functional.scaled_dot_product_attention`` with transformers' mask (boolean or additive) or causal
when none is given; the KV cache holds the smaller keys and values (``Cache.update`` sizes layers lazily).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def rotate_half(x: Tensor) -> Tensor:
    """transformers' convention: (x1, x2) → (−x2, x1) over the two halves of the last dim."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_at(x: Tensor, cos: Tensor, sin: Tensor, dims: Tensor) -> Tensor:
    """Rotary embedding of ``x`` (batch, n_kv, group, seq, k): the query (or key, group 1) heads of each KV
    head, whose k dims are the original dims ``dims`` (n_kv, k) of that KV head, sorted and closed under
    j ↔ j + d/2; ``cos``/``sin`` (batch, seq, d)."""
    batch, seq = cos.shape[:2]
    flat = dims.reshape(-1)
    shape = (batch, seq, dims.shape[0], 1, dims.shape[1])
    cos = cos.index_select(-1, flat).view(shape).permute(0, 2, 3, 1, 4)  # (batch, n_kv, 1, seq, k)
    sin = sin.index_select(-1, flat).view(shape).permute(0, 2, 3, 1, 4)
    return x * cos + rotate_half(x) * sin


class ShrunkAttention(nn.Module):
    """Multi-head / grouped-query attention with ``qk_dim`` query/key and ``v_dim`` value dims per head."""

    kind = "shrunk_attention"

    def __init__(self, hidden_size: int, n_heads: int, n_kv_heads: int, head_dim: int, qk_dim: int, v_dim: int,
                 rope: bool, layer_idx: int, names: dict[str, str], bias: dict[str, bool],
                 scaling: float | None = None, dtype: torch.dtype | None = None, device: Any = None) -> None:
        super().__init__()
        if n_heads % n_kv_heads or (rope and qk_dim % 2):
            raise ValueError(f"bad attention geometry: {n_heads} heads over {n_kv_heads} KV heads, qk_dim {qk_dim}")
        self.hidden_size, self.n_heads, self.n_kv_heads, self.head_dim = hidden_size, n_heads, n_kv_heads, head_dim
        self.qk_dim, self.v_dim, self.rope, self.layer_idx = qk_dim, v_dim, rope, layer_idx
        self.scaling = head_dim ** -0.5 if scaling is None else scaling
        self.names, self.bias_of = dict(names), dict(bias)
        shapes = {"q": (hidden_size, n_heads * qk_dim), "k": (hidden_size, n_kv_heads * qk_dim),
                  "v": (hidden_size, n_kv_heads * v_dim), "o": (n_heads * v_dim, hidden_size)}
        for role, (fan_in, fan_out) in shapes.items():
            self.add_module(names[role], nn.Linear(fan_in, fan_out, bias=bias[role], dtype=dtype, device=device))
        self.register_buffer("rope_dims", torch.zeros(n_kv_heads, qk_dim, dtype=torch.long, device=device))

    def linear(self, role: str) -> nn.Linear:
        return getattr(self, self.names[role])

    def forward(self, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor] | None = None,
                attention_mask: Tensor | None = None, cache: Any = None, **kwargs: Any) -> tuple[Tensor, None]:
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        batch, seq, _ = hidden_states.shape  # (batch, seq, hidden)
        group = self.n_heads // self.n_kv_heads
        q = self.linear("q")(hidden_states).view(batch, seq, self.n_heads, self.qk_dim).transpose(1, 2)
        k = self.linear("k")(hidden_states).view(batch, seq, self.n_kv_heads, self.qk_dim).transpose(1, 2)
        v = self.linear("v")(hidden_states).view(batch, seq, self.n_kv_heads, self.v_dim).transpose(1, 2)
        if self.rope:
            if position_embeddings is None:
                raise ValueError("a rotary attention block needs position_embeddings")
            cos, sin = position_embeddings  # (batch, seq, head_dim)
            if cos.shape[-1] != self.head_dim:
                raise ValueError(f"rotary embedding of {cos.shape[-1]} dims for heads of {self.head_dim}")
            shape = (batch, self.n_kv_heads, group, seq, self.qk_dim)  # query heads grouped by KV head
            q = rope_at(q.reshape(shape), cos, sin, self.rope_dims).reshape(q.shape)
            k = rope_at(k[:, :, None], cos, sin, self.rope_dims)[:, :, 0]
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = attention_mask[:, :, :, : k.shape[-2]]
        causal = attention_mask is None and seq > 1
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, is_causal=causal,
                                             scale=self.scaling, enable_gqa=group > 1)  # (batch, heads, seq, v_dim)
        out = out.transpose(1, 2).reshape(batch, seq, self.n_heads * self.v_dim)
        return self.linear("o")(out), None

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "hidden_size": self.hidden_size, "n_heads": self.n_heads,
                "n_kv_heads": self.n_kv_heads, "head_dim": self.head_dim, "qk_dim": self.qk_dim, "v_dim": self.v_dim,
                "rope": self.rope, "layer_idx": self.layer_idx, "names": self.names, "bias": self.bias_of,
                "scaling": self.scaling}

    @classmethod
    def empty(cls, dtype: torch.dtype | None = None, device: Any = None, **spec: Any) -> "ShrunkAttention":
        spec.pop("kind", None)
        return cls(**spec, dtype=dtype, device=device)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return (f"heads={self.n_heads}, kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, "
                f"qk_dim={self.qk_dim}, v_dim={self.v_dim}, rope={self.rope}")
