"""``compressor eval --speed`` (against the base, each model in its own process), ``eval --record`` and
``compressor compare`` (one table from what outputs record). Wall-clock values are never asserted: only the
structure, positivity and what must hold whatever the machine's load."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from compressor import api, io
from compressor.cli import app
from compressor.evaluation import compare
from compressor.plan import recipe as recipes

ENV = {"COLUMNS": "250", "HF_HUB_OFFLINE": "1"}


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env=ENV)


def rtn(group_size: int = 64) -> recipes.Recipe:
    return recipes.parse({"steps": [{"method": "quantize", "config": {"algorithm": "rtn", "bits": 4,
                                                                      "group_size": group_size}}]})


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, model_dirs, calib_file):
    """A quantized and a factorized output of the tiny Llama."""
    root = tmp_path_factory.mktemp("extras")
    api.compress(str(model_dirs["llama"]), rtn(), root / "rtn", progress=False)
    lord = recipes.load("lord", ["calibration.n_samples=4", "calibration.seq_len=32", "calibration.batch_size=2",
                                 f"calibration.dataset={calib_file}", "lord.ratio=0.3"])
    api.compress(str(model_dirs["llama"]), lord, root / "lord", progress=False)
    return root


def test_speed_against_the_base(outputs, model_dirs, calib_file, tmp_path):
    report = tmp_path / "speed.json"
    result = invoke("eval", outputs / "rtn", "--no-perplexity", "--speed", "--dataset", calib_file,
                    "--prompt-tokens", 16, "--new-tokens", 4, "--speed-batch", 2, "--repeats", 1, "--json", report)
    assert result.exit_code == 0, result.output
    assert "generation speed on cpu" in result.stdout and "compressed ÷ base" in result.stdout
    speed = json.loads(report.read_text())["speed"]
    assert io.read_manifest(outputs / "rtn")["base_model_path"] == str(model_dirs["llama"].resolve())
    assert speed["base_model"] == str(model_dirs["llama"].resolve())  # the base compression.json records
    assert (speed["batch"], speed["prompt_tokens"], speed["new_tokens"], speed["device"]) == (2, 16, 4, "cpu")
    for key in ("compressed", "base"):
        run = speed[key]
        for field in ("prefill_tokens_per_s", "decode_tokens_per_s", "prefill_seconds", "decode_seconds",
                      "peak_memory_bytes", "weights_bytes", "rss_before_load_bytes", "load_seconds"):
            assert run[field] > 0, (key, field)
        assert run["peak_memory_bytes"] > run["rss_before_load_bytes"]  # the model and its run come on top
        assert run["memory"] == "peak RSS of the process"
    assert speed["compressed"]["model"] == str(outputs / "rtn")
    # packed 4-bit weights are fewer bytes than the base's fp32 linears; the parameter count is the same
    # but for the packed integers, which are buffers
    assert speed["compressed"]["weights_bytes"] < speed["base"]["weights_bytes"]
    assert speed["decode_tokens_per_s_ratio"] == pytest.approx(
        speed["compressed"]["decode_tokens_per_s"] / speed["base"]["decode_tokens_per_s"])
    assert 0 <= speed["same_greedy_tokens"] <= 1


def test_speed_refusals_are_one_line(outputs, model_dirs, tmp_path):
    result = invoke("eval", model_dirs["llama"], "--speed", "--no-perplexity")
    assert result.exit_code == 1 and result.stderr.startswith("error: --speed compares a compressed output")
    result = invoke("eval", outputs / "rtn", "--speed", "--new-tokens", 0)
    assert result.exit_code == 1 and result.stderr.strip() == "error: --new-tokens must be ≥ 1; got 0"
    result = invoke("eval", outputs / "rtn", "--speed", "--no-perplexity", "--prompt-tokens", 120,
                    "--new-tokens", 20)
    assert result.exit_code == 1 and "--prompt-tokens + --new-tokens 140 is longer than the model's 128" in result.stderr
    result = invoke("eval", outputs / "rtn", "--speed", "--no-perplexity", "--base", tmp_path / "missing",
                    "--prompt-tokens", 16, "--new-tokens", 4)
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: --speed: --base: model not found: {tmp_path / 'missing'}"
    moved = tmp_path / "moved"  # an output whose recorded base is gone: named, with the option to use
    moved.mkdir()
    for file in (outputs / "rtn").iterdir():
        (moved / file.name).write_bytes(file.read_bytes())
    manifest = json.loads((moved / io.MANIFEST).read_text())
    manifest.update(base_model="gone/away/llama", base_model_path=None)
    (moved / io.MANIFEST).write_text(json.dumps(manifest))
    result = invoke("eval", moved, "--speed", "--no-perplexity", "--prompt-tokens", 16, "--new-tokens", 4)
    assert result.exit_code == 1 and result.stderr.strip() == (
        f"error: --speed: the base model recorded in {io.MANIFEST} (pass --base MODEL): model not found: "
        "gone/away/llama")
    result = invoke("eval", outputs / "rtn", "--no-perplexity")
    assert result.exit_code == 1 and "nothing to evaluate" in result.stderr


def test_record_then_compare(outputs, model_dirs, tmp_path):
    for name in ("rtn", "lord"):
        result = invoke("eval", outputs / name, "--max-tokens", 256, "--seq-len", 32, "--record")
        assert result.exit_code == 0, result.output
    recorded = json.loads((outputs / "rtn" / compare.EVALUATION).read_text())
    ppl = recorded["perplexity"]["sotu@32"]
    assert ppl["tokens"] == 256 and ppl["value"] > 1
    rows_file = tmp_path / "rows.json"
    result = invoke("compare", outputs / "rtn", outputs / "lord", model_dirs["llama"], "--json", rows_file)
    assert result.exit_code == 0, result.output
    rows = json.loads(rows_file.read_text())["rows"]
    rtn_row, lord_row, dense_row = rows
    assert rtn_row["method"] == "rtn w4 g64" and lord_row["method"] == "lord gram 0.3" and dense_row["method"] == "dense"
    assert rtn_row["perplexity"] == ppl["value"] and rtn_row["perplexity_on"] == "sotu, 32"
    assert dense_row["perplexity"] is None  # nothing recorded for the base
    # quantized weights count as parameters: the same count as the dense model, in fewer bytes
    assert rtn_row["parameters"] == dense_row["parameters"]
    assert lord_row["parameters"] == io.read_manifest(outputs / "lord")["params_after"] < dense_row["parameters"]
    assert rtn_row["bytes"] == (outputs / "rtn" / "model.safetensors").stat().st_size
    assert rtn_row["bytes"] < lord_row["bytes"] < dense_row["bytes"]
    cells = [compare.cells(row) for row in rows]
    assert cells[2][3] == f"{8 * dense_row['bytes'] / dense_row['parameters']:.2f}"  # ≈ 32 bits: fp32
    assert 31.9 < float(cells[2][3]) < 32.5 and float(cells[0][3]) < float(cells[2][3]) / 1.5
    for row in cells:
        assert row[0] in result.stdout and row[1] in result.stdout
    markdown = invoke("compare", outputs / "rtn", outputs / "lord", "--markdown")
    assert markdown.exit_code == 0
    lines = markdown.stdout.strip().splitlines()
    assert lines[0].startswith("| output | method | parameters | bits/weight | bytes on disk | perplexity (sotu, 32) |")
    assert len(lines) == 4 and f"| {rtn_row['parameters']:,} |" in lines[2]


def test_compare_and_record_refusals(tmp_path, model_dirs):
    result = invoke("compare", tmp_path / "nothing")
    assert result.exit_code == 1 and result.stderr.startswith("error: not a compressed model directory")
    result = invoke("eval", model_dirs["llama"], "--record", "--max-tokens", 64, "--seq-len", 32)
    assert result.exit_code == 1 and "not a compressed model directory" in result.stderr
    assert not (model_dirs["llama"] / compare.EVALUATION).exists()


def test_bench_rows_count_quantized_weights():
    run = {"name": "rtn-w4", "parameters": 28_346_688, "bytes_on_disk": 170_619_880, "perplexity": 31.87,
           "reduction": {"targeted_params_before": 106_168_320},
           "recipe": {"steps": [{"method": "quantize", "config": {"algorithm": "rtn", "bits": 4, "group_size": 128}}]}}
    row = compare.row_of_bench(run, "sotu 2000-, 512")
    assert row["parameters"] == 134_515_008 and row["method"] == "rtn w4 g128"
    assert compare.cells(row)[3] == "10.15"
    dense = compare.row_of_bench({"name": "dense", "parameters": 134_515_008, "perplexity": 24.78},
                                 dense_bytes=538_090_408)
    assert dense["method"] == "dense" and dense["bytes"] == 538_090_408


def test_plot_bench_reads_the_committed_results(tmp_path):
    """scripts/plot_bench.py: every run once, the README's table in compare's columns, and the PNG (with the
    plot extra) under 200 kB."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import plot_bench

    runs, heldout = plot_bench.load_runs()
    names = [run["name"] for run in runs]
    assert len(names) == len(set(names)) and {"dense", "rtn-w4", "modegpt-0.2", "lord-gram-0.2"} <= set(names)
    text = plot_bench.table(runs, heldout, ["dense", "rtn-w4", "modegpt-0.2"], 538_090_408)
    lines = text.strip().splitlines()
    assert lines[0].startswith("| output | method | parameters | bits/weight | bytes on disk | perplexity (sotu 2000-, 512)")
    assert lines[3] == "| rtn-w4 | rtn w4 g128 | 134,515,008 | 10.15 | 170.6 MB | 31.87 | – | – |"
    assert "| modegpt-0.2 | modegpt 0.2 | 113,281,344 |" in lines[4] and lines[4].endswith("| 584.7 | 25.5 |")
    pytest.importorskip("matplotlib")
    png = plot_bench.write(plot_bench.RESULTS, tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 200_000
