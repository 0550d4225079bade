"""The layer walk on tiny models of five architectures (Llama, Qwen2, Mistral, OPT, GPT-2 with Conv1D)."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, logits, run_steps
from torch import nn
from transformers.pytorch_utils import Conv1D

from compressor.errors import CompressorError
from compressor.methods import registry
from compressor.model.modules import LowRankLinear
from compressor.ranks import uniform as ranks
from compressor.walk.layers import capture_inputs

# every linear inside the decoder layers, per layer (independent of compressor.model.targets)
LINEARS_PER_LAYER = {"llama": 7, "qwen2": 7, "mistral": 7, "opt": 6, "gpt2": 4}
LAYER_PREFIX = {"llama": "model.layers", "qwen2": "model.layers", "mistral": "model.layers",
                "opt": "model.decoder.layers", "gpt2": "transformer.h"}


def walk(model, config: dict, batches, propagate: str = "compressed", targets=(), ignore=()):
    """One LoRD step over ``model`` in place (data-free when the config needs no statistics)."""
    uses_data = registry.create("lord", config).uses_data
    step = {"method": "lord", "config": config, "targets": list(targets), "ignore": list(ignore)}
    return run_steps(model, [step], batches if uses_data else None, propagate=propagate)


def decoder_linears(model, arch: str) -> dict[str, nn.Module]:
    """The dense linears inside the decoder layers of an uncompressed model."""
    prefix = LAYER_PREFIX[arch]
    return {name: m for name, m in model.named_modules()
            if name.startswith(prefix + ".") and isinstance(m, (nn.Linear, Conv1D))}


def low_rank(model) -> dict[str, LowRankLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


@pytest.mark.parametrize("whiten", ["none", "activation", "gram"])
def test_full_rank_factorization_reproduces_logits(tiny_model, arch, ids, batches, monkeypatch, whiten):
    """rank_reduction 0 asks for rank min(m, n); with the break-even check switched off every linear is
    really factorized at full rank, and the model's logits must not change."""
    monkeypatch.setattr(ranks, "saves_parameters", lambda rank, m, n: True)
    before = logits(tiny_model, ids)
    report = walk(tiny_model, {"rank_reduction": 0.0, "whiten": whiten}, batches)
    swapped = low_rank(tiny_model)
    assert len(swapped) == LINEARS_PER_LAYER[arch] * 2
    assert all(m.rank == min(m.in_features, m.out_features) for m in swapped.values())
    assert all(entry["kind"] == "low_rank" for entry in report.log)
    after = logits(tiny_model, ids)
    assert (after - before).abs().max() <= 1e-4
    assert max(entry["rel_error"] for entry in report.log) < 1e-5


@pytest.mark.parametrize("whiten", ["none", "activation", "gram"])
def test_lord_ratio_runs_on_every_architecture(tiny_model, arch, ids, batches, whiten):
    before = logits(tiny_model, ids)
    n_params = sum(p.numel() for p in tiny_model.parameters())
    dense = decoder_linears(tiny_model, arch)
    assert len(dense) == LINEARS_PER_LAYER[arch] * 2
    report = walk(tiny_model, {"ratio": 0.2, "whiten": whiten}, batches)

    assert [e["name"] for e in report.log] == list(dense)  # one entry per decoder linear, in layer order
    swapped = low_rank(tiny_model)
    assert set(swapped) == set(dense)
    for entry in report.log:
        m, n = entry["shape"]
        assert entry["rank"] == int(0.8 * m * n / (m + n))
        assert entry["params_after"] < entry["params_before"]
        assert 0 < entry["rel_error"] < 1
        if whiten == "none":
            assert entry["rel_output_error"] is None
        if whiten == "gram":
            assert 0 < entry["rel_output_error"] < 1
        module = swapped[entry["name"]]
        assert module.dense_class == ("Conv1D" if arch == "gpt2" else "Linear")
        assert (module.out_features, module.in_features) == (m, n)
    removed = n_params - sum(p.numel() for p in tiny_model.parameters())
    assert removed == sum(e["params_before"] - e["params_after"] for e in report.log)
    after = logits(tiny_model, ids)
    assert torch.isfinite(after).all()
    assert not torch.allclose(after, before, atol=1e-4)  # ratio 0.2 changes the model


def test_gram_whitening_has_smaller_output_error_than_plain(llama, batches):
    plain = walk(build_model("llama", llama.config.vocab_size), {"ratio": 0.4, "whiten": "none"}, batches)
    gram = walk(llama, {"ratio": 0.4, "whiten": "gram"}, batches)
    # layer 0 sees the same inputs in both runs; measure plain's error on those inputs via its Gram
    layer0 = [e for e in gram.log if ".0." in e["name"]]
    assert all(e["rel_output_error"] is not None for e in layer0)
    mean_gram = sum(e["rel_output_error"] for e in layer0) / len(layer0)
    mean_plain_weight = sum(e["rel_error"] for e in plain.log if ".0." in e["name"]) / len(layer0)
    mean_gram_weight = sum(e["rel_error"] for e in layer0) / len(layer0)
    assert mean_gram < mean_plain_weight  # whitened output error is below plain's weight error
    assert mean_gram_weight >= mean_plain_weight  # and plain SVD is the optimum in weight space


def test_propagate_original_vs_compressed(batches, vocab_size):
    weights = {}
    for propagate in ("compressed", "original"):
        model = build_model("llama", vocab_size)
        walk(model, {"ratio": 0.4, "whiten": "gram"}, batches, propagate=propagate)
        weights[propagate] = {n: m.dense_weight() for n, m in low_rank(model).items()}
    compressed, original = weights["compressed"], weights["original"]
    assert set(compressed) == set(original) and len(compressed) == 14
    for name in compressed:
        if ".layers.0." in name:  # layer 0 sees the same inputs either way
            assert torch.allclose(compressed[name], original[name], atol=1e-6), name
    differ = [n for n in compressed
              if ".layers.1." in n and not torch.allclose(compressed[n], original[n], atol=1e-4)]
    assert len(differ) == 7  # every linear of layer 1 was calibrated on different inputs


def test_propagate_does_not_matter_without_data(batches, vocab_size):
    out = []
    for propagate in ("compressed", "original"):
        model = build_model("llama", vocab_size)
        walk(model, {"ratio": 0.4, "whiten": "none"}, batches, propagate=propagate)
        out.append({n: m.dense_weight() for n, m in low_rank(model).items()})
    assert all(torch.equal(out[0][n], out[1][n]) for n in out[0])


@pytest.mark.parametrize("propagate", ["compressed", "original"])
@pytest.mark.parametrize("whiten", ["none", "gram"])
def test_layers_without_targets_still_propagate(vocab_size, batches, ids, propagate, whiten):
    """Targets only in layer 1: layer 0 is untouched, but layer 1 must still be calibrated on its outputs."""
    model = build_model("llama", vocab_size)
    report = walk(model, {"ratio": 0.2, "whiten": whiten}, batches, propagate=propagate,
                  targets=[r"re:layers\.1\."])
    assert len(report.log) == 7 and all(".layers.1." in e["name"] for e in report.log)
    assert set(low_rank(model)) == {e["name"] for e in report.log}
    if whiten == "gram":  # statistics of layer 1 are those of the real layer-1 inputs
        reference = build_model("llama", vocab_size)
        full = walk(reference, {"ratio": 0.2, "whiten": "gram"}, batches, propagate="original")
        expected = {e["name"]: e["rel_output_error"] for e in full.log if ".layers.1." in e["name"]}
        for e in report.log:
            assert e["rel_output_error"] == pytest.approx(expected[e["name"]], rel=1e-4)


@pytest.mark.parametrize("targets, ignore, expected", [
    (["mlp.down_proj"], [], {"mlp.down_proj"}),
    (["down_proj", "q_proj"], [], {"mlp.down_proj", "self_attn.q_proj"}),
    ([], ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
     {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}),
    (["re:self_attn\\.[qk]_proj$"], [], {"self_attn.q_proj", "self_attn.k_proj"}),
    (["re:mlp"], ["up_proj"], {"mlp.gate_proj", "mlp.down_proj"}),  # ignore wins
    (["re:.*"], [], {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}),
])
def test_targets_and_ignore(llama, targets, ignore, expected):
    report = walk(llama, {"ratio": 0.2}, None, targets=targets, ignore=ignore)
    swapped = set(low_rank(llama))
    assert swapped == {f"model.layers.{i}.{s}" for i in (0, 1) for s in expected}
    assert {e["name"] for e in report.log} == swapped


def test_targets_that_match_nothing_are_an_error_naming_the_linears(llama):
    """A suffix matches on a dot boundary only, so "proj" matches nothing: refused, not "0/0 compressed"."""
    with pytest.raises(CompressorError, match=r"targets \['proj'\].*match none.*mlp\.down_proj"):
        walk(llama, {"ratio": 0.2}, None, targets=["proj"])


def test_targets_on_gpt2_conv1d(vocab_size):
    model = build_model("gpt2", vocab_size)
    walk(model, {"ratio": 0.2}, None, targets=["c_proj"], ignore=[r"re:\.1\."])
    assert set(low_rank(model)) == {"transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj"}
    model = build_model("gpt2", vocab_size)
    walk(model, {"ratio": 0.2}, None, targets=["mlp.c_proj"])
    assert set(low_rank(model)) == {"transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"}


@pytest.mark.parametrize("targets", [[], ["re:.*"],
                                     ["re:embed|lm_head|wte|wpe|embed_tokens|embed_positions"]])
def test_embeddings_and_head_are_never_touched(tiny_model, arch, batches, targets):
    outside = {name: p.detach().clone() for name, p in tiny_model.named_parameters()
               if not name.startswith(LAYER_PREFIX[arch] + ".")}
    head = tiny_model.get_output_embeddings()
    if targets and "embed" in targets[0]:  # they match no decoder linear: refused, the model untouched
        with pytest.raises(CompressorError, match="match none"):
            walk(tiny_model, {"ratio": 0.5, "whiten": "gram"}, batches, targets=targets)
    else:
        walk(tiny_model, {"ratio": 0.5, "whiten": "gram"}, batches, targets=targets)
    assert tiny_model.get_output_embeddings() is head and isinstance(head, nn.Linear)
    assert isinstance(tiny_model.get_input_embeddings(), nn.Embedding)
    for name, module in low_rank(tiny_model).items():
        assert name.startswith(LAYER_PREFIX[arch] + ".")
    after = dict(tiny_model.named_parameters())
    for name, value in outside.items():
        assert torch.equal(after[name], value), name


def test_model_ratio_through_the_walk(llama, batches):
    n_params = sum(p.numel() for p in llama.parameters())
    walk(llama, {"model_ratio": 0.3, "whiten": "gram"}, batches)
    removed = 1 - sum(p.numel() for p in llama.parameters()) / n_params
    assert 0.3 <= removed < 0.33


def test_two_steps_on_one_layer(llama, batches, ids):
    """A second LoRD step at a lower rank refactorizes the first step's output."""
    steps = [{"method": "lord", "config": {"ratio": 0.2, "whiten": "gram"}, "targets": [], "ignore": []},
             {"method": "lord", "config": {"rank": 8, "whiten": "none"}, "targets": ["mlp.down_proj"],
              "ignore": []}]
    report = run_steps(llama, steps, batches)
    assert len(report.log) == 14 + 2
    down = llama.model.layers[0].mlp.down_proj
    assert isinstance(down, LowRankLinear) and down.rank == 8
    up = llama.model.layers[0].mlp.up_proj
    assert isinstance(up, LowRankLinear) and up.rank == 34
    assert torch.isfinite(logits(llama, ids)).all()


def test_walk_restores_mode_and_cache_flag(llama, batches):
    llama.train()
    use_cache = llama.config.use_cache
    walk(llama, {"ratio": 0.2, "whiten": "gram"}, batches)
    assert llama.training and llama.config.use_cache == use_cache
    assert all(p.device.type == "cpu" for p in llama.parameters())
    assert all(len(m._forward_hooks) == 0 and len(m._forward_pre_hooks) == 0 for m in llama.modules())


def test_capture_stops_at_layer_zero(vocab_size, batches):
    """The capture pass must not run the decoder layers (StopForward)."""
    model = build_model("llama", vocab_size)
    calls = []
    handle = model.model.layers[1].register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        _, layers = model.model, model.model.layers
        captured = capture_inputs(model, layers, batches, torch.device("cpu"), torch.device("cpu"))
    finally:
        handle.remove()
    assert not calls
    assert len(captured) == len(batches) and captured[0].hidden.shape == (2, 32, 64)


def test_release_group_drops_only_what_no_later_group_reads():
    """A compressed group's statistics go once no later group shares them (q/k/v read one accumulator), with
    the factors memoized on them and the group's original weights."""
    import torch

    from compressor.contract import LayerContext
    from compressor.pipeline.compress import release_group
    from compressor.plan.compile import GroupSpec
    from compressor.stats.accumulators import TensorStats

    shared, own = TensorStats(), TensorStats()
    stats = {("q", "input"): shared, ("k", "input"): shared, ("o", "input"): own, ("o", "output"): TensorStats()}
    specs = [GroupSpec("linear", name, 0, {"linear": name}) for name in ("q", "k", "o")]
    ctx = LayerContext(0, 1, torch.device("cpu"), torch.float32)
    ctx.memo = {(1, "whitening", id(shared)): (shared, "factor"), (1, "whitening", id(own)): (own, "factor")}
    originals = {"q": torch.zeros(1), "k": torch.zeros(1), "o": torch.zeros(1)}
    release_group(specs[0], specs[1:], stats, ctx, originals)  # k still reads q's accumulator
    assert stats[("q", "input")] is shared and (1, "whitening", id(shared)) in ctx.memo and "q" not in originals
    release_group(specs[1], specs[2:], stats, ctx, originals)
    assert ("q", "input") not in stats and ("k", "input") not in stats
    assert list(ctx.memo) == [(1, "whitening", id(own))] and set(originals) == {"o"}
    release_group(specs[2], [], stats, ctx, originals)
    assert stats == {} and ctx.memo == {} and originals == {}
