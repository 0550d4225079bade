"""Known-answer tests of the whitened truncated SVD and the square roots of a Gram matrix."""

from __future__ import annotations

import pytest
import torch

from compressor.errors import CompressorError
from compressor.kernels import linalg


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rank_r(m: int, n: int, r: int, seed: int = 0) -> torch.Tensor:
    g = _gen(seed)
    return torch.randn(m, r, generator=g, dtype=torch.float64) @ torch.randn(r, n, generator=g, dtype=torch.float64)


def random_spd(n: int, seed: int = 1) -> torch.Tensor:
    """A well-conditioned random SPD Gram, XᵀX of anisotropic inputs."""
    x = calibration_inputs(4 * n, n, seed)
    return x.T @ x


def calibration_inputs(tokens: int, n: int, seed: int = 2) -> torch.Tensor:
    """Inputs X (tokens, n) with very different channel scales (as LLM activations have)."""
    g = _gen(seed)
    scale = torch.logspace(-1, 1, n, dtype=torch.float64)
    return torch.randn(tokens, n, generator=g, dtype=torch.float64) * scale


@pytest.mark.parametrize("shape", [(48, 32), (32, 48)])
@pytest.mark.parametrize("root", ["none", "cholesky", "eigh"])
def test_exact_rank_r_matrix_is_recovered(shape, root):
    m, n = shape
    weight = rank_r(m, n, 5)
    whitening = linalg.identity() if root == "none" else linalg.from_gram(random_spd(n), root)
    up, down, s = linalg.whitened_svd(weight, 5, whitening)
    assert up.shape == (m, 5) and down.shape == (5, n)
    assert torch.allclose(up @ down, weight, atol=1e-9 * weight.abs().max())
    # W S has rank 5 too: the singular values past the fifth vanish
    assert float(s[5:].max()) < 1e-9 * float(s[0])


@pytest.mark.parametrize("root", ["cholesky", "eigh"])
def test_identity_gram_equals_plain_svd(root):
    weight = torch.randn(40, 24, generator=_gen(3), dtype=torch.float64)
    whitening = linalg.from_gram(torch.eye(24, dtype=torch.float64), root)
    for rank in (1, 7, 24):
        up_w, down_w, s_w = linalg.whitened_svd(weight, rank, whitening)
        up_p, down_p, s_p = linalg.whitened_svd(weight, rank)
        assert torch.allclose(s_w, s_p, atol=1e-10)
        assert torch.allclose(up_w @ down_w, up_p @ down_p, atol=1e-10)
    # and the plain truncation is the Eckart–Young optimum: its error is the tail of the spectrum
    up, down, s = linalg.whitened_svd(weight, 7)
    assert float((weight - up @ down).norm()) == pytest.approx(float(s[7:].norm()), rel=1e-10)


@pytest.mark.parametrize("root", ["cholesky", "eigh"])
@pytest.mark.parametrize("rank", [2, 6, 12])
def test_whitened_error_is_at_most_plain_error_on_the_inputs(root, rank):
    m, n = 32, 24
    weight = torch.randn(m, n, generator=_gen(4), dtype=torch.float64)
    x = calibration_inputs(200, n)
    gram = x.T @ x

    def output_error(approx: torch.Tensor) -> float:
        return float(((weight - approx) @ x.T).norm())  # ‖(W − Ŵ) Xᵀ‖_F

    up_p, down_p, _ = linalg.whitened_svd(weight, rank)
    up_w, down_w, s = linalg.whitened_svd(weight, rank, linalg.from_gram(gram, root))
    plain, whitened = output_error(up_p @ down_p), output_error(up_w @ down_w)
    assert whitened <= plain * (1 + 1e-9)
    assert whitened < 0.95 * plain  # anisotropic inputs: whitening helps by a clear margin
    # the whitened error is exactly the tail of the spectrum of W S (the truncation-aware property)
    assert whitened == pytest.approx(float(s[rank:].norm()), rel=1e-8)
    # relative_error with the Gram measures the same quantity
    assert linalg.relative_error(weight, up_w @ down_w, gram) == pytest.approx(
        whitened / float((weight @ x.T).norm()), rel=1e-8)


def test_diagonal_whitening_beats_plain_under_diagonal_gram():
    m, n = 32, 24
    weight = torch.randn(m, n, generator=_gen(5), dtype=torch.float64)
    scale = torch.logspace(-1, 1, n, dtype=torch.float64)
    gram = torch.diag(scale ** 2)  # inputs with independent channels of these scales
    up_p, down_p, _ = linalg.whitened_svd(weight, 6)
    up_d, down_d, _ = linalg.whitened_svd(weight, 6, linalg.diagonal(scale, alpha=1.0))
    assert linalg.relative_error(weight, up_d @ down_d, gram) < linalg.relative_error(weight, up_p @ down_p, gram)


def test_cholesky_regularizes_a_singular_gram():
    n = 16
    x = calibration_inputs(6, n)  # 6 tokens: the Gram has rank 6 < 16
    gram = x.T @ x
    gram[3, :] = 0  # and a dead channel
    gram[:, 3] = 0
    assert int(torch.linalg.cholesky_ex(gram)[1]) != 0  # plain Cholesky fails
    before = gram.clone()
    whitening = linalg.cholesky(gram)
    assert whitening.jitter > 0
    assert torch.isfinite(whitening.factor).all()
    factor = whitening.factor
    assert torch.allclose(factor @ factor.T, gram + whitening.jitter * torch.eye(n, dtype=gram.dtype), atol=1e-8)
    weight = torch.randn(8, n, generator=_gen(6), dtype=torch.float64)
    up, down, _ = linalg.whitened_svd(weight, 4, whitening)
    assert torch.isfinite(up).all() and torch.isfinite(down).all()
    # the shift on a working copy's diagonal is exactly G + δI (the factor is bit-identical), and G is untouched
    assert torch.equal(factor, torch.linalg.cholesky(gram + whitening.jitter * torch.eye(n, dtype=gram.dtype)))
    assert torch.equal(gram, before)


def test_cholesky_of_a_positive_definite_gram_needs_no_jitter():
    gram = random_spd(12)
    whitening = linalg.cholesky(gram)
    assert whitening.jitter == 0.0
    assert torch.allclose(whitening.factor @ whitening.factor.T, gram, atol=1e-9 * float(gram.abs().max()))


def test_eigh_drops_tiny_eigenvalues():
    n = 12
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=_gen(7), dtype=torch.float64))
    evals = torch.tensor([1e-14, 1e-13, 0.0] + [float(v) for v in range(1, n - 2)], dtype=torch.float64)
    gram = q @ torch.diag(evals) @ q.T
    whitening = linalg.eigh(gram)
    assert whitening.dropped == 3
    assert torch.isfinite(whitening.factor).all() and torch.isfinite(whitening.inverse).all()
    # S Sᵀ still reproduces the Gram; S⁻¹ S is the identity on the kept eigenvalues and zero on the dropped
    assert torch.allclose(whitening.factor @ whitening.factor.T, gram, atol=1e-10)
    keep = torch.tensor([0.0] * 3 + [1.0] * (n - 3), dtype=torch.float64)  # eigh sorts ascending
    assert torch.allclose(whitening.inverse @ whitening.factor, torch.diag(keep), atol=1e-8)
    # a large cutoff drops more
    assert linalg.eigh(gram, cutoff=0.5).dropped > 3


def test_svd_of_wide_matrix_matches_its_transpose():
    wide = torch.randn(12, 40, generator=_gen(8), dtype=torch.float64)
    u, s, vh = linalg.svd(wide)
    assert u.shape == (12, 12) and s.shape == (12,) and vh.shape == (12, 40)
    assert torch.allclose(u @ torch.diag(s) @ vh, wide, atol=1e-10)
    assert torch.allclose(s, torch.linalg.svdvals(wide), atol=1e-10)
    u_t, s_t, vh_t = linalg.svd(wide.T)  # the tall path
    assert torch.allclose(s, s_t, atol=1e-10)
    # same subspaces up to sign: compare rank-k truncations, which are unique with distinct singular values
    for k in (1, 5):
        assert torch.allclose((u[:, :k] * s[:k]) @ vh[:k], ((u_t[:, :k] * s_t[:k]) @ vh_t[:k]).T, atol=1e-10)
    assert torch.allclose(u.T @ u, torch.eye(12, dtype=wide.dtype), atol=1e-10)
    assert torch.allclose(vh @ vh.T, torch.eye(12, dtype=wide.dtype), atol=1e-10)


@pytest.mark.parametrize("rank", [0, 13])
def test_rank_out_of_range_is_an_error(rank):
    with pytest.raises(CompressorError, match="out of range"):
        linalg.whitened_svd(torch.randn(12, 20, dtype=torch.float64), rank)


def test_float32_svd_is_close_to_float64():
    weight = torch.randn(24, 16, generator=_gen(9))
    up64, down64, _ = linalg.whitened_svd(weight, 8, dtype=torch.float64)
    up32, down32, _ = linalg.whitened_svd(weight, 8, dtype=torch.float32)
    assert up32.dtype == torch.float32
    assert torch.allclose((up32 @ down32).double(), up64 @ down64, atol=1e-4)


def test_non_finite_counts_across_chunks():
    from compressor.model.weights import non_finite

    tensor = torch.zeros(10, 7)  # 70 values in chunks of 8: flat 7 and 8 sit either side of an edge
    tensor[1, 0], tensor[1, 1], tensor[9, 6] = float("nan"), float("inf"), -float("inf")
    assert non_finite(tensor, chunk=8) == 3
    assert non_finite(tensor, chunk=1 << 22) == 3
    assert non_finite(torch.ones(5)) == 0


@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("root", ["cholesky", "eigh", "diagonal"])
def test_gram_solver_gives_the_full_svds_factors(monkeypatch, root, left):
    # the n×n-Gram route of a tall matrix, built in row chunks (chunks of 7 rows here), reproduces LAPACK's
    # truncated whitened SVD: the same approximation and singular values
    monkeypatch.setattr(linalg, "ROW_CHUNK_ELEMENTS", 7 * 40)
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(90, 40, generator=generator)
    inputs = torch.randn(200, 40, generator=generator) * torch.rand(40, generator=generator) * 3
    gram = (inputs.T @ inputs).double()
    whitening = linalg.diagonal(inputs.abs().mean(0)) if root == "diagonal" else linalg.from_gram(gram, root)
    rows = torch.rand(90, generator=generator) + 0.2 if left else None
    up, down, spectrum = linalg.whitened_svd(weight, 12, whitening, left=rows)
    up_g, down_g, spectrum_g = linalg.whitened_svd(weight, 12, whitening, left=rows, solver="gram")
    assert up_g.shape == up.shape and down_g.shape == down.shape
    assert torch.allclose(up_g @ down_g, up @ down, atol=1e-9, rtol=0)
    assert torch.allclose(spectrum_g[:40], spectrum[:40], atol=1e-8 * float(spectrum[0]), rtol=0)
    # a wide matrix (or a sketch) takes the full SVD whatever the solver
    wide_up, wide_down, _ = linalg.whitened_svd(weight.T.contiguous(), 12, solver="gram")
    plain_up, plain_down, _ = linalg.whitened_svd(weight.T.contiguous(), 12)
    assert torch.equal(wide_up, plain_up) and torch.equal(wide_down, plain_down)


def test_relative_error_in_row_chunks_equals_the_formula(monkeypatch):
    monkeypatch.setattr(linalg, "ROW_CHUNK_ELEMENTS", 3 * 30)  # chunks of 3 rows
    generator = torch.Generator().manual_seed(4)
    weight, approx = torch.randn(50, 30, generator=generator), torch.randn(50, 30, generator=generator)
    inputs = torch.randn(80, 30, generator=generator)
    gram = (inputs.T @ inputs).double()
    delta = weight.double() - approx.double()
    plain = float(delta.norm() / weight.double().norm())
    on_inputs = float((torch.trace(delta @ gram @ delta.T) / torch.trace(weight.double() @ gram @ weight.double().T)).sqrt())
    assert linalg.relative_error(weight, approx) == pytest.approx(plain, rel=1e-12)
    assert linalg.relative_error(weight, approx.bfloat16(), gram) == pytest.approx(
        float(((weight.double() - approx.bfloat16().double()) @ gram * (weight.double() - approx.bfloat16().double())).sum().sqrt()
              / (weight.double() @ gram * weight.double()).sum().sqrt()), rel=1e-12)
    assert linalg.relative_error(weight, approx, gram) == pytest.approx(on_inputs, rel=1e-12)
    # activations (batch, seq, d) are rows of d
    assert linalg.relative_error(weight.view(5, 10, 30), approx.view(5, 10, 30)) == pytest.approx(plain, rel=1e-12)


def test_output_side_error_in_column_chunks_equals_the_input_side_measure(monkeypatch):
    monkeypatch.setattr(linalg, "ROW_CHUNK_ELEMENTS", 20 * 5)  # column chunks of 5
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(20, 60, generator=generator)
    inputs = torch.randn(100, 60, generator=generator)
    gram = (inputs.T @ inputs).double()
    outputs = weight.double() @ gram @ weight.double().T
    up, down, _ = linalg.output_side_svd(weight, outputs, 7)
    approx = (up @ down).float()
    assert linalg.output_side_error(weight, approx, outputs) == pytest.approx(
        linalg.relative_error(weight, approx, gram), rel=1e-7)


def test_relative_error_with_an_fp32_gram_in_column_blocks(monkeypatch):
    generator = torch.Generator().manual_seed(9)
    weight, approx = torch.randn(40, 30, generator=generator), torch.randn(40, 30, generator=generator)
    inputs = torch.randn(90, 30, generator=generator)
    gram = inputs.T @ inputs  # fp32
    expected = linalg.relative_error(weight, approx, gram.double())
    monkeypatch.setattr(linalg, "ROW_CHUNK_ELEMENTS", 4 * 30)  # blocks of 4 columns, chunks of 4 rows
    assert linalg.relative_error(weight, approx, gram) == pytest.approx(expected, rel=1e-12)
