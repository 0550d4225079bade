"""Low-rank factors stored in 8 bits (``factor_bits: 8`` of LoRD, FWSVD, WeLore): the error-aware rounding against
closed-form and rounding-bound answers, and what an output stores (bytes, parameters, heal's refusal)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from compressor import api, io
from compressor.errors import CompressorError
from compressor.heal import check_source
from compressor.io import summary
from compressor.kernels import linalg, quant
from compressor.methods import registry
from compressor.methods.factor_bits import integer_factors
from compressor.methods.lord import lord_factors
from compressor.model.modules import LowRankLinear, dequantized
from compressor.portable.modeling_compressor import packed_width


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _problem(m: int = 48, n: int = 64, seed: int = 0):
    """W (m, n) with a decaying spectrum, and an input Gram G (n, n) of correlated inputs whose channels' scales
    span three decades (as an LLM's activations do)."""
    g = _gen(seed)
    left, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    spectrum = torch.exp(-torch.arange(min(m, n), dtype=torch.float64) / 8)
    weight = left[:, : min(m, n)] * spectrum @ right[:, : min(m, n)].T
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.logspace(-2, 1, n, dtype=torch.float64)
    x = torch.randn(256, n, generator=g, dtype=torch.float64) @ mix
    return weight, x.T @ x


def _weighted(delta: torch.Tensor, gram: torch.Tensor | None = None) -> float:
    """‖Δ S‖_F with S Sᵀ = G: √trace(Δ G Δᵀ) (G None: ‖Δ‖_F)."""
    if gram is None:
        return float(delta.norm())
    return math.sqrt(float(torch.einsum("ij,jk,ik->", delta, gram, delta)))


def _stored(factors) -> tuple[torch.Tensor, torch.Tensor]:
    (q_up, s_up), (q_down, s_down) = factors
    return q_up.double() * s_up.double(), q_down.double() * s_down.double()


def test_refit_up_is_the_least_squares_answer_under_the_whitening():
    """``refit_up`` = the brute-force minimizer of ‖(W − U·down) S‖_F over U (vec form, Kronecker), S Sᵀ = G."""
    g = _gen(1)
    weight = torch.randn(9, 12, generator=g, dtype=torch.float64)
    down = torch.randn(4, 12, generator=g, dtype=torch.float64)
    S = torch.randn(12, 12, generator=g, dtype=torch.float64)
    system = torch.kron((down @ S).T.contiguous(), torch.eye(9, dtype=torch.float64))  # vec(U D S), column-major
    target = (weight @ S).T.reshape(-1)
    brute = torch.linalg.lstsq(system, target[:, None]).solution.reshape(4, 9).T  # (9, 4)
    torch.testing.assert_close(quant.refit_up(weight, down, S @ S.T), brute, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(quant.refit_up(weight, down), weight @ torch.linalg.pinv(down), rtol=1e-9, atol=1e-9)


def test_full_rank_int8_factors_reproduce_the_weight_within_the_rounding_bound():
    """At full rank (m ≥ n) the rounded ``down`` (n, n) is invertible, so the refit ``up`` reproduces W exactly and
    the only error is ``up``'s rounding: |W − Û D̂|_ij ≤ scale_i / 2 · Σ_k |D̂_kj| (half a step per entry)."""
    weight, _ = _problem(40, 24)
    _, down = lord_factors(weight, 24, linalg.identity(), torch.float64)
    up_hat, down_hat = _stored(integer_factors(weight, down, 8))
    (_, s_up), _ = integer_factors(weight, down, 8)
    error = (weight - up_hat @ down_hat).abs()
    bound = (s_up.double() / 2) * down_hat.abs().sum(0, keepdim=True)  # (40, 24)
    assert bool((error <= bound * (1 + 1e-6) + 1e-12).all())
    relative = float(error.norm() / weight.norm())
    assert 0 < relative <= float(bound.norm() / weight.norm()) and relative < 1e-2  # steps of 1/127 of a row's max


def test_unwhitened_int8_factors_cost_at_most_the_rounding_bound():
    """Plain SVD at rank 12: ‖W − Û D̂‖_F ≤ the float factors' error + ‖U‖₂ ‖ΔD‖_F + ‖ΔU‖_F ‖D̂‖₂, each rounded
    entry off by at most half its row's step (the refit ``up`` is no worse than U against D̂)."""
    weight, _ = _problem()
    up, down = lord_factors(weight, 12, linalg.identity(), torch.float64)
    float_error = float((weight - up @ down).norm())
    factors = integer_factors(weight, down, 8)
    up_hat, down_hat = _stored(factors)
    (_, s_up), (_, s_down) = factors
    dd = math.sqrt(64 * float((s_down.double() ** 2).sum())) / 2  # ‖ΔD‖_F ≤ √(Σ_k n (s_k/2)²)
    du = math.sqrt(12 * float((s_up.double() ** 2).sum())) / 2
    bound = float(torch.linalg.matrix_norm(up, 2)) * dd + du * float(torch.linalg.matrix_norm(down_hat, 2))
    assert float_error <= float((weight - up_hat @ down_hat).norm()) <= float_error + bound


def test_whitened_int8_factors_round_where_the_inputs_do_not_look():
    """SVD-LLM's whitened factors at rank 12 under inputs whose scales span three decades: GPTQ under G for
    ``down`` and the refit ``up`` cost < 1% of the truncation error, less than rounding both factors to nearest
    costs (the errors compared in squares: the rounding's part adds to the truncation's in quadrature)."""
    weight, gram = _problem()
    up, down = lord_factors(weight, 12, linalg.from_gram(gram, "cholesky"), torch.float64)
    float_error = _weighted(weight - up @ down, gram)
    up_hat, down_hat = _stored(integer_factors(weight, down, 8, gram))
    int8_error = _weighted(weight - up_hat @ down_hat, gram)
    naive_up, naive_down = (quant.dequantize(*quant.rtn(f, 8, True)[:2], None).double() for f in (up, down))
    naive_error = _weighted(weight - naive_up @ naive_down, gram)
    assert float_error <= int8_error < 1.01 * float_error
    assert int8_error**2 - float_error**2 < 0.7 * (naive_error**2 - float_error**2)


def test_factor_bits_takes_16_or_8_only():
    registry.create("lord", {"factor_bits": 8})
    with pytest.raises(CompressorError, match="factor_bits must be one of 16, 8; got 4") as caught:
        registry.create("fwsvd", {"factor_bits": 4})
    assert "\n" not in str(caught.value)


@pytest.fixture(scope="module")
def lord_outputs(model_dirs, small, tmp_path_factory):
    """factor_bits → a LoRD output (SVD-LLM: whiten gram, no refit) of the tiny llama."""
    root = tmp_path_factory.mktemp("factor-bits")
    outputs = {}
    for bits in (16, 8):
        outputs[bits] = root / f"lord-{bits}"
        overrides = [*small, "lord.refit=none", f"lord.factor_bits={bits}"]
        api.compress(str(model_dirs["llama"]), "lord", outputs[bits], overrides=overrides, progress=False)
    return outputs


def _tensor_bytes(path) -> int:
    """Bytes of a safetensors file's tensor data (the file less its 8-byte length and JSON header)."""
    with open(path, "rb") as file:
        header = int.from_bytes(file.read(8), "little")
    return path.stat().st_size - 8 - header


def _log(out) -> list[dict]:
    return [json.loads(line) for line in (out / io.LOG).read_text().splitlines()]


def test_int8_factors_store_one_byte_per_factor_entry_and_the_files_shrink(lord_outputs):
    """Each int8 module stores rank·(m + n) bytes of integers (rows padded to int32 words), one fp32 scale per
    factor row, its shape buffers and bias; the checkpoint's tensors shrink by exactly what the logs say the factors
    saved; the parameters counted are the same."""
    logs = {bits: _log(out) for bits, out in lord_outputs.items()}
    factorized = [e for e in logs[8] if e["kind"] == "low_rank"]
    assert factorized and all(e["factor_bits"] == 8 for e in factorized)
    specs = io.read_manifest(lord_outputs[8])["modules"]
    for entry in factorized:
        m, n = entry["shape"]
        r = entry["rank"]
        words = m * packed_width(r, 8) + r * packed_width(n, 8)  # int32 words: each row padded to whole words
        bias = 4 * m if specs[entry["name"]]["bias"] else 0
        assert entry["bytes_after"] == 4 * words + 4 * (m + r) + 2 * 2 * 8 + bias
    saved = sum(a["bytes_after"] - b["bytes_after"] for a, b in zip(logs[16], logs[8]) if b["kind"] == "low_rank")
    data = {bits: _tensor_bytes(out / "model.safetensors") for bits, out in lord_outputs.items()}
    assert saved > 0.7 * sum(e["bytes_after"] for e in logs[16] if e["kind"] == "low_rank")  # fp32 → int8
    assert data[16] - data[8] == saved
    manifests = {bits: io.read_manifest(out) for bits, out in lord_outputs.items()}
    assert [e["params_after"] for e in logs[8]] == [e["params_after"] for e in logs[16]]
    assert manifests[8]["params_after"] + summary.quantized_weights(logs[8]) == manifests[16]["params_after"]
    assert manifests[8]["modules"][factorized[0]["name"]]["factor_bits"] == 8
    assert "factor_bits" not in manifests[16]["modules"][factorized[0]["name"]]  # 16-bit specs as before
    assert any("factors in 8 bits" in line for line in summary.lines(manifests[8], logs[8]))


def test_int8_factors_reload_and_dequantize_once(lord_outputs, ids):
    """io.load rebuilds the integer factors; ``dequantized`` caches both factors of every low-rank module and
    gives the same logits; the int8 model is close to the 16-bit one."""
    from conftest import logits

    model = io.load(lord_outputs[8])
    low_rank = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert low_rank and all(m.factor_bits == 8 and m.down.weight_packed.dtype == torch.int32 for m in low_rank)
    plain = logits(model, ids)
    with dequantized(model) as cached:
        assert cached == 2 * len(low_rank)
        torch.testing.assert_close(logits(model, ids), plain, rtol=0, atol=1e-5)
    reference = logits(io.load(lord_outputs[16]), ids)
    assert float((plain - reference).norm() / reference.norm()) < 0.02


def test_heal_refuses_integer_factors_in_one_line(lord_outputs):
    check_source(lord_outputs[16])
    with pytest.raises(CompressorError, match=r"integers \(factor_bits 8, \d+ modules\), which heal cannot train"
                       ) as caught:
        check_source(lord_outputs[8])
    assert "\n" not in str(caught.value)
