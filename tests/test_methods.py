"""The shared test matrix every registered compressor gets (CONTRIBUTING.md): a tiny config per method
(``TINY``; a test fails for a method that is registered without one), then on every family: registered
and its config's unknown keys are one-line errors; compress → save → load gives identical logits; the
manifest lists what the log compressed. A low-rank method's factors at full rank reproduce the weight."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ARCHS, logits

from compressor import api, io
from compressor.errors import CompressorError
from compressor.kernels import linalg
from compressor.methods import registry
from compressor.methods.eora import eora_factors
from compressor.methods.fwsvd import fwsvd_factors
from compressor.methods.lord import lord_factors
from compressor.methods.welore import welore_factors
from compressor.plan import recipe as recipes

# method → (step mapping for a tiny model, extra steps before it)
TINY = {
    "lord": ({"config": {"ratio": 0.3, "whiten": "gram"}}, []),
    "fwsvd": ({"config": {"ratio": 0.3, "checkpointing": False, "fisher_cache": "off"}}, []),
    "welore": ({"config": {"rank_reduction": 0.5}}, []),
    "curing": ({"config": {"n_layers": 1, "max_rank": 8}}, []),
    "quantize": ({"config": {"algorithm": "gptq", "bits": 4, "group_size": 32}}, []),
    "prune": ({"config": {"algorithm": "wanda", "pattern": "2:4"}}, []),
    "eora": ({"config": {"rank": 4}}, [{"method": "quantize", "config": {"bits": 3, "group_size": 32}}]),
    "modegpt": ({"config": {"ratio": 0.3}}, []),
    "lqlora": ({"config": {"budget": 3.0, "rank": 4, "bits": [2, 3, 4], "block_size": [32], "iterations": 10,
                           "error_cache": "off"}}, []),
}
METHODS = sorted(registry.COMPRESSORS)


def test_every_registered_method_is_in_the_matrix():
    assert set(TINY) == set(METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_unknown_config_key_is_a_one_line_error(method):
    with pytest.raises(CompressorError, match=r"unknown key 'no_such_key'; valid: ") as caught:
        registry.create(method, {"no_such_key": 1})
    assert "\n" not in str(caught.value)


def _recipe(method: str, small_text: str) -> recipes.Recipe:
    step, before = TINY[method]
    data = {"calibration": {"dataset": small_text, "n_samples": 4, "seq_len": 32, "batch_size": 2},
            "steps": [*before, {"method": method, **step}]}
    return recipes.parse(data)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_compress_save_load_identical_logits(method, arch, tmp_path, small_text, ids, vocab_size):
    import conftest
    from conftest import LAYERS, build_model

    conftest.LAYERS = 3  # CURing never touches the first or last layer
    try:
        model = build_model(arch, vocab_size)
    finally:
        conftest.LAYERS = LAYERS
    source = tmp_path / "model"
    model.save_pretrained(source)
    conftest.build_tokenizer().save_pretrained(source)
    summary = api.compress(str(source), _recipe(method, small_text), tmp_path / "out", progress=False)
    reloaded = io.load(tmp_path / "out")
    assert torch.equal(logits(summary["model"], ids), logits(reloaded, ids))
    log = [json.loads(line) for line in (tmp_path / "out" / io.LOG).read_text().splitlines()]
    compressed = {e["name"] for e in log if e["kind"] != "dense" and e["method"] == method}
    manifest = io.read_manifest(tmp_path / "out")
    rebuilt = set(manifest["modules"])  # a module, or the block that holds it (MoDeGPT's shrunk attention)
    assert all(name in rebuilt or name.rsplit(".", 1)[0] in rebuilt for name in compressed) or method == "prune"
    if not (method == "curing" and arch == "gpt2"):  # GPT-2 has no q_proj/k_proj/gate_proj to CUR
        assert compressed or method == "prune" and any(e["kind"] == "Linear" for e in log)


@pytest.mark.parametrize("factorize", [
    lambda w: lord_factors(w, min(w.shape), linalg.identity(), torch.float64),
    lambda w: welore_factors(w, min(w.shape), torch.float64),
    lambda w: fwsvd_factors(w, min(w.shape), torch.rand(w.shape[1], dtype=torch.float64) + 0.5, "in"),
    lambda w: fwsvd_factors(w, min(w.shape), torch.rand(w.shape[0], dtype=torch.float64) + 0.5, "out"),
    lambda w: eora_factors(w, min(w.shape), None),
], ids=["lord", "welore", "fwsvd-in", "fwsvd-out", "eora"])
def test_full_rank_factors_reproduce_the_weight(factorize):
    weight = torch.randn(24, 40, generator=torch.Generator().manual_seed(0))
    up, down = factorize(weight)
    torch.testing.assert_close((up.double() @ down.double()).float(), weight, rtol=1e-5, atol=1e-5)
