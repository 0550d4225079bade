"""Outputs load with ``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)`` where compressor is
not installed: the ``modeling_compressor.py`` they carry rebuilds every compressed kind with the logits of
``compressor.load``, and stock loaders still refuse marked outputs without the flag."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_config, logits, run_steps, small_recipe

from compressor import api, io
from compressor.io import serving
from compressor.plan import recipe as recipes
from compressor.portable import modeling_compressor

# name → (arch, recipe steps); MoDeGPT's recipes propagate the original stream from one set of statistics
QUANTIZE_EORA = [{"method": "quantize", "config": {"bits": 4, "group_size": 32}},
                 {"method": "eora", "config": {"rank": 4, "space": "weight"}}]
QUANTIZE_48 = [{"method": "quantize", "config": {"bits": 3, "group_size": 48}}]  # compressed-tensors cannot
MODEGPT = [{"method": "modegpt", "config": {"ratio": 0.3}}]
OUTPUTS = {
    "lord-llama": ("llama", [{"method": "lord", "config": {"ratio": 0.3}}]),
    "lord-opt": ("opt", [{"method": "lord", "config": {"ratio": 0.3}}]),
    "lord8-llama": ("llama", [{"method": "lord", "config": {"ratio": 0.3, "factor_bits": 8}}]),
    "lord8-gpt2": ("gpt2", [{"method": "lord", "config": {"ratio": 0.3, "factor_bits": 8}}]),
    "quantize-eora-llama": ("llama", QUANTIZE_EORA),
    "quantize-eora-gpt2": ("gpt2", QUANTIZE_EORA),
    "quantize-48-qwen2": ("qwen2", QUANTIZE_48),
    "modegpt-llama": ("llama", MODEGPT),
    "modegpt-mistral": ("mistral", MODEGPT),
    "modegpt-opt": ("opt", MODEGPT),
    "modegpt-gpt2": ("gpt2", MODEGPT),
    "lqlora-llama": ("llama", [{"method": "lqlora", "config": {"rank": 4, "block_size": [32], "iterations": 10,
                                                               "error_cache": "off"}}]),
    "lqlora-nf-gpt2": ("gpt2", [{"method": "lqlora", "config": {"budget": None, "rank": 0, "bits": [3],
                                                                "block_size": [16]}}]),
}
CUR_ARCHS = ("llama", "gpt2")  # CURing never touches the first or last layer: built on 4-layer models

# Runs where compressor cannot be imported: no editable finder, no path to the repository, cwd elsewhere.
WITHOUT_COMPRESSOR = """
import json, sys
sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in str(getattr(f, '__module__', '')).lower()]
sys.path[:] = [p for p in sys.path if '__editable__' not in p and 'serve-wt' not in p]
try:
    import compressor
except ModuleNotFoundError:
    pass
else:
    raise SystemExit(f"compressor is importable from {compressor.__file__}")
import torch
from transformers import AutoModelForCausalLM

folders, ids, out = json.loads(sys.argv[1]), torch.load(sys.argv[2]), sys.argv[3]
result = {}
for name, folder in folders.items():
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    kinds = sorted({type(m).__name__ for m in model.modules() if type(m).__module__.startswith('transformers_modules')})
    with torch.no_grad():
        result[name] = {"logits": model(input_ids=ids, use_cache=False).logits.float(), "kinds": kinds,
                        "class": type(model).__module__ + "." + type(model).__name__,
                        "generated": model.generate(ids[:1, :8], max_new_tokens=6, do_sample=False)}
torch.save(result, out)
"""


def write_cur_output(arch: str, vocab_size: int, batches: list[torch.Tensor], out: Path) -> None:
    from transformers import AutoModelForCausalLM

    config = build_config(arch, vocab_size)
    config.num_hidden_layers = 4
    if arch == "gpt2":
        config.n_layer = 4
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    run_steps(model, [{"method": "curing", "config": {"n_layers": 2, "max_rank": 8}}], batches)
    io.save(model, None, out, {"params_before": 0}, [])


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, model_dirs, small_text, vocab_size, batches) -> dict[str, Path]:
    """name → an output directory of each kind."""
    root = tmp_path_factory.mktemp("remote")
    folders = {}
    for name, (arch, steps) in OUTPUTS.items():
        data = {"steps": steps}
        if steps is MODEGPT:
            data.update(propagate="original", statistics="once")
        recipe = small_recipe(data, small_text) if steps is not QUANTIZE_48 else recipes.parse(data)
        api.compress(str(model_dirs[arch]), recipe, root / name, progress=False)
        folders[name] = root / name
    for arch in CUR_ARCHS:
        write_cur_output(arch, vocab_size, batches, root / f"cur-{arch}")
        folders[f"cur-{arch}"] = root / f"cur-{arch}"
    return folders


@pytest.fixture(scope="module")
def remote(outputs, ids, tmp_path_factory) -> dict[str, dict]:
    """name → what ``from_pretrained(out, trust_remote_code=True)`` gave in a process without compressor."""
    work = tmp_path_factory.mktemp("no-compressor")
    torch.save(ids, work / "ids.pt")
    (work / "load.py").write_text(WITHOUT_COMPRESSOR)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(work / "modules"), HF_HUB_OFFLINE="1")
    folders = json.dumps({name: str(path) for name, path in outputs.items()})
    run = subprocess.run([sys.executable, str(work / "load.py"), folders, str(work / "ids.pt"), str(work / "out.pt")],
                         capture_output=True, text=True, cwd=work, env=env, stdin=subprocess.DEVNULL, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(work / "out.pt")


EXPECTED_KINDS = {"lord": ["LowRankLinear"], "lord8": ["LowRankLinear", "QuantizedLinear"],
                  "cur": ["CURLinear"], "quantize-eora": ["CompensatedLinear",
                  "LowRankLinear", "QuantizedLinear"], "quantize-48": ["QuantizedLinear"],
                  "modegpt": ["ShrunkAttention"], "lqlora": ["CompensatedLinear", "LowRankLinear", "NormalFloatLinear"],
                  "lqlora-nf": ["NormalFloatLinear"]}


@pytest.mark.parametrize("name", [*OUTPUTS, *(f"cur-{arch}" for arch in CUR_ARCHS)])
def test_trust_remote_code_without_compressor_gives_compressor_load_logits(name, outputs, remote, ids):
    ours = io.load(outputs[name])
    got = remote[name]
    assert torch.equal(got["logits"], logits(ours, ids)), (got["logits"] - logits(ours, ids)).abs().max()
    assert got["class"] == f"{type(ours).__module__}.{type(ours).__name__}"  # the family's stock class
    assert got["kinds"] == EXPECTED_KINDS[name.rsplit("-", 1)[0]]  # the modules came from the shipped file
    with torch.no_grad():
        generated = ours.generate(ids[:1, :8], max_new_tokens=6, do_sample=False)
    assert torch.equal(got["generated"], generated)  # the KV cache path too


def test_the_shipped_file_is_the_package_module_and_config_names_it(outputs):
    source = Path(modeling_compressor.__file__).read_bytes()
    for name, folder in outputs.items():
        assert (folder / serving.REMOTE_CODE).read_bytes() == source, name
        config = json.loads((folder / "config.json").read_text())
        manifest = io.read_manifest(folder)
        assert config["compressor"]["modules"] == manifest["modules"]
        assert config["auto_map"]["AutoModelForCausalLM"] == serving.AUTO_MODEL
        marked = config["model_type"].startswith("compressor-")
        assert marked == (not manifest["serving"]["stock_transformers"]) == ("AutoConfig" in config["auto_map"])
    assert not json.loads((outputs["quantize-eora-llama"] / "config.json").read_text())["model_type"].startswith(
        "compressor-")  # compressed-tensors describes it: stock transformers + peft load it without the flag


@pytest.mark.parametrize("name", ["lord-llama", "modegpt-gpt2", "cur-llama", "quantize-48-qwen2", "lqlora-llama"])
def test_stock_transformers_still_refuses_marked_outputs_without_the_flag(name, outputs):
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(outputs[name])
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(outputs[name], trust_remote_code=False)


def test_merged_output_is_plain(tmp_path, model_dirs, small_text):
    recipe = small_recipe({"steps": [{"method": "lord", "config": {"ratio": 0.3}}]}, small_text)
    api.compress(str(model_dirs["llama"]), recipe, tmp_path / "out", merge=True, progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config and "compressor" not in config
    assert not (tmp_path / "out" / serving.REMOTE_CODE).exists()


def test_compressor_load_strips_the_loader_entries_from_the_config(outputs):
    config = io.load(outputs["lord-llama"]).config
    assert config.model_type == "llama"
    assert not hasattr(config, "auto_map") and not hasattr(config, "compressor")


def test_outputs_written_before_the_remote_code_still_load(outputs, ids, tmp_path):
    """Format-1 outputs had no modeling file, no auto_map and, when marked, a ``compressor`` entry without specs."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(outputs["modegpt-llama"], old)
    (old / serving.REMOTE_CODE).unlink()
    config = json.loads((old / "config.json").read_text())
    del config["auto_map"], config["compressor"]["modules"], config["compressor"]["adapter"]
    (old / "config.json").write_text(json.dumps(config))
    assert torch.equal(logits(io.load(old), ids), logits(io.load(outputs["modegpt-llama"]), ids))
