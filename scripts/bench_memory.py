"""Peak memory of a streamed compression against depth: does it stay about one decoder layer?

    python scripts/bench_memory.py [--layers 8 32] [--recipes lord-lean gptq ...] [--out results/bench-memory.json]
    python scripts/bench_memory.py --merge A.json B.json --out results/bench-memory.json   # runs of two invocations

Random Llama checkpoints of Llama-3.2-1B's width (hidden 2048, intermediate 8192, 32 query / 8 KV heads,
SmolLM2's tokenizer and vocabulary of 49,152 so that real calibration text applies) are written to the
cache directory in bf16, shard by shard (the writer never holds more than one layer either), with 8 and 32
layers. Each is compressed with ``compressor compress --stream --dtype bfloat16`` in a subprocess, with
LoRD-gram at ratio 0.2 (``lord``: from the input Grams, SVD-LLM's; ``lord-auto``: ``gram_side: auto``;
``lord-lean``, the default: ``gram_side: auto`` + ``svd_solver: gram``) and with GPTQ 4-bit, group 128
(``gptq``: fp64 Hessian, the default; ``gptq-fp32``: the reference's fp32 Hessian); the subprocess's peak
RSS (``ru_maxrss`` of the child), its wall time per decoder layer and the checkpoint's bytes on disk are
recorded. The calibration is small (16 windows of 256 tokens): the benchmark is about the weights, which grow
with depth. An existing ``--out`` keeps its runs of the (recipe, depth) pairs not run this time.

The Done-when of the streaming issue: for each recipe, peak RSS at 32 layers within 15% of that at 8, and
below 30% of the 32-layer checkpoint's size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
WIDTH = dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
             max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True)
RECIPES = {
    "lord": {"calibration": {"dataset": "sotu", "n_samples": 16, "seq_len": 256, "seed": 0, "batch_size": 4},
             "propagate": "compressed",
             "steps": [{"method": "lord", "config": {"ratio": 0.2, "whiten": "gram"}}]},
    # the same truncation solved from the smaller Gram of each matrix (gram_side auto: down_proj's and k/v's
    # output Grams, 2048² and 512², where down_proj's input Gram is 8192²)
    "lord-auto": {"calibration": {"dataset": "sotu", "n_samples": 16, "seq_len": 256, "seed": 0, "batch_size": 4},
                  "propagate": "compressed",
                  "steps": [{"method": "lord", "config": {"ratio": 0.2, "whiten": "gram", "gram_side": "auto"}}]},
    # the same truncation with nothing of a matrix's size held twice: the output Gram for the wide matrices
    # and, for the tall ones, the factors from the n×n Gram of W S built in row chunks (svd_solver: gram)
    # instead of LAPACK's SVD of W S (several m×n copies: ~650 MB for gate_proj in fp64)
    "lord-lean": {"calibration": {"dataset": "sotu", "n_samples": 16, "seq_len": 256, "seed": 0, "batch_size": 4},
                  "propagate": "compressed",
                  "steps": [{"method": "lord", "config": {"ratio": 0.2, "whiten": "gram", "gram_side": "auto",
                                                          "svd_solver": "gram"}}]},
    "gptq": {"calibration": {"dataset": "sotu", "n_samples": 16, "seq_len": 256, "seed": 0, "batch_size": 4},
             "propagate": "compressed",
             "steps": [{"method": "quantize", "config": {"algorithm": "gptq", "bits": 4, "group_size": 128,
                                                         "symmetric": False, "damp": 0.01}}]},
    # GPTQ at the reference's precision: the Gram summed in fp32 and factorized in its own memory (one
    # 8192² fp32 matrix for down_proj, where fp64 holds 512 MB plus the fp32 factor)
    "gptq-fp32": {"calibration": {"dataset": "sotu", "n_samples": 16, "seq_len": 256, "seed": 0, "batch_size": 4},
                  "propagate": "compressed",
                  "steps": [{"method": "quantize", "config": {"algorithm": "gptq", "bits": 4, "group_size": 128,
                                                              "symmetric": False, "damp": 0.01,
                                                              "hessian_dtype": "float32"}}]},
}


def write_checkpoint(folder: Path, n_layers: int) -> Path:
    """A random bf16 Llama of 1B width with ``n_layers`` layers, one safetensors shard per layer."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from compressor.model import loading
    from compressor.model.streaming import parameters_on_meta

    if (folder / "model.safetensors.index.json").is_file():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(loading.resolve(loading.DEFAULT_MODEL)[0])
    config = LlamaConfig(vocab_size=len(tokenizer), num_hidden_layers=n_layers, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **WIDTH)
    with parameters_on_meta():
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    names = {name: tuple(p.shape) for name, p in skeleton.named_parameters()}  # tied head listed once
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    generator = torch.Generator().manual_seed(0)
    groups: dict[str, list[str]] = {}
    for name in names:
        key = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else "outside"
        groups.setdefault(key, []).append(name)
    weight_map, total = {}, 0
    for position, (key, members) in enumerate(groups.items()):
        shard = f"model-{position + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in members:
            shape = names[name]
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
            weight_map[name] = shard
            total += tensors[name].numel() * 2
        save_file(tensors, str(tmp / shard), metadata={"format": "pt"})
        del tensors
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=2))
    config.dtype = torch.bfloat16
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


def disk_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def run(checkpoint: Path, recipe: str, n_layers: int, stream: bool = True, dtype: str = "bfloat16",
        device: str = "cpu") -> dict:
    """One compression in a subprocess: its peak RSS, wall time, time per layer."""
    with tempfile.TemporaryDirectory() as tmp:
        recipe_file = Path(tmp) / f"{recipe}.yaml"
        recipe_file.write_text(json.dumps(RECIPES[recipe]))  # JSON is YAML
        out = Path(tmp) / "out"
        command = [sys.executable, "-m", "compressor.cli", "compress", str(checkpoint), "--recipe",
                   str(recipe_file), "--out", str(out), "--dtype", dtype, "--device", device,
                   "--quiet"]
        if stream:
            command.append("--stream")
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True,
                              env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT)))
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        if done.returncode:
            return {"recipe": recipe, "layers": n_layers, "stream": stream,
                    "error": (done.stderr or done.stdout).strip().splitlines()[-1:]}
        manifest = json.loads((out / "compression.json").read_text())
        output_bytes = disk_bytes(out)
    if peak <= before:
        peak_mib = None  # an earlier child peaked higher; ru_maxrss of children is a maximum over all of them
    else:
        peak_mib = peak / 1024
    return {"recipe": recipe, "layers": n_layers, "stream": stream, "dtype": dtype, "device": device,
            "peak_rss_mib": peak_mib,
            "seconds": seconds, "seconds_per_layer": seconds / n_layers, "output_bytes": output_bytes,
            "params_before": manifest["params_before"], "params_after": manifest["params_after"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--recipes", nargs="+", default=["lord-lean", "gptq"], choices=list(RECIPES))
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench-memory.json")
    parser.add_argument("--hidden", type=int, default=WIDTH["hidden_size"], help="a narrower model (quick check)")
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype (float32 is much faster on CPUs without "
                        "bf16 units; the bf16 checkpoint is converted layer by layer)")
    parser.add_argument("--device", default="cpu", help="compute device of the compression (cpu, cuda)")
    parser.add_argument("--checkpoint-only", action="store_true", help="write the checkpoints, print their folders, "
                        "run nothing (scripts/gpu_checks.sh's smoke model)")
    parser.add_argument("--merge", type=Path, nargs="+", help="run nothing: write to --out the runs of these "
                        "result files (a later file's run of a recipe and depth replaces an earlier one's)")
    args = parser.parse_args()
    if args.merge:
        files = [json.loads(path.read_text()) for path in args.merge]
        runs = {(row["recipe"], row["layers"]): row for data in files for row in data["runs"]}
        dtypes = {data["dtype"] for data in files}
        if len(dtypes) != 1:
            sys.exit(f"error: the files were run with different dtypes ({', '.join(sorted(dtypes))})")
        result = summary(list(runs.values()), dtypes.pop())
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["verdicts"], indent=2))
        return
    if args.hidden != WIDTH["hidden_size"]:  # same shape ratios: intermediate 4×, 64-dim heads, 4 queries per KV
        WIDTH.update(hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                     num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 256)
    from compressor.model import loading

    checkpoints = {}
    for n in args.layers:
        folder = loading.cache_dir() / "bench-memory" / f"llama-hidden-{WIDTH['hidden_size']}-{n}-layers-bf16"
        folder.parent.mkdir(parents=True, exist_ok=True)
        checkpoints[n] = write_checkpoint(folder, n)
        if args.checkpoint_only:
            print(checkpoints[n])
    if args.checkpoint_only:
        return
    rows = []
    if args.out.is_file():  # keep the runs of an earlier invocation not redone now (verdicts cover them all)
        rows = [r for r in json.loads(args.out.read_text()).get("runs", [])
                if r["recipe"] not in args.recipes or r["layers"] not in args.layers]
    # each run in a fresh Python process of its own (run_isolated), so ru_maxrss of children is that run's
    for recipe in args.recipes:
        for n in sorted(args.layers):
            row = run_isolated(checkpoints[n], recipe, n, args.dtype, args.device)
            row["checkpoint_bytes"] = disk_bytes(checkpoints[n])
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = summary(rows, args.dtype)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["verdicts"], indent=2))


def summary(rows: list[dict], dtype: str) -> dict:
    """The JSON of a set of runs, with the streaming issue's verdict for each recipe run at 8 and 32 layers."""
    verdicts = {}
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        by = {r["layers"]: r for r in rows if r["recipe"] == recipe and r.get("peak_rss_mib")}
        if 8 in by and 32 in by:
            deep, shallow = by[32], by[8]
            verdicts[recipe] = {
                "rss_32_over_8": deep["peak_rss_mib"] / shallow["peak_rss_mib"],
                "rss_32_over_checkpoint": deep["peak_rss_mib"] * 2**20 / deep["checkpoint_bytes"],
                "within_15_percent": deep["peak_rss_mib"] <= 1.15 * shallow["peak_rss_mib"],
                "below_30_percent_of_checkpoint": deep["peak_rss_mib"] * 2**20 < 0.3 * deep["checkpoint_bytes"]}
    return {"what": "peak RSS of compressor compress --stream against depth (random Llama, bf16 checkpoint)",
            "dtype": dtype,
            "width": WIDTH, "recipes": {r: RECIPES[r] for r in dict.fromkeys(x["recipe"] for x in rows)},
            "runs": rows, "verdicts": verdicts,
            "environment": {"torch": torch.__version__, "python": platform.python_version(),
                            "threads": os.environ.get("OMP_NUM_THREADS"), "cpus": os.cpu_count()}}


def run_isolated(checkpoint: Path, recipe: str, n_layers: int, dtype: str = "bfloat16",
                 device: str = "cpu") -> dict:
    """``run`` in a fresh Python process of its own, so ``RUSAGE_CHILDREN`` sees only that compression."""
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT / 'scripts')!r}); import bench_memory as b; "
            f"b.WIDTH.update({WIDTH!r}); "
            f"from pathlib import Path; print(json.dumps(b.run(Path({str(checkpoint)!r}), {recipe!r}, {n_layers}, "
            f"dtype={dtype!r}, device={device!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if done.returncode:
        return {"recipe": recipe, "layers": n_layers, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
