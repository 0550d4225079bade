"""compressor.model.architecture: the structure of the five tiny families, found from the models themselves."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import HEADS, HIDDEN, INTERMEDIATE, KV_HEADS, LAYERS, build_config, build_model
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from compressor.errors import CompressorError
from compressor.model.architecture import Architecture, Block, describe

_LLAMA_LIKE = dict(
    layers_path="model.layers",
    attention=Block("attention", "self_attn",
                    {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                     "o": "self_attn.o_proj"}, "input_layernorm"),
    mlp=Block("mlp", "mlp", {"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"},
              "post_attention_layernorm"),
    n_kv_heads=KV_HEADS, rope=True, fused_qkv=False,
)

# arch → the fields describe() must find (everything but the shared sizes checked in test_sizes).
EXPECTED = {
    "llama": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "opt": dict(
        layers_path="model.decoder.layers",
        attention=Block("attention", "self_attn",
                        {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                         "o": "self_attn.out_proj"}, "self_attn_layer_norm"),
        mlp=Block("mlp", None, {"up": "fc1", "down": "fc2"}, "final_layer_norm"),
        n_kv_heads=HEADS, rope=False, fused_qkv=False,
    ),
    "gpt2": dict(
        layers_path="transformer.h",
        attention=Block("attention", "attn", {"qkv": "attn.c_attn", "o": "attn.c_proj"}, "ln_1"),
        mlp=Block("mlp", "mlp", {"up": "mlp.c_fc", "down": "mlp.c_proj"}, "ln_2"),
        n_kv_heads=HEADS, rope=False, fused_qkv=True,
    ),
}


@pytest.fixture
def described(tiny_model) -> Architecture:
    return describe(tiny_model)


def test_structure(described, arch):
    found = {field: getattr(described, field) for field in EXPECTED[arch]}
    assert found == EXPECTED[arch]
    assert described.family == arch


def test_sizes(described):
    sizes = (described.n_layers, described.hidden_size, described.intermediate_size)
    assert sizes == (LAYERS, HIDDEN, INTERMEDIATE) == (2, 64, 128)
    assert (described.n_heads, described.head_dim) == (HEADS, HIDDEN // HEADS) == (4, 16)


def test_llama_heads(llama):
    found = describe(llama)
    assert (found.n_heads, found.n_kv_heads, found.head_dim) == (4, 2, 16)


def test_head_dim_from_config(vocab_size):
    """A config head_dim that is not hidden / heads wins over the quotient."""
    config = build_config("llama", vocab_size)
    config.head_dim = 32
    assert describe(AutoModelForCausalLM.from_config(config)).head_dim == 32


def test_intermediate_from_up_linear_shape(vocab_size):
    """GPT-2 without n_inner has a 4 * hidden MLP, read from c_fc's Conv1D (in, out) weight."""
    config = build_config("gpt2", vocab_size)
    config.n_inner = None
    assert describe(AutoModelForCausalLM.from_config(config)).intermediate_size == 4 * HIDDEN


def test_block_names_resolve_to_linears(tiny_model, described, arch):
    prefix = f"{EXPECTED[arch]['layers_path']}.1"
    names = described.block_names("mlp", 1)
    assert names == {role: f"{prefix}.{path}" for role, path in EXPECTED[arch]["mlp"].roles.items()}
    for kind in ("attention", "mlp"):
        for name in described.block_names(kind, 1).values():
            assert isinstance(tiny_model.get_submodule(name), (nn.Linear, Conv1D)), name


def test_block_path(described, arch):
    layers_path = EXPECTED[arch]["layers_path"]
    assert described.layer_prefix(1) == f"{layers_path}.1"
    attention_path = EXPECTED[arch]["attention"].path
    assert described.block_path("attention", 1) == f"{layers_path}.1.{attention_path}"
    expected_mlp = None if arch == "opt" else f"{layers_path}.1.mlp"
    assert described.block_path("mlp", 1) == expected_mlp
    with pytest.raises(IndexError):
        described.layer_prefix(LAYERS)
    with pytest.raises(ValueError):
        described.block_names("embedding", 0)


def test_role_of_inverts_block_names(described):
    count = 0
    for index in range(LAYERS):
        for kind in ("attention", "mlp"):
            for role, name in described.block_names(kind, index).items():
                assert described.role_of(name) == (index, kind, role)
                count += 1
    assert count == LAYERS * (len(described.attention.roles) + len(described.mlp.roles))


def test_role_of_non_roles(tiny_model, described):
    layers_path = described.layers_path
    assert described.role_of("lm_head") is None
    assert described.role_of(f"{layers_path}.0") is None
    assert described.role_of(f"{layers_path}.{LAYERS}.{described.mlp.roles['up']}") is None
    assert described.role_of(f"x.{layers_path}.0.{described.mlp.roles['up']}") is None
    role_names = {name for kind in ("attention", "mlp") for i in range(LAYERS)
                  for name in described.block_names(kind, i).values()}
    for name, module in tiny_model.named_modules():
        if isinstance(module, (nn.Linear, Conv1D)) and name not in role_names:
            assert name == "lm_head"  # every other linear of these families plays a role


def test_frozen(described):
    with pytest.raises(dataclasses.FrozenInstanceError):
        described.n_layers = 3


def test_layers_found_by_length(llama):
    """A stack at an unknown path is the ModuleList of the config's layer count."""
    wrapper = nn.Module()
    wrapper.config = llama.config
    wrapper.embed = llama.model.embed_tokens
    wrapper.stack = llama.model.layers
    found = describe(wrapper)
    assert found.layers_path == "stack"
    assert found.block_names("attention", 1)["q"] == "stack.1.self_attn.q_proj"


def test_sequential_is_rejected():
    with pytest.raises(CompressorError, match="cannot find the decoder layers of Sequential"):
        describe(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)))


def _message(model) -> str:
    with pytest.raises(CompressorError) as caught:
        describe(model)
    message = str(caught.value)
    assert "\n" not in message and type(model).__name__ in message
    return message


def test_mlp_replaced_is_rejected(llama):
    for layer in llama.model.layers:
        layer.mlp = nn.Identity()
    assert "'up'" in _message(llama)


def test_mlp_deleted_is_rejected(llama):
    for layer in llama.model.layers:
        del layer.mlp
    assert "'up'" in _message(llama)


def test_down_missing_is_rejected(vocab_size):
    opt = build_model("opt", vocab_size)
    for layer in opt.model.decoder.layers:
        del layer.fc2
    assert "'down'" in _message(opt)


def test_attention_removed_is_rejected(llama):
    for layer in llama.model.layers:
        layer.self_attn = nn.Identity()
    assert "attention" in _message(llama)


def test_output_projection_missing_is_rejected(llama):
    for layer in llama.model.layers:
        del layer.self_attn.o_proj
    assert "'o'" in _message(llama)
