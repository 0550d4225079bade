"""Forward hooks that fill ``TensorStats`` during one calibration pass of a decoder layer (an input's before
its module runs, an output's after).

``with Collector(watches) as collector: run the layer`` then ``collector.result()`` → (module name,
where) → stats. Modules that read the same input tensor (q/k/v, gate/up) share one ``TensorStats``:
sharing is found on the first batch by tensor identity, so no architecture table is needed. Every
hook is removed in ``remove`` (called by ``__exit__``, also when the forward raises): the one place.
In a run spread over several ranks, ``result`` sums the accumulators across them.
Paired statistics (``cross_gram``, ``drift_cross``) read ``collector.reference``: module name → that module's
input on the same batch of the reference stream, recorded just before by ``record_inputs`` (whose hooks live
only within its ``with`` block); ``drift_cross`` pairs a watched module's input with the residual stream it
writes into, the input of ``Watch.residual`` (its block's norm) in this forward and in the reference.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from torch import Tensor, nn

from .. import timing
from ..parallel.distributed import all_reduce_stats
from .accumulators import PendingStats, TensorStats


@dataclass(frozen=True)
class Watch:
    """What to accumulate on one module: its ``input`` (first positional argument), ``output``, or its
    output ``rotated`` by the rotary embedding its attention block applies (q/k after RoPE, per head)."""

    name: str  # fully qualified module name
    module: nn.Module
    where: str  # "input" | "output"
    kinds: frozenset[str]  # of accumulators.TENSOR_STATISTICS
    heads: int | None = None  # output Grams per head
    rope_block: nn.Module | None = None  # "rotated": the attention block whose position_embeddings rotate it
    pending: bool = False  # a routed expert's linear: keep its batches, summed when read (``PendingStats``)
    # drift_cross: (qualified name, module) whose input is the residual stream this module's output is added to
    residual: tuple[str, nn.Module] | None = None


Key = tuple[str, str]  # (module name, where)


class Collector:
    """Accumulates every ``Watch`` over the batches run inside the ``with`` block."""

    def __init__(self, watches: list[Watch], phase: str | None = None) -> None:
        self.watches = watches
        self.phase = phase  # the timing phase of the hooks' accumulation (None: the enclosing phase's time)
        self.stats: dict[Key, TensorStats] = {}
        self.shared_with: dict[Key, Key] = {}  # input watch → the watch whose stats it shares
        self._handles: list = []
        self._first_inputs: list[tuple[Tensor, Key]] = []
        self._seen: set[Key] = set()
        self._rotary: dict[int, tuple[Tensor, Tensor]] = {}  # id(attention block) → its current (cos, sin)
        self.reference: dict[str, Tensor] = {}  # module name → its reference input of the current batch
        self._residuals: dict[str, Tensor] = {}  # residual module name → its input in the current forward
        self._summed = False  # across ranks, once (result)

    def share(self, readers: dict[str, str]) -> None:
        """Take the modules that read one input as known (``readers``: module → the first module reading the same
        tensor, as ``record_inputs`` found them): a watched module whose first reader is watched too shares that
        one's statistics without its own hook having to run (a forward may stop before it: ``walk.stopping``)."""
        watched = {w.name for w in self.watches if w.where == "input"}
        for name in watched:
            owner = readers.get(name, name)
            if owner != name and owner in watched:
                self.shared_with[(name, "input")] = (owner, "input")
                self._seen.add((name, "input"))

    def _owner(self, key: Key, x: Tensor, pending: bool = False) -> Key:
        """The key whose stats ``x`` goes into: its own, or that of an earlier module reading the same x."""
        if key in self._seen:  # second batch onwards: sharing is already known
            return self.shared_with.get(key, key)
        self._seen.add(key)
        owner = next((o for t, o in self._first_inputs if t is x), key) if key[1] == "input" else key
        if owner != key:
            self.shared_with[key] = owner
        else:
            if key[1] == "input":
                self._first_inputs.append((x, key))
            self.stats[key] = PendingStats() if pending else TensorStats()
        return owner

    def _hook(self, watch: Watch):
        key = (watch.name, watch.where)

        def hook(module: nn.Module, args: tuple, output) -> None:
            x = args[0] if watch.where == "input" else (output[0] if isinstance(output, tuple) else output)
            if watch.where == "rotated":
                x = rotated(x, *self._rotary[id(watch.rope_block)], watch.heads)
            owner = self._owner(key, x, watch.pending)
            if owner == key:
                self.stats[key].add(x, watch.kinds, watch.heads, self.reference.get(watch.name), self._residual(watch))

        # a phase of its own: nested in the forward's, and taken out of it (timing)
        return timing.timed(self.phase)(hook) if self.phase is not None else hook

    @property
    def residuals(self) -> set[str]:
        """The modules whose inputs are residual streams some watch pairs (``drift_cross``)."""
        return {w.residual[0] for w in self.watches if w.residual is not None}

    def _residual(self, watch: Watch) -> tuple[Tensor, Tensor] | None:
        """(r_ref, r) of the current batch for a ``drift_cross`` watch, None for the others."""
        if watch.residual is None:
            return None
        name = watch.residual[0]
        if name not in self.reference or name not in self._residuals:
            raise ValueError(f"drift_cross of {watch.name}: no residual stream ({name}) was seen on this batch")
        return self.reference[name], self._residuals[name]

    def __enter__(self) -> "Collector":
        try:
            residuals = {w.residual[0]: w.residual[1] for w in self.watches if w.residual is not None}
            for name, module in residuals.items():  # before the block that reads it, so before its writer
                self._handles.append(module.register_forward_pre_hook(
                    lambda module, args, name=name: self._residuals.__setitem__(name, args[0])))
            blocks = {id(w.rope_block): w.rope_block for w in self.watches if w.rope_block is not None}
            for block in blocks.values():
                self._handles.append(block.register_forward_pre_hook(self._rotary_hook, with_kwargs=True))
            for watch in self.watches:
                hook = self._hook(watch)
                if watch.where == "input":  # before the module runs: a forward may stop there (walk.stopping)
                    self._handles.append(watch.module.register_forward_pre_hook(
                        lambda module, args, hook=hook: hook(module, args, None)))
                else:
                    self._handles.append(watch.module.register_forward_hook(hook))
        except BaseException:
            self.remove()
            raise
        return self

    def _rotary_hook(self, block: nn.Module, args: tuple, kwargs: dict) -> None:
        embeddings = kwargs.get("position_embeddings")
        if embeddings is None:
            raise ValueError(f"{type(block).__name__} got no position_embeddings: nothing to rotate by")
        self._rotary[id(block)] = embeddings

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._first_inputs.clear()
        self._rotary.clear()
        self._residuals.clear()

    def result(self) -> dict[Key, TensorStats]:
        """(name, where) → stats; shared objects for modules that read the same input. In a run of several
        ranks the first call sums every accumulator across them (``distributed.all_reduce_stats``)."""
        if not self._summed:
            all_reduce_stats(self.stats[key] for key in sorted(self.stats))
            self._summed = True
        out = dict(self.stats)
        for key, owner in self.shared_with.items():
            out[key] = self.stats[owner]
        return out


def rotated(x: Tensor, cos: Tensor, sin: Tensor, heads: int) -> Tensor:
    """``x`` (batch, seq, heads·d) with each head rotated by RoPE (``rotate_half``; cos/sin (batch, seq, d))."""
    from ..model.attention import rotate_half

    per_head = x.reshape(*x.shape[:-1], heads, -1)  # (batch, seq, heads, d)
    cos, sin = cos[..., None, :].to(x.dtype), sin[..., None, :].to(x.dtype)
    return (per_head * cos + rotate_half(per_head) * sin).reshape(x.shape)


@contextmanager
def record_inputs(layer: nn.Module, names: dict[str, str],
                  readers: dict[str, str] | None = None) -> Iterator[dict[str, Tensor]]:
    """Within the block, each forward of ``layer`` leaves the input of the modules ``names`` (fully
    qualified name → name relative to ``layer``) in the yielded dict, by fully qualified name (the last
    batch's; hooks removed on exit). ``readers`` (if given) gets, for each of them that ran, the first module
    (in call order) that read the very same tensor: itself, or an earlier one (q/k/v, gate/up read one)."""
    recorded: dict[str, Tensor] = {}
    handles = []
    first: list[tuple[Tensor, str]] = []  # tensors held until exit: their identity cannot be reused

    def hook(module: nn.Module, args: tuple, out, name: str) -> None:
        recorded[name] = args[0].detach()
        if readers is not None and name not in readers:
            readers[name] = next((owner for x, owner in first if x is args[0]), name)
            first.append((args[0], name))

    try:
        for name, relative in names.items():
            module = layer.get_submodule(relative)
            handles.append(module.register_forward_hook(lambda m, args, out, name=name: hook(m, args, out, name)))
        yield recorded
    finally:
        for handle in handles:
            handle.remove()
        first.clear()
