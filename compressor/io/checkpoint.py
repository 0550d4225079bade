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

Everything is written into a temporary sibling directory (``output.OutputDirectory``, reserved at the
start of a run) and renamed at the end, so an interrupted run never leaves a half-written output. ``load`` rebuilds the architecture from
config.json, swaps in empty compressed modules from the manifest, and loads the tensors.
``merge=True`` writes dense weights instead, which plain ``from_pretrained`` loads.
"""

from __future__ import annotations

import json
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import CompressorError, one_line
from ..model import files
from ..model.modules import MODULE_KINDS, CompensatedLinear, from_spec, spec_of
from ..model.modules import merge as merge_module
from ..model.weights import check_state, load_pretrained, load_state
from ..portable.modeling_compressor import ADAPTER_WEIGHTS, checkpoint_names, state_for_modules
from ..version import __version__
from . import model_card
from . import serving as export
from .faults import pause_for_tests
from .manifest import FORMAT_VERSION, MANIFEST, mismatch_hint, read_manifest
from .output import OutputDirectory

LOG = "compression_log.jsonl"
MAX_SHARD_SIZE = "2GB"


def compressed_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name → outermost compressed module (the parts of a ``compensated`` module are not listed), parents
    before children; inside a container kind (``experts``) its members' compressed modules are listed too."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if getattr(module, "kind", None) in MODULE_KINDS and not any(
                name.startswith(f"{o}.") and not getattr(m, "container", False) for o, m in found.items()):
            found[name] = module
    return found


def merge_in_place(model: nn.Module) -> int:
    """Replace every compressed module by its dense equivalent (the members of a container before it);
    returns how many were merged."""
    found = compressed_modules(model)
    for name in sorted(found, key=lambda n: -n.count(".")):
        model.set_submodule(name, merge_module(model.get_submodule(name)))
    return len(found)


def module_specs(model: nn.Module, reshaped: dict[str, nn.Module] | None = None) -> dict[str, dict[str, Any]]:
    """name → spec of every module the loader must rebuild: the compressed kinds, and plain modules whose
    shape differs from what the model's config builds (``reshaped``), parents before children."""
    found = compressed_modules(model)
    specs = {name: m.spec() for name, m in found.items()}
    blocks = [name for name, m in found.items() if not getattr(m, "container", False)]  # experts: not a block
    for name in reshaped or {}:
        if not any(name == s or name.startswith(f"{s}.") for s in blocks):  # a compressed block rebuilds its own
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


def save(model: nn.Module, tokenizer: Any, out: Path | OutputDirectory, manifest: dict[str, Any],
         log: list[dict[str, Any]], merge: bool = False, overwrite: bool = False,
         reshaped: dict[str, nn.Module] | None = None, storage_dtype: torch.dtype | None = None,
         shards: Any = None) -> Path:
    """Write the model, tokenizer, manifest and log to ``out`` atomically. ``out``: a path, or an
    ``OutputDirectory`` the caller reserved at the start of its run (written into; it replaces ``--out``
    when the caller's block ends). ``reshaped``: plain modules of a new shape (a shrunk MLP's linears) that
    the manifest must describe for ``load``. ``storage_dtype``: the dtype of the floating tensors written
    (None: as they are in memory). ``shards``: the ``io.shards.ShardWriter`` of a streamed run, which has
    written the decoder layers already (into ``out``'s temporary directory)."""
    if isinstance(out, OutputDirectory):
        _write(model, tokenizer, out.tmp, out.path, manifest, log, merge, reshaped, storage_dtype, shards)
        return out.path
    with OutputDirectory(out, overwrite) as output:
        _write(model, tokenizer, output.tmp, output.path, manifest, log, merge, reshaped, storage_dtype)
    return output.path


def _write(model: nn.Module, tokenizer: Any, tmp: Path, out: Path, manifest: dict[str, Any],
           log: list[dict[str, Any]], merge: bool, reshaped: dict[str, nn.Module] | None,
           storage_dtype: torch.dtype | None, shards: Any = None) -> None:
    """Everything ``save`` writes, into the directory ``tmp`` (which becomes ``out``)."""
    manifest = dict(manifest)
    manifest["format_version"] = FORMAT_VERSION
    manifest["package_version"] = __version__
    modules = compressed_modules(model)
    manifest["modules"] = module_specs(model, reshaped)
    manifest["merged"] = merge
    stored = str(storage_dtype).removeprefix("torch.") if storage_dtype is not None else None
    if stored is not None:
        manifest["storage_dtype"] = stored
    if merge and shards is not None:
        shards.finish(model)  # the layers were merged as they were written
    elif merge:
        merge_in_place(model)
        with stored_as(model, storage_dtype):
            model.save_pretrained(tmp, max_shard_size=MAX_SHARD_SIZE)
    else:  # quantized and compensated modules in the layout vLLM / transformers / peft read (export.py)
        with stored_as(model, storage_dtype), export.base_layout(model, modules) as loras:
            if shards is not None:
                shards.finish(model)
                loras = shards.loras
            else:  # unfused experts' tensors under the family's per-expert names (serving stacks read those)
                model.save_pretrained(tmp, max_shard_size=MAX_SHARD_SIZE,
                                      state_dict=export.expert_layout(model, model.state_dict()))
            manifest["serving"] = export.write_serving(tmp, model, modules, loras, str(Path(out).resolve()))
        reason = export.not_stock_reason(manifest["modules"], manifest["serving"]["compressed_tensors"])
        export.write_remote_code(tmp, manifest["modules"], manifest["serving"]["adapter"], reason)
        manifest["serving"]["stock_transformers"] = export.stock_loads(manifest["serving"], reason)
        manifest["serving"]["remote_code"] = export.REMOTE_CODE
    if stored is not None:
        export.edit_config(tmp, lambda data: data.update(dtype=stored))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    pause_for_tests("save")
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    model_card.write(tmp, manifest, log, Path(out).name)
    (tmp / LOG).write_text("".join(json.dumps(entry) + "\n" for entry in log))
    check_loadable(tmp, out)


def _weight_files(path: Path) -> list[Path]:
    """An output's weight files (its index's shards, or model.safetensors), every one present and its header
    valid (``files.read_headers``)."""
    found = files.weight_files(path)
    files.read_headers(found)
    return found


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(path):
        with files.reading(str(path), file, "the weights", files.WEIGHTS_FIX):
            state.update(load_file(str(file)))
    return state


def _header_state(path: Path) -> dict[str, torch.Tensor]:
    """The weight files' tensors as empty meta tensors of their stored shapes (read from the headers only)."""
    state: dict[str, torch.Tensor] = {}
    for header in files.read_headers(files.weight_files(path)).values():
        state.update({key: torch.empty(entry["shape"], device="meta") for key, entry in header.items()})
    return state


def _dtype(path: Path, dtype: torch.dtype | None, config: Any = None) -> torch.dtype:
    """``dtype``, else the output's own (config.json's ``dtype``), else fp32."""
    if dtype is None:
        config = config if config is not None else export.model_config(path)
        dtype = getattr(config, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def output_dtype(path: str | Path) -> torch.dtype:
    """The dtype of an output's floating tensors (its config.json's ``dtype``; fp32 where it has none)."""
    return _dtype(Path(path), None)


def _skeleton(path: Path, manifest: dict[str, Any], dtype: torch.dtype | None, meta: bool = False) -> nn.Module:
    """The model an output describes, without its weights: built from config.json (the base family's class),
    the manifest's compressed modules swapped in; on the meta device with ``meta``."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    try:
        config = export.model_config(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CompressorError(f"{path / 'config.json'}: {one_line(exc)}") from None
    dtype = _dtype(path, dtype, config)
    with no_init_weights(), torch.device("meta") if meta else nullcontext():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if manifest["merged"]:
        return model
    for name, spec in sorted(manifest["modules"].items(), key=lambda item: item[0].count(".")):
        try:
            model.get_submodule(name)
            model.set_submodule(name, from_spec(spec, dtype=dtype, device="meta" if meta else None))
        except AttributeError:
            raise CompressorError(f"{path / MANIFEST}: module {name} is not in the model config.json "
                                  "describes") from None
        except (TypeError, ValueError, KeyError) as exc:
            raise CompressorError(f"{path / MANIFEST}: the entry of module {name} is malformed "
                                  f"({one_line(exc)})") from None
    return model


def _stored_state(path: Path, manifest: dict[str, Any], model: nn.Module,
                  read: Callable[[Path], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The output's tensors (``read`` from its weight files, which are in the family's checkpoint layout)
    under the names of ``model``'s modules (``checkpoint_names``; a compensated module's base and adapter:
    ``state_for_modules``). Of a merged output, the tensors transformers fuses on loading (experts) stand as
    empty meta tensors of the model's own shapes: its loader is ``from_pretrained``."""
    stored = read(path)
    names, fused = checkpoint_names(model, stored)
    state = {name: stored[key] for name, key in names.items()}
    if manifest["merged"]:  # the family's own fused experts: their tensors are read fused, not one by one
        expected, parts = model.state_dict(), {key for keys in fused.values() for key in keys}
        state = {name: value for name, value in state.items() if names[name] not in parts}
        state.update({name: torch.empty(expected[name].shape, device="meta") for name in fused if name in expected})
        return state
    adapter = manifest.get("serving", {}).get("adapter")
    if not adapter:
        return state_for_modules(state, manifest["modules"], None)
    weights_file = path / adapter / ADAPTER_WEIGHTS
    with files.reading(str(path), weights_file, "the adapter weights", "copy the output again, or compress again"):
        return state_for_modules(state, manifest["modules"], str(path / adapter))


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild a model written by ``save`` (compressed or merged) with identical outputs. A merged output is a
    stock checkpoint: ``from_pretrained``, checked (``weights.load_pretrained``). Otherwise the model the
    manifest describes is built from config.json with this package's module classes (those of
    ``modeling_compressor``, which outputs carry for ``trust_remote_code``), the checkpoint's tensors renamed
    as that loader does (``checkpoint_names``, ``state_for_modules``), and every tensor must match
    (``weights.load_state``)."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest["merged"]:  # its files checked against the manifest first: a wrong one is named
        _check_files(path, manifest, str(path), mismatch_hint(manifest))
        model = load_pretrained(str(path), str(path), dtype=_dtype(path, dtype))
    else:
        model = _skeleton(path, manifest, dtype)
        load_state(model, _stored_state(path, manifest, model, _state_dict), str(path), mismatch_hint(manifest))
    return model.to(device).eval()


def check_loadable(folder: Path, out: Path | str) -> None:
    """An output about to be placed at ``out`` holds what ``load`` needs to rebuild it: every tensor of the
    model its config and manifest describe, by name and shape, and nothing else (built on the meta device,
    the files' headers read; no tensor is loaded). A run never ends in success with an output that does not
    reload: this fails it with one line instead, before anything is placed at ``out``."""
    hint = ("; the run's output would not reload, so nothing was placed there (please report this: the "
            "model's layout is one compressor writes incompletely)")
    _check_files(folder, manifest=read_manifest(folder), where=f"the output for --out {out}", hint=hint)


def _check_files(path: Path, manifest: dict[str, Any], where: str, hint: str) -> None:
    """The weight files (their headers) hold every tensor of the model the config and manifest describe, by
    name and shape, and nothing else: the model built on the meta device, no tensor read."""
    model = _skeleton(path, manifest, None, meta=True)
    check_state(model, _stored_state(path, manifest, model, _header_state), where, hint)


def dequantized_base(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """The model of ``path`` without its compensation paths, each compensated module's base merged into a plain
    linear of the model's own class (a quantized base dequantized): what the output's PEFT adapter applies to.
    ``PeftModel.from_pretrained(dequantized_base(path), path / "adapter")`` gives ``load(path)``'s logits, and
    fine-tunes the low-rank part over a frozen base (LQ-LoRA's use)."""
    model = load(path, device, dtype)
    for name, module in compressed_modules(model).items():
        if isinstance(module, CompensatedLinear):
            model.set_submodule(name, merge_module(module.base) if hasattr(module.base, "dense_weight")
                                else module.base)
    return model


def check_finite_weights(path: str | Path) -> None:
    """Refuse an output whose weight files hold a NaN or infinite floating tensor, naming the file and the
    tensor (what ``load`` refuses too); read one tensor at a time, so it costs one tensor's memory."""
    from safetensors import safe_open

    from ..model.weights import non_finite

    for file in _weight_files(Path(path)):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    tensor = handle.get_tensor(key)
                    bad = non_finite(tensor) if tensor.is_floating_point() else 0
                    if bad:
                        raise CompressorError(f"{file}: tensor {key} holds {bad} non-finite value(s) (NaN or "
                                              "infinity); this output is damaged: compress the model again")
        except CompressorError:
            raise
        except Exception as exc:  # safetensors raises its own error types on a damaged file
            raise CompressorError(f"{file}: cannot read the weights ({one_line(exc)})") from None
