"""Hub ids end to end: ``compressor compress org/name`` reads a Hugging Face cache in the hub's own layout
(``models--org--name/refs/main``, ``snapshots/<commit>/`` links into ``blobs/``) with ``HF_HUB_OFFLINE=1``,
in a subprocess, as a user's machine would; the output loads and matches compressing the same files by path."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import SMALL_CALIBRATION, logits

from compressor import api, io
from compressor.io import model_card

ROOT = Path(__file__).resolve().parent.parent
REPO = "tiny-org/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(cache: Path, repo: str, files: Path) -> Path:
    """A cache holding ``files`` (a model directory) as ``repo`` at revision main, the way huggingface_hub
    writes it: each file's content once under blobs/<sha256>, linked from snapshots/<commit>/<name>."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / COMMIT
    (folder / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in sorted(files.iterdir()):
        data = file.read_bytes()
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(COMMIT)
    return snapshot


def test_compress_a_hub_id_from_the_cache_offline(tmp_path, model_dirs, calib_file, ids):
    home = tmp_path / "hf"
    snapshot = hub_cache(home / "hub", REPO, model_dirs["llama"])
    assert (snapshot / "model.safetensors").is_symlink() and (snapshot / "tokenizer.json").is_file()
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "COMPRESSOR_CACHE": str(tmp_path / "compressor-cache")}
    out = tmp_path / "out"
    overrides = [item for o in SMALL_CALIBRATION for item in ("--set", o)]
    run = subprocess.run([sys.executable, "-m", "compressor.cli", "compress", REPO, "--recipe", "lord",
                          "--calib-dataset", str(calib_file), *overrides, "--quiet", "--out", str(out)],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    assert run.stderr == "" and f"wrote {out}" in run.stdout

    manifest = io.read_manifest(out)
    assert manifest["base_model"] == REPO
    card = (out / model_card.CARD).read_text()
    assert model_card.read_header(card)["base_model"] == REPO
    # the same recipe on the same files given by path: the same model
    by_path = api.compress(str(model_dirs["llama"]), "lord", tmp_path / "by-path", progress=False,
                           overrides=[*SMALL_CALIBRATION, f"calibration.dataset={calib_file}"])["model"]
    loaded = io.load(out)
    torch.testing.assert_close(logits(loaded, ids), logits(by_path, ids), rtol=0, atol=0)
    assert json.loads((out / "config.json").read_text())["compressor"]["modules"]


def test_a_hub_id_missing_from_the_offline_cache_is_one_line(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "compressor.cli", "compress", "nobody/absent", "--recipe", "rtn-w4",
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=600)
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0] == (f"error: model 'nobody/absent' is not in the Hugging Face cache ({tmp_path / 'hub'}) and "
                        "HF_HUB_OFFLINE=1 forbids downloading it; download it once online, or set HF_HOME / "
                        "HF_HUB_CACHE to the cache that holds it")
    assert not (tmp_path / "out").exists()
