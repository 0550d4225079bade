"""Module outputs kept from one forward of a decoder layer to the next on the same batch (``Replay``).

A staged step (an output-matching refit) runs the layer once per stage, each time on the same batches, with a
few more of its modules replaced; the walk then runs it once more to propagate. Between two such forwards most
of the layer did not change: q/k/v, once replaced, give the same outputs at every later stage, and the
attention block, once its last linear is replaced, gives the same output to the MLP stages and to the
propagation. ``Replay`` keeps, per batch, the output of the *final* modules (``finals``: the largest modules
that hold a replaced module and none that is still to change) with the arguments they were called with; in a
later forward such a module called with equal arguments (``torch.equal``, bit for bit) returns its kept
output instead of running. Its outputs are the ones it would compute: the module and its inputs are the same
and its forward deterministic, so every number downstream is unchanged. A module replaced since (``drop``)
loses its entry and so do the modules holding it.

Kept: the arguments (shared with the modules that read the same tensor) and the outputs of the final modules
of the current stage, for every batch of the stream: at the MLP's last stage the attention block's output and
the gate/up outputs (SmolLM2-135M, 16k tokens: the compression pass's peak RSS 1.95 → 2.53 GB). Not used with a
memory budget (``--max-memory``).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor, nn

Entry = tuple[tuple, dict[str, Any], Any]  # (args, kwargs, output) of one call


def finals(layer: nn.Module, replaced: set[str], pending: set[str]) -> set[str]:
    """The largest modules of ``layer`` (relative names, the layer itself excluded) that contain (or are) a
    module of ``replaced`` and none of ``pending`` (to be replaced or watched later): those whose output no
    later change of this layer moves."""
    def holds(name: str, names: set[str]) -> bool:
        return any(other == name or other.startswith(name + ".") for other in names)

    found: set[str] = set()
    for name, _ in layer.named_modules():
        if not name or any(name.startswith(parent + ".") for parent in found):
            continue
        if holds(name, replaced) and not holds(name, pending):
            found.add(name)
    return found


def same(a: Any, b: Any) -> bool:
    """``a`` and ``b`` equal bit for bit: tensors by ``torch.equal`` (same shape, dtype and device), nested
    tuples, lists and dicts item by item, anything else by ``==``."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (isinstance(a, Tensor) and isinstance(b, Tensor) and (a is b or (
            a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b))))
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 — an object without a truth value for ==: not known to be the same
        return False


def copied(value: Any) -> Any:
    """``value`` with every tensor cloned: a kept output handed to the layer, which might change it in place."""
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(copied(v) for v in value)
    if isinstance(value, dict):
        return {k: copied(v) for k, v in value.items()}
    return value


class Replay:
    """Per batch of one stream: final modules' calls (relative name → ``Entry``) kept for the next forward."""

    def __init__(self) -> None:
        self.batches: dict[int, dict[str, Entry]] = {}

    def drop(self, name: str) -> None:
        """Forget the entries of module ``name`` (relative), of the modules it holds and of those holding it."""
        for entries in self.batches.values():
            for kept in [k for k in entries if k == name or k.startswith(name + ".") or name.startswith(k + ".")]:
                del entries[kept]

    def clear(self) -> None:
        self.batches.clear()

    @contextmanager
    def around(self, layer: nn.Module, batch: int, keep: set[str]) -> Iterator[None]:
        """Within the block, one forward of ``layer`` on batch ``batch``: a module with an entry called with the
        same arguments returns its kept output; each module of ``keep`` that runs is kept for the next forward;
        entries of modules not in ``keep`` go after this forward."""
        entries = self.batches.setdefault(batch, {})
        wrapped = []
        try:
            for name in sorted(set(entries) | keep):
                module = layer.get_submodule(name)
                wrapped.append((module, module.__dict__.get("forward")))
                module.forward = self._forward(module, name, entries, name in keep)
            yield
        finally:
            for module, before in wrapped:
                if before is None:
                    del module.forward
                else:
                    module.forward = before
            for name in [k for k in entries if k not in keep]:
                del entries[name]

    @staticmethod
    def _forward(module: nn.Module, name: str, entries: dict[str, Entry], record: bool):
        run = module.forward  # the module's own forward (or one a library set on the instance)

        def forward(*args, **kwargs):
            entry = entries.get(name)
            if entry is not None and same(entry[0], args) and same(entry[1], kwargs):
                return copied(entry[2])
            output = run(*args, **kwargs)
            if not record:
                entries.pop(name, None)
                return output
            entries[name] = (args, kwargs, output)
            return copied(output)

        return forward
