"""MoDeGPT's MLP step on tiny models: keeping every channel reproduces the model, the layer's MLP error
on calibration inputs falls as more channels are kept, the Nyström refit beats slicing alone, the
allocation meets the target exactly, and the shrunk model saves and reloads."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import logits, run_steps, small_recipe

from compressor import api, io
from compressor.methods import modegpt_math as mg
from compressor.methods.modegpt import kept_counts
from compressor.model import loading as models


def mlp_inputs(model, batches, index: int, arch: str) -> tuple[torch.Tensor, torch.nn.Module]:
    """(inputs (tokens, hidden) of layer ``index``'s MLP, that MLP callable) on the calibration batches."""
    mlp = model.model.decoder.layers[index] if arch == "opt" else model.model.layers[index].mlp
    seen = []
    module = mlp.fc1 if arch == "opt" else mlp
    handle = module.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].detach().reshape(-1, args[0].shape[-1]))
    )
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch, use_cache=False)
    handle.remove()
    if arch == "opt":

        def run(x, layer=mlp):
            return layer.fc2(torch.relu(layer.fc1(x)))

        return torch.cat(seen), run
    return torch.cat(seen), mlp


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt"])
def test_keeping_every_channel_reproduces_the_model(arch, model_dirs, batches, ids):
    model = models.load(str(model_dirs[arch]))[0]
    before = logits(model, ids)
    run_steps(
        model,
        [{"method": "modegpt", "config": {"ratio": 0.0}}],
        batches,
        propagate="original",
        statistics="once",
    )
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_mlp_error_falls_as_more_channels_are_kept_and_the_refit_helps(arch, model_dirs, batches):
    source = models.load(str(model_dirs[arch]))[0]
    x, original = mlp_inputs(source, batches, 1, arch)
    with torch.no_grad():
        target = original(x)
    errors = []
    for ratio in (0.6, 0.4, 0.2):
        model = copy.deepcopy(source)
        report = run_steps(
            model,
            [{"method": "modegpt", "config": {"ratio": ratio, "smoothing": 10.0}}],
            batches,
            propagate="original",
            statistics="once",
        )
        _, compressed = mlp_inputs(model, batches, 1, arch)
        with torch.no_grad():
            errors.append(float((compressed(x) - target).norm() / target.norm()))
        decision = report.plan.steps[0].compressor.keep
        assert sum(decision.values()) == round((1 - ratio) * 2 * 128)  # exactly the target, in channels
    assert errors[0] > errors[1] > errors[2] > 0
    # the least-squares refit of down beats keeping the same channels with down merely sliced
    mlp = source.model.decoder.layers[1] if arch == "opt" else source.model.layers[1].mlp
    down = mlp.fc2 if arch == "opt" else mlp.down_proj
    hidden_seen = []
    handle = down.register_forward_pre_hook(
        lambda m, args: hidden_seen.append(args[0].reshape(-1, args[0].shape[-1]))
    )
    with torch.no_grad():
        original(x)
    handle.remove()
    hidden = hidden_seen[0].double()  # (tokens, d_int)
    cov = hidden.T @ hidden / hidden.shape[0]
    kept = mg.mlp_keep(cov, 64)
    sliced = hidden[:, kept] @ down.weight.double()[:, kept].T
    refit = hidden[:, kept] @ mg.nystrom_down(cov, kept, down.weight).T
    exact = hidden @ down.weight.double().T
    assert (refit - exact).norm() < 0.9 * (sliced - exact).norm()


def test_kept_counts_meet_the_total_exactly():
    sparsity = torch.tensor([0.05, 0.33, 0.21, 0.41])
    counts = kept_counts(sparsity, 100, 0.25)
    assert sum(100 - c for c in counts) == 100 and all(1 <= c <= 100 for c in counts)
    assert counts == [95, 67, 79, 59]  # no remainders: 5 + 33 + 21 + 41 = 100 removed
    # 5.5 + 33.3 + 21.1 + 40.1 = 100: the floors remove 99, the largest remainder (layer 0's .5) one more
    assert kept_counts(torch.tensor([0.055, 0.333, 0.211, 0.401]), 100, 0.25) == [94, 67, 79, 60]


def test_save_reload_and_manifest(model_dirs, small_text, ids, tmp_path):
    data = {
        "propagate": "original",
        "statistics": "once",
        "steps": [{"method": "modegpt", "config": {"ratio": 0.25}}],
    }
    summary = api.compress(
        str(model_dirs["llama"]), small_recipe(data, small_text), tmp_path / "out", progress=False
    )
    manifest = io.read_manifest(tmp_path / "out")
    decision = manifest["plan"][0]["decision"]
    assert set(decision) == {"influence", "sparsity", "kept_channels", "width"} and decision["width"] == 128
    kept = decision["kept_channels"]
    assert sum(kept.values()) == round(0.75 * 2 * 128)
    for layer, width in kept.items():
        spec = manifest["modules"][f"model.layers.{layer}.mlp.down_proj"]
        assert spec["kind"] == "dense" and spec["in_features"] == width
    assert torch.equal(logits(io.load(tmp_path / "out"), ids), logits(summary["model"], ids))
    assert summary["params_after"] < summary["params_before"]
