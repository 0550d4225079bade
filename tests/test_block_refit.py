"""The block-output refit (LoRD ``refit: block``): a block's last linear (o_proj, down_proj) fit so that the block's
output, the residual stream after it, matches the original model's although the stream it adds to has drifted;
the ``drift_cross`` statistic that feeds it, checked against tensors computed explicitly from the two models."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, run_steps

from compressor.kernels import linalg
from compressor.methods.lord import LoRDConfig, lord_factors
from compressor.stats.accumulators import Request, TensorStats


def block_problem(m=6, n=10, tokens=80, drift=0.3, seed=0):
    """A residual writer W (m, n) and its inputs x (original), x̃ (now); residual streams r (original), r̃ (now),
    each (tokens, ·), in fp64."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=generator, dtype=torch.float64)
    x_now = x + drift * torch.randn(tokens, n, generator=generator, dtype=torch.float64)
    r = torch.randn(tokens, m, generator=generator, dtype=torch.float64)
    r_now = r + drift * torch.randn(tokens, m, generator=generator, dtype=torch.float64)
    weight = torch.randn(m, n, generator=generator, dtype=torch.float64)
    return x, x_now, r, r_now, weight


def rrr(x_now, target, rank):
    """Reduced-rank regression by brute force: the rank-r M minimizing ‖X̃ Mᵀ − T‖_F (X̃ (N, n), T (N, m))."""
    least_squares = torch.linalg.lstsq(x_now, target).solution.T  # (m, n)
    v = torch.linalg.svd(x_now @ least_squares.T, full_matrices=False).Vh[:rank].T  # (m, r)
    return v @ v.T @ least_squares


def block_error(weight, approx, x, x_now, r, r_now) -> float:
    """‖(r + X Wᵀ) − (r̃ + X̃ Ŵᵀ)‖_F: the block output's distance from the original's."""
    return float(((r + x @ weight.T) - (r_now + x_now @ approx.T)).norm())


@pytest.mark.parametrize("rank", [2, 4, 6])
def test_block_refit_is_the_reduced_rank_regression_of_the_block_output(rank):
    x, x_now, r, r_now, weight = block_problem()
    whitening = linalg.cholesky(x_now.T @ x_now)
    drift = (r - r_now).T @ x_now  # (m, n): D = Σ (r − r̃) x̃ᵀ
    up, down = lord_factors(linalg.output_refit(weight, x.T @ x_now, whitening, drift), rank, whitening,
                            torch.float64)
    target = (r + x @ weight.T) - r_now  # what the writer must add: y − r̃
    torch.testing.assert_close(up @ down, rrr(x_now, target, rank), rtol=1e-8, atol=1e-8)
    outputs_up, outputs_down = lord_factors(linalg.output_refit(weight, x.T @ x_now, whitening), rank, whitening,
                                            torch.float64)  # refit outputs: W X only
    assert block_error(weight, up @ down, x, x_now, r, r_now) < block_error(
        weight, outputs_up @ outputs_down, x, x_now, r, r_now)


def test_full_rank_block_refit_reproduces_a_representable_block_output():
    """Where the stream's drift is a linear function of what the writer now reads (r − r̃ = A x̃, its input itself
    unchanged), the full-rank refit W + A makes the block output the original one exactly; where its inputs drift
    too, what is left is the least-squares residual, orthogonal to X̃ (nothing linear in x̃ is left to fit)."""
    x, x_now, r, _, weight = block_problem()
    offset = torch.randn(6, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)  # A (m, n)
    r_now = r - x_now @ offset.T
    whitening = linalg.cholesky(x_now.T @ x_now)
    drift = (r - r_now).T @ x_now
    exact = linalg.output_refit(weight, x_now.T @ x_now, whitening, drift)  # x = x̃
    torch.testing.assert_close(r_now + x_now @ exact.T, r + x_now @ weight.T, rtol=1e-9, atol=1e-9)
    up, down = lord_factors(exact, 6, whitening, torch.float64)  # rank min(m, n): the map itself
    torch.testing.assert_close(up @ down, weight + offset, rtol=1e-8, atol=1e-8)
    refit = linalg.output_refit(weight, x.T @ x_now, whitening, drift)
    residual = (r + x @ weight.T) - (r_now + x_now @ refit.T)  # (tokens, m)
    torch.testing.assert_close(x_now.T @ residual, torch.zeros(10, 6, dtype=torch.float64), rtol=0, atol=1e-9)


def test_block_strength_interpolates_the_drift():
    x, x_now, r, r_now, weight = block_problem()
    whitening = linalg.cholesky(x_now.T @ x_now)
    half = linalg.output_refit(weight, x.T @ x_now, whitening, 0.5 * (r - r_now).T @ x_now)
    least_squares = torch.linalg.lstsq(x_now, x @ weight.T + 0.5 * (r - r_now)).solution.T
    torch.testing.assert_close(half, least_squares, rtol=1e-9, atol=1e-9)


def test_drift_cross_accumulates_the_paired_batches():
    x, x_now, r, r_now, _ = block_problem()
    stats = TensorStats()
    for start in range(0, 80, 32):  # three batches, uneven
        part = slice(start, start + 32)
        stats.add(x_now[part].float(), frozenset({"gram", "drift_cross"}),
                  residual=(r[part].float(), r_now[part].float()))
    torch.testing.assert_close(stats.drift, ((r - r_now).float().T @ x_now.float()).double(), rtol=1e-5, atol=1e-4)
    halves = TensorStats(), TensorStats()
    for half, part in zip(halves, (slice(0, 40), slice(40, 80))):
        half.add(x_now[part].float(), frozenset({"drift_cross"}), residual=(r[part].float(), r_now[part].float()))
    torch.testing.assert_close(halves[0].merge(halves[1]).drift, stats.drift, rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="residual"):
        TensorStats().add(x_now.float(), frozenset({"drift_cross"}))
    with pytest.raises(ValueError, match="input"):
        Request("drift_cross", where="output")


def capture(model, ids, layer, names):
    """Inputs of ``names`` (relative to decoder layer ``layer``) over the batches ``ids``: name → (tokens, f)."""
    seen = {name: [] for name in names}
    block = model.model.layers[layer]
    handles = [block.get_submodule(name).register_forward_pre_hook(
        lambda module, args, name=name: seen[name].append(args[0].detach().reshape(-1, args[0].shape[-1])))
        for name in names]
    try:
        with torch.no_grad():
            for batch in ids:
                model(input_ids=batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(found).double() for name, found in seen.items()}


@pytest.fixture(scope="module")
def wide_batches(vocab_size):
    """8 × 64 random token ids in four batches: more tokens than the widest input (128), so every Gram is
    positive definite and no Cholesky jitter enters the comparison."""
    generator = torch.Generator().manual_seed(0)
    return list(torch.randint(1, vocab_size, (8, 64), generator=generator).split(2))


@pytest.mark.parametrize("strengths", [(1.0, 1.0), (0.5, 0.25)])
def test_pipeline_refit_equals_the_brute_force_solve(vocab_size, wide_batches, strengths):
    """Layer 1 of a tiny Llama, compressed with ``refit: block``: its o_proj and down_proj equal the reduced-rank
    regression of α W x + (1 − α) W x̃ + β (r − r̃) on x̃, solved by ``lstsq`` from tensors hooked in the dense and
    the compressed models (x: the linear's input, r: the residual stream it adds to, the input of its block's
    norm)."""
    alpha, beta = strengths
    dense = build_model("llama", vocab_size)
    model = build_model("llama", vocab_size)
    config = {"ratio": 0.3, "whiten": "gram", "refit": "block", "refit_strength": alpha, "block_strength": beta}
    # v_proj kept dense: a low-rank v leaves o_proj's inputs in a subspace (a singular Gram)
    report = run_steps(model, [{"method": "lord", "config": config, "ignore": ["self_attn.v_proj"]}], wide_batches)
    ranks = {entry["name"]: entry["rank"] for entry in report.log}
    names = ["input_layernorm", "self_attn.o_proj", "post_attention_layernorm", "mlp.down_proj"]
    original, now = capture(dense, wide_batches, 1, names), capture(model, wide_batches, 1, names)
    for writer, stream in (("self_attn.o_proj", "input_layernorm"), ("mlp.down_proj", "post_attention_layernorm")):
        weight = dense.model.layers[1].get_submodule(writer).weight.double()
        x, x_now = original[writer], now[writer]
        target = alpha * x @ weight.T + (1 - alpha) * x_now @ weight.T + beta * (original[stream] - now[stream])
        expected = rrr(x_now, target, ranks[f"model.layers.1.{writer}"])
        got = model.model.layers[1].get_submodule(writer).dense_weight().double()
        # compared on the tokens: o_proj's input Gram has a condition number near 1e6 here, so its fp32 batch
        # sums leave the weight loose in its weakest directions, which barely move the outputs
        outputs, wanted = x_now @ got.T, x_now @ expected.T
        assert float((outputs - wanted).norm() / wanted.norm()) < 1e-3


def layer_outputs(model, ids):
    with torch.no_grad():
        return [torch.cat([model(input_ids=b, output_hidden_states=True).hidden_states[i] for b in ids])
                for i in range(1, model.config.num_hidden_layers + 1)]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_block_refit_lowers_the_block_output_error(vocab_size, wide_batches, arch):
    """On the calibration tokens, every decoder layer's output is closer to the dense model's with ``refit: block``
    than with ``refit: outputs`` at the same ranks (layer 0's too: its MLP makes up for its attention's error)."""
    dense = build_model(arch, vocab_size, layers=3)
    reference = layer_outputs(dense, wide_batches)
    errors = {}
    for refit in ("outputs", "block"):
        model = build_model(arch, vocab_size, layers=3)
        run_steps(model, [{"method": "lord", "config": {"ratio": 0.4, "whiten": "gram", "refit": refit}}],
                  wide_batches)
        errors[refit] = [float((out - ref).norm() / ref.norm())
                         for out, ref in zip(layer_outputs(model, wide_batches), reference)]
    for block, outputs in zip(errors["block"], errors["outputs"]):
        assert block < outputs


@pytest.mark.parametrize("config, message", [
    ({"whiten": "activation", "refit": "block"}, "refit: block needs whiten: gram"),
    ({"whiten": "gram", "refit": "block", "block_strength": 1.5}, "block_strength must be in"),
    ({"whiten": "gram", "refit": "outputs", "block_strength": 0.5}, "block_strength and block_dense apply"),
    ({"whiten": "gram", "refit": "outputs", "block_dense": True}, "block_strength and block_dense apply"),
    ({"whiten": "gram", "refit": "block", "gram_side": "auto"}, "needs gram_side: input"),
])
def test_config_errors(config, message):
    with pytest.raises(ValueError, match=message):
        LoRDConfig(ratio=0.2, **config)


def test_unknown_key_and_cli_error(vocab_size):
    from compressor.errors import CompressorError

    model = build_model("llama", vocab_size)
    with pytest.raises(CompressorError, match="block_strenght"):
        run_steps(model, [{"method": "lord", "config": {"ratio": 0.2, "whiten": "gram", "refit": "block",
                                                         "block_strenght": 0.5}}])


def test_without_refit_block_nothing_changes(vocab_size, wide_batches):
    """``refit: block`` with block_strength 0 gives ``refit: outputs``'s model (the drift statistic unused)."""
    models = {}
    for name, extra in (("outputs", {"refit": "outputs"}), ("zero", {"refit": "block", "block_strength": 0.0})):
        models[name] = build_model("llama", vocab_size)
        run_steps(models[name], [{"method": "lord", "config": {"ratio": 0.3, "whiten": "gram", **extra}}],
                  wide_batches)
    for (_, a), (_, b) in zip(models["outputs"].named_parameters(), models["zero"].named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_block_dense_refits_the_writers_kept_dense(vocab_size, wide_batches):
    """``block_dense``: an o_proj the rank rule keeps dense (rank 40 ≥ break-even 32 of 64 × 64) becomes the full-rank
    least-squares map to the block output (a plain linear of the same shape); without it, o_proj stays the
    original weight; down_proj (rank 40 < 42.7) is factorized either way."""
    dense = build_model("llama", vocab_size)
    config = {"rank": 40, "whiten": "gram", "refit": "block"}
    models = {}
    for name, extra in (("kept", {}), ("refit", {"block_dense": True})):
        models[name] = build_model("llama", vocab_size)
        run_steps(models[name], [{"method": "lord", "config": {**config, **extra},  # k, v: 32 × 64
                                  "ignore": ["self_attn.k_proj", "self_attn.v_proj"]}], wide_batches)
    kept, refit = (models[name].model.layers[1].self_attn.o_proj for name in ("kept", "refit"))
    assert isinstance(kept, torch.nn.Linear) and isinstance(refit, torch.nn.Linear)
    torch.testing.assert_close(kept.weight, dense.model.layers[1].self_attn.o_proj.weight, rtol=0, atol=0)
    names = ["input_layernorm", "self_attn.o_proj"]
    original, now = capture(dense, wide_batches, 1, names), capture(models["refit"], wide_batches, 1, names)
    weight = dense.model.layers[1].self_attn.o_proj.weight.double()
    target = original["self_attn.o_proj"] @ weight.T + (original["input_layernorm"] - now["input_layernorm"])
    expected = torch.linalg.lstsq(now["self_attn.o_proj"], target).solution.T  # full rank: the map itself
    outputs, wanted = now["self_attn.o_proj"] @ refit.weight.double().T, now["self_attn.o_proj"] @ expected.T
    assert float((outputs - wanted).norm() / wanted.norm()) < 1e-3
    reference = layer_outputs(dense, wide_batches)
    errors = {name: float((layer_outputs(model, wide_batches)[-1] - reference[-1]).norm() / reference[-1].norm())
              for name, model in models.items()}
    assert errors["refit"] < errors["kept"]
