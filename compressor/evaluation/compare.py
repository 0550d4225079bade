"""``compressor compare out/a out/b ...``: one table of outputs side by side, from what each records.

One row per output: the method (the recipe's steps with their main settings), parameters (each quantized
weight counted as one, as the summary's model line does), bits per weight (8 × bytes on disk ÷ parameters:
the whole model, scales, zero points and dense embeddings included), bytes on disk (the safetensors files,
an adapter included), and the measured figures where they were recorded: held-out perplexity, and prefill /
decode tokens/s (``compressor eval --record`` keeps them in the output's ``evaluation.json``; absent: "–").
A plain model directory (the base) may be a row too: its parameters are counted from the safetensors headers.

The same cells serve ``scripts/plot_bench.py``, which builds rows from the benchmark results in
``results/bench-*.json`` (``row_of_bench``) for the results tables (README.md, docs/results.md).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from .. import io
from ..errors import CompressorError
from ..model import files

EVALUATION = "evaluation.json"
COLUMNS = ("output", "method", "parameters", "bits/weight", "bytes on disk", "perplexity", "prefill tok/s",
           "decode tok/s")


# --- recording what eval measured -------------------------------------------------------------------------


def check_record_target(path: Path) -> None:
    """``eval --record``: a compressed output directory this process may write to, checked before evaluating."""
    io.read_manifest(path)  # a compressed directory, or the one-line refusal
    if not os.access(path, os.W_OK):
        raise CompressorError(f"--record: {path} is not writable")


def record(path: Path, result: dict[str, Any]) -> dict[str, Any]:
    """Merge an evaluation's results into ``path``/evaluation.json: perplexity by ``dataset@seq_len``, lm-eval
    metrics by task, the latest speed comparison. Written atomically; returns the file's data."""
    file = Path(path) / EVALUATION
    data = read_evaluation(path)
    ppl = result.get("perplexity")
    if ppl:
        data.setdefault("perplexity", {})[f"{ppl['dataset']}@{ppl['seq_len']}"] = {
            **ppl, "device": result.get("device"), "tokens_per_s": result.get("tokens_per_s")}
    if result.get("tasks"):
        entry = result["tasks"]
        tasks = data.setdefault("tasks", {})
        for task, metrics in entry["tasks"].items():
            tasks[task] = {"metrics": metrics, "samples": entry["samples"].get(task),
                           "num_fewshot": entry["num_fewshot"], "limit": entry["limit"]}
    if result.get("speed"):
        data["speed"] = result["speed"]
    fd, tmp = tempfile.mkstemp(prefix=f".{EVALUATION}.", dir=path)
    with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, file)
    return data


def read_evaluation(path: Path) -> dict[str, Any]:
    """``path``/evaluation.json ({} when absent); a damaged file is named."""
    file = Path(path) / EVALUATION
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise CompressorError(f"{file}: not valid JSON") from None
    if not isinstance(data, dict):
        raise CompressorError(f"{file}: expected a JSON object")
    return data


# --- rows -----------------------------------------------------------------------------------------------


def _number(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def step_label(step: dict[str, Any]) -> str:
    """A recipe step as a short label: ``gptq w4 g128 act-order``, ``eora r64``, ``lord gram loss 0.2``."""
    method, c = step["method"], step.get("config") or {}
    if method == "quantize":
        group = f"g{c['group_size']}" if c.get("group_size") else "per-channel"
        return (f"{c.get('algorithm', 'rtn')} w{c.get('bits', '?')} {group}" + (" sym" if c.get("symmetric") else "")
                + (" act-order" if c.get("act_order") else ""))
    if method == "eora":
        return f"{'svd' if c.get('space') == 'weight' else 'eora'} r{c.get('rank', '?')}"
    if method == "prune":
        return f"{c.get('algorithm', 'prune')} {c.get('pattern') or c.get('sparsity', '')}".strip()
    if method == "lqlora":  # NF alone (rank 0, one configuration) or LQ-LoRA under a bit budget
        if not c.get("rank"):
            return "nf" + "/".join(str(b) for b in c.get("bits") or ["?"])
        budget = f" {_number(c['budget'])} bits" if c.get("budget") is not None else ""
        return f"lqlora{budget} r{c['rank']}" + (" fisher" if c.get("weighting") == "fisher" else "")
    label = method
    if method == "lord":
        label += "".join(f" {part}" for part in (
            c.get("whiten"), c.get("rank_rule") if c.get("rank_rule") not in (None, "uniform") else None,
            "fisher-rows" if c.get("output_weight") == "fisher" else None) if part)
    for key in ("ratio", "model_ratio", "rank", "rank_reduction", "n_layers"):
        if c.get(key) is not None:
            if key == "n_layers":
                return f"{label} {c[key]} layers"
            return f"{label} {'' if key == 'ratio' else key + ' '}{_number(c[key])}"
    return label


def method_label(recipe: dict[str, Any] | None) -> str:
    steps = (recipe or {}).get("steps") or []
    return " + ".join(step_label(s) for s in steps) or "dense"


def _quantized_weights(recipe: dict[str, Any] | None, reduction: dict[str, Any] | None) -> int:
    """Weights a benchmark run stored as packed integers or codes (not ``nn.Parameter``s): the targeted
    parameters of its quantize (or LQ-LoRA) step."""
    if any(s["method"] in ("quantize", "lqlora") for s in (recipe or {}).get("steps", [])) and reduction:
        return reduction.get("targeted_params_before") or 0
    return 0


def _safetensors_parameters(path: Path) -> int:
    """Elements of every tensor in a directory's safetensors files (their headers, checked: ``files.read_header``)."""
    return sum(math.prod(entry["shape"]) for file in sorted(Path(path).glob("*.safetensors"))
               for entry in files.read_header(file).values())


def row_of_output(path: Path) -> dict[str, Any]:
    """A row from an output directory's compression.json, log, files and evaluation.json; a plain model
    directory (config.json and safetensors, no compression.json) is a dense row."""
    from ..io import summary
    from .evaluate import bytes_on_disk

    path = Path(path)
    disk = bytes_on_disk(path) if path.is_dir() else 0
    if not (path / io.MANIFEST).is_file():
        if (path / "config.json").is_file() and disk:
            return {"output": str(path), "method": "dense", "parameters": _safetensors_parameters(path),
                    "bytes": disk, **_measured({})}
        io.read_manifest(path)  # the one-line refusal: not a compressed model directory
    manifest = io.read_manifest(path)
    log = _log(path / io.LOG)
    parameters = manifest.get("params_after", 0) + summary.quantized_weights(log)
    return {"output": str(path), "method": method_label(manifest.get("recipe")), "parameters": parameters,
            "bytes": disk, **_measured(read_evaluation(path))}


def _log(file: Path) -> list[dict[str, Any]]:
    if not file.is_file():
        return []
    entries = []
    for number, line in enumerate(file.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            entries.append(json.loads(line))
        except ValueError:
            raise CompressorError(f"{file}:{number}: not a compression log entry") from None
    return entries


def _measured(evaluation: dict[str, Any]) -> dict[str, Any]:
    """The recorded perplexity (the last one written, with its dataset) and speed."""
    ppl = list((evaluation.get("perplexity") or {}).values())
    speed = (evaluation.get("speed") or {}).get("compressed") or {}
    return {"perplexity": ppl[-1]["value"] if ppl else None,
            "perplexity_on": f"{ppl[-1]['dataset']}, {ppl[-1]['seq_len']}" if ppl else None,
            "prefill_tokens_per_s": speed.get("prefill_tokens_per_s"),
            "decode_tokens_per_s": speed.get("decode_tokens_per_s")}


def row_of_bench(run: dict[str, Any], heldout: str | None = None, speed: dict[str, Any] | None = None,
                 dense_bytes: int | None = None) -> dict[str, Any]:
    """A row from one run of ``scripts/bench.py``'s results (``speed``: that model's generation-speed
    figures where they were measured; ``dense_bytes`` for the dense run, which records none)."""
    recipe = run.get("recipe")
    parameters = run["parameters"] + _quantized_weights(recipe, run.get("reduction"))
    return {"output": run["name"], "method": method_label(recipe), "parameters": parameters,
            "bytes": run.get("bytes_on_disk") or (dense_bytes if recipe is None else None),
            "perplexity": run.get("perplexity"), "perplexity_on": heldout,
            "prefill_tokens_per_s": (speed or {}).get("prefill_tokens_per_s"),
            "decode_tokens_per_s": (speed or {}).get("decode_tokens_per_s")}


# --- formatting -----------------------------------------------------------------------------------------


def _size(n: int | None) -> str:
    from ..io.summary import _size as size

    return "–" if not n else size(n)


def cells(row: dict[str, Any], with_dataset: bool = True) -> list[str]:
    """The row's cells, in ``COLUMNS`` order."""
    bits = 8 * row["bytes"] / row["parameters"] if row.get("bytes") and row.get("parameters") else None
    ppl = row.get("perplexity")
    ppl_text = "–" if ppl is None else (f"{ppl:,.2f}" if ppl < 1e3 else f"{ppl:,.0f}" if ppl < 1e5 else f"{ppl:.2e}")
    if ppl is not None and with_dataset and row.get("perplexity_on"):
        ppl_text += f" ({row['perplexity_on']})"

    def rate(value):
        return "–" if value is None else f"{value:,.1f}"

    return [row["output"], row["method"], f"{row['parameters']:,}" if row.get("parameters") else "–",
            "–" if bits is None else f"{bits:.2f}", _size(row.get("bytes")), ppl_text,
            rate(row.get("prefill_tokens_per_s")), rate(row.get("decode_tokens_per_s"))]


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table (a perplexity dataset shared by every row goes into the header)."""
    shared = {row.get("perplexity_on") for row in rows if row.get("perplexity") is not None}
    one = len(shared) == 1 and None not in shared
    header = [c if c != "perplexity" or not one else f"perplexity ({shared.pop()})" for c in COLUMNS]
    right = {"parameters", "bits/weight", "bytes on disk", "prefill tok/s", "decode tok/s"}
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if c in right or c.startswith("perplexity") else "---" for c in COLUMNS) + "|"]
    lines += ["| " + " | ".join(cells(row, with_dataset=not one)) + " |" for row in rows]
    return "\n".join(lines) + "\n"
