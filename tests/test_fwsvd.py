"""FWSVD and its Fisher pass: the pass equals per-example squared gradients computed directly (five
architectures, tied heads, Conv1D, with and without checkpointing), uniform Fisher is plain SVD, the
weighted error is optimal on a known case, zero Fisher never divides by zero, and the disk cache
(a hit skips the pass and gives the same model)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import build_model, logits, run_steps
from torch import nn
from typer.testing import CliRunner

from compressor import api
from compressor.cli import app
from compressor.errors import CompressorError
from compressor.kernels import linalg
from compressor.methods import registry
from compressor.methods.fwsvd import FWSVD, fwsvd_factors, weighted_error
from compressor.methods.lord import lord_factors
from compressor.model import targets as arch_mod
from compressor.model.modules import LowRankLinear, weight_of
from compressor.plan import recipe as recipes
from compressor.stats import fisher
from compressor.stats.fisher import diagonal_weight
from compressor.walk import layers as walk_layers

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test gets its own empty cache directory (the Fisher cache lives under it)."""
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def decoder_targets(model) -> list[str]:
    prefix, layers = arch_mod.decoder_layers(model)
    return [name for i, layer in enumerate(layers) for name in arch_mod.layer_linears(layer, f"{prefix}.{i}")]


def direct_fisher(model, batches, names) -> dict[str, torch.Tensor]:
    """Σ over windows of (∂L/∂W)², the obvious way: every parameter trainable, full logits, one window
    per backward, the full gradient read after each."""
    model = copy.deepcopy(model)
    for p in model.parameters():
        p.requires_grad_(True)
    out = {name: torch.zeros(weight_of(model.get_submodule(name)).shape, dtype=torch.float64)
           for name in names}
    for ids in torch.cat(batches).split(1):
        model.zero_grad()
        logits_ = model(input_ids=ids, use_cache=False).logits[0]
        nn.functional.cross_entropy(logits_[:-1], ids[0, 1:]).backward()
        for name in names:
            module = model.get_submodule(name)
            grad = module.weight.grad.T if type(module).__name__ == "Conv1D" else module.weight.grad
            out[name] += grad.double() ** 2
    return out


def fwsvd_walk(model, batches, **config):
    report = run_steps(model, [{"method": "fwsvd", "config": {"checkpointing": False, **config}}], batches)
    return report.plan.steps[0].compressor, report


# ---------------------------------------------------------------- the Fisher pass


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fisher_equals_direct_per_example_gradients(tiny_model, arch, batches, checkpointing):
    names = decoder_targets(tiny_model)
    flags = {name: p.requires_grad for name, p in tiny_model.named_parameters()}
    expected = direct_fisher(tiny_model, batches, names)
    got = fisher.collect_fisher(tiny_model, batches, names, CPU, checkpointing=checkpointing)
    assert set(got) == set(names)
    for name in names:
        assert got[name].dtype == torch.float32
        assert got[name].shape == expected[name].shape  # (out, in), also for GPT-2's Conv1D
        scale = float(expected[name].max())
        assert scale > 0
        torch.testing.assert_close(got[name].double(), expected[name], rtol=1e-4, atol=1e-6 * scale)
    # everything is as it was: trainability, no gradients left, eval mode, no patched forwards
    assert {name: p.requires_grad for name, p in tiny_model.named_parameters()} == flags
    assert all(p.grad is None for p in tiny_model.parameters())
    assert not tiny_model.training
    assert all("forward" not in vars(layer) for layer in arch_mod.decoder_layers(tiny_model)[1])


def test_only_targets_get_gradients(vocab_size, batches, monkeypatch):
    """GPT-2 ties its embedding and head: neither may require a gradient during the pass."""
    model = build_model("gpt2", vocab_size)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    names = decoder_targets(model)[:2]
    seen = {}

    def spy(model_, ids):
        seen.update({n: p.requires_grad for n, p in model_.named_parameters()})
        return fisher.next_token_loss(model_, ids)

    monkeypatch.setattr(fisher, "loss_function", lambda model_, probe: lambda ids: spy(model_, ids))
    fisher.collect_fisher(model, batches, names, CPU)
    trainable = {n for n, flag in seen.items() if flag}
    assert trainable == {f"{name}.weight" for name in names}


def test_chunked_loss_is_the_plain_loss(llama, ids):
    loss = fisher.loss_function(llama, ids[:1])
    assert loss.func is fisher.chunked_next_token_loss
    for row in ids.split(1):
        plain = fisher.next_token_loss(llama, row)
        chunked = fisher.chunked_next_token_loss(llama.base_model, llama.lm_head, row, chunk=5)
        torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-6)


def test_a_head_that_is_not_plain_falls_back(llama, ids):
    """A model whose logits are not head(base_model(ids)) (here: logits scaled as Cohere's are) uses
    the plain loss."""
    original = type(llama).forward

    def scaled(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        out.logits = out.logits * 0.0625
        return out

    llama.forward = scaled.__get__(llama)
    assert fisher.loss_function(llama, ids[:1]).func is fisher.next_token_loss


def test_fingerprint(llama, batches):
    names = decoder_targets(llama)
    key = fisher.fingerprint(llama, batches, names)
    assert fisher.fingerprint(llama, [torch.cat(batches)], names) == key  # batching does not matter
    assert fisher.fingerprint(llama, batches, list(reversed(names))) == key
    assert fisher.fingerprint(llama, batches, names[:3]) != key
    assert fisher.fingerprint(llama, [b.flip(1) for b in batches], names) != key
    other = copy.deepcopy(llama)
    with torch.no_grad():
        weight_of(other.get_submodule(names[0])).mul_(1.01)
    assert fisher.fingerprint(other, batches, names) != key


def test_pass_errors():
    with pytest.raises(CompressorError, match="calibration data"):
        fisher.fisher_for(nn.Linear(2, 2), None, [])


# ---------------------------------------------------------------- the factorization


def random_weight(m: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("axis", ["in", "out"])
def test_uniform_fisher_is_plain_svd(axis):
    weight = random_weight(40, 24)
    plain_up, plain_down = lord_factors(weight, 8, linalg.identity(), torch.float64)
    fisher_ = torch.full(weight.shape, 0.37, dtype=torch.float64)
    scale = diagonal_weight(fisher_, axis, 1e-6)
    up, down = fwsvd_factors(weight, 8, scale, axis)
    assert up.shape == (40, 8) and down.shape == (8, 24)
    torch.testing.assert_close(up @ down, plain_up @ plain_down, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("axis", ["in", "out"])
@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_weighted_error_is_optimal_and_beats_plain_svd(axis, shape):
    """A known case: importance spanning four decades along the axis. FWSVD reaches the optimum of its
    objective (the tail of the weighted matrix's spectrum, Eckart–Young) and plain SVD does not."""
    m, n = shape
    weight = random_weight(m, n, seed=1)
    size = n if axis == "in" else m
    order = torch.randperm(size, generator=torch.Generator().manual_seed(2))
    scale = torch.logspace(-2, 2, size, dtype=torch.float64)[order]
    rank = 6
    up, down = fwsvd_factors(weight, rank, scale, axis)
    plain_up, plain_down = lord_factors(weight, rank, linalg.identity(), torch.float64)
    ours = weighted_error(weight, up @ down, scale, axis)
    plain = weighted_error(weight, plain_up @ plain_down, scale, axis)
    weighted = weight * (scale[None, :] if axis == "in" else scale[:, None])
    optimum = float(torch.linalg.svdvals(weighted)[rank:].square().sum().sqrt())
    assert ours == pytest.approx(optimum, rel=1e-9)
    assert ours < 0.9 * plain


@pytest.mark.parametrize("eps", [1e-6, 0.0])
@pytest.mark.parametrize("axis", ["in", "out"])
def test_zero_fisher_channels_do_not_divide_by_zero(axis, eps):
    weight = random_weight(32, 48)
    fisher_ = torch.rand(32, 48, dtype=torch.float64)
    fisher_[:, :10] = 0.0  # dead input channels
    fisher_[:7, :] = 0.0  # dead output channels
    fisher_[8, 12] = float("nan")
    scale = diagonal_weight(fisher_, axis, eps)
    assert torch.isfinite(scale).all()
    up, down = fwsvd_factors(weight, 5, scale, axis)
    assert torch.isfinite(up).all() and torch.isfinite(down).all()
    assert float((up @ down).abs().max()) < 1e6


def test_config_checks():
    with pytest.raises(CompressorError, match="axis must be one of"):
        registry.create("fwsvd", {"axis": "rows"})
    with pytest.raises(CompressorError, match="eps"):
        registry.create("fwsvd", {"eps": -1.0})
    with pytest.raises(CompressorError, match="set only one"):
        registry.create("fwsvd", {"ratio": 0.2, "rank": 4})
    compressor = registry.create("fwsvd", {})
    assert isinstance(compressor, FWSVD) and compressor.requests() == () and compressor.uses_data
    assert compressor.config.axis == "in" and compressor.config.ratio == 0.2


# ---------------------------------------------------------------- the compressor in the walk, and the cache


@pytest.mark.parametrize("axis", ["in", "out"])
def test_fwsvd_walk_on_every_architecture(tiny_model, arch, ids, batches, axis, monkeypatch):
    captured = []
    capture_inputs = walk_layers.capture_inputs
    monkeypatch.setattr(walk_layers, "capture_inputs",
                        lambda *args: captured.append(1) or capture_inputs(*args))
    before = logits(tiny_model, ids)
    compressor, report = fwsvd_walk(tiny_model, batches, ratio=0.2, axis=axis)
    swapped = {n: m for n, m in tiny_model.named_modules() if isinstance(m, LowRankLinear)}
    assert set(swapped) == set(e["name"] for e in report.log) and swapped
    for entry in report.log:
        m, n = entry["shape"]
        assert entry["rank"] == int(0.8 * m * n / (m + n))
        assert 0 < entry["rel_fisher_error"] < 1 and entry["fisher_cache"] == "computed"
    assert compressor.scales == {}  # each scale is dropped once used
    # no per-layer statistics: the layer walk carries no calibration stream, so no input capture runs
    assert report.seconds["prepare"] > 0 and report.plan.walk_streams() == [] and not captured
    assert report.seconds.get("statistics_forward", 0.0) == 0.0
    after = logits(tiny_model, ids)
    assert torch.isfinite(after).all() and not torch.allclose(after, before, atol=1e-4)


def test_full_rank_fwsvd_reproduces_logits(llama, ids, batches, monkeypatch):
    from compressor.ranks import uniform as ranks

    monkeypatch.setattr(ranks, "saves_parameters", lambda rank, m, n: True)
    before = logits(llama, ids)
    fwsvd_walk(llama, batches, rank_reduction=0.0)
    assert (logits(llama, ids) - before).abs().max() <= 1e-4


def test_cache_hit_skips_the_pass_and_gives_the_same_model(vocab_size, ids, batches, cache, monkeypatch):
    first, second = build_model("llama", vocab_size), build_model("llama", vocab_size)
    compressor, _ = fwsvd_walk(first, batches)
    assert compressor.fisher_info["hit"] is False
    files = list((cache / "fisher").glob("*.safetensors"))
    assert len(files) == 1 and files[0].stem == compressor.fisher_info["key"]

    def no_pass(*args, **kwargs):
        raise AssertionError("the Fisher pass ran on a cache hit")

    monkeypatch.setattr(fisher, "collect_fisher", no_pass)
    compressor, report = fwsvd_walk(second, batches)
    assert compressor.fisher_info["hit"] is True
    assert all(entry["fisher_cache"] == "hit" for entry in report.log)
    assert torch.equal(logits(first, ids), logits(second, ids))
    state_a, state_b = first.state_dict(), second.state_dict()
    assert state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k]) for k in state_a)

    with pytest.raises(AssertionError, match="cache hit"):  # refresh recomputes even when cached
        fwsvd_walk(build_model("llama", vocab_size), batches, fisher_cache="refresh")


def test_cache_off_writes_nothing_and_a_broken_file_is_a_miss(llama, batches, cache):
    fwsvd_walk(copy.deepcopy(llama), batches, fisher_cache="off")
    assert not (cache / "fisher").exists() or not any((cache / "fisher").iterdir())
    names = decoder_targets(llama)
    key = fisher.fingerprint(llama, batches, names)
    fisher.cache_path(key).parent.mkdir(parents=True)
    fisher.cache_path(key).write_bytes(b"not safetensors")
    shapes = {name: fisher.expected_shape(llama, name, None) for name in names}
    assert fisher.load_cached(key, shapes) == (None, "unreadable")
    _, info = fisher.fisher_for(llama, batches, names)
    assert info["hit"] is False and fisher.load_cached(key, shapes)[0] is not None


@pytest.mark.parametrize("corrupt, why", [
    (lambda t: torch.full_like(t, -1.0), "negative"),
    (lambda t: t.clone().fill_(float("nan")), "non-finite"),
    (lambda t: t[:, :-1].contiguous(), "shape"),
])
def test_a_cache_whose_values_were_overwritten_is_recomputed(llama, batches, cache, corrupt, why):
    """What is read back is validated: a Fisher overwritten with −1, NaN or a wrong shape is a miss, is
    recomputed (the same values as the first pass) and rewritten, and info says why it was rejected."""
    from safetensors.torch import load_file, save_file

    names = decoder_targets(llama)[:3]
    first, info = fisher.fisher_for(llama, batches, names)
    path = Path(info["path"])
    save_file({k: corrupt(v) for k, v in load_file(str(path)).items()}, str(path))
    again, info = fisher.fisher_for(llama, batches, names)
    assert info["hit"] is False and why in next(iter(info["rejected"].values()))
    assert all(torch.equal(first[n], again[n]) for n in names)
    _, info = fisher.fisher_for(llama, batches, names)  # rewritten: a valid hit now
    assert info["hit"] is True


def test_recipe_api_and_cli(model_dirs, small, tmp_path):
    recipe = recipes.load("fwsvd", small)
    assert recipe.steps[0].method == "fwsvd" and recipe.steps[0].config["axis"] == "in"
    summary = api.compress(str(model_dirs["llama"]), "fwsvd", tmp_path / "out", overrides=small,
                           progress=False)
    assert summary["compressed"] == summary["modules"] == 14
    assert summary["walk_seconds"]["prepare"] > 0 and "fisher" in summary["walk_seconds"]  # its own phase
    result = CliRunner().invoke(app, ["methods"], env={"COLUMNS": "240"})
    assert result.exit_code == 0, result.output
    assert "fwsvd" in result.output and "fisher_cache" in result.output and "axis" in result.output


# ---------------------------------------------------------------- per-axis accumulation


@pytest.mark.parametrize("reduce", ["in", "out"])
def test_reduced_pass_is_the_summed_full_fisher(tiny_model, arch, batches, reduce):
    names = decoder_targets(tiny_model)
    full = fisher.collect_fisher(tiny_model, batches, names, CPU)
    reduced = fisher.collect_fisher(tiny_model, batches, names, CPU, reduce=reduce)
    for name in names:
        m, n = full[name].shape
        assert reduced[name].shape == ((n,) if reduce == "in" else (m,))
        assert reduced[name].dtype == torch.float32
        expected = fisher.reduce_fisher(full[name], reduce)
        torch.testing.assert_close(reduced[name], expected, rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("axis", ["in", "out"])
def test_fisher_store_axis_gives_the_same_model(vocab_size, ids, batches, cache, axis, monkeypatch):
    full, reduced = build_model("gpt2", vocab_size), build_model("gpt2", vocab_size)
    fwsvd_walk(full, batches, axis=axis, fisher_cache="off", fisher_store="full")
    compressor, _ = fwsvd_walk(reduced, batches, axis=axis, fisher_store="axis")
    assert compressor.fisher_info["hit"] is False
    torch.testing.assert_close(logits(reduced, ids), logits(full, ids), rtol=1e-4, atol=1e-5)
    assert fisher.cache_path(compressor.fisher_info["key"]).stat().st_size < 100_000  # vectors only

    # a cached full Fisher also serves a request for either axis
    model = build_model("gpt2", vocab_size)
    names = decoder_targets(model)
    fisher.fisher_for(model, batches, names)
    def no_pass(*args, **kwargs):
        raise AssertionError("the Fisher pass ran on a cache hit")

    monkeypatch.setattr(fisher, "collect_fisher", no_pass)
    other = "out" if axis == "in" else "in"
    got, info = fisher.fisher_for(model, batches, names, reduce=other)
    assert info["hit"] and info["key"] == fisher.fingerprint(model, batches, names)
    assert all(v.dim() == 1 for v in got.values())
