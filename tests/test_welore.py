"""WeLore: the threshold rule on known spectra, the bisection for both budgets, the guard (no matrix
grows), LoRD's ``rank_rule: welore`` on raw and whitened spectra, and the reduction accounting."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_steps
from typer.testing import CliRunner

from compressor.cli import app
from compressor.errors import CompressorError
from compressor.methods.lord import LoRDConfig
from compressor.methods.welore import WeLoreConfig
from compressor.model.modules import weight_of
from compressor.ranks import uniform as ranks
from compressor.ranks import welore as welore_rule


def with_spectrum(sigma: list[float], m: int, n: int, seed: int = 0) -> torch.Tensor:
    """W (m, n) = U diag(σ) Vᵀ with random orthonormal U, V: a matrix whose spectrum is exactly σ."""
    g = torch.Generator().manual_seed(seed)
    k = len(sigma)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(sigma, dtype=torch.float64)) @ v.T


# name → (σ, shape, kept rank at τ = 0.5, LRC)
KNOWN = {
    "linear": ([float(j) for j in range(32, 0, -1)], (32, 48), 16, True),  # σ̃ = (σ−1)/31 < ½ ⟺ σ ≤ 16
    "geometric": ([2.0 ** -j for j in range(32)], (48, 32), 1, True),  # σ̃ ≈ 2^-j < ½ for j ≥ 1
    "heavy_head": ([10.0, 9.0, 8.0] + [1.0] * 29, (32, 32), 3, True),  # σ̃ = 1, 8/9, 7/9, then 0
    "flat": ([3.0] * 32, (32, 64), 32, False),  # nothing is small relative to the rest
    "square_half": ([float(j) for j in range(32, 0, -1)], (32, 32), 16, False),  # 16·64 = 32·32: no saving
}


def known_spectra():
    shapes = {name: shape for name, (_, shape, _, _) in KNOWN.items()}
    spectra = {name: torch.linalg.svdvals(with_spectrum(sigma, *shape))
               for name, (sigma, shape, _, _) in KNOWN.items()}
    return spectra, shapes


def test_normalized_spectrum():
    s = torch.tensor([5.0, 3.0, 1.0])
    assert welore_rule.normalized(s).tolist() == [1.0, 0.5, 0.0]
    assert welore_rule.normalized(torch.full((4,), 2.0)).tolist() == [1.0] * 4
    assert welore_rule.normalized(torch.zeros(3)).tolist() == [1.0] * 3


def test_rule_picks_expected_ranks_on_known_spectra():
    spectra, shapes = known_spectra()
    plan = welore_rule.allocate(spectra, shapes, tau=0.5)
    for name, (_, _, rank, lrc) in KNOWN.items():
        assert plan.allocations[name].rank == rank, name
        assert plan.allocations[name].lrc is lrc, name
    assert plan.allocations["square_half"].note(0.5).startswith("N-LRC")
    # without the guard the square matrix is factorised at break-even, as in the paper's code
    assert welore_rule.allocate(spectra, shapes, tau=0.5, guard=False).allocations["square_half"].lrc
    # min_ratio (the paper's LRC cut-off) keeps matrices that lose too little rank dense
    strict = welore_rule.allocate(spectra, shapes, tau=0.5, min_ratio=0.6)
    assert not strict.allocations["linear"].lrc and strict.allocations["geometric"].lrc


def random_spectra(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = {f"w{i}": shape
              for i, shape in enumerate([(64, 64), (64, 160), (160, 64), (32, 64), (96, 96)] * 3)}
    spectra = {}
    for name, (m, n) in shapes.items():
        decay = float(torch.rand(1, generator=g)) * 4
        k = min(m, n)
        spectra[name] = torch.exp(-decay * torch.linspace(0, 1, k, dtype=torch.float64)) \
            * (1 + 0.01 * torch.rand(k, generator=g, dtype=torch.float64))
    return spectra, shapes


@pytest.mark.parametrize("target", [0.05, 0.2, 0.37, 0.5, 0.8])
def test_bisection_meets_rank_budget_within_one_rank(target):
    spectra, shapes = random_spectra()
    plan = welore_rule.solve(spectra, shapes, rank_reduction=target)
    full = sum(min(s) for s in shapes.values())
    pruned = sum(a.pruned for a in plan.allocations.values())
    assert abs(pruned - target * full) <= 1
    assert plan.summary()["attempted_rank_reduction"] == pytest.approx(pruned / full)
    # the same τ through allocate gives the same plan (τ is the threshold that was actually applied)
    again = welore_rule.allocate(spectra, shapes, plan.tau)
    assert {n: a.rank for n, a in again.allocations.items()} == \
        {n: a.rank for n, a in plan.allocations.items()}


@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.2, 0.4])
def test_bisection_meets_parameter_budget_within_one_rank(ratio):
    spectra, shapes = random_spectra(1)
    total = sum(m * n for m, n in shapes.values())
    plan = welore_rule.solve(spectra, shapes, removed_params=ratio * total)
    removed = plan.summary()["params_removed"]
    assert abs(removed - ratio * total) <= max(m + n for m, n in shapes.values())  # one rank of one matrix
    assert plan.summary()["param_reduction"] == pytest.approx(removed / total)


def test_budget_out_of_reach_is_an_error():
    spectra, shapes = known_spectra()
    with pytest.raises(CompressorError, match="out of reach"):
        welore_rule.solve(spectra, shapes, removed_params=0.99 * sum(m * n for m, n in shapes.values()))


@pytest.mark.parametrize("seed", range(3))
def test_no_matrix_grows(seed):
    spectra, shapes = random_spectra(seed)
    for tau in torch.linspace(0, 1, 41).tolist():
        for alloc in welore_rule.allocate(spectra, shapes, tau).allocations.values():
            assert alloc.params_after <= alloc.params_before
            if alloc.lrc:
                assert ranks.saves_parameters(alloc.rank, *alloc.shape)


def walk(model, method: str, config: dict, batches=None):
    """(the step's decision, the log)."""
    report = run_steps(model, [{"method": method, "config": config}], batches)
    return report.plan.steps[0].decision, report.log


def test_welore_compressor_on_planted_spectra(llama):
    """Every linear of a tiny Llama gets a planted spectrum; the log shows the ranks the rule must pick."""
    expected = {}
    with torch.no_grad():
        for name, module in llama.named_modules():
            if name.endswith(("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "k_proj", "v_proj")):
                m, n = weight_of(module).shape
                k = min(m, n)
                keep = 2 if "mlp" in name else 6 if name.endswith("q_proj") else k  # k: flat spectrum below
                sigma = [10.0 - 0.5 * j for j in range(keep)] + [0.5] * (k - keep) if keep < k else [1.0] * k
                weight_of(module).copy_(with_spectrum(sigma, m, n).float())
                expected[name] = keep
    decision, log = walk(llama, "welore", {"threshold": 0.5})
    for entry in log:
        keep = expected[entry["name"]]
        if keep < min(entry["shape"]):
            assert entry["kind"] == "low_rank" and entry["rank"] == keep and entry["lrc"], entry["name"]
            assert entry["note"].startswith("LRC") and entry["rel_error"] < 0.3
        else:
            assert entry["kind"] == "dense" and not entry["lrc"] and entry["note"].startswith("N-LRC")
        assert entry["params_after"] <= entry["params_before"]


def test_welore_runs_on_every_arch(tiny_model, ids):
    """Data-free on all five architectures (GPT-2's Conv1D included); nothing grows; outputs stay finite."""
    _, log = walk(tiny_model, "welore", {"ratio": 0.1})
    assert all(e["params_after"] <= e["params_before"] for e in log)
    summary = ranks.reduction(log)
    assert summary["param_reduction"] == pytest.approx(0.1, abs=0.03)
    with torch.no_grad():
        assert torch.isfinite(tiny_model(input_ids=ids % tiny_model.config.vocab_size).logits).all()


def test_rank_reduction_budget_and_guard(llama):
    """The paper's knob: τ meets the rank budget before the guard; the effective reduction is reported."""
    decision, log = walk(llama, "welore", {"rank_reduction": 0.3})
    summary = decision.values["welore"].summary()
    full = sum(min(e["shape"]) for e in log)
    # random spectra may tie at σ_min
    assert abs(sum(e["pruned_ranks"] for e in log) - 0.3 * full) <= len(log)
    assert all(e["params_after"] <= e["params_before"] for e in log)
    assert summary["rank_reduction"] <= summary["attempted_rank_reduction"]
    assert ranks.reduction(log)["rank_reduction"] == pytest.approx(summary["rank_reduction"])
    assert ranks.reduction(log)["param_reduction"] == pytest.approx(summary["param_reduction"])


def test_config_checks():
    assert WeLoreConfig().rank_reduction == 0.5
    with pytest.raises(ValueError, match="only one"):
        WeLoreConfig(rank_reduction=0.5, ratio=0.1)
    with pytest.raises(ValueError, match="rank_rule welore"):
        LoRDConfig(rank=8, rank_rule="welore")
    with pytest.raises(CompressorError, match="global"):
        ranks.rank_for(LoRDConfig(ratio=0.1, rank_rule="welore"), 64, 64)


def test_lord_welore_rule_matches_welore(vocab_size):
    """One implementation of the rule: LoRD's rank_rule welore (plain SVD) picks WeLore's ranks."""
    from conftest import build_model

    _, log_welore = walk(build_model("llama", vocab_size), "welore", {"ratio": 0.15})
    _, log_lord = walk(build_model("llama", vocab_size), "lord", {"ratio": 0.15, "rank_rule": "welore"})
    assert [(e["rank"], e["lrc"]) for e in log_welore] == [(e["rank"], e["lrc"]) for e in log_lord]
    assert [e["rel_error"] for e in log_welore if e["rank"]] == pytest.approx(
        [e["rel_error"] for e in log_lord if e["rank"]])


def test_lord_welore_rule_on_whitened_spectra(vocab_size):
    """whiten: gram + rank_rule welore reads the spectra of W·chol(XᵀX), X from the original model."""
    from conftest import build_model

    model = build_model("llama", vocab_size)
    batches = [torch.randint(0, vocab_size, (4, 32), generator=torch.Generator().manual_seed(i))
               for i in range(2)]
    grams, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            def hook(mod, args, out, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                grams[name] = grams.get(name, 0) + x.T @ x
            hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    expected = {name: torch.linalg.svdvals(weight_of(model.get_submodule(name)).double()
                                           @ torch.linalg.cholesky(g)) for name, g in grams.items()}
    decision, log = walk(model, "lord", {"ratio": 0.1, "whiten": "gram", "rank_rule": "welore"}, batches)
    shapes = {e["name"]: tuple(e["shape"]) for e in log}
    solution = decision.values["welore"]
    reference = welore_rule.allocate(expected, shapes, solution.tau)
    assert {n: a.rank for n, a in reference.allocations.items()} == \
        {n: a.rank for n, a in solution.allocations.items()}
    assert all(e["params_after"] <= e["params_before"] for e in log)
    assert ranks.reduction(log)["param_reduction"] == pytest.approx(0.1, abs=0.03)


def test_reduction_accounting():
    log = [  # a square matrix at half its rank saves nothing; the MLP matrix saves at 1/4 of its rank lost
        {"name": "a", "shape": [64, 64], "params_before": 4096, "params_after": 4096, "rank": None},
        {"name": "b", "shape": [64, 192], "params_before": 12288, "params_after": 48 * 256, "rank": 48},
        {"name": "c", "shape": [64, 64], "params_before": 4096, "params_after": 16 * 128, "rank": 16},
    ]
    r = ranks.reduction(log)
    assert r["rank_reduction"] == pytest.approx((16 + 48) / 192)
    assert r["param_reduction"] == pytest.approx(1 - (4096 + 12288 + 2048) / (4096 + 12288 + 4096))
    assert r["factorized"] == 2 and r["targeted_modules"] == 3


def test_recipe_and_inspect_show_lrc(model_dirs, tmp_path):
    out = tmp_path / "welore"
    runner = CliRunner()
    result = runner.invoke(app, ["compress", str(model_dirs["llama"]), "-r", "welore-50", "-o", str(out),
                                 "-q"])
    assert result.exit_code == 0, result.output
    assert "rank reduction" in result.output
    manifest = json.loads((out / "compression.json").read_text())
    assert manifest["recipe"]["steps"][0]["config"]["rank_reduction"] == 0.5
    assert 0 < manifest["reduction"]["param_reduction"] < manifest["reduction"]["rank_reduction"]
    result = runner.invoke(app, ["inspect", str(out)])
    assert result.exit_code == 0, result.output
    assert "LRC" in result.output and "WeLore τ" in result.output
