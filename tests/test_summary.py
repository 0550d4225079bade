"""End-of-run summaries say what each kind of step did: parameters for factorizations, bits per weight and
bytes for quantization, sparsity for pruning, what compensation adds, and the model's bytes."""

from __future__ import annotations

import pytest
from conftest import small_recipe

from compressor import api
from compressor.io import summary
from compressor.plan import recipe as recipes

# the tiny Llama's decoder linears: (out, in) of q, k, v, o, gate, up, down, in each of 2 layers
SHAPES = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)] * 2
WEIGHTS = sum(m * n for m, n in SHAPES)


def compress(model_dirs, tmp_path, steps, text=None):
    recipe = small_recipe({"steps": steps}, text) if text else recipes.parse({"steps": steps})
    return api.compress(str(model_dirs["llama"]), recipe, tmp_path / "out", progress=False)


def test_quantization_reports_bits_per_weight_and_bytes_not_removed_parameters(model_dirs, tmp_path):
    result = compress(model_dirs, tmp_path, [{"method": "quantize", "config": {"bits": 4, "group_size": 32}}])
    (step,) = result["steps"]
    assert step["kind"] == "quantization" and step["quantized"] == step["targeted"] == 14 and step["bits"] == [4]
    assert step["weights"] == WEIGHTS and step["bytes_before"] == 4 * WEIGHTS  # fp32, no biases in Llama
    # per linear: packed 4-bit weights m·n/2 bytes, fp32 scales m·(n/32)·4, packed zero points (m/8)·(n/32)·4,
    # weight_shape 2 int64
    expected = sum(m * n // 2 + m * (n // 32) * 4 + (m // 8) * (n // 32) * 4 + 16 for m, n in SHAPES)
    assert step["bytes_after"] == expected
    assert step["bits_per_weight"] == pytest.approx(8 * expected / WEIGHTS)
    assert 5.1 < step["bits_per_weight"] < 5.2
    lines = summary.lines(result, result["log"])
    # every weight is still there, as an integer: no parameter is "removed"
    assert lines[0].startswith(f"model: parameters {result['params_before']:,} → {result['params_before']:,};")
    assert f"({result['bytes_after'] / result['bytes_before']:.1%} of the bytes)" in lines[0]
    assert lines[1] == (f"step 0 quantize: 14/14 linears quantized to 4 bits (group 32): "
                        f"{8 * expected / WEIGHTS:.2f} bits per weight with scales, "
                        f"{4 * WEIGHTS / 1000:,.1f} kB → {expected / 1000:,.1f} kB")
    assert "removed" not in "\n".join(lines) and "factorized" not in "\n".join(lines)


def test_factorization_reports_parameters_and_rank_reduction(model_dirs, tmp_path, small_text):
    result = compress(model_dirs, tmp_path, [{"method": "lord", "config": {"ratio": 0.3}}], small_text)
    (step,) = result["steps"]
    ranks = [e["rank"] for e in result["log"]]
    after = sum(r * (m + n) for r, (m, n) in zip(ranks, SHAPES))
    assert step["kind"] == "factorization" and step["factorized"] == 14
    assert (step["params_before"], step["params_after"]) == (WEIGHTS, after)
    assert step["param_reduction"] == pytest.approx(1 - after / WEIGHTS)
    assert step["rank_reduction"] == pytest.approx(sum(min(s) - r for r, s in zip(ranks, SHAPES))
                                                   / sum(min(s) for s in SHAPES))
    assert summary.lines(result, result["log"])[0].startswith(
        f"model: parameters {result['params_before']:,} → {result['params_before'] - WEIGHTS + after:,}")


def test_pruning_reports_sparsity_and_compensation_what_it_adds(model_dirs, tmp_path, small_text):
    steps = [{"method": "prune", "config": {"algorithm": "wanda", "pattern": "2:4"}},
             {"method": "eora", "config": {"rank": 4}}]
    result = compress(model_dirs, tmp_path, steps, small_text)
    prune, eora = result["steps"]
    assert prune["kind"] == "pruning" and prune["pruned"] == 14 and prune["sparsity"] == pytest.approx(0.5)
    assert eora["kind"] == "compensation" and eora["ranks"] == [4] and eora["compensated"] == 14
    assert eora["params_added"] == sum(4 * (m + n) for m, n in SHAPES)
    assert eora["bytes_added"] == 4 * eora["params_added"]
    lines = summary.lines(result, result["log"])
    assert lines[1] == "step 0 prune: 14/14 linears pruned to 50.0% sparsity (zeros stored dense: bytes unchanged)"
    assert lines[2] == (f"step 1 eora: 14/14 linears compensated at rank 4: +{eora['params_added']:,} parameters, "
                        f"+{eora['bytes_added'] / 1000:,.1f} kB")


def test_resizing_and_a_step_that_changes_nothing():
    log = [{"name": "a", "step": 0, "method": "modegpt", "kind": "Linear", "shape": [8, 4], "params_before": 32,
            "params_after": 24, "rank": None},
           {"name": "b", "step": 0, "method": "modegpt", "kind": "dense", "shape": [8, 4], "params_before": 32,
            "params_after": 32, "rank": None},
           {"name": "a", "step": 1, "method": "lord", "kind": "dense", "shape": [6, 4], "params_before": 24,
            "params_after": 24, "rank": None}]
    resized, unchanged = summary.steps(log)
    assert resized["kind"] == "resizing" and resized["param_reduction"] == pytest.approx(1 - 56 / 64)
    assert summary.step_line(resized) == "step 0 modegpt: 1/2 modules resized; their parameters 64 → 56 (12.5% removed)"
    assert summary.step_line(unchanged) == "step 1 lord: 0/1 modules changed"
