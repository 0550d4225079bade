"""``ShrunkAttention`` against transformers' own attention: slicing q/k to kept RoPE pairs (different ones per
KV head) and v/o to kept value dims gives exactly the stock block whose removed rows and columns are zeroed,
with and without the KV cache, for grouped-query (Llama, Qwen2 biases) and plain (OPT, no RoPE) attention."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from transformers.cache_utils import DynamicCache

from compressor.model.attention import ShrunkAttention

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 48, 6, 2, 8


def kept_dims(rope: bool, n_kv: int, generator) -> torch.Tensor:
    """(n_kv, 4) kept dims per KV head, different per head: two RoPE pairs, or four single dims."""
    rows = []
    for _ in range(n_kv):
        if rope:
            pairs = torch.randperm(HEAD_DIM // 2, generator=generator)[:2]
            rows.append(torch.cat([pairs, pairs + HEAD_DIM // 2]).sort().values)
        else:
            rows.append(torch.randperm(HEAD_DIM, generator=generator)[:4].sort().values)
    return torch.stack(rows)


def build(arch: str):
    if arch == "opt":
        config = tf.OPTConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, ffn_dim=64, num_hidden_layers=1,
                              word_embed_proj_dim=HIDDEN)
        block, roles, rope = tf.models.opt.modeling_opt.OPTAttention(config, layer_idx=0), "out_proj", False
        n_kv = HEADS
    else:
        cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config}[arch]
        config = cls(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                     intermediate_size=64, num_hidden_layers=1)
        module = {"llama": tf.models.llama.modeling_llama.LlamaAttention,
                  "qwen2": tf.models.qwen2.modeling_qwen2.Qwen2Attention}[arch]
        block, roles, rope, n_kv = module(config, 0), "o_proj", True, KV_HEADS
    config._attn_implementation = "sdpa"
    return config, block.eval(), roles, rope, n_kv


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt"])
def test_sliced_attention_equals_the_stock_block_with_removed_dims_zeroed(arch):
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    config, block, o_name, rope, n_kv = build(arch)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    group = HEADS // n_kv
    qk = kept_dims(rope, n_kv, generator)  # (n_kv, 4)
    v_keep = torch.stack([torch.randperm(HEAD_DIM, generator=generator)[:5].sort().values for _ in range(n_kv)])
    q_rows = (torch.arange(HEADS)[:, None] * HEAD_DIM + qk.repeat_interleave(group, 0)).reshape(-1)
    k_rows = (torch.arange(n_kv)[:, None] * HEAD_DIM + qk).reshape(-1)
    v_rows = (torch.arange(n_kv)[:, None] * HEAD_DIM + v_keep).reshape(-1)
    o_cols = (torch.arange(HEADS)[:, None] * HEAD_DIM + v_keep.repeat_interleave(group, 0)).reshape(-1)
    bias = {r: getattr(block, f"{r}_proj").bias is not None for r in "qkv"}
    bias["o"] = block.get_submodule(o_name).bias is not None
    shrunk = ShrunkAttention(HIDDEN, HEADS, n_kv, HEAD_DIM, 4, 5, rope, 0,
                             {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": o_name}, bias,
                             scaling=block.scaling).eval()
    with torch.no_grad():
        shrunk.rope_dims.copy_(qk)
        for role, rows in (("q", q_rows), ("k", k_rows), ("v", v_rows)):
            source = getattr(block, f"{role}_proj")
            getattr(shrunk, f"{role}_proj").weight.copy_(source.weight[rows])
            if source.bias is not None:
                getattr(shrunk, f"{role}_proj").bias.copy_(source.bias[rows])
            keep = torch.zeros(source.weight.shape[0], dtype=torch.bool)
            keep[rows] = True
            source.weight[~keep] = 0  # the stock block with the removed rows zeroed
            if source.bias is not None:
                source.bias[~keep] = 0
        out = block.get_submodule(o_name)
        shrunk.get_submodule(o_name).weight.copy_(out.weight[:, o_cols])
        if out.bias is not None:
            shrunk.get_submodule(o_name).bias.copy_(out.bias)
    x = torch.randn(2, 7, HIDDEN)
    kwargs = {}
    if rope:
        rotary = tf.models.llama.modeling_llama.LlamaRotaryEmbedding(config)
        kwargs["position_embeddings"] = rotary(x, torch.arange(7)[None].expand(2, -1))
    with torch.no_grad():
        expected = block(x, attention_mask=None, **kwargs)[0]
        got = shrunk(x, attention_mask=None, **kwargs)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # prefill 5 tokens into a cache, then two single-token steps: the same as the whole sequence at once
    cache, steps = DynamicCache(), []
    with torch.no_grad():
        for start, end in ((0, 5), (5, 6), (6, 7)):
            part = {k: (v[0][:, start:end], v[1][:, start:end]) for k, v in kwargs.items()}
            steps.append(shrunk(x[:, start:end], attention_mask=None, cache=cache, **part)[0])
    torch.testing.assert_close(torch.cat(steps, dim=1), got, rtol=1e-5, atol=1e-5)
    assert cache.layers[0].keys.shape[-1] == 4 and cache.layers[0].values.shape[-1] == 5
