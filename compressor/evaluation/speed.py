"""``compressor eval --speed``: prefill and decode tokens/s and peak memory of a compressed model against its
base, on the same device, in the same run.

Each model is measured in a process of its own (``python -m compressor.evaluation.speed``), one after the other, so that
each peak is its own: on CUDA ``torch.cuda.max_memory_allocated`` (the model's tensors and the generation's
working set, from a reset before loading); on the CPU the process's peak resident set (the libraries, the
loaded model and the generation; ``rss_before_load`` is what the process held before it loaded the model).
Both get the same prompts (``batch`` windows of ``prompt_tokens`` held-out tokens, tokenized once here) and
the same protocol (``generation.generation_speed``: one prefill forward, then ``new_tokens`` greedy decode
steps with the KV cache), a warm-up, then the best of ``repeats`` rounds. The base is the model recorded in
the output's ``compression.json`` (``base_model_path`` for a local directory, else ``base_model``), or
``--base``. ``same_greedy_tokens`` is the fraction of decoded tokens equal to the base's.

Quantized layers run as compressor runs them, dequantized once (``modules.dequantized``): faster, but their
peak memory holds the dense weights as well as the packed ones; integer kernels (vLLM) are what save memory.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import CompressorError, one_line


@dataclass
class SpeedOptions:
    base: str | None = None  # None: the base recorded in compression.json
    prompt_tokens: int = 128
    new_tokens: int = 32
    batch: int = 1
    repeats: int = 3

    def check(self) -> None:
        for name, value, least in (("--prompt-tokens", self.prompt_tokens, 1), ("--new-tokens", self.new_tokens, 1),
                                   ("--speed-batch", self.batch, 1), ("--repeats", self.repeats, 1)):
            if value < least:
                raise CompressorError(f"{name} must be ≥ {least}; got {value}")


def base_of(path: Path, manifest: dict[str, Any]) -> str:
    """The base model of an output directory, as compression.json records it (a local directory by its
    absolute path, where it still exists)."""
    local = manifest.get("base_model_path")
    if local and Path(local).is_dir():
        return local
    base = manifest.get("base_model")
    if not base:
        raise CompressorError(f"{path}: compression.json records no base model; pass --base MODEL")
    return base


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _rss_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def measure(spec: str, prompts: list[list[int]], new_tokens: int, repeats: int, device: str,
            dtype: str | None = None, trust_remote_code: bool = False) -> dict[str, Any]:
    """Load ``spec`` in this process and time greedy generation from ``prompts``; the process's peak memory."""
    import torch

    from ..model import loading as models
    from ..model.loading import tensor_bytes
    from .generation import generation_speed, load_any

    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = _rss_bytes()
    start = time.perf_counter()
    model, _, _ = load_any(spec, device, models.parse_dtype(dtype) if dtype else None, trust_remote_code)
    load_seconds = time.perf_counter() - start
    ids = torch.tensor(prompts)
    generation_speed(model, ids[:, : min(8, ids.shape[1])], 2, device)  # warm-up: first-call costs
    rounds = [generation_speed(model, ids, new_tokens, device) for _ in range(repeats)]
    if cuda:
        torch.cuda.synchronize(device)
    best = {key: max(r[key] for r in rounds) for key in ("prefill_tokens_per_s", "decode_tokens_per_s")}
    return {"model": spec, **best,
            "prefill_seconds": min(r["prefill_seconds"] for r in rounds),
            "decode_seconds": min(r["decode_seconds"] for r in rounds),
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if cuda else _peak_rss_bytes(),
            "memory": "cuda max_memory_allocated" if cuda else "peak RSS of the process",
            "rss_before_load_bytes": None if cuda else rss_before,
            "weights_bytes": tensor_bytes(model), "parameters": models.parameter_count(model),
            "load_seconds": load_seconds, "generated": rounds[0]["generated"].tolist()}


def measure_in_subprocess(spec: str, prompts: list[list[int]], options: SpeedOptions, device: str,
                          dtype: str | None, trust_remote_code: bool) -> dict[str, Any]:
    """``measure`` in a fresh Python process (its own peak); a failure there is one line here."""
    payload = json.dumps({"spec": spec, "prompts": prompts, "new_tokens": options.new_tokens,
                          "repeats": options.repeats, "device": device, "dtype": dtype,
                          "trust_remote_code": trust_remote_code})
    package_root = str(Path(__file__).resolve().parents[2])  # the folder holding compressor/: from a checkout too
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, "-m", "compressor.evaluation.speed"], input=payload, capture_output=True, text=True,
                          env=env)
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        last = lines[-1].removeprefix("error: ") if lines else f"exit status {done.returncode}"
        raise CompressorError(f"--speed, measuring {spec}: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def prompts_from(source, tokenizer, options: SpeedOptions) -> list[list[int]]:
    """``batch`` consecutive held-out windows of ``prompt_tokens`` tokens."""
    windows = source.evaluation(tokenizer, options.prompt_tokens, options.prompt_tokens * options.batch)
    if windows.shape[0] < options.batch:
        raise CompressorError(f"--speed: the held-out text has {windows.shape[0]} window(s) of "
                              f"{options.prompt_tokens} tokens; --speed-batch {options.batch} needs more")
    return windows[: options.batch].tolist()


def compare(compressed: str, base: str, prompts: list[list[int]], options: SpeedOptions, device: str,
            dtype: str | None = None, trust_remote_code: bool = False) -> dict[str, Any]:
    """The compressed model, then its base, each in its own process; the ratios compressed ÷ base."""
    gc.collect()
    runs = {"compressed": measure_in_subprocess(compressed, prompts, options, device, None, trust_remote_code),
            "base": measure_in_subprocess(base, prompts, options, device, dtype, trust_remote_code)}
    ours, theirs = runs["compressed"].pop("generated"), runs["base"].pop("generated")
    decoded = [(a, b) for row_a, row_b in zip(ours, theirs) for a, b in zip(row_a[1:], row_b[1:])]
    ratios = {f"{key}_ratio": runs["compressed"][key] / runs["base"][key]
              for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "peak_memory_bytes")
              if runs["base"].get(key)}
    settings = {k: v for k, v in asdict(options).items() if k != "base"}
    return {**settings, "base_model": base, "device": device, "protocol": (
                "evaluate.generation_speed: one prefill forward over the prompts, then new_tokens greedy decode "
                "steps with the KV cache; warm-up, best of repeats; each model in its own process"),
            **runs, **ratios,
            "same_greedy_tokens": sum(a == b for a, b in decoded) / len(decoded) if decoded else None}


def main() -> None:
    """The worker: a JSON request on stdin, one JSON line of results on stdout; errors as one line on stderr."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    request = json.loads(sys.stdin.read())
    try:
        result = measure(request["spec"], request["prompts"], request["new_tokens"], request["repeats"],
                         request["device"], request.get("dtype"), request.get("trust_remote_code", False))
    except CompressorError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(1)
    except Exception as exc:  # noqa: BLE001 - still one line for the parent
        print(f"error: {type(exc).__name__}: {one_line(exc)}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
