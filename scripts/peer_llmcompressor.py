"""The speed suite's peer row: llm-compressor's GPTQ on the model and calibration token ids the suite gives.

Run by the llm-compressor environment's python (``scripts/setup_llmcompressor.sh`` makes ``.venv-llmc``);
``scripts/bench.py --suite speed`` calls it with one JSON argument::

    .venv-llmc/bin/python scripts/peer_llmcompressor.py '{"model": DIR, "calibration": IDS.safetensors,
        "out": DIR, "bits": 4, "group_size": 64, "symmetric": false, "actorder": "static",
        "dampening_frac": 0.01, "batch_size": 8, "device": "cpu", "dtype": "float32"}'

It loads the checkpoint (the project's converted SmolLM2-135M folder), runs ``oneshot`` with one
``GPTQModifier`` (W4A16: 4-bit integer weights in groups, asymmetric, the given activation ordering, every
decoder linear, lm_head kept) over exactly the given (n, seq_len) token ids in order, with the sequential
pipeline (each layer calibrated on the quantized layers' outputs), saves it in compressed-tensors format, and
prints one JSON line: wall and CPU seconds (whole from the load on, as the suite times its own runs; and load /
oneshot / save; the imports apart) and peak RSS. With
``dense_out`` it then writes the checkpoint decoded to dense weights there (``dequantized_copy``), for the
project's evaluation. It imports nothing of this checkout.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from importlib.metadata import version


def main(job: dict) -> dict:
    wall, cpu = time.perf_counter(), time.process_time()
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    imports = time.perf_counter() - wall
    wall, cpu, seconds = time.perf_counter(), time.process_time(), {}  # as ours: from the model's load on
    start = time.perf_counter()
    dtype = getattr(torch, job.get("dtype", "float32"))
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    ids = load_file(job["calibration"])["input_ids"]  # (n, seq_len)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    seconds["load"] = time.perf_counter() - start
    weights = QuantizationArgs(num_bits=job["bits"], type="int", symmetric=job["symmetric"], strategy="group",
                               group_size=job["group_size"], actorder=job["actorder"])
    modifier = GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                            ignore=["lm_head"], dampening_frac=job["dampening_frac"])
    start = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, dataset=data, recipe=modifier, pipeline="sequential",
            num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1], batch_size=job["batch_size"],
            shuffle_calibration_samples=False)
    seconds["oneshot"] = time.perf_counter() - start
    start = time.perf_counter()
    model.save_pretrained(job["out"], save_compressed=True)
    tokenizer.save_pretrained(job["out"])
    seconds["save"] = time.perf_counter() - start
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if job.get("dense_out"):  # after the timed run: what this checkpoint decodes to, for compressor eval
        dequantized_copy(job["out"], job["dense_out"])
    return {"peer": f"llmcompressor {version('llmcompressor')}", "compressed_tensors": version("compressed-tensors"),
            "transformers": version("transformers"), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "wall_seconds": wall, "cpu_seconds": cpu, "seconds": seconds, "imports_seconds": imports, "device": job.get("device", "cpu"),
            "dtype": job.get("dtype", "float32"),
            **({"cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20} if torch.cuda.is_available() else {}),
            "compression_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def dequantized_copy(compressed: str, out: str) -> None:
    """The compressed-tensors checkpoint ``compressed`` decoded by its own library (transformers with
    ``dequantize``) and written to ``out`` as a plain dense checkpoint (no quantization_config): the weights the
    quantized model computes with, in a folder any loader reads (compressor eval checks packed zero points
    against the shapes of its own layout and refuses these)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import CompressedTensorsConfig

    model = AutoModelForCausalLM.from_pretrained(compressed, dtype=torch.float32,
                                                 quantization_config=CompressedTensorsConfig(run_compressed=False))
    quantization = ("weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith(quantization)}
    config = AutoConfig.from_pretrained(compressed)
    del config.quantization_config
    tied = "lm_head.weight" in state and torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    if tied:
        del state["lm_head.weight"]
    config.tie_word_embeddings = tied
    config.save_pretrained(out)
    save_file(state, f"{out}/model.safetensors", metadata={"format": "pt"})
    AutoTokenizer.from_pretrained(compressed).save_pretrained(out)


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
