"""Zero-shot (and few-shot) task accuracy through EleutherAI's ``lm-eval``, an optional extra.

    compressor eval out/gptq-w4-eora-r64 --tasks arc_easy,hellaswag,piqa,winogrande --no-perplexity

The model is the one ``compressor eval`` loaded (``compressor.load`` for an output directory: factorized,
CUR, quantized and compensated modules as they are), handed to lm-eval as an ``HFLM`` wrapping that object,
so lm-eval scores exactly the compressed model, not a reload by its own loader. Quantized layers are
dequantized once for the whole evaluation (``modules.dequantized``), as for perplexity.

Task names are lm-eval's (``lm-eval ls tasks``); ``--tasks-dir`` adds a folder of task YAML files (lm-eval's
``include_path``), e.g. a task on a local JSON Lines file (``dataset_path: json``, ``dataset_kwargs:
{data_files: ...}``), which is how the tests run offline. Names are checked before the model is loaded.
Results keep lm-eval's metric names (``acc,none``, ``acc_norm,none`` and their ``_stderr``), per task.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from torch import nn

from ..errors import CompressorError, one_line
from ..model.modules import dequantized

INSTALL = "pip install 'compressor[lm-eval]' (or: pip install lm-eval)"


def parse_tasks(text: str) -> list[str]:
    """``--tasks a,b,c`` → ["a", "b", "c"]; an empty list is an error."""
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise CompressorError("--tasks: give at least one lm-eval task name, e.g. --tasks arc_easy,hellaswag")
    return tasks


@contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval's INFO and WARNING lines (one per request batch, a warning for a model object) off stderr."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def task_manager(tasks: list[str], tasks_dir: Path | None = None):
    """lm-eval's ``TaskManager`` that knows every name in ``tasks``, checked before any model is loaded;
    only ``tasks_dir`` is indexed when it holds them all (indexing lm-eval's own ~15,000 tasks takes
    seconds)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise CompressorError(f"--tasks needs lm-eval, which is not installed: {INSTALL}") from None
    if tasks_dir is not None and not Path(tasks_dir).is_dir():
        raise CompressorError(f"--tasks-dir {tasks_dir}: not a directory")
    with _quiet():
        manager = None
        if tasks_dir is not None:
            manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
            if not set(manager.match_tasks(tasks)) >= set(tasks):
                manager = None
        if manager is None:
            manager = TaskManager(include_path=str(tasks_dir) if tasks_dir else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise CompressorError(f"--tasks: unknown lm-eval task{'s' if len(unknown) > 1 else ''} "
                              f"{', '.join(unknown)} (lm-eval ls tasks lists them; --tasks-dir adds a folder of "
                              "task YAML files)")
    return manager


def evaluate_tasks(model: nn.Module, tokenizer, tasks: list[str], manager, batch_size: int = 1,
                   num_fewshot: int | None = None, limit: int | None = None) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` of ``model`` (an ``HFLM`` around the object itself) on ``tasks``:
    {"tasks": {task: {metric: value}}, "samples": {task: documents scored}, "num_fewshot", "limit"}."""
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM

    model.eval()
    git_hash = getattr(evaluator, "get_git_commit_hash", None)
    # lm-eval records the git commit of the working directory, and git prints "fatal: not a git repository"
    # outside one; that commit says nothing about the model evaluated here
    if git_hash is not None:
        evaluator.get_git_commit_hash = lambda: None
    try:
        with _quiet(), dequantized(model):
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            output = evaluator.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                               task_manager=manager, log_samples=False)
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise CompressorError(f"lm-eval: {one_line(exc)}") from None
    finally:
        if git_hash is not None:
            evaluator.get_git_commit_hash = git_hash
    results = {task: {k: v for k, v in metrics.items() if k not in ("alias", "sample_len")
                      and isinstance(v, (int, float))}
               for task, metrics in output["results"].items()}
    samples = {task: counts.get("effective") for task, counts in (output.get("n-samples") or {}).items()}
    return {"harness": "lm-eval", "version": _version(), "tasks": results, "samples": samples,
            "num_fewshot": num_fewshot, "limit": limit}


def _version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return None


def headline(metrics: dict[str, float]) -> str:
    """``acc 0.625 ± 0.18, acc_norm 0.5 ± 0.19``: each metric with its standard error where lm-eval gives one."""
    parts = []
    for key, value in metrics.items():
        name, _, filt = key.partition(",")
        if name.endswith("_stderr"):
            continue
        err = metrics.get(f"{name}_stderr,{filt}" if filt else f"{name}_stderr")
        label = name if filt in ("", "none") else f"{name} ({filt})"
        parts.append(f"{label} {value:.4g}" + (f" ± {err:.2g}" if isinstance(err, (int, float)) else ""))
    return ", ".join(parts)
