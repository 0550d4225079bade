"""Quantization: the grid, packing (bit-exact with compressed-tensors), RTN and GPTQ, the packed module,
and save → load of quantized models."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import logits, small_recipe

from compressor import api, io
from compressor.evaluation.evaluate import perplexity
from compressor.kernels import quant
from compressor.kernels.hessian import hessian, inverse_hessian_factor
from compressor.methods.quantize import QuantizeConfig, gptq
from compressor.model.modules import CompensatedLinear, LowRankLinear, QuantizedLinear, dequantized
from compressor.plan import recipe as recipes


def correlated_inputs(tokens: int, n: int, seed: int = 0) -> torch.Tensor:
    """(tokens, n) inputs with correlated channels and a few large ones, like LLM activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) / n ** 0.5 + torch.eye(n)
    x = torch.randn(tokens, n, generator=g) @ mix
    return x * (1 + 4 * (torch.rand(n, generator=g) > 0.9))


def output_error(weight: torch.Tensor, approx: torch.Tensor, x: torch.Tensor) -> float:
    return float(((weight - approx) @ x.T).norm())


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("cols", [1, 31, 32, 33, 100, 576])
def test_pack_round_trip(bits, cols):
    q_min, q_max = quant.qrange(bits)
    values = torch.randint(q_min, q_max + 1, (3, cols), dtype=torch.int8)
    packed = quant.pack_int32(values, bits)
    assert packed.dtype == torch.int32 and packed.shape == (3, quant.packed_width(cols, bits))
    assert torch.equal(quant.unpack_int32(packed, bits, cols), values)
    along_rows = quant.pack_int32(values.T, bits, dim=0)
    assert torch.equal(quant.unpack_int32(along_rows, bits, cols, dim=0), values.T)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_matches_compressed_tensors(bits):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    q_min, q_max = quant.qrange(bits)
    values = torch.randint(q_min, q_max + 1, (5, 100), dtype=torch.int8)
    assert torch.equal(quant.pack_int32(values, bits), helpers.pack_to_int32(values, bits))
    along_rows = helpers.pack_to_int32(values, bits, packed_dim=0)
    assert torch.equal(quant.pack_int32(values, bits, dim=0), along_rows)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [None, 16, 24])  # 24: a short last group (n = 64)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_round_trip_error_is_at_most_half_a_step(bits, group_size, symmetric):
    weight = torch.randn(12, 64) * torch.logspace(-2, 1, 12)[:, None]
    q, scale, zero_point = quant.rtn(weight, bits, symmetric, group_size)
    q_min, q_max = quant.qrange(bits)
    assert q.dtype == torch.int8 and int(q.min()) >= q_min and int(q.max()) <= q_max
    assert scale.shape == zero_point.shape == (12, quant.n_groups(64, group_size))
    approx = quant.dequantize(q, scale, None if symmetric else zero_point, group_size)
    step = quant.expand_groups(scale, 64, group_size)
    assert bool(((weight - approx).abs() <= step / 2 * (1 + 1e-4)).all())
    if symmetric:
        assert not zero_point.any()
    # zero is exactly representable, and an all-zero group stays zero
    zeros = torch.zeros(2, 64)
    q0, s0, z0 = quant.rtn(zeros, bits, symmetric, group_size)
    assert not quant.dequantize(q0, s0, z0, group_size).any()


def test_more_bits_less_error():
    weight = torch.randn(32, 128)
    errors = []
    for bits in range(2, 9):
        q, scale, zero_point = quant.rtn(weight, bits, False, 32)
        errors.append(float((weight - quant.dequantize(q, scale, zero_point, 32)).norm()))
    assert errors == sorted(errors, reverse=True)


def test_grid_matches_compressed_tensors():
    qargs = pytest.importorskip("compressed_tensors.quantization")
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    weight = torch.randn(8, 64)
    for symmetric in (False, True):
        args = qargs.QuantizationArgs(num_bits=4, symmetric=symmetric, strategy="group", group_size=16)
        groups = weight.view(8, 4, 16)
        scale, zero_point = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
        ours_scale, ours_zero = quant.quant_params(weight, 4, symmetric, 16)
        torch.testing.assert_close(ours_scale, scale)
        assert torch.equal(ours_zero, zero_point.to(torch.int32))
        q = quant.quantize(weight, ours_scale, ours_zero, 4, 16)
        theirs = fake_quantize(weight, scale, zero_point, args)
        torch.testing.assert_close(quant.dequantize(q, ours_scale, ours_zero, 16), theirs)


def _gptq(weight, x, bits=3, group_size=None, act_order=False, damp=0.01, block_size=128):
    gram = x.double().T @ x.double()
    h = hessian(gram, x.shape[0])
    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else None
    if perm is not None:
        h = h[perm][:, perm]
    upper, dead = inverse_hessian_factor(h, damp)
    if perm is not None:
        dead = dead[torch.argsort(perm)]
    return gptq(weight, upper, dead, bits, False, group_size, perm, block_size)


@pytest.mark.parametrize("group_size,act_order", [(None, False), (16, False), (16, True), (24, False)])
def test_gptq_beats_rtn_on_the_calibration_inputs(group_size, act_order):
    torch.manual_seed(0)
    weight = torch.randn(48, 64)
    x = correlated_inputs(512, 64)
    q, scale, zero_point = _gptq(weight, x, 3, group_size, act_order, block_size=32)
    approx = quant.dequantize(q, scale, zero_point, group_size)
    rq, rscale, rzero = quant.rtn(weight, 3, False, group_size)
    rtn_approx = quant.dequantize(rq, rscale, rzero, group_size)
    assert output_error(weight, approx, x) < 0.9 * output_error(weight, rtn_approx, x)


def _reference_gptq(weight, upper, dead, bits, symmetric, group_size, perm, block_size, scale_dtype=None):
    """GPTQ's column loop as first written here (column by column on the (m, b) block, parameters read per
    column): the frozen reference the transposed, per-block loop of ``gptq`` must equal bit for bit."""
    m, n = weight.shape
    q_min, q_max = quant.qrange(bits)
    w = weight.float().clone()
    w[:, dead] = 0
    size = group_size or n
    scale = torch.ones(m, quant.n_groups(n, group_size))
    zero_point = torch.zeros(m, scale.shape[1], dtype=torch.int32)
    static = perm is not None or not group_size
    if static:
        scale, zero_point = quant.quant_params(w, bits, symmetric, group_size, scale_dtype)
    order = perm if perm is not None else torch.arange(n)
    w = w[:, order]
    q = torch.zeros(m, n, dtype=torch.int8)
    for start in range(0, n, block_size):
        end = min(start + block_size, n)
        block, errors, h_block = w[:, start:end].clone(), torch.zeros(m, end - start), upper[start:end, start:end]
        for i in range(end - start):
            column, group = start + i, int(order[start + i] // size)
            if not static and column % size == 0:
                current = torch.cat([block[:, i:i + size], w[:, end:end + max(0, size - (end - column))]], dim=1)
                s, z = quant.quant_params(current, bits, symmetric, None, scale_dtype)
                scale[:, group], zero_point[:, group] = s[:, 0], z[:, 0]
            s, z = scale[:, group], zero_point[:, group]
            values = (torch.round(block[:, i] / s) + z).clamp(q_min, q_max)
            q[:, column] = values.to(torch.int8)
            error = (block[:, i] - (values - z) * s) / h_block[i, i]
            block[:, i:] -= error[:, None] * h_block[i, i:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ upper[start:end, end:]
    return q[:, torch.argsort(order)], scale, zero_point


@pytest.mark.parametrize("group_size,act_order,symmetric,block_size", [
    (16, True, False, 32), (24, False, False, 32), (None, False, True, 20), (32, False, True, 128),
    (16, True, True, 48)])
def test_gptq_equals_the_reference_loop_bit_for_bit(group_size, act_order, symmetric, block_size):
    # groups that straddle blocks (24 in 32), blocks that do not divide the width (20, 48 in 96), a dead input,
    # a bf16-rounded scale
    generator = torch.Generator().manual_seed(13)
    x = correlated_inputs(300, 96, seed=13)
    x[:, 7] = 0
    h = hessian((x.T @ x).double(), 300)
    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else None
    upper, dead = inverse_hessian_factor(h[perm][:, perm] if act_order else h, 0.01)
    if act_order:
        dead = dead[torch.argsort(perm)]
    weight = torch.randn(200, 96, generator=generator)
    expected = _reference_gptq(weight, upper, dead, 4, symmetric, group_size, perm, block_size, torch.bfloat16)
    ours = gptq(weight, upper, dead, 4, symmetric, group_size, perm, block_size, torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(expected, ours))


def test_gptq_with_uncorrelated_inputs_is_rtn():
    """With H ∝ I no error is propagated, so GPTQ rounds exactly like RTN."""
    weight = torch.randn(16, 64)
    x = torch.eye(64).repeat(4, 1)  # XᵀX = 4·I
    for group_size in (None, 16):
        q, scale, zero_point = _gptq(weight, x, 4, group_size, damp=0.0)
        rq, rscale, rzero = quant.rtn(weight, 4, False, group_size)
        assert torch.equal(q, rq) and torch.equal(scale, rscale) and torch.equal(zero_point, rzero)


def test_gptq_dead_inputs_are_zeroed():
    weight = torch.randn(8, 32)
    x = correlated_inputs(256, 32)
    x[:, 5] = 0
    q, scale, zero_point = _gptq(weight, x, 4, 8)
    assert float(quant.dequantize(q, scale, zero_point, 8)[:, 5].abs().max()) == 0.0


def test_quantized_linear_forward_spec_and_reload():
    torch.manual_seed(0)
    weight, bias = torch.randn(20, 40), torch.randn(20)
    q, scale, zero_point = quant.rtn(weight, 3, False, 16)
    module = QuantizedLinear.from_integers(q, scale, zero_point, 3, 16, False, bias)
    expected = {"weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "bias"}
    assert set(module.state_dict()) == expected
    assert module.weight_packed.shape == (20, quant.packed_width(40, 3))
    assert module.weight_zero_point.shape == (quant.packed_width(20, 3), 3)
    dense = quant.dequantize(q, scale, zero_point, 16)
    torch.testing.assert_close(module.dense_weight(), dense)
    x = torch.randn(5, 40)
    torch.testing.assert_close(module(x), x @ dense.T + bias)
    rebuilt = QuantizedLinear.empty(**module.spec())
    rebuilt.load_state_dict(module.state_dict())
    assert torch.equal(rebuilt(x), module(x))
    symmetric = QuantizedLinear.from_integers(*quant.rtn(weight, 4, True, None), 4, None, True, None)
    assert "weight_zero_point" not in symmetric.state_dict()


def test_dequantized_cache_gives_the_same_numbers_and_is_dropped_after(tmp_path, model_dir, ids):
    torch.manual_seed(0)
    weight = torch.randn(20, 40)
    module = QuantizedLinear.from_integers(*quant.rtn(weight, 3, False, 16), 3, 16, False, torch.randn(20))
    lora = LowRankLinear.from_factors(torch.randn(20, 2), torch.randn(2, 40), None)
    compensated = CompensatedLinear(module, lora)
    x = torch.randn(5, 40)
    plain, plain_compensated = module(x), compensated(x)
    with dequantized(compensated) as cached:
        assert cached == 1 and module.cached_weight is not None
        assert torch.equal(module(x), plain) and torch.equal(compensated(x), plain_compensated)
        module.weight_packed.zero_()  # the cache is what the forward uses inside the block
        assert torch.equal(module(x), plain)
    assert module.cached_weight is None and "cached_weight" not in module.state_dict()
    assert not torch.equal(module(x), plain)  # outside, the (zeroed) packed weight is read again
    summary = api.compress(str(model_dir), recipes.parse({"steps": [{"method": "quantize", "config": {
        "bits": 3, "group_size": 32}}]}), tmp_path / "out", progress=False)
    model, windows = summary["model"], ids.reshape(4, 12)
    uncached = [model(input_ids=w[None], use_cache=False).logits for w in windows]
    ppl = perplexity(model, windows, batch_size=1)
    nll = sum(float(torch.nn.functional.cross_entropy(out[0, :-1], w[1:], reduction="sum"))
              for out, w in zip(uncached, windows))
    assert ppl["value"] == pytest.approx(math.exp(nll / (4 * 11)), rel=1e-12)
    assert all(m.cached_weight is None for m in model.modules() if isinstance(m, QuantizedLinear))


def test_config_checks():
    with pytest.raises(ValueError):
        QuantizeConfig(bits=1)
    with pytest.raises(ValueError):
        QuantizeConfig(bits=9)
    assert QuantizeConfig(group_size=0).group_size is None


def test_rtn_model_save_load_identical_logits(tmp_path, arch, model_dir, ids):
    data = recipes.read("rtn-w4")
    data["steps"][0]["config"].update(group_size=32, bits=3)
    summary = api.compress(str(model_dir), recipes.parse(data), tmp_path / "out", progress=False)
    model = summary["model"]
    assert any(isinstance(m, QuantizedLinear) for m in model.modules())
    assert torch.equal(logits(model, ids), logits(io.load(tmp_path / "out"), ids))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gptq_model_save_load_and_merge(tmp_path, arch, model_dir, ids, small_text):
    data = {"steps": [{"method": "quantize", "config": {"algorithm": "gptq", "bits": 3, "group_size": 32,
                                                         "act_order": True}}]}
    summary = api.compress(str(model_dir), small_recipe(data, small_text), tmp_path / "out", progress=False)
    model = summary["model"]
    assert torch.equal(logits(model, ids), logits(io.load(tmp_path / "out"), ids))
    io.merge_in_place(model)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    reloaded = logits(io.load(tmp_path / "out"), ids)
    torch.testing.assert_close(logits(model, ids), reloaded, atol=1e-4, rtol=1e-4)


def _reference_factor(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The out-of-place computation the in-place one must equal bit for bit."""
    h = h.clone()
    diagonal = torch.diagonal(h)
    dead = diagonal == 0
    diagonal[dead] = 1.0
    diagonal.add_(damp * diagonal.mean())
    lower = torch.linalg.cholesky(h)
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True).float(), dead


@pytest.mark.parametrize("spill", [False, True])
def test_hessian_factor_in_place_is_bit_identical_and_gives_the_gram_back(monkeypatch, spill):
    from compressor.kernels import hessian as hessian_module

    monkeypatch.setattr(hessian_module, "SPILL_BYTES", 1 if spill else 1 << 40)
    generator = torch.Generator().manual_seed(6)
    inputs = torch.randn(700, 600, generator=generator) * torch.rand(600, generator=generator)
    inputs[:, 3] = 0  # a dead channel
    gram = (inputs.T @ inputs).double()  # not exactly symmetric in its last bits: the layout matters
    before = gram.clone()
    expected, expected_dead = _reference_factor(hessian(gram, 700), 0.01)
    with hessian_module.hessian_in(gram, 700) as scratch:
        assert (scratch.data_ptr() == gram.data_ptr()) == spill  # the Gram's own memory, or a copy
        upper, dead = inverse_hessian_factor(scratch, 0.01, overwrite=True)
    assert torch.equal(upper, expected) and torch.equal(dead, expected_dead)
    assert torch.equal(gram, before)  # read back from the temporary file


def test_chunked_pack_quantize_and_dequantize_equal_one_pass():
    # 1,200 × 1,000 is past the one-pass size (2^20 elements): done in row chunks, the same integers
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(1200, 1000, generator=generator)
    scale, zero_point = quant.quant_params(weight, 4, False, 128)
    q = quant.quantize(weight, scale, zero_point, 4, 128)
    parts = [quant.quantize(weight[i:i + 100], scale[i:i + 100], zero_point[i:i + 100], 4, 128) for i in range(0, 1200, 100)]
    assert torch.equal(q, torch.cat(parts))
    packed = quant.pack_int32(q, 4)
    assert torch.equal(packed, torch.cat([quant.pack_int32(q[i:i + 100], 4) for i in range(0, 1200, 100)]))
    from compressor.portable.modeling_compressor import dequantize, unpack_int32

    assert torch.equal(unpack_int32(packed, 4, 1000), q)
    dense = dequantize(q, scale, zero_point, 128)
    assert torch.equal(dense, torch.cat([dequantize(q[i:i + 100], scale[i:i + 100], zero_point[i:i + 100], 128)
                                         for i in range(0, 1200, 100)]))


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_in_the_grams_own_memory_and_in_fp32(tmp_path, model_dirs, ids, small_text, monkeypatch, act_order):
    """Every Gram lending its memory (factorized per target, its bytes in a temporary file meanwhile) gives the
    same model bit for bit; ``hessian_dtype: float32`` (GPTQ's reference precision) a model within rounding
    of the fp64 one (nearly all the same integers), and the log's output errors are still measured."""
    from compressor.kernels import hessian as hessian_module

    def run(name: str, **config) -> tuple[torch.Tensor, list[dict]]:
        data = {"steps": [{"method": "quantize", "config": {"algorithm": "gptq", "bits": 4, "group_size": 32,
                                                             "act_order": act_order, **config}}]}
        summary = api.compress(str(model_dirs["llama"]), small_recipe(data, small_text), tmp_path / name,
                               progress=False)
        import json

        log = [json.loads(line) for line in (tmp_path / name / io.LOG).read_text().splitlines()]
        return logits(summary["model"], ids), log

    shared, shared_log = run("shared")
    fp32, fp32_log = run("fp32", hessian_dtype="float32")
    monkeypatch.setattr(hessian_module, "SPILL_BYTES", 1)
    lent, lent_log = run("lent")
    lent_fp32, lent_fp32_log = run("lent-fp32", hessian_dtype="float32")
    assert torch.equal(lent, shared) and torch.equal(lent_fp32, fp32)
    assert [e["rel_output_error"] for e in lent_log] == [e["rel_output_error"] for e in shared_log]
    assert [e["rel_output_error"] for e in lent_fp32_log] == [e["rel_output_error"] for e in fp32_log]
    from transformers import AutoModelForCausalLM

    scale = float((shared - logits(AutoModelForCausalLM.from_pretrained(model_dirs["llama"]), ids)).norm())
    assert float((fp32 - shared).norm()) < 0.05 * scale
    assert all(e["rel_output_error"] is not None and e["rel_output_error"] < 0.2 for e in fp32_log)


def test_gram_precision_of_a_watch():
    """A side whose every gram request asks float32 accumulates in fp32; any float64 request makes it fp64."""
    from compressor.stats.accumulators import FP32_GRAM, Request, TensorStats

    with pytest.raises(ValueError, match="precision applies to gram"):
        Request("abs_mean", precision="float32")
    x = torch.randn(10, 6)
    fp32, fp64 = TensorStats(), TensorStats()
    fp32.add(x, frozenset({"gram", FP32_GRAM}))
    fp32.add(x, frozenset({"gram", FP32_GRAM}))
    fp64.add(x, frozenset({"gram"}))
    fp64.add(x, frozenset({"gram"}))
    assert fp32.gram.dtype == torch.float32 and fp64.gram.dtype == torch.float64
    torch.testing.assert_close(fp32.gram.double(), fp64.gram, rtol=1e-6, atol=1e-5)


def test_gptq_in_place_and_chunked_update(monkeypatch):
    from compressor.methods import quantize as quantize_module

    generator = torch.Generator().manual_seed(10)
    inputs = torch.randn(400, 96, generator=generator)
    upper, dead = inverse_hessian_factor(hessian((inputs.T @ inputs).double(), 400), 0.01)
    weight = torch.randn(24, 96, generator=generator)
    expected = gptq(weight, upper, dead, 3, False, 32, block_size=16)
    own = weight.clone()
    in_place = gptq(own, upper, dead, 3, False, 32, block_size=16, overwrite=True)
    assert all(torch.equal(a, c) for a, c in zip(expected, in_place))
    assert not torch.equal(own, weight)  # worked in the caller's copy
    # the trailing update 5 columns at a time: the same dot products, which BLAS may round differently in
    # narrow blocks (at Llama widths in 16 MB chunks the bits were equal here): the same grid to rounding
    monkeypatch.setattr(quantize_module, "UPDATE_CHUNK", 24 * 5)
    q, scale, zero_point = gptq(weight, upper, dead, 3, False, 32, block_size=16)
    assert (q == expected[0]).float().mean() > 0.99
    torch.testing.assert_close(scale, expected[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunked", [True, False])
def test_act_order_permutation_in_place_moves_the_same_bits(monkeypatch, chunked):
    # Pᵀ M P in M's own memory (columns in row chunks, two in-place transposes; or, under SPILL_BYTES, through
    # one copy) equals the two indexings bit for bit, on a matrix that is not symmetric and spans two row chunks
    # and a partial 512 block (1,500² > 2^21)
    from compressor.kernels import hessian as hessian_module
    from compressor.kernels.hessian import permute_

    if chunked:
        monkeypatch.setattr(hessian_module, "SPILL_BYTES", 1)

    generator = torch.Generator().manual_seed(11)
    matrix = torch.randn(1500, 1500, dtype=torch.float64, generator=generator)
    perm = torch.randperm(1500, generator=generator)
    expected = matrix[perm][:, perm]
    storage = matrix.data_ptr()
    result = permute_(matrix, perm)
    assert result.data_ptr() == storage and result.is_contiguous()
    assert torch.equal(result, expected)


def test_column_loops_on_one_thread_give_the_bits_of_several(monkeypatch):
    # GPTQ's and SparseGPT's column loops and the Hessian factor run on one thread (one_thread.serial: on busy
    # cores, threads waiting on each other at every small operation cost 10× the time); the bits are those of
    # two threads, at sizes where torch splits the per-column update (384 × 128 > its 32,768-entry grain)
    import contextlib

    from compressor.kernels import hessian as hessian_module
    from compressor.kernels import one_thread
    from compressor.kernels.hessian import permute_
    from compressor.kernels.one_thread import serial
    from compressor.methods import prune
    from compressor.methods import quantize as quantize_module

    generator = torch.Generator().manual_seed(12)
    inputs = correlated_inputs(2000, 640, seed=12)
    h = hessian((inputs.T @ inputs).double(), 2000)
    perm = torch.argsort(torch.diagonal(h), descending=True)
    upper, dead = inverse_hessian_factor(h, 0.01)
    weight = torch.randn(384, 640, generator=generator)

    def runs():
        upper_perm, dead_perm = inverse_hessian_factor(permute_(h.clone(), perm), 0.01)
        dead_perm = dead_perm[torch.argsort(perm)]
        return [upper_perm, *gptq(weight, upper_perm, dead_perm, 4, False, 64, perm),
                *gptq(weight, upper, dead, 3, True, 64), prune.sparsegpt(weight, upper, dead, (2, 4), 0.5),
                prune.sparsegpt(weight, upper, dead, None, 0.5)]

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with serial():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2  # restored
        with serial(one_thread.SERIAL_ELEMENTS + 1):
            assert torch.get_num_threads() == 2  # a large operation keeps its threads
        entered = []

        def counted(elements=0):
            entered.append(torch.get_num_threads())
            return serial(elements)

        monkeypatch.setattr(quantize_module, "serial", counted)
        monkeypatch.setattr(prune, "serial", counted)
        one = runs()
        # GPTQ and SparseGPT: one thread from their start (a matrix under SERIAL_ELEMENTS), then 5 blocks of 128
        # columns × (column loop, trailing update) already on one
        assert entered == [2, *[1] * (5 * 2)] * 4
        for module in (quantize_module, prune, hessian_module):
            monkeypatch.setattr(module, "serial", contextlib.nullcontext)
        two = runs()
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two))
