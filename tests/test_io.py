"""Saving and reloading: compressed and merged outputs, the manifest, atomic writes."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import build_model, logits
from transformers import AutoModelForCausalLM

import compressor
from compressor import io
from compressor.api import compress
from compressor.errors import CompressorError
from compressor.methods.lord import LoRDConfig
from compressor.model import loading as models
from compressor.model.modules import LowRankLinear

LINEARS = {"llama": 14, "qwen2": 14, "mistral": 14, "opt": 12, "gpt2": 8}


def run(model_dir, out, small, *extra, merge=False, overwrite=False):
    return compress(str(model_dir), "lord", out, overrides=[*small, *extra], merge=merge, overwrite=overwrite,
                    progress=False)


def test_save_load_roundtrip(model_dir, arch, tmp_path, small, ids):
    out = tmp_path / "outputs" / "compressed"
    summary = run(model_dir, out, small)
    expected = logits(summary["model"], ids)
    loaded = compressor.load(out)
    assert not loaded.training
    swapped = {n: m for n, m in loaded.named_modules() if isinstance(m, LowRankLinear)}
    assert len(swapped) == LINEARS[arch]
    got = logits(loaded, ids)
    assert (got - expected).abs().max() <= 1e-5
    # the compressed model is really different from the original one
    original = AutoModelForCausalLM.from_pretrained(model_dir)
    assert not torch.allclose(logits(original, ids), got, atol=1e-3)
    if original.config.tie_word_embeddings:
        assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    else:
        assert torch.equal(loaded.get_output_embeddings().weight, original.get_output_embeddings().weight)
    # fewer bytes on disk than the dense checkpoint
    assert (out / "model.safetensors").stat().st_size < (model_dir / "model.safetensors").stat().st_size
    # nothing but the output next to it
    assert [p.name for p in out.parent.iterdir()] == ["compressed"]


def test_factorized_output_fails_loudly_in_plain_from_pretrained(model_dir, arch, tmp_path, small, ids):
    """Stock transformers would load the factorized output with random linears and a warning: it must refuse it,
    naming the marker, while our loader, the tokenizer and the manifest still read it."""
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    summary = run(model_dir, out, small)
    with pytest.raises(ValueError, match="trust_remote_code"):  # the code it needs is not run unasked
        AutoModelForCausalLM.from_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == f"compressor-{summary['model'].config.model_type}"
    assert config["compressor"]["base_model_type"] == summary["model"].config.model_type
    assert "low_rank" in config["compressor"]["why"]
    assert io.read_manifest(out)["serving"]["stock_transformers"] is False
    assert torch.equal(logits(io.load(out), ids), logits(summary["model"], ids))
    assert AutoTokenizer.from_pretrained(out)("the state").input_ids
    merged = tmp_path / "merged"  # --merge stays a plain checkpoint
    run(model_dir, merged, small, merge=True)
    assert json.loads((merged / "config.json").read_text())["model_type"] == summary["model"].config.model_type


def test_manifest(model_dir, arch, tmp_path, small):
    out = tmp_path / "out"
    summary = run(model_dir, out, small, "lord.ratio=0.3")
    manifest = json.loads((out / io.MANIFEST).read_text())
    assert manifest["format_version"] == io.FORMAT_VERSION == 1
    assert manifest["package_version"] == compressor.__version__
    assert manifest["merged"] is False
    assert manifest["base_model"] == str(model_dir)
    # every swapped module, with its shapes and rank
    loaded = compressor.load(out)
    swapped = {n: m for n, m in loaded.named_modules() if isinstance(m, LowRankLinear)}
    assert set(manifest["modules"]) == set(swapped) and len(swapped) == LINEARS[arch]
    log = [json.loads(line) for line in (out / io.LOG).read_text().splitlines()]
    assert len(log) == LINEARS[arch] == summary["modules"]
    by_name = {e["name"]: e for e in log}
    for name, spec in manifest["modules"].items():
        m, n = by_name[name]["shape"]
        assert spec["kind"] == "low_rank" and spec["rank"] == by_name[name]["rank"] == int(0.7 * m * n / (m + n))
        assert (spec["out_features"], spec["in_features"]) == (m, n)
        assert spec["dense_class"] == ("Conv1D" if arch == "gpt2" else "Linear")
        assert spec["bias"] is (swapped[name].up.bias is not None)
    # the recipe as applied, defaults filled in
    recipe = manifest["recipe"]
    assert recipe["calibration"]["n_samples"] == 4 and recipe["calibration"]["seq_len"] == 32
    assert recipe["calibration"]["seed"] == 0 and recipe["propagate"] == "compressed"
    config = recipe["steps"][0]["config"]
    assert set(config) == {f.name for f in dataclasses.fields(LoRDConfig)}
    assert config["ratio"] == 0.3 and config["whiten"] == "gram" and config["alpha"] == 0.5
    assert recipe["steps"][0]["method"] == "lord"
    # parameter counts
    assert manifest["params_before"] == models.parameter_count(build_model(arch, loaded.config.vocab_size))
    assert manifest["params_after"] == models.parameter_count(loaded) < manifest["params_before"]
    removed = sum(e["params_before"] - e["params_after"] for e in log)
    assert manifest["params_before"] - manifest["params_after"] == removed
    # the tokenizer and config of the base model come along
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()


def test_merge_loads_with_plain_from_pretrained(model_dir, arch, tmp_path, small, ids):
    compressed = compressor.load(run(model_dir, tmp_path / "c", small)["out"])
    merged_out = tmp_path / "m"
    summary = run(model_dir, merged_out, small, merge=True)
    plain = AutoModelForCausalLM.from_pretrained(merged_out)
    assert not any(isinstance(m, LowRankLinear) for m in plain.modules())
    assert models.parameter_count(plain) == summary["params_before"]  # dense again
    # the two runs agree to fp32 rounding (the refit of the default recipe carries the rounding of earlier
    # layers a little further than SVD-LLM alone)
    assert (logits(plain, ids) - logits(compressed, ids)).abs().max() <= 1e-4 * logits(compressed, ids).abs().max()
    manifest = io.read_manifest(merged_out)
    assert manifest["merged"] is True
    via_load = compressor.load(merged_out)
    assert (logits(via_load, ids) - logits(plain, ids)).abs().max() == 0
    assert sorted(p.name for p in merged_out.parent.iterdir()) == ["c", "m"]


def test_output_must_be_empty(tmp_path, model_dirs, small):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(CompressorError, match="not empty"):
        run(model_dirs["llama"], out, small)
    assert (out / "keep.txt").read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    # --overwrite replaces it, and leaves no old or temporary directory behind
    run(model_dirs["llama"], out, small, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / io.MANIFEST).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_empty_existing_output_is_fine(tmp_path, model_dirs, small):
    out = tmp_path / "out"
    out.mkdir()
    run(model_dirs["gpt2"], out, small)
    assert (out / io.MANIFEST).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_interrupted_save_leaves_nothing(tmp_path, vocab_size):
    class Broken:
        def save_pretrained(self, path):
            (path / "half-written").write_text("x")
            raise RuntimeError("disk full")

    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        io.save(build_model("llama", vocab_size), Broken(), out, {}, [])
    assert list(tmp_path.iterdir()) == []


def test_interrupted_overwrite_keeps_the_old_output(tmp_path, vocab_size):
    class Broken:
        def save_pretrained(self, path):
            raise RuntimeError("disk full")

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        io.save(build_model("llama", vocab_size), Broken(), out, {}, [], overwrite=True)
    assert (out / "old.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def _dropping(write, key_end: str):
    """``write`` (a function that writes safetensors files), then one tensor whose name ends in ``key_end``
    removed from the file that holds it: a writer that forgot a tensor."""
    from safetensors.torch import load_file, save_file

    def call(*args, **kwargs):
        result = write(*args, **kwargs)
        path = str(args[1])  # save_file(tensors, filename, ...); a shard goes to a temporary name first
        if path.endswith((".safetensors", ".safetensors.tmp")):
            tensors = load_file(path)
            dropped = {k: v for k, v in tensors.items() if not k.endswith(key_end)}
            if len(dropped) < len(tensors):
                save_file(dropped, path, metadata={"format": "pt"})
        return result
    return call


@pytest.mark.parametrize("stream", [False, True])
def test_a_run_whose_output_lacks_a_tensor_fails_and_places_nothing(tmp_path, model_dirs, small, monkeypatch,
                                                                    stream):
    """The writer loses one tensor (the last layer's down projection): the run must not end in success with an
    output that does not reload; it fails with one line naming the tensor, and nothing appears at --out."""
    import transformers.modeling_utils

    from compressor.io import shards

    victim = "layers.1.mlp.down_proj.down.weight"
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file",
                        _dropping(transformers.modeling_utils.safe_save_file, victim))  # in-memory runs' writer
    monkeypatch.setattr(shards, "save_file", _dropping(shards.save_file, victim))  # streamed runs' writer
    out = tmp_path / "out"
    with pytest.raises(CompressorError, match=rf"lacks 1 tensor\(s\).*{victim}.*would not reload") as info:
        compress(str(model_dirs["llama"]), "lord", out, overrides=small, progress=False, stream=stream)
    assert "\n" not in str(info.value)
    assert not out.exists()


def test_load_rejects_other_directories(tmp_path, model_dirs):
    with pytest.raises(CompressorError, match="no compression.json"):
        compressor.load(model_dirs["llama"])
    out = tmp_path / "future"
    out.mkdir()
    (out / io.MANIFEST).write_text(json.dumps({"format_version": io.FORMAT_VERSION + 1, "modules": {}}))
    with pytest.raises(CompressorError, match="newer format"):
        compressor.load(out)


def test_load_detects_a_manifest_that_does_not_match(tmp_path, model_dirs, small):
    out = tmp_path / "out"
    run(model_dirs["llama"], out, small)
    manifest = json.loads((out / io.MANIFEST).read_text())
    name = next(iter(manifest["modules"]))
    del manifest["modules"][name]
    (out / io.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CompressorError, match="does not match"):
        compressor.load(out)


@pytest.mark.parametrize("arch_name", ["llama", "gpt2"])
def test_bfloat16_roundtrip_and_merge(tmp_path, model_dirs, small, ids, arch_name):
    out, merged = tmp_path / "bf16", tmp_path / "bf16-merged"
    summary = compress(str(model_dirs[arch_name]), "lord", out, overrides=small, dtype="bfloat16", progress=False)
    assert all(p.dtype == torch.bfloat16 for p in summary["model"].parameters())
    loaded = compressor.load(out)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert torch.equal(logits(loaded, ids), logits(summary["model"], ids))
    compress(str(model_dirs[arch_name]), "lord", merged, overrides=small, dtype="bfloat16", merge=True,
             progress=False)
    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.bfloat16)
    # merging rounds up @ down once more to bf16: close, not equal (the refit of the default recipe fits each
    # layer to the bf16 rounding of the ones before it, so the two runs part a little further)
    assert (logits(plain, ids) - logits(loaded, ids)).abs().max() < 0.1 * logits(loaded, ids).abs().max()


def test_everything_kept_dense(tmp_path, model_dirs, small, ids):
    out = tmp_path / "dense"
    summary = run(model_dirs["opt"], out, small, "lord.ratio=null", "lord.rank_reduction=0.0")
    assert summary["compressed"] == 0 and summary["modules"] == 12
    assert summary["params_after"] == summary["params_before"]
    manifest = io.read_manifest(out)
    assert manifest["modules"] == {}
    log = [json.loads(line) for line in (out / io.LOG).read_text().splitlines()]
    assert all(e["kind"] == "dense" and "break-even" in e["note"] for e in log)
    original = AutoModelForCausalLM.from_pretrained(model_dirs["opt"])
    assert torch.equal(logits(compressor.load(out), ids), logits(original, ids))
