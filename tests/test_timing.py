"""timing: named phases add up exclusively (a nested phase's seconds are not also its parent's), record only
inside ``recording``, and a run's summary carries the model-level passes as phases of their own."""

from __future__ import annotations

import pytest

from compressor import api, timing


@pytest.fixture
def clock(monkeypatch):
    """A clock that moves only when the test says: ``clock.tick(s)``."""

    class Clock:
        now = 0.0

        def tick(self, seconds: float) -> None:
            self.now += seconds

    fake = Clock()
    monkeypatch.setattr(timing.time, "perf_counter", lambda: fake.now)
    return fake


def test_nested_phases_are_exclusive(clock):
    seconds: dict[str, float] = {}
    with timing.recording(seconds):
        with timing.phase("prepare"):
            clock.tick(1.0)
            with timing.phase("fisher"):
                clock.tick(5.0)
                with timing.phase("prepare"):  # the same name nested: still counted once
                    clock.tick(0.5)
            clock.tick(2.0)
        with timing.phase("fisher"):
            clock.tick(3.0)
    assert seconds == {"prepare": 3.5, "fisher": 8.0}
    assert sum(seconds.values()) == clock.now


def test_no_recording_records_nothing_and_timed_keeps_the_result(clock):
    @timing.timed("pass")
    def work(x: int) -> int:
        clock.tick(2.0)
        return 2 * x

    assert work(3) == 6  # outside a recording: nothing to write to, nothing fails
    seconds: dict[str, float] = {}
    with timing.recording(seconds):
        assert work(4) == 8
    assert seconds == {"pass": 2.0}


def test_exception_still_records(clock):
    seconds: dict[str, float] = {}
    with pytest.raises(ValueError), timing.recording(seconds), timing.phase("decide"):
        clock.tick(1.5)
        raise ValueError("x")
    assert seconds == {"decide": 1.5}


def test_modegpt_block_influence_is_its_own_phase(model_dirs, small, tmp_path):
    summary = api.compress(str(model_dirs["llama"]), "modegpt-20", tmp_path / "out", overrides=small,
                           progress=False)
    phases = summary["walk_seconds"]
    assert {"prepare", "block_influence", "statistics_forward", "decomposition", "propagation"} <= set(phases)
    assert all(value >= 0 for value in phases.values())


def test_walk_phases_are_exclusive_and_within_the_run(model_dirs, small, tmp_path):
    """The walk's phases (capture, statistics forwards, the hooks' accumulation nested in them, decompositions,
    propagation) are timing phases like the model-level passes: each second counted once, so together they fit
    in the compression's wall time."""
    summary = api.compress(str(model_dirs["llama"]), "lord", tmp_path / "out", overrides=small, progress=False)
    phases = summary["walk_seconds"]
    assert {"capture", "statistics_forward", "statistics_accumulation", "decomposition", "propagation"} <= set(phases)
    assert all(value > 0 for key, value in phases.items() if key != "prepare")
    assert sum(phases.values()) <= summary["seconds"]["compression"]
