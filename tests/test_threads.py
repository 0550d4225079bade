"""``parallel.threads.map_serial``: the results in order, each call on one torch thread, torch's thread count
restored; an error (or Ctrl-C / SIGTERM while waiting) cancels the calls not yet started instead of waiting for
all of the remaining work."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from compressor.parallel.threads import map_serial


def test_results_in_order_on_one_torch_thread():
    before = torch.get_num_threads()
    seen = []

    def work(item: int) -> tuple[int, int]:
        seen.append(threading.current_thread().name)
        return item * item, torch.get_num_threads()

    results = map_serial(work, range(20), threads=2)
    assert [value for value, _ in results] == [i * i for i in range(20)]
    assert {threads for _, threads in results} == {1}
    assert all(name.startswith("compressor-serial") for name in seen)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_an_error_cancels_the_work_not_yet_started(error):
    started = []

    def work(item: int) -> int:
        started.append(item)
        if item == 0:
            raise error("stop")
        time.sleep(0.05)
        return item

    with pytest.raises(error):
        map_serial(work, range(200), threads=2)  # all of it: 10 s of sleeping on two workers
    time.sleep(0.2)  # nothing more starts afterwards
    assert len(started) < 20, len(started)
