"""LQ-LoRA: low-rank plus quantized decomposition under a bit budget (Guo, Greengard, Xing, Kim; ICLR 2024,
arXiv:2311.12023; HanGuo97/lq-lora; docs/methods.md#lq-lora-lqlora).

Every targeted ``W`` (m, n) becomes ``Q + L1 L2``: ``Q`` NormalFloat-quantized at a configuration chosen for
that matrix (``kernels.normal_float``: bits b, block size B0, scale bits b0, scale group B1, group absmax
dtype b1), ``L1`` (m, k), ``L2`` (k, n) a rank-k part in the model's dtype, found by the alternating
decomposition of ``lqlora_math`` (returning its best iterate). Model-level decision (``decide``, before the
layer walk, on the original weights):

1. for every matrix × configuration of the grid (the cartesian product of ``bits``, ``block_size``,
   ``scale_bits``, ``group_size``, ``scale_dtype``) the decomposition is run once and its error recorded,
   ``cost = ‖W − Q − L1L2‖_F²`` (Fisher variant: ``‖√F ⊙ (W − Q − L1L2)‖_F²``), cached on disk
   (``error_cache``: a second budget over the same grid computes nothing);
2. ``ranks.bits.allocate`` picks one configuration per matrix, exactly (SciPy ``milp``, HiGHS), so that the
   bits the quantized parts store average at most ``budget`` per parameter over the targeted matrices.
   The bits are what ``NormalFloatLinear`` stores (``normal_float.stored_bits``: the paper's
   ``b + b0/B0 + b1/(B0·B1)`` plus packing to int32 words and one fp32 offset per matrix), so the budget
   is met as stored. The low-rank factors are not in the budget (the paper's convention: its 2.75-bit
   70B model is 2.85 bits with them); the log and the summary report both.

Then each matrix's chosen decomposition is computed again in the walk (the seeded randomized SVD makes it
the one the allocation priced; the log's ``allocated_error`` and ``rel_lq_error`` say so) and written as a
``compensated`` module: the ``normal_float`` base (packed codes) plus the low-rank path, which the output
stores as a PEFT LoRA adapter (``lora_A = L2``, ``lora_B = L1``, ``lora_alpha = r``: scaling 1) for the
fine-tuning the paper intends; ``compressor.load`` evaluates ``Q + L1 L2``. ``rank: 0`` is NormalFloat
quantization alone (a ``normal_float`` module, no adapter). ``budget: null`` takes the grid's one
configuration for every matrix.

``weighting: fisher`` (data-aware, the paper's "LQ-LoRA (Fisher)"): the empirical Fisher of every target
from the shared pass (``stats.fisher.fisher_for``, full (out, in), cached) weights the low-rank fit on both
sides with its row and column sums and measures every error with ``√F``.

Where this departs from the reference code: the best iterate is returned, not the last; the program is
solved whole and exactly without a commercial solver (the reference splits it into chunks for Gurobi); the
offset, scale quantization and NF rounding follow the reference's ``quantization_utils_2`` (see
``kernels.normal_float``); weights need not divide B0·B1. The default grid (9 configurations: 2/3/4 bits,
blocks of 16/32/64, 8-bit scales, groups of 256 in fp32) is smaller than the reference's 432
(b, b0 ∈ {2, 3, 4, 8}, b1 ∈ {bf16, fp16, fp32}, B0 ∈ {16, 32, 64}, B1 ∈ {16, 64, 256}), which the lists
can reproduce; each configuration costs one decomposition per matrix.

```yaml
steps:
  - method: lqlora
    config: {budget: 3.0, rank: 64, bits: [2, 3, 4], block_size: [16, 32, 64], weighting: none}
```
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from .. import timing
from ..config.configs import field
from ..contract import Decision, LayerContext, LinearCompressor, ModelView, Outcome, Target
from ..errors import CompressorError
from ..kernels import linalg
from ..kernels import normal_float as nf
from ..model import loading as models
from ..model.modules import CompensatedLinear, LowRankLinear, NormalFloatLinear, weight_of
from ..model.targets import names_by_layer
from ..parallel import distributed, threads
from ..ranks import bits as bit_allocation
from ..stats import fisher as fisher_pass
from . import lqlora_math

CacheMode = Literal["use", "refresh", "off"]
ERROR_FORMAT = "lqlora-errors-v1"
MAX_GRID = 512


@dataclass
class LQLoRAConfig:
    budget: float | None = field(3.0, "average bits per parameter the quantized parts store over the targeted "
                                 "matrices (the integer program's budget; low-rank factors not counted); "
                                 "null: the grid's one configuration everywhere")
    rank: int = field(64, "rank k of L1 (m, k) @ L2 (k, n); 0: NormalFloat quantization alone")
    bits: list[int] = field([2, 3, 4], "NormalFloat bits b the program may choose (2, 3, 4, 8; any of 2..8)")
    block_size: list[int] = field([16, 32, 64], "first-level block sizes B0: consecutive weights per absmax")
    scale_bits: list[int] = field([8], "bits b0 of the double-quantized block scales")
    group_size: list[int] = field([256], "second-level block sizes B1: block scales per group absmax")
    scale_dtype: list[Literal["fp32", "fp16", "bf16"]] = field(["fp32"], "dtype b1 of each group's absmax")
    weighting: Literal["none", "fisher"] = field("none", "none, or fisher: the empirical Fisher weights the "
                                                 "low-rank fit (row and column sums) and every error")
    svd: Literal["randomized", "exact"] = field("randomized", "rank-k SVD of each iteration: randomized "
                                                "(seeded; the reference's) or exact")
    oversample: int = field(10, "randomized SVD: extra columns of the sketch (the reference's 10)")
    power_iterations: int = field(2, "randomized SVD: subspace iterations (torch.svd_lowrank's 2)")
    seed: int = field(0, "randomized SVD: seed of the Gaussian sketch")
    iterations: int = field(100, "at most this many alternations (the reference's 100)")
    tolerance: float = field(0.0, "stop once the error falls by less than this fraction (0: the paper's rule, "
                             "stop when it stops falling)")
    svd_dtype: Literal["float32", "float64"] = field("float32", "precision of the SVD (the reference's fp32)")
    eps: float = field(1e-6, "fisher: added to the Fisher row and column sums before the square root")
    checkpointing: bool = field(True, "fisher: recompute each decoder layer in the backward (less memory)")
    fisher_cache: CacheMode = field("use", "Fisher cache on disk: use (read/write), refresh, off")
    error_cache: CacheMode = field("use", "cache of each (matrix, configuration) error on disk: use, refresh, off")
    time_limit: float = field(60.0, "seconds HiGHS may spend on the integer program (then: the best found)")

    def __post_init__(self) -> None:
        if self.budget is not None and not 0 < self.budget <= 64:
            raise ValueError(f"budget must be in (0, 64] bits per parameter; got {self.budget}")
        if self.rank < 0:
            raise ValueError(f"rank must be ≥ 0; got {self.rank}")
        for name in ("oversample", "power_iterations", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be ≥ 0; got {getattr(self, name)}")
        if self.iterations < 1:
            raise ValueError(f"iterations must be ≥ 1; got {self.iterations}")
        if not 0 <= self.tolerance < 1:
            raise ValueError(f"tolerance must be in [0, 1); got {self.tolerance}")
        if self.eps < 0 or self.time_limit <= 0:
            raise ValueError("eps must be ≥ 0 and time_limit > 0")
        for name in ("bits", "block_size", "scale_bits", "group_size", "scale_dtype"):
            if not getattr(self, name):
                raise ValueError(f"{name} needs at least one value")
        grid = self.grid()
        if len(grid) > MAX_GRID:
            raise ValueError(f"the grid has {len(grid)} configurations (at most {MAX_GRID}); each costs one "
                             "decomposition per matrix")
        if self.budget is None and len(grid) > 1:
            raise ValueError(f"a grid of {len(grid)} configurations needs a budget (or give one value per list)")

    def grid(self) -> list[nf.NFConfig]:
        """Every configuration: the cartesian product of the lists, duplicates dropped, in order."""
        try:
            combos = itertools.product(self.bits, self.block_size, self.scale_bits, self.group_size,
                                       self.scale_dtype)
            return list(dict.fromkeys(nf.NFConfig(*combo) for combo in combos))
        except CompressorError as exc:
            raise ValueError(str(exc)) from None

    def validate(self, shapes: dict[str, tuple[int, int]]) -> None:
        """Before any weight is read: the rank fits every matrix, and the budget can be met at all."""
        for name, (m, n) in shapes.items():
            if self.rank > min(m, n):
                raise ValueError(f"rank {self.rank} is larger than min(m, n) = {min(m, n)} of {name} ({m}×{n})")
        if self.budget is None:
            return
        grid = self.grid()
        total = sum(m * n for m, n in shapes.values())
        cheapest = sum(min(nf.stored_bits(c, m * n) for c in grid) for m, n in shapes.values())
        if cheapest > self.budget * total:
            raise ValueError(f"budget {self.budget} bits per parameter is below the cheapest configuration of "
                             f"the grid ({cheapest / total:.4f} bits per parameter on these matrices)")


def error_key(weight: Tensor, fisher: Tensor | None, settings: dict) -> str:
    """A hex key for one matrix's errors: its values, its Fisher (if weighted) and the decomposition settings."""
    digest = hashlib.sha256(json.dumps({"format": ERROR_FORMAT, **settings}, sort_keys=True).encode())
    for tensor in (weight, fisher):
        if tensor is not None:
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def error_path(key: str) -> Path:
    return models.cache_dir() / "lqlora" / f"{key}.json"


def read_errors(key: str) -> dict[str, float]:
    """label → error of a matrix's cached decompositions ({} if absent, unreadable, or not errors)."""
    try:
        data = json.loads(error_path(key).read_text())
        errors = data["errors"] if data.get("format") == ERROR_FORMAT else {}
        return {k: float(v) for k, v in errors.items() if isinstance(v, (int, float)) and math.isfinite(v) and v >= 0}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def write_errors(key: str, errors: dict[str, float]) -> None:
    """Write a matrix's errors atomically (temporary file + rename)."""
    path = error_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as file:
        json.dump({"format": ERROR_FORMAT, "errors": errors}, file)
    os.replace(tmp, path)


class LQLoRA(LinearCompressor):
    name = "lqlora"
    Config = LQLoRAConfig
    summary = "W ≈ NF-quantized Q + rank-k L1·L2, per-matrix NF configuration from an exact bit-budget ILP"
    paper = "arXiv:2311.12023"
    parallel_groups = True  # each matrix's decomposition is one thread's (lqlora_math runs it serially)

    def __init__(self, config: LQLoRAConfig) -> None:
        super().__init__(config)
        self.fisher: dict[str, Tensor] = {}  # name → (out, in) Fisher, until its matrix is compressed
        self.fisher_info: dict[str, object] = {}

    @property
    def uses_data(self) -> bool:
        return self.config.weighting == "fisher"  # the Fisher pass; no per-layer statistics

    @property
    def settings(self) -> dict:
        """What a decomposition's error depends on besides the matrix, its Fisher and the configuration."""
        c = self.config
        return {"rank": c.rank, "svd": c.svd, "oversample": c.oversample, "power_iterations": c.power_iterations,
                "seed": c.seed, "iterations": c.iterations, "tolerance": c.tolerance, "svd_dtype": c.svd_dtype,
                "weighting": c.weighting, "eps": c.eps}

    @property
    def sketch(self) -> linalg.Sketch | None:
        c = self.config
        return linalg.Sketch(c.oversample, c.power_iterations, c.seed) if c.svd == "randomized" else None

    @property
    def svd_dtype(self) -> torch.dtype:
        return torch.float64 if self.config.svd_dtype == "float64" else torch.float32

    def decompose(self, weight: Tensor, config: nf.NFConfig, fisher: Tensor | None,
                  start: tuple[Tensor, Tensor] | None = None) -> lqlora_math.Decomposition:
        """``lqlora_math.decompose`` under this config; ``start``: the shared first low-rank part (pricing)."""
        c = self.config
        return lqlora_math.decompose(weight, c.rank, config, iterations=c.iterations, sketch=self.sketch,
                                     fisher=fisher, eps=c.eps, tolerance=c.tolerance, svd_dtype=self.svd_dtype,
                                     start=start)

    def price(self, weight: Tensor, fisher: Tensor | None, grid: list[nf.NFConfig], device: torch.device,
              cache: dict[str, int]) -> dict[str, float]:
        """configuration label → the decomposition error of ``weight`` (m, n) under it (``price_all`` of one)."""
        return self.price_all({"matrix": (weight, fisher)}, grid, device, cache)["matrix"]

    def price_all(self, matrices: dict[str, tuple[Tensor, Tensor | None]], grid: list[nf.NFConfig],
                  device: torch.device, cache: dict[str, int]) -> dict[str, dict[str, float]]:
        """name → configuration label → the decomposition error of the matrix (m, n) under it, for ``matrices``
        (name → (weight, its Fisher or None)): read from the error cache or computed (and written); ``cache``
        counts hits and computations. Every (matrix, configuration) left to compute is one piece of work for
        ``threads.map_serial`` (each decomposition on one torch thread, as many at once as torch has threads)."""
        c = self.config
        if len(grid) == 1:  # one configuration: nothing to choose
            return {name: {} for name in matrices}
        keys = {name: error_key(weight, fisher, {**self.settings, "device": device.type})
                for name, (weight, fisher) in matrices.items()}
        errors = {name: read_errors(key) if c.error_cache == "use" else {} for name, key in keys.items()}
        missing = {name: [config for config in grid if config.label not in errors[name]] for name in matrices}
        cache["hits"] += sum(len(grid) - len(configs) for configs in missing.values())
        starting = [name for name, configs in missing.items() if configs and c.rank > 0]
        # SVD_k(W): every configuration's first low-rank part, computed once for the matrix
        starts = dict(zip(starting, threads.map_serial(lambda name: lqlora_math.initial_low_rank(
            matrices[name][0], c.rank, sketch=self.sketch, fisher=matrices[name][1], eps=c.eps,
            svd_dtype=self.svd_dtype), starting)))
        pairs = [(name, config) for name, configs in missing.items() for config in configs]
        priced = threads.map_serial(lambda pair: self.decompose(matrices[pair[0]][0], pair[1], matrices[pair[0]][1],
                                                                starts.get(pair[0])).error, pairs)
        for (name, config), error in zip(pairs, priced):
            errors[name][config.label] = error
        cache["computed"] += len(pairs)
        if c.error_cache != "off":
            for name in {name for name, _ in pairs}:
                write_errors(keys[name], errors[name])
        return errors

    def decide(self, view: ModelView) -> Decision:
        """Every (matrix, configuration) error, then the exact allocation of configurations to the budget."""
        c, names, grid = self.config, list(view.shapes), self.config.grid()
        fisher: dict[str, Tensor] = {}
        if c.weighting == "fisher":
            fisher, self.fisher_info = fisher_pass.fisher_for(view.model, view.batches, names, view.device,
                                                              c.checkpointing, c.fisher_cache, None)
        costs = np.zeros((len(names), len(grid)))
        stored = np.zeros((len(names), len(grid)), dtype=np.int64)
        numel = np.array([m * n for m, n in view.shapes.values()], dtype=np.int64)
        cache = {"hits": 0, "computed": 0}
        by_layer = names_by_layer(view.model, names)
        index_of = {name: i for i, name in enumerate(names)}
        # several ranks price the matrices apart (each its share, by an SVD's cost) and exchange the errors
        owner = distributed.owners([(name, m * n * min(m, n)) for name, (m, n) in view.shapes.items()])
        priced: dict[str, dict[str, float]] = {}
        for visit in view.layers(last_layer=max(by_layer, default=-1)):  # weights read layer by layer (--stream)
            mine = {}  # this rank's matrices of the layer: name → (weight (m, n), its Fisher or None)
            for name in by_layer.get(visit.index, []):
                i = index_of[name]
                for j, config in enumerate(grid):
                    stored[i, j] = nf.stored_bits(config, int(numel[i]))
                if owner[name] == distributed.world().rank:
                    mine[name] = (weight_of(visit.module(name)).detach().float().to(view.device),
                                  fisher[name].to(view.device) if name in fisher else None)
                if name in fisher:
                    self.fisher[name] = fisher.pop(name)  # kept (on the CPU) for the walk's decomposition
            with timing.phase("pricing"):  # every (matrix, configuration)'s decomposition and error
                priced.update(self.price_all(mine, grid, view.device, cache))
            del mine
        priced = distributed.exchange(priced)
        for name, errors in priced.items():
            costs[index_of[name]] = [errors.get(config.label, 0.0) ** 2 for config in grid]
        counts = distributed.exchange({str(distributed.world().rank): cache}).values()  # every rank's
        cache = {kind: sum(count[kind] for count in counts) for kind in cache}
        if c.budget is None or len(grid) == 1:
            if c.budget is not None and int(stored[:, 0].sum()) > c.budget * int(numel.sum()):
                raise CompressorError(f"lqlora: {grid[0].label} stores more than the budget of {c.budget} bits")
            allocation = bit_allocation.Allocation([0] * len(names), float(costs[:, 0].sum()),
                                                   int(stored[:, 0].sum()), int(numel.sum()), "one configuration")
        else:  # solved once (rank 0 in a run of several ranks), so every rank takes the same allocation
            allocation = distributed.broadcast(bit_allocation.allocate(costs, stored, numel, c.budget, c.time_limit)
                                               if distributed.world().main else None)
        assignment = {name: grid[j] for name, j in zip(names, allocation.choice)}
        allocated = {}  # name → the chosen pair's error, as priced (none for a single configuration)
        if len(grid) > 1:
            allocated = {name: math.sqrt(costs[i, j]) for i, (name, j) in enumerate(zip(names, allocation.choice))}
        return Decision(self.record(allocation, grid, names, stored, numel, cache, assignment),
                        values={"assignment": assignment, "allocated": allocated})

    def record(self, allocation: bit_allocation.Allocation, grid: list[nf.NFConfig], names: list[str],
               stored: np.ndarray, numel: np.ndarray, cache: dict, assignment: dict[str, nf.NFConfig]) -> dict:
        """The decision as compression.json records it: the budget met, and every matrix's configuration."""
        c = self.config
        counts: dict[str, int] = {}
        for name in names:
            counts[assignment[name].label] = counts.get(assignment[name].label, 0) + 1
        matrices = {name: {"config": assignment[name].label, "bits": assignment[name].bits,
                           "bits_per_weight": int(stored[i, allocation.choice[i]]) / int(numel[i])}
                    for i, name in enumerate(names)}
        record = {"budget": c.budget, "bits_per_weight": allocation.bits_per_param, "bits_stored": allocation.bits,
                  "weights": allocation.params, "rank": c.rank, "weighting": c.weighting,
                  "solver": "scipy.optimize.milp (HiGHS)" if len(grid) > 1 and c.budget is not None else None,
                  "status": allocation.status, "objective": allocation.objective,
                  "grid": [config.label for config in grid], "configurations": dict(sorted(counts.items())),
                  "error_cache": cache, "matrices": matrices}
        if c.weighting == "fisher":
            record["fisher_cache"] = "hit" if self.fisher_info.get("hit") else "computed"
        return record

    def compress_linear(self, target: Target, ctx: LayerContext) -> Outcome:
        assignment = target.decision.values.get("assignment", {})
        if target.name not in assignment:
            raise CompressorError(f"lqlora: no configuration for {target.name} (decide did not run for it)")
        config = assignment[target.name]
        fisher = self.fisher.pop(target.name, None)
        fisher = fisher.to(target.weight.device) if fisher is not None else None
        result = self.decompose(target.weight, config, fisher)
        base = NormalFloatLinear.from_codes(result.codes, target.bias, target.dense_class, dtype=ctx.dtype)
        module = base
        if result.up is not None:
            lora = LowRankLinear.from_factors(result.up, result.down, None, target.dense_class, dtype=ctx.dtype)
            module = CompensatedLinear(base, lora)
        m, n = target.weight.shape
        root = None if fisher is None else lqlora_math.fisher_weights(fisher, self.config.eps)[2]
        norm = lqlora_math.reconstruction_error(target.weight, torch.zeros_like(target.weight), root)
        quant_only = lqlora_math.quantization_error(target.weight, config, fisher)
        stored = nf.stored_bits(config, m * n)
        extra = {"base_kind": NormalFloatLinear.kind, "nf_config": config.label, "bits": config.bits,
                 "block_size": config.block_size, "scale_bits": config.scale_bits,
                 "scale_group_size": config.group_size, "scale_dtype": config.scale_dtype,
                 "quantized_bits": stored, "bits_per_weight": stored / (m * n), "nominal_bits": nf.nominal_bits(config),
                 "iterations": len(result.errors), "best_iteration": result.best + 1,
                 "rel_lq_error": result.error / norm if norm > 0 else 0.0,
                 "rel_quant_only_error": quant_only / norm if norm > 0 else 0.0,
                 "allocated_error": target.decision.values["allocated"].get(target.name), "lq_error": result.error,
                 "weighting": self.config.weighting}
        note = config.label + (f" + rank {self.config.rank}" if result.up is not None else "")
        return Outcome(module, rank=self.config.rank or None, note=note, extra=extra)
