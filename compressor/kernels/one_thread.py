"""``serial``: torch's intra-op threads set to one for a block of many small operations (GPTQ's and SparseGPT's
column loops, a Hessian factor of a small model's width, LQ-LoRA's decompositions, the worker threads of
``parallel.threads``), unless the block's operations are large enough for threads to pay for themselves.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

SERIAL_ELEMENTS = 1 << 24  # an operation on more elements than this keeps torch's threads (n > 4096 squared)


@contextmanager
def serial(elements: int = 0) -> Iterator[None]:
    """Torch's intra-op threads set to one for the body, restored on exit, unless the body's operations touch
    more than ``SERIAL_ELEMENTS`` elements (``elements``), where threads pay for themselves. For the column
    loops of GPTQ and SparseGPT, thousands of small operations per matrix (a column's rounding, a rank-1
    update of the block's remaining columns, ~10⁵ entries), and for the factorization of a Hessian of the
    widths of small models: split over threads, each operation waits for its slowest thread, and on a
    machine whose cores are busy with other work a thread waiting for a core makes an operation of tens of
    microseconds last a scheduler time slice while the others spin (on 2 busy cores, 10× the quiet run's
    time and CPU). The results are the same bits on one thread as on two (``tests/test_quantize.py``)."""
    threads = torch.get_num_threads()
    if threads == 1 or elements > SERIAL_ELEMENTS:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
