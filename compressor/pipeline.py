"""The layer walk: capture the first decoder layer's inputs, then for each layer collect its
statistics, run the recipe's steps on it, and compute its outputs for the next layer.

Only the current decoder layer sits on the compute device; hidden states between layers are kept
on ``offload`` (CPU by default). With ``propagate: compressed`` (default, GPTQ's sequential
convention) layer i+1 is calibrated on the outputs of the already-compressed layer i; with
``propagate: original`` on the original model's outputs (SVD-LLM's profiling). Steps run in recipe
order on a layer before the next layer; ``statistics: once`` gives every step the statistics of the
layer before any step changed it (one pass), ``per_step`` re-collects them for each step that needs data.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from . import arch
from .base import Compressor, LayerContext, Outcome, Target
from .linalg import relative_error
from .modules import weight_of
from .stats import LinearStats, StatsCollector


class StopForward(Exception):
    """Raised by the layer-0 pre-hook once its inputs are captured."""


@dataclass
class LayerInput:
    hidden: Tensor  # (batch, seq, hidden), on the offload device
    args: tuple  # positional arguments after the hidden states (GPT-2 passes some)
    kwargs: dict[str, Any]  # attention mask, position embeddings, ...


@dataclass
class Step:
    compressor: Compressor
    targets: list[str]
    ignore: list[str]
    data: str = "default"  # the calibration stream this step's statistics come from (walk's ``batches``)


@dataclass
class WalkReport:
    log: list[dict[str, Any]] = field(default_factory=list)  # one entry per targeted module
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


@contextmanager
def calibration_mode(model: nn.Module) -> Iterator[None]:
    """no_grad, eval mode, no KV cache; everything restored on exit."""
    was_training = model.training
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    model.eval()
    if config is not None:
        config.use_cache = False
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
        if config is not None:
            config.use_cache = use_cache


def capture_inputs(model: nn.Module, layers: nn.ModuleList, batches: list[Tensor], device: torch.device,
                   offload: torch.device) -> list[LayerInput]:
    """Run the model up to layer 0 for each batch (token ids (b, seq)); keep its inputs and kwargs."""
    captured: list[LayerInput] = []

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "layer_past")}
        captured.append(LayerInput(args[0].to(offload), args[1:], kwargs))
        raise StopForward

    handle = layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    moved = _outside_layers(model, layers)
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
    return captured


def _outside_layers(model: nn.Module, layers: nn.ModuleList) -> list[nn.Module]:
    """The largest submodules that do not contain the decoder stack (embeddings, rotary, norm, head)."""

    def visit(module: nn.Module) -> list[nn.Module]:
        if module is layers:
            return []
        if not any(sub is layers for sub in module.modules()):
            return [module]
        return [found for child in module.children() for found in visit(child)]

    return visit(model)


def run_layer(layer: nn.Module, inputs: list[LayerInput], device: torch.device,
              offload: torch.device) -> list[Tensor]:
    """The layer's outputs (on offload) for every captured input."""
    outputs = []
    for item in inputs:
        out = layer(item.hidden.to(device), *_to(item.args, device), **_to(item.kwargs, device))
        out = out[0] if isinstance(out, (tuple, list)) else out
        outputs.append(out.to(offload))
    return outputs


def original_statistics(model: nn.Module, names: set[str], needs: frozenset[str], batches: list[Tensor],
                        device: torch.device, each: Callable[[int, dict[str, LinearStats]], None],
                        offload: torch.device | None = None) -> None:
    """Input statistics of the linears ``names`` on the unmodified model, one decoder layer at a time:
    calls ``each(layer index, name → stats)`` and propagates the layer's original outputs (SVD-LLM's
    profiling).

    For global rules that need statistics of every layer before the walk (WeLore's rule on whitened
    spectra): a pass of its own, so the walk itself stays one pass; ``each`` keeps what it needs of a
    layer's statistics, which are dropped afterwards. Stops after the last layer holding one of ``names``.
    """
    offload = offload or torch.device("cpu")
    prefix, layers = arch.decoder_layers(model)
    per_layer = [{n: m for n, m in arch.layer_linears(layer, f"{prefix}.{i}").items() if n in names}
                 for i, layer in enumerate(layers)]
    last = max((i for i, chosen in enumerate(per_layer) if chosen), default=-1)
    if last < 0:
        return
    with calibration_mode(model):
        inputs = capture_inputs(model, layers, batches, device, offload)
        for index in range(last + 1):
            layers[index].to(device)
            with StatsCollector(per_layer[index], needs) as collector:
                outputs = run_layer(layers[index], inputs, device, offload)
            if per_layer[index]:
                each(index, collector.result())
            layers[index].to(offload)
            inputs = [LayerInput(h, item.args, item.kwargs) for h, item in zip(outputs, inputs)]


DEFAULT_STREAM = "default"


@dataclass
class _Stream:
    """One calibration set flowing through the layer walk (the recipe's, or a step's own)."""

    inputs: list[LayerInput]  # this layer's inputs
    outputs: list[Tensor] | None = None  # outputs of the layer as it currently is
    original: list[Tensor] | None = None  # outputs of the layer before any step changed it


def walk(model: nn.Module, steps: list[Step], batches: list[Tensor] | dict[str, list[Tensor]] | None, *,
         device: torch.device, propagate: str = "compressed", statistics: str = "per_step",
         offload: torch.device | None = None, on_layer: Callable[[int, int], None] | None = None,
         log_file=None) -> WalkReport:
    """Compress ``model`` in place, layer by layer. ``batches`` may be None if no step needs data.

    ``batches``: token ids (batch, seq) of the recipe's calibration set, or a mapping stream name → token ids
    when steps calibrate on sets of their own (``Step.data``; EoRA on task data after a quantizer calibrated
    on generic text). Every stream flows through the walk with the same ``propagate`` rule.

    ``statistics``: ``per_step`` collects each data-driven step's statistics on the layer as the earlier
    steps left it (one forward pass per such step); ``once`` collects every step's statistics in one pass
    per stream over the layer before any step changes it, so all steps see the original layer's inputs
    (EoRA's Gram after a quantizer, as in "statistics from the original model in one pass").
    """
    offload = offload or torch.device("cpu")
    report = WalkReport()
    prefix, layers = arch.decoder_layers(model)
    dtype = next(model.parameters()).dtype
    sets = batches if isinstance(batches, dict) else {DEFAULT_STREAM: batches}
    used = {step.data for step in steps if step.compressor.needs}
    _plan(model, layers, prefix, steps)
    for step in steps:
        start = time.perf_counter()
        step.compressor.prepare(model, sets.get(step.data), device)
        report.seconds["prepare"] += time.perf_counter() - start

    with calibration_mode(model):
        streams: dict[str, list[LayerInput]] = {}
        for name in sorted(used):
            start = time.perf_counter()
            streams[name] = capture_inputs(model, layers, sets[name], device, offload)
            report.seconds["capture"] += time.perf_counter() - start
        for index, layer in enumerate(layers):
            layer.to(device)
            streams = _compress_layer(layer, index, len(layers), f"{prefix}.{index}", steps, streams, device,
                                      offload, propagate, dtype, report, log_file, statistics)
            layer.to(offload)
            if on_layer:
                on_layer(index, len(layers))
    return report


def _plan(model: nn.Module, layers: nn.ModuleList, prefix: str, steps: list[Step]) -> None:
    """Give each step the (out, in) shapes of all its targets, for rules that are global."""
    model_params = sum(p.numel() for p in model.parameters())
    for step in steps:
        shapes = {}
        for index, layer in enumerate(layers):
            linears = arch.layer_linears(layer, f"{prefix}.{index}")
            for name in arch.select(list(linears), step.targets, step.ignore):
                shapes[name] = tuple(weight_of(linears[name]).shape) if hasattr(linears[name], "weight") \
                    else (linears[name].out_features, linears[name].in_features)
        step.compressor.plan(shapes, model_params)


def _compress_layer(layer: nn.Module, index: int, n_layers: int, prefix: str, steps: list[Step],
                    inputs: dict[str, list[LayerInput]], device: torch.device, offload: torch.device,
                    propagate: str, dtype: torch.dtype, report: WalkReport, log_file,
                    statistics: str = "per_step") -> dict[str, list[LayerInput]]:
    seconds = report.seconds
    ctx = LayerContext(index, n_layers, device, dtype)
    original: dict[str, Tensor] = {}
    streams = {name: _Stream(items) for name, items in inputs.items()}
    modified = False
    shared: dict[str, dict[str, LinearStats]] = {}  # statistics: once, per stream
    if statistics == "once":
        for name, stream in streams.items():
            stats, outputs = _statistics_once(layer, index, prefix, [s for s in steps if s.data == name],
                                              stream.inputs, device, offload, seconds)
            if stats is not None:
                shared[name], stream.outputs, stream.original = stats, outputs, outputs

    for step_index, step in enumerate(steps):
        linears = arch.layer_linears(layer, prefix)
        names = arch.select(list(linears), step.targets, step.ignore)
        if not names or not step.compressor.wants_layer(index):
            continue
        stats: dict[str, LinearStats] = {}
        if step.data in shared:  # statistics: once (data-free steps get them too, for the log's output error)
            stats = shared[step.data]
        elif step.compressor.needs:
            stream = streams[step.data]
            start = time.perf_counter()
            with StatsCollector({n: linears[n] for n in names}, step.compressor.needs) as collector:
                stream.outputs = run_layer(layer, stream.inputs, device, offload)
            seconds["statistics_forward"] += time.perf_counter() - start - collector.seconds
            seconds["statistics_accumulation"] += collector.seconds
            stats = collector.result()
            if not modified:
                stream.original = stream.outputs
        targets = {}
        for name in names:
            module = linears[name]
            weight = _effective_weight(module).to(device=device, dtype=torch.float32)
            original.setdefault(name, weight)
            targets[name] = Target(name, module, weight, original[name],
                                   None if module.bias is None else module.bias.detach(),
                                   stats.get(name), getattr(module, "dense_class", type(module).__name__))
        start = time.perf_counter()
        outcomes = step.compressor.compress_layer(targets, ctx)
        elapsed = time.perf_counter() - start
        seconds["decomposition"] += elapsed
        for name in names:
            outcome = outcomes.get(name, Outcome(None, note="skipped"))
            entry = _log_entry(step, step_index, targets[name], outcome, elapsed / len(names))
            report.log.append(entry)
            if log_file is not None:
                log_file.write(json.dumps(entry) + "\n")
                log_file.flush()
            if outcome.module is not None:
                if propagate == "original":  # the original outputs, before the layer first changes
                    for stream in streams.values():
                        if stream.original is None:
                            stream.original = run_layer(layer, stream.inputs, device, offload)
                outcome.module.to(device)
                layer.set_submodule(name[len(prefix) + 1:], outcome.module)  # the only place modules are swapped
                modified = True

    start = time.perf_counter()
    following = {}
    for name, stream in streams.items():
        if propagate == "original" and stream.original is not None:
            next_hidden = stream.original
        elif modified or stream.outputs is None:  # (propagate: original here means the layer is unchanged)
            next_hidden = run_layer(layer, stream.inputs, device, offload)
        else:
            next_hidden = stream.outputs
        following[name] = [LayerInput(h, item.args, item.kwargs) for h, item in zip(next_hidden, stream.inputs)]
    seconds["propagation"] += time.perf_counter() - start
    return following


def _statistics_once(layer: nn.Module, index: int, prefix: str, steps: list[Step], inputs: list[LayerInput],
                     device: torch.device, offload: torch.device, seconds: dict[str, float]):
    """(name → stats, outputs) of one pass over the unmodified layer for every step's needs and targets;
    (None, None) if no step needs data here."""
    linears = arch.layer_linears(layer, prefix)
    needs: set[str] = set()
    names: set[str] = set()
    for step in steps:
        chosen = arch.select(list(linears), step.targets, step.ignore)
        if chosen and step.compressor.needs and step.compressor.wants_layer(index):
            needs |= step.compressor.needs
            names.update(chosen)
    if not needs:
        return None, None
    start = time.perf_counter()
    with StatsCollector({n: m for n, m in linears.items() if n in names}, frozenset(needs)) as collector:
        outputs = run_layer(layer, inputs, device, offload)
    seconds["statistics_forward"] += time.perf_counter() - start - collector.seconds
    seconds["statistics_accumulation"] += collector.seconds
    return collector.result(), outputs


def _effective_weight(module: nn.Module) -> Tensor:
    if hasattr(module, "dense_weight"):
        return module.dense_weight().detach()
    return weight_of(module).detach()


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (packed integers included)."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def _log_entry(step: Step, step_index: int, target: Target, outcome: Outcome, seconds: float) -> dict[str, Any]:
    m, n = target.weight.shape
    entry: dict[str, Any] = {
        "name": target.name, "step": step_index, "method": step.compressor.name, "shape": [m, n],
        "params_before": _params(target.module),
    }
    if outcome.module is None:
        entry.update(kind="dense", params_after=entry["params_before"], rank=None, note=outcome.note or "kept dense")
    else:
        approx = _effective_weight(outcome.module).float()
        gram = target.stats.gram if target.stats is not None else None
        entry.update(
            kind=getattr(outcome.module, "kind", type(outcome.module).__name__), rank=outcome.rank,
            params_after=_params(outcome.module), bytes_after=_bytes(outcome.module),
            rel_error=relative_error(target.original, approx),
            rel_output_error=None if gram is None else relative_error(target.original, approx, gram.to(approx.device)),
        )
        if outcome.note:
            entry["note"] = outcome.note
    entry.update(outcome.extra)
    entry["seconds"] = round(seconds, 4)
    return entry
