"""Rank rules: the ratio formula, LoRD's rank reduction, explicit ranks, break-even, model_ratio."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, build_config
from transformers import AutoModelForCausalLM

from compressor.contract import Group, LayerContext, ModelView, Target
from compressor.errors import CompressorError
from compressor.methods.lord import LoRD, LoRDConfig
from compressor.plan import recipe as recipes
from compressor.plan.compile import compile_plan
from compressor.ranks import uniform as ranks


@pytest.mark.parametrize("m, n, ratio, expected", [
    (4096, 4096, 0.2, 1638),  # SVD-LLM, LLaMA-7B attention
    (4096, 11008, 0.2, 2388),  # SVD-LLM, LLaMA-7B MLP
    (11008, 4096, 0.2, 2388),
    (4096, 4096, 0.4, 1228),
    (64, 64, 0.2, 25),
    (128, 64, 0.2, 34),
])
def test_ratio_formula(m, n, ratio, expected):
    config = LoRDConfig(ratio=ratio)
    assert ranks.rank_for(config, m, n) == expected
    rank = expected
    assert ranks.saves_parameters(rank, m, n)
    removed = 1 - rank * (m + n) / (m * n)
    assert removed == pytest.approx(ratio, abs=(m + n) / (m * n) + 1e-12)  # within one rank of the target


def test_default_rule_is_ratio_0_2():
    config = LoRDConfig()
    assert config.rule == "ratio" and config.ratio == 0.2


@pytest.mark.parametrize("m, n, reduction, expected", [
    (4096, 4096, 0.5, 2048), (64, 128, 0.5, 32), (64, 128, 0.0, 64), (64, 128, 0.9, 6), (64, 128, 0.999, 1),
])
def test_rank_reduction(m, n, reduction, expected):
    assert ranks.rank_for(LoRDConfig(rank_reduction=reduction), m, n) == expected


def test_explicit_rank_and_too_large():
    assert ranks.rank_for(LoRDConfig(rank=16), 64, 128) == 16
    assert ranks.rank_for(LoRDConfig(rank=64), 64, 128) == 64
    with pytest.raises(CompressorError, match="larger than min"):
        ranks.rank_for(LoRDConfig(rank=65), 64, 128)


def test_plan_checks_explicit_rank_before_any_work():
    """compile_plan validates an explicit rank against every targeted shape from module names and shapes
    alone: a tiny Llama on the meta device (no weights at all) is enough to reject it."""
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(build_config("llama", VOCAB), dtype=torch.float32)
    recipe = recipes.parse({"steps": [{"method": "lord", "config": {"rank": 100}}]})
    with pytest.raises(CompressorError, match="rank 100") as info:
        compile_plan(recipe, skeleton)
    assert "step 0 (lord)" in str(info.value) and "larger than min" in str(info.value)
    # a rank that fits the targeted shapes (k/v are 32 × 64 under GQA) compiles
    fits = recipes.parse({"steps": [{"method": "lord", "config": {"rank": 32}}]})
    assert len(compile_plan(fits, skeleton).steps[0].shapes) == 14
    # and the check is on the targeted shapes only: q/o are 64 × 64
    targeted = recipes.parse({"steps": [{"method": "lord", "config": {"rank": 64},
                                         "targets": ["q_proj", "o_proj"]}]})
    assert len(compile_plan(targeted, skeleton).steps[0].shapes) == 4


@pytest.mark.parametrize("bad", [dict(ratio=0.2, rank=4), dict(ratio=1.0), dict(ratio=-0.1),
                                 dict(rank=0), dict(rank_reduction=1.5), dict(model_ratio=1.0)])
def test_bad_rules_are_rejected(bad):
    with pytest.raises(ValueError):
        LoRDConfig(**bad)


def test_break_even():
    assert ranks.break_even(64, 64) == 32
    assert ranks.saves_parameters(31, 64, 64)
    assert not ranks.saves_parameters(32, 64, 64)
    assert not ranks.saves_parameters(64, 64, 64)


def _target(m: int, n: int) -> Target:
    weight = torch.randn(m, n)
    module = torch.nn.Linear(n, m, bias=False)
    return Target("model.layers.0.mlp.down_proj", module, weight, weight, None, None)


def _compress(config: LoRDConfig, target: Target):
    """LoRD's two hooks on one linear: ``decide`` (the ranks, from the shapes) then ``compress``."""
    m, n = target.weight.shape
    lord = LoRD(config)
    view = ModelView(target.module, {target.name: (m, n)}, m * n, None, torch.device("cpu"))
    decision = lord.decide(view)
    assert decision.targets is None and decision.record["ranks"] == decision.ranks
    ctx = LayerContext(0, 1, torch.device("cpu"), torch.float32)
    target.decision = decision  # what the pipeline hands every target of the step
    outcomes = lord.compress(Group("linear", target.name, {"linear": target}, None, {}, decision=decision), ctx)
    assert set(outcomes) == {target.name}
    return outcomes[target.name]


def test_break_even_keeps_dense():
    for config in (LoRDConfig(rank_reduction=0.0), LoRDConfig(rank=32), LoRDConfig(rank_reduction=0.5)):
        outcome = _compress(config, _target(64, 64))
        assert outcome.module is None  # rank 64, 32, 32 ≥ break-even 32
        assert "break-even" in outcome.note
    outcome = _compress(LoRDConfig(rank=31), _target(64, 64))
    assert outcome.module is not None and outcome.rank == 31


def _removed(ratio: float, shapes: list[tuple[int, int]]) -> int:
    total = 0
    for m, n in shapes:
        rank = ranks.rank_for(LoRDConfig(ratio=ratio), m, n)
        if ranks.saves_parameters(rank, m, n):
            total += m * n - rank * (m + n)
    return total


@pytest.mark.parametrize("target", [0.05, 0.1, 0.25])
def test_model_ratio_planning_meets_the_target(target):
    # a LLaMA-7B-like layer stack and a model with embeddings outside the targets
    shapes = [(4096, 4096)] * 4 * 4 + [(11008, 4096), (4096, 11008), (11008, 4096)] * 4
    model_params = int(sum(m * n for m, n in shapes) / 0.9)
    ratio = ranks.plan_model_ratio(target, shapes, model_params)
    removed = _removed(ratio, shapes)
    assert removed >= target * model_params
    assert removed <= target * model_params * 1.01  # and not much more: the smallest ratio that does it
    assert _removed(ratio - 0.005, shapes) < target * model_params


def test_model_ratio_out_of_reach():
    with pytest.raises(CompressorError, match="out of reach"):
        ranks.plan_model_ratio(0.5, [(64, 64)], 64 * 64 * 10)


def test_model_ratio_needs_a_plan():
    with pytest.raises(CompressorError, match="plan"):
        ranks.rank_for(LoRDConfig(model_ratio=0.2), 64, 64)
