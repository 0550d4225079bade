"""One run spread over several processes started by ``torchrun``: who does what, and the collectives that
keep the ranks in step.

A process that ``torchrun`` started as one of several (``WORLD_SIZE`` > 1 in its environment) joins the
process group when ``compress`` starts (``start``: gloo for CPU tensors, NCCL for CUDA ones, a timeout on
every collective: ``COMPRESSOR_DIST_TIMEOUT`` seconds, default 1800). Any other process is a world of one,
where every function here returns at once and changes nothing: a single process runs exactly as before.

How the work is spread (``torch.distributed`` moves every byte; no launcher or transport of our own):

- calibration windows: each rank takes its contiguous share (``share``) and keeps only its share of the
  hidden states between layers, so activation memory per rank falls with the number of ranks;
- statistics: every accumulator is a plain sum that says what summing adds (``stats.accumulators``), so
  ``all_reduce_stats`` sums them
  across ranks in place where a collection ends (``Collector.result``, the layer distances); every rank
  then holds the statistics of all the windows, and a rank's signature of what it holds is checked against
  the others' first, so ranks that disagree fail with a message instead of waiting on each other;
- the Fisher pass: each rank on its share, summed once (``all_reduce_tensors``); rank 0 reads and writes
  the cache, keyed by all the windows (``gather_windows``);
- model-level decisions: made on every rank from the summed statistics; rank 0's record is the one
  applied (``broadcast``);
- decompositions: a layer's groups go to owner ranks by estimated cost (``owners``, longest first to the
  least loaded); each owner compresses its groups, and ``exchange`` hands every rank every replacement,
  so each propagates its own share through the same compressed layer;
- output: rank 0 alone writes (``World.main``); the others hold nothing on disk.
"""

from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import Tensor

from ..errors import CompressorError

TIMEOUT_ENV = "COMPRESSOR_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 1800  # seconds any collective may wait for the slowest rank (a long decomposition)


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank ``rank`` of ``size`` (``local_rank`` on its machine)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this rank writes (rank 0, or the only process)."""
        return self.rank == 0

    @property
    def spread(self) -> bool:
        return self.size > 1


_WORLD = World()


def world() -> World:
    return _WORLD


def requested() -> bool:
    """Whether torchrun started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def _timeout() -> datetime.timedelta:
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT))
    try:
        seconds = float(raw)
    except ValueError:
        raise CompressorError(f"{TIMEOUT_ENV} must be a number of seconds; got {raw!r}") from None
    if seconds <= 0:
        raise CompressorError(f"{TIMEOUT_ENV} must be positive; got {raw!r}")
    return datetime.timedelta(seconds=seconds)


def start(device: torch.device) -> torch.device:
    """Join torchrun's process group if this process is one of several (once; later calls only return the
    device). Returns this rank's compute device: ``cuda`` becomes ``cuda:LOCAL_RANK``."""
    global _WORLD
    if not requested():
        return device
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if not dist.is_available():
            raise CompressorError("this torch build has no torch.distributed; run a single process")
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=_timeout())
        atexit.register(_stop)
    _WORLD = World(dist.get_rank(), dist.get_world_size(), local_rank)
    return device


def _stop() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


# --- calibration data ----------------------------------------------------------------------------------------


def share(windows: Tensor) -> Tensor:
    """This rank's contiguous share of the calibration windows (n, seq) (all of them in a single process)."""
    if not _WORLD.spread:
        return windows
    if windows.shape[0] < _WORLD.size:
        raise CompressorError(f"{windows.shape[0]} calibration windows cannot be shared by {_WORLD.size} ranks: "
                              "use at least one window per rank (--n-samples)")
    return windows.tensor_split(_WORLD.size)[_WORLD.rank]


def gather_windows(batches: list[Tensor]) -> list[Tensor]:
    """Every rank's batches of token ids, in rank order (the whole calibration set: a cache key)."""
    if not _WORLD.spread:
        return batches
    import torch.distributed as dist

    gathered: list[Any] = [None] * _WORLD.size
    dist.all_gather_object(gathered, [b.cpu() for b in batches])
    return [batch for part in gathered for batch in part]


# --- collectives -----------------------------------------------------------------------------------------------


def _check_same(signature: Any, what: str) -> None:
    """Fail (on every rank) unless every rank holds the same ``signature`` of what it is about to sum."""
    import torch.distributed as dist

    gathered: list[Any] = [None] * _WORLD.size
    dist.all_gather_object(gathered, signature)
    for rank, theirs in enumerate(gathered):
        if theirs != gathered[0]:
            raise CompressorError(f"ranks disagree on the {what} to sum: rank 0 has {gathered[0]!r:.200}, "
                                  f"rank {rank} has {theirs!r:.200}")


def all_reduce_tensors(tensors: Iterable[Tensor], what: str = "tensors") -> None:
    """Sum each tensor across ranks, in place (the same order on every rank)."""
    if not _WORLD.spread:
        return
    import torch.distributed as dist

    tensors = list(tensors)
    _check_same([(tuple(t.shape), str(t.dtype)) for t in tensors], what)
    for tensor in tensors:
        dist.all_reduce(tensor)


def all_reduce_stats(stats: Iterable[Any]) -> None:
    """Sum statistics accumulators across ranks, in place; each object once (shared statistics appear under
    several keys), in the order given, which must be the same on every rank. Each accumulator says what
    summing adds: ``sums()`` gives its counts (a fp64 tensor) and the tensors summed in place, and
    ``set_counts`` takes the summed counts back (``stats.accumulators``)."""
    if not _WORLD.spread:
        return
    unique = list({id(s): s for s in stats}.values())
    missing = [item for item in unique if not hasattr(item, "sums")]
    if missing:
        raise TypeError(f"cannot sum {type(missing[0]).__name__} across ranks")
    parts = [item.sums() for item in unique]
    all_reduce_tensors([*(counts for counts, _ in parts), *(t for _, sums in parts for t in sums)], "statistics")
    for item, (counts, _) in zip(unique, parts):
        item.set_counts(counts)


def barrier() -> None:
    """Wait until every rank is here."""
    if _WORLD.spread:
        import torch.distributed as dist

        dist.barrier()


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a picklable object: a decision record, a cache verdict)."""
    if not _WORLD.spread:
        return value
    import torch.distributed as dist

    box = [value if _WORLD.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_tensors(tensors: dict[str, Tensor] | None, shapes: dict[str, tuple[int, ...]],
                      dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Rank 0's ``tensors`` (name → tensor of ``shapes[name]``) on every rank, one collective each."""
    if not _WORLD.spread:
        return tensors or {}
    import torch.distributed as dist

    out = {}
    for name, shape in shapes.items():
        tensor = tensors[name].to(dtype).contiguous() if _WORLD.main else torch.empty(shape, dtype=dtype)
        dist.broadcast(tensor, src=0)
        out[name] = tensor
    return out


def exchange(owned: dict[str, Any]) -> dict[str, Any]:
    """Every rank's ``owned`` results (name → picklable value, tensors on the CPU) merged, on every rank."""
    if not _WORLD.spread:
        return owned
    import torch.distributed as dist

    gathered: list[Any] = [None] * _WORLD.size
    dist.all_gather_object(gathered, owned)
    merged: dict[str, Any] = {}
    for part in gathered:
        merged.update(part)
    return merged


# --- who does what ---------------------------------------------------------------------------------------------


def owners(costs: list[tuple[str, float]], size: int | None = None) -> dict[str, int]:
    """name → owner rank: the costliest item first to the least-loaded rank (ties: the lower rank; equal costs
    keep their order), the same answer on every rank."""
    size = _WORLD.size if size is None else size
    load = [0.0] * size
    owner = {}
    for index, (name, cost) in sorted(enumerate(costs), key=lambda item: (-item[1][1], item[0])):
        rank = min(range(size), key=lambda r: (load[r], r))
        owner[name] = rank
        load[rank] += cost
    return owner
