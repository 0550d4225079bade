"""EoRA: the factors against a direct transcription of methods.md §4.1, EoRA vs plain-SVD compensation on
the calibration inputs, rank-deficient Grams, the compensated module, and chained recipes."""

from __future__ import annotations

import pytest
import torch
from conftest import logits, small_recipe
from test_quantize import correlated_inputs, output_error

from compressor import api, io
from compressor.kernels import quant
from compressor.methods.eora import EoRAConfig, eora_factors
from compressor.model.modules import CompensatedLinear, LowRankLinear, QuantizedLinear
from compressor.pipeline.compress import compress_model
from compressor.plan import recipe as recipes
from compressor.plan.compile import compile_plan, stream_name
from compressor.stats.hooks import Collector, Watch
from compressor.walk import layers as walk_layers
from compressor.walk.layers import DEFAULT_STREAM


def reference_eora(residual: torch.Tensor, gram: torch.Tensor, rank: int) -> torch.Tensor:
    """B A of methods.md §4.1, written out (fp64, no eigenvalue dropped on a well-conditioned Gram)."""
    evals, evecs = torch.linalg.eigh(gram.double())
    s = evecs @ torch.diag(evals.sqrt())
    s_inv = torch.diag(evals.rsqrt()) @ evecs.T
    u, sigma, vh = torch.linalg.svd(residual.double() @ s, full_matrices=False)
    b = u[:, :rank] @ torch.diag(sigma[:rank].sqrt())
    a = torch.diag(sigma[:rank].sqrt()) @ vh[:rank] @ s_inv
    return b @ a


def quantized_residual(weight, bits=3, group_size=16):
    q, scale, zero_point = quant.rtn(weight, bits, False, group_size)
    return weight - quant.dequantize(q, scale, zero_point, group_size)


def test_factors_match_the_reference_formula():
    torch.manual_seed(0)
    weight = torch.randn(40, 48)
    x = correlated_inputs(400, 48)
    residual = quantized_residual(weight)
    gram = x.double().T @ x.double()
    up, down = eora_factors(residual, 8, gram, cutoff=0.0)  # keep every eigenvalue, as the formula does
    assert up.shape == (40, 8) and down.shape == (8, 48)
    torch.testing.assert_close(up @ down, reference_eora(residual, gram, 8), atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("rank", [4, 8, 16])
def test_eora_beats_plain_svd_on_the_calibration_inputs(rank):
    torch.manual_seed(1)
    weight = torch.randn(64, 96)
    x = correlated_inputs(600, 96, seed=1)
    residual = quantized_residual(weight)
    gram = x.double().T @ x.double()
    eigen_up, eigen_down = eora_factors(residual, rank, gram)
    plain_up, plain_down = eora_factors(residual, rank, None)
    compressed = weight - residual
    eigen = output_error(weight, compressed + (eigen_up @ eigen_down).float(), x)
    plain = output_error(weight, compressed + (plain_up @ plain_down).float(), x)
    assert eigen <= plain * (1 + 1e-6)
    assert eigen < output_error(weight, compressed, x)
    # the plain SVD is the best rank-r approximation of ΔW itself
    assert torch.linalg.matrix_norm(residual - (plain_up @ plain_down).float()) <= \
        torch.linalg.matrix_norm(residual - (eigen_up @ eigen_down).float()) * (1 + 1e-6)


def test_rank_deficient_gram_gives_finite_factors():
    """Fewer tokens than input channels: dropped eigenvalues get a zero inverse (no huge outliers)."""
    torch.manual_seed(2)
    weight = torch.randn(32, 64)
    x = correlated_inputs(20, 64)  # rank 20 < 64
    x[:, 3] = 0  # a dead channel
    residual = quantized_residual(weight)
    up, down = eora_factors(residual, 8, x.double().T @ x.double())
    assert torch.isfinite(up).all() and torch.isfinite(down).all()
    assert float(down.abs().max()) < 1e3 * float(residual.abs().max())
    compressed = weight - residual
    assert output_error(weight, compressed + (up @ down).float(), x) < output_error(weight, compressed, x)


def test_config_checks():
    with pytest.raises(ValueError):
        EoRAConfig(rank=0)
    with pytest.raises(ValueError):
        EoRAConfig(cutoff=2.0)


def test_compensated_module_forward_and_reload():
    torch.manual_seed(3)
    weight, bias = torch.randn(24, 32), torch.randn(24)
    base = QuantizedLinear.from_integers(*quant.rtn(weight, 4, False, 16), 4, 16, False, bias)
    lora = LowRankLinear.from_factors(torch.randn(24, 4), torch.randn(4, 32), None)
    module = CompensatedLinear(base, lora)
    x = torch.randn(3, 32)
    torch.testing.assert_close(module(x), base(x) + lora(x))
    torch.testing.assert_close(module.dense_weight(), base.dense_weight() + lora.dense_weight())
    assert module.bias is base.bias and (module.out_features, module.in_features) == (24, 32)
    rebuilt = CompensatedLinear.empty(**module.spec())
    rebuilt.load_state_dict(module.state_dict())
    assert torch.equal(rebuilt(x), module(x))
    dense_base = CompensatedLinear(torch.nn.Linear(32, 24), lora)  # a pruned, still dense base
    again = CompensatedLinear.empty(**dense_base.spec())
    again.load_state_dict(dense_base.state_dict())
    assert torch.equal(again(x), dense_base(x))


def input_grams(model: torch.nn.Module, names, batches) -> dict[str, torch.Tensor]:
    """name → Gram of the linear's input over ``batches``, from plain forwards of the whole model."""
    linears = {n: m for n, m in model.named_modules() if n in names}
    watches = [Watch(name, module, "input", frozenset({"gram"})) for name, module in linears.items()]
    with torch.no_grad(), Collector(watches) as collector:
        for batch in batches:
            model(input_ids=batch, use_cache=False)
    return {name: stats.gram for (name, _), stats in collector.result().items()}


def chain(text: str, space: str = "eigen", rank: int = 8, statistics: str = "once",
          algorithm: str = "rtn") -> recipes.Recipe:
    return small_recipe({"propagate": "original", "statistics": statistics, "steps": [
        {"method": "quantize", "config": {"algorithm": algorithm, "bits": 3, "group_size": 32}},
        {"method": "eora", "config": {"rank": rank, "space": space}},
    ]}, text)


def test_chained_recipe_save_load_identical_logits(tmp_path, arch, model_dir, ids, small_text):
    summary = api.compress(str(model_dir), chain(small_text), tmp_path / "out", progress=False)
    model = summary["model"]
    compensated = [m for m in model.modules() if isinstance(m, CompensatedLinear)]
    assert compensated and all(isinstance(m.base, QuantizedLinear) for m in compensated)
    manifest = io.read_manifest(tmp_path / "out")
    assert all(spec["kind"] == "compensated" for spec in manifest["modules"].values())
    assert torch.equal(logits(model, ids), logits(io.load(tmp_path / "out"), ids))


def test_compensation_reduces_the_logged_output_error(tmp_path, model_dirs, small_text):
    summary = api.compress(str(model_dirs["llama"]), chain(small_text, rank=16), tmp_path / "out",
                           progress=False)
    log = [line for line in (tmp_path / "out" / io.LOG).read_text().splitlines()]
    import json

    entries = [json.loads(line) for line in log]
    quantized = {e["name"]: e for e in entries if e["method"] == "quantize"}
    compensated = {e["name"]: e for e in entries if e["method"] == "eora"}
    assert set(quantized) == set(compensated)
    for name, entry in compensated.items():
        assert entry["rel_output_error"] < quantized[name]["rel_output_error"]
    assert summary["compressed"] == len(entries)


def test_statistics_once_is_one_pass_per_layer(monkeypatch, model_dirs, small_text, tmp_path):
    calls = []
    original_run_layer = walk_layers.run_layer  # what every Visit.forward calls

    def counting(layer, *args, **kwargs):
        calls.append(layer)
        return original_run_layer(layer, *args, **kwargs)

    monkeypatch.setattr(walk_layers, "run_layer", counting)
    for statistics, per_layer in (("once", 1), ("per_step", 2)):
        calls.clear()
        api.compress(str(model_dirs["llama"]), chain(small_text, statistics=statistics, algorithm="gptq"),
                     tmp_path / statistics, progress=False)
        assert len(calls) == 2 * per_layer  # 2 layers; propagate: original reuses the first pass's outputs


def test_statistics_once_gives_eora_the_original_layers_gram(model_dirs, small_text, monkeypatch):
    """With ``once`` the EoRA step sees the same Gram as a lone EoRA-less pass on the original model."""
    from compressor.calibration import calibration_windows
    from compressor.methods.eora import EoRA
    from compressor.model import loading as models

    seen = {}
    original_compress = EoRA.compress

    def spy(self, group, ctx):
        seen[group.target.name] = group.target.stats.gram.clone()
        return original_compress(self, group, ctx)

    model, tokenizer = models.load(str(model_dirs["llama"]))
    windows = calibration_windows(small_text, tokenizer, 4, 32, 0)
    recipe = chain(small_text)  # propagate: original, statistics: once
    plan = compile_plan(recipe, model)
    monkeypatch.setattr(EoRA, "compress", spy)
    compress_model(model, plan, {DEFAULT_STREAM: list(windows.split(2))}, device=torch.device("cpu"))
    monkeypatch.undo()
    assert seen
    reference, _ = models.load(str(model_dirs["llama"]))
    grams = input_grams(reference, seen, windows.split(2))
    assert set(grams) == set(seen)
    for name, gram in grams.items():
        torch.testing.assert_close(seen[name], gram, rtol=1e-4, atol=1e-3)


def test_eora_calibrates_on_its_own_dataset(model_dirs, tmp_path, small_text):
    """A step's ``calibration`` gives it its own stream: EoRA's Gram comes from its set, GPTQ's from the
    recipe's."""
    from compressor.calibration import calibration_windows
    from compressor.methods.eora import EoRA
    from compressor.methods.quantize import Quantize
    from compressor.model import loading as models

    task = tmp_path / "task.txt"
    task.write_text(" ".join(["The budget, the deficit and the army."] * 400))
    recipe = chain(small_text, algorithm="gptq")
    recipe.steps[1].calibration = {"dataset": str(task), "n_samples": 3}
    assert stream_name(recipe, 0) == DEFAULT_STREAM != stream_name(recipe, 1)
    seen: dict[str, dict] = {"eora": {}, "quantize": {}}
    originals = {cls: cls.compress for cls in (EoRA, Quantize)}

    def spy(cls, key):
        def compress(self, group, ctx):
            target = group.target
            seen[key][target.name] = (target.stats.gram.clone(), target.stats.n_tokens)
            return originals[cls](self, group, ctx)
        return compress

    EoRA.compress, Quantize.compress = spy(EoRA, "eora"), spy(Quantize, "quantize")
    try:
        api.compress(str(model_dirs["llama"]), recipe, tmp_path / "out", progress=False)
    finally:
        EoRA.compress, Quantize.compress = originals[EoRA], originals[Quantize]
    model, tokenizer = models.load(str(model_dirs["llama"]))
    for key, text, n_samples in (("eora", str(task), 3), ("quantize", small_text, 4)):
        windows = calibration_windows(text, tokenizer, n_samples, 32, 0)
        assert seen[key]
        grams = input_grams(model, seen[key], windows.split(2))
        assert set(grams) == set(seen[key])
        for name, gram in grams.items():
            assert seen[key][name][1] == n_samples * 32
            torch.testing.assert_close(seen[key][name][0], gram, rtol=1e-4, atol=1e-3)


def test_step_calibration_is_checked():
    from compressor.errors import CompressorError

    with pytest.raises(CompressorError, match="step 1 calibration"):
        recipes.parse({"steps": [{"method": "quantize"}, {"method": "eora", "calibration": {"bogus": 1}}]})
    recipe = recipes.parse({"steps": [{"method": "quantize"},
                                      {"method": "eora", "calibration": {"seed": 0}}]})
    assert stream_name(recipe, 1) == DEFAULT_STREAM  # the same set as the recipe's: one stream


def test_modules_reading_one_input_share_one_eigendecomposition(model_dirs, small_text, ids, monkeypatch):
    """q/k/v and gate/up read the same input: one eigh of its Gram per input serves them, and the model
    is the one per-module eigendecompositions give."""
    from compressor.calibration import calibration_windows
    from compressor.contract import LayerContext
    from compressor.kernels import linalg
    from compressor.model import loading as models

    calls = []
    original_eigh = linalg.eigh

    def counting(gram, cutoff=None):
        calls.append(gram.shape[0])
        return original_eigh(gram, cutoff)

    monkeypatch.setattr(linalg, "eigh", counting)

    def walked() -> torch.nn.Module:
        model, tokenizer = models.load(str(model_dirs["llama"]))
        windows = calibration_windows(small_text, tokenizer, 4, 32, 0)
        plan = compile_plan(chain(small_text), model)  # propagate: original, statistics: once
        compress_model(model, plan, {DEFAULT_STREAM: list(windows.split(2))}, device=torch.device("cpu"))
        return model

    shared = walked()
    n_layers = len(shared.model.layers)
    assert len(calls) == 4 * n_layers  # per layer: the q/k/v, o, gate/up and down inputs
    calls.clear()
    # no memo shared between a layer's groups: one eigh per module
    monkeypatch.setattr(LayerContext, "per_input", lambda self, owner, target, compute: compute(target))
    separate = walked()
    assert len(calls) == 7 * n_layers
    torch.testing.assert_close(logits(shared, ids), logits(separate, ids), rtol=0, atol=0)
