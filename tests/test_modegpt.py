"""MoDeGPT on tiny Llama (GQA), Qwen2 (biases) and OPT (no RoPE): keeping every dim reproduces the model
through the shrunk attention; each module's output error on calibration inputs falls as more dims are
kept; the Nyström refit beats slicing alone; the allocation meets the target exactly; the post-RoPE
statistic is the Gram of transformers' own rotated queries; the shrunk model saves and reloads with
identical logits; generation with the KV cache equals generation without."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import logits, run_steps, small_recipe

from compressor import api, io
from compressor.errors import CompressorError
from compressor.evaluation.evaluate import generation_speed
from compressor.methods import modegpt_math as mg
from compressor.methods.modegpt import MoDeGPT, kept_counts
from compressor.model import loading as models
from compressor.model.attention import ShrunkAttention
from compressor.stats.hooks import Collector, Watch


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


def attention_of(model, index: int, arch: str):
    layers = model.model.decoder.layers if arch == "opt" else model.model.layers
    return layers[index].self_attn


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt"])
def test_keeping_every_dim_reproduces_the_model(arch, model_dirs, batches, ids, monkeypatch):
    model = models.load(str(model_dirs[arch]))[0]
    before = logits(model, ids)
    # the shrunk attention at full width (the pipeline itself keeps a block whose dims are all kept)
    monkeypatch.setattr(MoDeGPT, "compress_attention",
                        lambda self, group, ctx: self.shrink_attention(group, ctx, group.arch.head_dim,
                                                                       group.arch.head_dim))
    run_steps(model, [{"method": "modegpt", "config": {"ratio": 0.0}}], batches, propagate="original",
              statistics="once")
    assert all(isinstance(attention_of(model, i, arch), ShrunkAttention) for i in range(2))
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-4, atol=1e-4)


def attention_calls(model, batches, index: int, arch: str) -> list[tuple[tuple, dict, torch.Tensor]]:
    """(args, kwargs, output) of every call of layer ``index``'s attention on the calibration batches."""
    calls = []
    handle = attention_of(model, index, arch).register_forward_hook(
        lambda m, args, kwargs, out: calls.append((args, kwargs, out[0].detach())), with_kwargs=True)
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch, use_cache=False)
    handle.remove()
    return calls


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt"])
@pytest.mark.parametrize("covariance", ["pre_rope", "post_rope"])
def test_attention_error_falls_as_more_dims_are_kept(arch, covariance, model_dirs, batches):
    if arch == "opt" and covariance == "post_rope":
        pytest.skip("OPT has no rotary embedding")
    source = models.load(str(model_dirs[arch]))[0]
    calls = attention_calls(source, batches, 1, arch)
    errors = []
    for ratio in (0.6, 0.4, 0.2):
        model = copy.deepcopy(source)
        config = {"ratio": ratio, "smoothing": 10.0, "part": "attention", "qk_covariance": covariance}
        report = run_steps(model, [{"method": "modegpt", "config": config}], batches, propagate="original",
                           statistics="once")
        keep = report.plan.steps[0].decision.values["keep"]
        head_dim = 16
        if arch != "opt":  # RoPE: whole pairs, exactly round(ratio · layers · 8) of them removed
            assert sum(head_dim - k["qk_dims"] for k in keep.values()) == 2 * round(ratio * 2 * head_dim / 2)
        assert sum(head_dim - k["v_dims"] for k in keep.values()) == round(ratio * 2 * head_dim)
        shrunk = attention_of(model, 1, arch)
        assert isinstance(shrunk, ShrunkAttention) and shrunk.qk_dim == keep[1]["qk_dims"]
        with torch.no_grad():
            error = sum(float((shrunk(*args, **kwargs)[0] - out).square().sum()) for args, kwargs, out in calls)
        errors.append((error / sum(float(out.square().sum()) for _, _, out in calls)) ** 0.5)
    assert errors[0] > errors[1] > errors[2] > 0


def test_rotated_statistic_is_the_gram_of_transformers_rotated_queries(model_dirs, batches):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = models.load(str(model_dirs["llama"]))[0]
    attention = model.model.layers[0].self_attn
    seen = {}
    handles = [attention.q_proj.register_forward_hook(lambda m, a, out: seen.update(q=out)),
               attention.register_forward_pre_hook(
                   lambda m, a, kw: seen.update(rope=kw["position_embeddings"]), with_kwargs=True)]
    watch = Watch("q", attention.q_proj, "rotated", frozenset({"gram"}), 4, attention)
    with Collector([watch]) as collector, torch.no_grad():
        model(input_ids=batches[0], use_cache=False)
    for handle in handles:
        handle.remove()
    q = seen["q"].view(*seen["q"].shape[:2], 4, 16).transpose(1, 2)  # (batch, heads, seq, d)
    rotated, _ = apply_rotary_pos_emb(q, q, *seen["rope"])
    per_head = rotated.transpose(0, 1).reshape(4, -1, 16).double()  # (heads, tokens, d)
    expected = per_head.transpose(1, 2) @ per_head
    got = collector.result()[("q", "rotated")].gram
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, (q.transpose(0, 1).reshape(4, -1, 16).double().mT
                                    @ q.transpose(0, 1).reshape(4, -1, 16).double()), rtol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt", "gpt2"])
def test_generate_with_the_cache_equals_without(arch, model_dirs, batches, ids):
    model = models.load(str(model_dirs[arch]))[0]
    run_steps(model, [{"method": "modegpt", "config": {"ratio": 0.4}}], batches, propagate="original",
              statistics="once")
    prompt = ids[:1, :12]
    cached = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=False)
    assert cached.shape[1] == 22 and torch.equal(cached, uncached)
    # the speed measurement's own greedy loop generates the same tokens
    speed = generation_speed(model, prompt, new_tokens=9)
    assert torch.equal(speed["generated"], cached[:, 12:]) and speed["decode_tokens_per_s"] > 0


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
            [{"method": "modegpt", "config": {"ratio": ratio, "smoothing": 10.0, "part": "mlp"}}],
            batches,
            propagate="original",
            statistics="once",
        )
        _, compressed = mlp_inputs(model, batches, 1, arch)
        with torch.no_grad():
            errors.append(float((compressed(x) - target).norm() / target.norm()))
        decision = report.plan.steps[0].decision.values["keep"]
        assert sum(k["channels"] for k in decision.values()) == round((1 - ratio) * 2 * 128)  # exactly, in channels
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
    assert set(decision) == {"influence", "sparsity", "kept_channels", "kept_qk_dims", "kept_v_dims", "widths"}
    assert decision["widths"] == {"channels": 128, "head_dim": 16}
    kept = decision["kept_channels"]
    assert sum(kept.values()) == round(0.75 * 2 * 128)
    for layer, width in kept.items():
        spec = manifest["modules"][f"model.layers.{layer}.mlp.down_proj"]
        assert spec["kind"] == "dense" and spec["in_features"] == width
        attention = manifest["modules"][f"model.layers.{layer}.self_attn"]
        assert attention["kind"] == "shrunk_attention"
        assert (attention["qk_dim"], attention["v_dim"]) == (decision["kept_qk_dims"][layer],
                                                              decision["kept_v_dims"][layer])
        assert f"model.layers.{layer}.self_attn.q_proj" not in manifest["modules"]  # the block rebuilds it
    reloaded = io.load(tmp_path / "out")
    assert torch.equal(logits(reloaded, ids), logits(summary["model"], ids))
    assert torch.equal(reloaded.model.layers[0].self_attn.rope_dims, summary["model"].model.layers[0].self_attn.rope_dims)
    removed = 1 - summary["params_after"] / summary["params_before"]
    assert summary["params_after"] < summary["params_before"] and removed > 0.1
    # 64 of 256 MLP channels, 4 of 16 query/key RoPE pairs, 8 of 32 value dims: exactly a quarter of the
    # targeted linears' 73,728 parameters (per layer q 64×64, k and v 32×64, o 64×64, MLP 3×128×64)
    assert summary["reduction"]["targeted_params_before"] == 73728
    assert summary["reduction"]["param_reduction"] == pytest.approx(0.25, abs=1e-12)


def test_merge_is_refused_before_any_work(model_dirs, small_text, tmp_path):
    data = {"steps": [{"method": "modegpt", "config": {"ratio": 0.25}}]}
    with pytest.raises(CompressorError, match="--merge: modegpt changes the layers' own dimensions"):
        api.compress(str(model_dirs["llama"]), small_recipe(data, small_text), tmp_path / "out", merge=True,
                     progress=False)
    assert not (tmp_path / "out").exists()


def test_group_output_errors_equal_probes_run_from_the_start_of_the_layer(model_dirs, small_text, tmp_path,
                                                                          monkeypatch):
    """The group output errors reuse the block calls recorded by the statistics forward and by the previous
    group's probe: the same errors bit for bit as running the layer from its start for each group."""
    import json

    from compressor.pipeline import compress

    data = {"propagate": "original", "statistics": "once", "steps": [{"method": "modegpt", "config": {"ratio": 0.25}}]}

    def errors(out):
        api.compress(str(model_dirs["llama"]), small_recipe(data, small_text), out, progress=False)
        log = [json.loads(line) for line in (out / io.LOG).read_text().splitlines()]
        return [e["rel_group_output_error"] for e in log]

    reused = errors(tmp_path / "reused")
    runs = []
    probe = compress.probe_calls
    monkeypatch.setattr(compress, "probe_calls", lambda visit, names: runs.append(names) or probe(visit, names))
    errors(tmp_path / "counted")
    assert runs == [["model.layers.0.self_attn", "model.layers.0.mlp"],
                    ["model.layers.1.self_attn", "model.layers.1.mlp"]]  # one partial run per layer
    # nothing recorded by the statistics forward, each probe runs only as far as its own group
    record = compress.recording_calls
    monkeypatch.setattr(compress, "recording_calls",
                        lambda visit, names, stop=False: record(visit, names if stop else [], stop))
    monkeypatch.setattr(compress, "probe_calls", lambda visit, names: probe(visit, names[:1]))
    from_start = errors(tmp_path / "from_start")
    assert len(reused) == 14 and all(e is not None and 0 < e < 2 for e in reused)  # 7 linears per layer
    assert reused == from_start
