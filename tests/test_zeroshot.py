"""``compressor eval --tasks`` through lm-eval (the optional ``lm-eval`` extra), offline: a task defined in a
local YAML file over a local JSON Lines file. The accuracy lm-eval reports for a compressed model (factorized,
quantized) must be the one computed here from that model's own log-likelihoods: lm-eval scored our loaded
object, not a reload of its own."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from typer.testing import CliRunner

from compressor import api, io
from compressor.cli import app
from compressor.plan import recipe as recipes

ENV = {"COLUMNS": "250", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
DOCS = [
    ("The state of our", ["union", "banana", "economy"], 0),
    ("We the people of the United", ["States", "cats"], 0),
    ("Our nation is", ["strong", "purple", "seven"], 2),
    ("The economy", ["grows", "sings"], 1),
    ("Congress must", ["act", "sleep", "the"], 0),
    ("In the year ahead we will", ["work", "blue"], 0),
    ("Tonight I ask the", ["Congress", "river", "of"], 1),
    ("Peace and", ["freedom", "ten"], 0),
]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env=ENV)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in DOCS))
    (folder / "tiny_choice.yaml").write_text(
        "task: tiny_choice\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        "doc_to_choice: choices\n"
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return folder


def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), split into tokens as lm-eval's HFLM does (no special tokens)."""
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    n_context = len(tokenizer.encode(context, add_special_tokens=False))
    ids = torch.tensor([whole])
    with torch.no_grad():
        logprobs = model(input_ids=ids).logits.float().log_softmax(-1)[0]  # (seq, vocab)
    return sum(float(logprobs[i - 1, whole[i]]) for i in range(n_context, len(whole)))


def expected_accuracy(path) -> float:
    from transformers import AutoTokenizer

    model, tokenizer = io.load(path), AutoTokenizer.from_pretrained(path)
    hits = [max(range(len(choices)), key=lambda i: loglikelihood(model, tokenizer, q, " " + choices[i])) == answer
            for q, choices, answer in DOCS]
    return sum(hits) / len(hits)


@pytest.mark.parametrize("recipe", ["lord", "rtn"])
def test_task_accuracy_is_that_of_the_compressed_model(tmp_path, model_dirs, calib_file, task_dir, recipe):
    pytest.importorskip("lm_eval")
    if recipe == "lord":  # factorized: a directory stock transformers refuses, so lm-eval must use our object
        spec = recipes.load("lord", ["calibration.n_samples=4", "calibration.seq_len=32",
                                     "calibration.batch_size=2", f"calibration.dataset={calib_file}"])
    else:
        spec = recipes.parse({"steps": [{"method": "quantize", "config": {"bits": 3, "group_size": 32}}]})
    out = tmp_path / recipe
    api.compress(str(model_dirs["llama"]), spec, out, progress=False)
    report = tmp_path / "tasks.json"
    result = invoke("eval", out, "--no-perplexity", "--tasks", "tiny_choice", "--tasks-dir", task_dir,
                    "--batch-size", 1, "--json", report, "--record")
    assert result.exit_code == 0, result.output
    tasks = json.loads(report.read_text())["tasks"]
    assert tasks["harness"] == "lm-eval" and tasks["samples"] == {"tiny_choice": len(DOCS)}
    metrics = tasks["tasks"]["tiny_choice"]
    assert set(metrics) == {"acc,none", "acc_stderr,none", "acc_norm,none", "acc_norm_stderr,none"}
    assert metrics["acc,none"] == pytest.approx(expected_accuracy(out))
    assert "tiny_choice" in result.stdout and f"acc {metrics['acc,none']:.4g}" in result.stdout
    recorded = json.loads((out / "evaluation.json").read_text())["tasks"]["tiny_choice"]
    assert recorded["metrics"] == metrics and recorded["samples"] == len(DOCS)


def test_limit(tmp_path, model_dirs, task_dir):
    pytest.importorskip("lm_eval")
    report = tmp_path / "tasks.json"
    result = invoke("eval", model_dirs["llama"], "--no-perplexity", "--tasks", "tiny_choice", "--tasks-dir",
                    task_dir, "--limit", 3, "--json", report)
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["tasks"]["samples"] == {"tiny_choice": 3}


def test_unknown_task_is_one_line_before_loading(monkeypatch, model_dirs, task_dir):
    lm_eval_tasks = pytest.importorskip("lm_eval.tasks")
    real = lm_eval_tasks.TaskManager
    # only the test's folder is indexed (the fallback to lm-eval's ~15,000 tasks takes long on a busy machine)
    monkeypatch.setattr(lm_eval_tasks, "TaskManager", lambda include_path=None, include_defaults=True:
                        real(include_path=include_path, include_defaults=False))
    result = invoke("eval", model_dirs["llama"], "--tasks", "tiny_choice,no_such_task", "--tasks-dir", task_dir)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "error: --tasks: unknown lm-eval task no_such_task (lm-eval ls tasks lists them; --tasks-dir adds a "
        "folder of task YAML files)"]


def test_without_lm_eval_the_error_says_how_to_install(monkeypatch, model_dirs):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)
    result = invoke("eval", model_dirs["llama"], "--tasks", "arc_easy")
    assert result.exit_code == 1
    assert result.stderr.strip() == ("error: --tasks needs lm-eval, which is not installed: "
                                     "pip install 'compressor[lm-eval]' (or: pip install lm-eval)")


def test_task_list_checks(model_dirs, tmp_path):
    result = invoke("eval", model_dirs["llama"], "--tasks", " , ")
    assert result.exit_code == 1 and "--tasks: give at least one lm-eval task name" in result.stderr
    result = invoke("eval", model_dirs["llama"], "--tasks", "arc_easy", "--limit", 0)
    assert result.exit_code == 1 and result.stderr.strip() == "error: --limit must be ≥ 1; got 0"
    result = invoke("eval", model_dirs["llama"], "--tasks", "arc_easy", "--tasks-dir", tmp_path / "none")
    if "lm-eval, which is not installed" not in result.stderr:
        assert result.exit_code == 1 and f"--tasks-dir {tmp_path / 'none'}: not a directory" in result.stderr
