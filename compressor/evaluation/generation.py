"""A model as evaluation holds it (``load_any``: a compressed directory or any MODEL spec) and its greedy
generation timed (``generation_speed``), shared by ``evaluate`` and ``speed``'s measuring processes."""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import io
from ..model import files
from ..model import loading as models
from ..model.modules import dequantized


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


def load_any(spec: str, device: str = "cpu", dtype: torch.dtype | None = None, trust_remote_code: bool = False):
    """(model, tokenizer, manifest | None) for a compressed directory or any MODEL spec."""
    path = Path(spec)
    if (path / io.MANIFEST).is_file():
        manifest = io.read_manifest(path)
        tokenizer = files.load_tokenizer(str(path), spec, trust_remote_code)
        return io.load(path, device, dtype), tokenizer, manifest
    model, tokenizer = models.load(spec, dtype or torch.float32, device, trust_remote_code=trust_remote_code)
    return model, tokenizer, None
