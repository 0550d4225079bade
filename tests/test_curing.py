"""CURing: DEIM, CUR factors, ranks, layer selection, the compressor through the layer walk, save → load,
and the paper's parameter arithmetic (Llama-3.1-8B 8.03B → 7.32B) on a meta-device model."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import run_steps  # noqa: E402

from compressor import io  # noqa: E402
from compressor.kernels.linalg import symmetric_sqrt  # noqa: E402
from compressor.methods import curing, registry  # noqa: E402
from compressor.model.modules import CURLinear, merge  # noqa: E402
from compressor.stats.accumulators import TensorStats, angular_distance  # noqa: E402

TARGETS = ["self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj"]


def exact_rank(m: int, n: int, r: int, seed: int = 0) -> torch.Tensor:
    """A well-conditioned (m, n) fp64 matrix of rank exactly r."""
    generator = torch.Generator().manual_seed(seed)
    left = torch.linalg.qr(torch.randn(m, r, generator=generator, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(n, r, generator=generator, dtype=torch.float64)).Q
    values = torch.linspace(3.0, 1.0, r, dtype=torch.float64)
    return (left * values) @ right.T


def tiny_llama(layers: int = 6, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(layers: int = 4, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_inner=128, n_layer=layers, n_head=4,
                                       n_positions=64)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def batches(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return list(torch.randint(0, 128, (6, 24), generator=generator).split(3))


def run(model, config: dict, targets=TARGETS, propagate: str = "compressed"):
    data = batches() if registry.create("curing", config).uses_data else None
    report = run_steps(model, [{"method": "curing", "config": config, "targets": targets}], data,
                       propagate=propagate)
    return report.plan.steps[0].compressor, report


# ------------------------------------------------------------------------------------------------------- DEIM


@pytest.mark.parametrize("m,n,r", [(40, 30, 6), (30, 40, 10), (25, 25, 25)])
def test_deim_distinct_and_interpolates_exactly(m, n, r):
    matrix = exact_rank(m, n, r)
    left, right = curing.singular_vectors(matrix, r)
    rows, cols = curing.deim(left), curing.deim(right)
    assert len(set(rows.tolist())) == r and len(set(cols.tolist())) == r
    assert rows.max() < m and cols.max() < n
    # the DEIM projector U (U[p])⁻¹ reproduces every column of the rank-r matrix from its rows p
    interpolated = left @ torch.linalg.solve(left[rows], matrix[rows])
    torch.testing.assert_close(interpolated, matrix, atol=1e-10, rtol=0)
    # and the skeleton A[:, q] A[p, q]⁻¹ A[p, :] is exact
    skeleton = matrix[:, cols] @ torch.linalg.solve(matrix[rows][:, cols], matrix[rows])
    torch.testing.assert_close(skeleton, matrix, atol=1e-10, rtol=0)


def test_deim_first_pick_is_largest_entry_and_residuals_vanish_on_picked_rows():
    vectors = torch.linalg.qr(torch.randn(50, 8, dtype=torch.float64)).Q
    rows = curing.deim(vectors)
    assert int(rows[0]) == int(vectors[:, 0].abs().argmax())
    # DEIM's defining property: column j's residual after interpolation on rows[:j] is largest at rows[j]
    for j in range(1, 8):
        p = rows[:j]
        residual = vectors[:, j] - vectors[:, :j] @ torch.linalg.solve(vectors[p, :j], vectors[p, j])
        assert int(residual.abs().argmax()) == int(rows[j])


def test_randomized_svd_matches_exact_on_low_rank():
    matrix = exact_rank(60, 45, 7, seed=3)
    left, values, right = curing.randomized_svd(matrix, 7, oversample=5, power_iterations=2, seed=1)
    torch.testing.assert_close((left * values) @ right.T, matrix, atol=1e-9, rtol=0)
    again = curing.randomized_svd(matrix, 7, oversample=5, power_iterations=2, seed=1)
    assert torch.equal(again[0], left)  # seeded: deterministic


# -------------------------------------------------------------------------------------------------------- CUR


@pytest.mark.parametrize("score", ["wanda", "signed", "covariance", "weight"])
@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_cur_of_exact_rank_matrix_reconstructs_it(score, method):
    m, n, r = 48, 36, 5
    weight = exact_rank(m, n, r, seed=1)
    x = torch.randn(200, n, dtype=torch.float64)
    stats = TensorStats(n_tokens=200, gram=x.T @ x, sq_sum=x.square().sum(0))
    rms, root = curing.activation_scales(stats, score)
    scores = curing.score_matrix(weight, score, rms, root)
    left, right = curing.singular_vectors(scores, r, method, seed=0)
    rows, cols = curing.deim(left), curing.deim(right)
    C, U, R = curing.cur_factors(weight, rows, cols, curing.least_squares_weighting(score, rms, root))
    assert torch.equal(C, weight[:, cols]) and torch.equal(R, weight[rows])
    assert U.shape == (r, r)
    torch.testing.assert_close(C @ U @ R, weight, atol=1e-9, rtol=0)


def test_weighted_link_minimises_output_error():
    """U = C⁺ (W D)(R D)⁺ is the least-squares link under D: perturbing it never lowers ‖(W − CUR) D‖."""
    weight = torch.randn(30, 20, dtype=torch.float64)
    rows, cols = torch.arange(6), torch.arange(6)
    root = symmetric_sqrt(torch.cov(torch.randn(20, 100, dtype=torch.float64)) + 0.1 * torch.eye(20))
    C, U, R = curing.cur_factors(weight, rows, cols, root)
    best = ((weight - C @ U @ R) @ root).norm()
    for _ in range(5):
        other = U + 1e-3 * torch.randn_like(U)
        assert ((weight - C @ other @ R) @ root).norm() >= best


# ------------------------------------------------------------------------------------------------------ ranks


@pytest.mark.parametrize("m,n", [(4096, 4096), (1024, 4096), (14336, 4096), (576, 576), (192, 576),
                                 (1536, 576), (7, 3), (1, 1)])
def test_break_even_is_largest_strictly_saving_rank(m, n):
    rank = curing.cur_break_even(m, n)
    assert rank == 0 or curing.cur_parameters(rank, m, n) < m * n
    assert curing.cur_parameters(rank + 1, m, n) >= m * n


def test_break_even_of_llama_8b_matrices_match_the_dossier():
    shapes = [(4096, 4096), (1024, 4096), (14336, 4096)]
    assert [curing.cur_break_even(m, n) for m, n in shapes] == [1696, 718, 2769]


def test_paper_rank_rule_and_never_grow():
    assert curing.choose_rank(4096, 4096)[0] == 256
    assert curing.choose_rank(576, 576)[0] == 238  # the break-even caps on a 576-wide model
    assert curing.choose_rank(192, 576)[0] == 123
    assert curing.choose_rank(1536, 576)[0] == 256
    assert curing.choose_rank(576, 576, max_rank=None)[0] == 238
    rank, note = curing.choose_rank(1024, 4096, max_rank=None, min_rank=1024)  # v2's pitfall: R would be W
    assert rank is None and "kept dense" in note
    assert curing.choose_rank(192, 576, multiple=128)[0] is None  # v2's 128-alignment: break-even rounds to 0
    assert curing.choose_rank(1536, 576, multiple=128, max_rank=None)[0] == 256


def test_energy_rank_rule():
    values = torch.tensor([3.0, 2.0, 1.0, 0.5])  # energies 9, 4, 1, 0.25 of 14.25
    assert curing.energy_rank(values, 0.6) == 1
    assert curing.energy_rank(values, 0.9) == 2
    assert curing.energy_rank(values, 1.0) == 4
    assert curing.choose_rank(64, 64, "energy", singular_values=values, energy=0.9, max_rank=None)[0] == 2
    # 512 × 512: break-even 212, rounded down to 128; a flat spectrum needs ⌈0.2·512⌉ = 103 → up to 128
    assert curing.choose_rank(512, 512, "energy", singular_values=torch.ones(512), energy=0.2, multiple=128,
                              max_rank=None)[0] == 128
    # ⌈0.5·512⌉ = 256 > 128: v2 aborts the run ("No compression."); here the matrix stays dense
    rank, note = curing.choose_rank(512, 512, "energy", singular_values=torch.ones(512), energy=0.5,
                                    multiple=128)
    assert rank is None and "energy rank" in note


# ----------------------------------------------------------------------------------------------------- layers


def test_angular_distance_on_known_vectors():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert float(angular_distance(e1, e1)) == pytest.approx(0.0, abs=1e-6)
    assert float(angular_distance(e1, e2)) == pytest.approx(0.5)
    assert float(angular_distance(e1, -e1)) == pytest.approx(1.0)
    assert float(angular_distance(e1, torch.tensor([1.0, 1.0]))) == pytest.approx(0.25)
    assert float(angular_distance(3 * e1, 0.5 * torch.tensor([1.0, 1.0]))) == pytest.approx(0.25)
    batch = angular_distance(torch.stack([e1, e1]), torch.stack([e2, -e1]))
    torch.testing.assert_close(batch, torch.tensor([0.5, 1.0]))


def test_select_layers_rules():
    distances = {1: 0.3, 2: 0.1, 3: 0.2, 4: 0.05, 5: 0.4, 6: 0.1}
    assert curing.select_layers("angular", 8, 3, distances) == [2, 4, 6]  # tie 2/6 at 0.1: both in
    assert curing.select_layers("angular", 8, 2, distances) == [2, 4]  # tie broken by index
    assert curing.select_layers("last", 8, 3) == [4, 5, 6]  # never the last layer (7)
    chosen = curing.select_layers("random", 8, 4, seed=1)
    assert chosen == curing.select_layers("random", 8, 4, seed=1) and len(set(chosen)) == 4
    assert all(1 <= i <= 6 for i in chosen)
    with pytest.raises(Exception, match="candidate layers"):
        curing.select_layers("last", 8, 7)


# ------------------------------------------------------------------------------------------------------- walk


def test_compressor_selects_least_changing_layers_and_compresses_targets():
    model = tiny_llama()
    dense = sum(p.numel() for p in model.parameters())
    compressor, report = run(model, {"n_layers": 2, "max_rank": 8})
    decision = report.plan.steps[0].decision
    distances, selected = decision.values["distances"], decision.values["layers"]
    assert sorted(distances) == [1, 2, 3, 4]  # never the first (0) or last (5)
    assert selected == sorted(sorted(distances, key=distances.get)[:2])
    assert len(report.log) == 6 and {e["kind"] for e in report.log} == {"cur"}
    layers = {int(e["name"].split(".")[2]) for e in report.log}
    assert layers == set(selected)
    for entry in report.log:
        assert entry["rank"] == 8 and entry["params_after"] < entry["params_before"]
        assert entry["layer_distance"] == pytest.approx(distances[int(entry["name"].split(".")[2])])
    saved = sum(e["params_before"] - e["params_after"] for e in report.log)
    assert sum(p.numel() for p in model.parameters()) == dense - saved
    module = model.get_submodule(report.log[0]["name"])
    assert isinstance(module, CURLinear)
    assert report.seconds.get("statistics_forward", 0.0) == 0.0  # statistics: selection → no walk forwards


@pytest.mark.parametrize("n_layers,propagate", [(1, "compressed"), (3, "original")])
def test_selection_statistics_match_walk_statistics(n_layers, propagate):
    """statistics: selection (v1, one pass on the original model) and statistics: walk see the same inputs
    on the first compressed layer (nothing before it has changed), and on every layer with propagate:
    original, so they give the same decomposition."""
    first, second = tiny_llama(seed=2), tiny_llama(seed=2)
    run(first, {"n_layers": n_layers, "max_rank": 6})
    _, report = run(second, {"n_layers": n_layers, "max_rank": 6, "statistics": "walk"}, propagate=propagate)
    assert report.seconds["statistics_forward"] > 0
    found = 0
    for (name, a), (_, b) in zip(first.named_modules(), second.named_modules()):
        if isinstance(a, CURLinear):
            assert torch.equal(a.row_indices, b.row_indices), name
            assert torch.equal(a.col_indices, b.col_indices), name
            torch.testing.assert_close(a.U, b.U, atol=1e-5, rtol=1e-5)
            found += 1
    assert found == 3 * n_layers


@pytest.mark.parametrize("config", [
    {"layer_selection": "last", "score": "weight"},  # data-free
    {"layer_selection": "random", "score": "signed", "deim": "randomized", "seed": 3},
    {"score": "covariance", "distance_tokens": "all"},
    {"score": "covariance", "statistics": "walk"},
    {"rank_rule": "energy", "energy": 0.5, "max_rank": None},
])
def test_compressor_variants(config):
    model = tiny_llama()
    compressor, report = run(model, {"n_layers": 2, **config})
    selected = report.plan.steps[0].decision.values["layers"]
    assert {int(e["name"].split(".")[2]) for e in report.log} == set(selected)
    assert all(e["params_after"] <= e["params_before"] for e in report.log)
    assert any(e["kind"] == "cur" for e in report.log)
    if config.get("layer_selection") == "last":
        assert selected == [3, 4] and not compressor.uses_data


def test_matrix_that_would_grow_stays_dense():
    model = tiny_llama()
    _, report = run(model, {"n_layers": 1, "min_rank": 60})
    assert report.log and all(e["kind"] == "dense" and "kept dense" in e["note"] for e in report.log)


def test_bad_configs_are_user_errors():
    from compressor.errors import CompressorError

    with pytest.raises(CompressorError, match="n_layers"):
        registry.create("curing", {"n_layers": 0})
    with pytest.raises(CompressorError, match="unknown key"):
        registry.create("curing", {"layers": 3})
    with pytest.raises(CompressorError, match="candidate layers"):
        run(tiny_llama(layers=3), {"n_layers": 2})


# --------------------------------------------------------------------------------------------------------- io


def test_save_load_identical_logits_and_merge(tmp_path):
    model = tiny_llama()
    run(model, {"n_layers": 3, "max_rank": 6})
    ids = batches(seed=5)[0]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    io.save(model, None, tmp_path / "cur", {"params_before": 0}, [])
    manifest = io.read_manifest(tmp_path / "cur")
    assert {spec["kind"] for spec in manifest["modules"].values()} == {"cur"}
    assert len(manifest["modules"]) == 9
    loaded = io.load(tmp_path / "cur")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)
    for name, module in loaded.named_modules():
        if isinstance(module, CURLinear):
            original = model.get_submodule(name)
            assert torch.equal(module.row_indices, original.row_indices)
            assert torch.equal(module.C, original.C) and torch.equal(module.R, original.R)

    io.save(model, None, tmp_path / "merged", {"params_before": 0}, [], merge=True)
    merged = io.load(tmp_path / "merged")
    assert not any(isinstance(m, CURLinear) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_conv1d_with_bias_keeps_dense_class_and_bias(tmp_path):
    model = tiny_gpt2()
    _, report = run(model, {"n_layers": 1, "max_rank": 8}, targets=["attn.c_attn", "mlp.c_fc"])
    name = report.log[0]["name"]
    module = model.get_submodule(name)
    assert isinstance(module, CURLinear) and module.dense_class == "Conv1D" and module.bias is not None
    dense = merge(module)
    assert type(dense).__name__ == "Conv1D"
    torch.testing.assert_close(dense.weight.T, module.dense_weight())
    torch.testing.assert_close(dense.bias, module.bias)
    ids = batches(seed=1)[0]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    io.save(model, None, tmp_path / "gpt2", {"params_before": 0}, [])
    with torch.no_grad():
        assert torch.equal(io.load(tmp_path / "gpt2")(input_ids=ids).logits, expected)


# ------------------------------------------------------------------------------------------------------ paper


def test_llama31_8b_parameter_arithmetic_8_03b_to_7_32b():
    """The abstract's headline without weights: Llama-3.1-8B, q/k/gate of 10 layers at rank 256."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    before = sum(p.numel() for p in model.parameters())
    assert before == 8_030_261_248
    chosen = curing.select_layers("last", config.num_hidden_layers, 10)  # any 10 candidates: same shapes
    for index in chosen:
        for suffix in TARGETS:
            name = f"model.layers.{index}.{suffix}"
            linear = model.get_submodule(name)
            m, n = linear.weight.shape
            rank, _ = curing.choose_rank(m, n, "paper", max_rank=256)
            assert rank == 256
            model.set_submodule(name, CURLinear.empty(n, m, rank, False, device="meta"))
    after = sum(p.numel() for p in model.parameters())
    assert before - after == 10 * (14_614_528 + 2_818_048 + 53_936_128)  # q + k + gate savings per layer
    assert round(before / 1e9, 2) == 8.03 and round(after / 1e9, 2) == 7.32
    assert math.isclose(1 - after / before, 0.0889, abs_tol=5e-4)  # "−9%"


def test_deim_equals_the_explicit_greedy_loop():
    """The LU-pivot form of DEIM picks what the textbook loop picks."""
    generator = torch.Generator().manual_seed(4)
    vectors = torch.linalg.qr(torch.randn(200, 40, dtype=torch.float64, generator=generator)).Q
    picked: list[int] = []
    for j in range(40):
        residual = vectors[:, j].clone()
        if picked:
            p = torch.tensor(picked)
            residual -= vectors[:, :j] @ torch.linalg.solve(vectors[p, :j], vectors[p, j])
        residual[picked] = 0
        picked.append(int(residual.abs().argmax()))
    assert curing.deim(vectors).tolist() == picked
