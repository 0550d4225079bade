"""A run spread over ranks (``torchrun``, gloo on the CPU) gives the single process's output: every shipped
recipe family compressed by two ranks matches the one-process run (logits, held-out perplexity within 0.1%,
the same decisions); statistics summed across two real processes equal one pass over all the data; the
owner assignment and the window shares are what they say; a rank killed mid-run ends the run with no output
and no hang."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import build_config, logits
from transformers import AutoModelForCausalLM

import compressor
from compressor import api
from compressor.errors import rank_label
from compressor.parallel import distributed
from compressor.stats.accumulators import DistanceStats, TensorStats

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]

# family → (shipped recipe, overrides beyond the small calibration, model)
FAMILIES = {
    "lord-gram": ("lord-svd-llm", [], "llama"),
    "gptq-eora": ("gptq-w4-eora-r64", ["steps.0.config.group_size=32", "steps.1.config.rank=8"], "llama"),
    "fwsvd": ("fwsvd", ["fwsvd.checkpointing=false"], "llama"),
    "curing": ("curing", ["curing.n_layers=2", "curing.max_rank=16"], "llama4"),
    "welore": ("welore-50", [], "opt"),
    "modegpt": ("modegpt-20", [], "llama"),
    "lqlora": ("lqlora-3bit-r64", ["lqlora.rank=4", "lqlora.error_cache=off"], "llama"),
}


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def perplexity(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    return math.exp(out.loss.item())


@pytest.fixture(scope="module")
def two_ranks(model_dirs, small, tokenizer, tmp_path_factory):
    """A folder with each family's one-process output (one/FAMILY) and two-rank output (ranks/FAMILY); each
    run with a cache of its own (a Fisher computed, not read), the two-rank runs in one torchrun."""
    root = tmp_path_factory.mktemp("distributed")
    model_dirs = {**model_dirs, "llama4": root / "llama4"}  # CURing never compresses a first or last layer
    torch.manual_seed(0)
    config = build_config("llama", len(tokenizer))
    config.num_hidden_layers = 4
    deeper = AutoModelForCausalLM.from_config(config)
    deeper.save_pretrained(model_dirs["llama4"])
    tokenizer.save_pretrained(model_dirs["llama4"])
    jobs = []
    for family, (recipe, extra, arch) in FAMILIES.items():
        overrides = [*small, *extra]
        jobs.append({"model": str(model_dirs[arch]), "recipe": recipe, "overrides": overrides,
                     "out": str(root / "ranks" / family)})
    (root / "jobs.json").write_text(json.dumps(jobs))
    ranks = subprocess.Popen([*TORCHRUN, str(TESTS / "distributed_driver.py"), str(root / "jobs.json")],
                             env=env(COMPRESSOR_CACHE=str(root / "cache-ranks")), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    previous = os.environ.get("COMPRESSOR_CACHE")
    os.environ["COMPRESSOR_CACHE"] = str(root / "cache-one")
    try:  # the one-process runs here, meanwhile
        for job, family in zip(jobs, FAMILIES):
            api.compress(job["model"], job["recipe"], root / "one" / family, overrides=job["overrides"],
                         progress=False)
    finally:
        if previous is None:
            os.environ.pop("COMPRESSOR_CACHE")
        else:
            os.environ["COMPRESSOR_CACHE"] = previous
        _, stderr = ranks.communicate(timeout=600)
    assert ranks.returncode == 0, stderr[-3000:]
    return root


@pytest.mark.parametrize("family", list(FAMILIES))
def test_two_ranks_give_the_single_process_output(two_ranks, family, ids):
    one, ranks = two_ranks / "one" / family, two_ranks / "ranks" / family
    manifest = [json.loads((out / "compression.json").read_text()) for out in (one, ranks)]
    assert manifest[1]["plan"] == manifest[0]["plan"]  # ranks, chosen layers, bit allocation, sparsity
    assert manifest[1]["params_after"] == manifest[0]["params_after"]
    assert manifest[1]["bytes_after"] == manifest[0]["bytes_after"]
    model_one, model_ranks = compressor.load(one), compressor.load(ranks)
    expected, got = logits(model_one, ids), logits(model_ranks, ids)
    assert torch.allclose(got, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())
    ppl = [perplexity(model, ids) for model in (model_one, model_ranks)]
    assert abs(ppl[1] / ppl[0] - 1) < 1e-3, ppl
    # the log of rank 0 covers every module, each compressed by its owner and swapped in on both ranks
    log = [[json.loads(line)["name"] for line in (out / "compression_log.jsonl").read_text().splitlines()]
           for out in (one, ranks)]
    assert log[1] == log[0]


def test_the_fisher_is_keyed_by_every_rank_s_windows(two_ranks):
    """The two-rank Fisher (each rank's share, summed) is cached under the one-process key, and equals it."""
    from safetensors.torch import load_file

    stored = [sorted((two_ranks / cache / "fisher").glob("*.safetensors")) for cache in ("cache-one", "cache-ranks")]
    assert stored[0] and [p.name for p in stored[1]] == [p.name for p in stored[0]]
    for one, ranks in zip(*stored):
        a, b = load_file(str(one)), load_file(str(ranks))
        assert sorted(a) == sorted(b)
        assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-12) for k in a)


def _sum_in_two_processes(rank: int, port: int, data: list[torch.Tensor], folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    distributed.start(torch.device("cpu"))
    stats, distance = TensorStats(), DistanceStats()
    kinds = frozenset({"gram", "abs_mean", "mean"})
    for x in data[rank::2]:
        stats.add(x, kinds)
        distance.add(x, x.flip(-1))
    distributed.all_reduce_stats([stats, stats, distance])  # a shared object listed twice is summed once
    torch.save({"stats": stats, "distance": distance}, f"{folder}/rank{rank}.pt")


def test_statistics_summed_across_processes_equal_one_pass(tmp_path):
    generator = torch.Generator().manual_seed(0)
    data = [torch.randn(2, 5, 8, generator=generator) for _ in range(5)]  # five batches, unevenly shared
    port = 29500 + os.getpid() % 1000
    mp.spawn(_sum_in_two_processes, args=(port, data, str(tmp_path)), nprocs=2, join=True)
    whole, distance = TensorStats(), DistanceStats()
    for x in data:
        whole.add(x, frozenset({"gram", "abs_mean", "mean"}))
        distance.add(x, x.flip(-1))
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got["stats"].n_tokens == whole.n_tokens == 50
        for name in ("gram", "abs_sum", "x_sum"):
            assert torch.allclose(getattr(got["stats"], name), getattr(whole, name), rtol=1e-12, atol=1e-12)
        assert got["distance"].count == distance.count
        assert got["distance"].mean == pytest.approx(distance.mean, rel=1e-12)


def test_owners_put_the_costliest_first_on_the_least_loaded_rank():
    costs = [("a", 1.0), ("b", 5.0), ("c", 4.0), ("d", 3.0), ("e", 3.0)]
    # b→0 (5), c→1 (4), d→1 (7), e→0 (8), a→1 (8)
    assert distributed.owners(costs, 2) == {"b": 0, "c": 1, "d": 1, "e": 0, "a": 1}
    assert distributed.owners(costs, 1) == dict.fromkeys("abcde", 0)
    assert set(distributed.owners(costs, 8).values()) == {0, 1, 2, 3, 4}


def test_a_single_process_is_a_world_of_one(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    windows = torch.arange(12).view(6, 2)
    assert distributed.start(torch.device("cpu")) == torch.device("cpu")
    assert not distributed.world().spread and torch.equal(distributed.share(windows), windows)
    assert rank_label() == ""
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    assert rank_label() == "rank 2/4: "


def test_shares_are_contiguous_and_cover_every_window(monkeypatch):
    windows = torch.arange(14).view(7, 2)
    parts = []
    for rank in range(3):
        monkeypatch.setattr(distributed, "_WORLD", distributed.World(rank, 3))
        parts.append(distributed.share(windows))
    assert [len(p) for p in parts] == [3, 2, 2] and torch.equal(torch.cat(parts), windows)
    monkeypatch.setattr(distributed, "_WORLD", distributed.World(0, 8))
    with pytest.raises(compressor.errors.CompressorError, match="one window per rank"):
        distributed.share(windows)


def _pid_of_rank(token: Path, rank: int) -> int | None:
    """The process whose environment holds this test's resume token and RANK=rank."""
    marks = (f"COMPRESSOR_TEST_RESUME={token}".encode(), f"RANK={rank}".encode())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            variables = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if all(mark in variables for mark in marks):
            return int(entry.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc")
def test_a_rank_killed_mid_run_ends_the_run_cleanly(model_dirs, small, tmp_path):
    out, token = tmp_path / "out", tmp_path / "resume-token"
    overrides = [item for o in small for item in ("--set", o)]
    command = [*TORCHRUN, "-m", "compressor", "compress", str(model_dirs["llama"]), "--recipe", "lord-svd-llm",
               "--out", str(out), *overrides]
    child = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env(COMPRESSOR_TEST_PAUSE="walk", COMPRESSOR_TEST_RESUME=str(token),
                                     COMPRESSOR_CACHE=str(tmp_path / "cache"), COMPRESSOR_DIST_TIMEOUT="60"))
    try:
        deadline, victim = time.monotonic() + 120, None
        while time.monotonic() < deadline and victim is None:  # both ranks pause after their first layer
            victim = _pid_of_rank(token, 1)
            time.sleep(0.2)
        assert victim is not None, "rank 1 never started"
        time.sleep(1.0)
        os.kill(victim, signal.SIGKILL)
        token.write_text("go")
        stdout, stderr = child.communicate(timeout=120)  # no hang: the others stop, torchrun returns
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode != 0
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert "rank 1" in stderr or "local_rank: 1" in stderr, stderr[-2000:]


def _safetensors(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for file in sorted(out.glob("*.safetensors")) for k, v in load_file(str(file)).items()}


def test_an_interrupted_two_rank_run_resumes_to_the_uninterrupted_output(model_dirs, small, tmp_path):
    overrides = [item for o in small for item in ("--set", o)]
    base = ["compress", str(model_dirs["llama"]), "--recipe", "lord-svd-llm", "--stream", "-q", *overrides]
    variables = env(COMPRESSOR_CACHE=str(tmp_path / "cache"), COMPRESSOR_DIST_TIMEOUT="120")
    whole, out, token = tmp_path / "whole", tmp_path / "out", tmp_path / "resume-token"
    done = subprocess.run([*TORCHRUN, "-m", "compressor", *base, "--out", str(whole)], env=variables,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    # stopped (SIGTERM to torchrun, which passes it on) once layer 0 is recorded: rank 0 writes the state
    # after every rank's hidden states are on disk
    child = subprocess.Popen([*TORCHRUN, "-m", "compressor", *base, "--out", str(out)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env={**variables, "COMPRESSOR_TEST_PAUSE": "recorded", "COMPRESSOR_TEST_RESUME": str(token)})
    state = tmp_path / ".out.partial" / ".resume" / "state.json"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not state.is_file() and child.poll() is None:
            time.sleep(0.1)
        assert state.is_file(), "no layer was recorded"
        time.sleep(1.0)
        child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode != 0 and not out.exists()
    assert "with --resume to continue" in stderr, stderr[-2000:]
    assert json.loads(state.read_text())["ranks"] == 2
    assert sorted(p.name for p in state.parent.glob("hidden-*")) == ["hidden-00001-rank0.safetensors",
                                                                     "hidden-00001-rank1.safetensors"]
    # one process cannot take over the ranks' shares of the hidden states
    alone = subprocess.run([sys.executable, "-m", "compressor", *base, "--out", str(out), "--resume"], env=variables,
                           capture_output=True, text=True, timeout=300)
    assert alone.returncode == 1 and "interrupted run of 2 rank(s)" in alone.stderr, alone.stderr
    loud = [a for a in base if a != "-q"]  # progress lines: the run says where it continues
    resumed = subprocess.run([*TORCHRUN, "-m", "compressor", *loud, "--out", str(out), "--resume"], env=variables,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming: 1 of 2 decoder layers were done" in resumed.stdout.splitlines(), resumed.stdout
    expected, got = _safetensors(whole), _safetensors(out)
    assert sorted(got) == sorted(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    manifest = [json.loads((folder / "compression.json").read_text()) for folder in (whole, out)]
    assert manifest[1] == manifest[0]
    assert not (tmp_path / ".out.partial").exists()


def test_groups_reading_one_input_have_one_owner():
    """q/k/v share one input accumulator (and so one eigendecomposition on their owner); o reads its own."""
    from compressor.contract import Group, Target
    from compressor.pipeline.compress import clusters, group_costs

    def linear(name: str, shape: tuple[int, int], stats) -> Group:
        weight = torch.zeros(shape)
        return Group("linear", name, {"linear": Target(name, None, weight, weight, None, stats)}, None, {})

    shared, own = TensorStats(), TensorStats()
    groups = [linear("q", (64, 64), shared), linear("k", (16, 64), shared), linear("v", (16, 64), shared),
              linear("o", (64, 64), own), linear("gate", (128, 64), None)]
    assert clusters(groups) == {"q": "q", "k": "q", "v": "q", "o": "o", "gate": "gate"}
    costs = dict(group_costs(groups, clusters(groups)))  # each member's SVD, and one n³ per input read (q/k/v: one)
    assert costs == {"q": 64.0 ** 3 + 2 * 16.0 * 64 * 16 + 64.0 ** 3, "o": 2 * 64.0 ** 3,
                     "gate": 128.0 * 64 * 64 + 64.0 ** 3}
    owner = distributed.owners(group_costs(groups, clusters(groups)), 2)
    assert owner == {"gate": 0, "q": 1, "o": 1}  # 786,432 alone; 557,056 + 524,288
