"""The layer walk: the one loop in the package that moves calibration data through the decoder layers.

``for visit in walk(model, streams, device=..., propagate=...)``: the first decoder layer's inputs are
captured once per calibration stream (a pre-hook with kwargs, so attention masks and rotary embeddings
come along); each layer is then moved to the compute device and handed to the caller as a ``Visit``,
which runs it (``forward``, optionally under a statistics ``Collector``) and swaps modules in it
(``replace``, the only place a module is swapped). When the caller is done with a layer, the walk
computes the next layer's inputs and moves the layer back to ``offload``:

- ``propagate: compressed`` (GPTQ's sequential convention): the outputs of the layer as it now is
  (re-run only if a module changed since the stream's last forward);
- ``propagate: original`` (SVD-LLM's profiling): the outputs of the layer before anything in it changed
  (run before the first replacement if no forward had run yet).

``rules`` overrides that per stream. A *reference stream* (``reference_of(name)``: the same token batches as
``name``, always propagated by ``original``) carries the original model's hidden states beside the
compressed ones, for statistics that pair the two on each batch (``Visit.forward_paired``: the
cross-covariances of an output-matching refit: ``Visit.record_reference`` runs the original layer once and
keeps the inputs of the paired modules, ``Visit.forward_paired`` pairs them with each stage's).

Every pass uses it: the compression walk, statistics of the original model for model-level rules,
CURing's layer selection; a streaming loader or a distributed rank only changes where layers come from
and where outputs go. Only the current decoder layer sits on the compute device; hidden states between
layers are kept on ``offload`` (CPU by default).

A streamed model (``model.streaming.source_of(model)``, weights left on disk) has each layer's tensors read
when the walk reaches it and dropped when it leaves, and the modules outside the stack (embeddings) only
while the inputs are captured; ``sink(index, prefix, layer, next_inputs)``, if given, sees each finished
layer last (after the next layer's inputs are computed): where a streamed compression writes it out and
records it for ``--resume``.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from .. import timing
from ..errors import CompressorError
from ..model.experts import routed_linears
from ..model.modes import calibration_mode, outside_layers
from ..model.modules import dequantized
from ..model.streaming import source_of
from ..model.targets import decoder_layers
from ..stats.hooks import Collector, record_inputs
from .replay import Replay, finals
from .spill import Spill

DEFAULT_STREAM = "default"
REFERENCE_SUFFIX = ".reference"


def reference_of(stream: str) -> str:
    """The name of the stream that carries ``stream``'s batches through the original model."""
    return stream + REFERENCE_SUFFIX


def base_stream(name: str) -> str:
    """The calibration stream a (reference) stream's token batches come from."""
    return name[: -len(REFERENCE_SUFFIX)] if name.endswith(REFERENCE_SUFFIX) else name


class StopForward(Exception):
    """Raised by the layer-0 pre-hook once its inputs are captured."""


@dataclass
class LayerInput:
    hidden: Tensor  # (batch, seq, hidden), on the offload device
    args: tuple  # positional arguments after the hidden states (GPT-2 passes some)
    kwargs: dict[str, Any]  # attention mask, position embeddings, ...


@dataclass
class Stream:
    """One calibration set at the current layer."""

    inputs: list[LayerInput]  # this layer's inputs, one per batch
    outputs: list[Tensor] | None = None  # outputs of the layer's latest forward
    original: list[Tensor] | None = None  # outputs of the layer before anything in it changed
    stale: bool = False  # a module changed since ``outputs`` were computed


def to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def capture_inputs(model: nn.Module, layers: nn.ModuleList, batches: list[Tensor], device: torch.device,
                   offload: torch.device) -> list[LayerInput]:
    """Run the model up to layer 0 for each batch (token ids (b, seq)); keep its inputs and kwargs."""
    captured: list[LayerInput] = []

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "layer_past")}
        captured.append(LayerInput(args[0].to(offload), args[1:], kwargs))
        raise StopForward

    handle = layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    moved = outside_layers(model, layers)
    source = source_of(model)
    if source is not None:
        source.materialize(*moved)  # together: a tied head stays the embedding
    for module in moved:
        module.to(device)
    try:
        for ids in batches:
            try:
                model(input_ids=ids.to(device))
            except StopForward:
                pass
    finally:
        handle.remove()
        for module in moved:
            module.to(offload)
        if source is not None:
            source.release(*moved)
    return captured


@contextmanager
def stopping(layer: nn.Module, names: dict[str, str], stop: set[str] | None, before: bool = False) -> Iterator[None]:
    """Within the block, a forward of ``layer`` raises ``StopForward`` once every module of ``stop`` (qualified
    names; ``names`` maps them to ``layer``-relative ones) has run in it (``before``: has been called, the last
    one stopped before it runs: for statistics of inputs only); None: no stop. The hooks go after any registered
    before, so those still see the last module's call."""
    handles, seen = [], set()
    try:
        for name in stop or ():
            def hook(module, args, *output, name=name):
                seen.add(name)
                if seen >= stop:
                    seen.clear()
                    raise StopForward
            module = layer.get_submodule(names[name])
            handles.append(module.register_forward_pre_hook(hook) if before else module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def run_until(layer: nn.Module, item: LayerInput, visit: "Visit", partial: bool) -> list[Tensor]:
    """``run_layer`` on one input; a ``partial`` run may stop early (``stopping``) and gives no output."""
    try:
        return run_layer(layer, [item], visit.device, visit.offload, visit.spill)
    except StopForward:
        if not partial:
            raise
        return []


def run_layer(layer: nn.Module, inputs: list[LayerInput], device: torch.device,
              offload: torch.device, spill: Spill | None = None) -> list[Tensor]:
    """The layer's outputs (on offload; to disk past the memory budget) for every captured input."""
    outputs = []
    for item in inputs:
        out = layer(item.hidden.to(device), *to_device(item.args, device), **to_device(item.kwargs, device))
        out = out[0] if isinstance(out, (tuple, list)) else out
        out = out.to(offload)
        outputs.append(spill.store(out) if spill is not None else out)
    return outputs


class Visit:
    """One decoder layer on the compute device, with every stream's inputs at it."""

    def __init__(self, index: int, n_layers: int, prefix: str, layer: nn.Module, streams: dict[str, Stream],
                 device: torch.device, offload: torch.device, propagate: str, spill: Spill | None = None,
                 rules: dict[str, str] | None = None) -> None:
        self.index, self.n_layers, self.prefix, self.layer = index, n_layers, prefix, layer
        self.spill, self.rules = spill, rules or {}
        # reference stream → per batch: module name → its input in the original model (paired statistics)
        self.references: dict[str, list[dict[str, Tensor]]] = {}
        self.readers: dict[str, str] = {}  # module → the first module reading the same input (record_reference)
        self.recorded: dict[str, set[str]] = {}  # reference stream → the modules whose inputs it keeps
        self.streams, self.device, self.offload, self.propagate = streams, device, offload, propagate
        self.modified = False
        # module name → (args, kwargs, first output) of its call on the probe batch (``pipeline.compress``'s
        # group output error) in the layer as it now is: dropped at every replacement
        self.probe_calls: dict[str, tuple[tuple, dict[str, Any], Any]] = {}
        self.replaced: set[str] = set()  # relative names of the modules swapped in this visit
        # stream → module outputs kept between its staged forwards (replay.Replay); not with a memory budget,
        # nor in a layer with routed experts (whose calibration modes change what a block computes)
        self.replays: dict[str, Replay] = {}
        self.replayable = spill is None and not routed_linears(layer, prefix)

    def module(self, name: str) -> nn.Module:
        """A module of this layer by its fully qualified name."""
        return self.layer.get_submodule(self.relative(name))

    def relative(self, name: str) -> str:
        return name[len(self.prefix) + 1:] if name != self.prefix else ""

    def inputs(self, stream: str = DEFAULT_STREAM) -> list[Tensor]:
        """This layer's calibration inputs on ``stream``: the hidden states (batch, seq, hidden) of each batch,
        on the offload device (or spilled to disk)."""
        return [item.hidden for item in self.streams[stream].inputs]

    def forward(self, stream: str = DEFAULT_STREAM, collector: Collector | None = None) -> list[Tensor]:
        """Run the layer on one stream's inputs (statistics into ``collector``); its outputs (on offload)."""
        state = self.streams[stream]
        if collector is None:
            state.outputs = run_layer(self.layer, state.inputs, self.device, self.offload, self.spill)
        else:
            with collector:
                state.outputs = run_layer(self.layer, state.inputs, self.device, self.offload, self.spill)
        state.stale = False
        if not self.modified:
            state.original = state.outputs
        return state.outputs

    def rule(self, stream: str) -> str:
        """How ``stream`` goes on to the next layer: ``compressed`` or ``original``."""
        return self.rules.get(stream, self.propagate)

    def record_reference(self, reference: str, names: dict[str, str], paired: set[str]) -> dict[str, str]:
        """Run the layer as the original model has it (before any change) once on ``reference``'s batches: that
        stream's outputs, and the input of each module of ``paired`` (among ``names``, qualified → relative) per
        batch, kept (on offload; spilled past the memory budget) for every later ``forward_paired`` of this
        layer: its stages share this one forward. Returns, for each module of ``names`` that ran, the first one
        that read the same tensor (itself, or an earlier one: q/k/v, gate/up). Once recorded, not run again."""
        kept = self.references.setdefault(reference, [])
        if reference in self.recorded and paired <= self.recorded[reference]:
            return self.readers
        if self.modified:
            raise CompressorError("paired statistics (an output-matching refit) need the layer as the "
                                  "original model has it: put that step first")
        theirs, outputs = self.streams[reference], []
        kept.clear()
        for item in theirs.inputs:
            with record_inputs(self.layer, names, self.readers) as recorded:
                outputs += run_layer(self.layer, [item], self.device, self.offload, self.spill)
            kept.append(self._keep({name: x for name, x in recorded.items() if name in paired}))
        self.recorded[reference] = set(paired)
        theirs.outputs, theirs.original, theirs.stale = outputs, outputs, False
        return self.readers

    def _keep(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """``inputs`` on offload (spilled past the memory budget), modules reading one tensor still sharing one."""
        moved: dict[tuple, Tensor] = {}
        for name, x in inputs.items():
            key = (x.data_ptr(), tuple(x.shape), x.dtype)
            if key not in moved:
                moved[key] = x.to(self.offload)
                moved[key] = self.spill.store(moved[key]) if self.spill is not None else moved[key]
            inputs[name] = moved[key]
        return inputs

    def forward_paired(self, stream: str, reference: str, collector: Collector, names: dict[str, str],
                       partial: bool = False, pending: set[str] | None = None) -> list[Tensor] | None:
        """Run the layer as it is on ``stream``, batch by batch, with the inputs the modules ``names`` (qualified →
        relative) had on the same batch of ``reference`` in the original model (``record_reference``, which must
        have recorded them) for ``collector`` to pair with this stream's (and those of ``collector.residuals``: the
        residual streams its ``drift_cross`` watches pair); its statistics go into ``collector``.

        ``partial`` (a stage of a staged step): each forward stops once every module of ``names`` has been
        called (before the last one runs, where ``collector`` watches inputs only), so a stage early in the layer
        runs only that far; no outputs are kept and None is returned. ``pending`` (qualified names: the modules
        this and later stages replace): the modules holding none of them, nor any of ``names``, are final; their
        outputs are kept for this stream's next forward, which replays them (``replay``)."""
        kept = self.references.get(reference)
        if not kept:
            raise ValueError("a paired forward needs its reference recorded first (record_reference)")
        mine, ours = self.streams[stream], []
        stop = set(names) if partial else None
        before = all(watch.where == "input" for watch in collector.watches)
        if stop and before:  # modules reading one input (q/k/v, gate/up): stop before the first one runs
            collector.share(self.readers)
            stop = {self.readers[name] if self.readers.get(name) in names else name for name in stop}
        keep = self._finals(stream, {*(pending or ()), *names}) if pending is not None else None
        paired = {*names, *collector.residuals}  # the residual streams that drift_cross watches pair, too
        for batch, (item, recorded) in enumerate(zip(mine.inputs, kept)):
            collector.reference = {name: recorded[name].to(self.device) for name in paired if name in recorded}
            with collector, stopping(self.layer, names, stop, before), self._replaying(stream, batch, keep):
                ours += run_until(self.layer, item, self, partial)
            collector.reference = {}
        if partial:
            mine.stale = True
            return None
        mine.outputs, mine.stale = ours, False
        if not self.modified:
            mine.original = ours
        return ours

    def _finals(self, stream: str, pending: set[str]) -> set[str] | None:
        """The modules (relative names) whose outputs ``stream``'s forwards keep (``replay.finals``), None where
        nothing is kept."""
        if not self.replayable:
            return None
        self.replays.setdefault(stream, Replay())
        return finals(self.layer, self.replaced, {self.relative(name) for name in pending})

    def _replaying(self, stream: str, batch: int, keep: set[str] | None):
        """The context of one forward of ``stream`` on ``batch``: kept outputs replayed, ``keep``'s kept (None:
        no replay)."""
        replay = self.replays.get(stream)
        if keep is None or replay is None:
            return nullcontext()
        return replay.around(self.layer, batch, keep)

    def replace(self, name: str, module: nn.Module) -> None:
        """Swap the module ``name`` of this layer for ``module`` (the only place modules are swapped)."""
        if not self.modified:
            for stream, state in self.streams.items():
                if self.rule(stream) == "original" and state.original is None:  # before the layer first changes
                    self.forward(stream)
        module.to(self.device)
        self.layer.set_submodule(self.relative(name), module)
        self.modified = True
        self.probe_calls.clear()
        self.replaced.add(self.relative(name))
        for replay in self.replays.values():
            replay.drop(self.relative(name))
        for state in self.streams.values():
            state.stale = True

    def _propagated(self, stream: str) -> list[Tensor]:
        """``forward(stream)``, the modules' outputs kept by its staged forwards replayed (``replay``)."""
        replay = self.replays.pop(stream, None)
        if replay is None:
            return self.forward(stream)
        state, outputs = self.streams[stream], []
        for batch, item in enumerate(state.inputs):
            with replay.around(self.layer, batch, set()):
                outputs += run_layer(self.layer, [item], self.device, self.offload, self.spill)
        state.outputs, state.stale = outputs, False
        if not self.modified:
            state.original = outputs
        return outputs

    def next_inputs(self) -> dict[str, list[LayerInput]]:
        """Every stream's inputs of the next layer, by the ``propagate`` rule."""
        following = {}
        for stream, state in self.streams.items():
            if self.rule(stream) == "original" and state.original is not None:
                hidden = state.original
            elif state.outputs is None or state.stale:
                with dequantized(self.layer):  # quantized weights unpacked once, not at each batch (same values)
                    hidden = self._propagated(stream)
            else:
                hidden = state.outputs
            following[stream] = [LayerInput(h, item.args, item.kwargs) for h, item in zip(hidden, state.inputs)]
        self.replays.clear()
        return following


def walk(model: nn.Module, streams: dict[str, list[Tensor]] | None, *, device: torch.device,
         propagate: str = "compressed", offload: torch.device | None = None,
         last_layer: int | None = None, timed: bool = False,
         sink: Callable[[int, str, nn.Module, dict[str, list[LayerInput]]], None] | None = None,
         resume: tuple[int, dict[str, list[Tensor]]] | None = None,
         spill: Spill | None = None, rules: dict[str, str] | None = None) -> Iterator[Visit]:
    """Visit decoder layers 0 … ``last_layer`` (default: all) in order, each on ``device`` in turn.

    ``streams``: stream name → token ids (batch, seq) of a calibration set; None or {} for a data-free
    walk (no forward passes; a visit then only swaps modules). Layers after ``last_layer`` never run.
    ``timed``: the input capture and the propagation between layers are timing phases of their own
    (``compressor.timing``; else their time is the enclosing phase's, as in a model-level pass).
    ``sink(index, prefix, layer, next_inputs)`` sees each finished layer and the next layer's inputs.
    ``resume``: (first layer, stream → its hidden states per batch) continues an interrupted walk there
    (the inputs' other arguments, masks and position embeddings, are captured again). ``spill``: hidden
    states past a memory budget go to disk (``walk.spill``). ``rules``: stream name → its own propagate
    rule (a reference stream's ``original``).
    """
    offload = offload or torch.device("cpu")
    prefix, layers = decoder_layers(model)
    source = source_of(model)
    last = len(layers) - 1 if last_layer is None else last_layer
    def phase(name: str):  # the walk's own phases, where its caller times them
        return timing.phase(name) if timed else nullcontext()

    with calibration_mode(model):
        with phase("capture"):
            inputs = {name: capture_inputs(model, layers, batches, device, offload)
                      for name, batches in sorted((streams or {}).items())}
        first = 0
        if resume is not None:
            first, hidden = resume
            inputs = {name: [LayerInput(h, item.args, item.kwargs) for h, item in zip(hidden[name], items)]
                      for name, items in inputs.items()}
        if spill is not None:
            spill.check(sum(item.hidden.numel() * item.hidden.element_size()
                            for items in inputs.values() for item in items))
            inputs = {name: [LayerInput(spill.store(item.hidden), item.args, item.kwargs) for item in items]
                      for name, items in inputs.items()}
        for index in range(first, last + 1):
            if source is not None:
                source.materialize(layers[index])
            layer = layers[index].to(device)
            visit = Visit(index, len(layers), f"{prefix}.{index}", layer,
                          {name: Stream(items) for name, items in inputs.items()}, device, offload, propagate,
                          spill, rules)
            yield visit
            with phase("propagation"):
                inputs = visit.next_inputs() if index < last else {}  # the last visited layer's outputs go nowhere
            if sink is not None:
                sink(index, f"{prefix}.{index}", layers[index], inputs)
            layers[index].to(offload)
            if source is not None:
                source.release(layers[index])
