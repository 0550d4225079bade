"""Calibration activations beyond a memory budget (``--max-memory``) spilled to disk.

The layer walk keeps each stream's hidden states on the CPU (inputs of the current layer, its outputs,
and with ``propagate: original`` the original outputs). When one layer's worth of them (the inputs of every
stream, times the three copies) would exceed the budget, each hidden-state tensor the walk makes from then
on is written to a file in a spill folder and replaced by a tensor memory-mapped from that file
(``torch.from_file``, shared): the same values, and every consumer (the layer's forward, statistics,
distances) reads it as any tensor, while the pages are file-backed, so the kernel evicts them under memory
pressure instead of the process running out of memory. Each file is unlinked as soon as it is mapped: its
disk space goes when the tensor does, and nothing is left behind by a crash.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from ..errors import CompressorError

UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
         "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}


def parse_size(text: str, option: str = "--max-memory") -> int:
    """``8GB``, ``512MiB``, ``1e9`` → bytes (binary units: GB = GiB, as memory is counted)."""
    value = text.strip().lower().replace(" ", "")
    number = value.rstrip("kmgtib")
    unit = value[len(number):]
    try:
        size = float(number)
    except ValueError:
        size = -1.0
    if unit not in UNITS or size <= 0:
        raise CompressorError(f"{option}: {text!r} is not a size (e.g. 8GB, 512MB)")
    return int(size * UNITS[unit])


class Spill:
    """Hidden states to disk once a layer's worth of them passes ``budget`` bytes."""

    def __init__(self, budget: int, folder: Path | None = None) -> None:
        self.budget, self.active = budget, False
        self.folder = Path(tempfile.mkdtemp(prefix="compressor-spill-", dir=folder))

    def check(self, per_layer_bytes: int) -> None:
        """Start spilling if a layer's hidden states (every stream's inputs × 3 copies) exceed the budget."""
        self.active = self.active or 3 * per_layer_bytes > self.budget

    def store(self, tensor: Tensor) -> Tensor:
        """``tensor`` (CPU) as a tensor of the same values mapped from a file, when spilling; else itself."""
        if not self.active or tensor.device.type != "cpu" or tensor.numel() == 0:
            return tensor
        tensor = tensor.detach().contiguous()
        handle, name = tempfile.mkstemp(dir=self.folder, suffix=".bin")
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(memoryview(tensor.view(torch.uint8).reshape(-1).numpy()))  # no copy
            mapped = torch.from_file(name, shared=True, size=tensor.numel(), dtype=tensor.dtype)
        finally:
            os.unlink(name)  # the mapping keeps the data; the disk space goes with the tensor
        return mapped.view(tensor.shape)

    def close(self) -> None:
        try:
            os.rmdir(self.folder)
        except OSError:
            pass
