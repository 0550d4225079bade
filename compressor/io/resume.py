"""Resuming an interrupted streamed run (``compress --stream``; ``--resume`` continues it).

A streamed run works in ``.NAME.partial`` beside ``--out`` (not a temporary directory: it survives an
error, a signal or a crash) and, after each decoder layer, makes a durable record in its ``.resume/``
folder, each file written to a temporary name, flushed and renamed (``durable.write``), the state last:

- ``hidden-<next layer>.safetensors``: every calibration stream's inputs of the next layer
  (``<stream>.<batch>``); the other arguments (masks, position embeddings) are captured again on resume;
- ``lora-<layer>.safetensors``: the layer's compensation paths (for the adapter written at the end);
- ``state.json``: the fingerprint, the layers done, the log so far, the specs of the compressed and
  reshaped modules of the finished layers, the output shards' index so far, the sha256 of every file above
  and of every finished shard (each taken as the file was written), and a seal (the sha256 of the rest).

In a run of several ranks (``distributed``) each rank writes its own share of the hidden states
(``hidden-<next layer>-rank<r>.safetensors``) into rank 0's folder (one machine, or ``--out`` on a
filesystem every rank sees), the ranks exchange their files' digests, then rank 0 writes the state (with the
number of ranks: a resume needs the same number), and only then does each rank remove its older file.

The layer's own tensors are already in their output shard (``io.shards``). ``--resume`` checks the
state's seal and fingerprint (the model's config and weight files, the recipe as applied, the dtypes,
``--merge``, the calibration token ids and the package version), then every file it will reuse against its
recorded digest, and the hidden states against the calibration batches (one per batch, of their shape,
finite): anything changed, damaged or missing is refused with one line naming the file, never continued
from. It runs the model-level decisions again (deterministic), rebuilds the finished layers' modules on the
meta device from their specs, and continues the walk at the next layer: the output is the uninterrupted
run's, bit for bit. At the end ``.resume/`` is removed and the directory renamed to ``--out``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import StateRefused, one_line
from ..model.modules import from_spec
from ..version import __version__
from . import durable
from .checkpoint import module_specs

STATE_DIR = ".resume"
STATE = "state.json"
VERSION = 2  # 2: digests of the files and a seal of the state


def fingerprint(folder: Path, recipe: dict[str, Any], options: dict[str, Any],
                batches: dict[str, list[torch.Tensor]]) -> str:
    """A hex key of everything the output depends on: model files, recipe, options, calibration ids."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"recipe": recipe, "options": options, "version": __version__},
                             sort_keys=True, default=str).encode())
    digest.update((folder / "config.json").read_bytes())
    for file in sorted(folder.glob("*.safetensors")):
        stat = file.stat()
        digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    for name in sorted(batches):
        for ids in batches[name]:
            digest.update(name.encode())
            digest.update(ids.to("cpu", torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def seal(state: dict[str, Any]) -> str:
    """The sha256 of ``state`` (without its own seal) as JSON gives it back: what ``state.json`` is checked by."""
    canonical = json.loads(json.dumps({key: value for key, value in state.items() if key != "seal"}))
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


class Resume:
    """The ``.resume/`` record of one streamed run in ``folder`` (its partial output directory)."""

    def __init__(self, folder: Path, key: str, rank: int = 0, ranks: int = 1) -> None:
        self.folder, self.key, self.rank, self.ranks = Path(folder), key, rank, ranks
        self.path = self.folder / STATE_DIR
        self.specs: dict[str, dict[str, Any]] = {}  # finished layers' compressed and reshaped modules
        self.reshaped: list[str] = []  # the finished layers' replacements of a new shape (Report.reshaped)
        self.loras: dict[str, dict[str, Any]] = {}  # name → rank, dense class, file
        self.digests: dict[str, str] = {}  # compensation paths' file (in .resume/) → sha256 as written

    @property
    def remedy(self) -> str:
        """What to do with a record that cannot be continued."""
        return f"remove {self.folder} to start over"

    def exists(self) -> bool:
        return (self.path / STATE).is_file()

    def read(self) -> dict[str, Any]:
        """The recorded state, checked against its seal and this run's fingerprint."""
        file = self.path / STATE
        try:
            state = json.loads(file.read_text())
            done = int(state["layers_done"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StateRefused(f"{file}: the interrupted run's record is unreadable "
                                  f"({one_line(exc)}); {self.remedy}") from None
        if state.get("version") != VERSION:
            raise StateRefused(f"{file}: the interrupted run was recorded in another format (version "
                                  f"{str(state.get('version'))[:20]}, this compressor writes {VERSION}) and cannot "
                                  f"be verified; {self.remedy}")
        if state.get("seal") != seal(state):
            raise StateRefused(f"{file} changed since the interrupted run wrote it (its seal does not match: "
                                  f"edited or damaged); {self.remedy}")
        if state.get("ranks", 1) != self.ranks:
            raise StateRefused(f"{self.folder} holds an interrupted run of {state.get('ranks', 1)} rank(s); resume "
                                  f"it with as many (torchrun --nproc-per-node ...), not {self.ranks}, or "
                                  f"{self.remedy}")
        if state.get("fingerprint") != self.key:
            raise StateRefused(f"{self.folder} holds an interrupted run of another model, recipe, calibration "
                                  "or options (its fingerprint differs); run the original command with --resume, "
                                  f"or {self.remedy}")
        if done < 1:
            raise StateRefused(f"{file}: no layer recorded; {self.remedy}")
        return state

    def hidden_file(self, layer: int | None) -> str:
        """The file of this rank's inputs of decoder layer ``layer`` (None: the glob pattern of every layer's)."""
        number = "?????" if layer is None else f"{layer:05d}"
        return f"hidden-{number}" + (f"-rank{self.rank}" if self.ranks > 1 else "") + ".safetensors"

    def save(self, index: int, prefix: str, layer: nn.Module, next_inputs: dict[str, list[Any]], shards: Any,
             log: list[dict[str, Any]], reshaped: dict[str, nn.Module], sync=lambda: None,
             gather=lambda owned: owned) -> None:
        """Record decoder layer ``index`` as done (after its shard is written). ``gather``: every rank's
        {hidden-states file: sha256} (a run of several: all hidden states are written before the state names
        them); ``sync`` waits for every rank (the state is written before any older file goes)."""
        self.path.mkdir(exist_ok=True)
        hidden = {f"{stream}.{i}": item.hidden.contiguous() for stream, items in next_inputs.items()
                  for i, item in enumerate(items)}
        hidden_file = self.hidden_file(index + 1)  # the inputs of the next layer
        written = durable.write(self.path / hidden_file, lambda tmp: save_file(hidden, str(tmp)))
        hidden_digests = gather({hidden_file: written})
        if self.rank == 0:
            self._save_state(index, prefix, layer, shards, log, reshaped, hidden_file, hidden_digests)
        sync()
        for old in self.path.glob(self.hidden_file(None)):
            if old.name != hidden_file:
                old.unlink()

    def _save_state(self, index: int, prefix: str, layer: nn.Module, shards: Any, log: list[dict[str, Any]],
                    reshaped: dict[str, nn.Module], hidden_file: str, hidden_digests: dict[str, str]) -> None:
        inside = {name[len(prefix) + 1:]: module for name, module in reshaped.items() if name.startswith(prefix + ".")}
        self.specs.update({f"{prefix}.{name}": spec for name, spec in module_specs(layer, inside).items()})
        self.reshaped += [f"{prefix}.{name}" for name in inside]
        loras = {name: lora for name, lora in shards.loras.items() if name.startswith(prefix + ".")}
        if loras:
            file = f"lora-{index:05d}.safetensors"
            tensors = {f"{name}.{part}": getattr(lora, part).weight.detach().contiguous()
                       for name, lora in loras.items() for part in ("down", "up")}
            self.digests[file] = durable.write(self.path / file, lambda tmp: save_file(tensors, str(tmp)))
            self.loras.update({name: {"spec": lora.spec(), "file": file} for name, lora in loras.items()})
        state = {"version": VERSION, "fingerprint": self.key, "layers_done": index + 1, "log": log,
                 "hidden": hidden_file, "ranks": self.ranks,
                 "specs": self.specs, "reshaped": self.reshaped, "loras": self.loras,
                 "digests": {**self.digests, **hidden_digests},
                 "shards": {"weight_map": shards.weight_map, "total_size": shards.total_size,
                            "written": sorted(shards.written), "digests": shards.digests}}
        state["seal"] = seal(state)
        durable.write(self.path / STATE, lambda tmp: tmp.write_text(json.dumps(state)))

    def verify(self, state: dict[str, Any]) -> None:
        """Every finished shard and compensation-path file the state names, as it was written (rank 0)."""
        shards = state["shards"]
        for shard in sorted(set(shards["weight_map"].values())):
            durable.check(self.folder / shard, shards["digests"].get(shard), self.remedy)
        for file in sorted({entry["file"] for entry in state["loras"].values()}):
            durable.check(self.path / file, state["digests"].get(file), self.remedy)

    def restore(self, model: nn.Module, shards: Any, state: dict[str, Any], dtype: torch.dtype,
                batches: dict[str, list[torch.Tensor]]
                ) -> tuple[tuple[int, dict[str, list[torch.Tensor]]], list[dict[str, Any]], dict[str, nn.Module]]:
        """Put a recorded run back (rank 0), once every file it reuses is verified: the finished layers'
        modules (on meta) into ``model``, the shard writer's index and compensation paths; returns ((next
        layer, stream → hidden states), log, reshaped)."""
        try:
            self.verify(state)
        except (KeyError, TypeError, AttributeError) as exc:
            raise StateRefused(f"{self.path / STATE}: the interrupted run's record lacks the checksums of its "
                                  f"files ({one_line(exc)}); {self.remedy}") from None
        start = self.restore_hidden(state, batches)
        self.specs, self.reshaped, self.loras = state["specs"], state["reshaped"], state["loras"]
        self.digests = {entry["file"]: state["digests"][entry["file"]] for entry in self.loras.values()}
        try:
            for name, spec in sorted(self.specs.items(), key=lambda item: item[0].count(".")):
                model.set_submodule(name, from_spec(spec, dtype=dtype, device="meta"))
            recorded = state["shards"]
            shards.weight_map, shards.total_size = dict(recorded["weight_map"]), int(recorded["total_size"])
            shards.written, shards.digests = set(recorded["written"]), dict(recorded["digests"])
            files = {entry["file"] for entry in self.loras.values()}
            tensors = {key: value for file in sorted(files) for key, value in load_file(str(self.path / file)).items()}
            for name, entry in self.loras.items():
                lora = from_spec(entry["spec"], dtype=tensors[f"{name}.down"].dtype)
                lora.down.weight.data.copy_(tensors[f"{name}.down"])
                lora.up.weight.data.copy_(tensors[f"{name}.up"])
                shards.loras[name] = lora
        except (OSError, KeyError, ValueError, TypeError, AttributeError, RuntimeError) as exc:
            raise StateRefused(f"{self.path}: the interrupted run's record does not fit this model "
                                  f"({one_line(exc)}); {self.remedy}") from None
        # those the manifest describes on their own (not rebuilt by a compressed block around them)
        reshaped = {name: model.get_submodule(name) for name in self.reshaped if name in self.specs}
        return start, list(state["log"]), reshaped

    def restore_hidden(self, state: dict[str, Any], batches: dict[str, list[torch.Tensor]]
                       ) -> tuple[int, dict[str, list[torch.Tensor]]]:
        """(next layer, stream → this rank's hidden states, one per batch of ``batches``) of a recorded run,
        verified: the file as written, one finite (batch, seq, width) tensor per calibration batch."""
        done = int(state["layers_done"])
        file = self.path / self.hidden_file(done)
        durable.check(file, (state.get("digests") or {}).get(file.name), self.remedy)
        try:
            stored = load_file(str(file))
        except Exception as exc:  # noqa: BLE001 - safetensors' own error is an Exception of its own
            raise StateRefused(f"{file}: the hidden states of rank {self.rank} are unreadable "
                                  f"({one_line(exc)[:100]}); {self.remedy}") from None
        self._check_hidden(file, stored, batches)
        hidden = {stream: [stored[f"{stream}.{i}"] for i in range(len(ids))] for stream, ids in batches.items()}
        return done, hidden

    def _check_hidden(self, file: Path, stored: dict[str, torch.Tensor], batches: dict[str, list[torch.Tensor]]
                      ) -> None:
        """Refuse hidden states that are not one finite (batch, seq, width) tensor per calibration batch."""
        expected = {f"{stream}.{i}": tuple(ids.shape) for stream, items in batches.items()
                    for i, ids in enumerate(items)}
        if set(stored) != set(expected):
            unlike = sorted(set(stored) ^ set(expected))
            raise StateRefused(f"{file} holds {len(stored)} hidden-state tensors where this run's calibration "
                                  f"has {len(expected)} batches (first difference: {unlike[0][:100]}); "
                                  f"{self.remedy}")
        widths = {tensor.shape[-1] for tensor in stored.values() if tensor.dim() == 3}
        for key, shape in sorted(expected.items()):
            tensor = stored[key]
            if tensor.dim() != 3 or tuple(tensor.shape[:2]) != shape or len(widths) != 1 \
                    or not tensor.is_floating_point():
                raise StateRefused(f"{file}: hidden states {key[:100]} have shape {list(tensor.shape)} "
                                      f"({str(tensor.dtype).removeprefix('torch.')}); this run's calibration batch "
                                      f"needs floating point (batch, seq, width) with (batch, seq) = {list(shape)}, "
                                      f"one width for all; {self.remedy}")
            if not bool(torch.isfinite(tensor).all()):
                raise StateRefused(f"{file}: hidden states {key[:100]} hold non-finite values (NaN or inf); "
                                      f"{self.remedy}")

    def finish(self) -> None:
        """The run is complete: its record goes (the directory becomes the output)."""
        shutil.rmtree(self.path, ignore_errors=True)
