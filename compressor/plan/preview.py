"""``--dry-run``: what a compiled plan will do, from the model's config alone (no weights, no data read).

``preview(plan, skeleton, ...)`` gives, per step, the targets and groups, the layers touched, the ranks and
the parameters and bytes after (``Compressor.preview``; "decided on data" where a global rank rule or a
layer choice decides), the calibration tokens, and estimates of the peak memory and of the output's size:

- peak memory ≈ runtime (torch + transformers, ~0.5 GiB) + weights held (in memory: the whole model; with
  ``--stream``: the largest decoder layer twice, original and replacement, or the modules outside the stack
  while the inputs are captured) + calibration activations (each stream's windows × hidden size, three
  copies: a layer's inputs, outputs and original outputs) + the largest fp64 statistic (a Gram of the
  widest targeted input, with its factor);
- output bytes: every tensor in the storage dtype, targets as their steps leave them (quantized weights
  at their bits, with one scale per group and a zero point when asymmetric).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..model.architecture import decoder_layers
from ..model.loading import tensor_bytes
from ..model.modes import outside_layers
from ..model.targets import layer_index
from ..walk.layers import base_stream
from .compile import Plan
from .recipe import HealConfig

RUNTIME_BYTES = 512 * 2**20


def _target_bytes(state: dict[str, Any], element: int) -> int:
    """Stored bytes of one target after the steps (its own tensors, plus a compensation path)."""
    m, n = state["shape"]
    if state.get("bits"):
        groups = -(-n // state["group_size"])
        stored = m * n * state["bits"] // 8 + m * groups * element  # packed weights + scales
        if not state["symmetric"]:
            stored += m * groups * state["bits"] // 8  # packed zero points
    else:
        stored = state["params"] * element
    return stored + state.get("added", 0) * element


def preview(plan: Plan, model: nn.Module, dtype: torch.dtype, storage_dtype: torch.dtype | None,
            stream: bool) -> dict[str, Any]:
    """The dry run's report (``lines`` prints it)."""
    element = torch.tensor([], dtype=storage_dtype or dtype).element_size()
    compute = torch.tensor([], dtype=dtype).element_size()
    targets: dict[str, dict[str, Any]] = {}
    steps = []
    for step in plan.steps:
        found = step.compressor.preview(step.shapes, plan.model_params)
        layers = sorted({group.layer for group in step.groups})
        before = sum(m * n for m, n in step.shapes.values())
        entry: dict[str, Any] = {"method": step.method, "targets": len(step.shapes), "groups": len(step.groups),
                                 "layers": len(layers), "params_before": before}
        for name, shape in step.shapes.items():
            state = targets.setdefault(name, {"shape": shape, "params": shape[0] * shape[1]})
            if found is None:
                state["unknown"] = True
                continue
            change = found[name]
            state.update({k: v for k, v in change.items() if k in ("params", "bits", "group_size", "symmetric")})
            if "path_rank" in change:  # the rank of the target's one low-rank path, beside its weights
                state["added"] = max(state.get("added", 0), change["path_rank"] * sum(shape))
        if found is None:
            entry["after"] = "decided on calibration data or the weights"
        else:
            ranks = sorted({c.get("rank") for c in found.values() if c.get("rank") is not None})
            entry["ranks"] = ranks if len(ranks) <= 6 else [ranks[0], "…", ranks[-1]]
            # what this and the earlier steps leave: weights (or factors) plus any compensation paths
            entry["params_after"] = sum(targets[name]["params"] + targets[name].get("added", 0)
                                        for name in step.shapes)
            bits = {c["bits"] for c in found.values() if c.get("bits")}
            if bits:
                entry["bits"] = sorted(bits)
        steps.append(entry)
    known = not any(state.get("unknown") for state in targets.values())
    model_bytes = tensor_bytes(model)
    targeted_before = sum(state["shape"][0] * state["shape"][1] for state in targets.values())
    prefix, layers = decoder_layers(model)
    layer_bytes = max((tensor_bytes(layer) for layer in layers), default=0)
    outside_bytes = sum(tensor_bytes(m) for m in outside_layers(model, layers))
    hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "n_embd", 0)
    streams = plan.data_streams()
    tokens = {name: cal.n_samples * cal.seq_len for name, cal in streams.items()}
    walked = plan.walk_streams()  # a reference stream carries its calibration stream's tokens once more
    activations = sum(tokens[base_stream(name)] * hidden * compute * 3 for name in walked)
    widest = max((state["shape"][1] for state in targets.values()), default=0)
    matrices = 2 + any(s.paired for s in plan.steps)  # a cross-Gram beside each Gram
    statistics = matrices * widest * widest * 8 if walked else 0
    weights_held = max(2 * layer_bytes, outside_bytes) if stream else model_bytes + layer_bytes
    peak = RUNTIME_BYTES + weights_held + activations + statistics + _reference_inputs(plan, model, tokens, compute)
    out_bytes = None
    if known:
        dense_elements = plan.model_params - targeted_before  # parameters (not computed buffers) are stored
        out_bytes = dense_elements * element + sum(_target_bytes(s, element) for s in targets.values())
    return {"steps": steps, "calibration_tokens": tokens, "model_bytes": model_bytes,
            "params_before": plan.model_params, "largest_layer_bytes": layer_bytes, "stream": stream,
            "estimated_peak_memory_bytes": peak, "estimated_output_bytes": out_bytes,
            "layers": len(layers), "layers_path": prefix}


def _reference_inputs(plan: Plan, model: nn.Module, tokens: dict[str, int], compute: int) -> int:
    """Bytes of the original model's inputs a paired step (an output-matching refit) keeps for a layer's stages:
    every calibration token's input of each of its modules (counted for each module: an upper bound, since
    q/k/v and gate/up read one), in the layer where they are widest, and for ``drift_cross`` the two residual
    streams its block writers add to (counted at the widest output)."""
    held = 0
    for step in plan.steps:
        if step.paired and step.shapes:
            widths: dict[int, int] = {}
            for name, (_, inputs) in step.shapes.items():
                layer = layer_index(model, name)
                widths[layer] = widths.get(layer, 0) + inputs
            held += tokens.get(step.stream, 0) * max(widths.values()) * compute
            if any(r.statistic == "drift_cross" for r in step.requests):  # the two residual streams (norm inputs)
                held += tokens.get(step.stream, 0) * 2 * max(out for out, _ in step.shapes.values()) * compute
    return held


def _size(n: int | None) -> str:
    if n is None:
        return "decided on data"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def lines(report: dict[str, Any]) -> list[str]:
    """The dry run as lines for the terminal."""
    out = [f"dry run: {report['layers']} decoder layers ({report['layers_path']}), "
           f"{report['params_before']:,} parameters, {_size(report['model_bytes'])} in memory"]
    for index, step in enumerate(report["steps"]):
        line = (f"step {index} {step['method']}: {step['targets']} linears in {step['groups']} groups over "
                f"{step['layers']} layers, {step['params_before']:,} parameters")
        if "params_after" in step:
            line += f" → {step['params_after']:,}"
            if step.get("ranks"):
                line += f", ranks {', '.join(map(str, step['ranks']))}"
            if step.get("bits"):
                line += f", {'/'.join(map(str, step['bits']))} bits"
        else:
            line += f" → {step['after']}"
        out.append(line)
    tokens = report["calibration_tokens"]
    out.append("calibration: " + (", ".join(f"{count:,} tokens ({name})" for name, count in tokens.items())
                                  if tokens else "none (data-free)"))
    out.append(f"estimated peak memory {_size(report['estimated_peak_memory_bytes'])} "
               f"({'streamed: about one layer' if report['stream'] else 'the whole model in memory'}); "
               f"output on disk {_size(report['estimated_output_bytes'])}")
    if report.get("heal") is not None:
        out.append(f"then heal: {HealConfig(**report['heal']).describe()}")
    out += [f"warning: {line}" for line in report.get("warnings", [])]
    out.append("nothing was read or written (--dry-run)")
    return out
