"""Quantized outputs on the offline default model: storage dtype (bytes, perplexity) and evaluation speed.

    python scripts/quant_outputs.py [--out results/quant-outputs.json] [--repeats 2]

1. Storage: ``rtn-w4-eora-r64`` and ``gptq-w4-eora-r64`` (group 128) compressed once each, written with fp32
   and with bf16 storage (``--storage-dtype``); bytes on disk and held-out perplexity of each file, loaded
   in fp32 (the storage's own loss) and in its config dtype (what ``compressor eval`` does by default).
2. Evaluation speed: ``compressor``'s evaluation of a quantized output (group 128: our loader; group 64:
   against stock ``transformers`` through compressed-tensors; group 128, which stock refuses: against
   the same weights merged into a plain checkpoint), the same held-out windows and batch size,
   interleaved so that a busy machine slows both alike; best and median of ``--repeats`` runs each.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402
from bench import CALIBRATION, MODEL, heldout  # noqa: E402

from compressor import api, io  # noqa: E402
from compressor.evaluation.evaluate import bytes_on_disk, perplexity  # noqa: E402
from compressor.plan import recipe as recipes  # noqa: E402

BATCH = 8


def recipe(name: str, **quantize) -> recipes.Recipe:
    data = recipes.read(name)
    data["calibration"] = dict(CALIBRATION)
    for step in data["steps"]:
        if step["method"] == "quantize":
            step.setdefault("config", {}).update(quantize)
    return recipes.parse(data, name)


def storage(tmp: Path, windows) -> list[dict]:
    """fp32 against bf16 storage of the same compressed model."""
    rows = []
    for name in ("rtn-w4-eora-r64", "gptq-w4-eora-r64"):
        fp32 = tmp / f"{name}-fp32"
        summary = api.compress(MODEL, recipe(name), fp32, storage_dtype="float32", progress=False)
        manifest = {
            k: v for k, v in io.read_manifest(fp32).items() if k not in ("modules", "serving", "merged")
        }
        log = [json.loads(line) for line in (fp32 / io.LOG).read_text().splitlines()]
        bf16 = tmp / f"{name}-bf16"
        io.save(summary["model"], None, bf16, manifest, log, storage_dtype=torch.bfloat16)
        del summary
        for stored, path in (("float32", fp32), ("bfloat16", bf16)):
            row = {
                "recipe": name,
                "storage_dtype": stored,
                "bytes_on_disk": bytes_on_disk(path),
                "adapter_bytes": bytes_on_disk(path / "adapter"),
            }
            for compute in ("float32", "bfloat16"):
                if stored == "float32" and compute == "bfloat16":
                    continue
                model = io.load(path, dtype=getattr(torch, compute))
                row[f"perplexity_{compute}_compute"] = perplexity(model, windows, BATCH)["value"]
                del model
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def timed(load, windows) -> float:
    model = load()
    seconds = perplexity(model, windows, BATCH)["seconds"]
    del model
    return seconds


def speed(tmp: Path, windows, repeats: int) -> list[dict]:
    """Perplexity seconds (the load excluded; our one-time dequantization included) of each loader."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    rows = []
    for group in (128, 64):
        out, merged = tmp / f"rtn-w4-g{group}", tmp / f"rtn-w4-g{group}-merged"
        api.compress(MODEL, recipe("rtn-w4", group_size=group), out, progress=False)
        ours = {"compressor (packed, dequantized once)": lambda: io.load(out)}
        if io.read_manifest(out)["serving"]["compressed_tensors"]:  # stock reads this very checkpoint
            stock = {
                "stock transformers, compressed-tensors": lambda: AutoModelForCausalLM.from_pretrained(
                    out, quantization_config=CompressedTensorsConfig(dequantize=True)
                )
            }
        else:  # stock refuses it (model_type compressor-llama): the same weights, merged
            api.compress(MODEL, recipe("rtn-w4", group_size=group), merged, merge=True, progress=False)
            stock = {"stock transformers, merged dense": lambda: AutoModelForCausalLM.from_pretrained(merged)}
        loaders = {**ours, **stock}
        runs: dict[str, list[float]] = {k: [] for k in loaders}
        for repeat in range(repeats):  # A B, B A, A B, ...: a busy or warming machine slows both alike
            for key in list(loaders) if repeat % 2 == 0 else list(loaders)[::-1]:
                runs[key].append(timed(loaders[key], windows))
        (ours_key,), (stock_key,) = ours, stock
        rows.append(
            {
                "output": f"rtn-w4 group {group}",
                "stock": stock_key,
                "seconds": runs,
                "best": {k: min(v) for k, v in runs.items()},
                "compressor_over_stock_best": min(runs[ours_key]) / min(runs[stock_key]),
                "compressor_over_stock_median": statistics.median(runs[ours_key])
                / statistics.median(runs[stock_key]),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "quant-outputs.json")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=("storage", "speed"))
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from compressor.model import loading as models

    windows = heldout(AutoTokenizer.from_pretrained(models.resolve(MODEL)[0]))
    tmp = Path(tempfile.mkdtemp(prefix="quant-outputs-"))
    result = {
        "model": MODEL,
        "calibration": CALIBRATION,
        "heldout": {"dataset": "sotu 2000-", "tokens": int(windows.numel()), "seq_len": 512},
        "batch_size": BATCH,
        "threads": torch.get_num_threads(),
    }
    if args.out.exists():
        result.update(
            {k: v for k, v in json.loads(args.out.read_text()).items() if k in ("storage", "speed")}
        )
    try:
        if args.only in (None, "speed"):
            start = time.perf_counter()
            result["speed"] = speed(tmp, windows, args.repeats)
            result["speed_seconds"] = time.perf_counter() - start
            args.out.write_text(json.dumps(result, indent=2) + "\n")
        if args.only in (None, "storage"):
            result["storage"] = storage(tmp, windows)
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
