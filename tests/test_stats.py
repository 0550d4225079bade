"""Input statistics: streaming accumulation, sharing between linears that read one tensor, hook cleanup."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressor.stats import LinearStats, StatsCollector


def test_streaming_gram_equals_one_shot():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 7, 16, generator=g) * torch.logspace(-1, 1, 16) for _ in range(5)]
    stats = LinearStats()
    for x in batches:
        stats.add(x, frozenset({"gram", "abs_mean"}))
    x = torch.cat([b.reshape(-1, 16) for b in batches]).double()
    assert stats.n_tokens == 70
    assert stats.gram.dtype == torch.float64
    assert torch.allclose(stats.gram, x.T @ x, rtol=1e-5, atol=1e-5)
    assert torch.allclose(stats.abs_mean, x.abs().mean(0), rtol=1e-5)
    assert torch.allclose(stats.sq_norm, (x ** 2).sum(0), rtol=1e-5)


def test_sq_norm_without_gram():
    x = torch.randn(10, 8)
    stats = LinearStats()
    stats.add(x[:4], frozenset({"sq_norm"}))
    stats.add(x[4:], frozenset({"sq_norm"}))
    assert stats.gram is None and stats.abs_sum is None
    assert torch.allclose(stats.sq_norm, (x.double() ** 2).sum(0), rtol=1e-6)


def test_collector_gram_matches_layer_inputs():
    torch.manual_seed(0)
    linear = nn.Linear(8, 4)
    xs = [torch.randn(3, 8) for _ in range(3)]
    with StatsCollector({"lin": linear}, frozenset({"gram"})) as collector:
        for x in xs:
            linear(x)
    x = torch.cat(xs).double()
    assert torch.allclose(collector.result()["lin"].gram, x.T @ x, atol=1e-5)


def test_llama_layer_shares_stats(llama, batches):
    from compressor import arch, pipeline

    prefix, layers = arch.decoder_layers(llama)
    with pipeline.calibration_mode(llama):
        inputs = pipeline.capture_inputs(llama, layers, batches, torch.device("cpu"), torch.device("cpu"))
        linears = arch.layer_linears(layers[0], f"{prefix}.0")
        with StatsCollector(linears, frozenset({"gram"})) as collector:
            pipeline.run_layer(layers[0], inputs, torch.device("cpu"), torch.device("cpu"))
    stats = collector.result()
    p = f"{prefix}.0"
    assert set(stats) == set(linears) and len(stats) == 7
    q, k, v = (stats[f"{p}.self_attn.{n}_proj"] for n in "qkv")
    assert q is k is v
    assert stats[f"{p}.mlp.gate_proj"] is stats[f"{p}.mlp.up_proj"]
    distinct = {id(s) for s in stats.values()}
    assert len(distinct) == 4  # qkv, o, gate/up, down
    assert stats[f"{p}.self_attn.o_proj"] is not q and stats[f"{p}.mlp.down_proj"] is not stats[f"{p}.mlp.up_proj"]
    tokens = sum(b.numel() for b in batches)
    for s in distinct_stats(stats):
        assert s.n_tokens == tokens  # counted once, not three times
    # the shared Gram is the Gram of the normalized hidden states: same size as the input of q_proj
    assert q.gram.shape == (64, 64) and stats[f"{p}.mlp.down_proj"].gram.shape == (128, 128)
    # and it is a Gram: symmetric positive semi-definite
    assert torch.allclose(q.gram, q.gram.T)
    assert float(torch.linalg.eigvalsh(q.gram)[0]) > -1e-6 * float(q.gram.diagonal().max())


def distinct_stats(stats: dict) -> list[LinearStats]:
    return list({id(s): s for s in stats.values()}.values())


def test_hooks_removed_after_exception():
    linears = {"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)}
    with pytest.raises(RuntimeError, match="boom"):
        with StatsCollector(linears, frozenset({"gram"})) as collector:
            assert all(len(m._forward_hooks) == 1 for m in linears.values())
            linears["a"](torch.randn(2, 4))
            raise RuntimeError("boom")
    assert all(len(m._forward_hooks) == 0 for m in linears.values())
    assert not collector._handles
    # the modules run hook-free afterwards: no further accumulation
    before = collector.stats["a"].n_tokens
    linears["a"](torch.randn(5, 4))
    assert collector.stats["a"].n_tokens == before


def test_hooks_removed_after_exception_inside_forward():
    class Exploding(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            self.lin(x)
            raise ValueError("inside the layer")

    layer = Exploding()
    with pytest.raises(ValueError):
        with StatsCollector({"lin": layer.lin}, frozenset({"gram"})):
            layer(torch.randn(2, 4))
    assert len(layer.lin._forward_hooks) == 0


SHARED_GROUPS = {  # per decoder layer: groups of linears that read one tensor
    "llama": [{"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}, {"mlp.gate_proj", "mlp.up_proj"},
              {"self_attn.o_proj"}, {"mlp.down_proj"}],
    "opt": [{"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}, {"self_attn.out_proj"}, {"fc1"}, {"fc2"}],
    "gpt2": [{"attn.c_attn"}, {"attn.c_proj"}, {"mlp.c_fc"}, {"mlp.c_proj"}],
}
SHARED_GROUPS["qwen2"] = SHARED_GROUPS["mistral"] = SHARED_GROUPS["llama"]


def test_sharing_on_every_architecture(tiny_model, arch, batches):
    from compressor import arch as arch_facts, pipeline

    prefix, layers = arch_facts.decoder_layers(tiny_model)
    cpu = torch.device("cpu")
    with pipeline.calibration_mode(tiny_model):
        inputs = pipeline.capture_inputs(tiny_model, layers, batches, cpu, cpu)
        linears = arch_facts.layer_linears(layers[1], f"{prefix}.1")
        with StatsCollector(linears, frozenset({"gram", "abs_mean"})) as collector:
            pipeline.run_layer(layers[1], inputs, cpu, cpu)
    stats = collector.result()
    groups = [{f"{prefix}.1.{name}" for name in group} for group in SHARED_GROUPS[arch]]
    assert set(stats) == set().union(*groups)
    for group in groups:
        assert len({id(stats[name]) for name in group}) == 1, group
    assert len({id(s) for s in stats.values()}) == len(groups)
    tokens = sum(b.numel() for b in batches)
    for s in stats.values():
        assert s.n_tokens == tokens and s.gram.shape[0] == s.abs_mean.shape[0]
