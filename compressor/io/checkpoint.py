"""Saving and reloading compressed models.

Output directory::

    config.json, generation_config.json, tokenizer files    # the base model's; config.json gets the module
                             # specs and auto_map (``compressor`` entry), a quantization_config, and
                             # model_type compressor-<base> where stock loaders would not rebuild the modules
    modeling_compressor.py   # the modules and loader for trust_remote_code (serving.write_remote_code)
    model.safetensors (or shards + model.safetensors.index.json)
    compression.json         # format version, recipe as applied, per-module kind/shapes/rank, counts
    compression_log.jsonl    # one line per targeted module: rank, parameters, errors, seconds
    README.md                # the model card: Hub metadata, recipe, summary, how to load (model_card.py)
    adapter/                 # compensated models: the low-rank paths as a PEFT LoRA adapter (export.py)

Quantized linears are stored packed in compressed-tensors' layout, with a ``quantization_config`` in
config.json where compressed-tensors can describe them; compensated linears store their base under their
own name and their low-rank path in ``adapter/`` (export.py), so vLLM, ``transformers`` and ``peft`` load it.

``storage_dtype`` is the dtype of every floating tensor in the files (unquantized weights, factors, the
adapter, quantization scales), recorded as config.json's ``dtype``; by default the dtype the model was
compressed in. It rounds copies made for the write; the model in memory is not changed.

Everything is written into a temporary sibling directory and renamed at the end, so an
interrupted run never leaves a half-written output. ``load`` rebuilds the architecture from
config.json, swaps in empty compressed modules from the manifest, and loads the tensors.
``merge=True`` writes dense weights instead, which plain ``from_pretrained`` loads.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .. import __version__
from ..errors import CompressorError
from ..model.modeling_compressor import load_compressed
from ..model.modules import MODULE_KINDS, spec_of
from ..model.modules import merge as merge_module
from . import model_card
from . import serving as export

FORMAT_VERSION = 1
MANIFEST = "compression.json"
LOG = "compression_log.jsonl"
MAX_SHARD_SIZE = "2GB"


def check_output(out: Path, overwrite: bool) -> None:
    """Fail early (before any work) if ``out`` cannot be written."""
    if out.exists() and not out.is_dir():
        raise CompressorError(f"output path exists and is not a directory: {out}")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CompressorError(f"output directory is not empty: {out} (use --overwrite to replace it)")
    for parent in out.resolve().parents:
        if parent.exists():
            if not parent.is_dir():
                raise CompressorError(f"cannot create {out}: {parent} is not a directory")
            break


@contextmanager
def atomic_directory(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``out`` only if the block completes."""
    check_output(out, overwrite)
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.resolve().parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the output is an ordinary directory
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.resolve().parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def compressed_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name → outermost compressed module (the parts of a ``compensated`` module are not listed)."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if getattr(module, "kind", None) in MODULE_KINDS and not any(name.startswith(f"{o}.") for o in found):
            found[name] = module
    return found


def merge_in_place(model: nn.Module) -> int:
    """Replace every compressed module by its dense equivalent; returns how many were merged."""
    found = compressed_modules(model)
    for name, module in found.items():
        model.set_submodule(name, merge_module(module))
    return len(found)


def module_specs(model: nn.Module, reshaped: dict[str, nn.Module] | None = None) -> dict[str, dict[str, Any]]:
    """name → spec of every module the loader must rebuild: the compressed kinds, and plain modules whose
    shape differs from what the model's config builds (``reshaped``), parents before children."""
    specs = {name: m.spec() for name, m in compressed_modules(model).items()}
    for name in reshaped or {}:
        if not any(name == s or name.startswith(f"{s}.") for s in specs):  # a compressed block rebuilds its own
            specs[name] = spec_of(model.get_submodule(name))
    return dict(sorted(specs.items(), key=lambda item: item[0].count(".")))


@contextmanager
def stored_as(model: nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """Within the block every floating parameter and buffer of ``model`` holds a copy in ``dtype``
    (the originals are put back after): what ``save_pretrained`` and the adapter writer then write."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())
               if dtype is not None and t.is_floating_point() and t.dtype != dtype}
    originals = {key: t.data for key, t in tensors.items()}
    try:
        for t in tensors.values():
            t.data = t.data.to(dtype)
        yield
    finally:
        for key, t in tensors.items():
            t.data = originals[key]


def save(model: nn.Module, tokenizer: Any, out: Path, manifest: dict[str, Any], log: list[dict[str, Any]],
         merge: bool = False, overwrite: bool = False, reshaped: dict[str, nn.Module] | None = None,
         storage_dtype: torch.dtype | None = None) -> Path:
    """Write the model, tokenizer, manifest and log to ``out`` atomically. ``reshaped``: plain modules of a
    new shape (a shrunk MLP's linears) that the manifest must describe for ``load``. ``storage_dtype``:
    the dtype of the floating tensors written (None: as they are in memory)."""
    manifest = dict(manifest)
    manifest["format_version"] = FORMAT_VERSION
    manifest["package_version"] = __version__
    modules = compressed_modules(model)
    manifest["modules"] = module_specs(model, reshaped)
    manifest["merged"] = merge
    stored = str(storage_dtype).removeprefix("torch.") if storage_dtype is not None else None
    if stored is not None:
        manifest["storage_dtype"] = stored
    with atomic_directory(out, overwrite) as tmp:
        if merge:
            merge_in_place(model)
            with stored_as(model, storage_dtype):
                model.save_pretrained(tmp, max_shard_size=MAX_SHARD_SIZE)
        else:  # quantized and compensated modules in the layout vLLM / transformers / peft read (export.py)
            with stored_as(model, storage_dtype), export.base_layout(model, modules) as loras:
                model.save_pretrained(tmp, max_shard_size=MAX_SHARD_SIZE)
                manifest["serving"] = export.write_serving(tmp, model, modules, loras, str(Path(out).resolve()))
            reason = export.not_stock_reason(manifest["modules"], manifest["serving"]["compressed_tensors"])
            export.write_remote_code(tmp, manifest["modules"], manifest["serving"]["adapter"], reason)
            manifest["serving"]["stock_transformers"] = not reason
            manifest["serving"]["remote_code"] = export.REMOTE_CODE
        if stored is not None:
            export.edit_config(tmp, lambda data: data.update(dtype=stored))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        model_card.write(tmp, manifest, log, Path(out).name)
        (tmp / LOG).write_text("".join(json.dumps(entry) + "\n" for entry in log))
    return out


def read_manifest(path: Path) -> dict[str, Any]:
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise CompressorError(f"not a compressed model directory (no {MANIFEST}): {path}")
    manifest = json.loads(file.read_text())
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise CompressorError(f"{path} was written by a newer format ({manifest['format_version']}); upgrade compressor")
    return manifest


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild a model written by ``save`` (compressed or merged) with identical outputs: the loader the
    outputs carry (``modeling_compressor.load_compressed``) with this package's module classes, reading the
    module specs from the manifest."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    manifest = read_manifest(path)
    if manifest.get("merged"):
        kwargs = {"dtype": dtype} if dtype is not None else {}
        return AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device).eval()
    config = export.model_config(path)
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    for name, spec in manifest["modules"].items():
        if spec["kind"] != "dense" and spec["kind"] not in MODULE_KINDS:
            raise CompressorError(f"{path}: unknown module kind {spec['kind']!r} for {name}")
    adapter = manifest.get("serving", {}).get("adapter")
    try:
        return load_compressed(str(path), config, manifest["modules"], str(path / adapter) if adapter else None,
                               dtype, device, MODULE_KINDS)
    except ValueError as error:
        raise CompressorError(f"{error} (the manifest's modules)") from None
