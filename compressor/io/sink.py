"""Where a run's output goes: one object owns the temporary directory, the streamed shards, the resume record
and the final rename. ``open_sink`` is the one place where ``--stream`` and ``--resume`` choose which:

- ``Sink``: the model is loaded whole and written at the end (``checkpoint.save``) into a temporary sibling
  of ``--out`` that replaces it when the run ends (``output.OutputDirectory``);
- ``StreamedSink``: the weights stay on disk and are read one decoder layer at a time (``model.streaming``);
  each finished layer goes to its own shard at once (``shards``) and is recorded (``resume``) in
  ``.NAME.partial`` beside ``--out``, which is kept after an interruption (``output.PartialOutputDirectory``)
  and continued only when asked to (``--resume``).

A rank other than 0 of a ``torchrun`` run writes no output: it holds a scratch folder for spilled
activations and, streamed, records its own share of the hidden states for a resume.

The run uses a sink in this order: ``with sink:`` (``--out`` reserved), ``open_model``, ``begin`` (where the
walk starts: a recorded run's next layer, else None), the walk calling ``layer_done`` after each finished
layer, ``save``; on an interruption, ``interrupted(exc)`` says how to continue.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import note_left
from ..model import loading as models
from ..model import streaming
from ..model.architecture import layer_count
from ..parallel import distributed
from . import checkpoint
from .faults import pause_for_tests
from .output import OutputDirectory, PartialOutputDirectory, check_output, partial_path
from .resume import Resume, fingerprint
from .shards import ShardWriter


def open_sink(out: str | Path, overwrite: bool, inputs: list, *, stream: bool, resume: bool,
              storage_dtype: torch.dtype | None, merge: bool) -> "Sink":
    """The sink of a run writing ``out``: streamed with ``stream`` or ``resume`` (which continues a recorded
    streamed run), else in memory. Nothing is created before ``with``."""
    main = distributed.world().main
    if stream or resume:
        return StreamedSink(out, overwrite, inputs, storage_dtype, merge, main, continue_recorded=resume)
    return Sink(out, overwrite, inputs, storage_dtype, merge, main)


class Scratch:
    """What a rank other than 0 holds instead of the output directory: a scratch folder (``tmp``) for spilled
    activations, removed when the run ends, whatever the ending."""

    def __enter__(self) -> "Scratch":
        self.tmp = Path(tempfile.mkdtemp(prefix="compressor-rank-"))
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


class Sink:
    """An in-memory run's output: the whole model written at the end into a temporary sibling of ``out``."""

    streamed = False

    def __init__(self, out: str | Path, overwrite: bool, inputs: list, storage_dtype: torch.dtype | None,
                 merge: bool, main: bool = True) -> None:
        self.out = Path(os.path.abspath(Path(out).expanduser()))
        self.overwrite, self.inputs, self.storage_dtype, self.merge, self.main = \
            overwrite, list(inputs), storage_dtype, merge, main
        self.output: Any = None  # OutputDirectory (rank 0) or Scratch, while the block runs
        self.report: Any = None  # the run's report (log, reshaped modules), from ``begin``
        self.shards: ShardWriter | None = None

    def check(self) -> None:
        """What entering checks of ``--out``, creating nothing (``--dry-run``)."""
        check_output(self.out, self.overwrite, self.inputs)

    def directory(self) -> OutputDirectory:
        return OutputDirectory(self.out, self.overwrite, self.inputs)

    def __enter__(self) -> "Sink":
        self.output = (self.directory() if self.main else Scratch()).__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.output.__exit__(*exc)

    @property
    def tmp(self) -> Path:
        """The run's own folder: the output being written (rank 0), a scratch folder (other ranks)."""
        return self.output.tmp

    def open_model(self, spec: str, dtype: torch.dtype, trust_remote_code: bool) -> tuple[nn.Module, Any]:
        """(model, tokenizer) as the run holds them: the whole model, on the CPU."""
        return models.load(spec, dtype, "cpu", trust_remote_code=trust_remote_code)

    def begin(self, model: nn.Module, plan: Any, batches: dict[str, list[torch.Tensor]], report: Any,
              dtype: torch.dtype, options: dict[str, Any],
              say: Callable[[str], None] | None) -> tuple[int, dict[str, list[torch.Tensor]]] | None:
        """Where the walk starts (None: at the first layer); ``report`` is the run's, filled by the walk."""
        self.report = report
        return None

    def layer_done(self, index: int, prefix: str, layer: nn.Module, next_inputs: dict[str, list[Any]]) -> None:
        """The walk's call after decoder layer ``index`` is finished (and the next layer's inputs computed)."""
        if index == 0:
            pause_for_tests("walk")  # the signal tests' hook (inert unless asked for)

    def save(self, model: nn.Module, tokenizer: Any, manifest: dict[str, Any], report: Any) -> None:
        """Write the output (rank 0) into the temporary directory, which replaces ``out`` when the block ends."""
        if self.main:
            self.output.expected_bytes = manifest.get("bytes_after")  # said if the disk fills
            checkpoint.save(model, tokenizer, self.output, manifest, report.log, merge=self.merge,
                            reshaped=report.reshaped, storage_dtype=self.storage_dtype, shards=self.shards)

    def interrupted(self, exc: BaseException) -> None:
        """An interruption (SIGINT, SIGTERM) of the walk or the save: an in-memory run keeps nothing."""


class StreamedSink(Sink):
    """A streamed run's output: each finished layer written to its shard and recorded for ``--resume`` in
    ``.NAME.partial`` (``continue_recorded``: continue the run recorded there, else refuse to touch it)."""

    streamed = True

    def __init__(self, out: str | Path, overwrite: bool, inputs: list, storage_dtype: torch.dtype | None,
                 merge: bool, main: bool = True, continue_recorded: bool = False) -> None:
        super().__init__(out, overwrite, inputs, storage_dtype, merge, main)
        self.continue_recorded = continue_recorded
        self.folder: Path | None = None  # the streamed model's safetensors directory
        self.record: Resume | None = None

    def directory(self) -> OutputDirectory:
        return PartialOutputDirectory(self.out, self.overwrite, self.inputs, self.continue_recorded)

    def open_model(self, spec: str, dtype: torch.dtype, trust_remote_code: bool) -> tuple[nn.Module, Any]:
        """(skeleton, tokenizer): parameters on the meta device, each layer's tensors read when walked."""
        model, tokenizer, self.folder = streaming.open_streamed(spec, dtype, trust_remote_code)
        if self.main:
            self.shards = ShardWriter(self.tmp, layer_count(model), self.storage_dtype, self.merge, model)
        return model, tokenizer

    def begin(self, model: nn.Module, plan: Any, batches: dict[str, list[torch.Tensor]], report: Any,
              dtype: torch.dtype, options: dict[str, Any],
              say: Callable[[str], None] | None) -> tuple[int, dict[str, list[torch.Tensor]]] | None:
        """The resume record (``resume``) in rank 0's work folder, and where the walk continues (None: at the
        start). Restores an interrupted run's finished layers (rank 0: modules, shard index, log into
        ``report``) and each rank's own hidden states, each file verified first (``resume``); every rank reads
        the state rank 0 read."""
        self.report = report
        world = distributed.world()
        work = self.tmp if world.main else partial_path(self.out)
        distributed.barrier()  # rank 0 has made (or kept) its work folder
        windows = {name: distributed.gather_windows(b) for name, b in sorted(batches.items())}  # every rank's
        self.record = Resume(work, fingerprint(self.folder, plan.applied_recipe(), options, windows), world.rank,
                             world.size)
        # a recorded run is there only when continuing one (the directory refuses it otherwise); rank 0 reads it
        state = distributed.broadcast(self.record.read() if world.main and self.record.exists() else None)
        if state is None:
            return None
        streams = plan.walk_batches(batches)  # what the hidden states must match
        if not world.main:
            return self.record.restore_hidden(state, streams)
        start, log, reshaped = self.record.restore(model, self.shards, state, dtype, streams)
        report.log.extend(log)
        report.reshaped.update(reshaped)
        if say is not None:
            say(f"resuming: {start[0]} of {layer_count(model)} decoder layers were done")
        return start

    def layer_done(self, index: int, prefix: str, layer: nn.Module, next_inputs: dict[str, list[Any]]) -> None:
        """Write the finished layer's shard (rank 0) and record it (every rank: its hidden states)."""
        super().layer_done(index, prefix, layer, next_inputs)
        if self.main:
            self.shards(index, prefix, layer)
        self.record.save(index, prefix, layer, next_inputs, self.shards, self.report.log, self.report.reshaped,
                         sync=distributed.barrier, gather=distributed.exchange)
        pause_for_tests("recorded")  # the resume tests' hook: a layer is durably done

    def save(self, model: nn.Module, tokenizer: Any, manifest: dict[str, Any], report: Any) -> None:
        """The last shard, index, config and the rest (rank 0); the record goes: the output is complete."""
        super().save(model, tokenizer, manifest, report)
        if self.main:
            self.record.finish()

    def interrupted(self, exc: BaseException) -> None:
        """A recorded run is kept: the exception carries how to continue it (the CLI prints it)."""
        if self.record is not None and self.record.exists():
            done = json.loads((self.record.path / "state.json").read_text())["layers_done"]
            note_left(exc, f"{done} decoder layers are done and kept in {self.record.folder}; run the same "
                      "command with --resume to continue, or remove that directory to start over")
