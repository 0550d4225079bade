"""Seconds per named phase of a run, for the summary's breakdown (``walk_seconds``; the speed suite's columns).

``recording(seconds)`` makes the dict ``seconds`` (phase name → seconds) the accumulator of the code it wraps;
``phase(name)`` (or the ``timed(name)`` decorator) anywhere below adds the wall time of its block to
``seconds[name]``, less the time of the phases nested in it: a Fisher pass inside a method's decisions counts
as ``fisher``, not also as ``prepare``, so the phases add up to the time they cover. Outside ``recording`` a
phase records nothing. Only the clock is read: no number of the run depends on it.
"""

from __future__ import annotations

import functools
import time
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator, TypeVar

F = TypeVar("F", bound=Callable)


class _Recorder:
    def __init__(self, seconds: dict[str, float]):
        self.seconds = seconds
        self.nested = [0.0]  # per open phase (the outermost entry: outside any): seconds of the phases inside it


_ACTIVE: ContextVar[_Recorder | None] = ContextVar("compressor_timing", default=None)


@contextmanager
def recording(seconds: dict[str, float]) -> Iterator[dict[str, float]]:
    """Phases inside this block add their seconds to ``seconds``."""
    token = _ACTIVE.set(_Recorder(seconds))
    try:
        yield seconds
    finally:
        _ACTIVE.reset(token)


@contextmanager
def phase(name: str) -> Iterator[None]:
    """The block's wall time, less its nested phases', added to the recording's ``name`` (if one is open)."""
    recorder = _ACTIVE.get()
    if recorder is None:
        yield
        return
    recorder.nested.append(0.0)
    start = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - start
        inner = recorder.nested.pop()
        recorder.seconds[name] = recorder.seconds.get(name, 0.0) + elapsed - inner
        recorder.nested[-1] += elapsed


def timed(name: str) -> Callable[[F], F]:
    """A function whose every call is the phase ``name``."""

    def wrap(function: F) -> F:
        @functools.wraps(function)
        def timed_call(*args, **kwargs):
            with phase(name):
                return function(*args, **kwargs)

        return timed_call  # type: ignore[return-value]

    return wrap
