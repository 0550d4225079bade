"""LoRD's loss-aware options: the Fisher of the model's own predictions (its sampled expectation is the exact
expected Fisher, summed by brute force over the vocabulary; the data-label default keeps its numbers and its
cache key) and rank_rule taylor (each whitened component's first-order score against the brute-force loss change
of dropping it; the parameter budget is the ratio's)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_model, run_steps
from torch import nn

from compressor.kernels import linalg
from compressor.methods.lord import LoRDConfig, lord_factors
from compressor.model.modules import weight_of
from compressor.ranks import loss as loss_rule
from compressor.stats import fisher

V = 16  # a vocabulary small enough to sum over
NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def tiny():
    torch.manual_seed(0)
    return build_model("llama", V), [torch.randint(0, V, (2, 6))]


def expected_fisher(model, batches, names):
    """Σ_windows 1/T² Σ_t Σ_y p_t(y) (∂ℓ_t(y)/∂W)²: the expectation of the drawn-label Fisher, by brute force
    (one backward per position and vocabulary entry)."""
    model = copy.deepcopy(model)
    for p in model.parameters():
        p.requires_grad_(True)
    out = {n: torch.zeros(weight_of(model.get_submodule(n)).shape, dtype=torch.float64) for n in names}
    for ids in torch.cat(batches).split(1):
        steps = ids.shape[1] - 1
        with torch.no_grad():
            probs = torch.softmax(model(input_ids=ids).logits[0, :-1].double(), -1)  # (T, V)
        for t in range(steps):
            for y in range(V):
                model.zero_grad()
                logits = model(input_ids=ids).logits[0, t:t + 1].float()
                (nn.functional.cross_entropy(logits, torch.tensor([y])) / steps).backward()
                for n in names:
                    out[n] += probs[t, y] * model.get_submodule(n).weight.grad.double() ** 2
    return out


def test_model_label_fisher_is_the_expected_fisher():
    model, batches = tiny()
    exact = expected_fisher(model, batches, NAMES)
    drawn = fisher.collect_fisher(model, batches, NAMES, "cpu", kind=fisher.Pass(labels="model", draws=600))
    data = fisher.collect_fisher(model, batches, NAMES, "cpu")
    rows = fisher.collect_fisher(model, batches, NAMES, "cpu", reduce="out",
                                 kind=fisher.Pass(labels="model", draws=600))
    for name in NAMES:
        want = exact[name]

        def error(got, reference=want):
            return float((got.double() - reference).norm() / reference.norm())

        assert error(drawn[name]) < 0.08  # Monte Carlo: ≈ 1/√(600 draws × 10 positions) per entry
        assert error(rows[name], want.sum(1)) < 0.08
        assert error(data[name]) > 0.4  # the text's labels give another matrix: the test could fail
    # seeded: the same draws again, another seed other draws
    again = fisher.collect_fisher(model, batches, NAMES[:1], "cpu", kind=fisher.Pass(labels="model", draws=3))
    same = fisher.collect_fisher(model, batches, NAMES[:1], "cpu", kind=fisher.Pass(labels="model", draws=3))
    other = fisher.collect_fisher(model, batches, NAMES[:1], "cpu", kind=fisher.Pass(labels="model", draws=3, seed=1))
    assert torch.equal(again[NAMES[0]], same[NAMES[0]]) and not torch.equal(again[NAMES[0]], other[NAMES[0]])


def test_data_labels_keep_their_numbers_and_key():
    model, batches = tiny()
    plain = fisher.collect_fisher(model, batches, NAMES, "cpu")
    explicit = fisher.collect_fisher(model, batches, NAMES, "cpu", kind=fisher.Pass(labels="data"))
    assert all(torch.equal(plain[n], explicit[n]) for n in NAMES)
    key = fisher.fingerprint(model, batches, NAMES)
    assert fisher.fingerprint(model, batches, NAMES, kind=fisher.DATA) == key
    assert len({key, fisher.fingerprint(model, batches, NAMES, kind=fisher.Pass(labels="model")),
                fisher.fingerprint(model, batches, NAMES, kind=fisher.Pass(labels="model", seed=1)),
                fisher.fingerprint(model, batches, NAMES, kind=fisher.Pass(statistic="gradient"))}) == 4
    with pytest.raises(Exception, match="draws"):
        fisher.Pass(draws=2)
    with pytest.raises(Exception, match="gradient pass"):
        fisher.Pass(labels="model", statistic="gradient")


def test_gradient_statistic_is_the_summed_gradient(cache):
    model, batches = tiny()
    reference = copy.deepcopy(model)
    reference.zero_grad()
    for ids in torch.cat(batches).split(1):
        fisher.next_token_loss(reference, ids).backward()
    got, info = fisher.fisher_for(model, batches, NAMES, kind=fisher.Pass(statistic="gradient"))
    for name in NAMES:
        torch.testing.assert_close(got[name], reference.get_submodule(name).weight.grad, rtol=1e-4, atol=1e-7)
    assert bool((got[NAMES[0]] < 0).any())  # signed: a cached copy must still be read back
    again, info = fisher.fisher_for(model, batches, NAMES, kind=fisher.Pass(statistic="gradient"))
    assert info["hit"] and info["windows"] == 2 and all(torch.equal(got[n], again[n]) for n in NAMES)


def test_first_order_scores_are_the_inner_products_of_the_dropped_components():
    torch.manual_seed(2)
    weight = torch.randn(9, 7, dtype=torch.float64)
    x = torch.randn(50, 7, dtype=torch.float64) * torch.linspace(0.3, 2, 7)
    rows = torch.rand(9, dtype=torch.float64) + 0.2
    gradient = torch.randn(9, 7, dtype=torch.float64)
    whitening = linalg.from_gram(x.T @ x)
    scores = linalg.first_order_scores(rows[:, None] * whitening.apply(weight), whitening, gradient, rows)
    previous = torch.zeros_like(weight)
    for j in range(7):  # component j: what the rank-(j+1) truncation adds to the rank-j one
        up, down = lord_factors(weight, j + 1, whitening, torch.float64, rows)
        assert float(scores[j]) == pytest.approx(abs(float((gradient * (up @ down - previous)).sum())), rel=1e-8)
        previous = up @ down
    torch.testing.assert_close(previous, weight)  # the components add up to W


def test_taylor_scores_order_the_brute_force_loss_changes():
    torch.manual_seed(0)
    model, batches = build_model("llama", 32), [torch.randint(0, 32, (4, 12))]
    name = "model.layers.0.mlp.down_proj"
    module = model.get_submodule(name)
    inputs = []
    hook = module.register_forward_hook(lambda m, i, o: inputs.append(i[0].detach().flatten(0, -2).double()))

    def mean_loss():
        with torch.no_grad():
            return sum(float(fisher.next_token_loss(model, ids)) for ids in torch.cat(batches).split(1)) / 4

    base = mean_loss()
    hook.remove()
    x = torch.cat(inputs)
    whitening = linalg.from_gram(x.T @ x)
    gradient = fisher.collect_fisher(model, batches, [name], "cpu",
                                     kind=fisher.Pass(statistic="gradient"))[name].double() / 4
    weight = module.weight.detach().double().clone()
    scores = linalg.first_order_scores(whitening.apply(weight), whitening, gradient)
    u, s, vh = torch.linalg.svd(whitening.apply(weight), full_matrices=False)
    changes = []
    for j in range(len(s)):  # drop component j alone and measure the loss
        module.weight.data = (weight - s[j] * torch.outer(u[:, j], whitening.unapply(vh)[j])).float()
        changes.append(abs(mean_loss() - base))
    module.weight.data = weight.float()

    def ranks(values):
        return torch.as_tensor(values).argsort().argsort().double()

    agreement = float(torch.corrcoef(torch.stack([ranks(changes), ranks(scores)]))[0, 1])
    assert agreement > 0.9  # Spearman; measured 0.98
    assert int(torch.as_tensor(changes).argmax()) == int(scores.argmax())


def test_fill_meets_the_budget_without_more_loss():
    torch.manual_seed(3)
    shapes = {"a": (8, 12), "b": (8, 12), "c": (5, 9)}
    costs = {n: torch.rand(min(s), dtype=torch.float64) for n, s in shapes.items()}  # not monotone
    budget = 0.35 * sum(m * n for m, n in shapes.values())
    plain = loss_rule.allocate_costs(costs, shapes, budget, normalize=False)
    filled = loss_rule.allocate_costs(costs, shapes, budget, normalize=False, fill=True)
    assert budget <= filled["removed_params"] <= plain["removed_params"]
    assert filled["removed_params"] - budget < max(m + n for m, n in shapes.values())
    assert filled["total_loss"] <= plain["total_loss"]


def test_lord_taylor_spends_the_ratio_budget(vocab_size, batches):
    config = {"ratio": 0.3, "whiten": "gram", "rank_rule": "taylor"}
    report = run_steps(build_model("llama", vocab_size), [{"method": "lord", "config": config}], batches)
    record = report.plan.steps[0].decision.record
    uniform = run_steps(build_model("llama", vocab_size), [{"method": "lord", "config": {**config,
                                                                                          "rank_rule": "uniform"}}],
                        batches)
    before = sum(e["params_before"] for e in report.log)
    removed = before - sum(e["params_after"] for e in report.log)
    removed_uniform = before - sum(e["params_after"] for e in uniform.log)
    step = max(sum(e["shape"]) for e in report.log)
    assert record["rank_rule"] == "taylor" and removed == record["removed_params"]
    assert 0.3 * before <= removed_uniform <= removed < removed_uniform + step  # the uniform ratio's budget
    ranks = {e["name"]: e["rank"] for e in report.log}
    assert ranks == record["ranks"] and len(set(ranks.values())) > 2  # non-uniform


def test_lord_output_fisher_of_the_model(vocab_size, batches):
    config = {"ratio": 0.3, "whiten": "gram", "output_weight": "fisher"}
    models, records = [], []
    for extra in ({}, {"output_fisher": "data"}, {"output_fisher": "model"}):
        model = build_model("llama", vocab_size)
        records.append(run_steps(model, [{"method": "lord", "config": {**config, **extra}}], batches)
                       .plan.steps[0].decision.record)
        models.append(model.state_dict())
    assert "output_fisher" not in records[0] and records[2]["output_fisher"] == "model"
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])  # data: today's numbers
    assert any(not torch.equal(models[0][k], models[2][k]) for k in models[0])


def test_config_checks():
    with pytest.raises(ValueError, match="output_fisher applies"):
        LoRDConfig(ratio=0.2, output_fisher="model")
    with pytest.raises(ValueError, match="rank_rule taylor needs a parameter budget"):
        LoRDConfig(rank=4, rank_rule="taylor")
    with pytest.raises(ValueError, match="gram_side: input"):
        LoRDConfig(ratio=0.2, whiten="gram", gram_side="auto", rank_rule="taylor")
