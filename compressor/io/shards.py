"""Incremental output of a streamed compression: each finished decoder layer goes to its own shard at once.

``ShardWriter(folder, n_layers, ...)`` is the walk's ``sink``: when a layer is done (after the next layer's
inputs are computed), its tensors are written, in the same layout ``io.save`` gives a model in memory
(compensated modules as their base, ``--merge`` as dense weights, floating tensors in the storage dtype),
to ``model-<i>-of-<n>.safetensors`` with ``n = layers + 1``; the low-rank paths of compensated modules are
kept (copies, in the storage dtype) for the adapter. Tensors are written under the family's checkpoint names, as ``save_pretrained`` writes them
(``family_layout``). ``finish`` writes the last shard (the tensors outside the
decoder stack, read from the checkpoint: embeddings, final norm, an untied head), the index and the config.
The folder is the run's temporary output directory: nothing appears at ``--out`` before the whole output is.
Each shard is written durably (``durable.write``: temporary name, flushed, renamed) and its sha256 kept in
``digests``, which the resume record holds, so that ``--resume`` reuses only the shards as they were written.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..model.architecture import decoder_layers
from ..model.modes import outside_layers
from ..model.streaming import source_of
from ..model.weights import is_tied
from . import durable
from . import serving as export
from .checkpoint import compressed_modules, merge_in_place, stored_as

INDEX = "model.safetensors.index.json"


def family_layout(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` (under ``model``'s names) as the family's checkpoints name them: transformers' revert of
    its load-time renames and expert fusion, what ``save_pretrained`` writes (GPT-NeoX's head as
    ``embed_out``, Mixtral's fused experts, and each unfused expert's tensors, as
    ``block_sparse_moe.experts.<e>.w1`` ...)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4: no conversions
        return tensors
    return dict(revert_weight_conversion(model, export.expert_layout(model, tensors)))


class ShardWriter:
    def __init__(self, folder: Path, n_layers: int, storage_dtype: torch.dtype | None, merge: bool,
                 model: nn.Module | None = None) -> None:
        self.model = model  # whose family layout the shards are written in (None: the model's own names)
        self.folder, self.n_shards = Path(folder), n_layers + 1
        self.storage_dtype, self.merge = storage_dtype, merge
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self.loras: dict[str, nn.Module] = {}  # name → a copy of a compensated module's low-rank path
        self.written: set[int] = set()
        self.digests: dict[str, str] = {}  # shard → the sha256 of the file as written

    def shard(self, position: int) -> str:
        return f"model-{position + 1:05d}-of-{self.n_shards:05d}.safetensors"

    def _save(self, position: int, tensors: dict[str, torch.Tensor]) -> None:
        name = self.shard(position)
        if self.model is not None:
            tensors = family_layout(self.model, tensors)
        tensors = {key: value.detach().contiguous() for key, value in tensors.items()}
        self.digests[name] = durable.write(self.folder / name,
                                           lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
        for key, value in tensors.items():
            self.weight_map[key] = name
            self.total_size += value.numel() * value.element_size()

    def __call__(self, index: int, prefix: str, layer: nn.Module) -> None:
        """Write decoder layer ``index`` (when it is done, before the walk releases it)."""
        modules = compressed_modules(layer)
        if self.merge:  # dense weights written; the layer keeps its compressed modules (the manifest counts them)
            merge_in_place(layer)
            with stored_as(layer, self.storage_dtype):
                self._save_layer(index, prefix, layer)
            for name, module in modules.items():
                layer.set_submodule(name, module)
        else:
            with stored_as(layer, self.storage_dtype), export.base_layout(layer, modules) as loras:
                self.loras.update({f"{prefix}.{name}": copy.deepcopy(lora) for name, lora in loras.items()})
                self._save_layer(index, prefix, layer)
        self.written.add(index)

    def _save_layer(self, index: int, prefix: str, layer: nn.Module) -> None:
        self._save(index, {f"{prefix}.{key}": value for key, value in layer.state_dict().items()})

    def finish(self, model: nn.Module) -> None:
        """The tensors outside the decoder stack, the index and the config (after every layer)."""
        prefix, layers = decoder_layers(model)
        missing = sorted(set(range(len(layers))) - self.written)
        if missing:
            raise RuntimeError(f"streamed output: decoder layer {missing[0]} was never written")
        source = source_of(model)
        with source.held(outside_layers(model, layers)), stored_as(model, self.storage_dtype):
            state = {key: value for key, value in model.state_dict().items()
                     if not key.startswith(prefix + ".") and not is_tied(model, key)}
            self._save(self.n_shards - 1, state)
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        write_config(model, self.folder, self.storage_dtype)


def write_config(model: nn.Module, folder: Path, dtype: torch.dtype | None) -> None:
    """config.json and generation_config.json as ``save_pretrained`` writes them."""
    config: Any = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.dtype = dtype or next(model.parameters()).dtype
    config.save_pretrained(folder)
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
