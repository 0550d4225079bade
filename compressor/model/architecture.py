"""The structure of a decoder-only Hugging Face causal LM, as data found from the model itself.

``describe(model)`` walks the module tree once and returns an ``Architecture``: where the decoder layers
are, which linear of a layer plays which role in its attention and MLP (q/k/v/o or fused qkv/o;
gate/up/down), which norm feeds each block, and the head geometry. There is no driver per model family:
the decoder stack is found by a few known paths (or by its length), blocks and roles by a small table of
candidate names, and linears are ``nn.Linear`` or transformers' ``Conv1D`` (GPT-2).

Paths in a ``Block`` are relative to a decoder layer ("self_attn.q_proj"); the ``Architecture`` methods
turn them into fully qualified module names ("model.layers.3.self_attn.q_proj") and back.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import CompressorError

LINEAR_TYPES = (nn.Linear, Conv1D)
ATTENTION, MLP = "attention", "mlp"

# Where the decoder stack usually lives, tried in order before searching by length.
_KNOWN_LAYER_PATHS = ("model.layers", "model.decoder.layers", "transformer.h",
                      "model.language_model.layers", "gpt_neox.layers")
_ATTENTION_HINTS = ("attn", "attention")  # substrings of the attention block's child name
_MLP_NAMES = ("mlp", "feed_forward", "ffn")  # child names of a separate MLP block

# role → candidate last path components of its linear, per block kind, in canonical role order.
_ATTENTION_ROLES = {
    "q": ("q_proj", "query", "q"),
    "k": ("k_proj", "key", "k"),
    "v": ("v_proj", "value", "v"),
    "qkv": ("c_attn", "qkv_proj", "query_key_value", "Wqkv"),  # one fused linear for q, k and v
    "o": ("o_proj", "out_proj", "dense", "c_proj"),
}
_MLP_ROLES = {
    "gate": ("gate_proj", "w1"),
    "up": ("up_proj", "fc1", "c_fc", "w3"),
    "down": ("down_proj", "fc2", "c_proj", "w2"),
}
_SEPARATE_QKV, _FUSED_QKV = ("q", "k", "v"), ("qkv",)

# Learned absolute position embeddings (GPT-2 "wpe", OPT "embed_positions"): their models have no rope.
_POSITION_EMBEDDING_NAMES = ("wpe", "embed_positions", "position_embeddings")
_ROPE_CONFIG_KEYS = ("rope_parameters", "rope_scaling", "rope_theta")


@dataclass(frozen=True)
class Block:
    """The attention or the MLP of a decoder layer."""

    # "attention" or "mlp"
    kind: str
    # the block module's path relative to the layer ("self_attn", "mlp", "attn"); None when its linears sit
    # directly in the layer (OPT's fc1/fc2)
    path: str | None
    # role → linear path relative to the layer: Llama {"q": "self_attn.q_proj", ..., "o": "self_attn.o_proj"},
    # GPT-2 {"qkv": "attn.c_attn", "o": "attn.c_proj"}, OPT MLP {"up": "fc1", "down": "fc2"}
    roles: dict[str, str]
    # path of the norm that feeds this block ("input_layernorm", "ln_2"), None when the layer has none
    norm: str | None


@dataclass(frozen=True)
class Architecture:
    """Where a decoder-only causal LM keeps its layers, blocks and role linears, and its head geometry."""

    family: str  # config.model_type: "llama", "opt", "gpt2", ...
    layers_path: str  # the decoder stack: "model.layers", "model.decoder.layers", "transformer.h"
    n_layers: int
    hidden_size: int  # residual stream width
    intermediate_size: int  # MLP width (output features of the up linear)
    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads (= n_heads without grouped-query attention)
    head_dim: int  # width of one head; q has n_heads * head_dim outputs, k and v n_kv_heads * head_dim
    rope: bool  # rotary position embeddings applied inside attention (Llama/Qwen2/Mistral)
    fused_qkv: bool  # one linear computes q, k and v (GPT-2's c_attn: role "qkv")
    attention: Block
    mlp: Block

    def layer_prefix(self, index: int) -> str:
        """Fully qualified name of decoder layer ``index``: "model.layers.3"."""
        if not 0 <= index < self.n_layers:
            raise IndexError(f"layer {index} out of range: the model has {self.n_layers} layers")
        return f"{self.layers_path}.{index}"

    def block(self, kind: str) -> Block:
        """The attention or MLP block description ("attention" or "mlp")."""
        if kind == ATTENTION:
            return self.attention
        if kind == MLP:
            return self.mlp
        raise ValueError(f"unknown block kind {kind!r}: expected {ATTENTION!r} or {MLP!r}")

    def block_names(self, kind: str, index: int) -> dict[str, str]:
        """role → fully qualified linear name in layer ``index``: {"q": "model.layers.3.self_attn.q_proj"}."""
        prefix = self.layer_prefix(index)
        return {role: f"{prefix}.{path}" for role, path in self.block(kind).roles.items()}

    def block_path(self, kind: str, index: int) -> str | None:
        """Fully qualified block module name ("model.layers.3.mlp"); None when the block is the layer."""
        path = self.block(kind).path
        return None if path is None else f"{self.layer_prefix(index)}.{path}"

    def role_of(self, name: str) -> tuple[int, str, str] | None:
        """Fully qualified linear name → (layer index, block kind, role); None if it plays no role."""
        head, _, rest = name.partition(f"{self.layers_path}.")
        index_text, _, relative = rest.partition(".")
        if head or not index_text.isdigit() or int(index_text) >= self.n_layers:
            return None
        for block in (self.attention, self.mlp):
            for role, path in block.roles.items():
                if path == relative:
                    return int(index_text), block.kind, role
        return None


def describe(model: nn.Module) -> Architecture:
    """The architecture of ``model``, found from its modules and config; CompressorError if it has no
    recognizable decoder stack, attention or MLP."""
    model_name = type(model).__name__
    config = _text_config(model)
    layers_path, layers = decoder_layers(model)
    layer = layers[0]
    attention, fused_qkv = _find_attention(layer, model_name)
    mlp = _find_mlp(layer, attention.path, model_name)
    attention_norm, mlp_norm = _block_norms(layer)
    hidden_size, n_heads, n_kv_heads, head_dim = _head_geometry(config, model_name)
    return Architecture(
        family=getattr(config, "model_type", "") or model_name,
        layers_path=layers_path,
        n_layers=len(layers),
        hidden_size=hidden_size,
        intermediate_size=_out_features(layer.get_submodule(mlp.roles["up"])),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        rope=_uses_rope(model, config),
        fused_qkv=fused_qkv,
        attention=replace(attention, norm=attention_norm),
        mlp=replace(mlp, norm=mlp_norm),
    )


def _text_config(model: nn.Module):
    """The language model's config (the text part of a multimodal one); None for a bare module."""
    config = getattr(model, "config", None)
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else config


def _config_value(config, *keys: str) -> int | None:
    """The first of ``keys`` that the config sets (not None)."""
    for key in keys:
        value = getattr(config, key, None)
        if value is not None:
            return value
    return None


def _head_geometry(config, model_name: str) -> tuple[int, int, int, int]:
    """(hidden size, query heads, key/value heads, head dim) from the config; head dim defaults to
    hidden / heads (Qwen2 sets no head_dim), key/value heads to the query heads (no GQA)."""
    hidden_size = _config_value(config, "hidden_size", "n_embd")
    n_heads = _config_value(config, "num_attention_heads", "n_head")
    if not n_heads or not hidden_size:
        raise CompressorError(f"the config of {model_name} gives no attention head count or hidden size")
    n_kv_heads = _config_value(config, "num_key_value_heads") or n_heads
    head_dim = _config_value(config, "head_dim") or hidden_size // n_heads
    return hidden_size, n_heads, n_kv_heads, head_dim


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, layers) of the decoder stack, e.g. ("model.layers", ModuleList of 30): a known path
    (Llama/Qwen2/Mistral ``model.layers``, OPT ``model.decoder.layers``, GPT-2 ``transformer.h``), else the
    ``nn.ModuleList`` whose length is the config's layer count."""
    config = _text_config(model)
    for path in _KNOWN_LAYER_PATHS:
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList) and len(layers):
            return path, layers
    n_layers = getattr(config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if n_layers and isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return name, module
    raise UnknownLayout(f"cannot find the decoder layers of {type(model).__name__}")


def layer_count(model: nn.Module) -> int:
    """The number of decoder layers."""
    return len(decoder_layers(model)[1])


def _linears(module: nn.Module, prefix: str, direct_only: bool = False) -> dict[str, nn.Module]:
    """Path (``prefix`` + name inside ``module``) → linear, for the linears in ``module``'s subtree, or only
    its direct children when ``direct_only``."""
    children = module.named_children() if direct_only else module.named_modules()
    dot = f"{prefix}." if prefix else ""
    return {f"{dot}{name}": child for name, child in children if name and isinstance(child, LINEAR_TYPES)}


def _match_roles(linear_paths, candidates: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """role → the first linear path whose last component is one of the role's candidate names."""
    roles = {}
    for role, names in candidates.items():
        found = [path for name in names for path in linear_paths if path.rsplit(".", 1)[-1] == name]
        if found:
            roles[role] = found[0]
    return roles


class UnknownLayout(CompressorError):
    """``describe`` failed for a reason other than the attention: no decoder layers, or no MLP it knows (e.g.
    Phi-3's fused gate_up_proj); a caller that could use the attention alone tells the two apart by type."""


def _find_attention(layer: nn.Module, model_name: str) -> tuple[Block, bool]:
    """(attention block without its norm, fused_qkv): the first child named like attention that holds
    linears; q/k/v are separate linears or one fused qkv."""
    for name, child in layer.named_children():
        linears = _linears(child, name)
        if linears and any(hint in name.lower() for hint in _ATTENTION_HINTS):
            return _attention_block(name, _match_roles(linears, _ATTENTION_ROLES), model_name)
    raise CompressorError(f"layer 0 of {model_name} has no attention block: no 'q'/'k'/'v' or 'qkv' linear")


def _attention_block(path: str, roles: dict[str, str], model_name: str) -> tuple[Block, bool]:
    """Keep q/k/v when all three are separate, else the fused qkv; both need an output linear o."""
    fused = not all(role in roles for role in _SEPARATE_QKV)
    kept = (*(_FUSED_QKV if fused else _SEPARATE_QKV), "o")
    for role in kept:
        if role not in roles:
            raise CompressorError(f"layer 0 of {model_name} has no attention '{role}' linear in {path!r}")
    return Block(ATTENTION, path, {role: roles[role] for role in kept}, None), fused


def _find_mlp(layer: nn.Module, attention_path: str, model_name: str) -> Block:
    """The MLP block without its norm: a child named mlp/feed_forward/ffn, else the layer's own direct
    linears outside attention (OPT's fc1/fc2). It needs up and down; gate is optional."""
    children = dict(layer.named_children())
    path = next((name for name in _MLP_NAMES if name in children), None)
    if path is not None:
        linears = _linears(children[path], path)
    else:
        linears = {p: m for p, m in _linears(layer, "", direct_only=True).items() if p != attention_path}
    roles = _match_roles(linears, _MLP_ROLES)
    for role in ("up", "down"):
        if role not in roles:
            raise UnknownLayout(f"layer 0 of {model_name} has no MLP '{role}' linear")
    return Block(MLP, path, roles, None)


def _block_norms(layer: nn.Module) -> tuple[str | None, str | None]:
    """(attention norm, MLP norm): the layer's direct norm children in registration order."""
    norms = [name for name, child in layer.named_children() if "Norm" in type(child).__name__]
    norms += [None, None]
    return norms[0], norms[1]


def _out_features(linear: nn.Module) -> int:
    """Output width: nn.Linear weight is (out, in), Conv1D weight is (in, out)."""
    return linear.nf if isinstance(linear, Conv1D) else linear.out_features


def _uses_rope(model: nn.Module, config) -> bool:
    """Rotary embeddings (a *Rotary* module, or rope parameters in the config) and no learned position
    embedding."""
    has_rotary = any("Rotary" in type(module).__name__ for module in model.modules())
    has_rope_config = any(getattr(config, key, None) is not None for key in _ROPE_CONFIG_KEYS)
    return (has_rotary or has_rope_config) and not _has_learned_positions(model)


def _has_learned_positions(model: nn.Module) -> bool:
    """An embedding table indexed by position (GPT-2 wpe, OPT embed_positions)."""
    for name, module in model.named_modules():
        if not isinstance(module, nn.Embedding):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf in _POSITION_EMBEDDING_NAMES or "Position" in type(module).__name__:
            return True
    return False

