"""MoDeGPT's pure functions against known answers: brute-force leverage and least squares, a brute-force
RoPE-pair selection, the optimal value–output truncation error, and the allocation's constraints."""

from __future__ import annotations

import itertools

import pytest
import torch

from compressor.methods import modegpt_math as mg


def samples(tokens: int, dim: int, seed: int = 0) -> torch.Tensor:
    """(tokens, dim) correlated activations with a few large channels, fp64."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g, dtype=torch.float64) / dim**0.5 + torch.eye(
        dim, dtype=torch.float64
    )
    scale = 1 + 4 * (torch.rand(dim, generator=g, dtype=torch.float64) > 0.8)
    return (torch.randn(tokens, dim, generator=g, dtype=torch.float64) @ mix) * scale


def cov(x: torch.Tensor) -> torch.Tensor:
    return x.T @ x / x.shape[0]


def test_ridge_leverage_is_the_diagonal_of_the_hat_matrix():
    c = cov(samples(200, 12))
    brute = torch.diagonal(c @ torch.linalg.inv(c + 0.3 * torch.eye(12, dtype=c.dtype)))
    torch.testing.assert_close(mg.ridge_leverage(c, 0.3), brute)
    assert torch.equal(mg.mlp_keep(c, 12), torch.arange(12))
    assert torch.equal(mg.mlp_keep(c, 4, ridge=0.3), torch.topk(brute, 4).indices.sort().values)


def test_nystrom_down_is_the_least_squares_refit_and_error_falls_with_kept_channels():
    torch.manual_seed(0)
    hidden = samples(400, 16)  # (tokens, d_int): the input of down_proj
    down = torch.randn(8, 16, dtype=torch.float64)  # (d, d_int)
    c = cov(hidden)
    kept = mg.mlp_keep(c, 6)
    refit = mg.nystrom_down(c, kept, down, jitter=0.0)
    lstsq = torch.linalg.lstsq(hidden[:, kept], hidden @ down.T).solution.T  # (d, k)
    torch.testing.assert_close(refit, lstsq, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(mg.nystrom_down(c, torch.arange(16), down, jitter=0.0), down)
    errors = []
    for keep in range(1, 17):
        kept = mg.mlp_keep(c, keep)
        approx = hidden[:, kept] @ mg.nystrom_down(c, kept, down).T
        errors.append(float((hidden @ down.T - approx).norm()))
    assert (
        all(b <= a + 1e-9 for a, b in zip(errors, errors[1:])) and errors[-1] < 1e-5 * errors[0]
    )  # the 1e-6 jitter


def test_qk_scores_equal_the_column_norms_of_the_square_roots():
    q, k = samples(300, 8, 1), samples(300, 8, 2)
    root_q, root_k = mg.covariance_sqrt(cov(q), 1e-6)[0], mg.covariance_sqrt(cov(k), 1e-6)[0]
    reference = root_q.norm(dim=0) * root_k.norm(dim=0)  # what the reference computes
    torch.testing.assert_close(mg.qk_dim_scores(cov(q), cov(k), rope=False), reference, rtol=1e-6, atol=0)


@pytest.mark.parametrize("n_heads,n_kv", [(2, 2), (4, 2), (4, 1)])
def test_rope_pair_selection_equals_brute_force(n_heads, n_kv):
    d_head, keep, half = 8, 4, 4
    qs = [samples(300, d_head, 10 + h) for h in range(n_heads)]
    ks = [samples(300, d_head, 20 + h) for h in range(n_kv)]
    kept = mg.qk_keep(torch.stack([cov(q) for q in qs]), torch.stack([cov(k) for k in ks]), keep, rope=True)
    assert kept.shape == (n_kv, keep)
    per_group = n_heads // n_kv
    for kv in range(n_kv):
        dims = set(kept[kv].tolist())
        assert all((j + half) % d_head in dims for j in dims)  # whole rotation pairs
        # brute force: the pair set of largest Σ over the group's heads of ‖q_j‖²‖k_j‖² + ‖q_j'‖²‖k_j'‖²
        sq_k = (ks[kv] ** 2).mean(0)
        group = [(qs[h] ** 2).mean(0) for h in range(kv * per_group, (kv + 1) * per_group)]

        def total(pairs, group=group, sq_k=sq_k):
            return sum(
                float(sq_q[j] * sq_k[j] + sq_q[j + half] * sq_k[j + half]) for sq_q in group for j in pairs
            )

        best = max(itertools.combinations(range(half), keep // 2), key=total)
        assert dims == set(best) | {j + half for j in best}
    with pytest.raises(ValueError, match="even"):
        mg.qk_keep(torch.stack([cov(q) for q in qs]), torch.stack([cov(k) for k in ks]), 3, rope=True)


def test_qk_without_rope_keeps_single_dims():
    q, k = samples(300, 6, 3), samples(300, 6, 4)
    kept = mg.qk_keep(cov(q)[None], cov(k)[None], 3, rope=False)
    score = ((q**2).mean(0) * (k**2).mean(0)).sqrt()
    assert set(kept[0].tolist()) == set(torch.topk(score, 3).indices.tolist())


def _vo_error(x, values, outputs, new_values, new_outputs) -> float:
    exact = sum(x @ v.T @ o.T for v, group in zip(values, outputs) for o in group)
    approx = sum(x @ v.T @ o.T for v, group in zip(new_values, new_outputs) for o in group)
    return float((exact - approx).norm())


def test_value_output_mha_reaches_the_optimal_truncation():
    torch.manual_seed(0)
    d, d_head = 12, 6
    x = samples(500, d, 5)
    value, output = torch.randn(d_head, d, dtype=torch.float64), torch.randn(d, d_head, dtype=torch.float64)
    root, inv_root = mg.covariance_sqrt(cov(x))
    errors = []
    for keep in range(1, d_head + 1):
        new_value, (new_output,) = mg.vo_head(root, inv_root, value, [output], keep)
        assert new_value.shape == (keep, d) and new_output.shape == (d, keep)
        errors.append(_vo_error(x, [value], [[output]], [new_value], [[new_output]]))
        # the best rank-keep map in the whitened space: ‖√C (M − M̂)‖ = sqrt(Σ_{i>keep} σ_i²) of √C M
        sigma = torch.linalg.svdvals(root @ value.T @ output.T)
        assert errors[-1] / x.shape[0] ** 0.5 == pytest.approx(
            float(sigma[keep:].square().sum().sqrt()), abs=1e-9
        )
    assert all(b <= a + 1e-9 for a, b in zip(errors, errors[1:])) and errors[-1] < 1e-8


def test_value_output_gqa_shares_the_value_head_and_is_exact_at_full_width():
    torch.manual_seed(1)
    d, d_head = 12, 6
    x = samples(500, d, 6)
    value = torch.randn(d_head, d, dtype=torch.float64)
    outputs = [torch.randn(d, d_head, dtype=torch.float64) for _ in range(3)]
    root, inv_root = mg.covariance_sqrt(cov(x))
    errors = []
    for keep in range(1, d_head + 1):
        new_value, new_outputs = mg.vo_head(root, inv_root, value, outputs, keep)
        assert len(new_outputs) == 3 and all(o.shape == (d, keep) for o in new_outputs)
        errors.append(_vo_error(x, [value], [outputs], [new_value], [new_outputs]))
    assert all(b <= a + 1e-9 for a, b in zip(errors, errors[1:])) and errors[-1] < 1e-8


def test_allocation_meets_the_average_respects_the_cap_and_spares_influential_layers():
    influence = torch.tensor([0.9, 0.1, 0.05, 0.02, 0.3, 0.01])
    phi = mg.allocate_sparsity(influence, 0.3, smoothing=0.15, cap=0.8)
    assert float(phi.mean()) == pytest.approx(0.3)
    assert float(phi.max()) <= 0.8 + 1e-12
    assert torch.equal(torch.argsort(phi), torch.argsort(-influence.double()))  # more influence, less removed
    capped = mg.allocate_sparsity(influence, 0.5, smoothing=0.02, cap=0.6)  # a sharp softmax hits the cap
    assert float(capped.mean()) == pytest.approx(0.5) and float(capped.max()) == pytest.approx(0.6)
    assert torch.allclose(
        mg.allocate_sparsity(torch.zeros(4), 0.2), torch.full((4,), 0.2, dtype=torch.float64)
    )
    with pytest.raises(ValueError):
        mg.allocate_sparsity(influence, 0.9, cap=0.8)
