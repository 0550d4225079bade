"""A recipe's ``heal:`` section: ``compressor compress`` heals the compressed output before placing it at
``--out`` (the same tensors as ``compress`` then ``heal`` by hand), records both in the manifest, leaves no work
folder behind, places nothing when the heal fails, and refuses what a heal cannot follow in one line."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_model, output_tensors
from typer.testing import CliRunner

import compressor
from compressor import api, io
from compressor import run as runs
from compressor.cli import app
from compressor.errors import CompressorError
from compressor.heal import heal
from compressor.plan import recipe as recipes

HEAL = {"distill": True, "steps": 3, "lr": 3e-3, "n_samples": 8, "batch_size": 4, "held_out": 2}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("recipe-heal") / "llama"
    build_model("llama", len(tokenizer), layers=2).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def recipe_file(tmp_path, small_text):
    def write(heal: dict | None = HEAL) -> str:
        data = {"calibration": {"dataset": small_text, "n_samples": 4, "seq_len": 32, "batch_size": 2},
                "steps": [{"method": "lord", "config": {"ratio": 0.3, "whiten": "gram"}}]}
        if heal is not None:
            data["heal"] = heal
        path = tmp_path / "recipe.json"  # JSON is YAML
        path.write_text(json.dumps(data))
        return str(path)
    return write


def test_a_healing_recipe_equals_compress_then_heal(llama_dir, recipe_file, tmp_path):
    out = tmp_path / "out"
    summary = compressor.compress(str(llama_dir), recipe_file(), out, progress=False)
    assert summary["out"] == str(out) and summary["healing"]["steps"] == 3 and summary["healing"]["loss"] == "distill"
    assert summary["seconds"]["heal"] == summary["healing"]["seconds"] > 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []  # the work folder is gone
    by_hand = tmp_path / "by-hand"
    api.compress(str(llama_dir), recipe_file(None), by_hand / "compressed", progress=False)
    heal(by_hand / "compressed", by_hand / "healed", **HEAL)
    ours, theirs = output_tensors(out), output_tensors(by_hand / "healed")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours)
    unhealed = output_tensors(by_hand / "compressed")
    assert any(not torch.equal(ours[key], unhealed[key]) for key in ours)  # the heal moved the small parts
    manifest = json.loads((out / io.MANIFEST).read_text())
    assert manifest["recipe"]["heal"]["steps"] == 3 and len(manifest["healing"]) == 1
    # a recipe without the section records none (the manifests of every other recipe are unchanged)
    assert "heal" not in json.loads((by_hand / "compressed" / io.MANIFEST).read_text())["recipe"]
    reloaded = io.load(out)
    assert sum(p.numel() for p in reloaded.parameters()) == summary["params_after"]


def test_a_failed_heal_places_nothing(llama_dir, recipe_file, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise CompressorError("the heal failed")
    monkeypatch.setattr(runs.healing, "heal", fail)
    with pytest.raises(CompressorError, match="the heal failed"):
        runs.compress(str(llama_dir), recipe_file(), tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.json"]


@pytest.mark.parametrize("options, heal_section, match", [
    ({"merge": True}, HEAL, "--merge: this recipe heals"),
    ({"resume": True}, HEAL, "--resume: a recipe with a heal"),
    ({}, {"steps": 2, "tokens": 64}, "set steps or tokens, not both"),
    ({}, {"stepz": 2}, "heal: unknown key 'stepz'"),
    ({}, {"lr": 0}, "lr must be > 0"),
    ({}, {"dataset": "no-such-source"}, "no-such-source"),
])
def test_refusals_are_one_line_before_any_work(options, heal_section, match, llama_dir, recipe_file, tmp_path):
    with pytest.raises(CompressorError, match=match) as caught:
        runs.compress(str(llama_dir), recipe_file(heal_section), tmp_path / "out", progress=False, **options)
    assert "\n" not in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.json"]


def test_overrides_and_dry_run(llama_dir, recipe_file, tmp_path):
    assert recipes.load(recipe_file(), ["heal.steps=7", "heal.distill=false"]).heal.steps == 7
    assert recipes.load(recipe_file(None), ["heal.steps=5"]).heal == recipes.HealConfig(steps=5)
    args = ["compress", str(llama_dir), "--recipe", recipe_file(), "--out", str(tmp_path / "out"), "--dry-run"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "250", "HF_HUB_OFFLINE": "1"})
    assert result.exit_code == 0, result.output
    assert "then heal: 3 steps of 4 windows, lr 0.003, distilled from the base model" in result.output
    assert not (tmp_path / "out").exists()


def test_cli_reports_the_heal(llama_dir, recipe_file, tmp_path):
    args = ["compress", str(llama_dir), "--recipe", recipe_file(), "--out", str(tmp_path / "out"), "--quiet"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "250", "HF_HUB_OFFLINE": "1"})
    assert result.exit_code == 0, result.output
    assert "healed (distill): 3 steps, 384 tokens" in result.output
