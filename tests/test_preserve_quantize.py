"""SRR's preserve-then-quantize (quantize ``preserve_rank``, then eora filling the one low-rank path): k = 0 is
today's quantization bit for bit, the chain beats EoRA at the same total rank on a matrix whose whitened
spectrum has a few dominant directions, the closed-form criterion equals the measured error, and the output
reloads with identical logits at EoRA's rank and bytes."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import logits, small_recipe
from test_quantize import correlated_inputs

from compressor import api, io
from compressor.contract import LayerContext, Target
from compressor.errors import CompressorError
from compressor.kernels import linalg, quant
from compressor.kernels.hessian import hessian, inverse_hessian_factor
from compressor.methods.eora import EoRA, EoRAConfig
from compressor.methods.quantize import Quantize, QuantizeConfig, compensated_error, gptq
from compressor.model.modules import CompensatedLinear, QuantizedLinear
from compressor.stats.accumulators import TensorStats


def dominated_weight(m: int = 48, n: int = 64, spikes: int = 3, seed: int = 0) -> torch.Tensor:
    """(m, n) noise plus ``spikes`` rank-one directions 30× larger: a few dominant singular directions."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(m, n, generator=g) * 0.05
    dominant = torch.randn(m, spikes, generator=g) @ torch.randn(spikes, n, generator=g) / spikes ** 0.5
    return noise + 1.5 * dominant


def target_of(weight: torch.Tensor, x: torch.Tensor, module=None, original=None) -> Target:
    stats = TensorStats(n_tokens=x.shape[0], gram=x.double().T @ x.double())
    current = weight if module is None else module.dense_weight().float()
    return Target("layer.linear", module if module is not None else torch.nn.Linear(1, 1), current.clone(),
                  original if original is not None else weight, None, stats)


def ctx() -> LayerContext:
    return LayerContext(0, 1, torch.device("cpu"), torch.float32)


def chain_error(weight, x, quantize: dict, rank: int) -> tuple[float, torch.nn.Module]:
    """Quantize then EoRA on one matrix, as the pipeline chains them; the output error ‖(W − Ŵ) Xᵀ‖_F."""
    first = Quantize(QuantizeConfig(**quantize)).compress_linear(target_of(weight, x), ctx())
    second = EoRA(EoRAConfig(rank=rank)).compress_linear(target_of(weight, x, first.module), ctx())
    module = second.module if second.module is not None else first.module
    return float(((weight - module.dense_weight().detach().float()) @ x.T).norm()), module


@pytest.mark.parametrize("algorithm", ["rtn", "gptq"])
def test_preserve_rank_zero_is_plain_quantization_bit_for_bit(algorithm):
    torch.manual_seed(0)
    weight, x = torch.randn(40, 64), correlated_inputs(300, 64)
    config = QuantizeConfig(algorithm=algorithm, bits=3, group_size=16, act_order=True)
    outcome = Quantize(config).compress_linear(target_of(weight, x), ctx())
    assert isinstance(outcome.module, QuantizedLinear) and "preserved_rank" not in outcome.extra
    if algorithm == "rtn":
        q, scale, zero = quant.rtn(weight, 3, False, 16, torch.float32)
    else:
        h = hessian(x.double().T @ x.double(), x.shape[0])
        perm = torch.argsort(torch.diagonal(h), descending=True)
        upper, dead = inverse_hessian_factor(h[perm][:, perm], 0.01)
        q, scale, zero = gptq(weight, upper, dead[torch.argsort(perm)], 3, False, 16, perm, 128, torch.float32)
    expected = QuantizedLinear.from_integers(q, scale, zero, 3, 16, False, None)
    assert torch.equal(outcome.module.weight_packed, expected.weight_packed)
    assert torch.equal(outcome.module.weight_scale, expected.weight_scale)
    # an isotropic weight: auto prices every split and keeps k = 0, the same plain module
    auto = QuantizeConfig(algorithm=algorithm, bits=3, group_size=16, act_order=True, preserve_rank="auto",
                          preserve_budget=8)
    chosen = Quantize(auto).compress_linear(target_of(weight, x), ctx())
    assert chosen.extra["preserved_rank"] == 0 and isinstance(chosen.module, QuantizedLinear)
    assert torch.equal(chosen.module.weight_packed, expected.weight_packed)


def test_criterion_is_the_measured_error_of_the_chain():
    weight, x = dominated_weight(), correlated_inputs(400, 64, seed=1)
    config = {"algorithm": "gptq", "bits": 3, "group_size": 16, "preserve_rank": "auto", "preserve_budget": 8}
    first = Quantize(QuantizeConfig(**config)).compress_linear(target_of(weight, x), ctx())
    errors = {int(k): e for k, e in first.extra["preserve_errors"].items()}
    assert sorted(errors) == [0, 2, 4, 6, 8] and first.extra["preserved_rank"] == min(errors, key=errors.get)
    for k in errors:  # each candidate's priced error is what quantize(k) + eora(8) leaves, measured
        measured, module = chain_error(weight, x, {**config, "preserve_rank": k}, 8)
        assert module.rank == 8
        assert measured == pytest.approx(errors[k], rel=1e-3)


def test_preserve_then_quantize_beats_eora_at_the_same_rank():
    """A few dominant whitened directions: quantizing them costs more than 16-bit factors save."""
    weight, x = dominated_weight(), correlated_inputs(400, 64, seed=1)
    gram = x.double().T @ x.double()
    for algorithm in ("rtn", "gptq"):
        base = {"algorithm": algorithm, "bits": 3, "group_size": 16}
        eora, eora_module = chain_error(weight, x, base, 8)
        srr, srr_module = chain_error(weight, x, {**base, "preserve_rank": "auto", "preserve_budget": 8}, 8)
        fixed, _ = chain_error(weight, x, {**base, "preserve_rank": 4}, 8)
        assert srr < 0.8 * eora and fixed < eora
        assert isinstance(srr_module, CompensatedLinear) and srr_module.rank == eora_module.rank == 8
        # the same criterion in closed form: relative_error under the Gram
        assert linalg.relative_error(weight, srr_module.dense_weight(), gram) < \
            linalg.relative_error(weight, eora_module.dense_weight(), gram)


def test_compensated_error_is_the_best_rank_r_residual():
    torch.manual_seed(2)
    residual, x = torch.randn(20, 32), correlated_inputs(200, 32)
    whitening = linalg.eigh(x.double().T @ x.double(), cutoff=0.0)
    up, down, _ = linalg.whitened_svd(residual, 5, whitening)
    direct = float(((residual.double() - up @ down) @ x.double().T).norm())
    assert compensated_error(residual, whitening, 5) == pytest.approx(direct, rel=1e-8)
    assert compensated_error(residual, whitening, 0) == pytest.approx(float((residual @ x.T).norm()), rel=1e-5)


def test_config_and_chain_checks():
    with pytest.raises(ValueError, match="needs preserve_budget"):
        QuantizeConfig(preserve_rank="auto")
    with pytest.raises(ValueError, match="larger than preserve_budget"):
        QuantizeConfig(preserve_rank=16, preserve_budget=8)
    with pytest.raises(ValueError, match="≥ 0"):
        QuantizeConfig(preserve_rank=-1)
    with pytest.raises(ValueError, match="larger than min"):
        QuantizeConfig(preserve_rank=40).validate({"a": (32, 64)})
    assert QuantizeConfig(preserve_rank="auto", preserve_budget=64).candidates() == [0, 16, 32, 48, 64]
    weight, x = dominated_weight(), correlated_inputs(400, 64, seed=1)
    first = Quantize(QuantizeConfig(bits=3, group_size=16, preserve_rank=8)).compress_linear(target_of(weight, x), ctx())
    with pytest.raises(CompressorError, match="less than the rank 8"):
        EoRA(EoRAConfig(rank=4)).compress_linear(target_of(weight, x, first.module), ctx())
    same = EoRA(EoRAConfig(rank=8)).compress_linear(target_of(weight, x, first.module), ctx())
    assert same.module is first.module and same.rank == 8 and "already has rank 8" in same.note


def recipe(text: str, preserve: dict | None, rank: int = 8):
    quantize = {"algorithm": "gptq", "bits": 3, "group_size": 32, **(preserve or {})}
    return small_recipe({"propagate": "compressed", "statistics": "once", "steps": [
        {"method": "quantize", "config": quantize}, {"method": "eora", "config": {"rank": rank}}]}, text)


def test_output_reloads_with_identical_logits_at_eoras_rank_and_bytes(tmp_path, model_dirs, ids, small_text):
    model_dir = str(model_dirs["llama"])
    plain = api.compress(model_dir, recipe(small_text, None), tmp_path / "eora", progress=False)
    srr = api.compress(model_dir, recipe(small_text, {"preserve_rank": "auto", "preserve_budget": 8}),
                       tmp_path / "srr", progress=False)
    assert torch.equal(logits(srr["model"], ids), logits(io.load(tmp_path / "srr"), ids))
    specs = {name: io.read_manifest(tmp_path / out)["modules"] for name, out in (("eora", "eora"), ("srr", "srr"))}
    assert specs["srr"].keys() == specs["eora"].keys()
    for name, spec in specs["srr"].items():
        assert spec["kind"] == "compensated" and spec["rank"] == 8 == specs["eora"][name]["rank"]
    sizes = {out: sum(p.numel() * p.element_size() for p in summary["model"].state_dict().values())
             for out, summary in (("eora", plain), ("srr", srr))}
    assert sizes["srr"] == sizes["eora"]
    log = [json.loads(line) for line in (tmp_path / "srr" / io.LOG).read_text().splitlines()]
    chosen = [e["preserved_rank"] for e in log if e["method"] == "quantize"]
    assert chosen and set(chosen) <= {0, 2, 4, 6, 8}
    carried = {e["name"]: e.get("carried_rank", 0) for e in log if e["method"] == "eora"}
    assert [carried[e["name"]] for e in log if e["method"] == "quantize"] == chosen
