"""The one weights loader: every tensor a model is given is checked for completeness, shape and finiteness.

``transformers`` fills a tensor missing from a checkpoint (or a layer its ``config.json`` claims but its
weights lack) with random values and only logs it, and a NaN weight spreads silently through a
compression. So every way weights enter this package goes through here:

- ``load_pretrained``: ``AutoModelForCausalLM.from_pretrained`` of a model directory, hub id or GGUF file,
  with its loading report checked (missing and mis-shaped tensors are errors naming the first one);
- ``load_state``: a state dict into a model built from its config (compressed outputs: ``io.load``), with
  missing, unexpected and mis-shaped tensors reported against what the model expects;
- ``check_finite``: no NaN or infinity in any floating parameter or buffer, naming the tensor.

A tied output head (``tie_word_embeddings``) counts as present when the input embedding is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CompressorError


def is_tied(model: nn.Module, key: str) -> bool:
    """True for the output head of a model whose input and output embeddings are tied."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return False
    if key in (getattr(model, "_tied_weights_keys", None) or []):
        return True
    head = model.get_output_embeddings()
    return head is not None and key.endswith("weight") and model.get_submodule(key.rsplit(".", 1)[0]) is head


def _examples(names: list[str]) -> str:
    shown = ", ".join(sorted(names)[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def check_complete(model: nn.Module, where: str, missing: list[str], mismatched: list[tuple[str, Any, Any]],
                   unexpected: list[str] = (), hint: str = "") -> None:
    """Raise on tensors the model needs that the checkpoint lacks, holds in another shape, or holds extra."""
    missing = [k for k in missing if not is_tied(model, k)]
    if mismatched:
        name, stored, expected = sorted(mismatched)[0]
        raise CompressorError(f"{where}: tensor {name} has shape {list(stored)} in the checkpoint but "
                              f"{list(expected)} in the model its config describes{hint}")
    if missing:
        raise CompressorError(f"{where}: the checkpoint lacks {len(missing)} tensor(s) the model needs "
                              f"({_examples(missing)}); it is incomplete, or its config.json describes more "
                              f"than its weights hold{hint}")
    if unexpected:
        raise CompressorError(f"{where}: the checkpoint holds {len(unexpected)} tensor(s) the model does not "
                              f"have ({_examples(list(unexpected))}){hint}")


def indexed_files(folder: Path) -> list[str] | None:
    """The weight files ``folder``'s ``model.safetensors.index.json`` lists (None: no index, one file)."""
    index = Path(folder) / "model.safetensors.index.json"
    if not index.is_file():
        return None
    try:
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise CompressorError(f"{index}: not a safetensors index (no weight_map)") from None


def non_finite(tensor: torch.Tensor, chunk: int = 1 << 22) -> int:
    """How many NaN or infinite values ``tensor`` holds, scanned in chunks (no full-size mask: the embedding of
    a large vocabulary in fp32 is GBs)."""
    flat = tensor.reshape(-1)
    return sum(int(torch.isfinite(flat[start: start + chunk]).logical_not_().sum())
               for start in range(0, flat.numel(), chunk))


def check_finite(model: nn.Module, where: str) -> None:
    """Raise naming the first floating parameter or buffer that holds NaN or infinity."""
    seen = set()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if id(tensor) in seen or not tensor.is_floating_point() or tensor.device.type == "meta":
            continue
        seen.add(id(tensor))
        bad = non_finite(tensor.detach())
        if bad:
            raise CompressorError(f"{where}: tensor {name} holds {bad} non-finite value(s) (NaN or infinity); "
                                  "refusing to use these weights")


def load_pretrained(source: str, where: str, **kwargs: Any) -> nn.Module:
    """``from_pretrained(source, **kwargs)`` that refuses missing, mis-shaped or non-finite weights."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(source, output_loading_info=True,
                                                       ignore_mismatched_sizes=True, **kwargs)
    check_complete(model, where, list(info.get("missing_keys", ())), list(info.get("mismatched_keys", ())))
    check_finite(model, where)
    return model


def check_state(model: nn.Module, state: dict[str, torch.Tensor], where: str, hint: str = "") -> None:
    """Raise unless ``state`` holds every tensor ``model`` needs, in its shape, and nothing else (either may
    be on the meta device: only names and shapes are compared)."""
    expected = model.state_dict()
    mismatched = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in state.items()
                  if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    unexpected = [k for k in state if k not in expected]
    missing = [k for k in expected if k not in state]
    check_complete(model, where, missing, mismatched, unexpected, hint)


def load_state(model: nn.Module, state: dict[str, torch.Tensor], where: str, hint: str = "") -> None:
    """Load ``state`` into ``model`` (built from its config); every tensor must be there, in its shape."""
    check_state(model, state, where, hint)
    model.load_state_dict(state, strict=False)
    model.tie_weights()  # a tied head is the embedding, not the uninitialized tensor from_config made
    check_finite(model, where)

