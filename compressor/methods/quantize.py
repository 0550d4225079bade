"""Weight-only integer quantization: round-to-nearest (RTN) and GPTQ (Frantar et al., 2022, arXiv:2210.17323).

Both emit a ``QuantizedLinear`` (packed integers, compressed-tensors layout; the grid is the one in
``compressor.quant``). RTN is data-free. GPTQ quantizes the columns of ``W`` (m, n) one at a time and
spreads each column's rounding error over the columns not yet quantized, using the inverse Hessian of the
layer's squared output error ``H = 2·XᵀX / N`` (n, n), built from the same Gram the pipeline collects:

    H ← H + λ·I,  λ = damp · mean(diag H);  U = chol(H⁻¹)ᵀ (upper)
    for column j:  q_j = Q(w_j);  e_j = (w_j − q_j) / U_jj;  w_{j+1:} −= e_j · U_{j, j+1:}

processed in blocks of ``block_size`` columns (lazy batch updates, paper §3 "Step 2"). Input channels
that never fire (``H_jj = 0``) get ``H_jj = 1`` and a zero weight, as in the reference code.

- ``group_size``: each run of ``group_size`` columns gets its own (scale, zero_point), computed from the
  error-updated weights when the loop reaches the group's first column (reference code);
- ``act_order``: columns in order of decreasing ``H_jj``. With groups, the group parameters are fixed
  from the weight before the loop ("static groups", compressed-tensors ``actorder: weight``), so the
  stored format is the same as without act-order (no ``g_idx``).

- ``preserve_rank`` (SRR's preserve-then-quantize, Cho et al., ICML 2026, arXiv:2602.02001): the top-k
  singular directions of ``W S`` (``S Sᵀ = G``, the input Gram's ``eigh`` root, EoRA's) are kept as a 16-bit
  low-rank path ``L_k = up_k down_k`` (m, k) (k, n) and only ``W − L_k`` is quantized; the module is a
  ``CompensatedLinear`` (Q, L_k), and a later ``eora`` step of rank r fills that one path up to rank r with the
  best rank-(r − k) fit of ``E_k = W − L_k − Q_k`` (EoRA's). ``auto`` chooses k per matrix among
  {0, r/4, r/2, 3r/4, r} (r: ``preserve_budget``) as the one whose chain leaves the least whitened output
  error ``‖(E_k − E_k,r−k) S‖_F`` = the root of the sum of the squared singular values of ``E_k S`` past
  r − k (closed form; one quantization per candidate). The paper estimates that error with one random probe
  instead of quantizing each candidate; k = 0 is today's quantization bit for bit (EoRA), k = r LQ-LoRA's split.

```yaml
steps:
  - method: quantize
    config: {algorithm: gptq, bits: 4, group_size: 128, symmetric: false}
```
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Literal

import torch
from torch import Tensor

from ..config.configs import field
from ..contract import LayerContext, LinearCompressor, Outcome, Target
from ..kernels import linalg, quant
from ..kernels.hessian import hessian, hessian_in, inverse_hessian_factor, lends_memory, permute_
from ..kernels.one_thread import serial
from ..model.modules import CompensatedLinear, LowRankLinear, QuantizedLinear
from ..stats.accumulators import Request


@dataclass
class QuantizeConfig:
    algorithm: Literal["rtn", "gptq"] = field("rtn", "rtn (round-to-nearest, data-free) or gptq")
    bits: int = field(4, "bits per weight, 2..8")
    group_size: int | None = field(128, "input columns per (scale, zero point); null or 0: per channel")
    symmetric: bool = field(False, "symmetric grid (zero point 0) or asymmetric (min-max with a zero point)")
    damp: float = field(0.01, "GPTQ: damping λ = damp · mean(diag H)")
    act_order: bool = field(False, "GPTQ: columns in order of decreasing Hessian diagonal (static groups)")
    block_size: int = field(128, "GPTQ: columns per lazy-update block")
    hessian_dtype: Literal["float64", "float32"] = field(
        "float64", "GPTQ: precision of the Gram and the Hessian factorization; float32 is the GPTQ reference's "
        "(half the memory: the Gram summed in fp32 and factorized in its own memory, for models whose widest "
        "Hessian barely fits, e.g. 256 MB instead of ~770 MB at 8192 inputs)")
    preserve_rank: int | Literal["auto"] = field(
        0, "SRR preserve-then-quantize: k top whitened singular directions of W kept as a 16-bit low-rank path "
        "before W minus them is quantized (a later eora step fills the path up to its rank); auto: per matrix "
        "the k in {0, r/4, r/2, 3r/4, r} (r: preserve_budget) of least whitened output error after eora; 0: off")
    preserve_budget: int | None = field(
        None, "preserve_rank: the rank r of the whole low-rank path, the eora step's rank (needed by auto)")

    def __post_init__(self) -> None:
        if not quant.MIN_BITS <= self.bits <= quant.MAX_BITS:
            raise ValueError(f"bits must be in {quant.MIN_BITS}..{quant.MAX_BITS}; got {self.bits}")
        if self.group_size is not None and self.group_size < 0:
            raise ValueError(f"group_size must be ≥ 0 or null; got {self.group_size}")
        self.group_size = self.group_size or None
        if not 0 <= self.damp < 1:
            raise ValueError(f"damp must be in [0, 1); got {self.damp}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be ≥ 1; got {self.block_size}")
        if self.preserve_budget is not None and self.preserve_budget < 1:
            raise ValueError(f"preserve_budget must be ≥ 1; got {self.preserve_budget}")
        if self.preserve_rank == "auto":
            if self.preserve_budget is None:
                raise ValueError("preserve_rank auto needs preserve_budget (the rank of the eora step that follows)")
        elif self.preserve_rank < 0:
            raise ValueError(f"preserve_rank must be ≥ 0 or auto; got {self.preserve_rank}")
        elif self.preserve_budget is not None and self.preserve_rank > self.preserve_budget:
            raise ValueError(f"preserve_rank {self.preserve_rank} is larger than preserve_budget "
                             f"{self.preserve_budget}")

    @property
    def path_rank(self) -> int:
        """The most ranks the low-rank path this step leaves may have (0: a plain quantized module)."""
        return self.preserve_budget if self.preserve_rank == "auto" else self.preserve_rank

    def candidates(self) -> list[int]:
        """The preserved ranks k tried per matrix: the fixed one, or {0, r/4, r/2, 3r/4, r} for auto."""
        if self.preserve_rank != "auto":
            return [self.preserve_rank]
        return sorted({round(self.preserve_budget * part) for part in (0, 0.25, 0.5, 0.75, 1)})

    def validate(self, shapes: dict[str, tuple[int, int]]) -> None:
        for name, (m, n) in shapes.items():
            if self.path_rank > min(m, n):
                raise ValueError(f"preserved rank {self.path_rank} is larger than min(m, n) = {min(m, n)} of "
                                 f"{name} ({m}×{n})")

    def warnings(self, shapes: dict[str, tuple[int, int]]) -> list[str]:
        """Said before the run (``plan.compile``): a group size that does not divide every targeted input
        width gives a checkpoint compressed-tensors cannot describe (whole groups only), so neither vLLM nor
        stock ``transformers`` loads it; with the group size that would be servable."""
        size = self.group_size
        if not size:
            return []
        uneven = {name: n for name, (_, n) in shapes.items() if n % size}
        if not uneven:
            return []
        fix = quant.servable_group_size([n for _, n in shapes.values()], size)
        widths = ", ".join(map(str, sorted(set(uneven.values()))))
        suggestion = (f"group_size {fix} divides every targeted width (--set quantize.group_size={fix})" if fix
                      else "no power of two from 16 to it divides every targeted width; per-channel scales do "
                      "(--set quantize.group_size=null)")
        return [f"group_size {size} does not divide the input width ({widths}) of {len(uneven)} of the "
                f"{len(shapes)} targeted linears (e.g. {next(iter(uneven))}): the checkpoint will carry no "
                "quantization_config, so neither vLLM nor stock transformers can load it (compressor.load and "
                f"trust_remote_code=True can); {suggestion}"]


def compensated_error(residual: Tensor, whitening: linalg.Whitening, rank: int) -> float:
    """``‖(E − E_r) S‖_F``: the whitened output error ``‖(E − E_r) Xᵀ‖_F`` that ``residual`` E (m, n) leaves after
    its best rank-``rank`` compensation E_r under ``whitening`` (EoRA's): the root of the sum of the squared
    singular values of ``E S`` past the first ``rank``."""
    values = torch.linalg.svdvals(whitening.apply(residual.double()))
    return float(values[rank:].square().sum().sqrt())


UPDATE_CHUNK = 1 << 22  # entries of GPTQ's trailing-column update made at once (16 MB in fp32)


def gptq(weight: Tensor, h_inv_upper: Tensor, dead: Tensor, bits: int, symmetric: bool,
         group_size: int | None, act_order_perm: Tensor | None = None, block_size: int = 128,
         scale_dtype: torch.dtype | None = None, overwrite: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ of ``weight`` (m, n) → (q (m, n) int8, scale (m, G), zero_point (m, G) int32), in the original
    column order.

    ``h_inv_upper`` is ``inverse_hessian_factor`` of the Hessian already permuted by ``act_order_perm``
    (a permutation of the n columns, or None for the natural order). ``overwrite``: an fp32 ``weight`` that
    is the caller's own copy is worked on in place (no second m×n copy). The trailing-column update of a large
    matrix goes in column chunks (no m×n temporary; matrices under 4M entries take the one product).
    Each block is worked on transposed (b, m), so that a column is a contiguous row and each step is a few
    in-place operations on it (``_quantize_block``). A matrix of up to ``SERIAL_ELEMENTS`` entries runs on one
    thread from start to end: switching torch's threads back on between blocks for the few small operations
    there left the second thread spinning (2 threads: 4–5× the CPU seconds of one, same bits).
    """
    with serial(weight.numel()):
        return _gptq(weight, h_inv_upper, dead, bits, symmetric, group_size, act_order_perm, block_size,
                     scale_dtype, overwrite)


def _gptq(weight: Tensor, h_inv_upper: Tensor, dead: Tensor, bits: int, symmetric: bool, group_size: int | None,
          act_order_perm: Tensor | None, block_size: int, scale_dtype: torch.dtype | None,
          overwrite: bool) -> tuple[Tensor, Tensor, Tensor]:
    m, n = weight.shape
    w = weight if overwrite and weight.dtype == torch.float32 else weight.float().clone()
    w[:, dead] = 0
    size = group_size or n
    groups = quant.n_groups(n, group_size)
    scale = torch.ones(m, groups, device=w.device)
    zero_point = torch.zeros(m, groups, dtype=torch.int32, device=w.device)
    static = act_order_perm is not None or not group_size  # parameters fixed before the loop
    if static:
        scale, zero_point = quant.quant_params(w, bits, symmetric, group_size, scale_dtype)
    perm = act_order_perm if act_order_perm is not None else torch.arange(n, device=w.device)
    if act_order_perm is not None:
        w = w[:, perm]  # (natural order: w is already this call's own copy)
    group_of = perm // size  # (n,) group of each (permuted) column
    q_t = torch.empty(n, m, dtype=torch.int8, device=w.device)  # q transposed: column j is row j
    for start in range(0, n, block_size):
        end = min(start + block_size, n)
        block = w[:, start:end].T.contiguous()  # (b, m): the block's columns as rows
        if static:  # (b, m) each column's scale and zero point
            params = (scale[:, group_of[start:end]].T.contiguous(), zero_point[:, group_of[start:end]].T.float())
        else:
            params = None
        with serial():  # thousands of small operations: threads would wait on each other at every one
            errors = _quantize_block(block, h_inv_upper[start:end, start:end], q_t[start:end], bits, params,
                                     lambda i: _group_params(w, block, start, end, i, size, bits, symmetric,
                                                             scale_dtype, scale, zero_point))
        step = n if m * (n - end) <= UPDATE_CHUNK else max(1, UPDATE_CHUNK // m)
        with serial(m * (n - end)):  # the trailing columns' update: threaded where it is large
            for first in range(end, n, step):
                w[:, first:first + step] -= errors @ h_inv_upper[start:end, first:first + step]
    q = q_t.T if act_order_perm is None else q_t[torch.argsort(perm)].T
    return q.contiguous(), scale, zero_point


def _group_params(w: Tensor, block: Tensor, start: int, end: int, i: int, size: int, bits: int, symmetric: bool,
                  scale_dtype: torch.dtype | None, scale: Tensor, zero_point: Tensor) -> tuple[Tensor, Tensor] | None:
    """Natural order with groups: at a group's first column (``start + i``), its (scale, zero point) (m,) each
    from its ``size`` columns as the loop has updated them (the block's, then the trailing ones in ``w``),
    stored in ``scale`` / ``zero_point``; at a block's first column inside a group, that group's; None elsewhere
    (the column's group is the previous column's)."""
    column, group = start + i, (start + i) // size
    if column % size == 0:
        current = torch.cat([block[i:i + size].T, w[:, end:end + max(0, size - (end - column))]], dim=1)
        s, z = quant.quant_params(current, bits, symmetric, None, scale_dtype)
        scale[:, group], zero_point[:, group] = s[:, 0], z[:, 0]
    elif i:
        return None
    return scale[:, group].contiguous(), zero_point[:, group].float()


def _quantize_block(block: Tensor, h_block: Tensor, q_block: Tensor, bits: int,
                    params: tuple[Tensor, Tensor] | None, group_params) -> Tensor:
    """GPTQ's column loop over one block, transposed: ``block`` (b, m) (row i: column i of the block, updated in
    place), ``h_block`` (b, b) its part of the upper factor, ``q_block`` (b, m) int8 filled with the integers.
    ``params``: (scale, zero point) (b, m) of every column (static), or None: ``group_params(i)`` gives a new
    group's at its first column. Returns the scaled errors (m, b) the trailing columns' update reads."""
    q_min, q_max = quant.qrange(bits)
    b, m = block.shape
    errors = torch.empty_like(block)  # (b, m)
    values = torch.empty(1, m, device=block.device)
    integers = torch.empty_like(block)  # (b, m) the integers as floats, to q_block once the block is done
    # row views made once per block, (1, m) each: indexing inside the loop costs as much as the arithmetic
    columns, scaled_errors = block.unsqueeze(1).unbind(), errors.unsqueeze(1).unbind()
    rows = integers.unsqueeze(1).unbind()
    h_rows, h_diagonal = h_block.unsqueeze(-1).unbind(), h_block.diagonal().unbind()  # (b, 1) each; 0-dim each
    scales, zeros = (params[0].unsqueeze(1).unbind(), params[1].unsqueeze(1).unbind()) if params else (None, None)
    s = z = None
    for i in range(b):
        if params is not None:
            s, z = scales[i], zeros[i]
        else:
            s, z = group_params(i) or (s, z)
        column, error = columns[i], scaled_errors[i]
        torch.div(column, s, out=rows[i]).round_().add_(z).clamp_(q_min, q_max)
        torch.sub(rows[i], z, out=values).mul_(s)
        torch.sub(column, values, out=error).div_(h_diagonal[i])
        if i + 1 < b:
            block[i + 1:].sub_(h_rows[i][i + 1:] * error)  # (b - i - 1, m): the rest of the block
    q_block.copy_(integers)
    return errors.T.contiguous()


def _own_copy(target: Target) -> bool:
    """Whether ``target.weight`` was made for this step alone (a converted or dequantized copy), sharing memory
    with neither the module nor the original weight: then GPTQ may work in it."""
    mine = target.weight.untyped_storage().data_ptr()
    return all(mine != t.untyped_storage().data_ptr()
               for t in (*target.module.parameters(), *target.module.buffers(), target.original))


class Quantize(LinearCompressor):
    name = "quantize"
    Config = QuantizeConfig
    summary = "integer weight quantization, packed: rtn | gptq; 2-8 bits, groups, (a)symmetric"
    paper = "arXiv:2210.17323"

    def requests(self) -> tuple[Request, ...]:
        if self.config.algorithm != "gptq" and not self.config.path_rank:
            return ()
        return (Request("gram", precision=self.config.hessian_dtype),)

    def preview(self, shapes: dict[str, tuple[int, int]], model_params: int) -> dict[str, dict]:
        """The quantized weight, and with ``preserve_rank`` the low-rank path it carries (``path_rank``: for auto,
        the most it may have)."""
        cfg = self.config
        path = {"path_rank": cfg.path_rank} if cfg.path_rank else {}
        return {name: {"rank": None, "params": m * n, "bits": cfg.bits, "group_size": cfg.group_size or n,
                       "symmetric": cfg.symmetric, **path} for name, (m, n) in shapes.items()}

    @property
    def _dtype(self) -> torch.dtype:
        return torch.float64 if self.config.hessian_dtype == "float64" else torch.float32

    def _factor_of(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(upper factor, dead columns, act-order permutation) from the scratch Hessian ``h``."""
        perm = None
        if self.config.act_order:
            perm = torch.argsort(torch.diagonal(h), descending=True)
            h = permute_(h, perm)  # in the scratch's own memory
        upper, dead = inverse_hessian_factor(h, self.config.damp, overwrite=True, dtype=self._dtype)
        if perm is not None:
            dead = dead[torch.argsort(perm)]  # back to the natural column order
        return upper, dead, perm

    def _factor(self, target: Target) -> tuple[Tensor, Tensor, Tensor | None]:
        # a Gram that lends no memory: ``hessian`` is a fresh copy, so the factor may stay in it
        return self._factor_of(hessian(target.stats.gram.to(target.weight.device), target.stats.n_tokens,
                                       self._dtype))

    @contextmanager
    def _factored(self, target: Target, ctx: LayerContext) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
        """The factor for GPTQ's loop. A Gram that lends its memory (``hessian_in``) is factorized in it for
        this target alone (its bytes wait in a temporary file until the loop is done); smaller ones once per
        input, shared by the modules reading it (q/k/v)."""
        gram = target.stats.gram.to(target.weight.device)
        if not lends_memory(gram, self._dtype):
            yield ctx.per_input(self, target, self._factor)
            return
        with hessian_in(gram, target.stats.n_tokens, self._dtype) as h:
            yield self._factor_of(h)

    @contextmanager
    def _quantizer(self, target: Target, ctx: LayerContext) -> Iterator[Callable[..., tuple[Tensor, Tensor, Tensor]]]:
        """``quantize(weight, overwrite)`` → (q (m, n) int8, scale (m, G), zero point (m, G)) of any (m, n) weight
        of this target: RTN, or GPTQ with the target's Hessian factor (made once, whatever the weights tried)."""
        cfg = self.config
        if cfg.algorithm != "gptq":
            yield lambda weight, overwrite=False: quant.rtn(weight, cfg.bits, cfg.symmetric, cfg.group_size, ctx.dtype)
            return
        with self._factored(target, ctx) as factor:
            yield lambda weight, overwrite=False: gptq(weight, factor[0], factor[1], cfg.bits, cfg.symmetric,
                                                       cfg.group_size, factor[2], cfg.block_size, ctx.dtype,
                                                       overwrite=overwrite)

    def _whitening(self, target: Target) -> linalg.Whitening:
        return linalg.eigh(target.stats.gram)

    def _module(self, q: Tensor, scale: Tensor, zero_point: Tensor, target: Target,
                ctx: LayerContext) -> QuantizedLinear:
        cfg = self.config
        return QuantizedLinear.from_integers(q, scale.to(ctx.dtype), zero_point, cfg.bits, cfg.group_size,
                                             cfg.symmetric, target.bias, target.dense_class, dtype=ctx.dtype)

    def compress_linear(self, target: Target, ctx: LayerContext) -> Outcome:
        cfg = self.config
        if cfg.path_rank:
            return self._preserve_then_quantize(target, ctx)
        with self._quantizer(target, ctx) as quantize:
            q, scale, zero_point = quantize(target.weight, overwrite=_own_copy(target))
        return Outcome(self._module(q, scale, zero_point, target, ctx),
                       extra={"bits": cfg.bits, "group_size": cfg.group_size})

    def _preserve_then_quantize(self, target: Target, ctx: LayerContext) -> Outcome:
        """SRR: for each candidate k, quantize ``W − L_k`` (L_k: the top-k whitened SVD of W, as stored) and price
        the chain's whitened output error after eora's r − k ranks; keep the k of least error (ties: the
        smaller k). k = 0 gives the plain quantized module."""
        cfg = self.config
        whitening = ctx.per_input(self, target, self._whitening)  # before GPTQ may borrow the Gram's memory
        candidates = cfg.candidates()
        budget = cfg.preserve_budget if cfg.preserve_budget is not None else cfg.path_rank
        up, down, _ = linalg.whitened_svd(target.weight, max(candidates), whitening)  # (m, k_max), (k_max, n)
        up, down = up.to(ctx.dtype), down.to(ctx.dtype)  # as stored: Q absorbs the factors' rounding
        best, errors = None, {}
        with self._quantizer(target, ctx) as quantize:
            for k in candidates:
                kept = up[:, :k].float() @ down[:k].float() if k else None  # (m, n) L_k
                rest = target.weight - kept if k else target.weight.clone()
                q, scale, zero_point = quantize(rest, overwrite=True)
                if len(candidates) > 1:
                    dequantized = quant.dequantize(q, scale.to(ctx.dtype).float(), zero_point, cfg.group_size)
                    errors[k] = compensated_error(rest - dequantized, whitening, budget - k)
                if best is None or errors[k] < errors[best[0]]:
                    best = (k, q, scale, zero_point)
        k, q, scale, zero_point = best
        module = self._module(q, scale, zero_point, target, ctx)
        extra = {"bits": cfg.bits, "group_size": cfg.group_size, "preserved_rank": k}
        if len(candidates) > 1:
            extra["preserve_errors"] = {str(c): round(e, 6) for c, e in errors.items()}
        if not k:
            return Outcome(module, extra=extra)
        path = LowRankLinear.from_factors(up[:, :k], down[:k], None, target.dense_class, dtype=ctx.dtype)
        return Outcome(CompensatedLinear(module, path), rank=k, extra=extra)
