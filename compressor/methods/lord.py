"""LoRD: low-rank decomposition of the decoder linears (Kaushal et al., 2023, arXiv:2309.14021).

Each targeted ``W`` (m, n) becomes ``up @ down`` with ``up = U_r Σ_r^½`` (m, r) and
``down = Σ_r^½ V_rᵀ`` (r, n). ``whiten`` picks the objective from the same kernel
(``linalg.whitened_svd``):

- ``none``: plain SVD of W (LoRD as released; data-free);
- ``activation``: ASVD's diagonal scaling ``S = diag(mean|x|)^α`` (arXiv:2312.05821);
- ``gram``: SVD-LLM's truncation-aware whitening ``S = chol(XᵀX)`` (arXiv:2403.07378).

No public LoRD code exists; docs/methods.md#lord-lord specifies it from the paper. Ranks come from the shared rank
rules; a matrix whose rank would not save parameters stays dense. With ``rank_rule: welore`` the ranks
are non-uniform, from WeLore's threshold on the spectrum this method truncates (``welore_rule``): the
raw one for ``whiten: none``, the whitened ``W S`` otherwise, with ``S`` from statistics of the original
model taken in ``decide`` (a walk of its own; the factors then use the walk's statistics as usual). With
``rank_rule: loss`` the same spectra give the ranks of least total relative truncation loss
(``ranks.loss``).

Two-sided, loss-aware (IO-SVD's mechanisms; docs/methods.md#lord-lord):

- ``output_fisher: model`` (with ``output_weight: fisher``) takes the row weights from the Fisher of the model's
  own predictions (labels drawn from its softmax, one draw per position, seeded: the true Fisher, the curvature
  of the KL between the original and the compressed model's next-token distributions) rather than from the
  text's labels (the empirical Fisher, ``data``, the default);
- ``rank_rule: taylor`` spends the parameter budget where the first-order effect on the loss of what is dropped
  is least: component j of the whitened SVD ``diag(d) W S = Σ σ_j u_j v_jᵀ`` removes ``Δ_j = d⁻¹ u_j σ_j v_jᵀ S⁻¹``
  from W, costing ``|⟨Ḡ, Δ_j⟩|`` with Ḡ the mean gradient of the next-token loss over the calibration windows
  (one gradient pass, cached; ``linalg.first_order_scores``); a matrix keeping rank r pays Σ_{j ≥ r} of them
  (``ranks.loss.allocate_costs``, absolute: the scores are in units of the loss). Each matrix still keeps its
  leading components (the truncation stays the optimal one for its objective); only how many moves.

``refit: outputs`` (with ``whiten: gram``) fits each matrix to the outputs the *original* model produces
rather than to its own weight: with ``propagate: compressed`` a layer sees inputs X̃ that earlier compression
changed, while it should still produce W·X. The minimizer of ``‖W X − Ŵ X̃‖_F`` over rank-r ``Ŵ`` is the
reduced-rank regression: the whitened truncated SVD (under G̃ = X̃ᵀX̃) of the least-squares map
``W C G̃⁻¹`` (``linalg.output_refit``, C = Σ x x̃ᵀ from the walk's reference stream, which carries the same
calibration batches through the original model). At layer 0, where X̃ = X, it is plain SVD-LLM.

``refit: block`` goes one step further for the linear that ends each block (o_proj, down_proj): its output is
added to a residual stream r̃ that has itself drifted from the original r, so matching ``W x`` still leaves the
block output ``r̃ + Ŵ x̃`` off the original ``r + W x``. Its target becomes ``W x + β (r − r̃)`` (β:
``block_strength``), the least-squares map ``(W C + β D) G̃⁻¹`` with D = Σ (r − r̃) x̃ᵀ (m, n; statistic
``drift_cross``: r is the input of the block's norm, in both streams), truncated as above: the reduced-rank
regression of the block output (AA-SVD's and ResSVD's objective, in closed form, one matrix per block). The
other linears keep ``refit: outputs``'s target.

``gram_side`` (with ``whiten: gram``) says which Gram the truncation is solved from: ``input`` (G = XᵀX, n×n,
SVD-LLM's), ``output`` (W G Wᵀ = Σ (y − b)(y − b)ᵀ, m×m: the same optimum, ``linalg.output_side_svd``) or ``auto``
(the smaller: the output side for wide matrices, in > out). At Llama-3-8B's width down_proj's input Gram is
14336² (1.6 GB in fp64) where its output Gram is 4096²: what a streamed run of a large model needs. The
figures move only by rounding (docs/large-models.md#memory-of-a-layer).

```yaml
steps:
  - method: lord
    config: {ratio: 0.2, whiten: gram}                      # or add rank_rule: welore
```

``factor_bits: 8`` stores the factors as per-row int8 (``methods.factor_bits``), about half the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..config.configs import field
from ..contract import Decision, LayerContext, LinearCompressor, ModelView, Outcome, Target
from ..errors import CompressorError
from ..kernels import linalg
from ..model.modules import dense_module
from ..ranks import loss as loss_rule
from ..ranks import uniform as ranks
from ..ranks import welore as welore_rule
from ..stats import fisher as fisher_pass
from ..stats.accumulators import Request, inputs
from .factor_bits import FactorBits, low_rank_module


@dataclass
class LoRDConfig(ranks.RankRule, FactorBits):
    whiten: Literal["none", "activation", "gram"] = field("none", "none (plain SVD), activation (ASVD), gram (SVD-LLM)")
    alpha: float = field(0.5, "exponent of mean|x| for whiten: activation (ASVD's alpha)")
    gram_root: Literal["cholesky", "eigh"] = field("cholesky", "square root of the Gram for whiten: gram")
    svd_dtype: Literal["float64", "float32"] = field("float64", "precision of the SVD")
    svd_solver: Literal["full", "gram"] = field(
        "full", "full: LAPACK's SVD of the whitened matrix W S (m×n, several copies); gram: the same factors from "
        "the eigendecomposition of its n×n Gram, built in row chunks (tall matrices; memory O(n² + m·r), for "
        "models whose layers barely fit: singular values below ~1e-8·σ₁ are not resolved)")
    output_weight: Literal["none", "fisher"] = field(
        "none", "weight the truncation on the output side too: fisher = √(Fisher summed per output row + 1e-6) "
        "(IO-SVD's two-sided weighting; FWSVD's Fisher pass, cached)")
    fisher_cache: Literal["use", "refresh", "off"] = field(
        "use", "output_weight fisher: the Fisher cache on disk: use (read/write), refresh (recompute), off")
    loss_scale: Literal["relative", "absolute"] = field(
        "relative", "rank_rule loss: each matrix's truncation loss divided by its own output energy (relative), "
        "or as it is (absolute: with output_weight fisher, in units of the model's loss)")
    refit: Literal["none", "outputs", "block"] = field(
        "none", "outputs: fit each matrix to the original model's outputs from the inputs it now sees (reduced-"
        "rank regression; needs whiten gram, and propagate compressed to differ from none); block: the same, and "
        "each block's last linear (o, down) also fit to the original block output, making up for the residual "
        "stream's drift")
    gram_side: Literal["input", "output", "auto"] = field(
        "input", "whiten gram: solve from the input Gram (n×n, SVD-LLM), the output Gram W G Wᵀ (m×m, the same "
        "optimum), or auto: the smaller (output for wide matrices, in > out)")
    output_fisher: Literal["data", "model"] = field(
        "data", "output_weight fisher: the Fisher's labels: data (the text's next tokens: the empirical Fisher) or "
        "model (drawn from the model's own predictions, seeded: the true Fisher, the KL's curvature, IO-SVD's)")
    refit_strength: float = field(
        1.0, "refit outputs: the target's share of the original outputs W·X, the rest W·X̃ (0 = no refit): "
        "shrinks the fit toward SVD-LLM's, which fits the calibration text less")
    block_strength: float = field(
        1.0, "refit block: the share of the residual stream's drift (original minus compressed, where o and down "
        "add their outputs) that o and down are fit to make up for (0 = refit outputs)")
    block_dense: bool = field(
        False, "refit block: also refit the o and down that the rank rule keeps dense, at full rank (the least-"
        "squares map itself: the same shape and parameters)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.refit != "none" and self.whiten != "gram":
            raise ValueError(f"refit: {self.refit} needs whiten: gram (it solves under the Gram of the inputs)")
        if not 0.0 <= self.refit_strength <= 1.0:
            raise ValueError(f"refit_strength must be in [0, 1], got {self.refit_strength}")
        if not 0.0 <= self.block_strength <= 1.0:
            raise ValueError(f"block_strength must be in [0, 1], got {self.block_strength}")
        if (self.block_strength != 1.0 or self.block_dense) and self.refit != "block":
            raise ValueError("block_strength and block_dense apply to refit: block")
        if self.loss_scale != "relative" and self.rank_rule != "loss":
            raise ValueError("loss_scale applies to rank_rule: loss")
        if self.output_fisher != "data" and self.output_weight != "fisher":
            raise ValueError("output_fisher applies to output_weight: fisher")
        if self.rank_rule == "taylor" and self.gram_side != "input":
            raise ValueError("rank_rule taylor scores the input-side whitened components: it needs gram_side: input")
        if self.gram_side != "input" and self.whiten != "gram":
            raise ValueError("gram_side applies to whiten: gram")
        if self.gram_side != "input" and self.refit != "none":
            raise ValueError(f"refit: {self.refit} solves under the input Gram: it needs gram_side: input")

    def output_side(self, shape: tuple[int, int]) -> bool:
        """Whether a target of ``shape`` (out, in) is truncated from its output Gram."""
        return self.gram_side == "output" or (self.gram_side == "auto" and shape[1] > shape[0])


def lord_factors(weight: torch.Tensor, rank: int, whitening: linalg.Whitening | None, svd_dtype: torch.dtype,
                 row_scale: torch.Tensor | None = None, output_gram: torch.Tensor | None = None,
                 solver: str = "full"):
    """(up (m, r), down (r, n)) of the whitened truncated SVD of ``weight`` (m, n): the minimizer of
    ``‖diag(row_scale) (W − up·down) S‖_F`` (``row_scale`` None: no output-side weight), from ``whitening``
    (S) or, given ``output_gram`` W S Sᵀ Wᵀ (m, m), from the output side (``linalg.output_side_svd``);
    ``solver``: ``whitened_svd``'s."""
    scale = None if row_scale is None else row_scale.to(device=weight.device, dtype=svd_dtype)[:, None]  # (m, 1)
    work = weight if scale is None else weight.to(svd_dtype) * scale
    if output_gram is None:
        up, down, _ = linalg.whitened_svd(work, rank, whitening, svd_dtype, solver=solver)
    else:
        gram = output_gram if scale is None else (
            scale * output_gram.to(device=weight.device, dtype=svd_dtype) * scale.T)
        up, down, _ = linalg.output_side_svd(work, gram, rank, svd_dtype)
    return (up, down) if scale is None else (up / scale, down)


class LoRD(LinearCompressor):
    name = "lord"
    Config = LoRDConfig
    summary = "truncated SVD of each linear; whiten none | activation (ASVD) | gram (SVD-LLM)"
    paper = "arXiv:2309.14021"

    def __init__(self, config: LoRDConfig) -> None:
        super().__init__(config)
        self.row_scales: dict[str, torch.Tensor] = {}  # output_weight fisher: name → (m,) fp64
        self.gradients: dict[str, torch.Tensor] = {}  # rank_rule taylor, during decide: name → mean Ḡ (m, n)

    @property
    def uses_data(self) -> bool:
        return bool(self.requests()) or self.config.output_weight == "fisher" or self.config.rank_rule == "taylor"

    @property
    def kinds(self) -> frozenset[str]:
        return {"none": frozenset(), "activation": frozenset({"abs_mean"}), "gram": frozenset({"gram"})}[
            self.config.whiten]

    def requests(self) -> tuple[Request, ...]:
        if self.config.gram_side == "output":
            return (Request("gram", "output"), Request("mean", "output"))
        if self.config.gram_side == "auto":  # the input Gram of the others, the output Gram of the wide ones
            return (Request("gram", matrices="not_wide"), Request("gram", "output", matrices="wide"),
                    Request("mean", "output", matrices="wide"))
        refit = {"none": (), "outputs": ("cross_gram",), "block": ("cross_gram", "drift_cross")}[self.config.refit]
        return inputs(*sorted(self.kinds), *refit)

    @property
    def svd_dtype(self) -> torch.dtype:
        return torch.float64 if self.config.svd_dtype == "float64" else torch.float32

    def decide(self, view: ModelView) -> Decision:
        fisher_record = self.output_weights(view) if self.config.output_weight == "fisher" else {}
        if self.config.rank_rule == "uniform":
            chosen, record = ranks.uniform_ranks(self.config, view.shapes, view.model_params)
            return Decision({**record, **fisher_record}, ranks=chosen)
        taylor = self.config.rank_rule == "taylor"
        gradient_record = self.mean_gradients(view) if taylor else {}
        measure = self.first_order_scores if taylor else welore_rule.singular_values
        if self.config.whiten == "none":
            spectra = welore_rule.weight_spectra(view, self.svd_dtype, self.row_scales, measure)
        else:
            spectra = welore_rule.whitened_spectra(view, self.kinds, self.whitening_of, self.svd_dtype,
                                                   self.row_scales, self.config.output_side, measure)
        target = welore_rule.budget(rank_reduction=self.config.rank_reduction, ratio=self.config.ratio,
                                    model_ratio=self.config.model_ratio, shapes=view.shapes,
                                    model_params=view.model_params)
        if taylor:  # spectra: each component's |⟨Ḡ, Δ_j⟩|, already in units of the loss; a ratio's budget is
            # what the uniform ratio removes with its integer ranks (up to a rank per matrix above ratio · Σ m n)
            removed = target["removed_params"] if self.config.ratio is None else ranks.removed_by_ratio(
                self.config.ratio, list(view.shapes.values()))
            solved = loss_rule.allocate_costs(spectra, view.shapes, removed, normalize=False, fill=True)
            return Decision({"rank_rule": "taylor", "rule": self.config.rule, **solved, **gradient_record,
                             **fisher_record}, ranks=solved["ranks"])
        if self.config.rank_rule == "loss":
            solved = loss_rule.allocate(spectra, view.shapes, target["removed_params"],
                                        normalize=self.config.loss_scale == "relative")
            return Decision({"rank_rule": "loss", "rule": self.config.rule, "loss_scale": self.config.loss_scale,
                             **solved, **fisher_record}, ranks=solved["ranks"])
        solution = welore_rule.solve(spectra, view.shapes, **target)
        return Decision({**solution.record(), **fisher_record}, values={"welore": solution})

    def output_weights(self, view: ModelView) -> dict:
        """The output-side weights √(Σ_in F + 1e-6) (m,) of every target, from the (cached) Fisher pass."""
        if view.batches is None:
            raise CompressorError("lord output_weight fisher needs calibration data (the Fisher pass)")
        kind = fisher_pass.Pass(labels=self.config.output_fisher)
        fisher, info = fisher_pass.fisher_for(view.model, view.batches, list(view.shapes), view.device,
                                              checkpointing=True, cache=self.config.fisher_cache, reduce="out",
                                              kind=kind)
        for name in view.shapes:
            self.row_scales[name] = fisher_pass.diagonal_weight(fisher.pop(name), "out")
        labels = {} if self.config.output_fisher == "data" else {"output_fisher": self.config.output_fisher}
        return {"output_weight": "fisher", "fisher_cache": "hit" if info.get("hit") else "computed", **labels}

    def mean_gradients(self, view: ModelView) -> dict:
        """Ḡ (m, n) of every target: the next-token loss's gradient averaged over the calibration windows (the
        Fisher pass's gradient statistic, cached like the Fisher)."""
        if view.batches is None:
            raise CompressorError("lord rank_rule taylor needs calibration data (the gradient pass)")
        total, info = fisher_pass.fisher_for(view.model, view.batches, list(view.shapes), view.device,
                                             checkpointing=True, cache=self.config.fisher_cache,
                                             kind=fisher_pass.Pass(statistic="gradient"))
        windows = int(info["windows"])  # every rank's
        self.gradients = {name: total.pop(name) / windows for name in view.shapes}
        return {"gradient_cache": "hit" if info.get("hit") else "computed", "gradient_windows": windows}

    def first_order_scores(self, name: str, work: torch.Tensor, whitening: linalg.Whitening) -> torch.Tensor:
        """|⟨Ḡ, Δ_j⟩| of each component of ``work`` = diag(d) W S (a ``welore_rule.Measure``)."""
        return linalg.first_order_scores(work, whitening, self.gradients.pop(name), self.row_scales.get(name))

    def refit_map(self, target: Target, whitening: linalg.Whitening) -> torch.Tensor:
        """The least-squares map (m, n) fp64 the refit truncates: ``W C G̃⁻¹`` from X̃ to W·X, with
        ``refit_strength`` α the target α W X + (1 − α) W X̃ (cross α C + (1 − α) G̃), and with ``refit: block`` the
        residual stream's drift β (r − r̃) added for o/down (``block_drift``)."""
        strength = self.config.refit_strength
        cross = target.stats.cross if strength == 1.0 else (
            strength * target.stats.cross + (1 - strength) * target.stats.gram)
        return linalg.output_refit(target.weight, cross, whitening, self.block_drift(target))

    def kept_dense(self, target: Target, ctx: LayerContext, note: str, extra: dict | None = None) -> Outcome:
        """A linear the rank rule keeps dense: left as it is or, with ``block_dense`` (refit block), a block's last
        linear replaced by its full-rank refit map (the same shape and parameters, fit to the block output)."""
        if not self.config.block_dense or target.stats is None or self.block_drift(target) is None:
            return Outcome(None, note=note, extra=extra or {})
        weight = self.refit_map(target, self.whitening_of(target.stats))  # (m, n) fp64
        module = dense_module(weight.to(ctx.dtype), target.bias, target.dense_class)
        return Outcome(module, note=f"{note}; refit to the block output at full rank", extra=extra or {})

    def block_drift(self, target: Target) -> torch.Tensor | None:
        """refit block: β D (m, n), D = Σ (r − r̃) x̃ᵀ of a block's last linear (o, down): the target gains the
        residual stream's drift where its output is added, so the block's output is fit to the original one;
        None for the other linears (and without refit block)."""
        if self.config.refit != "block" or target.stats.drift is None:
            return None
        strength = self.config.block_strength
        return target.stats.drift if strength == 1.0 else strength * target.stats.drift

    def whitening_of(self, stats) -> linalg.Whitening:
        if self.config.whiten == "activation":
            return linalg.diagonal(stats.abs_mean, self.config.alpha)
        if self.config.whiten == "gram":
            return linalg.from_gram(stats.gram, self.config.gram_root)
        return linalg.identity()

    def compress_linear(self, target: Target, ctx: LayerContext) -> Outcome:
        m, n = target.weight.shape
        extra, note = {}, ""
        solution = target.decision.values.get("welore")  # rank_rule welore: τ and every matrix's rank
        if solution is not None:
            allocation = solution.allocations[target.name]
            extra = allocation.extra(solution.tau)
            if not allocation.lrc:
                return self.kept_dense(target, ctx, allocation.note(solution.tau), extra)
            rank, note = allocation.rank, allocation.note(solution.tau)
        else:
            rank = target.decision.ranks[target.name]
            if rank is None:  # rank_rule loss: cheaper to keep it dense
                return self.kept_dense(target, ctx, "rank_rule loss: kept dense")
        if not ranks.saves_parameters(rank, m, n):
            return self.kept_dense(target, ctx, f"rank {rank} ≥ break-even {ranks.break_even(m, n):.0f}: kept dense")
        row_scale = self.row_scales.pop(target.name, None)
        if self.config.output_side((m, n)):
            if target.output_stats is None:
                raise CompressorError(f"gram_side output: no output Gram was collected for {target.name}")
            gram = target.output_stats.gram_about(target.bias)  # W G Wᵀ: the bias taken out
            up, down = lord_factors(target.weight, rank, None, self.svd_dtype, row_scale, gram)
            module = low_rank_module(target.weight, up, down, target.bias, target.dense_class, ctx.dtype,
                                     self.config.factor_bits)  # no input Gram: rounded unwhitened
            error = linalg.output_side_error(target.weight, module.dense_weight().detach(), gram)  # as stored
            return Outcome(module, rank=rank, note=note,
                           extra={**extra, "gram_side": "output", "rel_output_error": error})
        whitening = self.whitening_of(target.stats)
        weight = target.weight
        if self.config.refit != "none" and target.stats.cross is None:  # a routed expert: its tokens differ
            note = "refit skipped: a routed expert's tokens do not pair with the original model's"
        elif self.config.refit != "none":
            weight = self.refit_map(target, whitening)
        up, down = lord_factors(weight, rank, whitening, self.svd_dtype, row_scale, solver=self.config.svd_solver)
        module = low_rank_module(weight, up, down, target.bias, target.dense_class, ctx.dtype, self.config.factor_bits,
                                 whitening.gram() if self.config.factor_bits < 16 else None)
        return Outcome(module, rank=rank, note=note, extra=extra)
