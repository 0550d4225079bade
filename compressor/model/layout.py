"""A checkpoint's tensor names as the model holds them. ``transformers`` 5 reads some families' files under
other names than its modules use (GPT-NeoX's ``embed_out`` is the model's ``lm_head``; Mixtral's
``block_sparse_moe`` is its ``mlp``) and fuses others on loading (each expert's projections into one 3-D
tensor per layer). ``checkpoint_names(model, keys)`` maps every tensor the model holds to the key of the
file tensor it is read from, applying the family's renames as ``from_pretrained`` does; a tensor that
``from_pretrained`` assembles from several file tensors (fused experts) is named in ``fused`` instead.
Outputs are written in the model's own layout (``io.checkpoint.write_weights``), where every name is its own.
"""

from __future__ import annotations

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
        else:
            found.fused.setdefault(name, []).append(key)
    return found
