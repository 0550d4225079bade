"""Input statistics of linears, collected by forward hooks during a layer's calibration pass.

Per linear input ``x`` (tokens, in), accumulated over the calibration data:
- ``gram``: Σ xᵀx (in, in), each batch computed in fp32 and added into an fp64 accumulator;
- ``abs_sum``: Σ |x| (in,)   → ``abs_mean`` (ASVD's activation scale);
- ``sq_sum``: Σ x² (in,)     → ``sq_norm`` (Wanda / CURing scores).

Linears that read the same tensor (q/k/v, gate/up) share one ``LinearStats``: sharing is found on
the first batch by tensor identity, so no architecture table is needed. Hooks are removed in
``__exit__``, also when the forward raises.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

STAT_KINDS = ("gram", "abs_mean", "sq_norm")


@dataclass
class LinearStats:
    n_tokens: int = 0
    gram: Tensor | None = None  # (in, in) fp64, Σ xᵀx
    abs_sum: Tensor | None = None  # (in,) fp64, Σ |x|
    sq_sum: Tensor | None = None  # (in,) fp64, Σ x²

    @property
    def abs_mean(self) -> Tensor:
        return self.abs_sum / max(self.n_tokens, 1)

    @property
    def sq_norm(self) -> Tensor:
        return self.sq_sum if self.sq_sum is not None else torch.diagonal(self.gram).clone()

    def add(self, x: Tensor, needs: frozenset[str]) -> None:
        """Accumulate a batch of inputs x (..., in)."""
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, in)
        self.n_tokens += x.shape[0]
        if "gram" in needs:
            batch = (x.T @ x).double()
            self.gram = batch if self.gram is None else self.gram.add_(batch)
        if "abs_mean" in needs:
            batch = x.abs().sum(0).double()
            self.abs_sum = batch if self.abs_sum is None else self.abs_sum.add_(batch)
        if "sq_norm" in needs and "gram" not in needs:
            batch = x.square().sum(0).double()
            self.sq_sum = batch if self.sq_sum is None else self.sq_sum.add_(batch)


class StatsCollector:
    """``with StatsCollector(modules, needs) as c: run the layer`` → ``c.stats[name]``."""

    def __init__(self, modules: dict[str, nn.Module], needs: frozenset[str]) -> None:
        self.modules, self.needs = modules, needs
        self.stats: dict[str, LinearStats] = {}
        self.shared_with: dict[str, str] = {}  # name → name of the linear whose stats it shares
        self.seconds = 0.0  # time spent accumulating (inside the hooks)
        self._handles: list = []
        self._first_batch_inputs: list[tuple[Tensor, str]] = []
        self._batches_seen: set[str] = set()

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            start = time.perf_counter()
            x = args[0]
            if name in self._batches_seen:  # second batch onwards: sharing is already known
                owner = self.shared_with.get(name, name)
            else:
                self._batches_seen.add(name)
                owner = next((o for t, o in self._first_batch_inputs if t is x), name)
                if owner != name:
                    self.shared_with[name] = owner
                else:
                    self._first_batch_inputs.append((x, name))
                    self.stats[name] = LinearStats()
            if owner == name:
                self.stats[name].add(x, self.needs)
            self.seconds += time.perf_counter() - start

        return hook

    def __enter__(self) -> "StatsCollector":
        try:
            for name, module in self.modules.items():
                self._handles.append(module.register_forward_hook(self._hook(name)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._first_batch_inputs.clear()

    def result(self) -> dict[str, LinearStats]:
        """name → stats, shared objects for linears that read the same input."""
        out = dict(self.stats)
        for name, owner in self.shared_with.items():
            out[name] = self.stats[owner]
        return out
