"""Servable by default: a quantization group size that compressed-tensors (and so vLLM and stock transformers)
cannot describe is said before the run, with the size that would be servable; the suggestion is checked
against what the writer then does."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from compressor import api, io
from compressor.cli import app
from compressor.errors import CompressorWarning
from compressor.kernels import quant
from compressor.model import loading as models
from compressor.plan import recipe as recipes
from compressor.plan.compile import compile_plan


def rtn(group_size) -> recipes.Recipe:
    return recipes.parse({"steps": [{"method": "quantize", "config": {"algorithm": "rtn", "bits": 4,
                                                                      "group_size": group_size}}]})


def smollm2_skeleton():
    """SmolLM2-135M's shapes (576 wide, MLP 1536, 30 layers) on the meta device: no download, no weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def test_servable_group_size():
    assert quant.servable_group_size([576, 1536], 128) == 64  # SmolLM2
    assert quant.servable_group_size([4096, 11008, 14336], 128) == 128
    assert quant.servable_group_size([960, 2560], 128) == 64  # SmolLM2-360M
    assert quant.servable_group_size([64, 128], 48) == 32  # powers of two only (vLLM's kernels)
    assert quant.servable_group_size([100, 300], 128) is None  # 4 divides them: too small, per channel instead


def test_shipped_recipes_on_smollm2_shapes():
    """The group-128 recipes warn on SmolLM2's widths and name 64; their -g64 variants are silent."""
    skeleton = smollm2_skeleton()
    for name in ("rtn-w4", "rtn-w4-eora-r64", "gptq-w4-eora-r64", "gptq-w3-eora-r64"):
        lines = compile_plan(recipes.load(name), skeleton).warnings()
        assert len(lines) == 1, name
        assert lines[0].startswith("step 0 (quantize): group_size 128 does not divide the input width (576) "
                                   "of 180 of the 210 targeted linears")
        assert "--set quantize.group_size=64" in lines[0]
    for name in ("rtn-w4-g64", "gptq-w4-g64-eora-r64", "lord"):
        assert compile_plan(recipes.load(name), skeleton).warnings() == []


@pytest.mark.parametrize("group_size, suggested, uneven", [(128, 64, 12), (48, 32, 14), (32, None, 0),
                                                          (None, None, 0)])
def test_warning_before_the_run_agrees_with_the_checkpoint(tmp_path, model_dirs, group_size, suggested, uneven):
    """Compiled on the meta skeleton (no weight read) the plan warns exactly when the written checkpoint then
    lacks a quantization_config; compressing with the suggested size gives one."""
    skeleton = models.skeleton(str(model_dirs["llama"]))
    assert next(skeleton.parameters()).is_meta
    lines = compile_plan(rtn(group_size), skeleton).warnings()
    assert bool(lines) == (suggested is not None)
    if not lines:
        return
    assert f"(--set quantize.group_size={suggested})" in lines[0] and f"of {uneven} of the 14 targeted linears" in lines[0]
    with pytest.warns(CompressorWarning, match="does not divide"):
        api.compress(str(model_dirs["llama"]), rtn(group_size), tmp_path / "as-asked", progress=False)
    assert "quantization_config" not in json.loads((tmp_path / "as-asked" / "config.json").read_text())
    summary = api.compress(str(model_dirs["llama"]), rtn(suggested), tmp_path / "servable", progress=False,
                           warn=pytest.fail)
    assert summary["warnings"] == []
    config = json.loads((tmp_path / "servable" / "config.json").read_text())
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] == suggested
    assert io.read_manifest(tmp_path / "servable")["serving"]["compressed_tensors"] is True


def test_cli_prints_the_warning_on_stderr_even_when_quiet(tmp_path, model_dirs):
    runner = CliRunner()
    env = {"COLUMNS": "250", "HF_HUB_OFFLINE": "1"}
    result = runner.invoke(app, ["compress", str(model_dirs["llama"]), "--recipe", "rtn-w4", "--quiet",
                                 "--out", str(tmp_path / "a")], env=env)
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith("warning: step 0 (quantize): group_size 128 does not divide the input width "
                                    "(64) of 12 of the 14 targeted linears")
    assert "--set quantize.group_size=64" in result.stderr and result.stderr.count("\n") == 1
    result = runner.invoke(app, ["compress", str(model_dirs["llama"]), "--recipe", "rtn-w4", "--quiet",
                                 "--set", "quantize.group_size=64", "--out", str(tmp_path / "b")], env=env)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""


def test_refused_run_does_not_warn_first(tmp_path, model_dirs):
    """The warning comes once every check has passed: a run refused for another reason says only why."""
    result = CliRunner().invoke(app, ["compress", str(model_dirs["llama"]), "--recipe", "rtn-w4", "--device", "nope",
                                      "--out", str(tmp_path / "a")],
                                env={"HF_HUB_OFFLINE": "1"})
    assert result.exit_code == 1
    assert result.stderr.startswith("error: --device") and "warning" not in result.stderr
