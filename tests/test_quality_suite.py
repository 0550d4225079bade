"""The quality suite's reporting (scripts/bench.py, scripts/quality_table.py, scripts/plot_bench.py): a run records
the second held-out domain (pydoc) in ``compressor eval --dataset pydoc``'s windows and numbers; a healed entry
records the perplexities before and after ``compressor heal`` (the same as evaluating the healed output) and the
heal's seconds; the table shows pydoc, bytes on disk, bits per weight and before → after; the plot draws healed
and int8-factor runs. On a tiny Llama with a small protocol; the table and plot on synthetic results."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import bench  # noqa: E402
import heal_runs  # noqa: E402
import plot_bench  # noqa: E402
import quality_table  # noqa: E402

SMALL_HEAL = {"steps": 2, "lr": 1e-3, "n_samples": 8, "batch_size": 2, "distill": True}


@pytest.fixture
def small_protocol(monkeypatch, model_dirs):
    """bench on the tiny Llama with short held-out windows on both domains (the tiny model's 128 positions)."""
    monkeypatch.setattr(bench, "MODEL", str(model_dirs["llama"]))
    monkeypatch.setattr(bench, "HELDOUT", {**bench.HELDOUT, "tokens": 1024, "seq_len": 64})
    monkeypatch.setattr(bench, "PYDOC", {**bench.PYDOC, "tokens": 1024, "seq_len": 64})
    return model_dirs["llama"]


def lord_recipe(calib_file: Path) -> dict:
    return {"calibration": {"dataset": str(calib_file), "n_samples": 4, "seq_len": 32, "batch_size": 2},
            "steps": [{"method": "lord", "config": {"ratio": 0.3, "whiten": "gram"}}]}


def test_pydoc_perplexity_is_compressor_evals(small_protocol, tokenizer):
    """The suite's pydoc figure = `compressor eval --dataset pydoc` with the same window length, tokens and batch."""
    from compressor.evaluation.evaluate import evaluate
    from compressor.model import loading as models

    model, _ = models.load(str(small_protocol))
    figures = bench.scores(model, tokenizer, pydoc=True)
    evaluated = evaluate(str(small_protocol), "pydoc", seq_len=64, max_tokens=1024, batch_size=bench.EVAL_BATCH)
    assert evaluated["perplexity"]["windows"] == 1024 // 64
    assert figures["pydoc_perplexity"] == evaluated["perplexity"]["value"]
    sotu = evaluate(str(small_protocol), "sotu", seq_len=64, max_tokens=1024, batch_size=bench.EVAL_BATCH)
    assert figures["perplexity"] == sotu["perplexity"]["value"] != figures["pydoc_perplexity"]


def test_quality_run_records_pydoc(small_protocol, calib_file):
    """A quality-suite run (run_one with ``pydoc``) records both held-out domains; without it, sotu alone."""
    run = bench.run_one("lord", lord_recipe(calib_file), speed=False, pydoc=True)
    assert run["pydoc_perplexity"] > 1 and run["perplexity"] > 1 and run["pydoc_perplexity"] != run["perplexity"]
    assert "healing" not in run and run["bits_per_weight_all"] > 0


def test_healed_scores_are_the_healed_outputs(small_protocol, calib_file, tokenizer, tmp_path):
    """Healing an output (`compressor heal --distill`, a subprocess): the perplexities before are the compressed
    model's, after are what `compressor eval` gives on the healed output; the heal's record, seconds and bytes."""
    from compressor import api
    from compressor.evaluation.evaluate import bytes_on_disk, evaluate
    from compressor.plan import recipe as recipes

    out = tmp_path / "out"
    summary = api.compress(str(small_protocol), recipes.parse(lord_recipe(calib_file)), out, progress=False)
    healing = bench.healed_scores(out, summary["model"], tokenizer, SMALL_HEAL, False, True)
    assert healing["settings"] == SMALL_HEAL and healing["loss"] == "distill"
    assert healing["heal"]["steps"] == 2 and healing["heal"]["n_samples"] == 8 and healing["heal"]["lr"] == 1e-3
    assert healing["heal_wall_seconds"] > 0 and healing["heal_cpu_seconds"] > 0 and healing["heal_peak_rss_mib"] > 0
    healed = tmp_path / "out-healed"
    assert healing["bytes_on_disk"] == bytes_on_disk(healed) == bytes_on_disk(out)  # healing keeps the bytes
    before, after = healing["before"], healing["after"]
    assert set(before) == set(after) == {"perplexity", "pydoc_perplexity"}
    for domain, key in (("sotu", "perplexity"), ("pydoc", "pydoc_perplexity")):
        was = evaluate(str(out), domain, seq_len=64, max_tokens=1024, batch_size=bench.EVAL_BATCH)
        now = evaluate(str(healed), domain, seq_len=64, max_tokens=1024, batch_size=bench.EVAL_BATCH)
        assert before[key] == pytest.approx(was["perplexity"]["value"], rel=1e-6)
        assert after[key] == now["perplexity"]["value"] != pytest.approx(before[key], rel=1e-4)


def test_run_one_heals_an_entry_with_heal(small_protocol, calib_file, monkeypatch):
    """run_one strips ``heal`` from the recipe it compresses, heals the output with its settings and reports the
    healed figures, the ones before under ``healing``."""
    calls = []

    def healed_scores(out, model, tokenizer, settings, on_calibration, pydoc):
        calls.append((Path(out).is_dir(), settings, on_calibration, pydoc))
        return {"settings": settings, "before": {"perplexity": 90.0, "pydoc_perplexity": 80.0},
                "after": {"perplexity": 60.0, "pydoc_perplexity": 50.0}}

    monkeypatch.setattr(bench, "healed_scores", healed_scores)
    recipe = bench.healed(lord_recipe(calib_file), SMALL_HEAL)
    run = bench.run_one("lord-healed", recipe, speed=False, pydoc=True)
    assert calls == [(True, SMALL_HEAL, False, True)]
    assert run["recipe"]["heal"] == SMALL_HEAL and (run["perplexity"], run["pydoc_perplexity"]) == (60.0, 50.0)
    assert run["healing"] == {"settings": SMALL_HEAL, "before": {"perplexity": 90.0, "pydoc_perplexity": 80.0}}


def test_heal_settings_refuse_unknown_keys():
    with pytest.raises(ValueError, match="unknown heal settings: step"):
        bench.healed({"steps": []}, {"step": 24})
    settings = heal_runs.HealSettings.of(bench.HEAL_DISTILL_24)
    assert settings.arguments() == ["--steps", "24", "--lr", "3e-05", "--n-samples", "96", "--batch-size", "4",
                                    "--quiet", "--dtype", "float32", "--distill"]
    suite = dict(bench.SUITES["quality"])
    assert suite["modegpt-20-distill-24"]({})["heal"] == bench.HEAL_DISTILL_24
    taylor = suite["lord-taylor-0.4-distill-24"]({})
    assert taylor["steps"][0]["config"]["ratio"] == 0.4 and taylor["steps"][0]["config"]["rank_rule"] == "taylor"
    assert "heal" not in suite["lord-taylor-0.2"]({})


def synthetic_runs() -> list[dict]:
    lord = {"steps": [{"method": "lord", "config": {"ratio": 0.4, "whiten": "gram"}}]}
    int8 = {"steps": [{"method": "lord", "config": {"ratio": 0.2, "whiten": "gram", "factor_bits": 8}}]}
    return [
        {"name": "dense", "perplexity": 24.7775, "pydoc_perplexity": 13.08, "calibration_perplexity": 24.9,
         "bytes_on_disk": 538_090_408, "parameters": 134_515_008},
        {"name": "lord-gram-uniform-0.4", "recipe": lord, "perplexity": 155.96, "calibration_perplexity": 101.44,
         "bytes_on_disk": 367_688_416, "bits_per_weight_all": 19.158, "seconds": {"compression": 157.2}},
        {"name": "lord-taylor-0.4-distill-24", "recipe": {**lord, "heal": bench.HEAL_DISTILL_24},
         "perplexity": 53.272, "pydoc_perplexity": 309.653, "bytes_on_disk": 367_700_000,
         "bits_per_weight_all": 19.2, "seconds": {"compression": 600.4},
         "healing": {"before": {"perplexity": 67.935, "pydoc_perplexity": 458.84}, "heal_wall_seconds": 348.7}},
        {"name": "lord-gram-refit-half-0.2-int8", "recipe": int8, "perplexity": 51.0, "pydoc_perplexity": 430.0,
         "bytes_on_disk": 250_000_000, "bits_per_weight_all": 9.1, "seconds": {"compression": 700}},
        {"name": "broken", "error": "failed"},
    ]


def test_quality_table_columns_and_healed_rows(tmp_path, monkeypatch):
    lines = quality_table.table(synthetic_runs())
    assert lines[0] == quality_table.HEADER and lines[1].count("---") == 8
    rows = {line.split(" | ")[0].strip("| `"): line.split(" | ") for line in lines[2:]}
    assert list(rows) == ["dense", "lord-gram-refit-half-0.2-int8", "lord-gram-uniform-0.4",
                          "lord-taylor-0.4-distill-24"]  # dense, ratio 0.2, 0.4; the failed run left out
    assert rows["dense"][2:7] == ["24.78", "13.08", "24.90", "538.1", "—"]
    # an earlier run without pydoc: "—"; its bits per weight; the 0.4 group's best is the healed run's
    assert rows["lord-gram-uniform-0.4"][2:8] == ["155.96", "—", "101.44", "367.7", "19.16", "157 |"]
    healed = rows["lord-taylor-0.4-distill-24"]
    assert healed[1] == "`lord-taylor` at 0.4, healed"
    assert healed[2:5] == ["67.94 → **53.27**", "458.84 → 309.65", "—"]
    assert healed[7] == "600 + heal 349 |"
    assert rows["lord-gram-refit-half-0.2-int8"][2] == "**51.00**"
    page = tmp_path / "results.md"
    page.write_text("# R\n\n| other | table |\n|---|---|\n\n## Low-rank quality\n\ntext\n\n"
                    "| mechanism (LoRD gram) | 0.2 held-out |\n|---|---|\n| old | 1 |\n\nafter\n")
    monkeypatch.setattr(sys, "argv", ["quality_table.py", "--json", str(write_runs(tmp_path)), "--write", str(page)])
    quality_table.main()
    text = page.read_text()
    assert "| other | table |" in text and "| old | 1 |" not in text and text.endswith("\n\nafter\n")
    assert text.count(quality_table.HEADER) == 1 and "458.84 → 309.65" in text


def write_runs(folder: Path) -> Path:
    path = folder / "bench-quality.json"
    path.write_text(json.dumps({"heldout": {**bench.HELDOUT, "second_domain": bench.PYDOC},
                                "runs": synthetic_runs()}))
    return path


def test_plot_draws_healed_and_int8_runs(tmp_path):
    runs = [{**run, "suite": "quality"} for run in synthetic_runs() if "error" not in run]
    assert plot_bench.family(runs[3]) == "lord gram (int8 factors)" and plot_bench.family(runs[1]) == "lord gram"
    assert plot_bench.family({"recipe": {"peer": "llmcompressor", "bits": 4}}) == "llmcompressor gptq"
    assert plot_bench.healed_points(runs) == [(367.7, 67.935, 53.272)]
    write_runs(tmp_path)
    loaded, heldout = plot_bench.load_runs(tmp_path)
    assert [run["name"] for run in loaded] == [run["name"] for run in runs] and heldout["second_domain"]
    pytest.importorskip("matplotlib")
    png = plot_bench.write(tmp_path, tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
