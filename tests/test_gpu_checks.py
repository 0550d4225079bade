"""scripts/gpu_checks.sh --smoke: the GPU script's whole path (the speed suite in fp32 and bf16 with a contended
run, the peer row, the 1B-width memory benchmark) on the CPU with a tiny random Llama; its JSON has every
part, every run's columns, and numbers that hang together (no wall-clock value is asserted)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = ["plain-forward", "lord", "gptq-w4-g64-act-order", "llmcompressor-gptq-w4-g64-act-order"]


def test_gpu_checks_smoke(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1", "LLMC_PYTHON": str(tmp_path / "no-llmc-python"), "PART_S": "600"}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_checks.sh"), "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr
    parts = json.loads((tmp_path / "gpu-checks.json").read_text())
    assert parts == {"device": "cpu", "parts": {"speed-float32": "ok", "speed-bfloat16": "ok",
                                                "memory-1b-width": "ok"}}, parts
    for dtype in ("float32", "bfloat16"):
        suite = json.loads((tmp_path / f"bench-speed-cpu-{dtype}.json").read_text())
        runs = {run["name"]: run for run in suite["runs"]}
        assert suite["dtype"] == dtype and "phases" in suite["columns"]
        # the smoke's bf16 part runs only the plain forward and GPTQ (the dtype's path, in less time)
        expected = RUNS + ["gptq-w4-g64-act-order-contended"] if dtype == "float32" else RUNS[:1] + RUNS[2:3]
        assert sorted(runs) == sorted(expected), sorted(runs)
        if dtype == "float32":
            assert "llmcompressor" in runs["llmcompressor-gptq-w4-g64-act-order"]["skipped"] or "setup" in \
                runs["llmcompressor-gptq-w4-g64-act-order"]["skipped"]
        plain = runs["plain-forward"]
        assert plain["wall_seconds"] > 0 and plain["cpu_seconds"] > 0 and plain["peak_rss_mib"] > 0
        for name in [n for n in ("lord", "gptq-w4-g64-act-order") if n in runs]:
            run = runs[name]
            assert "error" not in run, run.get("error")
            assert math.isfinite(run["perplexity"]) and run["perplexity"] > 1
            assert run["run_over_plain_forward"] == run["wall_seconds"] / plain["wall_seconds"]
            assert run["cpu_seconds"] > 0 and run["compression_peak_rss_mib"] > plain["peak_rss_mib"] / 2
            phases = run["phases"]
            assert set(phases) == {"load", "statistics_forwards", "accumulation", "decomposition", "propagation",
                                   "model_passes", "save", "other"}
            assert phases["decomposition"] > 0 and phases["statistics_forwards"] > 0 and phases["save"] > 0
            # the phases partition the run: what they leave over ("other") is a small part of it, never negative
            assert 0 <= phases["other"] < 0.5 * run["wall_seconds"]
    contended = runs_of(tmp_path, "float32")["gptq-w4-g64-act-order-contended"]
    quiet = runs_of(tmp_path, "float32")["gptq-w4-g64-act-order"]
    assert contended["perplexity"] == quiet["perplexity"]  # the same run, only slower
    assert contended["contended_over_quiet"] == contended["wall_seconds"] / quiet["wall_seconds"]
    assert contended["peer_cpu_seconds"] > 0 and "busy loop" in contended["contended_by"]
    memory = json.loads((tmp_path / "bench-memory-cpu.json").read_text())
    assert sorted(row["recipe"] for row in memory["runs"]) == ["gptq", "lord-lean"]
    assert all(row["peak_rss_mib"] > 0 and row["params_after"] < row["params_before"] for row in memory["runs"])


def runs_of(folder: Path, dtype: str) -> dict[str, dict]:
    return {run["name"]: run for run in json.loads((folder / f"bench-speed-cpu-{dtype}.json").read_text())["runs"]}
