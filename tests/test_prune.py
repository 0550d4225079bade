"""Pruning: the N:M pattern holds exactly, unstructured sparsity is met, SparseGPT beats Wanda on the
calibration inputs, and EoRA compensates pruning in a chained recipe."""

from __future__ import annotations

import pytest
import torch
from conftest import logits, small_recipe
from test_quantize import correlated_inputs, output_error

from compressor import api, io
from compressor.kernels.hessian import hessian, inverse_hessian_factor
from compressor.methods.eora import eora_factors
from compressor.methods.prune import PruneConfig, lowest_in_groups, sparsegpt, wanda_mask


def assert_n_m(weight: torch.Tensor, keep: int = 2, group: int = 4) -> None:
    groups = weight.reshape(weight.shape[0], -1, group)
    assert bool(((groups != 0).sum(-1) <= keep).all())


def _sparsegpt(weight, x, n_m=(2, 4), sparsity=0.5, block_size=32):
    upper, dead = inverse_hessian_factor(hessian(x.double().T @ x.double(), x.shape[0]), 0.01)
    return sparsegpt(weight, upper, dead, n_m, sparsity, block_size)


def test_lowest_in_groups():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.5, 0.1, 9.0, 8.0]])
    mask = lowest_in_groups(scores, 2, 4)
    assert mask.tolist() == [[False, True, False, True, True, True, False, False]]


@pytest.mark.parametrize("algorithm", ["wanda", "sparsegpt"])
def test_two_of_four_pattern_holds_exactly(algorithm):
    torch.manual_seed(0)
    weight = torch.randn(24, 64)
    x = correlated_inputs(256, 64)
    if algorithm == "wanda":
        pruned = weight.masked_fill(wanda_mask(weight, x.square().sum(0), (2, 4), 0.5), 0.0)
    else:
        pruned = _sparsegpt(weight, x)
    assert_n_m(pruned)
    assert float((pruned == 0).float().mean()) == 0.5


def test_unstructured_sparsity_is_met():
    torch.manual_seed(1)
    weight = torch.randn(16, 64)
    x = correlated_inputs(256, 64)
    wanda = weight.masked_fill(wanda_mask(weight, x.square().sum(0), None, 0.5), 0.0)
    assert bool(((wanda == 0).sum(1) == 32).all())  # per output row
    pruned = _sparsegpt(weight, x, None, 0.5)
    assert abs(float((pruned == 0).float().mean()) - 0.5) < 0.01


@pytest.mark.parametrize("n_m", [(2, 4), None])
def test_sparsegpt_beats_wanda_on_the_calibration_inputs(n_m):
    torch.manual_seed(2)
    weight = torch.randn(48, 96)
    x = correlated_inputs(600, 96, seed=2)
    wanda = weight.masked_fill(wanda_mask(weight, x.square().sum(0), n_m, 0.5), 0.0)
    pruned = _sparsegpt(weight, x, n_m, 0.5)
    assert output_error(weight, pruned, x) < output_error(weight, wanda, x)


def test_eora_compensates_pruning_better_than_plain_svd():
    torch.manual_seed(3)
    weight = torch.randn(48, 96)
    x = correlated_inputs(600, 96, seed=3)
    pruned = _sparsegpt(weight, x)
    gram = x.double().T @ x.double()
    errors = {}
    for space, g in (("eigen", gram), ("weight", None)):
        up, down = eora_factors(weight - pruned, 8, g)
        errors[space] = output_error(weight, pruned + (up @ down).float(), x)
    assert errors["eigen"] <= errors["weight"] < output_error(weight, pruned, x)


def test_config_checks():
    bad_configs = ({"pattern": "4:2"}, {"pattern": "x"}, {"sparsity": 1.0},
                   {"pattern": "2:3", "block_size": 128})
    for bad in bad_configs:
        with pytest.raises(ValueError):
            PruneConfig(**bad)
    assert PruneConfig(pattern="unstructured").n_m is None


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pruned_and_compensated_model_round_trip(tmp_path, arch, model_dir, ids, small_text):
    recipe = small_recipe({"statistics": "once", "steps": [
        {"method": "prune", "config": {"algorithm": "sparsegpt", "pattern": "2:4", "block_size": 32}},
        {"method": "eora", "config": {"rank": 4}},
    ]}, small_text)
    model = api.compress(str(model_dir), recipe, tmp_path / "out", progress=False)["model"]
    bases = [m.base for m in model.modules() if hasattr(m, "lora")]
    assert bases
    for base in bases:
        weight = base.weight.T if type(base).__name__ == "Conv1D" else base.weight
        assert_n_m(weight.detach())
    assert torch.equal(logits(model, ids), logits(io.load(tmp_path / "out"), ids))
