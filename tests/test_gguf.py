"""GGUF export (``compressor export --format gguf``): exact blocks, every family llama.cpp holds from the test
matrix read back through the ``gguf`` package's reader, refusals with nothing written, and, where
llama-cpp-python is installed, the exported model's logits in llama.cpp against ``compressor.load``'s."""

from __future__ import annotations

import copy

import gguf
import numpy as np
import pytest
import torch
from conftest import MATRIX, build_model, small_recipe

from compressor import api, io
from compressor.errors import CompressorError
from compressor.io import gguf_arch, gguf_tensors
from compressor.io.gguf_export import export_gguf
from compressor.kernels import gguf_blocks, quant

# every family of the test matrix that llama.cpp has (it has no OPT)
FAMILIES = [f for f in MATRIX if f in ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "gpt2", "phi3",
                                       "gpt_neox", "falcon", "mixtral", "qwen3_moe", "qwen2_moe", "deepseek_v3")]
REFUSED = [f for f in MATRIX if f not in FAMILIES]


def as_llama_cpp_computes(config) -> None:
    """Gemma's query scale set to 1/√head_dim and its head tied (what llama.cpp computes); Qwen3-MoE's top-k
    weights renormalized (llama.cpp's qwen3moe does, as Qwen3-MoE models do)."""
    if hasattr(config, "query_pre_attn_scalar"):
        config.query_pre_attn_scalar = config.head_dim
        config.tie_word_embeddings = True
    if config.model_type == "qwen3_moe":
        config.norm_topk_prob = True


def tiny(arch: str, vocab: int, seed: int = 0):
    """``conftest.build_model`` as llama.cpp computes it."""
    return build_model(arch, vocab, seed, edit=as_llama_cpp_computes)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer, vocab_size):
    """family → a saved tiny model directory (made once)."""
    made = {}

    def make(arch: str):
        if arch not in made:
            folder = tmp_path_factory.mktemp(f"gguf-{arch}")
            tok = copy.deepcopy(tokenizer)
            tiny(arch, len(tok)).save_pretrained(folder)
            tok.save_pretrained(folder)
            made[arch] = folder
        return made[arch]

    return make


def read(path) -> tuple[dict, dict[str, np.ndarray]]:
    """(metadata key → value, tensor name → dequantized array in numpy's (out, in) order) of a GGUF file."""
    reader = gguf.GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
               for t in reader.tensors}
    return fields, tensors


def unpermute(rows: np.ndarray, heads: int) -> np.ndarray:
    """transformers' q/k rows from llama.cpp's order (the inverse of ``gguf_arch.permute_rows``)."""
    shape = rows.shape
    return rows.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


# --- blocks ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,symmetric,kind", [(4, True, "Q4_0"), (4, False, "Q4_1"), (8, True, "Q8_0")])
def test_exact_blocks_dequantize_to_our_grid(bits, symmetric, kind):
    torch.manual_seed(0)
    weight = torch.randn(6, 96)
    q, scale, zero = quant.rtn(weight, bits, symmetric, 32, scale_dtype=torch.float16)
    ours = quant.dequantize(q, scale, None if symmetric else zero, 32)
    assert gguf_blocks.exact_type(bits, 32, symmetric, 96) == kind
    blocks = gguf_blocks.exact_blocks(kind, q, scale, None if symmetric else zero)
    back = gguf.quants.dequantize(blocks, getattr(gguf.GGMLQuantizationType, kind))
    # fp16 scales: d is exact; Q4_1's m = −s·(z + 8) is rounded to fp16 once
    tolerance = 0 if symmetric else scale.float().abs().max().item() * 8 * 2 ** -10
    assert np.abs(back - ours.numpy()).max() <= tolerance


def test_no_exact_type_for_other_grids():
    assert gguf_blocks.exact_type(4, 64, False, 128) is None
    assert gguf_blocks.exact_type(3, 32, False, 128) is None
    assert gguf_blocks.exact_type(8, 32, False, 128) is None
    assert gguf_blocks.exact_type(4, 32, True, 48) is None


def test_permutation_is_llama_cpp_converter_order():
    rows = torch.arange(2 * 8 * 3).reshape(16, 3)  # 2 heads of 8
    expected = rows.reshape(2, 2, 4, 3).swapaxes(1, 2).reshape(16, 3)  # convert_hf_to_gguf's permute
    assert torch.equal(gguf_arch.permute_rows(rows, 2), expected)
    assert np.array_equal(unpermute(expected.numpy(), 2), rows.numpy())


# --- every family -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", FAMILIES)
def test_family_round_trip_f32(arch, saved, tmp_path):
    folder = saved(arch)
    report = export_gguf(str(folder), tmp_path / "m.gguf", "f32")
    fields, tensors = read(tmp_path / "m.gguf")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    vocab_size = model.config.vocab_size
    family = gguf_arch.describe(model.config)
    assert fields["general.architecture"] == family.name and report.arch == family.name
    assert fields[f"{family.name}.block_count"] == model.config.num_hidden_layers
    assert len(fields["tokenizer.ggml.tokens"]) == vocab_size
    embed = model.get_input_embeddings().weight.detach().numpy()
    assert np.array_equal(tensors["token_embd.weight"], embed)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    params = sum(p.numel() for p in model.parameters())
    params += sum(b.numel() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))  # routing
    assert report.parameters == params == sum(t.size for t in tensors.values())
    assert ("output.weight" in tensors) != tied
    assert all(np.isfinite(t).all() for t in tensors.values())


def test_phi3_name_kept_only_with_phi3_tokens(saved, tmp_path):
    """llama.cpp looks up Phi-3's special tokens in any model named phi3 and fails to load without them: the test
    tokenizer lacks </s>, so the name is written without 'phi3' and said; a vocabulary with them keeps it."""
    folder = saved("phi3")
    assert "phi3" in folder.name
    report = export_gguf(str(folder), tmp_path / "m.gguf", "f32")
    fields, _ = read(tmp_path / "m.gguf")
    assert fields["general.name"] == folder.name.replace("phi3", "phi")
    assert any("general.name written as" in note and "</s>" in note for note in report.notes)
    from compressor.io import gguf_vocab

    assert gguf_vocab.model_name("Phi-3-mini", ["</s>", "<unk>", "<s>", b"<|endoftext|>"]) == ("Phi-3-mini", None)
    assert gguf_vocab.model_name("my-llama", []) == ("my-llama", None)


@pytest.mark.parametrize("edit,what", [(lambda c: setattr(c, "alibi", True), "ALiBi"),
                                       (lambda c: setattr(c, "parallel_attn", False), "sequential attention")])
def test_falcon_variants_llama_cpp_lacks_refused(edit, what, tmp_path, tokenizer):
    folder = tmp_path / "model"
    build_model("falcon", len(tokenizer), edit=edit).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with pytest.raises(CompressorError, match=f"llama.cpp's falcon .* this model has {what}"):
        export_gguf(str(folder), tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("arch", REFUSED)
def test_family_refused_before_writing(arch, saved, tmp_path):
    with pytest.raises(CompressorError, match="not one this exporter describes"):
        export_gguf(str(saved(arch)), tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


# --- quantized and compensated outputs --------------------------------------------------------------------


def compressed(tmp_path, folder, small_text, steps):
    out = tmp_path / "out"
    api.compress(str(folder), small_recipe({"steps": steps}, small_text), out, progress=False)
    return out


def quantize(bits=4, symmetric=False, group_size=32):
    return {"method": "quantize", "config": {"algorithm": "rtn", "bits": bits, "group_size": group_size,
                                             "symmetric": symmetric}}


@pytest.mark.parametrize("bits,symmetric,kind", [(4, False, "Q4_1"), (4, True, "Q4_0"), (8, True, "Q8_0")])
def test_quantized_layers_written_exactly(bits, symmetric, kind, saved, tmp_path, small_text):
    out = compressed(tmp_path, saved("llama"), small_text, [quantize(bits, symmetric)])
    report = export_gguf(str(out), tmp_path / "m.gguf")
    assert report.exact == 14 and report.requantized == 0 and report.types[kind] == 14
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert {t.name: t.tensor_type.name for t in reader.tensors}["blk.0.attn_q.weight"] == kind
    _, tensors = read(tmp_path / "m.gguf")
    model = io.load(out)
    config = model.config
    for name, module, heads in (("blk.1.ffn_down", model.model.layers[1].mlp.down_proj, None),
                                ("blk.0.attn_q", model.model.layers[0].self_attn.q_proj, config.num_attention_heads),
                                ("blk.0.attn_k", model.model.layers[0].self_attn.k_proj, config.num_key_value_heads)):
        ours = module.dense_weight().detach().numpy()
        back = tensors[f"{name}.weight"] if heads is None else unpermute(tensors[f"{name}.weight"], heads)
        scale = module.weight_scale.abs().max().item()
        assert np.abs(back - ours).max() <= scale * 2 ** bits * 2 ** -10  # the fp16 rounding of d and m: |q|·ulp/2


def test_other_grids_refused_unless_requantized(saved, tmp_path, small_text):
    out = compressed(tmp_path, saved("llama"), small_text, [quantize(group_size=64)])
    with pytest.raises(CompressorError, match="no exact GGUF block type.*--type q4_1"):
        export_gguf(str(out), tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists() and not list(tmp_path.glob(".m.gguf*"))
    report = export_gguf(str(out), tmp_path / "m.gguf", "q4_1")
    assert report.requantized == 14 and report.types["Q4_1"] == 16  # and embeddings, head


def test_eora_adapter(saved, tmp_path, small_text):
    out = compressed(tmp_path, saved("llama"), small_text, [quantize(), {"method": "eora", "config": {"rank": 8}}])
    with pytest.raises(CompressorError, match="--adapter-to"):
        export_gguf(str(out), tmp_path / "m.gguf")
    report = export_gguf(str(out), tmp_path / "m.gguf", adapter_to=tmp_path / "a.gguf")
    assert report.exact == 14 and report.adapter_modules == 14
    fields, tensors = read(tmp_path / "a.gguf")
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 8.0 and fields["general.architecture"] == "llama"
    model = io.load(out)
    lora = model.model.layers[0].mlp.up_proj.lora
    assert np.array_equal(tensors["blk.0.ffn_up.weight.lora_a"], lora.down.weight.detach().numpy())  # (r, in)
    assert np.array_equal(tensors["blk.0.ffn_up.weight.lora_b"], lora.up.weight.detach().numpy())  # (out, r)
    report = export_gguf(str(out), tmp_path / "merged.gguf", "f32")
    assert report.merged_compensation == 14


def test_low_rank_merged(saved, tmp_path, small_text):
    out = compressed(tmp_path, saved("qwen2"), small_text, [{"method": "lord", "config": {"ratio": 0.5}}])
    report = export_gguf(str(out), tmp_path / "m.gguf")
    assert report.merged_factorized > 0
    _, tensors = read(tmp_path / "m.gguf")
    model = io.load(out)
    ours = model.model.layers[0].mlp.up_proj.dense_weight().detach().numpy()
    np.testing.assert_allclose(tensors["blk.0.ffn_up.weight"], ours, rtol=0, atol=1e-6)


def test_modegpt_mlp_widths_per_layer(saved, tmp_path, small_text):
    from compressor.plan import recipe as recipes

    out = tmp_path / "out"
    api.compress(str(saved("llama")), small_recipe(recipes.read("modegpt-mlp-20"), small_text), out, progress=False)
    export_gguf(str(out), tmp_path / "m.gguf")
    fields, tensors = read(tmp_path / "m.gguf")
    widths = [tensors[f"blk.{i}.ffn_down.weight"].shape[1] for i in range(2)]
    assert fields["llama.feed_forward_length"] == widths and widths[0] != widths[1]


def test_shrunk_attention_refused(saved, tmp_path, small_text):
    from compressor.plan import recipe as recipes

    out = tmp_path / "out"
    api.compress(str(saved("llama")), small_recipe(recipes.read("modegpt-20"), small_text), out, progress=False)
    with pytest.raises(CompressorError, match="shrunk attention"):
        export_gguf(str(out), tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_bad_options_write_nothing(saved, tmp_path):
    folder = saved("llama")
    with pytest.raises(CompressorError, match="--type"):
        export_gguf(str(folder), tmp_path / "m.gguf", "q5_k")
    with pytest.raises(CompressorError, match="no low-rank compensation"):
        export_gguf(str(folder), tmp_path / "m.gguf", adapter_to=tmp_path / "a.gguf")
    with pytest.raises(CompressorError, match="is a directory"):
        export_gguf(str(folder), tmp_path)
    assert list(tmp_path.iterdir()) == []


# --- in llama.cpp -----------------------------------------------------------------------------------------


def llama_cpp_logits(path, ids: list[int], lora=None) -> np.ndarray:
    """(tokens, vocab) logits of ``ids`` in llama.cpp (f32 KV cache, one thread)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    kwargs = {"lora_path": str(lora)} if lora else {}
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1,
                          type_k=0, type_v=0, **kwargs)
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    return logits


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("arch", FAMILIES)
def test_llama_cpp_logits_f32(arch, saved, tmp_path, ids):
    pytest.importorskip("llama_cpp")
    folder = saved(arch)
    export_gguf(str(folder), tmp_path / "m.gguf", "f32")
    row = ids[0, :16]
    theirs = llama_cpp_logits(tmp_path / "m.gguf", row.tolist())
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        ours = model(row[None]).logits[0].numpy()
    # ggml computes GELU (Gemma's, GPT-NeoX's and Falcon's activation; the last two use the exact erf form) as the
    # tanh approximation from an fp16 table: 1.6e-4 to 3e-4 here
    assert relative(theirs, ours) < (1e-3 if arch.startswith("gemma") or arch in ("gpt_neox", "falcon") else 1e-4)


@pytest.mark.filterwarnings("ignore:step 0 \\(quantize\\)")  # the experts' width 48: no vLLM config, as said
def test_llama_cpp_quantized_latent_attention(saved, tmp_path, small_text, ids):
    """DeepSeek-V3 quantized: kv_b_proj, split per head for llama.cpp, has no exact block; the export says so
    and, with --type q8_0, llama.cpp computes what compressor.load does (within Q8_0's re-rounding)."""
    pytest.importorskip("llama_cpp")
    out = compressed(tmp_path, saved("deepseek_v3"), small_text, [quantize(bits=8, symmetric=True)])
    model = io.load(out)
    with torch.no_grad():
        collected = gguf_tensors.collect(model, gguf_arch.describe(model.config), adapter=False)
    assert "model.layers.1.self_attn.kv_b_proj.weight (split per head for llama.cpp)" in collected.inexact
    assert collected.tensors["blk.1.attn_k_b.weight"].shape == (4, 32, 8)  # (heads, kv_lora_rank, nope)
    with pytest.raises(CompressorError, match="no exact GGUF block type"):
        export_gguf(str(out), tmp_path / "m.gguf")
    report = export_gguf(str(out), tmp_path / "m.gguf", "q8_0")
    assert report.requantized > 0
    row = ids[0, :16]
    with torch.no_grad():
        ours = model(row[None]).logits[0].numpy()
    assert relative(llama_cpp_logits(tmp_path / "m.gguf", row.tolist()), ours) < 2e-2


def falcon_40b_style(config) -> None:
    """Falcon's new decoder (two kv heads, each with its query group; ln_attn and ln_mlp)."""
    config.new_decoder_architecture, config.num_kv_heads = True, 2


def neox_sequential(config) -> None:
    config.use_parallel_residual = False


@pytest.mark.parametrize("arch,edit", [("falcon", falcon_40b_style), ("gpt_neox", neox_sequential)])
def test_llama_cpp_logits_variants(arch, edit, tmp_path, tokenizer, ids):
    """The other layouts of the fused qkv rows (grouped by kv head) and GPT-NeoX's sequential residual."""
    pytest.importorskip("llama_cpp")
    folder = tmp_path / "model"
    model = build_model(arch, len(tokenizer), edit=edit)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    export_gguf(str(folder), tmp_path / "m.gguf", "f32")
    row = ids[0, :16]
    with torch.no_grad():
        ours = model(row[None]).logits[0].numpy()
    assert relative(llama_cpp_logits(tmp_path / "m.gguf", row.tolist()), ours) < 1e-3  # GELU, as above


def test_llama_cpp_logits_quantized_with_adapter(saved, tmp_path, small_text, ids):
    pytest.importorskip("llama_cpp")
    out = compressed(tmp_path, saved("llama"), small_text, [quantize(), {"method": "eora", "config": {"rank": 8}}])
    export_gguf(str(out), tmp_path / "m.gguf", adapter_to=tmp_path / "a.gguf")
    row = ids[0, :16]
    model = io.load(out)
    with torch.no_grad():
        ours = model(row[None]).logits[0].numpy()
        for layer in model.model.layers:  # the base alone: each compensated module without its lora
            for module in layer.modules():
                if getattr(module, "kind", None) == "compensated":
                    module.lora.up.weight.zero_()
        base = model(row[None]).logits[0].numpy()
    # llama.cpp multiplies Q4 blocks with Q8_0-quantized activations: more than the fp16 rounding of d and m
    assert relative(llama_cpp_logits(tmp_path / "m.gguf", row.tolist()), base) < 2e-2
    assert relative(llama_cpp_logits(tmp_path / "m.gguf", row.tolist(), tmp_path / "a.gguf"), ours) < 2e-2
