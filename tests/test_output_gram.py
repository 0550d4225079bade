"""LoRD from the output side (``gram_side``): the truncation SVD-LLM solves from the input Gram G (n×n), reached
from the output Gram W G Wᵀ (m×m) instead, the smaller one for a wide matrix (down_proj, GQA's k/v)."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, build_model, run_steps

from compressor.kernels import linalg
from compressor.methods.lord import LoRDConfig, lord_factors
from compressor.stats.accumulators import Request, TensorStats, for_matrix


def problem(m=12, n=40, tokens=300, seed=0, deficient=False):
    generator = torch.Generator().manual_seed(seed)
    scales = torch.rand(n, generator=generator, dtype=torch.float64) + 0.05
    x = torch.randn(tokens, n, generator=generator, dtype=torch.float64) * scales  # (tokens, n)
    if deficient:  # rank-deficient inputs: three dead channels and a duplicated one
        x[:, :3] = 0
        x[:, 5] = x[:, 4]
    weight = torch.randn(m, n, generator=generator, dtype=torch.float64)  # (m, n), wide
    bias = torch.randn(m, generator=generator, dtype=torch.float64)
    return x, weight, bias


def test_the_output_gram_takes_the_bias_out():
    x, weight, bias = problem()
    y = x.float() @ weight.float().T + bias.float()  # (tokens, m): what the hook sees
    stats = TensorStats()
    for start in range(0, 300, 128):
        stats.add(y[start: start + 128], frozenset({"gram", "mean"}))
    gram = stats.gram_about(bias)
    expected = weight @ (x.T @ x) @ weight.T
    torch.testing.assert_close(gram, expected, rtol=2e-5, atol=1e-3 * float(expected.abs().max()))
    without_mean = TensorStats()
    without_mean.add(y, frozenset({"gram"}))
    with pytest.raises(Exception, match="mean"):
        without_mean.gram_about(bias)


@pytest.mark.parametrize("rank", [1, 5, 12])
@pytest.mark.parametrize("rows", [False, True])
def test_output_side_equals_svd_llm(rank, rows):
    x, weight, _ = problem()
    gram = x.T @ x
    row_scale = torch.rand(12, dtype=torch.float64) + 0.5 if rows else None
    up, down = lord_factors(weight, rank, linalg.cholesky(gram), torch.float64, row_scale)
    out_up, out_down = lord_factors(weight, rank, None, torch.float64, row_scale, weight @ gram @ weight.T)
    torch.testing.assert_close(out_up @ out_down, up @ down, rtol=1e-9, atol=1e-9)
    # SVD-LLM's balanced split: the same factors up to the sign of each singular pair
    signs = torch.sign((out_up * up).sum(0))
    torch.testing.assert_close(out_up * signs, up, rtol=1e-8, atol=1e-8)
    _, _, values = linalg.whitened_svd(weight, rank, linalg.cholesky(gram))
    _, _, out_values = linalg.output_side_svd(weight, weight @ gram @ weight.T, rank)
    torch.testing.assert_close(out_values, values[:12], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(linalg.output_spectrum(weight @ gram @ weight.T), values[:12], rtol=1e-9, atol=1e-9)


def test_output_side_is_optimal_on_a_singular_gram():
    """Where G is singular SVD-LLM needs a jitter; the output side needs none and attains the optimum
    Σ_{i>r} σ_i² of ‖(W − Ŵ) Xᵀ‖² exactly."""
    x, weight, _ = problem(deficient=True)
    gram = x.T @ x
    rank = 4
    up, down, values = linalg.output_side_svd(weight, weight @ gram @ weight.T, rank)
    loss = float(((weight - up @ down) @ x.T).square().sum())
    assert loss == pytest.approx(float(values[rank:].square().sum()), rel=1e-9)
    assert torch.isfinite(up).all() and torch.isfinite(down).all()
    jittered_up, jittered_down = lord_factors(weight, rank, linalg.cholesky(gram), torch.float64)
    assert loss <= float(((weight - jittered_up @ jittered_down) @ x.T).square().sum()) * (1 + 1e-9)
    error = linalg.output_side_error(weight, up @ down, weight @ gram @ weight.T)
    assert error == pytest.approx(linalg.relative_error(weight, up @ down, gram), rel=1e-6)


def test_requests_narrowed_to_wide_matrices():
    assert for_matrix("wide", (64, 128)) and not for_matrix("wide", (128, 64))
    assert for_matrix("not_wide", (64, 64)) and for_matrix("all", (1, 2))
    with pytest.raises(ValueError, match="layer"):
        Request("angular_distance", "layer", matrices="wide")
    with pytest.raises(ValueError, match="whiten: gram"):
        LoRDConfig(whiten="none", gram_side="auto")
    with pytest.raises(ValueError, match="gram_side: input"):
        LoRDConfig(whiten="gram", gram_side="output", refit="outputs")


def final_logits(model, batches):
    with torch.no_grad():
        return torch.cat([model(input_ids=ids).logits for ids in batches])


def watched(monkeypatch):
    """name → (input Gram shape or None, output Gram shape or None) of every target LoRD compresses."""
    from compressor.methods import lord

    seen = {}
    original = lord.LoRD.compress_linear

    def recording(self, target, ctx):
        sides = (target.stats, target.output_stats)
        seen[target.name] = tuple(None if s is None or s.gram is None else tuple(s.gram.shape) for s in sides)
        return original(self, target, ctx)

    monkeypatch.setattr(lord.LoRD, "compress_linear", recording)
    return seen


@pytest.mark.parametrize("arch", ARCHS)
def test_auto_side_matches_the_input_side_end_to_end(arch, vocab_size, batches, monkeypatch):
    """Every family (biases included): the same ranks, the same compressed model to rounding; wide targets
    never hold their (n, n) input Gram, the others never an output Gram."""
    config = {"ratio": 0.3, "whiten": "gram"}
    plain, auto = build_model(arch, vocab_size), build_model(arch, vocab_size)
    plain_report = run_steps(plain, [{"method": "lord", "config": config}], batches)
    seen = watched(monkeypatch)
    auto_report = run_steps(auto, [{"method": "lord", "config": {**config, "gram_side": "auto"}}], batches)
    assert [e["rank"] for e in auto_report.log] == [e["rank"] for e in plain_report.log]
    wide = [e["name"] for e in auto_report.log if e.get("gram_side") == "output"]
    shapes = auto_report.plan.steps[0].shapes
    assert wide and wide == [n for n, (m, k) in shapes.items() if k > m and n in seen]
    for name, (input_gram, output_gram) in seen.items():
        m, n = shapes[name]
        assert (input_gram, output_gram) == (((None, (m, m))) if n > m else ((n, n), None))
    for plain_entry, auto_entry in zip(plain_report.log, auto_report.log):  # the output error, either way
        if auto_entry.get("gram_side") == "output":
            assert auto_entry["rel_output_error"] == pytest.approx(plain_entry["rel_output_error"], rel=1e-3)
    reference = final_logits(build_model(arch, vocab_size), batches)
    plain_logits, auto_logits = final_logits(plain, batches), final_logits(auto, batches)
    assert float((auto_logits - plain_logits).norm() / (plain_logits - reference).norm()) < 1e-3


def test_loss_rule_spectra_from_the_output_side(vocab_size, batches):
    """rank_rule loss reads every matrix's whitened spectrum; from the output side it allocates the same ranks."""
    config = {"ratio": 0.3, "whiten": "gram", "rank_rule": "loss"}
    reports = [run_steps(build_model("llama", vocab_size), [{"method": "lord", "config": {**config, **extra}}],
                         batches) for extra in ({}, {"gram_side": "auto"}, {"gram_side": "output"})]
    ranks = [[e["rank"] for e in report.log] for report in reports]
    assert ranks[0] == ranks[1] == ranks[2]
    assert len(set(ranks[0])) > 1  # non-uniform: the spectra decided


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_gram_solver_end_to_end_equals_the_full_svd(arch, vocab_size, batches):
    """``svd_solver: gram`` (the memory-lean route of tall matrices) with ``gram_side: auto``: the same ranks
    and the same compressed model to rounding as LAPACK's SVD."""
    config = {"ratio": 0.3, "whiten": "gram", "gram_side": "auto"}
    full, lean = build_model(arch, vocab_size), build_model(arch, vocab_size)
    full_report = run_steps(full, [{"method": "lord", "config": config}], batches)
    lean_report = run_steps(lean, [{"method": "lord", "config": {**config, "svd_solver": "gram"}}], batches)
    assert [e["rank"] for e in lean_report.log] == [e["rank"] for e in full_report.log]
    reference = final_logits(build_model(arch, vocab_size), batches)
    full_logits, lean_logits = final_logits(full, batches), final_logits(lean, batches)
    assert float((lean_logits - full_logits).norm() / (full_logits - reference).norm()) < 1e-4
