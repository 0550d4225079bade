"""Fault-injection points of the signal and resume tests, inert unless a test asks for one: with
``COMPRESSOR_TEST_PAUSE=stage`` (or several, comma-separated) a run says ``paused at stage`` on stdout at that
point and waits until the file ``$COMPRESSOR_TEST_RESUME`` exists, so the test can send a signal or change
``--out`` at a known point ("walk": after the first layer; "recorded": a streamed layer durably recorded;
"save": files written; "placed": the output renamed to ``--out``; "cleanup": a failed run about to clean up).
Not part of ``io``'s public names."""

from __future__ import annotations

import os
import time

PAUSE_ENV = "COMPRESSOR_TEST_PAUSE"  # the stage to pause at
RESUME_ENV = "COMPRESSOR_TEST_RESUME"  # ... until this file exists


def pause_for_tests(stage: str) -> None:
    """Pause at ``stage`` if a test asked for it (at most 600 s: a loaded machine can starve the test)."""
    if stage not in os.environ.get(PAUSE_ENV, "").split(","):
        return
    print(f"paused at {stage}", flush=True)
    resume = os.environ.get(RESUME_ENV)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not (resume and os.path.exists(resume)):
        time.sleep(0.05)
