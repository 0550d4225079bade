"""Evaluation: perplexity by the GPTQ/SparseGPT convention, parameters, bytes on disk, tokens/s.

Perplexity: the held-out text joined with "\\n\\n", tokenized once, cut into non-overlapping
``seq_len`` windows (remainder dropped), each window scored on its ``seq_len − 1`` shifted
next-token targets; NLL summed over all windows and divided once (``exp(Σ nll / Σ tokens)``).
The protocol, dataset, seq_len and token count go into the results.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import calibration as sources
from . import io
from .errors import CompressorError, one_line
from .model import loading as models
from .model.modules import dequantized

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


@torch.no_grad()
def generation_speed(model: nn.Module, prompts: torch.Tensor, new_tokens: int = 32,
                     device: str | torch.device = "cpu") -> dict[str, Any]:
    """Greedy generation from ``prompts`` (batch, prompt_len) with the KV cache: prefill (one forward over the
    prompts) and decode (``new_tokens`` single-token steps) timed apart, as tokens per second of the batch;
    ``generated`` holds the greedy tokens (what ``generate`` would give)."""
    model.eval()
    ids = prompts.to(device)
    with dequantized(model):
        start = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        prefill = time.perf_counter() - start
        name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        cache, token = getattr(out, name), out.logits[:, -1:].argmax(-1)  # (batch, 1)
        generated = [token]
        start = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=token, use_cache=True, **{name: cache})
            cache, token = getattr(out, name), out.logits[:, -1:].argmax(-1)
            generated.append(token)
        decode = time.perf_counter() - start
    batch, prompt_len = ids.shape
    return {"batch": batch, "prompt_tokens": prompt_len, "new_tokens": new_tokens,
            "prefill_seconds": prefill, "decode_seconds": decode,
            "prefill_tokens_per_s": batch * prompt_len / prefill, "decode_tokens_per_s": batch * new_tokens / decode,
            "generated": torch.cat(generated, dim=1).cpu()}  # (batch, new_tokens + 1): greedy continuations


def bytes_on_disk(path: Path) -> int:
    """Bytes of the weight files (safetensors) in a model directory, an EoRA adapter in adapter/ included."""
    return sum(f.stat().st_size for f in Path(path).rglob("*.safetensors"))


def load_any(spec: str, device: str = "cpu", dtype: torch.dtype | None = None, trust_remote_code: bool = False):
    """(model, tokenizer, manifest | None) for a compressed directory or any MODEL spec."""
    from transformers import AutoTokenizer

    path = Path(spec)
    if (path / io.MANIFEST).is_file():
        manifest = io.read_manifest(path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CompressorError(f"{path}: cannot load its tokenizer ({one_line(exc)})") from None
        return io.load(path, device, dtype), tokenizer, manifest
    model, tokenizer = models.load(spec, dtype or torch.float32, device, trust_remote_code=trust_remote_code)
    return model, tokenizer, None


def check_options(seq_len: int | None, max_tokens: int | None, batch_size: int) -> None:
    """The evaluation's numeric options, before anything is loaded."""
    if seq_len is not None and seq_len < 2:
        raise CompressorError(f"--seq-len must be ≥ 2 (a window scores its seq_len − 1 next tokens); got {seq_len}")
    if max_tokens is not None and max_tokens < 1:
        raise CompressorError(f"--max-tokens must be ≥ 1; got {max_tokens}")
    if batch_size < 1:
        raise CompressorError(f"--batch-size must be ≥ 1; got {batch_size}")


def evaluate(spec: str, dataset: str = "sotu", seq_len: int | None = None, max_tokens: int | None = None,
             batch_size: int = 4, device: str = "cpu", dtype: torch.dtype | None = None,
             trust_remote_code: bool = False) -> dict[str, Any]:
    """Perplexity and size figures of a compressed directory or a model, as one JSON-able dict."""
    check_options(seq_len, max_tokens, batch_size)
    models.compute_device(device)
    source = sources.get(dataset)
    option = "--seq-len" if seq_len else f"--seq-len (the default of {dataset})"
    seq_len = seq_len or source.eval_seq_len
    max_tokens = max_tokens if max_tokens is not None else source.eval_max_tokens
    start = time.perf_counter()
    model, tokenizer, manifest = load_any(spec, device, dtype, trust_remote_code)
    load_seconds = time.perf_counter() - start
    models.check_seq_len(model.config, seq_len, option)
    windows = source.evaluation(tokenizer, seq_len, max_tokens)
    result = perplexity(model, windows, batch_size, device)
    path = Path(spec)
    disk = bytes_on_disk(path) if path.is_dir() else None
    if disk == 0 and manifest is None:
        disk = None
    return {
        "model": spec,
        "perplexity": {"dataset": dataset, "protocol": PROTOCOL, "seq_len": seq_len, "max_tokens": max_tokens,
                       **{k: result[k] for k in ("value", "windows", "tokens", "scored_tokens")}},
        "parameters": models.parameter_count(model),
        "parameters_before": manifest.get("params_before") if manifest else None,
        "bytes_on_disk": disk,
        "tokens_per_s": result["tokens_per_s"],
        "seconds": {"load": load_seconds, "perplexity": result["seconds"]},
        "device": str(device),
    }


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
