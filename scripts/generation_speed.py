"""Generation speed of MoDeGPT against the dense model and LoRD-gram at the same parameter count.

    python scripts/generation_speed.py [--ratio 0.2] [--repeats 3] [--out results/generation-modegpt.json]
                                       [--threads N] [--keep DIR]

Compresses the offline default model with ``recipes/modegpt-<ratio>`` (calibration as the benchmark's), then
with LoRD gram removing the same fraction of the model's parameters (``model_ratio``); loads the three
(dense, MoDeGPT, LoRD) and times greedy generation with the KV cache (``evaluate.generation_speed``):
prefill of a 128-token prompt and 32 decode steps, at batch 1 and batch 8, prompts cut from the held-out
windows. The models run interleaved (A B C, C B A, ...) so that a busy machine slows each alike; best and
median tokens/s of ``--repeats`` rounds per (model, batch, phase).
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
from compressor.evaluation.evaluate import generation_speed  # noqa: E402
from compressor.model import loading as models  # noqa: E402
from compressor.plan import recipe as recipes  # noqa: E402

PROMPT_TOKENS, NEW_TOKENS, BATCHES = 128, 32, (1, 8)


def modegpt_recipe(ratio: float) -> recipes.Recipe:
    data = recipes.read(f"modegpt-{round(ratio * 100)}")
    data["calibration"] = dict(CALIBRATION)
    return recipes.parse(data)


def lord_recipe(model_ratio: float) -> recipes.Recipe:
    return recipes.parse({"calibration": dict(CALIBRATION), "steps": [
        {"method": "lord", "config": {"model_ratio": model_ratio, "whiten": "gram"}}]})


def compressed(folder: Path, ratio: float) -> tuple[float, float]:
    """MoDeGPT at ``ratio`` and LoRD gram at its removed fraction in ``folder``/modegpt and /lord, compressed
    unless an earlier ``--keep`` run left both there (its seconds and fraction read from ``times.json``):
    (MoDeGPT's compression seconds, the fraction of the model's parameters it removed)."""
    record = folder / "times.json"
    if record.is_file() and (folder / "modegpt").is_dir() and (folder / "lord").is_dir():
        kept = json.loads(record.read_text())
        if kept.get("ratio") == ratio:
            return kept["modegpt_compress_seconds"], kept["removed_fraction_of_model"]
        raise SystemExit(f"error: {folder} holds models of ratio {kept.get('ratio')}, not {ratio}")
    start = time.perf_counter()
    modegpt = api.compress(MODEL, modegpt_recipe(ratio), folder / "modegpt", progress=False)
    seconds = time.perf_counter() - start
    removed = 1 - modegpt["params_after"] / modegpt["params_before"]
    api.compress(MODEL, lord_recipe(removed), folder / "lord", progress=False)
    record.write_text(json.dumps({"ratio": ratio, "modegpt_compress_seconds": seconds,
                                  "removed_fraction_of_model": removed}) + "\n")
    return seconds, removed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "generation-modegpt.json")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--keep", type=Path, help="keep the compressed models in this folder and reuse them when "
                        "a later run finds them there (compress once, time again on a quiet machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models.resolve(MODEL)[0])
    prompts = heldout(tokenizer)[: max(BATCHES), :PROMPT_TOKENS]  # (8, 128)
    tmp = args.keep or Path(tempfile.mkdtemp(prefix="generation-speed-"))
    try:
        modegpt_seconds, removed = compressed(tmp, args.ratio)
        loaded = {"dense": models.load(MODEL, torch.float32)[0], f"modegpt-{args.ratio}": io.load(tmp / "modegpt"),
                  f"lord-gram-as-modegpt-{args.ratio}": io.load(tmp / "lord")}
        runs: dict[str, dict[str, list[float]]] = {
            f"{name} batch {batch} {phase}": [] for name in loaded for batch in BATCHES for phase in ("prefill", "decode")}
        for name, model in loaded.items():  # warm-up: first calls allocate
            generation_speed(model, prompts[:1], 4)
        for repeat in range(args.repeats):
            order = list(loaded) if repeat % 2 == 0 else list(loaded)[::-1]
            for name in order:
                for batch in BATCHES:
                    speed = generation_speed(loaded[name], prompts[:batch], NEW_TOKENS)
                    for phase in ("prefill", "decode"):
                        runs[f"{name} batch {batch} {phase}"].append(speed[f"{phase}_tokens_per_s"])
            print(f"round {repeat + 1}/{args.repeats} done", flush=True)
        rows = []
        for name, model in loaded.items():
            for batch in BATCHES:
                row = {"model": name, "batch": batch, "parameters": models.parameter_count(model)}
                for phase in ("prefill", "decode"):
                    values = runs[f"{name} batch {batch} {phase}"]
                    row[f"{phase}_tokens_per_s_best"] = max(values)
                    row[f"{phase}_tokens_per_s_median"] = statistics.median(values)
                rows.append(row)
        dense = {row["batch"]: row for row in rows if row["model"] == "dense"}
        for row in rows:
            for phase in ("prefill", "decode"):
                row[f"{phase}_over_dense_best"] = (row[f"{phase}_tokens_per_s_best"]
                                                   / dense[row["batch"]][f"{phase}_tokens_per_s_best"])
        result = {"model": MODEL, "calibration": CALIBRATION, "ratio": args.ratio,
                  "removed_fraction_of_model": removed, "modegpt_compress_seconds": modegpt_seconds,
                  "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "repeats": args.repeats,
                  "threads": torch.get_num_threads(), "device": "cpu", "rows": rows, "runs": runs}
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        for row in rows:
            print(json.dumps({k: row[k] for k in ("model", "batch", "decode_tokens_per_s_best",
                                                   "decode_over_dense_best", "prefill_over_dense_best")}))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
