"""``compressor heal``: a short fine-tune of an output's small parts lowers the training loss on a tiny Llama for
each method with small parts (lord, modegpt, curing, eora over rtn, lqlora), keeps the output's format (the same
tensors, shapes, dtypes; the frozen ones byte for byte), reloads with identical logits (``compressor.load`` and
``trust_remote_code``), records the run in the manifest; its windows are disjoint from the compression's; and
the outputs it cannot heal are refused in one line."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_model, logits, output_tensors
from typer.testing import CliRunner

from compressor import calibration, io
from compressor.api import compress
from compressor.cli import app
from compressor.errors import CompressorError
from compressor.heal import compression_spans, heal
from compressor.plan import recipe as recipes

STEPS = {  # method → the recipe's steps for a tiny 3-layer Llama (CURing never compresses the first and last)
    "lord": [{"method": "lord", "config": {"ratio": 0.3, "whiten": "gram"}}],
    "modegpt": [{"method": "modegpt", "config": {"ratio": 0.3}}],
    "curing": [{"method": "curing", "config": {"n_layers": 1, "max_rank": 8}}],
    "eora": [{"method": "quantize", "config": {"algorithm": "rtn", "bits": 3, "group_size": 32}},
             {"method": "eora", "config": {"rank": 4}}],
    "lqlora": [{"method": "lqlora", "config": {"budget": 3.0, "rank": 4, "bits": [2, 3, 4], "block_size": [32],
                                               "iterations": 10, "error_cache": "off"}}],
    "rtn": [{"method": "quantize", "config": {"algorithm": "rtn", "bits": 4, "group_size": 32}}],
}
LR = {"curing": 3e-2}  # CURing trains only U (r × r): a few hundred numbers, a larger step
SMALL = dict(n_samples=8, seq_len=32, batch_size=4, held_out=2, steps=6, lr=3e-3)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("heal") / "llama"
    build_model("llama", len(tokenizer), layers=3).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, llama_dir, small_text):
    """method → its compressed output of the tiny Llama (made on first use)."""
    root, made = tmp_path_factory.mktemp("outputs"), {}

    def output(method: str, merge: bool = False):
        key = (method, merge)
        if key not in made:
            recipe = recipes.parse({"calibration": {"dataset": small_text, "n_samples": 4, "seq_len": 32,
                                                    "batch_size": 2}, "steps": STEPS[method]})
            made[key] = root / f"{method}{'-merged' if merge else ''}"
            compress(str(llama_dir), recipe, made[key], progress=False, merge=merge)
        return made[key]
    return output


@pytest.mark.parametrize("method", ["lord", "modegpt", "curing", "eora", "lqlora"])
def test_heal_lowers_the_loss_and_keeps_the_format(method, outputs, tmp_path, ids):
    source = outputs(method)
    record = heal(source, tmp_path / "healed", **dict(SMALL, lr=LR.get(method, SMALL["lr"])))
    healed = tmp_path / "healed"
    assert record["loss_after"] < record["loss_before"]
    assert record["steps"] == 6 and record["tokens"] == 6 * 4 * 32 and record["trained"]["parameters"] > 0
    before, after = output_tensors(source), output_tensors(healed)
    assert before.keys() == after.keys()
    changed = [key for key in before if not torch.equal(before[key], after[key])]
    assert changed  # the small parts moved ...
    for key in before:  # ... every tensor keeps its shape and dtype, and the rest its bytes
        assert (before[key].shape, before[key].dtype) == (after[key].shape, after[key].dtype), key
    small = ("up.weight", "down.weight", "lora_A.weight", "lora_B.weight", ".U", "proj.weight")
    trained = [key for key in changed if not key.endswith(small)]
    assert not trained, f"frozen tensors changed: {trained}"
    old, new = io.read_manifest(source), io.read_manifest(healed)
    assert old["modules"] == new["modules"] and old["serving"] == new["serving"]
    assert new["healing"][-1]["loss_after"] == record["loss_after"]
    assert {"held_out_loss_before", "held_out_loss_after", "lr", "steps", "tokens"} <= set(new["healing"][-1])
    expected = logits(record["model"], ids)
    assert torch.equal(logits(io.load(healed), ids), expected)
    from transformers import AutoModelForCausalLM

    remote = AutoModelForCausalLM.from_pretrained(healed, trust_remote_code=True).eval()
    torch.testing.assert_close(logits(remote, ids), expected, rtol=1e-5, atol=1e-5)


def test_frozen_parts_are_not_trained(outputs, tmp_path):
    """LoRD's output: only up/down factors change (embeddings, norms, head byte for byte)."""
    before = output_tensors(outputs("lord"))
    heal(outputs("lord"), tmp_path / "healed", **SMALL)
    after = output_tensors(tmp_path / "healed")
    changed = {key.rsplit(".", 2)[-2] for key in before if not torch.equal(before[key], after[key])}
    assert changed == {"up", "down"}


def test_healing_twice_keeps_both_records_and_tokens_budget(outputs, tmp_path):
    first = tmp_path / "once"
    heal(outputs("lord"), first, **SMALL)
    record = heal(first, tmp_path / "twice", **dict(SMALL, steps=None, tokens=300))
    assert record["steps"] == 3  # ⌈300 / (4 × 32)⌉
    assert len(io.read_manifest(tmp_path / "twice")["healing"]) == 2


def test_windows_are_disjoint_from_the_compressions(outputs, tokenizer, small_text):
    manifest = io.read_manifest(outputs("lord"))
    ids = calibration.get(small_text).calibration_ids(tokenizer)  # (N,)
    used = calibration.get(small_text).calibration(tokenizer, 4, 32, 0)  # what compression calibrated on
    spans = compression_spans(manifest, small_text, ids.numel())
    assert [ids[s:e] for s, e in spans] and all(any(torch.equal(ids[s:e], w) for s, e in spans) for w in used)
    windows = calibration.disjoint_windows(ids, spans, 20, 32, seed=0)  # (20, 32)
    covered = torch.zeros(ids.numel(), dtype=torch.bool)
    for s, e in spans:
        covered[s:e] = True
    starts = [next(i for i in range(0, ids.numel() - 31, 32) if torch.equal(ids[i:i + 32], w)) for w in windows]
    assert len(set(starts)) == 20 and not any(covered[s:s + 32].any() for s in starts)
    with pytest.raises(CompressorError, match="fewer than the"):
        calibration.disjoint_windows(ids, spans, ids.numel(), 32, seed=0)


@pytest.mark.parametrize("case, match", [
    ("merged", "is a merged output"),
    ("dense", "is not a compressor output"),
    ("rtn", "stores nothing heal can train"),
    ("out_exists", "output directory is not empty"),
    ("both_budgets", "--steps and --tokens"),
    ("out_is_input", "holds the input"),
    ("bad_dtype", "--dtype"),
])
def test_refusals_are_one_line(case, match, outputs, llama_dir, tmp_path):
    out, options = tmp_path / "healed", dict(SMALL)
    source = {"merged": lambda: outputs("lord", merge=True), "dense": lambda: llama_dir,
              "rtn": lambda: outputs("rtn")}.get(case, lambda: outputs("lord"))()
    if case == "out_exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    if case == "both_budgets":
        options["tokens"] = 100
    if case == "out_is_input":
        out = source
    if case == "bad_dtype":
        options["dtype"] = "float16"
    with pytest.raises(CompressorError, match=match) as caught:
        heal(source, out, **options)
    assert "\n" not in str(caught.value)
    if case == "out_exists":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not (tmp_path / "healed").exists()


def test_cli(outputs, tmp_path):
    out = tmp_path / "healed"
    args = ["heal", str(outputs("lord")), "--out", str(out), "--n-samples", "8", "--seq-len", "32", "--held-out",
            "2", "--steps", "4", "--log-every", "2"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "250", "HF_HUB_OFFLINE": "1"})
    assert result.exit_code == 0, result.output
    assert "step 2/4" in result.output and "eta" in result.output and "held-out loss" in result.output
    assert json.loads((out / io.MANIFEST).read_text())["healing"][0]["steps"] == 4
    again = CliRunner().invoke(app, args, env={"COLUMNS": "250"})
    assert again.exit_code == 1 and again.output.strip().startswith("error: output directory is not empty")


def test_resume_continues_an_interrupted_heal(outputs, tmp_path):
    """Interrupted after step 4 of 6 (the state kept at step 4), ``resume`` gives the uninterrupted run's tensors;
    without ``resume`` the kept state is refused, with other options too."""
    options = dict(SMALL, save_every=2)
    heal(outputs("lord"), tmp_path / "whole", **options)

    def stop(line: str) -> None:
        if line.startswith("step 5/6"):
            raise KeyboardInterrupt

    out = tmp_path / "healed"
    with pytest.raises(KeyboardInterrupt):
        heal(outputs("lord"), out, **options, say=stop, log_every=1)
    assert not out.exists() and (tmp_path / ".healed.heal-state.safetensors").is_file()
    with pytest.raises(CompressorError, match="continue it with --resume"):
        heal(outputs("lord"), out, **options)
    with pytest.raises(CompressorError, match="ran with lr"):
        heal(outputs("lord"), out, **dict(options, lr=1e-2), resume=True)
    record = heal(outputs("lord"), out, **options, resume=True)
    assert record["resumed_after_step"] == 4 and not (tmp_path / ".healed.heal-state.safetensors").exists()
    whole, resumed = output_tensors(tmp_path / "whole"), output_tensors(out)
    assert all(torch.equal(whole[key], resumed[key]) for key in whole)
    with pytest.raises(CompressorError, match="no interrupted heal"):
        heal(outputs("lord"), tmp_path / "other", **options, resume=True)


def test_distill_loss_is_the_kl_to_the_teacher(llama_dir, ids):
    """``distill_loss`` against a brute-force KL(teacher ‖ model) per token; zero when the model is its teacher."""
    from compressor.heal import distill_loss

    teacher = build_model("llama", int(ids.max()) + 1, layers=3, seed=1).eval()
    student = build_model("llama", int(ids.max()) + 1, layers=3, seed=2).eval()
    p = torch.softmax(teacher(input_ids=ids).logits.double(), -1)  # (b, seq, vocab)
    q = torch.softmax(student(input_ids=ids).logits.double(), -1)
    expected = (p * (p.log() - q.log())).sum(-1).mean()
    assert float(expected) > 1e-3
    assert float(distill_loss(student, teacher, ids)) == pytest.approx(float(expected), rel=1e-4)
    assert float(distill_loss(teacher, teacher, ids)) == pytest.approx(0.0, abs=1e-6)


def test_distill_heal_moves_the_output_toward_its_base(outputs, llama_dir, tmp_path, tokenizer):
    """``distill``: the steps minimise the KL to the base the manifest records, so on the windows it trained on the
    healed output's KL to the base is lower than the compressed one's; the record says which loss trained."""
    from transformers import AutoModelForCausalLM

    from compressor.heal import distill_loss, heal_windows

    source = outputs("lord")
    manifest = io.read_manifest(source)
    calib = manifest["recipe"]["calibration"]
    trained = heal_windows(manifest, tokenizer, calib["dataset"], SMALL["n_samples"] + SMALL["held_out"],
                           SMALL["seq_len"], 0)[:SMALL["n_samples"]]  # (8, 32): the windows the heal trains on
    base = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    before = float(distill_loss(io.load(source), base, trained))
    record = heal(source, tmp_path / "healed", distill=True, **dict(SMALL, lr=1e-3))
    after = float(distill_loss(io.load(tmp_path / "healed"), base, trained))
    assert record["loss"] == "distill" and io.read_manifest(tmp_path / "healed")["healing"][-1]["loss"] == "distill"
    assert after < 0.9 * before, (before, after)
