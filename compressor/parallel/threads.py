"""Independent pieces of work over worker threads, each on one torch thread (``map_serial``).

Work made of many small tensor operations (LQ-LoRA's alternating decompositions: a randomized SVD and a
NormalFloat rounding per iteration, thousands of iterations per model) gains little from torch's intra-op
threads, and on busy cores loses to them (each short operation waits for its slowest thread). Here each
piece runs on a single torch thread and as many pieces run at once as torch had threads: the cores stay
busy on a quiet machine, nothing spins on a busy one, and a piece's result is the same bits whatever the
machine's thread count (one thread's order of operations everywhere).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

import torch

from ..kernels.one_thread import serial

Item = TypeVar("Item")
Result = TypeVar("Result")


def workers() -> int:
    """How many pieces run at once: torch's thread count (``torch.set_num_threads``, OMP_NUM_THREADS)."""
    return max(1, torch.get_num_threads())


def map_serial(fn: Callable[[Item], Result], items: Iterable[Item], threads: int | None = None) -> list[Result]:
    """``[fn(item) for item in items]`` in order, the calls spread over ``threads`` worker threads (default
    ``workers()``), torch on one thread meanwhile; torch's thread count is restored on return. The first
    exception a call raises is raised here, as is Ctrl-C or SIGTERM (``Terminated``) while waiting: the calls
    not yet started are cancelled, only the running ones finish (seconds, not the rest of the work)."""
    items = list(items)
    count = min(threads or workers(), len(items))
    with serial():
        if count <= 1:
            return [fn(item) for item in items]
        with ThreadPoolExecutor(count, thread_name_prefix="compressor-serial") as pool:
            futures = [pool.submit(fn, item) for item in items]
            try:
                return [future.result() for future in futures]
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
