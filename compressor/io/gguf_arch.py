"""What llama.cpp calls each family we export to GGUF: its architecture, hyperparameter keys and tensor layout.

The conventions are those of llama.cpp's own converter (``convert_hf_to_gguf.py``): tensor names through
the ``gguf`` package's ``TensorNameMap`` (``model.layers.3.self_attn.q_proj.weight`` → ``blk.3.attn_q.weight``),
and per family what it changes on the way:

- ``llama`` (Llama, Mistral, Mixtral): q and k rows permuted from transformers' rotate-half RoPE layout to
  llama.cpp's interleaved one (``permute_rows``); a quantized grid's rows move with them (groups are along
  the input), and so do an adapter's ``lora_b`` rows.
- ``gemma2`` / ``gemma3``: every RMSNorm weight w is stored as 1 + w (transformers applies 1 + w);
  llama.cpp scales queries by 1/√head_dim, so ``query_pre_attn_scalar`` must equal head_dim.
- ``gpt2``: GPT-2's ``Conv1D`` weights are written (out, in) like every linear (``modules.weight_of``).
- ``gptneox`` / ``falcon``: the fused ``query_key_value`` rows reordered from transformers' per-head (or per kv
  group) interleaving to llama.cpp's q, then k, then v (``qkv_order``); Falcon's kv heads are the ones its
  attention uses (1 for multi-query), not ``num_kv_heads`` alone.
- Mixture of experts (``mixtral``, ``qwen3_moe``, ``qwen2_moe``, ``deepseek_v3``): each layer's experts as one
  stacked tensor per projection (``ffn_gate_exps`` (experts, ff, hidden) ...), the router as ``ffn_gate_inp``.
- ``deepseek2`` (DeepSeek-V3): latent attention written as llama.cpp's converter does, as one kv head of width
  kv_lora_rank + rope dims, ``kv_b_proj`` split per head into ``attn_k_b`` (heads, kv_lora_rank, nope; transposed)
  and ``attn_v_b`` (heads, v_head_dim, kv_lora_rank) (``split_tensor``); the router's correction bias as
  ``exp_probs_b.bias``; sigmoid gating, top-k weights normalized and scaled by ``routed_scaling_factor``.

``describe(config)`` returns the ``Family`` or raises a one-line ``CompressorError`` naming what llama.cpp
(or this exporter) cannot describe; nothing is written before it answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..errors import CompressorError


@dataclass(frozen=True)
class Family:
    """How one transformers ``model_type`` is written as a llama.cpp architecture."""

    arch: str                                 # gguf.MODEL_ARCH member name (LLAMA, QWEN2, ...)
    permute_qk: bool = False                  # llama.cpp's interleaved RoPE rows for q and k
    norm_plus_one: bool = False               # Gemma: RMSNorm weights stored as 1 + w
    experts: bool = False                     # routed experts stacked per projection
    extra: Callable[[Any, Any, str], None] | None = None  # (writer, config, arch name) → family keys
    qkv_order: Callable[[Any], Any] | None = None  # config → the fused attn_qkv's new row order (a LongTensor)
    own_attention_keys: bool = False          # the family writes head_count_kv, key lengths and RoPE dims itself
    split_tensor: Callable[[str, Any, Any], Any] | None = None  # (key, () → dense weight, config) → [(key, weight)]
    norm: str = "rms"                         # rms (RMSNorm: rms_eps) or layer (LayerNorm: layer_norm_eps)
    rope: bool = True                         # rotary positions (GPT-2: learned ones, no RoPE keys)
    kv_heads: Callable[[Any], int] | None = None  # config → KV heads (None: num_key_value_heads, else all heads)
    writes_kv_heads: bool = True              # GPT-2 writes no head_count_kv

    @property
    def name(self) -> str:
        import gguf

        return gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, self.arch)]


def rope_theta(config: Any, default: float = 10000.0) -> float:
    """The RoPE base of ``config`` (transformers 5's ``rope_parameters`` or 4's ``rope_theta``)."""
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    if isinstance(params, dict) and params.get("full_attention", {}).get("rope_theta"):
        return float(params["full_attention"]["rope_theta"])  # Gemma 3: per layer type
    return float(getattr(config, "rope_theta", None) or default)


def rope_scaling(config: Any) -> str | None:
    """The RoPE scaling type other than the default (None), which this exporter does not write."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(params, dict) and "full_attention" in params:
        params = params["full_attention"]
    kind = params.get("rope_type", params.get("type")) if isinstance(params, dict) else None
    return None if kind in (None, "default") else kind


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rotary_fraction(config: Any) -> float:
    """The fraction of each head that RoPE rotates (transformers 5's ``rope_parameters`` or the attribute)."""
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and "partial_rotary_factor" in params:
        return float(params["partial_rotary_factor"])
    return float(getattr(config, "partial_rotary_factor", None) or getattr(config, "rotary_pct", None) or 1.0)


def falcon_kv_heads(config: Any) -> int:
    """The key/value heads Falcon's attention uses: its own count (new decoder), 1 (multi-query) or every head."""
    if config.new_decoder_architecture:
        return config.num_kv_heads
    return 1 if config.multi_query else config.num_attention_heads


def _grouped_qkv_order(groups: int, per_group: int, queries: int, dim: int) -> Any:
    """Row order taking rows laid out (groups, per_group, dim) — per group ``queries`` query heads, then the
    key head(s), then the value head(s) — to every query, then every key, then every value."""
    import torch

    rows = torch.arange(groups * per_group * dim).reshape(groups, per_group, dim)
    keys = (per_group - queries) // 2
    parts = (rows[:, :queries], rows[:, queries:queries + keys], rows[:, queries + keys:])
    return torch.cat([part.reshape(-1) for part in parts])


def _neox_qkv(config: Any) -> Any:
    heads = config.num_attention_heads
    return _grouped_qkv_order(heads, 3, 1, config.hidden_size // heads)  # (heads, 3, head_dim)


def _falcon_qkv(config: Any) -> Any:
    heads, kv = config.num_attention_heads, falcon_kv_heads(config)
    dim = config.hidden_size // heads
    if not config.new_decoder_architecture and not config.multi_query:
        return _grouped_qkv_order(heads, 3, 1, dim)  # (heads, 3, head_dim), like GPT-NeoX
    return _grouped_qkv_order(kv, heads // kv + 2, heads // kv, dim)  # (kv, queries per kv + k + v, head_dim)


def _gemma2(writer: Any, config: Any, arch: str) -> None:
    if getattr(config, "attn_logit_softcapping", None):
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    if getattr(config, "sliding_window", None):
        writer.add_sliding_window(config.sliding_window)


def _gemma3(writer: Any, config: Any, arch: str) -> None:
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    if getattr(config, "sliding_window", None):
        writer.add_sliding_window(config.sliding_window)


def _gptneox(writer: Any, config: Any, arch: str) -> None:
    writer.add_parallel_residual(getattr(config, "use_parallel_residual", True))


def _falcon(writer: Any, config: Any, arch: str) -> None:
    writer.add_tensor_data_layout("jploski")  # the converter's name for q, k, v rows in that order


def _moe(writer: Any, config: Any, arch: str) -> None:
    writer.add_expert_count(getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
                            or config.n_routed_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    if getattr(config, "moe_intermediate_size", None):
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if getattr(config, "shared_expert_intermediate_size", None):
        writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)


def _deepseek2(writer: Any, config: Any, arch: str) -> None:
    import gguf

    _moe(writer, config, arch)
    writer.add_head_count_kv(1)  # latent attention as one shared kv head (the converter's MQA form)
    writer.add_leading_dense_block_count(config.first_k_dense_replace)
    if config.q_lora_rank is not None:
        writer.add_q_lora_rank(config.q_lora_rank)
    writer.add_kv_lora_rank(config.kv_lora_rank)
    writer.add_key_length(config.kv_lora_rank + config.qk_rope_head_dim)
    writer.add_value_length(config.kv_lora_rank)
    writer.add_key_length_mla(config.qk_nope_head_dim + config.qk_rope_head_dim)
    writer.add_value_length_mla(config.v_head_dim)
    writer.add_rope_dimension_count(config.qk_rope_head_dim)
    writer.add_expert_shared_count(config.n_shared_experts or 0)
    writer.add_expert_weights_scale(config.routed_scaling_factor)
    if config.norm_topk_prob:
        writer.add_expert_weights_norm(True)
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    if (config.n_group or 1) > 1:
        writer.add_expert_group_count(config.n_group)
        writer.add_expert_group_used_count(config.topk_group)


def _deepseek2_split(key: str, dense: Callable[[], Any], config: Any) -> list[tuple[str, Any]] | None:
    """DeepSeek's ``kv_b_proj`` (heads · (nope + v), kv_lora_rank) as the converter's per-head ``k_b_proj``
    (heads, kv_lora_rank, nope) and ``v_b_proj`` (heads, v, kv_lora_rank); the router's correction bias under the
    name the converter maps (``dense()``: the tensor's dense value, computed only for these). None: the tensor
    is kept as it is."""
    if key.endswith("e_score_correction_bias"):
        return [(key.replace("e_score_correction_bias", "e_score_correction.bias"), dense())]
    if not key.endswith("kv_b_proj.weight"):
        return None
    weight = dense()
    heads, nope, v = config.num_attention_heads, config.qk_nope_head_dim, config.v_head_dim
    per_head = weight.reshape(heads, nope + v, weight.shape[-1])
    k_b, v_b = per_head.split([nope, v], dim=1)
    return [(key.replace("kv_b_proj", "k_b_proj"), k_b.transpose(1, 2).contiguous()),
            (key.replace("kv_b_proj", "v_b_proj"), v_b.contiguous())]


FAMILIES: dict[str, Family] = {
    "llama": Family("LLAMA", permute_qk=True),
    "mistral": Family("LLAMA", permute_qk=True),
    "qwen2": Family("QWEN2"),
    "qwen3": Family("QWEN3"),
    "gemma2": Family("GEMMA2", norm_plus_one=True, extra=_gemma2),
    "gemma3_text": Family("GEMMA3", norm_plus_one=True, extra=_gemma3),
    "gpt2": Family("GPT2", norm="layer", rope=False, writes_kv_heads=False),
    "phi3": Family("PHI3"),
    "gpt_neox": Family("GPTNEOX", extra=_gptneox, qkv_order=_neox_qkv, norm="layer"),
    "falcon": Family("FALCON", extra=_falcon, qkv_order=_falcon_qkv, norm="layer", kv_heads=falcon_kv_heads),
    "mixtral": Family("LLAMA", permute_qk=True, experts=True, extra=_moe),
    "qwen3_moe": Family("QWEN3MOE", experts=True, extra=_moe),
    "qwen2_moe": Family("QWEN2MOE", experts=True, extra=_moe),
    "deepseek_v3": Family("DEEPSEEK2", experts=True, extra=_deepseek2, own_attention_keys=True,
                          split_tensor=_deepseek2_split),
}


def describe(config: Any) -> Family:
    """The ``Family`` of a transformers config, or a one-line refusal naming why llama.cpp cannot hold it."""
    model_type = config.model_type
    family = FAMILIES.get(model_type)
    if family is None:
        raise CompressorError(f"GGUF export: model type {model_type!r} is not one this exporter describes for "
                              f"llama.cpp (supported: {', '.join(sorted(FAMILIES))})")
    scaling = rope_scaling(config)
    if scaling and not (model_type.startswith("gemma3") and scaling == "linear"):
        raise CompressorError(f"GGUF export: RoPE scaling {scaling!r} of this {model_type} model is not written "
                              "by this exporter (only the default RoPE)")
    if family.norm_plus_one and not getattr(config, "tie_word_embeddings", True):
        raise CompressorError(f"GGUF export: this {model_type} model has its own output head; llama.cpp's "
                              f"{family.name} ties it to the token embedding")
    if family.norm_plus_one:
        scalar = getattr(config, "query_pre_attn_scalar", None)
        if scalar is not None and scalar != head_dim(config):
            raise CompressorError(f"GGUF export: query_pre_attn_scalar {scalar} differs from head_dim "
                                  f"{head_dim(config)}; llama.cpp's {model_type} scales queries by 1/sqrt(head_dim)")
    if model_type == "qwen3_moe" and not getattr(config, "norm_topk_prob", True):
        raise CompressorError("GGUF export: qwen3_moe without norm_topk_prob is not what llama.cpp's qwen3moe "
                              "computes (it renormalizes the top-k routing weights)")
    if model_type == "qwen2_moe" and getattr(config, "norm_topk_prob", False):
        raise CompressorError("GGUF export: qwen2_moe with norm_topk_prob is not what llama.cpp's qwen2moe computes")
    if model_type == "falcon" and (config.alibi or not config.parallel_attn or config.bias):
        raise CompressorError("GGUF export: llama.cpp's falcon computes parallel attention with RoPE and no linear "
                              "biases; this model has " + ", ".join(
                                  w for w, on in (("ALiBi", config.alibi), ("sequential attention",
                                                  not config.parallel_attn), ("biases", config.bias)) if on))
    if model_type == "gpt_neox" and not getattr(config, "attention_bias", True):
        raise CompressorError("GGUF export: llama.cpp's gptneox expects attention biases; this model has none")
    if model_type == "deepseek_v3" and not getattr(config, "rope_interleave", True):
        raise CompressorError("GGUF export: DeepSeek-V3 with rope_interleave false is not what llama.cpp's "
                              "deepseek2 computes (interleaved RoPE pairs)")
    if model_type == "gemma3_text":
        scaling = getattr(config, "rope_parameters", {}) or {}
        local = scaling.get("sliding_attention", {}).get("rope_theta") if isinstance(scaling, dict) else None
        if local not in (None, 10000.0):
            raise CompressorError(f"GGUF export: Gemma 3's local RoPE base {local} is not llama.cpp's 10000")
    return family


def write_hyperparameters(writer: Any, config: Any, family: Family, ff_lengths: list[int]) -> None:
    """The ``<arch>.*`` keys llama.cpp reads for ``config`` (``ff_lengths``: each layer's MLP width, one
    value when they are all equal)."""
    layers = config.num_hidden_layers if hasattr(config, "num_hidden_layers") else config.n_layer
    writer.add_block_count(layers)
    writer.add_context_length(getattr(config, "max_position_embeddings", None) or config.n_positions)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(ff_lengths[0] if len(set(ff_lengths)) == 1 else ff_lengths)
    writer.add_head_count(config.num_attention_heads)
    if family.norm == "layer":
        writer.add_layer_norm_eps(getattr(config, "layer_norm_epsilon", None) or config.layer_norm_eps)
    if family.writes_kv_heads and not family.own_attention_keys:
        kv_heads = family.kv_heads(config) if family.kv_heads is not None else \
            getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        writer.add_head_count_kv(kv_heads)
    if family.norm == "rms":
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if family.rope:
        writer.add_rope_freq_base(rope_theta(config))
    if family.rope and not family.own_attention_keys:
        dim = head_dim(config)
        rotary = int(dim * rotary_fraction(config))
        writer.add_rope_dimension_count(rotary)
        if getattr(config, "head_dim", None) and dim != config.hidden_size // config.num_attention_heads \
                or family.norm_plus_one:
            writer.add_key_length(dim)
            writer.add_value_length(dim)
    writer.add_vocab_size(config.vocab_size)
    if family.extra is not None:
        family.extra(writer, config, family.name)


def permute_rows(rows: Any, heads: int) -> Any:
    """llama.cpp's q/k row order (interleaved RoPE pairs) from transformers' (rotate-half) for a tensor whose
    dim -2 is the (heads · head_dim) rows: per head, rows (i, i + d/2) become (2i, 2i + 1)."""
    shape = rows.shape
    return rows.reshape(*shape[:-2], heads, 2, shape[-2] // heads // 2, shape[-1]).transpose(-3, -2).reshape(shape)
