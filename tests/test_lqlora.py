"""LQ-LoRA: the NormalFloat quantizer (codebook, bitsandbytes' NF4 codes, storage accounting, packed round
trip), the Q + L1·L2 decomposition (best iterate, below quantization alone, Fisher weighting), the exact
bit allocation (brute force), and the compressor end to end (budget met as stored, the PEFT adapter over
the dequantized base, the CLI, the error cache)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import logits
from typer.testing import CliRunner

from compressor import api, io
from compressor.cli import app
from compressor.errors import CompressorError
from compressor.kernels import linalg
from compressor.kernels import normal_float as nf
from compressor.methods import lqlora_math
from compressor.model.modules import CompensatedLinear, NormalFloatLinear, from_spec
from compressor.plan import recipe as recipes
from compressor.ranks import bits as bit_allocation

# bitsandbytes' NF4 table (csrc/kernels: dDequantizeNF4 / functional.get_4bit_type("nf4")), as published
BNB_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
           -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
           0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
           0.7229568362236023, 1.0]


def weight_like(m: int = 96, n: int = 128, seed: int = 0) -> torch.Tensor:
    """A weight with a few strong directions over Gaussian noise (as trained weights have)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(m, 6, generator=g) @ torch.randn(6, n, generator=g) * 0.3
    return low + torch.randn(m, n, generator=g) * 0.05


# --- the quantizer ---------------------------------------------------------------------------------------


def test_nf4_default_configuration_accounts_to_4_127_bits():
    config = nf.NFConfig()  # (b, B0, b0, B1, b1) = (4, 64, 8, 256, fp32), the paper's NF4 default
    assert nf.nominal_bits(config) == 4 + 8 / 64 + 32 / (64 * 256) == 4.126953125
    assert round(nf.nominal_bits(config), 3) == 4.127
    numel = 64 * 256 * 3  # whole groups: the stored bits are the formula's plus the one fp32 offset
    assert nf.stored_bits(config, numel) == 4 * numel + 8 * numel // 64 + 32 * numel // (64 * 256) + 32
    assert nf.nominal_bits(nf.NFConfig(3, 16, 4, 64, "bf16")) == 3 + 4 / 16 + 16 / (16 * 64)


def test_levels_are_bitsandbytes_nf4_and_well_formed_at_every_width():
    torch.testing.assert_close(nf.normal_float_levels(4), torch.tensor(BNB_NF4), atol=2e-7, rtol=0)
    for bits in (2, 3, 4, 8):
        levels = nf.normal_float_levels(bits)
        assert levels.shape == (2 ** bits,) and bool((levels[1:] > levels[:-1]).all())
        assert float(levels[0]) == -1.0 and float(levels[-1]) == 1.0
        assert int((levels == 0).sum()) == 1 and int((levels < 0).sum()) == 2 ** (bits - 1) - 1
    assert nf.normal_float_levels(2).tolist() == pytest.approx([-1.0, 0.0, 0.33791524, 1.0], abs=1e-6)


def test_nf4_codes_equal_bitsandbytes():
    """4 bits, blocks of 64 against the exact absmax: bitsandbytes' NF4 codes, value for value."""
    bnb = pytest.importorskip("bitsandbytes.functional")
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(3))
    flat = weight.reshape(-1)
    absmax = nf.blockwise_absmax(flat, 64)
    codes = nf.quantize_blocks(flat, absmax, 64, nf.normal_float_levels(4))
    packed, state = bnb.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
    packed = packed.reshape(-1).to(torch.int64)
    theirs = torch.stack([(packed >> 4) & 15, packed & 15], dim=1).reshape(-1)  # high nibble first
    torch.testing.assert_close(state.absmax, absmax)
    assert torch.equal(codes, theirs)
    ours = nf.dequantize_normal_float(codes, absmax, 4, 64, (64, 256))
    torch.testing.assert_close(ours, bnb.dequantize_4bit(packed.to(torch.uint8).view(-1, 1), state), atol=1e-6,
                               rtol=0)


def test_weights_on_the_grid_round_trip_exactly():
    """Every block holds a ±1 level times one scale: offset = that scale, so Q reproduces W code for code."""
    g = torch.Generator().manual_seed(1)
    for bits in (2, 3, 4, 8):
        levels = nf.normal_float_levels(bits)
        codes = torch.randint(0, 2 ** bits, (40 * 48,), generator=g)
        codes[::16] = 2 ** bits - 1  # a +1 in every block of 16
        weight = (levels[codes] * 0.125).view(40, 48)
        quantized = nf.quantize(weight, nf.NFConfig(bits, 16, 8, 8, "fp16"))
        assert torch.equal(quantized.codes, codes) and torch.equal(quantized.dequantize(), weight)


@pytest.mark.parametrize("config", [nf.NFConfig(), nf.NFConfig(3, 16, 4, 8, "bf16"), nf.NFConfig(2, 32, 8, 3, "fp16"),
                                    nf.NFConfig(8, 64, 2, 16, "fp32")], ids=lambda c: c.label)
def test_packed_module_round_trip_and_stored_bits(config):
    """quantize → NormalFloatLinear → state dict → empty module from its spec: the same Ŵ; the buffers hold
    exactly ``stored_bits`` (shapes that blocks and groups do not divide)."""
    weight = weight_like(37, 54)
    codes = nf.quantize(weight, config)
    bias = torch.randn(37)
    module = NormalFloatLinear.from_codes(codes, bias)
    rebuilt = from_spec(module.spec())
    rebuilt.load_state_dict(module.state_dict())
    assert torch.equal(rebuilt.dense_weight(), codes.dequantize()) and torch.equal(rebuilt.bias, bias)
    x = torch.randn(5, 54)
    torch.testing.assert_close(rebuilt(x), x @ codes.dequantize().T + bias)
    stored = sum(8 * t.numel() * t.element_size() for name, t in module.state_dict().items()
                 if name not in ("bias", "weight_shape"))
    assert stored == nf.stored_bits(config, 37 * 54)
    # the error of an NF quantizer is below half the widest gap between levels of each block's scale
    levels = nf.normal_float_levels(config.bits)
    blocks = torch.nn.functional.pad((weight - codes.dequantize()).reshape(-1).abs(),
                                     (0, codes.scales().numel() * config.block_size - weight.numel()))
    worst = blocks.view(-1, config.block_size).amax(1)
    exact = nf.blockwise_absmax(weight.reshape(-1), config.block_size)
    bound = (levels[1:] - levels[:-1]).max() / 2 * codes.scales() + (exact - codes.scales()).abs()
    assert bool((worst <= bound + 1e-6).all())


def test_more_bits_quantize_better_and_zero_blocks_stay_zero():
    weight = weight_like()
    errors = [float((nf.fake_quantize(weight, nf.NFConfig(bits)) - weight).norm()) for bits in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True)
    relative = errors[2] / float(weight.norm())
    assert 0.05 < relative < 0.15  # NF4 at block 64 on near-Gaussian weights: ≈ 0.09 (bitsandbytes')
    weight[:2] = 0  # two rows of zeros: whole blocks of zeros
    assert bool((nf.fake_quantize(weight, nf.NFConfig(3, 32))[:2] == 0).all())


# --- the shared kernel: both sides, randomized -----------------------------------------------------------


def test_two_sided_weighted_svd_is_the_optimum_of_the_weighted_problem():
    weight = weight_like(30, 40, seed=2).double()
    g = torch.Generator().manual_seed(2)
    rows, cols = torch.rand(30, generator=g, dtype=torch.float64) + 0.2, torch.rand(40, generator=g,
                                                                                  dtype=torch.float64) + 0.2
    up, down, spectrum = linalg.whitened_svd(weight, 5, linalg.diagonal(cols), torch.float64, left=rows)
    residual = rows[:, None] * (weight - up @ down) * cols[None, :]
    torch.testing.assert_close(residual.norm() ** 2, (spectrum[5:] ** 2).sum())  # Eckart–Young, weighted
    plain_up, plain_down, _ = linalg.whitened_svd(weight, 5)
    assert float(residual.norm()) < float((rows[:, None] * (weight - plain_up @ plain_down) * cols).norm())


def test_randomized_svd_is_seeded_and_close_to_exact():
    weight = weight_like(80, 60)
    sketch = linalg.Sketch(oversample=10, power_iterations=2, seed=7)
    first = linalg.whitened_svd(weight, 6, None, torch.float32, sketch=sketch)
    again = linalg.whitened_svd(weight, 6, None, torch.float32, sketch=sketch)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    exact_up, exact_down, _ = linalg.whitened_svd(weight, 6, None, torch.float64)
    exact = float((weight.double() - exact_up @ exact_down).norm())
    assert float((weight - first[0] @ first[1]).norm()) <= exact * 1.01


# --- the decomposition -----------------------------------------------------------------------------------


@pytest.mark.parametrize("svd", ["randomized", "exact"])
@pytest.mark.parametrize("bits", [2, 3])
def test_decomposition_returns_its_best_iterate_below_quantization_alone(svd, bits):
    weight = weight_like()
    config = nf.NFConfig(bits, 32)
    sketch = linalg.Sketch() if svd == "randomized" else None
    result = lqlora_math.decompose(weight, 8, config, iterations=100, sketch=sketch)
    errors = result.errors
    assert 1 < len(errors) < 100  # stopped by the rule, not the limit
    assert result.error == min(errors) == errors[result.best]
    assert all(later <= earlier for earlier, later in zip(errors[:result.best], errors[1:result.best + 1]))
    assert errors[-1] >= result.error and result.best == len(errors) - 2  # the last one did not improve
    assert result.error == pytest.approx(lqlora_math.reconstruction_error(weight, result.approximation()), rel=1e-12)
    alone = lqlora_math.quantization_error(weight, config)
    assert result.error < 0.7 * alone
    assert result.up.shape == (96, 8) and result.down.shape == (8, 128)


def test_rank_zero_is_quantization_alone_and_more_rank_helps():
    weight = weight_like()
    config = nf.NFConfig(3, 64)
    alone = lqlora_math.decompose(weight, 0, config)
    assert alone.up is None and torch.equal(alone.approximation(), nf.fake_quantize(weight, config))
    assert alone.error == pytest.approx(lqlora_math.quantization_error(weight, config))
    errors = [lqlora_math.decompose(weight, rank, config, sketch=None).error for rank in (2, 6, 16)]
    assert errors == sorted(errors, reverse=True) and errors[0] < alone.error


def test_fisher_weighting():
    """A uniform Fisher changes nothing; a skewed one lowers the Fisher-weighted error against the unweighted
    decomposition measured the same way."""
    weight = weight_like()
    config = nf.NFConfig(2, 32)
    plain = lqlora_math.decompose(weight, 8, config, sketch=None)
    uniform = lqlora_math.decompose(weight, 8, config, sketch=None, fisher=torch.full_like(weight, 3.0), eps=0.0)
    # the same first iterate (√3 times the error); later ones may part where a value sits on a midpoint
    assert uniform.errors[0] == pytest.approx(plain.errors[0] * 3 ** 0.5, rel=1e-4)
    assert uniform.error == pytest.approx(plain.error * 3 ** 0.5, rel=1e-2)
    g = torch.Generator().manual_seed(5)
    fisher = torch.exp(2 * torch.randn(96, 1, generator=g)) * torch.exp(2 * torch.randn(1, 128, generator=g))
    weighted = lqlora_math.decompose(weight, 8, config, sketch=None, fisher=fisher)
    root = fisher.sqrt()
    plain_weighted = lqlora_math.reconstruction_error(weight, plain.approximation(), root)
    assert weighted.error == pytest.approx(lqlora_math.reconstruction_error(weight, weighted.approximation(), root))
    assert weighted.error < 0.9 * plain_weighted


def test_counted_nearest_level_is_bucketize_on_the_midpoints():
    """The counted index (≤ 4 bits) is bucketize's, on midpoints exactly, ±inf and NaN included."""
    for bits in (2, 3, 4, 5):
        levels = nf.normal_float_levels(bits)
        midpoints = (levels[1:] + levels[:-1]) / 2
        values = torch.cat([torch.randn(5000, generator=torch.Generator().manual_seed(bits)), midpoints, levels,
                            torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0])])
        assert torch.equal(nf.nearest_level(values, levels), torch.bucketize(values, midpoints, right=False))


def test_block_absmax_and_scaling_are_the_plain_formulas_bit_for_bit():
    """``blockwise_absmax`` (from the extremes, no |w| copy) and ``quantize_blocks`` (no padding where the blocks
    fit, zero scales masked) give the bits of the plain formulas: abs, pad, amax; divide where the scale is
    positive, else 0 — with zeros, −0, NaN, short last blocks, and zero or NaN scales."""
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        n = int(torch.randint(1, 3000, (1,), generator=g))
        flat = torch.randn(n, generator=g) * 0.05
        flat[: n // 3] = 0.0 if trial % 2 else -0.0
        if trial % 4 == 0:
            flat[n // 2] = float("nan")
        for block in (7, 16, 64):
            blocks = -(-n // block)
            plain = torch.nn.functional.pad(flat.abs(), (0, blocks * block - n)).view(blocks, block).amax(1)
            absmax = nf.blockwise_absmax(flat, block)
            assert torch.equal(absmax.isnan(), plain.isnan())  # NaN where a NaN is (its sign bit aside)
            assert torch.equal(absmax.nan_to_num(7.0).view(torch.int32), plain.nan_to_num(7.0).view(torch.int32))
            scales = plain.nan_to_num(0.5).clone()
            scales[::3] = 0.0
            scales[1::7] = float("nan")
            padded = torch.nn.functional.pad(flat, (0, blocks * block - n)).view(blocks, block)
            positive = scales[:, None] > 0
            scaled = torch.where(positive, padded / torch.where(positive, scales[:, None], 1.0), 0.0)
            for bits in (2, 4):
                levels = nf.normal_float_levels(bits)
                expected = torch.bucketize(scaled, (levels[1:] + levels[:-1]) / 2).reshape(-1)[:n]
                assert torch.equal(nf.quantize_blocks(flat, scales, block, levels), expected)


@pytest.mark.parametrize("weighted", [False, True])
def test_a_shared_first_low_rank_part_gives_the_same_decomposition(weighted):
    """``start = initial_low_rank(W)`` (computed once per matrix by the pricing) is the decomposition's own first
    step: every error and factor is the one of a decomposition from scratch."""
    weight = weight_like(seed=3)
    g = torch.Generator().manual_seed(4)
    fisher = torch.exp(torch.randn(96, 128, generator=g)) if weighted else None
    start = lqlora_math.initial_low_rank(weight, 8, fisher=fisher)
    for config in (nf.NFConfig(2, 16), nf.NFConfig(3, 64), nf.NFConfig(4, 32)):
        scratch = lqlora_math.decompose(weight, 8, config, fisher=fisher)
        shared = lqlora_math.decompose(weight, 8, config, fisher=fisher, start=start)
        assert shared.errors == scratch.errors and shared.best == scratch.best
        assert torch.equal(shared.up, scratch.up) and torch.equal(shared.codes.codes, scratch.codes.codes)


def test_pricing_is_within_one_percent_of_decompositions_from_scratch(cache):
    """``LQLoRA.price`` (the shared first step, the counted levels, W in fp64 once) against the pricing before
    issue 31: every configuration decomposed from scratch with ``bucketize`` and fresh fp64 copies per iterate.
    Within 1% is the issue's bar; the numbers are in fact the same."""
    from compressor.methods.lqlora import LQLoRA, LQLoRAConfig

    method = LQLoRA(LQLoRAConfig(budget=3.0, rank=8, bits=[2, 3, 4], block_size=[16, 64], error_cache="off"))
    grid = method.config.grid()
    for seed in range(3):
        weight = weight_like(64 + 32 * seed, 96, seed=seed)
        priced = method.price(weight, None, grid, torch.device("cpu"), {"hits": 0, "computed": 0})
        for config in grid:
            before = reference_decompose(weight, 8, config)
            assert priced[config.label] == pytest.approx(before, rel=1e-2)
            assert priced[config.label] == before


def reference_decompose(weight: torch.Tensor, rank: int, config: nf.NFConfig) -> float:
    """The best error of the pricing's decomposition as it was before issue 31 (unweighted, randomized SVD)."""
    best, errors, residual_q = float("inf"), [], torch.zeros_like(weight)
    levels = nf.normal_float_levels(config.bits)
    for _ in range(100):
        up, down, _ = linalg.whitened_svd(weight - residual_q, rank, None, torch.float32, sketch=linalg.Sketch())
        low_rank = up @ down
        flat = (weight - low_rank).reshape(-1)
        scale_codes, absmax, offset = nf.double_quantize(nf.blockwise_absmax(flat, config.block_size), config)
        scales = nf.block_scales(scale_codes, absmax, offset, config.group_size, config.scale_bits)
        blocks = torch.nn.functional.pad(flat, (0, scales.numel() * config.block_size - flat.numel()))
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))[:, None]
        scaled = torch.where(scales[:, None] > 0, blocks.view(scales.numel(), -1) / safe, 0.0)
        codes = torch.bucketize(scaled, (levels[1:] + levels[:-1]) / 2).reshape(-1)[:flat.numel()]
        residual_q = nf.dequantize_normal_float(codes, scales, config.bits, config.block_size, weight.shape)
        errors.append(lqlora_math.reconstruction_error(weight, residual_q + low_rank))
        best = min(best, errors[-1])
        if len(errors) > 1 and errors[-1] >= errors[-2]:
            break
    return best


# --- the bit allocation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_allocation_is_the_brute_force_optimum_within_budget(seed):
    rng = np.random.default_rng(seed)
    numel = rng.integers(100, 2000, 6)
    per_param = np.array([2.13, 2.5, 3.13, 3.5, 4.13])
    stored = np.ceil(numel[:, None] * per_param[None, :]).astype(np.int64) + rng.integers(0, 40, (6, 5))
    costs = rng.random((6, 5)) * np.array([16.0, 9, 4, 2, 1]) * rng.random((6, 1)) * 10
    budget = float(rng.uniform(2.3, 4.0))
    allocation = bit_allocation.allocate(costs, stored, numel, budget)
    best, choice = bit_allocation.brute_force(costs, stored, numel, budget)
    assert allocation.status == "optimal"
    assert allocation.objective == pytest.approx(best, rel=1e-9)
    assert allocation.bits == int(stored[np.arange(6), allocation.choice].sum()) <= budget * numel.sum()
    assert allocation.choice == choice or allocation.objective == pytest.approx(best, rel=1e-12)


def test_allocation_meets_a_budget_hit_exactly_and_refuses_an_impossible_one():
    numel = np.array([100, 100])
    stored = np.array([[200, 300], [200, 300]])
    costs = np.array([[4.0, 1.0], [3.0, 1.0]])
    allocation = bit_allocation.allocate(costs, stored, numel, 2.5)  # exactly one matrix at 3 bits fits
    assert allocation.choice == [1, 0] and allocation.bits == 500 and allocation.bits_per_param == 2.5
    with pytest.raises(CompressorError, match="below the cheapest"):
        bit_allocation.allocate(costs, stored, numel, 1.99)


# --- the compressor --------------------------------------------------------------------------------------


def lq_recipe(text: str | None = None, **config) -> recipes.Recipe:
    settings = {"budget": 3.0, "rank": 4, "bits": [2, 3, 4], "block_size": [16, 64], **config}
    data = {"steps": [{"method": "lqlora", "config": settings}]}
    if text is not None:
        data["calibration"] = {"dataset": text, "n_samples": 4, "seq_len": 32, "batch_size": 2}
    return recipes.parse(data)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def lq_output(tmp_path_factory, model_dirs):
    """One LQ-LoRA output of the tiny Llama at 3.0 bits, rank 4 (errors not cached)."""
    out = tmp_path_factory.mktemp("lqlora") / "out"
    summary = api.compress(str(model_dirs["llama"]), lq_recipe(error_cache="off"), out, progress=False)
    return out, summary


def test_side_by_side_decompositions_equal_one_at_a_time(model_dirs, tmp_path, monkeypatch):
    """The pricing's pairs and a layer's walk decompositions on two worker threads (``parallel_groups``) give the
    output of the same run with every decomposition one after another on one thread."""
    import torch
    from safetensors.torch import load_file

    from compressor.methods.lqlora import LQLoRA

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # map_serial: two workers
        api.compress(str(model_dirs["llama"]), lq_recipe(error_cache="off"), tmp_path / "two", progress=False)
        monkeypatch.setattr(LQLoRA, "parallel_groups", False)
        torch.set_num_threads(1)  # one worker, and the walk's groups one at a time
        api.compress(str(model_dirs["llama"]), lq_recipe(error_cache="off"), tmp_path / "one", progress=False)
    finally:
        torch.set_num_threads(threads)
    side_by_side = load_file(str(tmp_path / "two" / "model.safetensors"))
    one_by_one = load_file(str(tmp_path / "one" / "model.safetensors"))
    assert side_by_side.keys() == one_by_one.keys()
    assert all(torch.equal(side_by_side[key], one_by_one[key]) for key in side_by_side)


def read_log(out) -> list[dict]:
    return [json.loads(line) for line in (out / io.LOG).read_text().splitlines()]


def test_budget_is_met_as_stored_and_recorded_per_matrix(lq_output):
    out, summary = lq_output
    manifest = io.read_manifest(out)
    decision = manifest["plan"][0]["decision"]
    log = read_log(out)
    assert decision["status"] == "optimal" and len(decision["grid"]) == 6
    stored = sum(e["quantized_bits"] for e in log)
    weights = sum(e["shape"][0] * e["shape"][1] for e in log)
    assert decision["bits_stored"] == stored and decision["weights"] == weights
    assert decision["bits_per_weight"] == stored / weights <= 3.0
    assert decision["bits_per_weight"] > 2.9  # the budget is spent, not left over
    assert len({e["nf_config"] for e in log}) > 1  # the program mixes configurations
    for e in log:
        assert e["kind"] == "compensated" and e["rank"] == 4
        assert decision["matrices"][e["name"]]["config"] == e["nf_config"]
        assert decision["matrices"][e["name"]]["bits_per_weight"] == e["bits_per_weight"]
        assert e["allocated_error"] == e["lq_error"]  # the module built is the decomposition the program priced
        assert e["rel_lq_error"] < e["rel_quant_only_error"]
        assert e["rel_error"] == pytest.approx(e["rel_lq_error"], rel=1e-5)
    (step,) = manifest["steps"]
    assert step["kind"] == "quantization" and step["quantized_bits_per_weight"] == decision["bits_per_weight"]
    assert step["bits_per_weight"] > step["quantized_bits_per_weight"]  # the factors and biases on top


def test_reload_gives_identical_logits_and_peft_over_the_dequantized_base_agrees(lq_output, ids):
    peft = pytest.importorskip("peft")
    out, summary = lq_output
    ours = io.load(out)
    assert torch.equal(logits(summary["model"], ids), logits(ours, ids))
    compensated = {n: m for n, m in ours.named_modules() if isinstance(m, CompensatedLinear)}
    assert len(compensated) == 14 and all(isinstance(m.base, NormalFloatLinear) for m in compensated.values())
    manifest = io.read_manifest(out)
    assert manifest["serving"]["adapter"] == "adapter" and "normal_float" in manifest["serving"]["note"]
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 4
    base = io.dequantized_base(out)
    assert not any(isinstance(m, (CompensatedLinear, NormalFloatLinear)) for m in base.modules())
    name = "model.layers.0.mlp.down_proj"
    torch.testing.assert_close(base.get_submodule(name).weight, compensated[name].base.dense_weight())
    adapted = peft.PeftModel.from_pretrained(base, out / "adapter")
    torch.testing.assert_close(logits(adapted, ids), logits(ours, ids), atol=1e-4, rtol=1e-4)


def test_inspect_shows_bits_per_matrix(lq_output):
    out, _ = lq_output
    result = CliRunner().invoke(app, ["inspect", str(out)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    first = read_log(out)[0]
    assert "bits" in result.stdout and f"{first['bits_per_weight']:.3f}" in result.stdout
    assert "NormalFloat-quantized" in result.stdout and "bits per weight in the quantized part" in result.stdout


def test_cli_compress_and_reload(tmp_path, model_dirs, ids, cache):
    """The shipped recipe from the command line (its grid and rank scaled to the tiny model); the reloaded
    output gives the logits of the same recipe compressed in this process."""
    overrides = ["lqlora.rank=4", "lqlora.block_size=[32, 64]", "lqlora.iterations=20"]
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["compress", str(model_dirs["qwen2"]), "--recipe", "lqlora-2.75bit-r64",
                                      *[arg for o in overrides for arg in ("--set", o)], "--out", str(out)],
                                env={"COLUMNS": "250", "HF_HUB_OFFLINE": "1"})
    assert result.exit_code == 0, result.output
    assert "bits per weight in the quantized part" in result.stdout
    decision = io.read_manifest(out)["plan"][0]["decision"]
    assert decision["budget"] == 2.75 and 2.6 < decision["bits_per_weight"] <= 2.75
    in_process = api.compress(str(model_dirs["qwen2"]), recipes.load("lqlora-2.75bit-r64", overrides),
                              tmp_path / "api", progress=False)
    assert torch.equal(logits(io.load(out), ids), logits(in_process["model"], ids))


def test_merge_writes_q_plus_l1l2_as_plain_weights(tmp_path, model_dirs, ids):
    from transformers import AutoModelForCausalLM

    recipe = lq_recipe(error_cache="off", iterations=10)
    api.compress(str(model_dirs["llama"]), recipe, tmp_path / "packed", progress=False)
    api.compress(str(model_dirs["llama"]), recipe, tmp_path / "merged", merge=True, progress=False)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(merged, ids), logits(io.load(tmp_path / "packed"), ids), atol=1e-5, rtol=1e-5)


def test_a_second_budget_reuses_every_cached_error(tmp_path, model_dirs, cache):
    first = api.compress(str(model_dirs["llama"]), lq_recipe(), tmp_path / "a", progress=False)
    second = api.compress(str(model_dirs["llama"]), lq_recipe(budget=2.5), tmp_path / "b", progress=False)
    made, reused = (s["plan"].steps[0].decision.record["error_cache"] for s in (first, second))
    assert made == {"hits": 0, "computed": 14 * 6} and reused == {"hits": 14 * 6, "computed": 0}
    assert len(list((cache / "lqlora").glob("*.json"))) == 14
    bits = [s["plan"].steps[0].decision.record["bits_per_weight"] for s in (first, second)]
    assert bits[1] <= 2.5 < bits[0] <= 3.0


def test_fisher_variant_and_quantization_alone(tmp_path, model_dirs, small_text, ids, cache):
    fisher = api.compress(str(model_dirs["llama"]), lq_recipe(small_text, weighting="fisher", checkpointing=False),
                          tmp_path / "fisher", progress=False)
    record = fisher["plan"].steps[0].decision.record
    assert record["weighting"] == "fisher" and record["fisher_cache"] == "computed"
    assert all(e["weighting"] == "fisher" and e["allocated_error"] == e["lq_error"] for e in fisher["log"])
    alone = api.compress(str(model_dirs["llama"]), lq_recipe(budget=None, rank=0, bits=[3], block_size=[64]),
                         tmp_path / "nf3", progress=False)
    modules = [m for m in alone["model"].modules() if isinstance(m, NormalFloatLinear)]
    assert len(modules) == 14 and not any(isinstance(m, CompensatedLinear) for m in alone["model"].modules())
    assert io.read_manifest(tmp_path / "nf3")["serving"]["adapter"] is None
    assert torch.equal(logits(io.load(tmp_path / "nf3"), ids), logits(alone["model"], ids))
    shapes = [e["shape"] for e in alone["log"]]
    exact = sum(nf.stored_bits(nf.NFConfig(3, 64), m * n) for m, n in shapes) / sum(m * n for m, n in shapes)
    assert alone["steps"][0]["quantized_bits_per_weight"] == exact
    assert 3.127 < exact < 3.14  # 3 + 8/64 + 32/(64·256), plus the offset and a partial group per matrix


@pytest.mark.parametrize("config, message", [
    ({"budget": 1.5}, "below the cheapest configuration"),
    ({"rank": 100}, "rank 100 is larger than min"),
    ({"budget": None}, "needs a budget"),
    ({"bits": [1]}, "bits must be one of"),
    ({"scale_dtype": ["fp8"]}, "scale_dtype must be one of"),
    ({"budg": 3}, "unknown key 'budg'"),
])
def test_bad_configs_are_one_line_errors_before_any_weight_is_read(model_dirs, tmp_path, config, message):
    with pytest.raises(CompressorError, match=message) as caught:
        api.compress(str(model_dirs["llama"]), lq_recipe(**config), tmp_path / "bad", progress=False)
    assert "\n" not in str(caught.value) and not (tmp_path / "bad").exists()
