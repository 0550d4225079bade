"""``compress()``: recipe → compiled plan (on the model's skeleton) → load → decisions and layer walk → save.

The CLI's ``compress`` command is this function. Everything that can be checked without weights is
checked before they are read: the recipe, every step's config against the targeted shapes, the windows
against the model's positions, the device, the calibration sources, and the output directory, whose
temporary sibling is reserved then and held for the whole run. Where the output goes (in memory, or streamed
with resume records) is the sink's business (``io.sink``): this module hands it down and never asks which.
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from . import calibration as sources
from . import io
from .errors import CompressorError, CompressorWarning, Terminated
from .io import summary
from .model import experts, streaming
from .model import loading as models
from .model.architecture import layer_count
from .model.loading import tensor_bytes
from .parallel import distributed
from .pipeline.compress import Report, compress_model
from .plan import recipe as recipes
from .plan.compile import Plan, compile_plan
from .plan.preview import preview
from .plan.recipe import Recipe
from .ranks.uniform import reduction
from .walk.spill import Spill, parse_size


def _progress(enabled: bool):
    if not enabled:
        return nullcontext(None)
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("layer {task.completed}/{task.total}"),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), transient=False)


def calibration_batches(plan: Plan, tokenizer, found: dict[str, Any]) -> dict[str, list[torch.Tensor]]:
    """Stream name → token ids (batch, seq_len) for every stream a step uses (in a run of several ranks, this
    rank's contiguous share of the windows: ``distributed.share``)."""
    batches = {}
    for name, cal in plan.data_streams().items():
        windows = found[name].calibration(tokenizer, cal.n_samples, cal.seq_len, cal.seed)  # (n, seq_len)
        batches[name] = list(distributed.share(windows).split(cal.batch_size))
    return batches


def calibration_summary(plan: Plan, n_layers: int) -> str:
    """What the calibration will process, said before any of it runs: windows, tokens, layers."""
    parts = [f"{cal.n_samples:,} windows × {cal.seq_len:,} tokens = {cal.n_samples * cal.seq_len:,} tokens of "
             f"{cal.dataset}" for cal in plan.data_streams().values()]
    if not parts:
        return f"no calibration data (data-free steps); {n_layers} decoder layers"
    return f"calibration: {'; '.join(parts)}, through {n_layers} decoder layers"


def _layer_line(start: float, say: Callable[[str], None]) -> Callable[[int, int], None]:
    def on_layer(index: int, total: int) -> None:
        elapsed = time.perf_counter() - start
        eta = elapsed / (index + 1) * (total - index - 1)
        say(f"layer {index + 1}/{total} done, {elapsed:.1f}s elapsed, eta {eta:.1f}s")
    return on_layer


def run_plan(model: torch.nn.Module, plan: Plan, batches: dict[str, list[torch.Tensor]], device: torch.device,
             progress: bool = False, say: Callable[[str], None] | None = None,
             sink: io.Sink | None = None, report: Report | None = None,
             resume: tuple | None = None, spill: Spill | None = None) -> tuple[Report, dict[str, float]]:
    """Decisions and the layer walk on ``model`` in place; (report, CPU seconds of all threads). ``progress``:
    a progress bar with an ETA (a terminal); else ``say`` gets one line per layer with an ETA. ``sink``:
    sees each finished layer (``io.sink``)."""
    cpu_start = time.process_time()
    with _progress(progress) as bar:
        task = bar.add_task("compressing", total=None) if bar else None
        on_layer = (lambda i, n: bar.update(task, completed=i + 1, total=n)) if bar else None
        if on_layer is None and say is not None:
            on_layer = _layer_line(time.perf_counter(), say)
        report = compress_model(model, plan, batches, device=device, sink=sink, report=report, resume=resume,
                                spill=spill, on_layer=on_layer)
    # CPU seconds: unlike wall time, not inflated by a busy machine
    return report, {"compression": time.process_time() - cpu_start}


def manifest_of(model_spec: str, recipe_name: str, plan: Plan, dtype: str, before: dict[str, int],
                model: torch.nn.Module, report: Report) -> dict[str, Any]:
    source, gguf_file = models.resolve(model_spec)
    local = Path(source) / gguf_file if gguf_file else Path(source)
    return {"base_model": model_spec, "base_model_path": str(local.resolve()) if local.exists() else None,
            "recipe_source": recipe_name, "recipe": plan.applied_recipe(),
            "plan": plan.decisions(), "dtype": dtype,
            "params_before": before["params"], "params_after": models.parameter_count(model),
            "bytes_before": before["bytes"], "reduction": reduction(report.log), "bytes_after": tensor_bytes(model),
            "steps": summary.steps(report.log)}


def compress(model: str, recipe: str | Recipe, out: str | Path, *, overrides: list[str] | None = None,
             device: str = "cpu", dtype: str = "float32", storage_dtype: str | None = None, overwrite: bool = False,
             merge: bool = False, progress: bool = True, trust_remote_code: bool = False,
             say: Callable[[str], None] | None = None, warn: Callable[[str], None] | None = None,
             stream: bool = False, dry_run: bool = False, resume: bool = False,
             max_memory: str | None = None) -> dict[str, Any]:
    """Compress ``model`` with ``recipe`` and write the result to ``out``; returns a summary. A recipe's
    ``heal:`` section is not run here but by ``compressor.compress`` (``run.compress``), around this.
    ``dtype``: the model's dtype while compressing; ``storage_dtype``: of the floating tensors written
    (None: ``dtype``). ``trust_remote_code``: run code shipped in the model directory (off unless asked
    for). ``say``: receives progress lines (what the calibration will process, each layer with an ETA).
    ``stream``: weights stay on disk and are read one decoder layer at a time, and each finished layer is
    written at once (``io.sink.StreamedSink``): peak memory of about one layer plus the calibration
    activations. The summary's ``model`` is then the skeleton, without weights: load the output to use it.
    ``dry_run``: everything checked, then ``{"dry_run": plan.preview.preview(...)}`` returned; no weight or
    calibration text is read and nothing is written (the plan's warnings are in its ``warnings``).
    ``resume``: continue the interrupted streamed run of ``out`` (implies ``stream``; ``io.resume``): every
    streamed run records each finished layer in ``.NAME.partial`` beside ``out``, kept after an error or a
    signal; the resumed output is the uninterrupted run's.
    ``max_memory`` ("8GB"): the calibration activations the layer walk holds past this budget go to disk
    (``walk.spill``; the values are unchanged).
    ``warn``: receives the plan's warnings (``Plan.warnings``: e.g. a group size no serving stack can
    describe) once every check has passed, before any weight is read; default ``warnings.warn``
    (``CompressorWarning``)."""
    job = prepare(model, recipe, overrides, device, dtype, storage_dtype, merge, trust_remote_code)
    sink = io.open_sink(out, overwrite, job.inputs, stream=stream, resume=resume, storage_dtype=job.stored,
                        merge=merge)
    if dry_run:
        sink.check()
        report = preview(job.plan, job.skeleton, job.torch_dtype, job.stored, sink.streamed)
        report["warnings"] = list(job.plan.warnings())
        return {"dry_run": report, "plan": job.plan}
    budget = parse_size(max_memory) if max_memory is not None else None
    main = distributed.world().main
    with sink:  # --out reserved now, replaced at the end; ranks other than 0 write nothing
        for line in job.plan.warnings() if main else ():  # said once, by rank 0
            if warn is None:
                warnings.warn(line, CompressorWarning, stacklevel=2)
            else:
                warn(line)
        say = say if main else None
        if say is not None:
            say(calibration_summary(job.plan, layer_count(job.skeleton)))
        seconds: dict[str, float] = {}
        with relayed_warnings(warn if main else (lambda line: None)):  # the calibration text's, once
            loaded = load(job, sink, seconds)
        report, manifest, cpu_seconds = walk_and_save(job, sink, loaded, seconds, progress, say, budget)
    return {"out": str(out), "params_before": loaded.before["params"], "params_after": manifest["params_after"],
            "seconds": seconds, "cpu_seconds": cpu_seconds, "walk_seconds": dict(report.seconds),
            "modules": len(report.log), "compressed": sum(1 for e in report.log if e["kind"] != "dense"),
            "reduction": manifest["reduction"], "bytes_before": manifest["bytes_before"],
            "bytes_after": manifest["bytes_after"], "steps": manifest["steps"], "log": report.log,
            "model": loaded.model, "plan": job.plan, "warnings": job.plan.warnings()}


@contextmanager
def relayed_warnings(warn: Callable[[str], None] | None):
    """``CompressorWarning``s issued inside (e.g. calibration windows that overlap) given to ``warn`` once
    each, as the plan's warnings are (None: ``warnings.warn``, as outside); other warnings pass through."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CompressorWarning)
        yield
    said: set[str] = set()
    for item in caught:
        if not issubclass(item.category, CompressorWarning):
            warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)
            continue
        line = str(item.message)
        if line in said:
            continue
        said.add(line)
        if warn is None:
            warnings.warn(line, CompressorWarning, stacklevel=3)
        else:
            warn(line)


@dataclass
class Job:
    """A compression as checked before any weight is read: the compiled plan and what the run needs."""

    model: str  # as the user named it
    recipe_name: str
    plan: Plan
    skeleton: torch.nn.Module  # the model's config, no weights
    torch_dtype: torch.dtype
    dtype: str
    storage_dtype: str | None
    stored: torch.dtype | None
    compute: torch.device  # this rank's
    found: dict[str, Any]  # stream → calibration source
    inputs: list  # what --out must not be
    merge: bool
    trust_remote_code: bool


def prepare(model: str, recipe: str | Recipe, overrides: list[str] | None, device: str, dtype: str,
            storage_dtype: str | None, merge: bool, trust_remote_code: bool) -> Job:
    """Everything checked that can be without weights (recipe, configs against shapes, windows, device,
    calibration sources); a torchrun rank joins its process group here."""
    recipe_name, recipe = ("<object>", recipe) if isinstance(recipe, Recipe) else (recipe, recipes.load(recipe, overrides))
    torch_dtype = models.parse_dtype(dtype, "--dtype")
    stored = models.parse_dtype(storage_dtype, "--storage-dtype") if storage_dtype is not None else None
    skeleton = models.skeleton(model, torch_dtype, trust_remote_code=trust_remote_code)
    experts.unfuse(skeleton)  # each expert's projections are targets of their own (refused before: any other)
    plan = compile_plan(recipe, skeleton)  # every value checked, no weight read
    unmergeable = [step.method for step in plan.steps if merge and not step.compressor.mergeable]
    if unmergeable:
        raise CompressorError(f"--merge: {unmergeable[0]} changes the layers' own dimensions, which the model's "
                              "config cannot describe; save without --merge and load with compressor.load")
    for cal in plan.data_streams().values():
        models.check_seq_len(skeleton.config, cal.seq_len, "--seq-len (calibration.seq_len)")
    compute = distributed.start(models.compute_device(device))
    found = {name: sources.get(cal.dataset) for name, cal in plan.data_streams().items()}  # unknown sets fail early
    inputs = [models.resolve(model)[0], *(cal.dataset for cal in plan.data_streams().values())]
    if recipe_name != "<object>":
        inputs.append(recipe_name)
    return Job(model, recipe_name, plan, skeleton, torch_dtype, dtype, storage_dtype, stored, compute, found,
               inputs, merge, trust_remote_code)


@dataclass
class Loaded:
    """The model as the run holds it (a streamed one: its skeleton), and what was read with it."""

    model: torch.nn.Module
    tokenizer: Any
    before: dict[str, int]  # parameters and bytes before compression
    batches: dict[str, list[torch.Tensor]]  # stream → this rank's calibration token ids


def load(job: Job, sink: io.Sink, seconds: dict[str, float]) -> Loaded:
    """The model as ``sink`` has the run hold it (whole, or streamed) and the calibration batches; their
    seconds into ``seconds``."""
    start = time.perf_counter()
    model, tokenizer = sink.open_model(job.model, job.torch_dtype, job.trust_remote_code)
    experts.unfuse(model)  # as the plan's skeleton was
    seconds["load"] = time.perf_counter() - start
    before = {"params": models.parameter_count(model), "bytes": tensor_bytes(model)}
    start = time.perf_counter()
    batches = calibration_batches(job.plan, tokenizer, job.found)
    streaming.return_freed_memory()  # tokenizing the corpus leaves ~10× its text in freed heap: give it back
    seconds["calibration_data"] = time.perf_counter() - start
    return Loaded(model, tokenizer, before, batches)


def walk_and_save(job: Job, sink: io.Sink, loaded: Loaded, seconds: dict[str, float], progress: bool,
                  say: Callable[[str], None] | None, budget: int | None) -> tuple[Report, dict[str, Any], dict]:
    """The decisions, the layer walk and the save into ``sink``; (report, manifest, CPU seconds). A run the
    sink records for ``--resume`` continues where it was, and interrupted, says where it is kept."""
    start, report = time.perf_counter(), Report()
    options = {"dtype": job.dtype, "storage_dtype": job.storage_dtype, "merge": job.merge}  # what the output depends on
    first = sink.begin(loaded.model, job.plan, loaded.batches, report, job.torch_dtype, options, say)
    spill = Spill(budget, sink.tmp) if budget is not None else None
    try:
        try:
            report, cpu_seconds = run_plan(loaded.model, job.plan, loaded.batches, job.compute, progress, say,
                                           sink=sink, report=report, resume=first, spill=spill)
        finally:
            if spill is not None:
                spill.close()
        seconds["compression"] = time.perf_counter() - start
        manifest = manifest_of(job.model, job.recipe_name, job.plan, job.dtype, loaded.before, loaded.model, report)
        start = time.perf_counter()
        sink.save(loaded.model, loaded.tokenizer, manifest, report)
    except (KeyboardInterrupt, Terminated) as exc:  # the walk or the save
        sink.interrupted(exc)
        raise
    seconds["save"] = time.perf_counter() - start
    return report, manifest, cpu_seconds
