"""Recipes: parsing, unknown keys, dotted overrides, shipped recipes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml
from conftest import VOCAB, build_config
from transformers import AutoModelForCausalLM

from compressor.errors import CompressorError
from compressor.methods.lord import LoRDConfig
from compressor.plan import recipe as recipes
from compressor.plan.compile import compile_plan


def write(tmp_path, data, name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(path)


BASE = {"calibration": {"n_samples": 16},
        "steps": [{"method": "lord", "config": {"ratio": 0.2, "whiten": "gram"}}]}


@pytest.fixture(scope="module")
def skeleton():
    """A tiny OPT on the meta device: module names and shapes, no weights (what a plan is compiled against).
    Every decoder linear of it has min(out, in) = 64, so the explicit ranks below (≤ 64) fit."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(build_config("opt", VOCAB), dtype=torch.float32)


def build_steps(recipe, model):
    """The compiled steps of ``recipe`` on ``model`` (what ``api.build_steps`` was)."""
    return compile_plan(recipe, model).steps


def test_shipped_lord_loads_by_name():
    assert {"lord", "lord-plain"} <= set(recipes.shipped())
    r = recipes.load("lord")
    assert r.propagate == "compressed"
    assert r.calibration.dataset == "sotu" and r.calibration.n_samples == 32 and r.calibration.seq_len == 512
    assert len(r.steps) == 1 and r.steps[0].method == "lord"
    assert r.steps[0].config == {"ratio": 0.2, "whiten": "gram", "refit": "outputs", "refit_strength": 0.5}
    assert recipes.load("lord-svd-llm").steps[0].config == {"ratio": 0.2, "whiten": "gram"}
    assert r.steps[0].targets == [] and r.steps[0].ignore == []
    plain = recipes.load("lord-plain")
    assert plain.steps[0].config["whiten"] == "none"
    assert plain.calibration.n_samples == 32  # defaults filled


def test_recipe_from_path(tmp_path):
    r = recipes.load(write(tmp_path, BASE))
    assert r.calibration.n_samples == 16 and r.calibration.seq_len == 512


@pytest.mark.parametrize("data, where, key", [
    ({**BASE, "propogate": "original"}, "recipe", "propogate"),
    ({**BASE, "calibration": {"n_sample": 4}}, "calibration", "n_sample"),
    ({"steps": [{"method": "lord", "target": ["q_proj"]}]}, "step 0", "target"),
])
def test_unknown_keys_are_readable_errors(tmp_path, data, where, key):
    with pytest.raises(CompressorError) as info:
        recipes.load(write(tmp_path, data))
    message = str(info.value)
    assert where in message and f"unknown key '{key}'" in message and "valid:" in message
    assert "\n" not in message


def test_unknown_method_config_key_lists_valid_keys(tmp_path, skeleton):
    r = recipes.load(write(tmp_path, {"steps": [{"method": "lord", "config": {"ration": 0.2}}]}))
    with pytest.raises(CompressorError) as info:
        build_steps(r, skeleton)
    message = str(info.value)
    assert "unknown key 'ration'" in message
    for valid in ("ratio", "rank", "rank_reduction", "model_ratio", "whiten", "alpha", "gram_root"):
        assert valid in message


def test_unknown_method(tmp_path, skeleton):
    r = recipes.load(write(tmp_path, {"steps": [{"method": "lords"}]}))
    with pytest.raises(CompressorError, match=r"unknown method 'lords' \(did you mean 'lord'\?\)"):
        build_steps(r, skeleton)


@pytest.mark.parametrize("data, match", [
    ({"steps": []}, "non-empty list"),
    ({"calibration": {}}, "non-empty list"),
    ({"steps": [{"config": {}}]}, "no 'method'"),
    ({"steps": ["lord"]}, "must be a mapping"),
    ({**BASE, "propagate": "sideways"}, "propagate must be one of compressed, original"),
    ({**BASE, "calibration": {"n_samples": 0}}, "n_samples must be ≥ 1"),
    ({**BASE, "calibration": {"n_samples": "many"}}, "n_samples must be int"),
    ("- just\n- a list\n", "mapping at the top level"),
    ("steps: [unclosed\n", "invalid YAML"),
])
def test_bad_recipes(tmp_path, data, match):
    with pytest.raises(CompressorError, match=match):
        recipes.load(write(tmp_path, data))


def test_bad_method_config_values(tmp_path, skeleton):
    for config, match in (({"whiten": "zca"}, "whiten must be one of"), ({"ratio": 1.5}, "ratio must be in"),
                          ({"ratio": 0.2, "rank": 8}, "set only one of")):
        r = recipes.load(write(tmp_path, {"steps": [{"method": "lord", "config": config}]}))
        with pytest.raises(CompressorError, match=match):
            build_steps(r, skeleton)


def test_missing_recipe_lists_shipped():
    with pytest.raises(CompressorError, match=r"recipe not found: 'no-such-recipe'.*lord"):
        recipes.load("no-such-recipe")
    with pytest.raises(CompressorError, match="recipe not found"):
        recipes.load("/nonexistent/dir/recipe.yaml")


def test_overrides(skeleton):
    r = recipes.load("lord-svd-llm", ["lord.ratio=0.4", "calibration.n_samples=8", "steps.0.config.whiten=none",
                              "propagate=original"])
    assert r.steps[0].config == {"ratio": 0.4, "whiten": "none"}
    assert r.calibration.n_samples == 8 and r.calibration.seq_len == 512
    assert r.propagate == "original"
    step = build_steps(r, skeleton)[0]
    assert step.compressor.config.ratio == 0.4 and step.compressor.config.whiten == "none"
    assert step.compressor.requests() == () and not step.compressor.uses_data


def test_override_values_are_yaml(skeleton):
    r = recipes.load("lord", ["lord.ratio=null", "lord.rank=12", "steps.0.targets=[q_proj, 're:mlp\\..*']",
                              "calibration.dataset=/tmp/some file.txt"])
    assert r.steps[0].config["rank"] == 12 and r.steps[0].config.get("ratio") is None
    assert r.steps[0].targets == ["q_proj", "re:mlp\\..*"]
    assert r.calibration.dataset == "/tmp/some file.txt"
    assert build_steps(r, skeleton)[0].compressor.config.rule == "rank"


def test_setting_one_rank_rule_replaces_the_recipes_other_rule(skeleton):
    r = recipes.load("lord", ["lord.rank=64"])  # the shipped recipe sets ratio: 0.2
    assert r.steps[0].config["rank"] == 64 and "ratio" not in r.steps[0].config
    assert build_steps(r, skeleton)[0].compressor.config.rule == "rank"
    r = recipes.load("lord", ["steps.0.config.rank_reduction=0.3"])
    assert build_steps(r, skeleton)[0].compressor.config.rule == "rank_reduction"


def test_overrides_do_not_touch_the_file(tmp_path):
    path = write(tmp_path, BASE)
    before = open(path).read()
    recipes.load(path, ["lord.ratio=0.5"])
    assert open(path).read() == before
    assert recipes.load(path).steps[0].config["ratio"] == 0.2


@pytest.mark.parametrize("assignment, match", [
    ("lord.ratio", "expected KEY=VALUE"),
    ("steps.3.config.ratio=0.1", "no step '3'"),
    ("propagate.x=1", "cannot set 'x' here"),
    ("propagate.x.y=1", "propagate is not a mapping"),
])
def test_bad_overrides(assignment, match):
    with pytest.raises(CompressorError, match=match):
        recipes.load("lord", [assignment])


def test_override_of_unknown_key_is_reported_with_valid_keys():
    with pytest.raises(CompressorError, match=r"unknown key 'n_sample'.*valid: batch_size, dataset"):
        recipes.load("lord", ["calibration.n_sample=8"])
    with pytest.raises(CompressorError, match=r"unknown key 'svd'"):
        recipes.load("lord", ["svd.ratio=0.4"])


def test_applied_recipe_fills_defaults(skeleton):
    r = recipes.load("lord-plain")
    plan = compile_plan(r, skeleton)
    data = plan.applied_recipe()
    config = data["steps"][0]["config"]
    assert set(config) == {f.name for f in dataclasses.fields(LoRDConfig)}  # every field, defaults included
    assert config["ratio"] == 0.2 and config["whiten"] == "none"
    assert config["alpha"] == 0.5 and config["gram_root"] == "cholesky" and config["svd_dtype"] == "float64"
    assert config["rank"] is None and config["rank_reduction"] is None and config["model_ratio"] is None
    assert data["calibration"] == {"dataset": "sotu", "n_samples": 32, "seq_len": 512, "seed": 0,
                                   "batch_size": 8}
    assert data["propagate"] == "compressed"
    # per step, what it resolved to on the model (no decision yet: decide runs on the loaded weights)
    resolved = {"method": "lord", "targets": 12, "groups": 12, "group": "linear", "stream": "default",
                "decision": None}  # OPT: 6 linears × 2
    assert plan.decisions() == [resolved]
    # the applied recipe is itself a valid recipe that builds the same steps
    again = recipes.parse(data)
    assert build_steps(again, skeleton)[0].compressor.config == build_steps(r, skeleton)[0].compressor.config
    assert compile_plan(again, skeleton).applied_recipe() == data


def test_override_values_are_read_by_the_declared_type():
    """``--set`` values follow the schema, not YAML's guesses: a str field keeps ``2:4`` (YAML: 124), an
    empty value is an error, a section takes a mapping but not a scalar."""
    data = {"steps": [{"method": "prune", "config": {"algorithm": "wanda"}}]}
    assert recipes.apply_override(data, "prune.pattern=2:4")["steps"][0]["config"]["pattern"] == "2:4"
    assert recipes.apply_override(data, "steps.0.targets=q_proj")["steps"][0]["targets"] == ["q_proj"]
    assert recipes.apply_override(data, "calibration={n_samples: 4}")["calibration"] == {"n_samples": 4}
    assert recipes.apply_override(data, "steps.0.calibration={seed: 3}")["steps"][0]["calibration"] == {"seed": 3}
    assert recipes.apply_override(data, "calibration.dataset=2:4")["calibration"]["dataset"] == "2:4"
    with pytest.raises(CompressorError, match="empty value"):
        recipes.apply_override(data, "prune.sparsity=")
    with pytest.raises(CompressorError, match="section"):
        recipes.apply_override(data, "calibration=5")
    with pytest.raises(CompressorError, match="expected an integer"):
        recipes.apply_override(data, "calibration.n_samples=many")
    with pytest.raises(CompressorError, match="set only one of"):
        recipes.load("lord", ["lord.rank=8", "lord.rank_reduction=0.5"])
