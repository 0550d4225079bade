"""``compressor export OUT --format gguf --to FILE.gguf``: a model (a compressed output, or any MODEL) as one
GGUF file llama.cpp runs, and its EoRA / LQ-LoRA compensation as a GGUF LoRA adapter (``--adapter-to``).

Types (``--type``):

- ``auto`` (default): nothing is rounded again. Quantized layers whose grid a GGML block type holds are
  written in it (4-bit symmetric g32 → Q4_0, 4-bit asymmetric g32 → Q4_1, 8-bit symmetric g32 → Q8_0;
  only the fp16 rounding of the blocks' d and m differs, ``kernels.gguf_blocks``); every other matrix in
  the model's own float type (f32, f16, bf16). A quantized layer no block type holds is refused, naming it.
- ``f32``, ``f16``, ``bf16``, ``q8_0``, ``q4_0``, ``q4_1``: every matrix in that type. Layers already in it
  are written exactly; other quantized layers are dequantized and re-quantized with llama.cpp's own
  round-to-nearest (``gguf.quants``), and the report says how many. A matrix whose rows are not whole
  blocks of 32 falls back to f16 (llama.cpp's converter does the same).

One-dimensional tensors (norms, biases), routers and position embeddings are always f32.

Compensated layers (EoRA, LQ-LoRA): with ``--adapter-to`` their low-rank paths are written as a llama.cpp
LoRA adapter (``general.type = adapter``, ``adapter.type = lora``, tensors ``<weight>.lora_a`` (r, in) and
``.lora_b`` (out, r), f32, ``adapter.lora.alpha`` = the most common rank, so scale α/r = 1; a module of
another rank has its ``lora_b`` scaled by r/α to keep scale 1). Without it they are merged into dense
weights, which needs an explicit ``--type`` (never silently). llama.cpp: ``llama-cli -m FILE --lora ADAPTER``.

Nothing is placed before everything is checked and written: each file is written under a temporary name
beside its target and renamed at the end; a failure removes the temporary files.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import CompressorError
from . import gguf_arch, gguf_tensors, gguf_vocab
from .gguf_tensors import Collected, Grid

TYPES = ("auto", "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")
FLOAT_TYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
ALWAYS_F32 = (".ffn_gate_inp.weight", "position_embd.weight", ".ffn_gate_inp_shexp.weight")


@dataclass
class Report:
    """What ``export`` wrote, for the command's output."""

    file: Path
    arch: str
    parameters: int
    types: dict[str, int]            # GGML type → tensors written in it
    exact: int                       # quantized layers written in their own block type
    requantized: int                 # quantized layers dequantized and rounded again (--type)
    merged_factorized: int
    merged_compensation: int
    adapter: Path | None
    adapter_modules: int
    notes: list[str]

    def lines(self) -> list[str]:
        types = ", ".join(f"{n} {t}" for t, n in sorted(self.types.items()))
        lines = [f"wrote {self.file} ({self.arch}, {self.parameters:,} parameters; {types})"]
        if self.exact:
            lines.append(f"{self.exact} quantized layers written in their own GGUF block type (no second rounding)")
        if self.requantized:
            lines.append(f"{self.requantized} quantized layers dequantized and re-quantized to the requested type")
        if self.merged_factorized:
            lines.append(f"{self.merged_factorized} low-rank/CUR layers merged to dense (llama.cpp has no "
                         "factorized linear)")
        if self.merged_compensation:
            lines.append(f"{self.merged_compensation} compensation paths (EoRA/LQ-LoRA) merged into the weights")
        if self.adapter is not None:
            lines.append(f"wrote {self.adapter} (llama.cpp LoRA adapter, {self.adapter_modules} modules, scale 1)")
        return lines + [f"note: {note}" for note in self.notes]


def load_model(source: str, trust_remote_code: bool = False) -> tuple[Any, Path, Callable[[], None]]:
    """(model, folder holding its tokenizer, cleanup) for a compressed output or any MODEL."""
    import tempfile

    from .checkpoint import MANIFEST, load

    path = Path(source).expanduser()
    if (path / MANIFEST).is_file():
        return load(path), path, lambda: None
    from ..model import loading

    model, tokenizer = loading.load(source, trust_remote_code=trust_remote_code)
    folder = Path(tempfile.mkdtemp(prefix="compressor-gguf-tokenizer-"))
    tokenizer.save_pretrained(folder)
    import shutil

    return model, folder, lambda: shutil.rmtree(folder, ignore_errors=True)


def _check_target(file: Path, option: str) -> None:
    if file.is_dir():
        raise CompressorError(f"{option} {file} is a directory; give a file name (FILE.gguf)")
    if not file.parent.is_dir():
        raise CompressorError(f"{option} {file}: its folder {file.parent} does not exist")


def _model_float(model: Any) -> str:
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return FLOAT_TYPES.get(dtype, "F32")


def _ggml_type(requested: str, name: str, shape: tuple[int, ...], weight: Any, float_type: str) -> str:
    """The GGML type one tensor is written in."""
    if len(shape) == 1 or name.endswith(ALWAYS_F32):
        return "F32"
    if requested == "auto":
        return weight.kind if isinstance(weight, Grid) else float_type
    kind = requested.upper()
    if kind.startswith("Q") and shape[-1] % 32:
        return "F16"
    return kind


def _encode(weight: Any, kind: str) -> tuple[np.ndarray, Any]:
    """(array, raw GGML type or None) of one tensor in ``kind``."""
    import gguf

    from ..kernels import gguf_blocks

    if isinstance(weight, Grid) and weight.kind == kind:
        rows = weight.q.reshape(-1, weight.q.shape[-1])
        scale = weight.scale.reshape(-1, weight.scale.shape[-1])
        zero = None if weight.zero_point is None else weight.zero_point.reshape(-1, weight.zero_point.shape[-1])
        data = gguf_blocks.exact_blocks(kind, rows, scale, zero)
        return data.reshape(*weight.shape[:-1], -1), getattr(gguf.GGMLQuantizationType, kind)
    dense = (weight.dense() if isinstance(weight, Grid) else weight).detach().float().cpu().numpy()
    if kind == "F32":
        return np.ascontiguousarray(dense, dtype=np.float32), None
    if kind == "F16":
        return dense.astype(np.float16), None
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    return gguf.quants.quantize(np.ascontiguousarray(dense), qtype), qtype


def _check(collected: Collected, requested: str, adapter: bool) -> None:
    """Refusals before anything is written."""
    if requested == "auto" and collected.inexact:
        first = collected.inexact[0]
        raise CompressorError(f"GGUF export: {len(collected.inexact)} quantized layers have no exact GGUF block "
                              f"type, e.g. {first}; pass --type q4_1, q4_0 or q8_0 to re-quantize them from the "
                              "dequantized weights, or f16/f32 to write them dequantized")
    if requested == "auto" and collected.merged_compensation:
        raise CompressorError(f"GGUF export: {collected.merged_compensation} layers carry a low-rank compensation "
                              "(EoRA/LQ-LoRA); pass --adapter-to FILE.gguf to write it as a llama.cpp LoRA adapter, "
                              "or --type to merge it into the weights")
    if adapter and not collected.loras:
        raise CompressorError("--adapter-to: the model has no low-rank compensation (EoRA/LQ-LoRA) to write")


def _ff_lengths(collected: Collected, config: Any, family: gguf_arch.Family, layers: int) -> list[int]:
    """Each layer's MLP width, from its ``ffn_down`` (a model whose layers differ, MoDeGPT's, gets one each)."""
    if family.experts:
        return [config.intermediate_size]
    widths = []
    for index in range(layers):
        down = collected.tensors.get(f"blk.{index}.ffn_down.weight")
        if down is None:
            return [getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
                    or 4 * config.hidden_size]
        widths.append(down.shape[-1])
    return widths


def _writer(path: Path, arch: str, adapter: bool = False):
    import gguf

    return gguf.GGUFWriter(str(path), arch, use_temp_file=False)


def _write_model(temp: Path, model: Any, family: gguf_arch.Family, collected: Collected, requested: str,
                 tokenizer_folder: Path, name: str) -> Report:
    config = model.config
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    writer = _writer(temp, family.name)
    gguf_arch.write_hyperparameters(writer, config, family, _ff_lengths(collected, config, family, layers))
    embedding = collected.tensors["token_embd.weight"]
    notes = gguf_vocab.write_tokenizer(writer, tokenizer_folder, embedding.shape[0], name)
    float_type = _model_float(model)
    types: Counter = Counter()
    exact = requantized = parameters = 0
    for gguf_name, weight in collected.tensors.items():
        kind = _ggml_type(requested, gguf_name, tuple(weight.shape), weight, float_type)
        if isinstance(weight, Grid):
            exact += weight.kind == kind
            requantized += weight.kind != kind and kind.startswith("Q")
        data, raw = _encode(weight, kind)
        writer.add_tensor(gguf_name, data, raw_dtype=raw)
        types[kind] += 1
        parameters += int(np.prod(weight.shape))
    if requested.startswith("q"):
        requantized += len(collected.inexact)
    writer.add_file_type(_file_type(types))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Report(temp, family.name, parameters, dict(types), exact, requantized, collected.merged_factorized,
                  collected.merged_compensation, None, 0, notes)


def _file_type(types: Counter) -> int:
    """``general.file_type``: the type most matrices are in (llama.cpp's LLAMA_FTYPE numbering)."""
    import gguf

    matrices = {k: n for k, n in types.items() if k != "F32"} or dict(types)
    kind = max(matrices, key=matrices.get)
    return {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
            "BF16": gguf.LlamaFileType.MOSTLY_BF16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
            "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}[kind]


def _write_adapter(temp: Path, family: gguf_arch.Family, loras: dict[str, tuple[torch.Tensor, torch.Tensor]],
                   name: str) -> int:
    """The llama.cpp LoRA adapter of ``loras`` (gguf weight name → (A (r, in), B (out, r))); returns α."""
    alpha = Counter(down.shape[0] for down, _ in loras.values()).most_common(1)[0][0]
    writer = _writer(temp, family.name)
    writer.add_name(f"{name} adapter")
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(alpha))
    for gguf_name, (down, up) in loras.items():
        rank = down.shape[0]
        writer.add_tensor(f"{gguf_name}.lora_a", down.float().contiguous().numpy())  # (r, in)
        writer.add_tensor(f"{gguf_name}.lora_b", (up.float() * (rank / alpha)).contiguous().numpy())  # (out, r)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return alpha


def export_gguf(source: str, to: Path, type_: str = "auto", adapter_to: Path | None = None,
                trust_remote_code: bool = False) -> Report:
    """Write ``source`` (a compressed output directory or any MODEL) as the GGUF file ``to`` and, with
    ``adapter_to``, its compensation paths as a llama.cpp LoRA adapter. Refusals come before anything is written."""
    if type_ not in TYPES:
        raise CompressorError(f"--type {type_!r}: one of {', '.join(TYPES)}")
    to = Path(to)
    _check_target(to, "--to")
    if adapter_to is not None:
        adapter_to = Path(adapter_to)
        _check_target(adapter_to, "--adapter-to")
        if adapter_to.resolve() == to.resolve():
            raise CompressorError("--adapter-to must differ from --to")
    model, tokenizer_folder, cleanup = load_model(source, trust_remote_code)
    temps = [to.with_name(f".{to.name}.tmp-{os.getpid()}")]
    if adapter_to is not None:
        temps.append(adapter_to.with_name(f".{adapter_to.name}.tmp-{os.getpid()}"))
    try:
        family = gguf_arch.describe(model.config)
        with torch.no_grad():
            collected = gguf_tensors.collect(model, family, adapter=adapter_to is not None)
        _check(collected, type_, adapter_to is not None)
        name = Path(source).name or str(source)
        report = _write_model(temps[0], model, family, collected, type_, tokenizer_folder, name)
        if adapter_to is not None:
            _write_adapter(temps[1], family, collected.loras, name)
            report.adapter, report.adapter_modules = adapter_to, len(collected.loras)
        os.replace(temps[0], to)
        if adapter_to is not None:
            os.replace(temps[1], adapter_to)
        report.file = to
        return report
    finally:
        for temp in temps:
            temp.unlink(missing_ok=True)
        cleanup()
