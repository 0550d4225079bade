"""The loss rank rule: the Lagrangian allocation is optimal for the budget it reaches (brute force over every
rank combination of small matrices), spends rank where spectra decay slowly, and drives LoRD end to end."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import run_steps

from compressor.errors import CompressorError
from compressor.ranks import loss as loss_rule


def spectra_and_shapes():
    torch.manual_seed(0)
    shapes = {"a": (8, 12), "b": (8, 12), "c": (5, 9)}
    decay = {"a": 0.3, "b": 0.9, "c": 0.6}
    spectra = {name: (torch.rand(min(s)) + 0.5) * decay[name] ** torch.arange(min(s), dtype=torch.float64)
               for name, s in shapes.items()}
    return {n: v.sort(descending=True).values for n, v in spectra.items()}, shapes


def candidates(spectrum, shape, normalize=True):
    """Every (params, relative or absolute loss) option of one matrix: ranks below break-even, then dense."""
    m, n = shape
    energy = spectrum.double().square()
    scale = energy.sum() if normalize else 1.0
    options = [(r * (m + n), float(energy[r:].sum() / scale), r) for r in range(1, min(m, n) + 1)
               if r * (m + n) < m * n]
    return options + [(m * n, 0.0, None)]


@pytest.mark.parametrize("fraction", [0.2, 0.4, 0.6])
def test_allocation_is_optimal_for_the_budget_it_reaches(fraction):
    spectra, shapes = spectra_and_shapes()
    before = sum(m * n for m, n in shapes.values())
    solved = loss_rule.allocate(spectra, shapes, fraction * before)
    assert solved["removed_params"] >= fraction * before
    options = [candidates(spectra[name], shapes[name]) for name in shapes]
    best = min(sum(o[1] for o in combo) for combo in itertools.product(*options)
               if before - sum(o[0] for o in combo) >= solved["removed_params"])
    assert solved["total_loss"] == pytest.approx(best, abs=1e-12)
    chosen = dict(zip(shapes, (next(o for o in opts if o[2] == solved["ranks"][name])
                               for name, opts in zip(shapes, options))))
    assert sum(o[1] for o in chosen.values()) == pytest.approx(solved["total_loss"], abs=1e-12)
    # of two matrices of one shape, the fast-decaying spectrum ("a") keeps less rank than the flat one ("b")
    ranks = {n: (r if r is not None else min(shapes[n])) / min(shapes[n]) for n, r in solved["ranks"].items()}
    assert ranks["a"] < ranks["b"]


@pytest.mark.parametrize("fraction", [0.2, 0.5])
def test_absolute_allocation_is_optimal_and_sees_scale(fraction):
    spectra, shapes = spectra_and_shapes()
    spectra["b"] = spectra["b"] * 10  # "b" matters 100× more in absolute loss
    before = sum(m * n for m, n in shapes.values())
    solved = loss_rule.allocate(spectra, shapes, fraction * before, normalize=False)
    options = [candidates(spectra[name], shapes[name], normalize=False) for name in shapes]
    best = min(sum(o[1] for o in combo) for combo in itertools.product(*options)
               if before - sum(o[0] for o in combo) >= solved["removed_params"])
    assert solved["total_loss"] == pytest.approx(best, rel=1e-12)
    relative = loss_rule.allocate(spectra, shapes, fraction * before)
    assert relative["ranks"] == loss_rule.allocate(spectra_and_shapes()[0], shapes, fraction * before)["ranks"]
    rank_of = {n: r if r is not None else min(shapes[n]) for n, r in solved["ranks"].items()}
    relative_rank_of = {n: r if r is not None else min(shapes[n]) for n, r in relative["ranks"].items()}
    assert rank_of["b"] >= relative_rank_of["b"]  # the scaled matrix keeps at least as much rank


def test_out_of_reach_budget_is_refused():
    spectra, shapes = spectra_and_shapes()
    with pytest.raises(CompressorError, match="cannot remove"):
        loss_rule.allocate(spectra, shapes, 0.99 * sum(m * n for m, n in shapes.values()))


def test_lord_with_the_loss_rule(llama, batches):
    report = run_steps(llama, [{"method": "lord", "config": {"ratio": 0.3, "whiten": "gram", "rank_rule": "loss"}}],
                       batches)
    decision = report.plan.steps[0].decision.record
    before = sum(e["params_before"] for e in report.log)
    after = sum(e["params_after"] for e in report.log)
    assert before - after == decision["removed_params"] >= 0.3 * before
    ranks = {e["name"]: e["rank"] for e in report.log}
    assert ranks == decision["ranks"] and len(set(ranks.values())) > 2  # non-uniform
    with pytest.raises(CompressorError, match="rank_rule loss needs a parameter budget"):
        run_steps(llama, [{"method": "lord", "config": {"rank": 4, "rank_rule": "loss"}}], batches)


def test_two_sided_factors_minimize_the_row_and_input_weighted_error():
    from compressor.kernels import linalg
    from compressor.methods.lord import lord_factors

    torch.manual_seed(1)
    weight = torch.randn(12, 10, dtype=torch.float64)
    x = torch.randn(200, 10, dtype=torch.float64) * torch.linspace(0.2, 3, 10)
    rows = torch.rand(12, dtype=torch.float64) * 5 + 0.1
    whitening = linalg.from_gram(x.T @ x, "cholesky")

    def weighted(approx):  # ‖diag(rows) (W − Ŵ) Xᵀ‖
        return float((rows[:, None] * (weight - approx) @ x.T).norm())

    up, down = lord_factors(weight, 4, whitening, torch.float64, rows)
    spectrum = torch.linalg.svdvals(rows[:, None] * weight @ x.T)  # the weighted problem's own spectrum
    assert weighted(up @ down) == pytest.approx(float(spectrum[4:].square().sum().sqrt()), rel=1e-9)
    plain_up, plain_down = lord_factors(weight, 4, whitening, torch.float64)
    assert weighted(up @ down) < weighted(plain_up @ plain_down)


def test_lord_with_output_weights_from_the_fisher(llama, batches):
    config = {"ratio": 0.3, "whiten": "gram", "output_weight": "fisher", "fisher_cache": "off"}
    report = run_steps(llama, [{"method": "lord", "config": config}], batches)
    decision = report.plan.steps[0].decision.record
    assert decision["output_weight"] == "fisher" and decision["fisher_cache"] == "computed"
    assert all(e["kind"] == "low_rank" for e in report.log)
    fresh = __import__("conftest").build_model("llama", llama.config.vocab_size)
    loss = run_steps(fresh, [{"method": "lord", "config": {**config, "rank_rule": "loss"}}], batches)
    assert loss.plan.steps[0].decision.record["rank_rule"] == "loss"
    fresh = __import__("conftest").build_model("llama", llama.config.vocab_size)
    absolute = run_steps(fresh, [{"method": "lord", "config": {**config, "rank_rule": "loss",
                                                                 "loss_scale": "absolute"}}], batches)
    record = absolute.plan.steps[0].decision.record
    assert record["loss_scale"] == "absolute" and record["removed_params"] >= loss.plan.steps[0].decision.record[
        "removed_params"] * 0.99


def test_loss_scale_needs_the_loss_rule():
    from compressor.methods.lord import LoRDConfig

    with pytest.raises(ValueError, match="rank_rule: loss"):
        LoRDConfig(ratio=0.2, loss_scale="absolute")


def test_shipped_lord_fisher_recipe(model_dirs, tmp_path, small):
    from compressor import api

    summary = api.compress(str(model_dirs["llama"]), "lord-fisher", tmp_path / "out", progress=False,
                           overrides=[*small, "steps.0.config.fisher_cache=off"])
    decision = summary["plan"].decisions()[0]["decision"]
    assert decision["rank_rule"] == "loss" and decision["loss_scale"] == "absolute"
    assert decision["output_weight"] == "fisher"
    assert summary["params_after"] < summary["params_before"]
    assert summary["plan"].walk_streams() == ["default", "default.reference"]  # the refit's reference stream
