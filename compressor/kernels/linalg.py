"""Shared linear algebra: square roots of a Gram matrix and the whitened truncated SVD.

Notation (docs/methods.md#notation): a linear computes ``y = x Wᵀ`` with ``W`` of shape (out, in) = (m, n);
the calibration inputs ``X`` (N, n) give the Gram ``G = XᵀX`` (n, n). For any ``S`` with ``S Sᵀ = G``

    min_{rank(Ŵ) ≤ r} ‖(W − Ŵ) Xᵀ‖_F = ‖(W − Ŵ) S‖_F   is solved by   U Σ Vᵀ = svd(W S),
    Ŵ = U_r Σ_r V_rᵀ S⁻¹,   up = U_r Σ_r^½ (m, r),   down = Σ_r^½ V_rᵀ S⁻¹ (r, n).

The square root is pluggable (``Whitening``): none (plain SVD), diagonal (ASVD: ``diag(mean|x|)^α``),
Cholesky (SVD-LLM) and eigh with a relative cut-off (EoRA / GPTQModel). Factorizations run in fp64.

Regularization, documented once:
- Cholesky: a Gram that is not numerically positive definite (rank-deficient calibration, dead
  channels) gets ``G + δ·I`` with ``δ = max(0, −λ_min) + 1e-6·mean(diag G)``, retried with δ ×10
  up to five times. SVD-LLM does the same with an absolute 1e-6; a relative jitter is scale-free.
- eigh: eigenvalues ``≤ λ_max · cutoff`` (default ``n · eps_fp32``) are dropped: their square root
  and inverse square root are set to zero (a truncated pseudo-inverse, GPTQModel's fix for outliers).
- diagonal: entries are floored at ``1e-6 · max`` so ``S⁻¹`` stays finite.

Weighting on both sides (``left``: a diagonal row weight, e.g. LQ-LoRA's Fisher row sums) and a randomized
SVD (``Sketch``, seeded) are options of the same kernel. ``output_side_svd`` reaches the same factors from the
output Gram ``W G Wᵀ`` (m, m), the smaller one for a wide matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..errors import CompressorError

WhiteningKind = Literal["none", "diagonal", "cholesky", "eigh"]


@dataclass
class Whitening:
    """A square root ``S`` of the Gram (``S Sᵀ = G``) and how to apply ``S`` and ``S⁻¹`` on the right.

    ``factor`` is None (identity), a vector (n,) for a diagonal ``S``, the lower Cholesky factor (n, n),
    or ``Q Λ^½`` (n, n); ``inverse`` is ``Λ^-½ Qᵀ`` (n, n) for eigh and unused otherwise.
    """

    kind: WhiteningKind
    factor: Tensor | None = None
    inverse: Tensor | None = None
    jitter: float = 0.0  # δ added to the Gram's diagonal (Cholesky); 0 if none was needed
    dropped: int = 0  # eigenvalues cut off (eigh)

    def apply(self, weight: Tensor) -> Tensor:
        """``W S``: (m, n) → (m, n)."""
        if self.kind == "none":
            return weight
        factor = self.factor.to(weight.dtype)
        if self.kind == "diagonal":
            return weight * factor[None, :]
        return weight @ factor

    def gram(self) -> Tensor | None:
        """``S Sᵀ`` (n, n) fp64: the Gram this whitening is a root of (jitter included); None for the identity."""
        if self.kind == "none":
            return None
        factor = self.factor.double()
        if self.kind == "diagonal":
            return torch.diag(factor**2)
        return factor @ factor.T

    def unapply(self, down: Tensor) -> Tensor:
        """``A S⁻¹``: (r, n) → (r, n)."""
        if self.kind == "none":
            return down
        if self.kind == "diagonal":
            return down / self.factor.to(down.dtype)[None, :]
        if self.kind == "cholesky":
            return torch.linalg.solve_triangular(self.factor.to(down.dtype), down, upper=False, left=False)
        return down @ self.inverse.to(down.dtype)


def identity() -> Whitening:
    return Whitening("none")


def diagonal(scale: Tensor, alpha: float = 1.0) -> Whitening:
    """ASVD-style ``S = diag(scale^α)`` (scale: mean |x| per input channel, or √Fisher)."""
    s = scale.double().clamp_min(0) ** alpha
    floor = float(s.max()) * 1e-6 if s.numel() and float(s.max()) > 0 else 1e-12
    return Whitening("diagonal", s.clamp_min(floor))


def cholesky(gram: Tensor, tries: int = 5) -> Whitening:
    """``S = chol(G)`` (lower), in fp64, with the documented jitter on failure: ``G + δI``, δ from the least
    eigenvalue, ×10 per try. Memory: at most two n×n matrices besides ``gram`` (the shift is made on the
    diagonal of one working copy, never with an identity matrix), which matters at n = 28,672 (6.6 GB each)."""
    gram = gram.double()
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        return Whitening("cholesky", factor)
    del factor
    scale = float(torch.diagonal(gram).mean().clamp_min(1e-30))
    lam_min = float(torch.linalg.eigvalsh(gram)[0])
    delta = max(0.0, -lam_min) + 1e-6 * scale
    shifted = gram.clone()  # (n, n): G with its diagonal shifted, exactly G + δ·I
    diagonal, original = shifted.diagonal(), gram.diagonal()
    for _ in range(tries):
        torch.add(original, delta, out=diagonal)
        factor, info = torch.linalg.cholesky_ex(shifted)
        if int(info) == 0:
            return Whitening("cholesky", factor, jitter=delta)
        del factor
        delta *= 10
    raise CompressorError("Gram matrix could not be factorized (Cholesky failed after regularization)")


def eigh(gram: Tensor, cutoff: float | None = None) -> Whitening:
    """``S = Q Λ^½`` with a truncated pseudo-inverse ``Λ^-½ Qᵀ``; eigenvalues ≤ λ_max·cutoff dropped."""
    gram = gram.double()
    n = gram.shape[0]
    if cutoff is None:
        cutoff = min(1.0, n * torch.finfo(torch.float32).eps)
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    keep = evals > evals[-1].clamp_min(0) * cutoff
    root = torch.where(keep, evals.clamp_min(0).sqrt(), torch.zeros_like(evals))
    inv_root = torch.where(keep, 1.0 / root.where(keep, torch.ones_like(root)), torch.zeros_like(evals))
    return Whitening("eigh", evecs * root[None, :], inv_root[:, None] * evecs.T, dropped=int((~keep).sum()))


def from_gram(gram: Tensor, method: Literal["cholesky", "eigh"] = "cholesky", **kwargs) -> Whitening:
    return cholesky(gram, **kwargs) if method == "cholesky" else eigh(gram, **kwargs)


def svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``U Σ Vh`` of (m, n). LAPACK is faster on tall inputs, so a wide one is done transposed."""
    m, n = matrix.shape
    if m < n:
        u, s, vh = torch.linalg.svd(matrix.T, full_matrices=False)
        return vh.T, s, u.T
    return torch.linalg.svd(matrix, full_matrices=False)


@dataclass(frozen=True)
class Sketch:
    """Settings of a randomized SVD (Halko, Martinsson & Tropp 2011, Alg. 4.4; what ``torch.svd_lowrank``
    does): ``oversample`` extra columns, ``power_iterations`` subspace iterations, a seeded Gaussian."""

    oversample: int = 10
    power_iterations: int = 2
    seed: int = 0


def randomized_svd(matrix: Tensor, rank: int, sketch: Sketch) -> tuple[Tensor, Tensor, Tensor]:
    """The leading ``q = min(rank + oversample, m, n)`` singular triplets ``U (m, q), Σ (q,), Vh (q, n)`` of
    ``matrix`` (m, n), from a Gaussian test matrix drawn with its own generator (seeded: the same numbers
    every call, unlike ``torch.svd_lowrank``'s global RNG)."""
    m, n = matrix.shape
    q = min(rank + sketch.oversample, m, n)
    generator = torch.Generator(device="cpu").manual_seed(sketch.seed)
    test = torch.randn(n, q, generator=generator, dtype=matrix.dtype).to(matrix.device)  # (n, q)
    basis = torch.linalg.qr(matrix @ test).Q  # (m, q)
    for _ in range(sketch.power_iterations):  # re-orthonormalized each half step
        basis = torch.linalg.qr(matrix @ torch.linalg.qr(matrix.mT @ basis).Q).Q
    u, s, vh = torch.linalg.svd(basis.mT @ matrix, full_matrices=False)  # (q, q), (q,), (q, n)
    return basis @ u, s, vh


def whitened_svd(
    weight: Tensor, rank: int, whitening: Whitening | None = None, dtype: torch.dtype = torch.float64,
    left: Tensor | None = None, sketch: Sketch | None = None, solver: Literal["full", "gram"] = "full",
) -> tuple[Tensor, Tensor, Tensor]:
    """Best rank-``rank`` approximation of ``weight`` (m, n) under ``whitening`` (and ``left``).

    Returns ``up`` (m, r), ``down`` (r, n) with ``Ŵ = up @ down``, and the singular values of ``W S``
    (all of them; the leading ``rank + oversample`` with a ``sketch``). ``√Σ`` is split between the two
    factors, as SVD-LLM, ASVD and EoRA do. ``left`` (m,), positive row weights ``d``: weighting on both sides,
    ``min ‖diag(d) (W − Ŵ) S‖_F``, solved by the SVD of ``diag(d) W S`` with ``up = diag(d)⁻¹ U_r Σ_r^½``
    (floored at 1e-6 of its maximum, as ``diagonal``). ``sketch``: a randomized SVD (``randomized_svd``)
    instead of the exact one. ``solver`` gram (a tall matrix, m ≥ n, without a sketch): the same factors from
    the eigendecomposition of the n×n Gram of ``W S`` (``gram_svd``), never an m×n copy.
    """
    whitening = whitening or identity()
    m, n = weight.shape
    if not 0 < rank <= min(m, n):
        raise CompressorError(f"rank {rank} is out of range for a {m}×{n} matrix (1..{min(m, n)})")
    rows = None
    if left is not None:
        rows = diagonal(left.to(weight.device)).factor.to(dtype)  # (m,), floored
    if solver == "gram" and sketch is None and m >= n:
        return gram_svd(weight, rank, whitening, dtype, rows)
    work = whitening.apply(weight.to(dtype))
    if rows is not None:
        work = rows[:, None] * work
    u, s, vh = svd(work) if sketch is None else randomized_svd(work, rank, sketch)
    root = s[:rank].sqrt()
    up = u[:, :rank] * root[None, :]  # (m, r)
    if rows is not None:
        up = up / rows[:, None]
    down = whitening.unapply(root[:, None] * vh[:rank])  # (r, n)
    return up, down, s


def gram_svd(weight: Tensor, rank: int, whitening: Whitening, dtype: torch.dtype = torch.float64,
             rows: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``whitened_svd`` of a tall ``weight`` (m, n), m ≥ n, from the eigendecomposition of ``K = (W S)ᵀ W S``
    (n, n; with row weights d: ``(D W S)ᵀ D W S``), built and used in row chunks of ``W S``: memory
    O(n² + m·r) where LAPACK's SVD of ``W S`` holds several m×n matrices (about 650 MB for Llama-3's
    gate_proj in fp64). ``K = V Σ² Vᵀ`` gives ``up = W S V_r Σ_r^-½`` (m, r) and ``down = Σ_r^½ V_rᵀ S⁻¹``
    (r, n), the same split as the SVD's. It squares the condition number: a singular value below about
    ``σ_1 · 1e-8`` (fp64) is not resolved, which only a truncation keeping nearly everything would reach.
    Returns (up, down, singular values (n,) descending)."""
    m, n = weight.shape
    chunks = row_chunks(m, n)

    def whitened(rows_slice: slice) -> Tensor:  # (c, n): the rows of D W S
        block = whitening.apply(weight[rows_slice].to(dtype))
        return block if rows is None else rows[rows_slice, None] * block

    kernel = torch.zeros(n, n, dtype=dtype, device=weight.device)  # (n, n): K
    for chunk in chunks:
        block = whitened(chunk)
        kernel.addmm_(block.T, block)
    evals, evecs = torch.linalg.eigh((kernel + kernel.T) / 2)  # ascending
    del kernel
    s = evals.flip(0).clamp_min(0).sqrt()  # (n,)
    basis = evecs.flip(1)[:, :rank].contiguous()  # (n, r): V_r
    del evecs
    root = s[:rank].clamp_min(float(s[0]) * 1e-12 if s[0] > 0 else 1e-30).sqrt()
    up = torch.empty(m, rank, dtype=dtype, device=weight.device)  # (m, r)
    for chunk in chunks:
        up[chunk] = (whitened(chunk) @ basis) / root[None, :]
        if rows is not None:
            up[chunk] /= rows[chunk, None]
    down = whitening.unapply(root[:, None] * basis.T)  # (r, n)
    return up, down, s


def output_spectrum(gram_of_outputs: Tensor) -> Tensor:
    """The singular values (m,) of ``W S``, descending, from ``P = W G Wᵀ`` (m, m): the square roots of its
    eigenvalues (negative rounding clamped to 0)."""
    gram = gram_of_outputs.double()
    return torch.linalg.eigvalsh((gram + gram.T) / 2).flip(0).clamp_min(0).sqrt()


def output_side_svd(weight: Tensor, gram_of_outputs: Tensor, rank: int,
                    dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor, Tensor]:
    """``whitened_svd`` under ``S Sᵀ = G`` from the output side: the same ``up`` (m, r), ``down`` (r, n) and
    singular values of ``W S``, from ``P = W G Wᵀ`` (m, m; ``TensorStats.gram_about`` of the outputs and the
    bias) alone, never an (n, n) matrix.

    ``W S`` = U Σ Vᵀ has ``P = U Σ² Uᵀ``, and its best rank-r approximation is ``U_r U_rᵀ W S``, so
    ``Ŵ = U_r U_rᵀ W`` (a projection of the outputs onto their r leading directions), split as SVD-LLM's:
    ``up = U_r Σ_r^½``, ``down = Σ_r^-½ U_rᵀ W`` (= Σ_r^½ V_rᵀ S⁻¹). No S⁻¹ is formed, so a singular Gram needs
    no jitter. For a wide W (n > m) this is the cheaper side: an m×m eigendecomposition instead of an n×n
    Cholesky and an m×n SVD. Row weights d (``lord_factors``): pass diag(d) W and diag(d) P diag(d).
    For the split, singular values are floored at ``σ_1 · 1e-12`` (both factors stay finite)."""
    m, n = weight.shape
    if not 0 < rank <= min(m, n):
        raise CompressorError(f"rank {rank} is out of range for a {m}×{n} matrix (1..{min(m, n)})")
    gram_of_outputs = gram_of_outputs.to(device=weight.device, dtype=dtype)
    evals, evecs = torch.linalg.eigh((gram_of_outputs + gram_of_outputs.T) / 2)  # ascending
    s = evals.flip(0).clamp_min(0).sqrt()  # (m,) singular values of W S, descending
    basis = evecs.flip(1)[:, :rank]  # (m, r): U_r
    root = s[:rank].clamp_min(float(s[0]) * 1e-12 if s[0] > 0 else 1e-30).sqrt()
    up = basis * root[None, :]  # (m, r)
    down = torch.empty(rank, n, dtype=dtype, device=weight.device)  # (r, n), by column chunks of W
    for cols in row_chunks(n, m):
        down[:, cols] = (basis.T @ weight[:, cols].to(dtype)) / root[:, None]
    return up, down, s


def output_side_error(weight: Tensor, approx: Tensor, gram_of_outputs: Tensor) -> float:
    """``relative_error`` on the calibration inputs, ‖(W − Ŵ) Xᵀ‖_F / ‖W Xᵀ‖_F, from the output Gram
    ``P = W G Wᵀ`` alone, for an ``approx`` whose rows lie in W's row space (``output_side_svd``'s, Ŵ = Π W):
    with ΔW = R W, R = ΔW Wᵀ (W Wᵀ)⁻¹ (m, m; least squares), tr(ΔW G ΔWᵀ) = tr(R P Rᵀ). The two m×m products
    are summed over column chunks, so no fp64 copy of the (m, n) matrices is made."""
    gram = gram_of_outputs.double()
    m, n = weight.shape
    norm = torch.zeros(m, m, dtype=torch.float64, device=gram.device)  # W Wᵀ
    cross = torch.zeros_like(norm)  # ΔW Wᵀ
    for cols in row_chunks(n, m):
        block = weight[:, cols].to(gram)
        norm.addmm_(block, block.T)
        cross.addmm_(block - approx[:, cols].to(gram), block.T)
    residual = torch.linalg.lstsq(norm, cross.T).solution  # (m, m): Rᵀ (W Wᵀ symmetric)
    energy = torch.trace(gram)
    if not energy > 0:
        return 0.0
    return float((torch.trace(residual.T @ gram @ residual) / energy).clamp_min(0).sqrt())


def output_refit(weight: Tensor, cross: Tensor, whitening: Whitening, drift: Tensor | None = None) -> Tensor:
    """``W C G̃⁻¹`` (m, n) in fp64: the least-squares map from the inputs x̃ a module now sees to the outputs
    ``W x`` it had in the original model, ``argmin_M Σ ‖W x − M x̃‖²``; ``cross`` C = Σ x x̃ᵀ (n, n) (rows:
    the original input), G̃ = S Sᵀ the Gram ``whitening`` was made from (Cholesky, jitter included, or the
    pseudo-inverse of ``eigh``). Its whitened truncated SVD under the same ``whitening`` is the rank-r
    minimizer of ``Σ ‖W x − Ŵ x̃‖²`` (reduced-rank regression).

    ``drift`` D = Σ δ x̃ᵀ (m, n) adds a per-token offset δ (m,) to the target: ``(W C + D) G̃⁻¹`` is the
    least-squares map to ``W x + δ``. For a linear that writes into the residual stream (o, down), δ = r − r̃, the
    stream's drift where its output is added (original minus compressed), makes the target the original block
    output minus the compressed stream, ``y − r̃``: the block-output refit (AA-SVD, ResSVD)."""
    target = weight.double() @ cross.double().to(weight.device)  # (m, n): W C
    if drift is not None:
        target = target + drift.double().to(weight.device)  # (m, n): W C + D
    if whitening.kind == "cholesky":
        return torch.cholesky_solve(target.T, whitening.factor.to(target.device)).T  # (G̃ + δI)⁻¹ is symmetric
    if whitening.kind == "eigh":
        inverse = whitening.inverse.to(target.device)  # Λ^-½ Qᵀ: G̃⁺ = inverseᵀ inverse
        return (target @ inverse.T) @ inverse
    raise CompressorError(f"output_refit needs a Gram whitening (cholesky or eigh), not {whitening.kind}")


def first_order_scores(work: Tensor, whitening: Whitening, gradient: Tensor,
                       rows: Tensor | None = None) -> Tensor:
    """|⟨G, Δ_j⟩| (k,) fp64 for each component of the whitened SVD ``work = diag(d) W S = Σ_j σ_j u_j v_jᵀ``
    (k = min(m, n), in SVD order): ``Δ_j = diag(d)⁻¹ u_j σ_j v_jᵀ S⁻¹`` is what dropping component j removes
    from W (m, n), and ``⟨G, Δ_j⟩ = σ_j (d⁻¹ ⊙ u_j)ᵀ G (S⁻ᵀ v_j)`` its first-order effect on a loss whose
    gradient with respect to W is ``gradient`` G (m, n). ``rows`` d (m,): the output-side weight, or None."""
    u, s, vh = svd(work.double())  # (m, k), (k,), (k, n)
    grad = gradient.double().to(work.device)
    if rows is not None:
        grad = grad / rows.double().to(work.device)[:, None]  # d⁻¹ ⊙ rows of G
    back = whitening.unapply(vh)  # (k, n): rows v_jᵀ S⁻¹
    return s * ((u.T @ grad) * back).sum(1).abs()


def symmetric_sqrt(matrix: Tensor) -> Tensor:
    """``Σ^½`` (n, n) of a symmetric PSD matrix, fp64 ``eigh`` with negative eigenvalues clamped to 0."""
    matrix = matrix.double()
    evals, evecs = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (evecs * evals.clamp_min(0).sqrt()[None, :]) @ evecs.T


ROW_CHUNK_ELEMENTS = 1 << 21  # rows of a working chunk: about 2M elements (16 MB in fp64)


def row_chunks(rows: int, cols: int, elements: int = ROW_CHUNK_ELEMENTS) -> list[slice]:
    """Slices of at most ``elements // cols`` rows (at least one) covering ``rows``: the kernels that work row
    by row keep their temporaries to a chunk instead of a whole (m, n) matrix."""
    step = max(1, elements // max(cols, 1))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def relative_error(weight: Tensor, approx: Tensor, gram: Tensor | None = None) -> float:
    """‖W − Ŵ‖_F / ‖W‖_F, or the same measured on the calibration inputs when ``gram`` is given:
    sqrt(tr(ΔW G ΔWᵀ) / tr(W G Wᵀ)) = ‖(W − Ŵ) Xᵀ‖_F / ‖W Xᵀ‖_F. Summed in fp64 over row chunks, so it holds
    no fp64 copy of either (m, n) matrix (at Llama-3's width each is 470 MB)."""
    if weight.ndim != 2:  # activations (..., d): rows of d
        weight, approx = weight.reshape(-1, weight.shape[-1]), approx.reshape(-1, weight.shape[-1])
    num = den = torch.zeros((), dtype=torch.float64, device=weight.device)
    for rows in row_chunks(*weight.shape):
        chunk = weight[rows].double()  # (c, n)
        delta = chunk - approx[rows].double()
        if gram is None:
            num, den = num + delta.square().sum(), den + chunk.square().sum()
        elif gram.dtype == torch.float64:
            num = num + ((delta @ gram) * delta).sum()
            den = den + ((chunk @ gram) * chunk).sum()
        else:  # an fp32 Gram (GPTQ's hessian_dtype float32): in fp64 a column block at a time, never whole
            for cols in row_chunks(gram.shape[1], gram.shape[0]):
                block = gram[:, cols].double()  # (n, b)
                num = num + ((delta @ block) * delta[:, cols]).sum()
                den = den + ((chunk @ block) * chunk[:, cols]).sum()
    num = num.clamp_min(0)
    if not (torch.isfinite(num) and torch.isfinite(den)):
        return float("nan")  # a non-finite weight or approximation is never "no error"
    if not den > 0:
        return 0.0
    return float((num / den).sqrt())
