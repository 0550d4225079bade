"""The one weights loader: every tensor a model is given is checked for completeness, shape and finiteness.

``transformers`` fills a tensor missing from a checkpoint (or a layer its ``config.json`` claims but its
weights lack) with random values and only logs it, and a NaN weight spreads silently through a
compression. So every way weights enter this package goes through here:

- ``load_pretrained``: ``AutoModelForCausalLM.from_pretrained`` of a model directory, hub id or GGUF file
  (safetensors only: never a pickle), with its loading report checked (missing, mis-shaped and unexpected
  tensors are errors naming the first ones);
- ``load_state``: a state dict into a model built from its config (compressed outputs: ``io.load``), with
  missing, unexpected and mis-shaped tensors reported against what the model expects;
- ``check_finite``: no NaN or infinity in any floating parameter or buffer, naming the tensor.

A tied output head (``tie_word_embeddings``) counts as present when the input embedding is. Tensors a
checkpoint holds beyond what the model needs are refused (weights of a model its config does not describe:
a third layer where config.json says two), except the buffers transformers itself ignores on loading
(``ignored``: rotary ``inv_freq``, ``position_ids``, the model's ``_keys_to_ignore_on_load_unexpected``).
"""

from __future__ import annotations

import re
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
    """Raise on tensors the model needs that the checkpoint lacks, holds in another shape, or holds extra
    (buffers transformers ignores on loading aside)."""
    missing = [k for k in missing if not is_tied(model, k)]
    unexpected = [k for k in unexpected if not ignored(model, k)]
    if mismatched:
        name, stored, expected = sorted(mismatched)[0]
        raise CompressorError(f"{where}: tensor {name} has shape {list(stored)} in the checkpoint but "
                              f"{list(expected)} in the model its config describes{hint}")
    if missing:
        raise CompressorError(f"{where}: the checkpoint lacks {len(missing)} tensor(s) the model needs "
                              f"({_examples(missing)}); it is incomplete, or its config.json describes more "
                              f"than its weights hold{hint}")
    if unexpected:
        raise CompressorError(f"{where}: the checkpoint holds {len(unexpected)} tensor(s) that the model its "
                              f"config.json describes does not have ({_examples(list(unexpected))})"
                              f"{_extra_layers(model, unexpected) or '; config.json does not describe these weights'}"
                              f"{hint}")


LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)\.")


def _extra_layers(model: nn.Module, unexpected: list[str]) -> str:
    """What to say of unexpected tensors of decoder layers beyond the config's layer count ("" if none)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    count = getattr(config, "num_hidden_layers", None)
    beyond = [int(m.group(1)) for key in unexpected if (m := LAYER_INDEX.search(key))]
    if not isinstance(count, int) or not beyond or max(beyond) < count:
        return ""
    field = getattr(config, "attribute_map", {}).get("num_hidden_layers", "num_hidden_layers")
    return (f"; config.json's {field} is {count}, but the weights hold {max(beyond) + 1} layers: set {field} "
            f"to {max(beyond) + 1}, or use the config that belongs to these weights")


def ignored(model: nn.Module, key: str) -> bool:
    """Whether transformers ignores ``key`` when a checkpoint holds it that the model lacks (an old rotary
    ``inv_freq`` or ``position_ids`` buffer, GPT-2's attention masks: the model's own ignore patterns)."""
    patterns = {r"rotary_emb\.inv_freq", r"(^|\.)position_ids$"}
    for module in model.modules():
        patterns |= set(getattr(module, "_keys_to_ignore_on_load_unexpected", None) or ())
    return any(re.search(pattern, key) for pattern in patterns)


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
    """``from_pretrained(source, **kwargs)`` that refuses missing, mis-shaped, unexpected or non-finite weights,
    and reads safetensors only (a GGUF file aside): a pickled checkpoint is never unpickled."""
    from transformers import AutoModelForCausalLM

    if "gguf_file" not in kwargs:
        kwargs["use_safetensors"] = True
    model, info = AutoModelForCausalLM.from_pretrained(source, output_loading_info=True,
                                                       ignore_mismatched_sizes=True, **kwargs)
    check_complete(model, where, list(info.get("missing_keys", ())), list(info.get("mismatched_keys", ())),
                   list(info.get("unexpected_keys", ())))
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

