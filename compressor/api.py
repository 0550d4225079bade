"""``compress()``: recipe → model → layer walk → save. The CLI's ``compress`` command is this function."""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from . import calibration as sources
from . import configs, io, models, pipeline, ranks, recipe as recipes, registry
from .errors import CompressorError
from .recipe import Recipe


def build_steps(recipe: Recipe) -> list[pipeline.Step]:
    steps = []
    for index, spec in enumerate(recipe.steps):
        compressor = registry.create(spec.method, spec.config, f"step {index} ({spec.method})")
        steps.append(pipeline.Step(compressor, spec.targets, spec.ignore, stream_name(recipe, index)))
    return steps


def stream_name(recipe: Recipe, index: int) -> str:
    """The calibration stream of step ``index``: the recipe's ("default") or one named by its own set."""
    cal = recipes.step_calibration(recipe.calibration, recipe.steps[index])
    if cal == recipe.calibration:
        return pipeline.DEFAULT_STREAM
    return f"{cal.dataset}:{cal.n_samples}x{cal.seq_len}:seed{cal.seed}:batch{cal.batch_size}"


def calibration_streams(recipe: Recipe) -> dict[str, recipes.CalibrationConfig]:
    """Stream name → calibration set, for every stream a step of ``recipe`` uses."""
    return {stream_name(recipe, i): recipes.step_calibration(recipe.calibration, spec)
            for i, spec in enumerate(recipe.steps)}


def applied_recipe(recipe: Recipe, steps: list[pipeline.Step]) -> dict[str, Any]:
    """The recipe with every default filled in, as written to compression.json."""
    data = recipe.to_dict()
    for raw, step in zip(data["steps"], steps):
        raw["config"] = configs.to_dict(step.compressor.config)
    return data


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CompressorError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CompressorError("--device cuda was asked for, but CUDA is not available here")
    return device


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct parameters and buffers (packed quantized weights are buffers)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _progress(enabled: bool):
    if not enabled:
        return nullcontext(None)
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("layer {task.completed}/{task.total}"),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), transient=False)


def compress(model: str, recipe: str | Recipe, out: str | Path, *, overrides: list[str] | None = None,
             device: str = "cpu", dtype: str = "float32", overwrite: bool = False, merge: bool = False,
             progress: bool = True) -> dict[str, Any]:
    """Compress ``model`` with ``recipe`` and write the result to ``out``; returns a summary."""
    seconds: dict[str, float] = {}
    if isinstance(recipe, Recipe):
        recipe_name = "<object>"
    else:
        recipe_name, recipe = recipe, recipes.load(recipe, overrides)
    steps = build_steps(recipe)  # every config is validated before any work is done
    out = Path(out)
    io.check_output(out, overwrite)
    compute = _device(device)
    torch_dtype = models.parse_dtype(dtype)
    streams = calibration_streams(recipe)
    wanted = sorted({step.data for step in steps if step.compressor.needs_calibration})
    found = {name: sources.get(streams[name].dataset) for name in wanted}  # unknown datasets fail early

    start = time.perf_counter()
    loaded, tokenizer = models.load(model, torch_dtype, "cpu")
    seconds["load"] = time.perf_counter() - start
    params_before = models.parameter_count(loaded)
    bytes_before = tensor_bytes(loaded)

    batches = None
    if wanted:
        start = time.perf_counter()
        batches = {}
        for name in wanted:
            cal = streams[name]
            windows = found[name].calibration(tokenizer, cal.n_samples, cal.seq_len, cal.seed)  # (n, seq_len)
            batches[name] = list(windows.split(cal.batch_size))
        seconds["calibration_data"] = time.perf_counter() - start

    start, cpu_start = time.perf_counter(), time.process_time()
    with _progress(progress) as bar:
        task = bar.add_task("compressing", total=None) if bar else None
        on_layer = (lambda i, n: bar.update(task, completed=i + 1, total=n)) if bar else None
        report = pipeline.walk(loaded, steps, batches, device=compute, propagate=recipe.propagate,
                               statistics=recipe.statistics, on_layer=on_layer)
    seconds["compression"] = time.perf_counter() - start
    # CPU seconds of all threads during the walk: unlike wall time, not inflated by a busy machine
    cpu_seconds = {"compression": time.process_time() - cpu_start}

    params_after = models.parameter_count(loaded)
    reduction = ranks.reduction(report.log)  # rank and parameter reduction of the targeted linears
    manifest = {
        "base_model": model, "recipe_source": recipe_name, "recipe": applied_recipe(recipe, steps),
        "dtype": dtype, "params_before": params_before, "params_after": params_after,
        "bytes_before": bytes_before, "reduction": reduction,
        "bytes_after": tensor_bytes(loaded),
    }
    start = time.perf_counter()
    io.save(loaded, tokenizer, out, manifest, report.log, merge=merge, overwrite=overwrite)
    seconds["save"] = time.perf_counter() - start
    return {"out": str(out), "params_before": params_before, "params_after": params_after,
            "seconds": seconds, "cpu_seconds": cpu_seconds, "walk_seconds": dict(report.seconds),
            "modules": len(report.log),
            "compressed": sum(1 for e in report.log if e["kind"] != "dense"), "reduction": reduction,
            "model": loaded}
