"""A checkpoint's tensor names as the model holds them. ``transformers`` 5 reads some families' files under
other names than its modules use (GPT-NeoX's ``embed_out`` is the model's ``lm_head``; Mixtral's
``block_sparse_moe`` is its ``mlp``) and fuses others on loading (each expert's projections into one 3-D
tensor per layer). ``checkpoint_names(model, keys)`` maps every tensor the model holds to the key of the
file tensor it is read from, applying the family's renames as ``from_pretrained`` does; a tensor that
``from_pretrained`` assembles from several file tensors (fused experts) is named in ``fused`` instead, and
each expert's own projection (``…experts.<e>.gate_proj.weight``, as ``model.experts.unfuse`` names it) is
mapped to the file tensor it is (Mixtral's ``…experts.<e>.w1.weight``).
Outputs are written in the model's own layout (``io.checkpoint.write_weights``), where every name is its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

from torch import nn


@dataclass
class Names:
    """Model tensor name → checkpoint key, and the model tensors built from several checkpoint tensors."""

    keys: dict[str, str] = field(default_factory=dict)
    fused: dict[str, list[str]] = field(default_factory=dict)  # model name → the checkpoint keys it fuses


def checkpoint_names(model: nn.Module, keys: Iterable[str]) -> Names:
    """How ``model`` (a ``transformers`` model, or one built on its skeleton) reads the checkpoint ``keys``:
    each key renamed as ``from_pretrained`` renames it (identity for families with no conversion, and with
    a ``transformers`` that has none)."""
    keys = list(keys)
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # transformers 4: files and models share their names
        return Names({key: key for key in keys})
    try:
        transforms = get_model_conversion_mapping(model)
    except Exception:  # noqa: BLE001 - a model class transformers does not know: its own names
        transforms = []
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    found = Names()
    for key in keys:
        name, pattern = rename_source_key(key, renamings, converters) if transforms else (key, None)
        if pattern is None:
            found.keys.setdefault(name, key)
            continue
        found.fused.setdefault(name, []).append(key)
        expert = _expert_name(key, name, pattern, next(c for c in converters if pattern in c.source_patterns))
        if expert is not None:
            found.keys.setdefault(expert, key)
    return found


def _expert_name(key: str, fused: str, pattern: str, converter) -> str | None:
    """The unfused name of the expert projection the checkpoint tensor ``key`` is (None: not one): ``fused`` is
    ``…experts.gate_up_proj`` (from two source patterns, gate's first) or ``…experts.down_proj`` (one)."""
    sources = list(converter.source_patterns)
    if fused.endswith(".experts.gate_up_proj") and len(sources) == 2:
        role = ("gate_proj", "up_proj")[sources.index(pattern)]
    elif fused.endswith(".experts.down_proj") and len(sources) == 1:
        role = "down_proj"
    else:
        return None
    index = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), key)
    if index is None:
        return None
    return f"{fused.rsplit('.', 1)[0]}.{index.group(1)}.{role}.weight"
