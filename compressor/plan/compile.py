"""The compiled plan: a recipe turned into typed steps, once, before any weight is read.

``compile_plan(recipe, model)`` needs only the model's module tree and shapes: a skeleton on the meta
device (``model.loading.skeleton``) serves, so a bad value fails before loading. For every step it
builds and validates the compressor's config (unknown keys, types, ranges, and ``Config.validate(shapes)``
against the targeted shapes; ``Config.warnings(shapes)``, where a config has it, gives the lines
``Plan.warnings`` returns, such as a quantization group size no serving stack can describe), resolves its targets against the architecture into groups per layer
(``GroupSpec``), and records its calibration stream and statistics requests. ``decide`` later fills each
step's ``decision`` (solved ratios, per-module ranks, chosen layers) on the loaded model;
``Plan.applied_recipe`` and ``Plan.decisions`` are what compression.json records as ``recipe`` and ``plan``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..config import configs
from ..contract import Compressor, Decision
from ..errors import CompressorError, quote
from ..methods import registry
from ..model.architecture import UnknownLayout, describe
from ..model.attention import not_reproduced
from ..model.loading import parameter_count
from ..model.modules import shape_of
from ..model.targets import check_patterns, decoder_linears, layer_index, linear_roles, select
from ..stats.accumulators import PAIRED_STATISTICS, Request
from ..walk.layers import DEFAULT_STREAM, base_stream, reference_of
from .recipe import CalibrationConfig, Recipe, step_calibration


@dataclass
class GroupSpec:
    """One group a step compresses: members by role, in one decoder layer."""

    kind: str  # "linear" | "mlp" | "attention"
    name: str  # the linear's or the block's fully qualified name
    layer: int
    members: dict[str, str]  # role → fully qualified linear name
    block: str | None = None  # the block module's name, where the block is a module

    def module_name(self, role: str) -> str | None:
        """The module a request's role refers to."""
        return self.block if role == "block" else self.members.get(role)


@dataclass
class StepPlan:
    index: int
    compressor: Compressor
    targets: list[str]  # the recipe's patterns
    ignore: list[str]
    stream: str  # calibration stream name
    calibration: CalibrationConfig
    shapes: dict[str, tuple[int, int]]  # every targeted linear → (out, in), model order
    groups: list[GroupSpec]
    decision: Decision | None = None
    warnings: list[str] = field(default_factory=list)  # said before the run: e.g. an unservable group size

    @property
    def method(self) -> str:
        return self.compressor.name

    @property
    def requests(self) -> tuple[Request, ...]:
        return tuple(self.compressor.requests())

    @property
    def paired(self) -> bool:
        """Whether a statistic pairs with the original model (the walk carries a reference stream)."""
        return any(r.statistic in PAIRED_STATISTICS for r in self.requests)

    def groups_in(self, layer: int) -> list[GroupSpec]:
        return [group for group in self.groups if group.layer == layer]

    def apply(self, decision: Decision | None) -> None:
        """Record a model-level decision; keep only the groups whose members it leaves targeted."""
        self.decision = decision
        if decision is not None and decision.targets is not None:
            kept = set(decision.targets)
            self.groups = [g for g in self.groups if all(n in kept for n in g.members.values())]


@dataclass
class Plan:
    recipe: Recipe
    steps: list[StepPlan]
    model_params: int
    arch: Any = None  # model.architecture.Architecture, where a step needs roles (blocks, heads)

    @property
    def propagate(self) -> str:
        return self.recipe.propagate

    @property
    def statistics(self) -> str:
        return self.recipe.statistics

    @property
    def moe_calibration(self) -> str:
        return self.recipe.moe_calibration

    @property
    def moe_min_tokens(self) -> int:
        return self.recipe.moe_min_tokens

    def warnings(self) -> list[str]:
        """What the run will produce that the user may not want, each naming its step (``Config.warnings``):
        said before any weight is read (``compress``; a dry run prints them too)."""
        return [line for step in self.steps for line in step.warnings]

    def data_streams(self) -> dict[str, CalibrationConfig]:
        """Stream name → calibration set, for the steps that use data (statistics or a model-level pass)."""
        return {s.stream: s.calibration for s in self.steps if s.compressor.uses_data}

    def walk_streams(self) -> list[str]:
        """The streams the layer walk carries: those of steps that request per-group statistics, and the
        reference stream (``walk.layers.reference_of``) of each whose step pairs statistics with it."""
        names = {s.stream for s in self.steps if s.requests}
        names |= {reference_of(s.stream) for s in self.steps if s.paired}
        return sorted(names)

    def walk_batches(self, batches: dict[str, list[Any]]) -> dict[str, list[Any]]:
        """The walk's streams with their calibration batches (a reference stream: its base stream's); a
        stream whose base has no batches is left out."""
        return {name: batches[base_stream(name)] for name in self.walk_streams() if base_stream(name) in batches}

    def stream_rules(self) -> dict[str, str]:
        """Stream → its own propagate rule where it is not the recipe's: reference streams follow the
        original model."""
        return {name: "original" for name in self.walk_streams() if name != base_stream(name)}

    def applied_recipe(self) -> dict[str, Any]:
        """The recipe as applied, every config default filled (it parses back into the same plan)."""
        data = self.recipe.to_dict()
        for raw, step in zip(data["steps"], self.steps):
            raw["config"] = configs.to_dict(step.compressor.config)
        return data

    def decisions(self) -> list[dict[str, Any]]:
        """Per step: what its targets resolved to, and what its model-level decision produced."""
        return [{"method": step.method, "targets": len(step.shapes), "groups": len(step.groups),
                 "group": step.compressor.group, "stream": step.stream,
                 "decision": None if step.decision is None else step.decision.record} for step in self.steps]


def stream_name(recipe: Recipe, index: int) -> str:
    """The calibration stream of step ``index``: the recipe's ("default") or one named by its own set."""
    cal = step_calibration(recipe.calibration, recipe.steps[index])
    if cal == recipe.calibration:
        return DEFAULT_STREAM
    return f"{cal.dataset}:{cal.n_samples}x{cal.seq_len}:seed{cal.seed}:batch{cal.batch_size}"


def linear_groups(names: list[str], model: nn.Module) -> list[GroupSpec]:
    return [GroupSpec("linear", name, layer_index(model, name), {"linear": name}) for name in names]


def block_groups(kind: str, names: list[str], model: nn.Module) -> list[GroupSpec]:
    """The ``kind`` blocks ("mlp", "attention") all of whose role linears are among ``names``."""
    arch, chosen, groups = describe(model), set(names), []
    for layer in sorted({layer_index(model, name) for name in names}):
        members = arch.block_names(kind, layer)
        if members and all(name in chosen for name in members.values()):
            block = arch.block_path(kind, layer)
            groups.append(GroupSpec(kind, block or arch.layer_prefix(layer), layer, members, block))
    return groups


def mlp_groups(names: list[str], model: nn.Module) -> list[GroupSpec]:
    """The MLPs of a mixture-of-experts model, each routed expert's on its own: every module whose
    ``gate_proj``, ``up_proj`` and ``down_proj`` are all among ``names`` (an expert ``…mlp.experts.<e>``, a
    shared expert, a dense layer's ``mlp``), in model order."""
    chosen, groups = set(names), []
    for path, _ in model.named_modules():
        members = {role: f"{path}.{role}_proj" for role in ("gate", "up", "down")}
        if path and all(member in chosen for member in members.values()):
            groups.append(GroupSpec("mlp", path, layer_index(model, members["down"]), members, path))
    return groups


def compile_step(recipe: Recipe, index: int, linears: dict[str, nn.Module], model: nn.Module) -> StepPlan:
    spec = recipe.steps[index]
    where = f"step {index} ({spec.method})"
    compressor = registry.create(spec.method, spec.config, where)
    try:
        check_patterns([*spec.targets, *spec.ignore])  # as parse did: a Recipe may be built in code
    except ValueError as exc:
        raise CompressorError(f"{where}: {exc}") from None
    names = select(list(linears), spec.targets, spec.ignore)
    if not names:
        raise CompressorError(f"{where}: targets {quote(spec.targets)} (ignore {quote(spec.ignore)}) match none of the "
                              f"model's decoder linears; they are named {', '.join(linear_roles(linears))} "
                              f"(e.g. {next(iter(linears), '?')})")
    shapes = {name: tuple(shape_of(linears[name])) for name in names}
    validate = getattr(compressor.config, "validate", None)
    if validate is not None and shapes:
        try:
            validate(shapes)
        except (ValueError, CompressorError) as exc:
            raise CompressorError(f"{where}: {exc}") from None
    notes = getattr(compressor.config, "warnings", None)
    warnings = [f"{where}: {line}" for line in (notes(shapes) if notes is not None else [])]
    kind = compressor.group
    if kind == "linear":
        groups = linear_groups(names, model)
    else:  # "blocks": a layer's attention, then its MLP
        kinds = ("attention", "mlp") if kind == "blocks" else (kind,)
        moe = any(getattr(m, "kind", None) == "experts" for m in model.modules())
        if "attention" in kinds:
            try:
                arch = describe(model)
            except CompressorError as exc:  # e.g. DeepSeek's latent attention: no q/k/v projections
                if isinstance(exc, UnknownLayout):  # the layer's MLP is not one it knows either (fused gate_up)
                    raise CompressorError(f"{where}: {spec.method} does not know this model's layers ({exc}); "
                                          "use a per-linear method") from None
                raise CompressorError(f"{where}: this model's attention is not one {spec.method}'s smaller "
                                      f"attention computes ({exc}); compress its MLP alone (e.g. part: mlp) or "
                                      "use a per-linear method") from None
            block = model.get_submodule(arch.block_path("attention", 0) or arch.layer_prefix(0))
            reason = not_reproduced(model, block)
            if reason is not None:
                raise CompressorError(f"{where}: this model's attention has {reason}, which {spec.method}'s "
                                      "smaller attention does not compute; compress its MLP alone (e.g. part: "
                                      "mlp) or use a per-linear method")
        found = [group for k in kinds for group in (mlp_groups(names, model) if moe and k == "mlp"
                                                    else block_groups(k, names, model))]
        groups = sorted(found, key=lambda group: group.layer)  # stable: attention before MLP within a layer
    return StepPlan(index, compressor, spec.targets, spec.ignore, stream_name(recipe, index),
                    step_calibration(recipe.calibration, spec), shapes, groups, warnings=warnings)


def compile_plan(recipe: Recipe, model: nn.Module) -> Plan:
    """Every step built, validated and resolved against ``model`` (a meta-device skeleton will do)."""
    linears = decoder_linears(model)
    steps = [compile_step(recipe, index, linears, model) for index in range(len(recipe.steps))]
    for step in steps:
        if recipe.statistics == "once" and step.paired:
            raise CompressorError(f"step {step.index} ({step.method}) pairs its statistics with the original "
                                  "model (an output-matching refit): it needs statistics: per_step")
    params = parameter_count(model)  # distinct parameters: a tied embedding and head count once
    needs_roles = any(s.compressor.group != "linear" or any(r.per_head or r.statistic == "drift_cross"
                                                            for r in s.requests) for s in steps)
    return Plan(recipe, steps, params, _architecture(model, steps) if needs_roles else None)


def _architecture(model: nn.Module, steps: list[StepPlan]) -> Any:
    """The architecture's roles, for the steps that group by block or ask per-head statistics; None for a
    mixture of experts whose attention has no q/k/v roles (DeepSeek's latent attention) when only MLP groups,
    found by name (``mlp_groups``), are asked."""
    try:
        return describe(model)
    except CompressorError:
        attention = any(s.compressor.group in ("blocks", "attention") or any(r.per_head for r in s.requests)
                        for s in steps)
        if attention or not any(getattr(m, "kind", None) == "experts" for m in model.modules()):
            raise
        return None
