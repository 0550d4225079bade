"""The serving layout: compressed-tensors checkpoints that ``transformers`` loads, and EoRA adapters that
``peft`` loads with the same logits as our own loader."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import logits, small_recipe

from compressor import api, io
from compressor.io import serving as export
from compressor.model.modules import CompensatedLinear, LowRankLinear
from compressor.plan import recipe as recipes


def quantize_then(steps: list[dict], group_size: int = 32) -> recipes.Recipe:
    data = {"steps": [{"method": "quantize", "config": {"bits": 4, "group_size": group_size}}, *steps]}
    return recipes.parse(data)


def test_quantized_checkpoint_has_compressed_tensors_layout(tmp_path, model_dirs, ids):
    api.compress(str(model_dirs["llama"]), quantize_then([]), tmp_path / "out", progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    (group,) = config["config_groups"].values()
    assert group["targets"] == ["Linear"] and group["weights"]["num_bits"] == 4
    assert group["weights"]["group_size"] == 32 and group["weights"]["strategy"] == "group"
    assert "lm_head" in config["ignore"]
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "out" / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj"
    assert state[f"{name}.weight_packed"].dtype == torch.int32
    assert {f"{name}.weight_scale", f"{name}.weight_zero_point", f"{name}.weight_shape"} <= set(state)
    assert f"{name}.weight" not in state
    manifest = io.read_manifest(tmp_path / "out")
    assert manifest["serving"] == {"compressed_tensors": True, "adapter": None, "stock_transformers": True,
                                   "remote_code": "modeling_compressor.py",
                                   "transformers": export.TRANSFORMERS_ASYMMETRIC}


def test_compressed_tensors_config_validates_and_decompresses(tmp_path, model_dirs):
    """compressed-tensors parses our config and its decompressor gives back our dequantized weights."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    summary = api.compress(str(model_dirs["llama"]), quantize_then([]), tmp_path / "out", progress=False)
    model = summary["model"]
    config = QuantizationConfig.model_validate(
        json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"])
    scheme = config.config_groups["group_0"]
    state = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        local = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
        weight = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
        torch.testing.assert_close(weight, model.get_submodule(name).dense_weight())


@pytest.mark.parametrize("group_size", [48, 128])
def test_not_describable_by_compressed_tensors_is_noted_and_refused_by_stock_loaders(tmp_path, model_dirs, ids,
                                                                                      group_size):
    """Group 48 or 128 on width 64, like group 128 on SmolLM2's 576: plain ``from_pretrained`` used to load it
    with random linears (perplexity 6.4e15 on SmolLM2); it must raise instead, and our loader read it exactly."""
    from transformers import AutoModelForCausalLM

    model = api.compress(str(model_dirs["llama"]), quantize_then([], group_size=group_size), tmp_path / "out",
                         progress=False)["model"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "compressor-llama"
    manifest = io.read_manifest(tmp_path / "out")
    assert "does not divide" in manifest["serving"]["note"] and manifest["serving"]["stock_transformers"] is False
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(logits(io.load(tmp_path / "out"), ids), logits(model, ids))
    recipe = quantize_then([{"method": "eora", "config": {"rank": 4, "space": "weight"}}], group_size=group_size)
    api.compress(str(model_dirs["llama"]), recipe, tmp_path / "eora", progress=False)  # the base is not readable
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "eora")


def test_stock_readable_outputs_keep_their_model_type(tmp_path, model_dirs, ids):
    api.compress(str(model_dirs["llama"]), quantize_then([]), tmp_path / "out", progress=False)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "llama"
    assert io.read_manifest(tmp_path / "out")["serving"]["stock_transformers"] is True
    assert export.not_stock_reason({"a": {"kind": "compensated", "base": {"kind": "dense"}}}, False) == ""
    assert "cur" in export.not_stock_reason({"a": {"kind": "cur"}}, True)
    assert "new shape" in export.not_stock_reason({"a": {"kind": "dense"}}, True)


def test_adapter_files_and_config(tmp_path, model_dirs, ids):
    recipe = quantize_then([{"method": "eora", "config": {"rank": 8, "space": "weight"}}])
    model = api.compress(str(model_dirs["llama"]), recipe, tmp_path / "out", progress=False)["model"]
    folder = tmp_path / "out" / export.ADAPTER_DIR
    config = json.loads((folder / export.ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 8
    assert config["rank_pattern"] == config["alpha_pattern"] == {}
    from safetensors.torch import load_file

    tensors = load_file(str(folder / export.ADAPTER_WEIGHTS))
    name = "model.layers.0.mlp.down_proj"
    module = model.get_submodule(name)
    assert torch.equal(tensors[f"base_model.model.{name}.lora_A.weight"], module.lora.down.weight)  # (r, in)
    assert torch.equal(tensors[f"base_model.model.{name}.lora_B.weight"], module.lora.up.weight)  # (out, r)
    state = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert f"{name}.weight_packed" in state and not any(".lora." in k or ".base." in k for k in state)
    assert torch.equal(logits(model, ids), logits(io.load(tmp_path / "out"), ids))


def test_alpha_pattern_where_ranks_differ():
    loras = {f"model.layers.{i}.mlp.up_proj": LowRankLinear(16, 8, rank) for i, rank in enumerate((4, 4, 2))}
    config = export.adapter_config(loras, "base", conv1d=False)
    assert config["r"] == config["lora_alpha"] == 4
    assert config["rank_pattern"] == config["alpha_pattern"] == {"model.layers.2.mlp.up_proj": 2}


def test_asymmetric_checkpoint_says_how_transformers_loads_it(tmp_path, model_dirs):
    """compressed-tensors 0.20 initializes an asymmetric pack-quantized layer with an unpacked zero point
    (out, G) while its own compressor (and vLLM) use the packed one (out·b/32, G) written here: transformers
    refuses it in compressed mode, and the manifest tells the user to dequantize on load. If this starts to
    load, upstream is fixed: drop the note."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    api.compress(str(model_dirs["llama"]), quantize_then([]), tmp_path / "out", progress=False)
    assert io.read_manifest(tmp_path / "out")["serving"]["transformers"] == export.TRANSFORMERS_ASYMMETRIC
    with pytest.raises(RuntimeError, match="mismatched|ignore_mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")


@pytest.mark.parametrize("symmetric,dequantize", [(True, False), (False, True)])
def test_peft_loads_the_adapter_with_our_logits(tmp_path, model_dirs, ids, symmetric, dequantize):
    """transformers (compressed-tensors) loads the quantized base, peft the EoRA adapter: the same logits
    as ours."""
    pytest.importorskip("compressed_tensors")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    recipe = quantize_then([{"method": "eora", "config": {"rank": 8, "space": "weight"}}])
    recipe.steps[0].config["symmetric"] = symmetric
    api.compress(str(model_dirs["llama"]), recipe, tmp_path / "out", progress=False)
    ours = io.load(tmp_path / "out")
    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "out", **kwargs)
    without = {name: m for name, m in ours.named_modules() if isinstance(m, CompensatedLinear)}
    for name, module in without.items():  # our model without its compensation = the quantized base
        ours.set_submodule(name, module.base)
    torch.testing.assert_close(logits(base, ids), logits(ours, ids), atol=1e-4, rtol=1e-4)
    for name, module in without.items():
        ours.set_submodule(name, module)
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "out" / export.ADAPTER_DIR)
    torch.testing.assert_close(logits(adapted, ids), logits(ours, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pruned_base_and_adapter_load_in_transformers_and_peft(tmp_path, arch, model_dir, ids, small_text):
    """A 2:4-pruned base is an ordinary checkpoint; GPT-2's Conv1D adapters use fan_in_fan_out."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    recipe = small_recipe({"statistics": "once", "steps": [
        {"method": "prune", "config": {"algorithm": "wanda", "pattern": "2:4"}},
        {"method": "eora", "config": {"rank": 4}},
    ]}, small_text)
    api.compress(str(model_dir), recipe, tmp_path / "out", progress=False)
    assert io.read_manifest(tmp_path / "out")["serving"]["adapter"] == export.ADAPTER_DIR
    ours = io.load(tmp_path / "out")
    adapted = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "out"),
                                             tmp_path / "out" / export.ADAPTER_DIR)
    torch.testing.assert_close(logits(adapted, ids), logits(ours, ids), atol=1e-4, rtol=1e-4)


def test_bytes_on_disk_count_the_adapter(tmp_path, model_dirs):
    from compressor.evaluation.evaluate import bytes_on_disk

    recipe = quantize_then([{"method": "eora", "config": {"rank": 8, "space": "weight"}}])
    api.compress(str(model_dirs["llama"]), recipe, tmp_path / "out", progress=False)
    adapter = (tmp_path / "out" / export.ADAPTER_DIR / export.ADAPTER_WEIGHTS).stat().st_size
    base = (tmp_path / "out" / "model.safetensors").stat().st_size
    assert bytes_on_disk(tmp_path / "out") == base + adapter


@pytest.mark.parametrize("merge", [False, True])
def test_storage_dtype_rounds_every_floating_tensor_written_and_nothing_in_memory(tmp_path, model_dirs, merge):
    from safetensors.torch import load_file

    recipe = quantize_then([{"method": "eora", "config": {"rank": 8, "space": "weight"}}])
    summary = api.compress(str(model_dirs["llama"]), recipe, tmp_path / "out", storage_dtype="bfloat16",
                           merge=merge, progress=False)
    model = summary["model"]
    assert all(t.dtype == torch.float32 for t in model.parameters())  # the model in memory keeps its dtype
    files = [tmp_path / "out" / "model.safetensors"]
    if not merge:
        files.append(tmp_path / "out" / export.ADAPTER_DIR / export.ADAPTER_WEIGHTS)
    written = {k: v for f in files for k, v in load_file(str(f)).items()}
    assert {v.dtype for v in written.values() if v.is_floating_point()} == {torch.bfloat16}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    assert io.read_manifest(tmp_path / "out")["storage_dtype"] == "bfloat16"
    if merge:  # the merged output is stock: exactly the merged weights, rounded once
        from transformers import AutoModelForCausalLM

        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    else:
        loaded = io.load(tmp_path / "out", dtype=torch.float32)
    state = loaded.state_dict()
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            assert torch.equal(state[name], tensor.to(torch.bfloat16).float()), name
        else:
            assert torch.equal(state[name], tensor), name
    assert io.load(tmp_path / "out").dtype == torch.bfloat16  # config.json's dtype is the default


def test_model_dtype_applies_to_the_adapter_too(tmp_path, model_dirs):
    from safetensors.torch import load_file

    recipe = quantize_then([{"method": "eora", "config": {"rank": 8, "space": "weight"}}])
    api.compress(str(model_dirs["llama"]), recipe, tmp_path / "out", dtype="bfloat16", progress=False)
    adapter = load_file(str(tmp_path / "out" / export.ADAPTER_DIR / export.ADAPTER_WEIGHTS))
    assert {v.dtype for v in adapter.values()} == {torch.bfloat16}
