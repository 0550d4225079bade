"""Each output directory gets a README.md model card in the Hub's format: a YAML header that parses, the
recipe, the summary, and loading snippets that run."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import logits, small_recipe

from compressor import api, io
from compressor.io import model_card
from compressor.plan import recipe as recipes

QUANTIZE_EORA = [{"method": "quantize", "config": {"bits": 4, "group_size": 32}},
                 {"method": "eora", "config": {"rank": 4, "space": "weight"}}]


def snippets(text: str) -> list[str]:
    """The python code blocks of a card."""
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def run_snippet(code: str, folder, monkeypatch) -> torch.nn.Module:
    """Run a card's snippet next to the output directory (its paths are the directory's name); its model."""
    monkeypatch.chdir(folder.parent)
    scope: dict = {}
    exec(code, scope)
    return scope["model"]


def test_quantized_compensated_card(tmp_path, model_dirs, ids, monkeypatch):
    api.compress(str(model_dirs["llama"]), recipes.parse({"steps": QUANTIZE_EORA}), tmp_path / "w4-eora",
                 progress=False)
    text = (tmp_path / "w4-eora" / model_card.CARD).read_text()
    meta = model_card.read_header(text)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == ["compressor", "quantize", "eora", "quantized", "custom_code", "compressed-tensors",
                            "peft", "lora"]
    assert "base_model" not in meta  # a local directory is no Hub repository
    assert "- method: quantize" in text and "group_size: 32" in text and "rank: 4" in text
    assert "14/14 linears quantized to 4 bits (group 32)" in text and "compensated at rank 4" in text
    assert 'LLM(model="w4-eora", enable_lora=True, max_lora_rank=4)' in text
    ours = logits(io.load(tmp_path / "w4-eora"), ids)
    remote, with_compressor = (s for s in snippets(text) if "trust_remote_code" in s or "compressor.load" in s)
    assert torch.equal(logits(run_snippet(remote, tmp_path / "w4-eora", monkeypatch), ids), ours)
    assert torch.equal(logits(run_snippet(with_compressor, tmp_path / "w4-eora", monkeypatch), ids), ours)
    pytest.importorskip("peft")
    pytest.importorskip("compressed_tensors")
    (stock,) = (s for s in snippets(text) if "PeftModel" in s)
    torch.testing.assert_close(logits(run_snippet(stock, tmp_path / "w4-eora", monkeypatch), ids), ours,
                               atol=1e-4, rtol=1e-4)


def test_factorized_and_merged_cards(tmp_path, model_dirs, small_text):
    recipe = small_recipe({"steps": [{"method": "lord", "config": {"ratio": 0.3}}]}, small_text)
    api.compress(str(model_dirs["gpt2"]), recipe, tmp_path / "lord", progress=False)
    text = (tmp_path / "lord" / model_card.CARD).read_text()
    assert model_card.read_header(text)["tags"] == ["compressor", "lord", "custom_code"]
    assert "trust_remote_code=True" in text and "refuses this directory" in text
    assert "vllm" not in text.lower() and "PeftModel" not in text  # neither applies to low-rank factors
    api.compress(str(model_dirs["gpt2"]), recipe, tmp_path / "merged", merge=True, progress=False)
    text = (tmp_path / "merged" / model_card.CARD).read_text()
    assert model_card.read_header(text)["tags"] == ["compressor", "lord"]
    assert "trust_remote_code" not in text and 'AutoModelForCausalLM.from_pretrained("merged")' in text
    assert 'LLM(model="merged")' in text


def test_hub_base_models_are_named_in_the_header(tmp_path):
    assert model_card.hub_id("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert model_card.hub_id("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert model_card.hub_id(str(tmp_path)) is None and model_card.hub_id("model.gguf") is None
    manifest = {"base_model": "Qwen/Qwen2.5-0.5B", "recipe": {"steps": [{"method": "quantize"}]},
                "modules": {"a": {"kind": "quantized"}}, "serving": {"compressed_tensors": True}, "merged": False}
    meta = model_card.read_header(model_card.card(manifest, [], "out"))
    assert meta["base_model"] == "Qwen/Qwen2.5-0.5B" and meta["base_model_relation"] == "quantized"
    assert "compressed-tensors" in meta["tags"]
