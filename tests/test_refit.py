"""The output-matching refit (LoRD ``refit: outputs``): the reduced-rank regression from the inputs a module
now sees to the outputs it had in the original model; the paired statistics and the walk's reference stream
that feed it."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, run_steps

from compressor.kernels import linalg
from compressor.methods.lord import lord_factors
from compressor.stats.accumulators import Request, TensorStats


def problem(m=6, n=10, tokens=80, drift=0.3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=generator, dtype=torch.float64)  # original inputs (tokens, n)
    x_now = x + drift * torch.randn(tokens, n, generator=generator, dtype=torch.float64)  # after earlier compression
    weight = torch.randn(m, n, generator=generator, dtype=torch.float64)
    return x, x_now, weight


def misfit(weight, approx, x, x_now) -> float:
    """‖W X − Ŵ X̃‖_F: how far the compressed module's outputs are from the original model's."""
    return float((x @ weight.T - x_now @ approx.T).norm())


def test_full_rank_refit_is_the_least_squares_map():
    x, x_now, weight = problem()
    whitening = linalg.cholesky(x_now.T @ x_now)
    refit = linalg.output_refit(weight, x.T @ x_now, whitening)
    least_squares = torch.linalg.lstsq(x_now, x @ weight.T).solution.T  # argmin_M ‖X̃ Mᵀ − X Wᵀ‖
    torch.testing.assert_close(refit, least_squares, rtol=1e-9, atol=1e-9)
    up, down = lord_factors(refit, 6, whitening, torch.float64)  # rank min(m, n): the map itself
    torch.testing.assert_close(up @ down, least_squares, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("rank", [1, 3, 5])
def test_refit_is_the_reduced_rank_regression(rank):
    x, x_now, weight = problem()
    whitening = linalg.cholesky(x_now.T @ x_now)
    up, down = lord_factors(linalg.output_refit(weight, x.T @ x_now, whitening), rank, whitening, torch.float64)
    # the closed form of reduced-rank regression: project the least-squares fit Ŷ = X̃ M_lsᵀ on its top-r
    # right singular vectors V_r; the optimum is V_r V_rᵀ M_ls
    least_squares = torch.linalg.lstsq(x_now, x @ weight.T).solution.T  # (m, n)
    v = torch.linalg.svd(x_now @ least_squares.T, full_matrices=False).Vh[:rank].T  # (m, r)
    optimum = v @ v.T @ least_squares
    assert misfit(weight, up @ down, x, x_now) == pytest.approx(misfit(weight, optimum, x, x_now), rel=1e-9)
    plain_up, plain_down = lord_factors(weight, rank, whitening, torch.float64)  # SVD-LLM on X̃, targets W X̃
    assert misfit(weight, up @ down, x, x_now) < misfit(weight, plain_up @ plain_down, x, x_now)


def test_without_drift_the_refit_is_svd_llm():
    x, _, weight = problem()
    whitening = linalg.cholesky(x.T @ x)
    refit = linalg.output_refit(weight, x.T @ x, whitening)
    torch.testing.assert_close(refit, weight, rtol=1e-9, atol=1e-9)


def test_eigh_whitening_refits_through_the_pseudo_inverse():
    x, x_now, weight = problem()
    cholesky, eigh = linalg.cholesky(x_now.T @ x_now), linalg.eigh(x_now.T @ x_now)
    torch.testing.assert_close(linalg.output_refit(weight, x.T @ x_now, eigh),
                               linalg.output_refit(weight, x.T @ x_now, cholesky), rtol=1e-7, atol=1e-7)


def test_cross_gram_accumulates_the_paired_batches():
    x, x_now, _ = problem()
    stats = TensorStats()
    for start in range(0, 80, 32):  # three batches, uneven
        stats.add(x_now[start: start + 32].float(), frozenset({"gram", "cross_gram"}),
                  reference=x[start: start + 32].float())
    torch.testing.assert_close(stats.cross, (x.float().T @ x_now.float()).double(), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="reference"):
        TensorStats().add(x_now.float(), frozenset({"cross_gram"}))
    with pytest.raises(ValueError, match="input"):
        Request("cross_gram", where="output")


def test_refit_needs_the_gram():
    from compressor.methods.lord import LoRDConfig

    with pytest.raises(ValueError, match="whiten: gram"):
        LoRDConfig(whiten="activation", refit="outputs")


def final_hidden(model, batches):
    with torch.no_grad():
        return torch.cat([model(input_ids=ids, output_hidden_states=True).hidden_states[-1] for ids in batches])


def test_lord_refit_end_to_end(vocab_size, batches):
    dense = build_model("llama", vocab_size)
    reference = final_hidden(dense, batches)
    config = {"ratio": 0.4, "whiten": "gram"}
    plain, refit = build_model("llama", vocab_size), build_model("llama", vocab_size)
    plain_report = run_steps(plain, [{"method": "lord", "config": config}], batches)
    refit_report = run_steps(refit, [{"method": "lord", "config": {**config, "refit": "outputs"}}], batches)
    assert refit_report.plan.walk_streams() == ["default", "default.reference"]
    assert [e["rank"] for e in refit_report.log] == [e["rank"] for e in plain_report.log]  # same budget
    # layer 0 sees the original inputs: the refit is SVD-LLM there, to rounding
    first = plain.model.layers[0].self_attn.q_proj, refit.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(first[1].dense_weight(), first[0].dense_weight(), rtol=1e-4, atol=1e-5)
    later = plain.model.layers[-1].mlp.down_proj, refit.model.layers[-1].mlp.down_proj
    assert not torch.allclose(later[1].dense_weight(), later[0].dense_weight(), rtol=1e-3, atol=1e-4)
    # on the calibration data, the refit model's last hidden states are closer to the dense model's
    error = {name: float((final_hidden(model, batches) - reference).norm() / reference.norm())
             for name, model in (("plain", plain), ("refit", refit))}
    assert error["refit"] < error["plain"]


def test_refit_needs_its_step_to_see_the_original_layer(vocab_size, batches):
    from compressor.errors import CompressorError

    model = build_model("llama", vocab_size)
    steps = [{"method": "quantize", "config": {"algorithm": "rtn", "bits": 4, "group_size": 32}},
             {"method": "lord", "config": {"ratio": 0.3, "whiten": "gram", "refit": "outputs"},
              "targets": ["mlp.down_proj"]}]
    with pytest.raises(CompressorError, match="original model"):
        run_steps(model, steps, batches)


def test_a_refit_step_runs_in_four_stages_per_llama_layer(vocab_size, batches, monkeypatch):
    from compressor.pipeline import compress as walk_compress

    seen = []
    original = walk_compress.stages

    def recording(specs, stats):
        found = original(specs, stats)
        seen.append([[spec.name.rsplit(".", 1)[-1] for spec in stage] for stage in found])
        return found

    monkeypatch.setattr(walk_compress, "stages", recording)
    model = build_model("llama", vocab_size)
    run_steps(model, [{"method": "lord", "config": {"ratio": 0.3, "whiten": "gram", "refit": "outputs"}}], batches)
    assert seen[0] == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    assert len(seen) == model.config.num_hidden_layers


def test_refit_strength_interpolates_the_target():
    x, x_now, weight = problem()
    gram, cross = x_now.T @ x_now, x.T @ x_now
    whitening = linalg.cholesky(gram)
    half = linalg.output_refit(weight, 0.5 * cross + 0.5 * gram, whitening)
    # the least-squares map to the half-way target ½ (W X + W X̃)
    least_squares = torch.linalg.lstsq(x_now, 0.5 * (x @ weight.T + x_now @ weight.T)).solution.T
    torch.testing.assert_close(half, least_squares, rtol=1e-9, atol=1e-9)
    from compressor.methods.lord import LoRDConfig

    with pytest.raises(ValueError, match="refit_strength"):
        LoRDConfig(whiten="gram", refit="outputs", refit_strength=1.5)


def test_later_stages_stop_once_their_modules_have_run(vocab_size, batches):
    """The original layer runs once for every stage; each stage's forward stops where its modules are called: the
    q/k/v stage never reaches the MLP, gate/up and down stop inside it. Layer 0's MLP block is called, per batch:
    the reference pass (1), the gate/up stage (1), the down stage (1) and the walk's propagation (1) = 4, where
    a reference forward per stage and full forwards would make 9. Same outputs: scripts/golden.py compares them
    bit for bit."""
    model = build_model("llama", vocab_size)
    calls, attention = [], []
    model.model.layers[0].mlp.register_forward_pre_hook(lambda module, args: calls.append(1))
    model.model.layers[0].self_attn.register_forward_pre_hook(lambda module, args: attention.append(1))
    run_steps(model, [{"method": "lord", "config": {"ratio": 0.3, "whiten": "gram", "refit": "outputs"}}], batches)
    assert len(calls) == 4 * len(batches)
    assert len(attention) == 6 * len(batches)  # the reference pass, the four stages, the propagation


def test_every_linear_of_a_refit_layer_runs_once_per_batch(vocab_size, batches, monkeypatch):
    """Each stage's forward stops before its first module runs and replays the outputs of the modules the earlier
    stages replaced (``walk.replay``), and the propagation replays all but the last: in layer 0 each original
    linear runs only in the reference pass and each replacement's factors once, per batch (before, q/k/v ran in
    all five forwards after the reference pass). Same outputs: scripts/golden.py compares them bit for bit."""
    from torch import nn

    model = build_model("llama", vocab_size)
    layer = model.model.layers[0]
    runs: dict[int, int] = {}
    forward = nn.Linear.forward

    def counting(self, x):
        runs[id(self)] = runs.get(id(self), 0) + 1
        return forward(self, x)

    monkeypatch.setattr(nn.Linear, "forward", counting)
    originals = {name: module for name, module in layer.named_modules() if isinstance(module, nn.Linear)}
    run_steps(model, [{"method": "lord", "config": {"ratio": 0.3, "whiten": "gram", "refit": "outputs"}}], batches)
    factors = {name: module for name, module in layer.named_modules() if isinstance(module, nn.Linear)}
    assert len(originals) == 7 and len(factors) == 14  # every linear replaced by its two factors
    assert {name: runs.get(id(m), 0) for name, m in originals.items()} == {name: len(batches) for name in originals}
    assert {name: runs.get(id(m), 0) for name, m in factors.items()} == {name: len(batches) for name in factors}
