"""Timed ``compressor heal`` runs for the measurement scripts (scripts/heal_check.py, the quality suite of
scripts/bench.py): the settings, the command in a subprocess of its own, its wall and CPU seconds, and what the
healed output's manifest records about the run."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the held-out domains every healing figure is reported on (the default protocol of `compressor eval`)
DOMAINS = {"sotu": "2000- speeches, first 40,960 tokens, 512-token windows",
           "pydoc": "second half of Python's reference topics, first 40,960 tokens, 512-token windows"}
# what a healing record (the last entry of the healed manifest's ``healing``) says about the run
RECORDED = ("steps", "tokens", "lr", "batch_size", "seq_len", "n_samples", "dataset", "held_out_loss_before",
            "held_out_loss_after")


@dataclass(frozen=True)
class HealSettings:
    """The options of one ``compressor heal`` run (the rest are the command's defaults)."""

    steps: int = 12
    lr: float = 3e-5
    n_samples: int = 48
    batch_size: int = 4
    distill: bool = False  # --distill: KL to the base model's predictions
    dtype: str = "float32"

    @classmethod
    def of(cls, mapping: dict) -> HealSettings:
        """Settings from a mapping (a suite entry's ``heal``); an unknown key is an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(mapping) - known)
        if unknown:
            raise ValueError(f"unknown heal settings: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**mapping)

    def arguments(self) -> list[str]:
        """The command-line options of these settings."""
        return ["--steps", str(self.steps), "--lr", str(self.lr), "--n-samples", str(self.n_samples),
                "--batch-size", str(self.batch_size), "--quiet", "--dtype", self.dtype,
                *(["--distill"] if self.distill else [])]

    def as_dict(self) -> dict:
        return asdict(self)


def compressor_command(args: list[str]) -> tuple[float, float]:
    """(wall, CPU seconds) of ``compressor ARGS`` in a subprocess (CPU: its user + system seconds, every thread);
    raises on failure."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "compressor", *args], check=True, cwd=ROOT)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def heal(output: str | Path, healed: Path, settings: HealSettings) -> dict:
    """``compressor heal OUTPUT --out HEALED`` with ``settings``: the healing record's figures (``heal``), its loss
    and dtype, and the command's wall and CPU seconds."""
    wall, cpu = compressor_command(["heal", str(output), "--out", str(healed), *settings.arguments()])
    record = json.loads((Path(healed) / "compression.json").read_text())["healing"][-1]
    return {"heal": {k: record[k] for k in RECORDED}, "loss": record.get("loss", "next_token"),
            "dtype": record.get("dtype", "float32"), "heal_wall_seconds": round(wall, 1),
            "heal_cpu_seconds": round(cpu, 1)}
