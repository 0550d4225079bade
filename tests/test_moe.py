"""Mixture-of-experts families and families whose checkpoints transformers renames: each expert's projections
are targets of their own, the layer computes what the family's fused experts compute, outputs reload with the
in-memory logits (``compressor.load``, ``trust_remote_code``, stock ``from_pretrained`` after ``--merge``), and
what is not supported is refused before any weight is read."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers as tf
from conftest import MOE_FAMILIES, SMALL_CALIBRATION, build_config, logits

import compressor
from compressor.api import compress
from compressor.errors import CompressorError
from compressor.model import experts
from compressor.model.modules import Experts
from compressor.model.targets import decoder_linears

FAMILIES = MOE_FAMILIES
MODEGPT = {"modegpt-20", "modegpt-30", "modegpt-mlp-20"}
REFUSED = {  # family → the shipped recipes refused before loading (each with one line)
    "mixtral": set(), "qwen2_moe": set(),  # MoDeGPT's MLP step per expert; plain attention
    "qwen3_moe": MODEGPT - {"modegpt-mlp-20"}, "deepseek_v3": MODEGPT - {"modegpt-mlp-20"},  # q/k norms; latent
    "gpt_neox": MODEGPT | {"curing"}, "phi3": MODEGPT | {"curing"}, "falcon": MODEGPT | {"curing"},  # names
    **{family: MODEGPT - {"modegpt-mlp-20"} for family in ("qwen3", "gemma2", "gemma3", "olmo2", "cohere",
                                                           "stablelm", "phi")},  # attention it would not compute
    "granite": set(), "starcoder2": set(),
    **{family: set() for family in ("llama", "qwen2", "mistral", "opt")}, "gpt2": {"curing"},  # names: c_attn
}


def build(family: str, vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(build_config(family, vocab), dtype=torch.float32)
    with torch.no_grad():  # routers of random models are near uniform: make them decisive, experts distinct
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0.0, 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, tokenizer) -> dict:
    root = tmp_path_factory.mktemp("moe")
    found = {}
    for family in (*FAMILIES, "gpt_neox"):
        path = root / family
        build(family, len(tokenizer)).save_pretrained(path)
        tokenizer.save_pretrained(path)
        found[family] = path
    return found


@pytest.fixture(scope="module")
def ids(tokenizer) -> torch.Tensor:
    return tokenizer("The state of our union is strong. " * 4, return_tensors="pt")["input_ids"][:, :24]


@pytest.mark.parametrize("family", FAMILIES)
def test_unfused_experts_are_targets_and_reproduce_the_model(family, vocab_size, ids):
    """Every expert's gate/up/down becomes a linear of its own (the router and shared experts stay as they
    are), and the model gives the fused model's logits."""
    model = build(family, vocab_size)
    reference = logits(model, ids)
    unfused = copy.deepcopy(model)
    assert experts.unfuse(unfused) == (1 if family == "deepseek_v3" else 2)
    linears = decoder_linears(unfused)
    layer = 1  # deepseek's layer 0 is dense
    for index in range(4):
        for role in ("gate_proj", "up_proj", "down_proj"):
            assert f"model.layers.{layer}.mlp.experts.{index}.{role}" in linears
    assert not any(name.endswith("mlp.gate") for name in linears)  # the router is never a target
    assert not experts.fused_experts(unfused)
    torch.testing.assert_close(logits(unfused, ids), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_expert_at_full_rank_reproduces_the_model(family, vocab_size, ids):
    """Each expert's gate/up/down replaced by its full-rank factors (a compressed module of another kind): the
    routing, top-k and weighting stay the family's, so the logits are the fused model's."""
    from compressor.kernels import linalg
    from compressor.methods.lord import lord_factors
    from compressor.model.modules import LowRankLinear

    model = build(family, vocab_size)
    reference = logits(model, ids)
    experts.unfuse(model)
    replaced = 0
    for name, linear in decoder_linears(model).items():
        if ".experts." in name:
            up, down = lord_factors(linear.weight.detach(), min(linear.weight.shape), linalg.identity(), torch.float64)
            module = LowRankLinear(linear.in_features, linear.out_features, up.shape[1])
            module.up.weight.data.copy_(up)
            module.down.weight.data.copy_(down)
            model.set_submodule(name, module)
            replaced += 1
    assert replaced == 3 * 4 * (1 if family == "deepseek_v3" else 2)
    torch.testing.assert_close(logits(model, ids), reference, rtol=1e-4, atol=1e-4)


def test_calibrating_every_expert_on_every_token_keeps_the_output(vocab_size, ids):
    """``calibrate_all``: the chosen experts' hooks see every token, the layer's output is bit for bit the
    routed one."""
    model = build("mixtral", vocab_size)
    experts.unfuse(model)
    block = model.model.layers[0].mlp
    seen = []
    block.experts.expert(0).gate_proj.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    hidden = torch.randn(1, 24, 64)
    with torch.no_grad():
        routed = block(hidden)
        routed_tokens = sum(seen)
        seen.clear()
        with experts.calibrating_all(model.model.layers[0], "model.layers.0"):
            everyone = block(hidden)
    assert seen == [24] and routed_tokens < 24
    assert torch.equal(routed, everyone)


def stored_keys(folder) -> set[str]:
    from safetensors import safe_open

    keys = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            keys |= set(handle.keys())
    return keys


def run(model_dir, out, calib_file, recipe="lord", *extra, **kwargs):
    return compress(str(model_dir), recipe, out, overrides=[*SMALL_CALIBRATION, f"calibration.dataset={calib_file}",
                                                            *extra], progress=False, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("recipe", ["lord", "rtn-w4-g64", "gptq-w4-eora-r64"])
def test_experts_compress_and_reload(family, recipe, family_dirs, calib_file, ids, tmp_path):
    extra = ["eora.rank=8"] if "eora" in recipe else []
    out = tmp_path / "out"
    summary = run(family_dirs[family], out, calib_file, recipe, *extra)
    expected = logits(summary["model"], ids)
    log = [json.loads(line) for line in (out / "compression_log.jsonl").read_text().splitlines()]
    routed = [e for e in log if ".mlp.experts." in e["name"]]
    assert routed and all(e["kind"] != "dense" for e in routed), "the experts are compressed"
    assert summary["params_after"] < summary["params_before"] or "w4" in recipe
    torch.testing.assert_close(logits(compressor.load(out), ids), expected, rtol=0, atol=1e-5)
    remote = tf.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    torch.testing.assert_close(logits(remote, ids), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_merged_experts_load_in_stock_transformers(family, family_dirs, calib_file, ids, tmp_path):
    out = tmp_path / "out"
    summary = run(family_dirs[family], out, calib_file, "lord", merge=True)
    stock = tf.AutoModelForCausalLM.from_pretrained(out)
    assert experts.fused_experts(stock), "the family's own fused experts"
    original = {"mixtral": "model.layers.0.block_sparse_moe.experts.0.w1.weight",
                "qwen2_moe": "model.layers.0.mlp.experts.0.gate_proj.weight"}[family]
    assert original in stored_keys(out), "written in the family's checkpoint layout, as serving stacks read it"
    torch.testing.assert_close(logits(stock, ids), logits(summary["model"], ids), rtol=0, atol=1e-5)


def test_experts_with_too_few_routed_tokens_are_calibrated_on_all(family_dirs, calib_file, tmp_path):
    """With a threshold above any expert's share every expert falls back to every token, and the log says how
    many tokens were routed to each: per layer they add up to tokens × top-k."""
    out = tmp_path / "out"
    run(family_dirs["mixtral"], out, calib_file, "lord", "moe_min_tokens=100000")
    log = [json.loads(line) for line in (out / "compression_log.jsonl").read_text().splitlines()]
    gates = [e for e in log if e["name"].startswith("model.layers.0.mlp.experts.") and e["name"].endswith("gate_proj")]
    assert len(gates) == 4
    routed = [int(e["moe_calibration"].split("(")[1].split()[0]) for e in gates]
    assert sum(routed) == 4 * 32 * 2  # n_samples × seq_len tokens, each to 2 experts
    assert all(e["moe_calibration"].startswith("all tokens") for e in log if ".experts." in e["name"])


@pytest.mark.parametrize("mode", ["routed", "all"])
def test_experts_statistics_count_the_tokens_their_mode_gives_them(mode, family_dirs, calib_file, ids, tmp_path,
                                                                   monkeypatch):
    """routed: each token reaches its top-2 experts, so a layer's experts' gate_proj statistics count
    2 × the calibration tokens in all, each fewer than every token; all: every expert counts every token. The
    output reloads with the in-memory logits either way."""
    from compressor.methods.lord import LoRD

    seen, compress_linear = {}, LoRD.compress_linear

    def counting(self, target, ctx):
        seen[target.name] = target.stats.n_tokens
        return compress_linear(self, target, ctx)

    monkeypatch.setattr(LoRD, "compress_linear", counting)
    out = tmp_path / "out"
    summary = run(family_dirs["qwen3_moe"], out, calib_file, "lord", f"moe_calibration={mode}", "moe_min_tokens=1")
    tokens = 4 * 32  # SMALL_CALIBRATION: 4 windows of 32 tokens
    for layer in (0, 1):
        counts = [seen[f"model.layers.{layer}.mlp.experts.{e}.gate_proj"] for e in range(4)]
        assert counts == [tokens] * 4 if mode == "all" else (sum(counts) == 2 * tokens and max(counts) < tokens)
    torch.testing.assert_close(logits(compressor.load(out), ids), logits(summary["model"], ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family,merge", [*((family, False) for family in FAMILIES), ("mixtral", True)])
def test_streamed_experts_give_the_in_memory_output(family, merge, family_dirs, calib_file, ids, tmp_path):
    """--stream reads each expert's projections from the checkpoint's own tensors (Mixtral's w1/w3/w2 under
    block_sparse_moe, Qwen's per-expert names) and writes the output the in-memory run writes."""
    streamed, in_memory = tmp_path / "streamed", tmp_path / "memory"
    run(family_dirs[family], streamed, calib_file, "lord", stream=True, merge=merge)
    summary = run(family_dirs[family], in_memory, calib_file, "lord", merge=merge)
    load = tf.AutoModelForCausalLM.from_pretrained if merge else compressor.load
    torch.testing.assert_close(logits(load(streamed), ids), logits(summary["model"], ids), rtol=0, atol=1e-5)


def test_modegpt_refuses_latent_attention_before_loading(family_dirs, calib_file, tmp_path, monkeypatch):
    from compressor.model import loading

    def never(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(loading, "load", never)
    with pytest.raises(CompressorError, match="attention is not one modegpt's smaller attention computes"):
        run(family_dirs["deepseek_v3"], tmp_path / "out", calib_file, "modegpt-20")


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_modegpt_shrinks_each_experts_mlp_on_its_own_tokens(family, family_dirs, calib_file, ids, tmp_path):
    """MoDeGPT's MLP step on a mixture of experts: each routed expert (and a shared expert, a dense first layer)
    keeps the layer's share of its intermediate channels, chosen by Nyström from its own routed tokens' Gram; the
    output reloads with the in-memory logits."""
    out = tmp_path / "out"
    summary = run(family_dirs[family], out, calib_file, "modegpt-mlp-20")
    model = summary["model"]
    layer = 1
    widths = {model.model.layers[layer].mlp.experts.expert(e).down_proj.in_features for e in range(4)}
    assert len(widths) == 1 and widths.pop() < (48 if family == "deepseek_v3" else 96)  # the layer's share
    log = [json.loads(line) for line in (out / "compression_log.jsonl").read_text().splitlines()]
    shrunk = {e["name"] for e in log if e.get("kept_channels")}
    assert {f"model.layers.{layer}.mlp.experts.{e}.down_proj" for e in range(4)} <= shrunk
    if family == "deepseek_v3":  # its shared experts and its dense first layer are MLPs too
        assert {"model.layers.1.mlp.shared_experts.down_proj", "model.layers.0.mlp.down_proj"} <= shrunk
    # each expert's channels are its own: the gate rows kept differ between experts of one layer
    original = tf.AutoModelForCausalLM.from_pretrained(family_dirs[family])
    experts.unfuse(original)
    kept = []
    for e in range(2):
        gate = model.model.layers[layer].mlp.experts.expert(e).gate_proj.weight
        full = original.model.layers[layer].mlp.experts.expert(e).gate_proj.weight
        kept.append({int(((full - row).abs().sum(1) == 0).nonzero()[0]) for row in gate})
    assert kept[0] != kept[1]
    torch.testing.assert_close(logits(compressor.load(out), ids), logits(model, ids), rtol=0, atol=1e-5)
    remote = tf.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    torch.testing.assert_close(logits(remote, ids), logits(model, ids), rtol=0, atol=1e-5)


def test_unsupported_expert_layouts_are_refused():
    class Transposed(torch.nn.Module):  # gpt-oss-like: biased, transposed experts
        has_bias, is_transposed = True, True

        def __init__(self):
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(torch.zeros(2, 8, 6))
            self.down_proj = torch.nn.Parameter(torch.zeros(2, 3, 8))

    model = torch.nn.Sequential(Transposed())
    with pytest.raises(CompressorError, match="cannot be compressed yet"):
        experts.unfuse(model)


@pytest.mark.parametrize("stream", [False, True])
def test_renamed_head_reloads(stream, family_dirs, calib_file, ids, tmp_path):
    """GPT-NeoX's checkpoints name the head embed_out; the model, transformers 5, lm_head: read and written
    under the model's names, in memory and streamed alike."""
    out = tmp_path / "out"
    summary = run(family_dirs["gpt_neox"], out, calib_file, "lord", stream=stream)
    loaded = compressor.load(out)
    if stream:
        in_memory = run(family_dirs["gpt_neox"], tmp_path / "memory", calib_file, "lord")
        torch.testing.assert_close(logits(loaded, ids), logits(in_memory["model"], ids), rtol=0, atol=1e-5)
    else:
        torch.testing.assert_close(logits(loaded, ids), logits(summary["model"], ids), rtol=0, atol=1e-5)
    original = tf.AutoModelForCausalLM.from_pretrained(family_dirs["gpt_neox"])
    assert torch.equal(loaded.get_output_embeddings().weight, original.get_output_embeddings().weight)
    assert "embed_out.weight" in stored_keys(out)  # the family's checkpoint name, in memory and streamed


def test_experts_kind_rebuilds_from_its_spec():
    module = Experts(3, 8, 5, "silu")
    rebuilt = compressor.model.modules.from_spec(module.spec())
    assert isinstance(rebuilt, Experts) and rebuilt.spec() == module.spec()
    assert set(dict(rebuilt.named_parameters())) == set(dict(module.named_parameters()))


def test_recipes_select_experts_by_name(family_dirs, calib_file, tmp_path):
    """``targets: [experts]`` takes every routed expert's linears and nothing else; ``ignore`` wins."""
    from conftest import small_recipe

    recipe = small_recipe({"steps": [{"method": "lord", "targets": ["experts"], "ignore": ["experts.3"],
                                      "config": {"ratio": 0.2, "whiten": "none"}}]}, str(calib_file))
    out = tmp_path / "out"
    compress(str(family_dirs["qwen2_moe"]), recipe, out, progress=False)
    log = [json.loads(line) for line in (out / "compression_log.jsonl").read_text().splitlines()]
    names = {e["name"] for e in log}
    assert names == {f"model.layers.{layer}.mlp.experts.{index}.{role}" for layer in (0, 1) for index in range(3)
                     for role in ("gate_proj", "up_proj", "down_proj")}


TINY = {"curing": ["curing.n_layers=1"], "eora": ["eora.rank=8"], "lqlora": ["lqlora.rank=8"]}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(REFUSED))
def test_every_shipped_recipe_reloads_or_is_refused(family, tokenizer, calib_file, ids, tmp_path):
    """Every shipped recipe on each family (3 layers, so CURing has a layer to choose): an output that
    ``compressor.load`` and ``trust_remote_code=True`` rebuild with the in-memory logits, or a one-line refusal
    that leaves nothing at --out."""
    import conftest

    from compressor.plan.recipe import shipped

    config = build_config(family, len(tokenizer), layers=3)
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    refused = {}
    for name, path in sorted(shipped().items()):
        extra = [x for method, more in TINY.items() if f"method: {method}" in path.read_text() for x in more]
        out = tmp_path / name
        try:
            summary = run(model_dir, out, calib_file, name, *extra)
        except CompressorError as exc:
            assert "\n" not in str(exc) and not out.exists()
            refused[name] = str(exc)
            continue
        expected = conftest.logits(summary["model"], ids)
        torch.testing.assert_close(conftest.logits(compressor.load(out), ids), expected, rtol=0, atol=1e-5, msg=name)
        remote = tf.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
        torch.testing.assert_close(conftest.logits(remote, ids), expected, rtol=0, atol=1e-5, msg=name)
    assert set(refused) == REFUSED[family], refused


def test_upcycled_model_gives_the_dense_logits(vocab_size, ids):
    """scripts/upcycle.py: a dense Llama's MLP copied into 8 experts behind a random top-2 router gives the
    dense model's logits (the renormalized routing weights sum to 1), in Mixtral's layout."""
    import sys
    from pathlib import Path

    from conftest import build_model

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from upcycle import upcycle

    dense = build_model("llama", vocab_size)
    moe = upcycle(dense, experts=8, top_k=2, seed=0)
    assert type(moe).__name__ == "MixtralForCausalLM" and experts.fused_experts(moe)
    torch.testing.assert_close(logits(moe, ids), logits(dense, ids), rtol=1e-5, atol=1e-5)
    routed = moe.model.layers[0].mlp.gate(torch.randn(64, dense.config.hidden_size))[2]  # (tokens, 2) chosen
    assert len(routed.unique()) > 2  # the router spreads tokens over the experts


ATTENTION_REFUSED = {"qwen3": "query/key norms", "gemma2": "attention logit soft-capping",
                     "phi": "rotary embeddings on 0.5", "cohere": "interleaved rotary embeddings"}


@pytest.mark.parametrize("family", sorted(ATTENTION_REFUSED))
def test_modegpt_attention_refuses_what_it_would_not_compute(family, tokenizer, calib_file, tmp_path, monkeypatch):
    """MoDeGPT's smaller attention computes the plain attention of Llama-like families; a family whose
    attention has more (q/k norms, soft-capping, partial rotary) is refused before any weight is read."""
    from conftest import small_recipe

    from compressor.model import loading

    reason = ATTENTION_REFUSED[family]
    model_dir = tmp_path / family
    tf.AutoModelForCausalLM.from_config(build_config(family, len(tokenizer))).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    monkeypatch.setattr(loading, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("weights read")))
    recipe = small_recipe({"steps": [{"method": "modegpt", "config": {"ratio": 0.2, "part": "attention"}}]},
                          str(calib_file))
    with pytest.raises(CompressorError, match=f"attention has {reason}"):
        compress(str(model_dir), recipe, tmp_path / "out", progress=False)


def test_eora_over_experts_is_a_peft_adapter(family_dirs, calib_file, ids, tmp_path):
    """The compensation paths of quantized experts form a PEFT adapter over the dequantized base, whose experts
    are the per-expert linears the adapter names: base + adapter gives the compressed model's logits."""
    peft = pytest.importorskip("peft")
    from compressor.io import dequantized_base

    out = tmp_path / "out"
    summary = run(family_dirs["mixtral"], out, calib_file, "gptq-w4-g64-eora-r64", "eora.rank=8",
                  "quantize.group_size=32")
    from safetensors.torch import load_file

    assert any(".experts." in key for key in load_file(str(out / "adapter" / "adapter_model.safetensors")))
    model = peft.PeftModel.from_pretrained(dequantized_base(out), out / "adapter")
    torch.testing.assert_close(logits(model, ids), logits(summary["model"], ids), rtol=0, atol=1e-4)


@pytest.mark.parametrize("family,stream", [("mixtral", False), ("mixtral", True), ("qwen2_moe", False),
                                           ("deepseek_v3", False)])
def test_quantized_experts_load_in_stock_transformers(family, stream, family_dirs, calib_file, ids, tmp_path):
    """Symmetric quantized experts: compressed-tensors tensors under the family's per-expert names (Mixtral's
    ``w1``/``w2``/``w3``), a quantization_config whose ``ignore`` holds the routers, and stock
    ``from_pretrained`` (no remote code) gives the in-memory logits."""
    out = tmp_path / "out"
    summary = run(family_dirs[family], out, calib_file, "rtn-w4-g64", "quantize.group_size=16",
                  "quantize.symmetric=true", stream=stream)
    expected = logits(compressor.load(out) if stream else summary["model"], ids)
    manifest = compressor.io.read_manifest(out)
    assert manifest["serving"]["compressed_tensors"] and manifest["serving"]["stock_transformers"]
    expert = {"mixtral": "model.layers.0.block_sparse_moe.experts.0.w1",
              "qwen2_moe": "model.layers.0.mlp.experts.0.gate_proj",
              "deepseek_v3": "model.layers.1.mlp.experts.0.gate_proj"}[family]
    assert {f"{expert}.weight_packed", f"{expert}.weight_scale"} <= stored_keys(out)
    config = json.loads((out / "config.json").read_text())
    router = "model.layers.1.mlp.gate"
    assert config["model_type"] == family and router in config["quantization_config"]["ignore"]
    if family == "mixtral":  # the checkpoint's name too, which vLLM matches
        assert "model.layers.1.block_sparse_moe.gate" in config["quantization_config"]["ignore"]
    stock = tf.AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(stock, ids), expected, rtol=0, atol=1e-5)


def test_asymmetric_experts_say_stock_transformers_cannot_dequantize_them(family_dirs, calib_file, ids, tmp_path):
    """transformers 5's expert loader drops zero points: the manifest and card say so (and how to load it),
    the config stays the family's (vLLM), and the remote code and compressor.load give the in-memory logits."""
    from compressor.io import serving

    out = tmp_path / "out"
    summary = run(family_dirs["mixtral"], out, calib_file, "gptq-w4-g64-eora-r64", "eora.rank=8",
                  "quantize.group_size=16")
    entry = compressor.io.read_manifest(out)["serving"]
    assert entry["transformers"] == serving.TRANSFORMERS_ASYMMETRIC_EXPERTS and not entry["stock_transformers"]
    assert entry["adapter_base"] == serving.ADAPTER_OVER_EXPERTS
    assert "cannot dequantize them" in (out / "README.md").read_text()
    assert json.loads((out / "config.json").read_text())["model_type"] == "mixtral"
    remote = tf.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    torch.testing.assert_close(logits(remote, ids), logits(summary["model"], ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("recipe", ["lord", "gptq-w4-g64-eora-r64"])
def test_a_layer_holds_one_experts_sums_at_a_time(recipe, family_dirs, calib_file, ids, tmp_path, monkeypatch):
    """Experts' statistics stay as their routed batches until their group reads them, and go back to batches
    (or away) after it, through every step (GPTQ then EoRA on statistics collected once): at most one expert
    input's sums exist at any time; the output is the one eager accumulation gives."""
    import weakref

    from compressor.stats import accumulators, hooks

    live, most = weakref.WeakValueDictionary(), [0]  # id → every PendingStats that settled, while alive
    settle = accumulators.PendingStats.settle

    def counting(self):
        settle(self)
        live[id(self)] = self
        most[0] = max(most[0], sum(1 for s in live.values() if s.batches and s.settled))

    monkeypatch.setattr(accumulators.PendingStats, "settle", counting)
    # no fallback: experts calibrated on every token read one tensor, hence share one accumulator (one more)
    extra = ["moe_min_tokens=1", *(["eora.rank=8", "quantize.group_size=16"] if "eora" in recipe else [])]
    pending = run(family_dirs["mixtral"], tmp_path / "pending", calib_file, recipe, *extra)
    assert most[0] == 1
    monkeypatch.setattr(hooks, "PendingStats", accumulators.TensorStats)  # eager: every expert's Gram at once
    eager = run(family_dirs["mixtral"], tmp_path / "eager", calib_file, recipe, *extra)
    assert torch.equal(logits(pending["model"], ids), logits(eager["model"], ids))
