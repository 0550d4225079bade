"""LQ-LoRA pricing, the old way against the new, on real SmolLM2-135M matrices (issue 31).

    PYTHONPATH=. HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python scripts/lqlora_pricing_check.py [--layers 2 28]
        [--tolerance 0] [--out results/lqlora-pricing-check.json]

Prices every (matrix, configuration) pair of the shipped grid (NF2/3/4 × blocks 16/32/64, rank 64, the seeded
randomized SVD) for the chosen layers' seven linears twice, interleaved matrix by matrix in one process (the
order alternating, so that a busy machine slows both alike):

- old: a frozen copy of the pricing before issue 31 (``reference_decompose``: every configuration from scratch,
  ``bucketize`` for the nearest level, every iterate's error with fresh fp64 copies of W);
- new: ``LQLoRA.price`` as shipped (the first low-rank part ``SVD_k(W)`` shared by the configurations, the
  nearest level counted, W converted to fp64 once; ``--tolerance`` sets the relative early stop).

Reports the seconds per pair of each, the largest relative difference of the priced errors, and whether the
exact bit allocation (``ranks.bits.allocate``) over the sample picks the same configuration for every matrix at
the recipes' budgets (3.0 and 2.75 bits). Writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch.nn import functional as F

from compressor.kernels import linalg
from compressor.kernels import normal_float as nf
from compressor.methods import lqlora_math
from compressor.methods.lqlora import LQLoRA, LQLoRAConfig
from compressor.model import loading
from compressor.ranks import bits as bit_allocation

LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj"]
BUDGETS = (3.0, 2.75)


def reference_quantize(weight: torch.Tensor, config: nf.NFConfig) -> torch.Tensor:
    """Ŵ (m, n) of ``nf.quantize`` as it was: the nearest level by ``bucketize`` on the midpoints."""
    flat = weight.reshape(-1)
    scale_codes, group_absmax, offset = nf.double_quantize(nf.blockwise_absmax(flat, config.block_size), config)
    scales = nf.block_scales(scale_codes, group_absmax, offset, config.group_size, config.scale_bits)  # (blocks,)
    levels = nf.normal_float_levels(config.bits)
    blocks = F.pad(flat, (0, scales.numel() * config.block_size - flat.numel())).view(scales.numel(), -1)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))[:, None]
    scaled = torch.where(scales[:, None] > 0, blocks / safe, torch.zeros_like(blocks))
    codes = torch.bucketize(scaled, (levels[1:] + levels[:-1]) / 2, right=False).reshape(-1)[:flat.numel()]
    return nf.dequantize_normal_float(codes, scales, config.bits, config.block_size, tuple(weight.shape))


def reference_decompose(weight: torch.Tensor, rank: int, config: nf.NFConfig, iterations: int = 100,
                        sketch: linalg.Sketch = linalg.Sketch()) -> tuple[float, int]:
    """The pricing's decomposition before issue 31 (unweighted): (best error, iterations run)."""
    best, errors = math.inf, []
    residual_q = torch.zeros_like(weight)
    for _ in range(iterations):
        up, down, _ = linalg.whitened_svd(weight - residual_q, rank, None, torch.float32, sketch=sketch)
        low_rank = up.float() @ down.float()
        residual_q = reference_quantize(weight - low_rank, config)
        error = lqlora_math.reconstruction_error(weight, residual_q + low_rank)
        errors.append(error)
        best = min(best, error)
        if len(errors) > 1 and error >= errors[-2]:
            break
    return best, len(errors)


def allocation_choices(errors: dict[str, dict[str, float]], grid: list[nf.NFConfig], shapes: dict,
                       budget: float) -> dict[str, str]:
    """matrix → the configuration the exact allocation picks over the sample at ``budget``."""
    names = list(errors)
    costs = np.array([[errors[name][c.label] ** 2 for c in grid] for name in names])
    numel = np.array([shapes[name][0] * shapes[name][1] for name in names], dtype=np.int64)
    stored = np.array([[nf.stored_bits(c, int(k)) for c in grid] for k in numel], dtype=np.int64)
    allocation = bit_allocation.allocate(costs, stored, numel, budget, 60.0)
    return {name: grid[j].label for name, j in zip(names, allocation.choice)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 28])
    parser.add_argument("--tolerance", type=float, default=0.0, help="the new path's relative early stop")
    parser.add_argument("--out", default="results/lqlora-pricing-check.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    path, _ = loading.resolve(loading.DEFAULT_MODEL)
    state = load_file(str(Path(path) / "model.safetensors"))
    method = LQLoRA(LQLoRAConfig(budget=3.0, rank=64, error_cache="off", tolerance=args.tolerance))
    grid = method.config.grid()
    old: dict[str, dict[str, float]] = {}
    new: dict[str, dict[str, float]] = {}
    seconds = {"old": 0.0, "new": 0.0}
    iterations = {"old": 0}
    shapes = {}
    for index, name in enumerate(f"model.layers.{layer}.{linear}" for layer in args.layers for linear in LINEARS):
        weight = state[f"{name}.weight"].float()  # (m, n)
        shapes[name] = tuple(weight.shape)
        for way in (("old", "new") if index % 2 == 0 else ("new", "old")):
            began = time.perf_counter()
            if way == "old":
                priced = {}
                for config in grid:
                    priced[config.label], count = reference_decompose(weight, 64, config)
                    iterations["old"] += count
                old[name] = priced
            else:
                new[name] = method.price(weight, None, grid, torch.device("cpu"), {"hits": 0, "computed": 0})
            seconds[way] += time.perf_counter() - began
        worst = max(abs(new[name][k] / old[name][k] - 1) for k in old[name])
        print(f"{name} {tuple(weight.shape)}: worst relative difference {worst:.2e}", flush=True)
    pairs = len(old) * len(grid)
    differences = [new[name][k] / old[name][k] - 1 for name in old for k in old[name]]
    choices = {}
    for budget in BUDGETS:
        before, after = allocation_choices(old, grid, shapes, budget), allocation_choices(new, grid, shapes, budget)
        choices[str(budget)] = {"same": before == after, "old": before,
                                "changed": {k: [before[k], after[k]] for k in before if before[k] != after[k]}}
    result = {
        "model": loading.DEFAULT_MODEL, "layers": args.layers, "matrices": len(old), "pairs": pairs,
        "grid": [c.label for c in grid], "rank": 64, "tolerance": args.tolerance,
        "threads": torch.get_num_threads(),
        "seconds_per_pair": {way: seconds[way] / pairs for way in seconds},
        "speedup": seconds["old"] / seconds["new"],
        "old_iterations_per_pair": iterations["old"] / pairs,
        "max_relative_difference": max(map(abs, differences)),
        "mean_relative_difference": float(np.mean(differences)),
        "allocation": choices,
        "errors": {name: {"old": old[name], "new": new[name]} for name in old},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("errors", "grid")}, indent=1))


if __name__ == "__main__":
    main()
