"""MoDeGPT's module algorithms and its sparsity allocation, as pure functions (docs/methods.md#modegpt-modegpt).

No official code exists; where the paper is silent this follows the unofficial implementation
(cbacary/MoDeGPT, vendored by LowRankArena), as docs/methods.md#modegpt-modegpt records it. Everything runs in fp64.
Weights are in the ``nn.Linear`` layout (out, in). Covariances are of the calibration activations,
``C = Σ_t x_t x_tᵀ / N`` (the reference normalizes by the token count, so its ridges are absolute).

- **Type I, MLP (Nyström).** ``C`` is the covariance of the intermediate activation (the input of
  ``down_proj``, d_int × d_int). Keep the k channels of largest ridge leverage ``[C (C + λI)⁻¹]_jj``
  (the reference takes the smallest ``[(C + λI)⁻¹]_jj``: the same order, since the two sum to 1 per λ),
  slice gate/up rows to them and refit down by least squares on the kept channels:
  ``down' = down Cᵀ_{:,J} (C_{J,J} + εI)⁻¹``, shape (d, k) (``nystrom_down``).
- **Type II, query–key (CR).** Per head, the score of dim j is ``‖C_q^½[:, j]‖ · ‖C_k^½[:, j]‖`` from
  the covariances of the query and key projections' outputs (= ``√(C_q,jj C_k,jj)``: the reference
  forms the square roots by eigh; their column norms are the diagonals' roots). With RoPE
  (``rotate_half``: dims j and j + d_h/2 rotate together) dims are kept in pairs scored
  ``‖q_j‖²‖k_j‖² + ‖q_{j'}‖²‖k_{j'}‖²`` (the reference's squared form). With GQA the scores of a KV group's query heads are summed and one
  mask serves the KV head and all its query heads (``qk_keep``).
- **Type III, value–output (SVD).** ``C`` is the covariance of the attention input. Per KV head
  ``√C W_Vᵀ = U S Vᵀ``; with one query head per KV head (MHA) a second SVD ``S Vᵀ W_Oᵀ = U' S' V'ᵀ``
  makes the truncation the optimum of ``‖X (W_V W_O − Ŵ_V Ŵ_O)‖`` (``v' = (√C⁻¹ U U'_k)ᵀ``,
  ``o' = (S'_k V'_kᵀ)ᵀ``); with GQA only the first SVD is truncated, ``v' = (√C⁻¹ U_k)ᵀ`` and each query
  head's ``o' = ((S Vᵀ W_Oᵀ)_k)ᵀ`` (the reference's ``compress_head_grouped``) (``vo_head``).
- **Sparsity per layer.** Block influence ``s_l`` (mean 1 − cos between a layer's input and output
  hidden states); ``φ = L·φ_avg·softmax(−s/ε)``, capped, the excess given to the uncapped layers in
  proportion to their share (``allocate_sparsity``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def covariance_sqrt(cov: Tensor, ridge: float = 0.0) -> tuple[Tensor, Tensor]:
    """(``√(C + ridge·I)``, its inverse) by fp64 eigh, eigenvalues clamped at 0 (the inverse: a
    pseudo-inverse)."""
    cov = cov.double()
    cov = (cov + cov.T) / 2 + ridge * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    evals, evecs = torch.linalg.eigh(cov)
    root = evals.clamp_min(0).sqrt()
    keep = root > root.max() * 1e-12
    inv_root = torch.where(keep, 1.0 / torch.where(keep, root, torch.ones_like(root)), torch.zeros_like(root))
    return (evecs * root) @ evecs.T, (evecs * inv_root) @ evecs.T


# --- Type I: MLP ---------------------------------------------------------------------------------------


def ridge_leverage(cov: Tensor, ridge: float) -> Tensor:
    """``diag(C (C + λI)⁻¹)`` (d_int,): the ridge leverage score of each intermediate channel. ``C + λI`` is
    positive definite: its inverse from its Cholesky factor (half the work of an LU inverse)."""
    cov = cov.double()
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    return 1.0 - ridge * torch.diagonal(torch.cholesky_inverse(torch.linalg.cholesky(cov + ridge * eye)))


def mlp_keep(cov: Tensor, keep: int, ridge: float = 1e-2) -> Tensor:
    """Sorted indices (keep,) of the intermediate channels of largest ridge leverage."""
    if not 0 < keep <= cov.shape[0]:
        raise ValueError(f"keep {keep} is out of range for {cov.shape[0]} channels")
    return torch.topk(ridge_leverage(cov, ridge), keep).indices.sort().values


def nystrom_down(cov: Tensor, kept: Tensor, down: Tensor, jitter: float = 1e-6) -> Tensor:
    """The least-squares refit (d, k) of ``down`` (d, d_int) on the kept channels: minimizes
    ``Σ_t ‖down h_t − down' h_t[J]‖²`` = ``down Cᵀ_{:,J} (C_{J,J} + εI)⁻¹``."""
    cov = cov.double()
    block = cov[kept][:, kept] + jitter * torch.eye(len(kept), dtype=cov.dtype, device=cov.device)  # (k, k)
    rhs = cov[kept] @ down.double().T  # (k, d)
    return torch.linalg.solve(block, rhs).T  # (d, k)


# --- Type II: query-key --------------------------------------------------------------------------------


def qk_dim_scores(cov_q: Tensor, cov_k: Tensor, rope: bool, ridge: float = 1e-6) -> Tensor:
    """Scores (d_h,) of one query head's dims against its key head (covariances (d_h, d_h)); with RoPE the
    score of pair j (j < d_h/2) is in entry j and repeated in j + d_h/2. The column norm of the symmetric
    square root is ``‖(C + ρI)^½[:, j]‖ = √(C_jj + ρ)`` (``(C^½)ᵀ C^½ = C``): no factorization is
    needed."""
    sq_q = torch.diagonal(cov_q.double()).clamp_min(0) + ridge  # ‖C_q^½[:, j]‖²
    sq_k = torch.diagonal(cov_k.double()).clamp_min(0) + ridge
    if not rope:
        return (sq_q * sq_k).sqrt()
    half = cov_q.shape[0] // 2
    squared = sq_q * sq_k
    pair = squared[:half] + squared[half:]
    return torch.cat([pair, pair])


def qk_keep(cov_q: Tensor, cov_k: Tensor, keep: int, rope: bool, ridge: float = 1e-6) -> Tensor:
    """Kept dims (n_kv, keep) per KV head, sorted, from per-head covariances ``cov_q`` (n_heads, d_h, d_h) and
    ``cov_k`` (n_kv, d_h, d_h); query head h belongs to KV head h // (n_heads / n_kv). With RoPE ``keep``
    must be even and the kept set is closed under j ↔ j + d_h/2."""
    n_heads, d_head = cov_q.shape[0], cov_q.shape[1]
    n_kv = cov_k.shape[0]
    if not 0 < keep <= d_head or (rope and keep % 2):
        raise ValueError(f"keep {keep} must be in 1..{d_head}" + (" and even (RoPE pairs)" if rope else ""))
    per_group = n_heads // n_kv
    kept = []
    for kv in range(n_kv):
        score = sum(
            qk_dim_scores(cov_q[h], cov_k[kv], rope, ridge)
            for h in range(kv * per_group, (kv + 1) * per_group)
        )
        if rope:
            half = d_head // 2
            pairs = torch.topk(score[:half], keep // 2).indices
            dims = torch.cat([pairs, pairs + half])
        else:
            dims = torch.topk(score, keep).indices
        kept.append(dims.sort().values)
    return torch.stack(kept)


# --- Type III: value-output ----------------------------------------------------------------------------


def vo_head(
    cov_sqrt: Tensor, cov_inv_sqrt: Tensor, value: Tensor, outputs: list[Tensor], keep: int
) -> tuple[Tensor, list[Tensor]]:
    """One KV head: ``value`` (d_h, d) = its rows of v_proj, ``outputs`` = for each of its query heads the
    (d, d_h) columns of o_proj. Returns (value' (keep, d), [output' (d, keep)])."""
    u, s, vh = torch.linalg.svd(cov_sqrt @ value.double().T, full_matrices=False)  # (d, d_h) = U S Vᵀ
    if not 0 < keep <= s.shape[0]:
        raise ValueError(f"keep {keep} is out of range for a value head of {s.shape[0]} dims")
    reduced = s[:, None] * vh  # S Vᵀ (d_h, d_h)
    if len(outputs) == 1:  # MHA: the joint optimum through a second SVD
        u2, s2, vh2 = torch.linalg.svd(reduced @ outputs[0].double().T, full_matrices=False)  # (d_h, d)
        new_value = (cov_inv_sqrt @ u @ u2[:, :keep]).T  # (keep, d)
        return new_value, [(s2[:keep, None] * vh2[:keep]).T]  # (d, keep)
    new_value = (cov_inv_sqrt @ u[:, :keep]).T
    return new_value, [(reduced @ out.double().T)[:keep].T for out in outputs]


# --- sparsity allocation -------------------------------------------------------------------------------


def allocate_sparsity(influence: Tensor, average: float, smoothing: float = 0.15, cap: float = 0.8) -> Tensor:
    """Per-layer sparsity φ (L,) with mean ``average``: ``L·average·softmax(−s/ε)``, capped at ``cap``, the
    excess redistributed over the uncapped layers in proportion to their φ (repeated until none exceeds)."""
    if not 0 <= average <= cap:
        raise ValueError(f"average sparsity {average} must be within 0..{cap}")
    layers = influence.shape[0]
    phi = layers * average * torch.softmax(-influence.double() / smoothing, dim=0)
    for _ in range(layers):
        over = phi > cap
        if not over.any():
            break
        excess = float((phi[over] - cap).sum())
        phi[over] = cap
        free = phi < cap
        phi[free] += excess * phi[free] / phi[free].sum()
    return phi.clamp(max=cap)
