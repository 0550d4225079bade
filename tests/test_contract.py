"""The contract holds a shape-changing method written outside the package: a compressor defined only in
this file acts on the MLP group ({gate, up, down}; OPT has no gate), keeps the first half of its channels,
and the result compresses, saves and reloads with identical logits. Also: the plan is compiled and
checked before any weight is read, and compression.json records the decisions."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from conftest import logits, run_steps
from torch import nn

from compressor import api, io
from compressor.config.configs import field
from compressor.contract import Compressor, Decision, Group, LayerContext, ModelView, Outcome
from compressor.errors import CompressorError
from compressor.methods import registry
from compressor.model import loading as models
from compressor.model.modules import dense_module
from compressor.plan import recipe as recipes
from compressor.stats.accumulators import Request


@dataclass
class HalveConfig:
    keep: float = field(0.5, "fraction of the MLP channels kept (the first ones)")


class HalveMLP(Compressor):
    """Keeps the first ``keep`` of the MLP channels: rows of gate/up, columns of down."""

    name = "halve-mlp"
    Config = HalveConfig
    group = "mlp"

    def requests(self) -> tuple[Request, ...]:
        return (Request("gram", role="down"),)  # only to check that roles reach the right module

    def decide(self, view: ModelView) -> Decision:
        return Decision({"groups_seen": len({view.layer_of(n) for n in view.shapes})})

    def compress(self, group: Group, ctx: LayerContext) -> dict[str, Outcome]:
        down = group.members["down"]
        assert group.stats[Request("gram", role="down")] is down.stats  # the down linear's input
        width = int(down.weight.shape[1] * self.config.keep)
        out = {}
        for role, target in group.members.items():
            weight = target.weight[:, :width] if role == "down" else target.weight[:width]
            bias = target.bias if role == "down" or target.bias is None else target.bias[:width]
            out[target.name] = Outcome(dense_module(weight.clone(), None if bias is None else bias.clone(),
                                                    target.dense_class), rank=width)
        return out


@pytest.fixture
def halve(monkeypatch):
    monkeypatch.setitem(registry.COMPRESSORS, HalveMLP.name, HalveMLP)
    return HalveMLP


def reference_mlp(arch: str, layer: nn.Module, x: torch.Tensor, width: int) -> torch.Tensor:
    """The MLP of ``layer`` with only its first ``width`` channels, computed by hand."""
    if arch == "opt":
        hidden = torch.relu(nn.functional.linear(x, layer.fc1.weight[:width], layer.fc1.bias[:width]))
        return nn.functional.linear(hidden, layer.fc2.weight[:, :width], layer.fc2.bias)
    mlp = layer.mlp
    hidden = nn.functional.silu(x @ mlp.gate_proj.weight[:width].T) * (x @ mlp.up_proj.weight[:width].T)
    return hidden @ mlp.down_proj.weight[:, :width].T


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_shape_changing_group_compresses_saves_and_reloads(arch, halve, model_dirs, small, ids, tmp_path):
    source = models.load(str(model_dirs[arch]))[0]
    recipe = recipes.load("lord", [*small, "steps.0.method=halve-mlp", "steps.0.config={keep: 0.5}"])
    summary = api.compress(str(model_dirs[arch]), recipe, tmp_path / "out", progress=False)
    model = summary["model"]
    layer_path = "model.layers" if arch == "llama" else "model.decoder.layers"
    for index, (before, after) in enumerate(zip(source.get_submodule(layer_path), model.get_submodule(layer_path))):
        x = torch.randn(3, 64)
        got = after.mlp(x) if arch == "llama" else after.fc2(torch.relu(after.fc1(x)))
        torch.testing.assert_close(got, reference_mlp(arch, before, x, 64), rtol=1e-5, atol=1e-6)
    reloaded = io.load(tmp_path / "out")
    assert torch.equal(logits(model, ids), logits(reloaded, ids))
    manifest = io.read_manifest(tmp_path / "out")
    down = f"{layer_path}.1.{'mlp.down_proj' if arch == 'llama' else 'fc2'}"
    assert manifest["modules"][down] == {"kind": "dense", "in_features": 64, "out_features": 64,
                                         "bias": arch == "opt", "dense_class": "Linear"}
    assert manifest["plan"][0]["decision"] == {"groups_seen": 2}
    log = [json.loads(line) for line in (tmp_path / "out" / io.LOG).read_text().splitlines()]
    assert len(log) == 2 * (3 if arch == "llama" else 2)
    errors = [e["rel_group_output_error"] for e in log]
    assert all(0 < e < 2 for e in errors)  # measured on the group's output, not on a weight of a new shape
    assert models.parameter_count(model) < models.parameter_count(source)


def test_group_specs_follow_the_architecture(halve, tiny_model, arch):
    from compressor.plan.compile import compile_plan

    steps = [{"method": "halve-mlp"}]
    plan = compile_plan(recipes.parse({"steps": steps}), tiny_model)
    groups = plan.steps[0].groups
    assert [g.layer for g in groups] == [0, 1]
    roles = {"opt": {"up", "down"}, "gpt2": {"up", "down"}}.get(arch, {"gate", "up", "down"})
    assert all(set(g.members) == roles for g in groups)
    assert groups[0].block == (None if arch == "opt" else f"{plan.arch.layers_path}.0.mlp")
    ignored = compile_plan(recipes.parse({"steps": [{"method": "halve-mlp", "ignore": ["re:\\.1\\."]}]}), tiny_model)
    assert [g.layer for g in ignored.steps[0].groups] == [0]  # a group needs all of its members targeted


def test_plan_fails_before_any_weight_is_read(model_dirs, small, tmp_path, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("weights were read before the plan was checked")

    monkeypatch.setattr(models, "load", no_load)
    recipe = recipes.load("lord", [*small, "lord.ratio=null", "lord.rank=999"])
    with pytest.raises(CompressorError, match="rank 999 is larger than min"):
        api.compress(str(model_dirs["llama"]), recipe, tmp_path / "out", progress=False)
    recipe = recipes.load("rtn-w4-eora-r64", [*small, "eora.rank=65"])
    with pytest.raises(CompressorError, match="step 1 \\(eora\\): rank 65 is larger"):
        api.compress(str(model_dirs["llama"]), recipe, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_manifest_records_decisions(model_dirs, small, tmp_path):
    recipe = recipes.load("lord", [*small, "lord.ratio=null", "lord.model_ratio=0.05"])
    api.compress(str(model_dirs["llama"]), recipe, tmp_path / "out", progress=False)
    manifest = io.read_manifest(tmp_path / "out")
    step = manifest["plan"][0]
    decision = step["decision"]
    assert recipes.parse(manifest["recipe"]).steps[0].config["model_ratio"] == 0.05  # parses back
    assert decision["rank_rule"] == "uniform" and decision["rule"] == "model_ratio"
    assert 0 < decision["solved_ratio"] < 1
    log = [json.loads(line) for line in (tmp_path / "out" / io.LOG).read_text().splitlines()]
    assert decision["ranks"] == {e["name"]: e["rank"] for e in log if e["rank"] is not None} | {
        e["name"]: decision["ranks"][e["name"]] for e in log if e["rank"] is None}
    assert len(decision["ranks"]) == 14
    assert {k: step[k] for k in ("targets", "groups", "group", "stream")} == {
        "targets": 14, "groups": 14, "group": "linear", "stream": "default"}


def test_block_replacement_swaps_the_whole_block(monkeypatch, llama, batches, ids):
    """A step may return one module for a whole block: here the MLP by a zero module, so each layer is
    attention only; the logits equal those of the model with its MLPs zeroed by hand."""

    class Zero(nn.Module):
        def forward(self, x):
            return torch.zeros_like(x)

    class DropMLP(HalveMLP):
        name = "drop-mlp"

        def requests(self):
            return ()

        def compress(self, group, ctx):
            return {group.name: Outcome(Zero())}

    monkeypatch.setitem(registry.COMPRESSORS, DropMLP.name, DropMLP)
    expected = __import__("conftest").build_model("llama", llama.config.vocab_size)
    for layer in expected.model.layers:
        layer.mlp.down_proj.weight.data.zero_()
    report = run_steps(llama, [{"method": "drop-mlp"}], batches)
    assert [e["name"] for e in report.log][-1] == "model.layers.1.mlp"
    assert isinstance(llama.model.layers[0].mlp, Zero)
    torch.testing.assert_close(logits(llama, ids), logits(expected, ids))
