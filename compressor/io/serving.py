"""The serving layout of an output: what vLLM, ``transformers`` and ``peft`` load without this package.

A compressed output directory that holds ``quantized`` or ``compensated`` modules is written so that
existing tools read it as they are:

- **Quantized base.** Each ``QuantizedLinear`` is stored under its own module name with compressed-tensors'
  ``pack-quantized`` tensors (``weight_packed``, ``weight_scale``, ``weight_zero_point``, ``weight_shape``,
  ``bias``), and ``config.json`` gets a ``quantization_config`` (``quant_method: compressed-tensors``,
  ``format: pack-quantized``, one config group per distinct (bits, group_size, symmetric), every other
  ``nn.Linear`` listed in ``ignore``). It is written only when compressed-tensors can describe every
  compressed module: ``nn.Linear`` layers (not GPT-2's ``Conv1D``) whose ``in_features`` the group size
  divides, and no other compressed kinds; otherwise the manifest's ``serving`` entry says why.
- **Compensation as a PEFT LoRA adapter.** Each ``CompensatedLinear`` is saved as its base module under the
  module's own name (the checkpoint is the plain quantized or pruned model), and its low-rank path goes to
  ``adapter/``: ``adapter_model.safetensors`` with ``base_model.model.<name>.lora_A.weight`` = A (r, in)
  and ``.lora_B.weight`` = B (out, r), and ``adapter_config.json`` with ``r`` = the most common rank,
  ``lora_alpha = r`` (PEFT scales by α/r, so 1), and ``rank_pattern`` / ``alpha_pattern`` (equal) for
  modules of another rank (docs/output-format.md#quantized-and-compensated-outputs).

``io.load`` reads both back (``modeling_compressor.state_for_modules``), so our own loader and ``peft`` see
the same numbers. A NormalFloat base (LQ-LoRA's ``normal_float``) has no compressed-tensors format: the
manifest's ``serving.note`` says so, the output loads with ``trust_remote_code`` or ``compressor.load``, and
``io.dequantized_base`` gives the plain model with ``Q`` dequantized, over which ``peft`` loads the adapter.

- **Every kind with trusted remote code.** Each non-merged output carries ``modeling_compressor.py``, this
  package's own definition of the module kinds and of the loader (it imports only torch and transformers),
  and config.json a ``compressor`` entry with the module specs and the adapter folder, and an ``auto_map``
  naming the loader (``write_remote_code``): ``AutoModelForCausalLM.from_pretrained(out,
  trust_remote_code=True)`` returns the base family's model with the compressed modules, the logits of
  ``io.load``, on a machine without compressor.
- **Without the flag, stock loaders refuse what they cannot rebuild.** An output that plain
  ``from_pretrained`` would not rebuild (low-rank or CUR factors, quantized modules compressed-tensors cannot
  describe, such as a group size that does not divide ``in_features``, layers of a new shape) would
  otherwise load with those linears randomly initialized and only a warning. Its ``config.json`` therefore
  gets ``model_type`` ``compressor-<base>`` (with the base type and the reason in the ``compressor`` entry)
  and an ``AutoConfig`` in ``auto_map``: ``transformers`` raises unless ``trust_remote_code=True``.
  ``io.load`` reads the base config back (``model_config``).

Loading in ``transformers``: symmetric checkpoints load as they are; asymmetric ones need
``quantization_config=CompressedTensorsConfig(dequantize=True)`` with compressed-tensors 0.20, whose
compressed-mode initialization expects an unpacked zero point although its compressor (and vLLM) use the
packed one written here; the manifest's ``serving.transformers`` entry then says so.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from safetensors.torch import save_file
from torch import nn

from ..model.modules import QUANTIZED_KINDS, CompensatedLinear, LowRankLinear, QuantizedLinear
from ..model.targets import routing
from ..portable import modeling_compressor as portable

ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."


@contextmanager
def base_layout(model: nn.Module, modules: dict[str, nn.Module]) -> Iterator[dict[str, LowRankLinear]]:
    """Within the block, each compensated module of ``modules`` is replaced by its base; yields name → lora
    (the low-rank paths, for the adapter)."""
    compensated = {name: m for name, m in modules.items() if isinstance(m, CompensatedLinear)}
    for name, module in compensated.items():
        model.set_submodule(name, module.base)
    try:
        yield {name: module.lora for name, module in compensated.items()}
    finally:
        for name, module in compensated.items():
            model.set_submodule(name, module)


def expert_layout(model: nn.Module, tensors: dict[str, Any]) -> dict[str, Any]:
    """``tensors`` (under ``model``'s names) with every tensor of an unfused expert's projection under the name
    the family's checkpoints give that projection (Mixtral: ``…experts.<e>.gate_proj.weight_packed`` →
    ``…experts.<e>.w1.weight_packed``); transformers' own renames are reverted after this, by
    ``save_pretrained`` or ``shards.family_layout``. The per-expert names serving stacks and transformers'
    expert fusion read (``portable.stored_expert_names``; ``checkpoint_names`` reads them back)."""
    renamed = portable.stored_expert_names(model, tensors)
    return {renamed.get(key, key): value for key, value in tensors.items()}


def _stored_module_names(model: nn.Module, names: list[str]) -> list[str]:
    """Module names as the family's checkpoints name them (transformers' load-time renames reverted,
    Mixtral's ``mlp`` → ``block_sparse_moe``): the names vLLM matches a config's ``ignore`` against."""
    import torch

    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4: no renames
        return list(names)
    tensors = {f"{name}.weight": torch.empty(0, device="meta") for name in names}
    stored = revert_weight_conversion(model, expert_layout(model, tensors))
    return [key.removesuffix(".weight") for key in stored]


def quantization_config(model: nn.Module, modules: dict[str, nn.Module]) -> tuple[dict[str, Any] | None, str]:
    """(compressed-tensors ``quantization_config``, "") for the model in its base layout,
    or (None, the reason compressed-tensors cannot describe it). Unfused experts' linears are quantized
    modules like any other (stored under the family's per-expert names, ``expert_layout``); ``ignore`` lists
    every other linear and the routers, under the model's names (transformers) and the checkpoint's (vLLM)."""
    bases = {name: m.base if isinstance(m, CompensatedLinear) else m for name, m in modules.items()
             if not getattr(m, "container", False)}  # an experts container: its linears are listed apart
    schemes: dict[tuple[int, int | None, bool], list[str]] = {}
    for name, module in bases.items():
        if isinstance(module, (nn.Linear,)) or getattr(module, "kind", None) is None:
            continue  # a dense base (pruned): an ordinary checkpoint tensor
        if not isinstance(module, QuantizedLinear):
            return None, f"{name} is a {module.kind} module, which compressed-tensors does not describe"
        if module.dense_class != "Linear":
            return None, f"{name} is a {module.dense_class}; compressed-tensors quantizes nn.Linear layers"
        if module.group_size and module.in_features % module.group_size:
            return None, (f"group_size {module.group_size} does not divide in_features {module.in_features} "
                          f"of {name} (compressed-tensors needs whole groups; use one that divides it)")
        schemes.setdefault((module.bits, module.group_size, module.symmetric), []).append(name)
    if not schemes:
        return None, "no quantized modules"
    quantized = {name for names in schemes.values() for name in names}
    partly = _partly_quantized_experts(model, quantized)
    if partly:
        return None, (f"only some of the linears of {partly} are quantized; transformers reads a layer's experts "
                      "all quantized or all dense")
    if len(schemes) > 1 and any(".experts." in name for name in quantized):
        return None, "experts quantized with more than one scheme; transformers reads one scheme for a model's experts"
    plain = sorted(name for name, m in model.named_modules()
                   if isinstance(m, nn.Linear) and name not in quantized
                   and not any(name.startswith(f"{q}.") for q in bases))
    plain += sorted(routing(model))
    ignore = sorted(set(plain) | set(_stored_module_names(model, plain)))
    groups = {}
    for index, ((bits, group_size, symmetric), names) in enumerate(sorted(schemes.items(), key=str)):
        groups[f"group_{index}"] = {
            "targets": ["Linear"] if len(schemes) == 1 else sorted(set(names) | set(_stored_module_names(model, names))),
            "weights": {"num_bits": bits, "type": "int", "symmetric": symmetric,
                        "strategy": "group" if group_size else "channel", "group_size": group_size,
                        "dynamic": False, "actorder": None, "observer": "minmax"},
            "input_activations": None, "output_activations": None, "format": "pack-quantized",
        }
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "quantization_status": "compressed", "config_groups": groups, "ignore": ignore,
            "kv_cache_scheme": None}, ""


def _partly_quantized_experts(model: nn.Module, quantized: set[str]) -> str | None:
    """The first unfused experts container some but not all of whose linears are quantized (None: none)."""
    for name, module in model.named_modules():
        if getattr(module, "kind", None) != "experts":
            continue
        linears = [f"{name}.{child}" for child, sub in module.named_modules() if child.count(".") == 1]
        inside = [linear for linear in linears if linear in quantized]
        if inside and len(inside) != len(linears):
            return name
    return None


def adapter_config(loras: dict[str, LowRankLinear], base: str, conv1d: bool) -> dict[str, Any]:
    """PEFT ``LoraConfig`` fields for the compensation paths (scaling 1 for every module)."""
    ranks = {name: lora.rank for name, lora in loras.items()}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {name: r for name, r in sorted(ranks.items()) if r != rank}
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in loras})
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "inference_mode": True,
        "r": rank, "lora_alpha": rank, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "target_modules": sorted(loras) if len(suffixes) > 64 else suffixes,
        "layers_to_transform": None, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": conv1d,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
    }


def write_adapter(folder: Path, loras: dict[str, LowRankLinear], base: str, all_linears: list[str]) -> None:
    """``folder``/adapter_model.safetensors and adapter_config.json for the compensation paths."""
    config = adapter_config(loras, base, any(lora.dense_class == "Conv1D" for lora in loras.values()))
    if config["target_modules"] != sorted(loras):  # short names must not catch a linear left uncompensated
        caught = [n for n in all_linears
                  if n.rsplit(".", 1)[-1] in config["target_modules"] and n not in loras]
        if caught:
            config["target_modules"] = sorted(loras)
    tensors = {}
    for name, lora in loras.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = lora.down.weight.detach().contiguous()  # (r, in)
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = lora.up.weight.detach().contiguous()  # (out, r)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def edit_config(folder: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite ``folder``/config.json with ``edit`` applied to its data (in place)."""
    file = folder / "config.json"
    data = json.loads(file.read_text())
    edit(data)
    file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def add_quantization_config(folder: Path, config: dict[str, Any]) -> None:
    """Put ``config`` into ``folder``/config.json as ``quantization_config``."""
    edit_config(folder, lambda data: data.update(quantization_config=config))


NOT_STOCK_PREFIX = portable.MARK_PREFIX
NOT_STOCK_KEY = portable.CONFIG_KEY
REMOTE_CODE = "modeling_compressor.py"
AUTO_CONFIG = "modeling_compressor.CompressorConfig"
AUTO_MODEL = "modeling_compressor.CompressorForCausalLM"
LOAD_HINT = ("AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True) (the modeling_compressor.py "
             "here), compressor.load(path), or `compressor eval path`; --merge writes a plain checkpoint")


def not_stock_reason(modules: dict[str, dict[str, Any]], compressed_tensors: bool) -> str:
    """Why plain ``from_pretrained`` would not rebuild the modules of a manifest ("" when it would):
    a quantized module is read when compressed-tensors describes it, a compensated one when its base is."""
    for name, spec in modules.items():
        if spec["kind"] == "experts":
            continue  # unfused experts: their linears, stored under the per-expert names, are judged one by one
        base = spec["base"]["kind"] if spec["kind"] == "compensated" else spec["kind"]
        if base == "quantized" and compressed_tensors:
            continue
        if base == "dense" and spec["kind"] == "compensated":
            continue  # a plain linear; its low-rank path is the PEFT adapter
        what = "a layer of a new shape" if base == "dense" else f"a {base} module"
        return f"{name} is {what}, which stock transformers does not rebuild"
    return ""


def write_remote_code(folder: Path, modules: dict[str, dict[str, Any]], adapter: str | None, reason: str) -> None:
    """Make ``folder`` load with ``from_pretrained(folder, trust_remote_code=True)``: copy
    ``modeling_compressor.py`` (this package's own definition of the modules and the loader) and put the
    module specs and the adapter folder into config.json's ``compressor`` entry, with ``auto_map`` naming the
    loader. Where stock transformers would not rebuild the modules (``reason``), ``model_type`` becomes
    ``compressor-<base>``: stock loaders refuse it unless the code is trusted, instead of loading random
    weights; otherwise the model type stays and only ``trust_remote_code=True`` picks the loader."""
    shutil.copyfile(portable.__file__, folder / REMOTE_CODE)

    def mark(data: dict[str, Any]) -> None:
        entry: dict[str, Any] = {"modules": modules, "adapter": adapter}
        auto_map = {"AutoModelForCausalLM": AUTO_MODEL}
        if reason:
            entry.update(base_model_type=data["model_type"], why=reason, load=LOAD_HINT)
            data["model_type"] = NOT_STOCK_PREFIX + data["model_type"]
            auto_map["AutoConfig"] = AUTO_CONFIG
        data[NOT_STOCK_KEY] = entry
        data["auto_map"] = auto_map

    edit_config(folder, mark)


def model_config(path: Path):
    """The base family's ``transformers`` config of an output directory, marked or not, without the
    ``compressor`` entry and ``auto_map`` (the model built from it is the family's own class)."""
    from transformers import AutoConfig

    data = json.loads((Path(path) / "config.json").read_text())
    if NOT_STOCK_KEY not in data:
        return AutoConfig.from_pretrained(path)
    data.pop("auto_map", None)
    return portable.base_config(data)


TRANSFORMERS_ASYMMETRIC = ("asymmetric: load in transformers with quantization_config="
                           "CompressedTensorsConfig(dequantize=True) (compressed-tensors 0.20 expects an unpacked "
                           "zero point in compressed mode); vLLM reads it as it is")

TRANSFORMERS_ASYMMETRIC_EXPERTS = (
    "asymmetric quantized experts: stock transformers (5.x) cannot dequantize them (its expert loader passes no "
    "zero point); load with trust_remote_code=True or compressor.load, or quantize with symmetric: true; the files are "
    "compressed-tensors' per-expert layout, which vLLM reads where its MoE kernels take the scheme")
ADAPTER_OVER_EXPERTS = (
    "dequantized_base: the adapter names each expert's own linears (…experts.<e>.gate_proj), which stock "
    "transformers fuses into 3-D tensors; apply it with PeftModel.from_pretrained(compressor.io.dequantized_base(out), "
    "out/adapter), or load the output with trust_remote_code=True or compressor.load")


def _is_expert(name: str) -> bool:
    return ".experts." in f".{name}."


def stock_loads(serving: dict[str, Any], reason: str) -> bool:
    """Whether stock ``from_pretrained`` (with ``peft`` for an adapter) rebuilds the output: nothing a stock
    loader cannot rebuild (``reason``), no asymmetric quantized experts, no adapter over unfused experts."""
    return not reason and serving.get("transformers") != TRANSFORMERS_ASYMMETRIC_EXPERTS \
        and "adapter_base" not in serving


def write_serving(folder: Path, model: nn.Module, modules: dict[str, nn.Module],
                  loras: dict[str, LowRankLinear], base: str) -> dict[str, Any]:
    """Inside ``base_layout``, after ``save_pretrained(folder)``: the quantization config and the adapter.
    Returns the manifest's ``serving`` entry."""
    serving: dict[str, Any] = {"compressed_tensors": False, "adapter": None}
    if not any(isinstance(m, (*QUANTIZED_KINDS, CompensatedLinear)) for m in modules.values()):
        return serving
    config, reason = quantization_config(model, modules)
    if config is not None:
        add_quantization_config(folder, config)
        serving["compressed_tensors"] = True
        if any(not group["weights"]["symmetric"] for group in config["config_groups"].values()):
            experts = any(_is_expert(name) for name in modules)
            serving["transformers"] = TRANSFORMERS_ASYMMETRIC_EXPERTS if experts else TRANSFORMERS_ASYMMETRIC
    elif any(isinstance(m, QUANTIZED_KINDS) or isinstance(getattr(m, "base", None), QUANTIZED_KINDS)
             for m in modules.values()):
        serving["note"] = f"no quantization_config written: {reason}"
    if loras:
        linears = [name for name, m in model.named_modules() if name and not list(m.children())]
        write_adapter(folder / ADAPTER_DIR, loras, base, linears)
        serving["adapter"] = ADAPTER_DIR
        if any(_is_expert(name) for name in loras):
            serving["adapter_base"] = ADAPTER_OVER_EXPERTS
    return serving
