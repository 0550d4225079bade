"""The shared test matrix every registered compressor gets (CONTRIBUTING.md): a tiny config per method
(``TINY``; a test fails for a method that is registered without one): registered and its config's unknown keys
are one-line errors; then on every family of ``MATRIX`` (dense, mixture-of-experts, fused projections, latent
attention) compress → save → load (and ``trust_remote_code``) gives the in-memory logits, or the method is
refused up front (``VARIANTS``: other stored layouts of a method, such as int8 low-rank factors, the same
way), and the manifest lists what the log compressed. A low-rank method's factors at full rank
reproduce the weight."""

from __future__ import annotations

import json

import conftest
import pytest
import torch
from conftest import MATRIX, logits

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
# a variant of a method's tiny step that stores other module layouts: name → (method, step mapping)
VARIANTS = {
    "lord-factor-bits-8": ("lord", {"config": {"ratio": 0.3, "whiten": "gram", "factor_bits": 8}}),
    "welore-factor-bits-8": ("welore", {"config": {"rank_reduction": 0.5, "factor_bits": 8}}),
}


def test_every_registered_method_is_in_the_matrix():
    assert set(TINY) == set(METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_unknown_config_key_is_a_one_line_error(method):
    with pytest.raises(CompressorError, match=r"unknown key 'no_such_key'; valid: ") as caught:
        registry.create(method, {"no_such_key": 1})
    assert "\n" not in str(caught.value)


def _recipe(method: str, small_text: str) -> recipes.Recipe:
    if method in VARIANTS:
        method, step = VARIANTS[method]
        before = TINY[method][1]
    else:
        step, before = TINY[method]
    data = {"calibration": {"dataset": small_text, "n_samples": 4, "seq_len": 32, "batch_size": 2},
            "steps": [*before, {"method": method, **step}]}
    return recipes.parse(data)


# family → methods refused before loading, with what the one-line refusal says
REFUSED = {
    **{family: {"modegpt": "attention has"} for family in ("qwen3", "gemma2", "gemma3", "qwen3_moe")},
    "deepseek_v3": {"modegpt": "attention is not one"},
    **{family: {"modegpt": "modegpt does not know this model's layers"} for family in ("phi3", "gpt_neox", "falcon")},
}


@pytest.mark.parametrize("arch", MATRIX)
@pytest.mark.parametrize("method", [*METHODS, *VARIANTS])
def test_compress_save_load_identical_logits(method, arch, tmp_path, small_text, ids, vocab_size):
    """compress → ``io.load`` gives the in-memory logits bit for bit, ``trust_remote_code=True`` the same logits;
    a method that does not apply to the family is refused with one line before any output is written."""
    from conftest import build_model
    from transformers import AutoModelForCausalLM

    model = build_model(arch, vocab_size, layers=3)  # CURing never touches the first or last layer
    source = tmp_path / "model"
    model.save_pretrained(source)
    conftest.build_tokenizer().save_pretrained(source)
    out = tmp_path / "out"
    if method in REFUSED.get(arch, {}):
        with pytest.raises(CompressorError, match=REFUSED[arch][method]) as caught:
            api.compress(str(source), _recipe(method, small_text), out, progress=False)
        assert "\n" not in str(caught.value) and not out.exists(), str(caught.value)
        return
    summary = api.compress(str(source), _recipe(method, small_text), out, progress=False)
    expected = logits(summary["model"], ids)
    assert torch.equal(expected, logits(io.load(out), ids))
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    torch.testing.assert_close(logits(remote, ids), expected, rtol=0, atol=1e-5)
    log = [json.loads(line) for line in (out / io.LOG).read_text().splitlines()]
    method = VARIANTS.get(method, (method,))[0]
    compressed = {e["name"] for e in log if e["kind"] != "dense" and e["method"] == method}
    manifest = io.read_manifest(out)
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
