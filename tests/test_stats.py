"""Statistics: streaming accumulation, sharing between linears that read one tensor, hook cleanup, exact
merges of partial accumulations, request validation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressor.model.modes import calibration_mode
from compressor.model.targets import decoder_layers, layer_linears
from compressor.stats.accumulators import FP32_GRAM, SUMS, DistanceStats, Request, TensorStats
from compressor.stats.hooks import Collector, Watch
from compressor.walk.layers import capture_inputs, run_layer

GRAM = frozenset({"gram"})


def input_watches(modules: dict[str, nn.Module], kinds: frozenset[str]) -> list[Watch]:
    return [Watch(name, module, "input", kinds) for name, module in modules.items()]


def by_name(result: dict) -> dict[str, TensorStats]:
    """(name, "input") → stats, as name → stats."""
    assert all(where == "input" for _, where in result)
    return {name: stats for (name, _), stats in result.items()}


def test_streaming_gram_equals_one_shot():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 7, 16, generator=g) * torch.logspace(-1, 1, 16) for _ in range(5)]
    stats = TensorStats()
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
    stats = TensorStats()
    stats.add(x[:4], frozenset({"sq_norm"}))
    stats.add(x[4:], frozenset({"sq_norm"}))
    assert stats.gram is None and stats.abs_sum is None
    assert torch.allclose(stats.sq_norm, (x.double() ** 2).sum(0), rtol=1e-6)


def test_collector_gram_matches_layer_inputs():
    torch.manual_seed(0)
    linear = nn.Linear(8, 4)
    xs = [torch.randn(3, 8) for _ in range(3)]
    with Collector([Watch("lin", linear, "input", GRAM)]) as collector:
        for x in xs:
            linear(x)
    x = torch.cat(xs).double()
    assert torch.allclose(collector.result()[("lin", "input")].gram, x.T @ x, atol=1e-5)


def test_llama_layer_shares_stats(llama, batches):
    prefix, layers = decoder_layers(llama)
    with calibration_mode(llama):
        inputs = capture_inputs(llama, layers, batches, torch.device("cpu"), torch.device("cpu"))
        linears = layer_linears(layers[0], f"{prefix}.0")
        with Collector(input_watches(linears, GRAM)) as collector:
            run_layer(layers[0], inputs, torch.device("cpu"), torch.device("cpu"))
    stats = by_name(collector.result())
    p = f"{prefix}.0"
    assert set(stats) == set(linears) and len(stats) == 7
    q, k, v = (stats[f"{p}.self_attn.{n}_proj"] for n in "qkv")
    assert q is k is v
    assert stats[f"{p}.mlp.gate_proj"] is stats[f"{p}.mlp.up_proj"]
    distinct = {id(s) for s in stats.values()}
    assert len(distinct) == 4  # qkv, o, gate/up, down
    assert stats[f"{p}.self_attn.o_proj"] is not q
    assert stats[f"{p}.mlp.down_proj"] is not stats[f"{p}.mlp.up_proj"]
    tokens = sum(b.numel() for b in batches)
    for s in distinct_stats(stats):
        assert s.n_tokens == tokens  # counted once, not three times
    # the shared Gram is the Gram of the normalized hidden states: same size as the input of q_proj
    assert q.gram.shape == (64, 64) and stats[f"{p}.mlp.down_proj"].gram.shape == (128, 128)
    # and it is a Gram: symmetric positive semi-definite
    assert torch.allclose(q.gram, q.gram.T)
    assert float(torch.linalg.eigvalsh(q.gram)[0]) > -1e-6 * float(q.gram.diagonal().max())


def distinct_stats(stats: dict) -> list[TensorStats]:
    return list({id(s): s for s in stats.values()}.values())


def test_hooks_removed_after_exception():
    linears = {"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)}
    with pytest.raises(RuntimeError, match="boom"):
        with Collector(input_watches(linears, GRAM)) as collector:
            assert all(len(m._forward_pre_hooks) == 1 for m in linears.values())  # an input's: before it runs
            linears["a"](torch.randn(2, 4))
            raise RuntimeError("boom")
    assert all(len(m._forward_hooks) + len(m._forward_pre_hooks) == 0 for m in linears.values())
    assert not collector._handles
    # the modules run hook-free afterwards: no further accumulation
    before = collector.stats[("a", "input")].n_tokens
    linears["a"](torch.randn(5, 4))
    assert collector.stats[("a", "input")].n_tokens == before


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
        with Collector([Watch("lin", layer.lin, "input", GRAM)]):
            layer(torch.randn(2, 4))
    assert len(layer.lin._forward_hooks) + len(layer.lin._forward_pre_hooks) == 0


SHARED_GROUPS = {  # per decoder layer: groups of linears that read one tensor
    "llama": [{"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}, {"mlp.gate_proj", "mlp.up_proj"},
              {"self_attn.o_proj"}, {"mlp.down_proj"}],
    "opt": [{"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}, {"self_attn.out_proj"},
            {"fc1"}, {"fc2"}],
    "gpt2": [{"attn.c_attn"}, {"attn.c_proj"}, {"mlp.c_fc"}, {"mlp.c_proj"}],
}
SHARED_GROUPS["qwen2"] = SHARED_GROUPS["mistral"] = SHARED_GROUPS["llama"]


def test_sharing_on_every_architecture(tiny_model, arch, batches):
    prefix, layers = decoder_layers(tiny_model)
    cpu = torch.device("cpu")
    with calibration_mode(tiny_model):
        inputs = capture_inputs(tiny_model, layers, batches, cpu, cpu)
        linears = layer_linears(layers[1], f"{prefix}.1")
        with Collector(input_watches(linears, frozenset({"gram", "abs_mean"}))) as collector:
            run_layer(layers[1], inputs, cpu, cpu)
    stats = by_name(collector.result())
    groups = [{f"{prefix}.1.{name}" for name in group} for group in SHARED_GROUPS[arch]]
    assert set(stats) == set().union(*groups)
    for group in groups:
        assert len({id(stats[name]) for name in group}) == 1, group
    assert len({id(s) for s in stats.values()}) == len(groups)
    tokens = sum(b.numel() for b in batches)
    for s in stats.values():
        assert s.n_tokens == tokens and s.gram.shape[0] == s.abs_mean.shape[0]


def _accumulate(batches: list[torch.Tensor], kinds: frozenset[str], heads: int | None = None) -> TensorStats:
    stats = TensorStats()
    for x in batches:
        stats.add(x, kinds, heads)
    return stats


def _assert_same_sums(merged: TensorStats, whole: TensorStats) -> None:
    assert merged.n_tokens == whole.n_tokens
    for name in ("gram", "abs_sum", "sq_sum"):
        a, b = getattr(merged, name), getattr(whole, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype == torch.float64, name
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-12), name


@pytest.mark.parametrize("kinds, heads", [
    (frozenset({"gram", "abs_mean"}), None),  # the Gram's diagonal serves sq_norm
    (frozenset({"abs_mean", "sq_norm"}), None),  # sq_norm accumulated on its own
    (frozenset({"gram"}), 4),  # per-head output Grams, (heads, d, d)
])
def test_merged_halves_equal_one_accumulation(kinds, heads):
    """Every accumulator is a plain sum: two halves of the batches accumulated apart and merged equal one pass
    over all of them (what a run spread over several processes sums)."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 5 + i, 16, generator=g) * torch.logspace(-1, 1, 16) for i in range(6)]
    whole = _accumulate(batches, kinds, heads)
    first, second = _accumulate(batches[:3], kinds, heads), _accumulate(batches[3:], kinds, heads)
    merged = first.merge(second)
    assert merged is first
    _assert_same_sums(merged, whole)
    assert whole.n_tokens == sum(b.shape[0] * b.shape[1] for b in batches)
    if heads:
        assert whole.gram.shape == (heads, 4, 4)
        x = torch.cat([b.reshape(-1, 16) for b in batches]).double().reshape(-1, heads, 4)
        assert torch.allclose(whole.gram, torch.einsum("thi,thj->hij", x, x), rtol=1e-5, atol=1e-5)
    if "abs_mean" in kinds:
        assert torch.allclose(merged.abs_mean, whole.abs_mean, rtol=1e-12, atol=1e-12)
    assert torch.allclose(merged.sq_norm, whole.sq_norm, rtol=1e-12, atol=1e-12)
    # merging into an empty accumulation copies, so the partial sums stay independent
    empty = TensorStats().merge(second)
    _assert_same_sums(empty, second)
    for name in ("gram", "abs_sum", "sq_sum"):
        assert getattr(second, name) is None or getattr(empty, name) is not getattr(second, name), name


def test_collected_halves_merge_into_one_collection():
    """The same through the hooks: an input Gram and a per-head output Gram (heads=4) collected on two halves
    of the batches by two collectors, merged, equal one collector's pass over all of them."""
    torch.manual_seed(0)
    linear = nn.Linear(8, 16)
    xs = [torch.randn(3, 5, 8) for _ in range(4)]

    def collect(batches):
        watches = [Watch("lin", linear, "input", frozenset({"gram", "abs_mean"})),
                   Watch("lin", linear, "output", GRAM, heads=4)]
        with torch.no_grad(), Collector(watches) as collector:
            for x in batches:
                linear(x)
        return collector.result()

    whole, first, second = collect(xs), collect(xs[:2]), collect(xs[2:])
    assert set(whole) == {("lin", "input"), ("lin", "output")}
    assert whole[("lin", "output")].gram.shape == (4, 4, 4)
    for key in whole:
        _assert_same_sums(first[key].merge(second[key]), whole[key])
        assert whole[key].n_tokens == 4 * 3 * 5


def test_merged_distance_halves_equal_one_accumulation():
    g = torch.Generator().manual_seed(1)
    pairs = [(torch.randn(2, 8, 16, generator=g), torch.randn(2, 8, 16, generator=g)) for _ in range(6)]
    for tokens in ("all", "last"):
        whole, first, second = DistanceStats(), DistanceStats(), DistanceStats()
        for index, (before, after) in enumerate(pairs):
            whole.add(before, after, tokens)
            (first if index < 3 else second).add(before, after, tokens)
        merged = first.merge(second)
        assert merged is first
        assert merged.count == whole.count == 6 * 2 * (8 if tokens == "all" else 1)
        assert merged.total == pytest.approx(whole.total, rel=1e-12, abs=1e-12)
        assert merged.mean == pytest.approx(whole.mean, rel=1e-12, abs=1e-12)
        assert 0.0 < whole.mean < 1.0


def test_cosine_distance_is_one_minus_the_cosine_per_token():
    g = torch.Generator().manual_seed(2)
    before, after = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    stats = DistanceStats(measure="cosine")
    stats.add(before, after)
    a, b = before.double().reshape(-1, 16), after.double().reshape(-1, 16)
    by_hand = [1 - float(x @ y / (x.norm() * y.norm())) for x, y in zip(a, b)]
    assert stats.count == 10 and stats.mean == pytest.approx(sum(by_hand) / 10, rel=1e-12)
    assert DistanceStats().measure == "angular"  # CURing's default is unchanged


@pytest.mark.parametrize("measure", ["cosine", "angular"])
def test_distances_taken_in_chunks_of_tokens_equal_all_at_once(measure):
    """A batch's distances are taken a chunk of tokens at a time: the same sum bit for bit as the whole
    batch's (SmolLM2's hidden width, a block-influence batch of 8 × 512 tokens)."""
    from compressor.stats.accumulators import DISTANCE_CHUNK, DISTANCES

    g = torch.Generator().manual_seed(3)
    before = torch.randn(8, 512, 576, generator=g)
    after = before + 0.3 * torch.randn(8, 512, 576, generator=g)
    assert 8 * 512 * 576 > 4 * DISTANCE_CHUNK  # several chunks
    for tokens, (a, b) in (("all", (before, after)), ("last", (before[:, -1], after[:, -1]))):
        stats = DistanceStats(measure=measure)
        stats.add(before, after, tokens)
        whole = DISTANCES[measure](a.double(), b.double())
        assert stats.total == float(whole.sum()) and stats.count == whole.numel()


@pytest.mark.parametrize("kwargs", [
    dict(statistic="gram", where="layer"),  # a module statistic asked of a decoder layer
    dict(statistic="angular_distance"),  # where input: the distance compares a layer's input and output
    dict(statistic="angular_distance", where="output"),
    dict(statistic="abs_mean", where="output", per_head=True),  # per head: output Grams only
    dict(statistic="gram", where="input", per_head=True),
])
def test_invalid_requests_are_rejected(kwargs):
    with pytest.raises(ValueError):
        Request(**kwargs)


def test_valid_requests():
    assert Request("gram") == Request("gram", "input", "linear", False, "all")
    Request("angular_distance", where="layer", tokens="last")
    Request("gram", where="output", role="q", per_head=True)
    Request("sq_norm", where="output", role="block")


def test_a_wide_gram_is_summed_in_column_blocks(monkeypatch):
    # the same dot products; BLAS may round a narrow block's differently (equal bits at Llama-3's 8192 columns
    # in 2048-column blocks with this machine's BLAS), so: to fp32 rounding
    from compressor.stats import accumulators

    generator = torch.Generator().manual_seed(8)
    batches = [torch.randn(64, 40, generator=generator) for _ in range(3)]
    whole, blocked = accumulators.TensorStats(), accumulators.TensorStats()
    for x in batches:
        whole.add(x, frozenset({"gram"}))
    monkeypatch.setattr(accumulators, "GRAM_BLOCK_BYTES", 4 * 40 * 7)  # blocks of 7 columns
    for x in batches:
        blocked.add(x, frozenset({"gram"}))
    assert blocked.gram.dtype == torch.float64
    assert torch.allclose(blocked.gram, whole.gram, rtol=1e-6, atol=1e-5)
    assert not torch.equal(blocked.gram, torch.zeros_like(blocked.gram))


@pytest.mark.parametrize("features", [576, 1536])
def test_a_gram_made_as_its_upper_block_triangle_equals_the_whole_product(features):
    """From 512 features a batch's xᵀx is computed as its upper block triangle and mirrored: the same
    entries bit for bit as the whole product (SmolLM2's attention input and intermediate activation)."""
    from compressor.stats import accumulators

    generator = torch.Generator().manual_seed(features)
    x = torch.randn(4096, features, generator=generator) * torch.rand(features, generator=generator) * 3
    assert features >= accumulators.SYMMETRIC_MIN_FEATURES
    assert torch.equal(accumulators._symmetric_gram(x), x.T @ x)
    stats = accumulators.TensorStats()
    for batch in (x, x[:1000]):
        stats.add(batch, frozenset({"gram"}))
    assert torch.equal(stats.gram, (x.T @ x).double() + (x[:1000].T @ x[:1000]).double())


@pytest.mark.parametrize("kinds", [frozenset({"gram", "mean", "abs_mean"}), frozenset({"gram", FP32_GRAM}),
                                   frozenset({"sq_norm"})])
def test_pending_stats_sum_what_eager_accumulation_sums(kinds):
    """A routed expert's statistics keep its batches and sum them when read: the same sums bit for bit as
    accumulating batch by batch, again after ``unsettle`` drops them, and the count without summing."""
    from compressor.stats.accumulators import PendingStats

    torch.manual_seed(0)
    batches = [torch.randn(n, 24) for n in (5, 1, 17)]
    eager, pending = TensorStats(), PendingStats()
    for x in batches:
        eager.add(x, kinds)
        pending.add(x, kinds)
    assert pending.n_tokens == 23 and not pending.settled  # counted, nothing summed yet
    for _ in range(2):
        for name in SUMS:
            mine, theirs = getattr(pending, name), getattr(eager, name)
            assert (mine is None) == (theirs is None) and (mine is None or torch.equal(mine, theirs)), name
        assert pending.n_tokens == 23
        pending.unsettle()
        assert pending.gram is not None or "gram" not in kinds  # read again: summed again
