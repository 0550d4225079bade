"""The input files as read (``model.files``, ``model.weights``): what the checks must accept as well as refuse.
The refusals themselves run the CLI in tests/test_hardening.py's CASES (issue 34's block)."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from compressor.errors import CompressorError
from compressor.model import files, loading, streaming


def load_both_ways(folder) -> None:
    """Load ``folder`` whole, and streamed with every tensor materialized."""
    loading.load(str(folder))
    model, _, _ = streaming.open_streamed(str(folder))
    streaming.source_of(model).materialize(model)


@pytest.mark.parametrize("arch, extra", [
    ("llama", "model.layers.0.self_attn.rotary_emb.inv_freq"),  # older checkpoints stored it per layer
    ("gpt2", "transformer.h.0.attn.bias"),  # GPT-2's causal mask buffer, in the hub's gpt2 checkpoint
    ("gpt2", "lm_head.weight"),  # a tied head stored beside the embedding it is tied to
])
def test_tensors_transformers_ignores_are_not_refused(model_dirs, tmp_path, arch, extra):
    folder = tmp_path / arch
    shutil.copytree(model_dirs[arch], folder)
    state = load_file(str(folder / "model.safetensors"))
    state[extra] = (state["transformer.wte.weight"].clone() if extra == "lm_head.weight"
                    else torch.ones(4, 4))
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    load_both_ways(folder)


def test_a_tensor_of_no_layer_is_refused_naming_it(model_dirs, tmp_path):
    folder = tmp_path / "llama"
    shutil.copytree(model_dirs["llama"], folder)
    state = load_file(str(folder / "model.safetensors"))
    state["model.vision_tower.weight"] = torch.ones(2, 2)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CompressorError, match="model.vision_tower.weight.*config.json does not describe"):
        loading.load(str(folder))
    with pytest.raises(CompressorError, match="model.vision_tower.weight"):
        streaming.open_streamed(str(folder))


def test_read_header_accepts_what_safetensors_writes(tmp_path):
    tensors = {"scalar": torch.tensor(1.5), "empty": torch.zeros(0, 3), "bf16": torch.ones(3, 5, dtype=torch.bfloat16),
               "ints": torch.arange(7, dtype=torch.int64), "flags": torch.tensor([True, False]),
               "bytes": torch.ones(3, dtype=torch.uint8)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    header = files.read_header(path)
    assert {name: entry["shape"] for name, entry in header.items()} == {n: list(t.shape) for n, t in tensors.items()}


def test_pickles_are_never_loaded(model_dirs, tmp_path, monkeypatch):
    """Beside safetensors a pickle is ignored (transformers is told to read safetensors only); alone it is
    refused with the command that converts it. ``torch.load`` is never called either way."""
    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    folder = tmp_path / "both"
    shutil.copytree(model_dirs["llama"], folder)
    (folder / "pytorch_model.bin").write_bytes(b"not even a pickle")
    loading.load(str(folder))
    (folder / "model.safetensors").unlink()
    with pytest.raises(CompressorError, match=r"pytorch_model\.bin.*save_pretrained\('.*both-st'\)"):
        loading.load(str(folder))
