"""The compression pass: a compiled plan applied to a model, layer by layer, on the one layer walk.

First every step's model-level ``decide`` runs (on the unmodified model). Then, for each decoder layer,
the steps run in recipe order: the layer's statistics are collected for each step that requests any
(``statistics: per_step``: one forward per such step, on the layer as the earlier steps left it;
``once``: one forward per stream before any step, so every step sees the original layer's inputs), each
group of the step is compressed, and its replacements are swapped in through ``Visit.replace``. A step whose
statistics pair with the original model (``cross_gram``) is compressed in stages within the layer, each
on statistics taken after the earlier stages changed its inputs (``compress_in_stages``).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .. import timing
from ..contract import Decision, Group, LayerContext, ModelView, Outcome, Target
from ..errors import CompressorError, one_line
from ..kernels.linalg import relative_error
from ..model.experts import calibrating_all, routed_linears
from ..model.modules import shape_of, weight_of
from ..parallel import distributed, threads
from ..plan.compile import GroupSpec, Plan, StepPlan
from ..stats.accumulators import FP32_GRAM, TENSOR_STATISTICS, DistanceStats, PendingStats, for_matrix
from ..stats.hooks import Collector, Watch
from ..walk.layers import DEFAULT_STREAM, StopForward, Visit, base_stream, reference_of, run_layer, walk

Stats = dict[tuple[str, str], Any]  # (module name, "input" | "output" | "layer") → TensorStats | DistanceStats


@dataclass
class Report:
    log: list[dict[str, Any]] = field(default_factory=list)  # one entry per targeted module
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    reshaped: dict[str, nn.Module] = field(default_factory=dict)  # replacements of a new shape (for the manifest)
    moe_fallback: dict[str, int] = field(default_factory=dict)  # expert linear → routed tokens, if too few


def decide(model: nn.Module, plan: Plan, batches: dict[str, list[Tensor]], device: torch.device,
           report: Report) -> None:
    """Each step's model-level decisions, on the model before any step changed it."""
    for step in plan.steps:
        # model-level passes inside (fisher, block_influence, selection, pricing) are phases of their own
        with timing.recording(report.seconds), timing.phase("prepare"):
            view = ModelView(model, step.shapes, plan.model_params, batches.get(step.stream), device, plan.arch)
            # every rank decides from the same summed statistics; rank 0's record is the one applied everywhere
            step.apply(distributed.broadcast(step.compressor.decide(view) if step.shapes else None))


def compress_model(model: nn.Module, plan: Plan, batches: dict[str, list[Tensor]] | None, *,
                   device: torch.device, offload: torch.device | None = None,
                   on_layer: Callable[[int, int], None] | None = None, log_file=None,
                   sink: Any = None, report: Report | None = None,
                   resume: tuple[int, dict[str, list[Tensor]]] | None = None, spill=None) -> Report:
    """Compress ``model`` in place by ``plan``; ``batches``: stream name → token ids (batch, seq);
    ``sink``: where the run's output goes (``io.sink``), whose ``layer_done`` sees each finished layer;
    ``report`` and ``resume``: an interrupted run's report so far and where its walk continues (``walk``'s
    resume)."""
    report, batches = report or Report(), batches or {}
    decide(model, plan, batches, device, report)
    dtype = next(model.parameters()).dtype
    missing = [name for name in plan.walk_streams() if base_stream(name) not in batches]
    if missing:
        raise CompressorError(f"the plan's statistics need calibration data (stream {missing[0]!r}); none was given")
    streams = plan.walk_batches(batches)
    layer_done = sink.layer_done if sink is not None else None
    with timing.recording(report.seconds):  # the walk's phases: capture, forwards, accumulation, decomposition, ...
        for visit in walk(model, streams, device=device, propagate=plan.propagate, offload=offload, timed=True,
                          sink=layer_done, resume=resume, spill=spill, rules=plan.stream_rules()):
            compress_layer(visit, plan, dtype, report, log_file)
            if on_layer:
                on_layer(visit.index, visit.n_layers)
    return report


def compress_layer(visit: Visit, plan: Plan, dtype: torch.dtype, report: Report, log_file=None) -> None:
    ctx = LayerContext(visit.index, visit.n_layers, visit.device, dtype)
    originals: dict[str, Tensor] = {}  # name → weight before the first step touched it
    shared = collect_once(visit, plan, report) if plan.statistics == "once" else None
    last = max((i for i, step in enumerate(plan.steps) if step.groups_in(visit.index)), default=-1)
    for index, step in enumerate(plan.steps):
        specs = step.groups_in(visit.index)
        if not specs:
            continue
        if shared is None and step.paired:
            compress_in_stages(visit, plan, step, specs, ctx, originals, report, log_file)
            continue
        if shared is not None:  # data-free steps get them too, for the log's output error
            stats = shared.get(step.stream, {})
        else:
            stats = collect(visit, step.stream, [(step, specs)], report, plan) if step.requests else {}
        # released group by group: a step's own statistics (the shared ones at their last step), and the
        # original weights at the layer's last step
        compress_groups(visit, plan, step, specs, stats, ctx, originals, report, log_file,
                        release=shared is None or index == last, last_step=index == last)


def compress_in_stages(visit: Visit, plan: Plan, step: StepPlan, specs: list[GroupSpec], ctx: LayerContext,
                       originals: dict[str, Tensor], report: Report, log_file=None) -> None:
    """A step that pairs its statistics with the original model (an output-matching refit), stage by stage
    (``stages``: q/k/v, o, gate/up, down): each stage is compressed on statistics collected after the earlier
    stages' replacements, so it fits the inputs its compressed upstream modules now give, not those of the
    original layer. The original layer runs once (``record_paired``); each stage's forward stops where the
    stage's modules are called (partial), the first one too unless its stream goes on with the original outputs,
    and replays the outputs of the modules earlier stages replaced (``walk.replay``), as the propagation does."""
    readers = record_paired(visit, plan, step.stream, report)
    found = stages(specs, readers)
    for number, stage in enumerate(found):
        partial = number > 0 or visit.rule(step.stream) != "original"
        pending = {name for later in found[number:] for spec in later for name in spec.members.values()}
        stats = collect(visit, step.stream, [(step, stage)], report, plan, partial=partial, pending=pending)
        compress_groups(visit, plan, step, stage, stats, ctx, originals, report, log_file)


def record_paired(visit: Visit, plan: Plan, stream: str, report: Report) -> dict[str, str]:
    """The one forward of the original layer on ``stream``'s reference stream that every paired step of this
    layer on ``stream`` reads (``Visit.record_reference``): the inputs of their paired modules are kept, and the
    modules that read one tensor are found (module → the first one reading it)."""
    paired = [(s, s.groups_in(visit.index)) for s in plan.steps if s.paired and s.stream == stream]
    watched = watches(visit, [(s, specs) for s, specs in paired if specs], plan.arch)
    names = {w.name: visit.relative(w.name) for w in watched if w.where == "input"}
    kept = {w.name for w in watched if w.where == "input" and "cross_gram" in w.kinds}
    residuals = {w.residual[0] for w in watched if w.residual is not None}  # drift_cross: the streams written into
    names.update({name: visit.relative(name) for name in residuals})
    with timing.phase("statistics_forward"):
        return visit.record_reference(reference_of(stream), names, kept | residuals)


def stages(specs: list[GroupSpec], readers: dict[str, str]) -> list[list[GroupSpec]]:
    """``specs`` in order, cut where the input changes: consecutive one-linear groups that read one tensor
    (``readers``: module → the first module reading its input; q/k/v, gate/up) form a stage; any other group
    is its own."""
    found: list[list[GroupSpec]] = []
    previous = None
    for spec in specs:
        shared = readers.get(spec.module_name("linear")) if len(spec.members) == 1 else None
        if found and shared is not None and shared == previous:
            found[-1].append(spec)
        else:
            found.append([spec])
        previous = shared
    return found


def compress_groups(visit: Visit, plan: Plan, step: StepPlan, specs: list[GroupSpec], stats: Stats,
                    ctx: LayerContext, originals: dict[str, Tensor], report: Report, log_file=None,
                    release: bool = False, last_step: bool = False) -> None:
    """Compress the groups ``specs`` of one step and swap their replacements in, in order. In a run of several
    ranks each group is compressed by its owner (``distributed.owners``, by estimated cost; groups that read
    one input, whose decompositions ``ctx.per_input`` shares, have one owner), and every rank then swaps in
    every replacement (``distributed.exchange``). ``release`` (no later step of this layer reads ``stats``):
    each group's statistics and the factors memoized on them are dropped once no later group reads them, so
    a layer's peak holds one group's (at Llama-3's width, 2048² fp64 Grams and whitening factors of about
    32 MB each); ``last_step`` (the layer's last step): its members' original weights too."""
    if not distributed.world().spread:
        # a method of independent single-threaded pieces: the layer's groups decomposed at once (decompose_together)
        ready = decompose_together(visit, plan, step, specs, stats, ctx, originals) \
            if step.compressor.parallel_groups and len(specs) > 1 else None
        for position, spec in enumerate(specs):
            if ready is not None:
                group, (outcomes, elapsed) = ready[position]
                ready[position] = None
            else:
                group = build_group(visit, spec, step, stats, originals, plan.arch)
                outcomes, elapsed = decompose(step, group, ctx)
            later = tuple(other.block for other in specs[position + 1:] if other.block)
            apply(visit, step, group, outcomes, elapsed, report, log_file, later)
            del group
            if release:
                release_group(spec, specs[position + 1:], stats, ctx, originals if last_step else {})
            else:  # kept for a later step: a routed expert's sums go back to its batches until then
                unsettle_group(spec, specs[position + 1:], stats, ctx)
        return
    groups = [build_group(visit, spec, step, stats, originals, plan.arch) for spec in specs]
    cluster = clusters(groups)
    owner = distributed.owners(group_costs(groups, cluster))
    owned = {}
    for group in groups:
        if owner[cluster[group.name]] == distributed.world().rank:
            outcomes, elapsed = decompose(step, group, ctx)
            owned[group.name] = ({name: _on(o, torch.device("cpu")) for name, o in outcomes.items()}, elapsed)
    done = distributed.exchange(owned)
    for group in groups:
        outcomes, elapsed = done[group.name]
        apply(visit, step, group, {name: _on(o, visit.device) for name, o in outcomes.items()}, elapsed, report,
              log_file)


def decompose_together(visit: Visit, plan: Plan, step: StepPlan, specs: list[GroupSpec], stats: Stats,
                       ctx: LayerContext, originals: dict[str, Tensor]) -> list[tuple[Group, tuple[dict, float]]]:
    """For a method whose groups are independent pieces of single-threaded work (``Compressor.parallel_groups``):
    every group of ``specs`` built, then decomposed at once on worker threads (``threads.map_serial``, one torch
    thread each), in order: (group, (replacements, seconds)). The same replacements as one at a time; the
    decomposition phase counts the wall time of the whole."""
    groups = [build_group(visit, spec, step, stats, originals, plan.arch) for spec in specs]
    with timing.phase("decomposition"):
        return list(zip(groups, threads.map_serial(lambda group: timed_compress(step, group, ctx), groups)))


def _stats_keys(spec: GroupSpec, stats: Stats) -> list[tuple[str, str]]:
    names = [*spec.members.values(), *([spec.block] if spec.block else [])]
    return [(name, where) for name in names for where in ("input", "output") if (name, where) in stats]


def _only_read_by(spec: GroupSpec, later: list[GroupSpec], stats: Stats) -> list[Any]:
    """The statistics ``spec`` reads that none of the ``later`` groups does (q/k/v and gate/up share one input
    accumulator), each once."""
    kept = {id(stats[key]) for other in later for key in _stats_keys(other, stats)}
    return list({id(stats[key]): stats[key] for key in _stats_keys(spec, stats) if id(stats[key]) not in kept}.values())


def _forget(ctx: LayerContext, held: list[Any]) -> None:
    """Drop the factors ``ctx.per_input`` memoized on the statistics ``held``."""
    ids = {id(value) for value in held}
    for memo_key in [k for k in ctx.memo if k[2] in ids]:
        del ctx.memo[memo_key]


def release_group(spec: GroupSpec, later: list[GroupSpec], stats: Stats, ctx: LayerContext,
                  originals: dict[str, Tensor]) -> None:
    """Drop what only ``spec`` (already compressed) read: its statistics that no ``later`` group shares, the
    factors memoized on them, and the original weights of its members."""
    done = _only_read_by(spec, later, stats)
    _forget(ctx, done)
    for held in done:
        for alias in [k for k, value in stats.items() if value is held]:  # every key of a shared accumulator
            del stats[alias]
    for name in spec.members.values():
        originals.pop(name, None)


def unsettle_group(spec: GroupSpec, later: list[GroupSpec], stats: Stats, ctx: LayerContext) -> None:
    """Of the statistics only ``spec`` read in this step, a routed expert's (``PendingStats``) drop their sums
    and the factors memoized on them until a later step reads them again: a layer holds one expert's sums at
    a time, not E (f, f) Grams between the steps of a recipe whose statistics are collected once."""
    pending = [held for held in _only_read_by(spec, later, stats) if isinstance(held, PendingStats)]
    _forget(ctx, pending)
    for held in pending:
        held.unsettle()


def decompose(step: StepPlan, group: Group, ctx: LayerContext) -> tuple[dict[str, Outcome], float]:
    """The step's replacements for ``group`` and the seconds they took (counted in the decomposition phase)."""
    with timing.phase("decomposition"):
        return timed_compress(step, group, ctx)


def timed_compress(step: StepPlan, group: Group, ctx: LayerContext) -> tuple[dict[str, Outcome], float]:
    """The step's replacements for ``group`` and the seconds they took."""
    start = time.perf_counter()
    try:
        outcomes = step.compressor.compress(group, ctx)
    except torch.linalg.LinAlgError as exc:  # e.g. statistics that overflowed: name the module
        raise CompressorError(f"step {step.index} ({step.method}) failed on {group.name}: "
                              f"{one_line(exc)}") from None
    return outcomes, time.perf_counter() - start


def clusters(groups: list[Group]) -> dict[str, str]:
    """group name → the first group's name among those reading the same input statistics (q/k/v, gate/up:
    one accumulator), else its own: a grouping every rank finds alike."""
    first: dict[int, str] = {}
    out = {}
    for group in groups:
        stats = group.target.stats if group.kind == "linear" else None
        out[group.name] = group.name if stats is None else first.setdefault(id(stats), group.name)
    return out


def group_costs(groups: list[Group], cluster: dict[str, str]) -> list[tuple[str, float]]:
    """(cluster, estimated cost) for ``distributed.owners`` (``cluster``: ``clusters(groups)``): an SVD's
    m·n·min(m, n) for each member (m, n), and n³ once for each input a cluster reads (the factorization of its
    n×n Gram or Hessian: a whitening Cholesky, an eigendecomposition, GPTQ's inverse)."""
    costs, inputs = defaultdict(float), set()
    for group in groups:
        for target in group.members.values():
            rows, cols = target.weight.shape
            costs[cluster[group.name]] += float(rows) * cols * min(rows, cols)
            shared = id(target.stats) if target.stats is not None else target.name
            if shared not in inputs:
                inputs.add(shared)
                costs[cluster[group.name]] += float(cols) ** 3
    return list(costs.items())


def _on(outcome: Outcome, device: torch.device) -> Outcome:
    if outcome.module is not None:
        outcome.module = outcome.module.to(device)
    return outcome


def collect_once(visit: Visit, plan: Plan, report: Report) -> dict[str, Stats]:
    """stream → statistics of one pass over the unmodified layer for every step that requests any."""
    shared = {}
    for stream in visit.streams:
        wanted = [(s, s.groups_in(visit.index)) for s in plan.steps if s.stream == stream and s.requests]
        wanted = [(s, specs) for s, specs in wanted if specs]
        if wanted:
            shared[stream] = collect(visit, stream, wanted, report, plan)
    return shared


def watches(visit: Visit, wanted: list[tuple[StepPlan, list[GroupSpec]]], arch=None) -> list[Watch]:
    """One hook per (module, side); every input watch accumulates every input statistic asked for here
    (modules reading one input share one accumulator, whose kinds must cover all of them); a request narrowed
    to wide or not-wide matrices (``Request.matrices``) hooks only those. A ``rotated``
    watch also knows its attention block, whose position embeddings rotate the output."""
    kinds: dict[str, set[str]] = defaultdict(set)
    precisions: dict[str, set[str]] = defaultdict(set)  # where → the precisions its gram requests ask
    sides: dict[tuple[str, str], bool] = {}  # (name, where) → per head
    rope_blocks: dict[str, str] = {}  # q/k linear → its attention block
    routed = routed_linears(visit.layer, visit.prefix)  # experts' linears: no token pairing with another run
    residuals: dict[str, str] = {}  # drift_cross: a block's writer → the module reading the stream it writes into
    for step, specs in wanted:
        for request in step.requests:
            if request.statistic not in TENSOR_STATISTICS:
                continue
            for spec in specs:
                name = spec.module_name(request.role)
                if name is not None and (request.matrices == "all"
                                         or for_matrix(request.matrices, shape_of(visit.module(name)))):
                    kinds[request.where].add(request.statistic)
                    if request.statistic == "gram":
                        precisions[request.where].add(request.precision)
                    sides[(name, request.where)] = sides.get((name, request.where), False) or request.per_head
                    if request.where == "rotated":
                        rope_blocks[name] = spec.block
                    if request.statistic == "drift_cross":
                        written = residual_stream(visit, arch, name)
                        if written is not None:
                            residuals[name] = written
    for where, asked in precisions.items():
        if asked == {"float32"}:
            kinds[where].add(FP32_GRAM)
    def own(name: str, where: str) -> frozenset[str]:  # no pairing for experts; drift only for a block's writer
        unpaired = {"cross_gram", "drift_cross"} if name in routed else set()
        return frozenset(kinds[where] - unpaired - ({"drift_cross"} if name not in residuals else set()))

    return [Watch(name, visit.module(name), where, own(name, where),
                  _heads(arch, name) if per_head else None, visit.module(rope_blocks[name]) if where == "rotated" else None,
                  pending=name in routed,  # one expert's sums at a time (PendingStats)
                  residual=(residuals[name], visit.module(residuals[name])) if name in residuals and where == "input"
                  and name not in routed else None)
            for (name, where), per_head in sides.items()]


def residual_stream(visit: Visit, arch, name: str) -> str | None:
    """The module whose input is the residual stream that linear ``name`` writes into, if it is the last linear
    of its block (attention's o, the MLP's down): the norm that feeds its block (a pre-norm layer reads the
    stream where the block's output is added); None for any other linear."""
    if arch is None:
        raise CompressorError("drift_cross needs the model's architecture (its blocks and norms)")
    role = arch.role_of(name)
    if role is None or role[2] not in ("o", "down"):
        return None
    if getattr(visit.layer, "do_layer_norm_before", True) is False:  # OPT-350m: a post-norm layer
        raise CompressorError("a block-output refit needs pre-norm decoder layers (this model normalizes after "
                              "the residual add)")
    norm = arch.block(role[1]).norm
    if norm is None:
        raise CompressorError(f"a block-output refit needs the norm that feeds {name}'s block; this layer has none")
    return f"{visit.prefix}.{norm}"


def _heads(arch, name: str) -> int:
    """Heads of a linear's output: KV heads for k/v, q + k + v heads for a fused qkv, else query heads."""
    role = arch.role_of(name)
    if role and role[2] == "qkv":
        return arch.n_heads + 2 * arch.n_kv_heads
    return arch.n_kv_heads if role and role[2] in ("k", "v") else arch.n_heads


def collect(visit: Visit, stream: str, wanted: list[tuple[StepPlan, list[GroupSpec]]], report: Report,
            plan: Plan, partial: bool = False, pending: set[str] | None = None) -> Stats:
    """Run the layer once on ``stream`` with the hooks the steps' requests need; the statistics. ``partial``
    (paired steps' later stages): each forward stops once the watched modules are called (no outputs);
    ``pending`` (paired steps' stages: the modules this stage and the later ones replace): the other modules'
    outputs are kept for the next forward (``Visit.forward_paired``).
    Experts' linears see their routed tokens (``plan.moe_calibration`` routed) or every token (all); with
    routed, those that got fewer than ``plan.moe_min_tokens`` are collected again on every token
    (``experts_on_all_tokens``)."""
    collector = Collector(watches(visit, wanted, plan.arch), phase="statistics_accumulation")
    distance = [r for step, _ in wanted for r in step.requests if r.statistic == "angular_distance"]
    # the first block's call on the probe batch, for its group output error (the later blocks' are recorded
    # by the earlier groups' probes, in the layer as their replacements leave it); not with experts run on
    # every token, whose outputs are computed otherwise than in the probe's plain forward
    blocks = [spec.block for _, specs in wanted for spec in specs if spec.block][:1]
    plain = not partial and plan.moe_calibration != "all"
    probed = blocks if plain and visit.streams.get(stream) is _probe_stream(visit) else []
    all_tokens = calibrating_all(visit.layer, visit.prefix) if plan.moe_calibration == "all" else nullcontext()
    with timing.phase("statistics_forward"), all_tokens, recording_calls(visit, probed) as calls:
        if any(step.paired for step, _ in wanted):  # with the reference inputs of the same batch
            names = {w.name: visit.relative(w.name) for w in collector.watches if w.where == "input"}
            outputs = visit.forward_paired(stream, reference_of(stream), collector, names, partial and not distance,
                                           pending)
        else:
            outputs = visit.forward(stream, collector)
    visit.probe_calls.update(calls)
    stats: Stats = dict(collector.result())
    if plan.moe_calibration == "routed":
        stats.update(experts_on_all_tokens(visit, stream, collector.watches, stats, plan.moe_min_tokens, report))
    if distance:
        stats[(visit.prefix, "layer")] = layer_distance(visit, stream, outputs, distance[0].tokens)
    return stats


def experts_on_all_tokens(visit: Visit, stream: str, watched: list[Watch], stats: Stats, minimum: int,
                          report: Report) -> Stats:
    """The statistics of the experts' linears among ``watched`` whose routed tokens were fewer than ``minimum``
    (none at all, perhaps), collected again with every token of ``stream`` run through their experts, for
    statistics only; each such linear is recorded in ``report.moe_fallback`` (name → its routed tokens)."""
    routed = routed_linears(visit.layer, visit.prefix)
    starved = [w for w in watched if w.name in routed
               and ((w.name, w.where) not in stats or stats[(w.name, w.where)].n_tokens < minimum)]
    if not starved:
        return {}
    for w in starved:
        held = stats.get((w.name, w.where))
        report.moe_fallback[w.name] = held.n_tokens if held is not None else 0
    collector = Collector([replace(w, kinds=w.kinds - {"cross_gram", "drift_cross"}, residual=None) for w in starved],
                          phase="statistics_accumulation")
    with timing.phase("statistics_forward"), calibrating_all(visit.layer, visit.prefix, {w.name for w in starved}):
        visit.forward(stream, collector)  # the same outputs: routed tokens are computed as before
    return dict(collector.result())


def layer_distance(visit: Visit, stream: str, outputs: list[Tensor], tokens: str) -> DistanceStats:
    total = DistanceStats()
    for before, after in zip(visit.inputs(stream), outputs):
        total.add(before, after, tokens)
    distributed.all_reduce_stats([total])
    return total


def effective_weight(module: nn.Module) -> Tensor:
    if hasattr(module, "dense_weight"):
        return module.dense_weight().detach()
    return weight_of(module).detach()


def build_group(visit: Visit, spec: GroupSpec, step: StepPlan, stats: Stats, originals: dict[str, Tensor],
                arch=None) -> Group:
    members, decision = {}, step.decision or Decision()
    for role, name in spec.members.items():
        module = visit.module(name)
        originals.setdefault(name, effective_weight(module).to(visit.device))  # as held: no fp32 copy per layer
        weight = effective_weight(module).to(device=visit.device, dtype=torch.float32)
        members[role] = Target(name, module, weight, originals[name],
                               None if module.bias is None else module.bias.detach(), stats.get((name, "input")),
                               getattr(module, "dense_class", type(module).__name__), stats.get((name, "output")),
                               decision)
    answered = {}
    for request in step.requests:
        name = visit.prefix if request.where == "layer" else spec.module_name(request.role)
        if (name, request.where) in stats:
            answered[request] = stats[(name, request.where)]
    block = visit.module(spec.block) if spec.block else None
    return Group(spec.kind, spec.name, members, block, answered, arch, decision)


def apply(visit: Visit, step: StepPlan, group: Group, outcomes: dict[str, Outcome], elapsed: float,
          report: Report, log_file=None, later_blocks: tuple[str, ...] = ()) -> None:
    """Log every member, then swap the replacements in (members first, then a block's own replacement).
    A block replacement is logged through its members when they have replacements too (the block holds
    them: MoDeGPT's shrunk attention), else as an entry of its own. ``later_blocks``: the blocks of the step's
    later groups in this layer, whose probe calls a shape-changing group's error probe records on its way."""
    members = [t.name for t in group.members.values()]
    through_members = any(outcomes.get(name, Outcome(None)).module is not None for name in members)
    names = members + ([] if through_members else [n for n in outcomes if n not in members])
    changes_shape = any(_changes_shape(visit, name, o) for name, o in outcomes.items())
    group_error = _group_output_error(visit, group, outcomes, later_blocks) if changes_shape else None
    for name in names:
        outcome = outcomes.get(name, Outcome(None, note="skipped"))
        target = next((t for t in group.members.values() if t.name == name), None)
        entry = log_entry(step, name, target, outcome, elapsed / len(names), group_error)
        if name in report.moe_fallback:  # an expert with too few routed tokens: calibrated on all of them
            entry["moe_calibration"] = f"all tokens ({report.moe_fallback[name]} routed)"
        report.log.append(entry)
        if log_file is not None:
            log_file.write(json.dumps(entry) + "\n")
            log_file.flush()
        if outcome.module is not None and not changes_shape:
            visit.replace(name, outcome.module)
    if changes_shape:
        report.reshaped.update({name: o.module for name, o in outcomes.items() if o.module is not None})


def _changes_shape(visit: Visit, name: str, outcome: Outcome) -> bool:
    if outcome.module is None:
        return False
    try:
        return tuple(shape_of(outcome.module)) != tuple(shape_of(visit.module(name)))
    except AttributeError:  # a block: no (out, in) of its own
        return True


def _group_output_error(visit: Visit, group: Group, outcomes: dict[str, Outcome],
                        later_blocks: tuple[str, ...] = ()) -> float | None:
    """Swap a shape-changing group's replacements in; the relative error of the group's output (the block's,
    or the layer's where the block is no module) on the first calibration batch, None without data. The
    group's call before the swap is the one recorded by the layer's statistics forward or by the previous
    group's probe (``Visit.probe_calls``), else the layer is run that far; after the swap the layer runs on
    the batch as far as the group, or as far as the last of ``later_blocks`` (recording their calls for
    their own probes: each later group's inputs as the earlier groups' replacements give them)."""
    name = group.name if group.block is not None else visit.prefix
    before = visit.probe_calls.get(name) or probe_calls(visit, [name]).get(name)
    for key, outcome in outcomes.items():
        if outcome.module is not None:
            visit.replace(key, outcome.module)
    if before is None:
        return None
    if later_blocks and name != visit.prefix:
        visit.probe_calls.update(probe_calls(visit, [name, *later_blocks]))
        new = visit.probe_calls.pop(name)[2]
    else:
        new = _first(visit.module(name)(*before[0], **before[1]))
    return relative_error(before[2].float(), new.float())


def _probe_stream(visit: Visit):
    """The stream whose first batch the group output errors are measured on (None without data)."""
    return visit.streams.get(DEFAULT_STREAM) or next(iter(visit.streams.values()), None)


def probe_calls(visit: Visit, names: list[str]) -> dict[str, tuple[tuple, dict[str, Any], Any]]:
    """Run the layer as it now is on the probe batch until every module of ``names`` (qualified; the layer's
    own name: the whole layer) has run; each one's (args, kwargs, first output). {} without data."""
    stream = _probe_stream(visit)
    if stream is None:
        return {}
    with recording_calls(visit, names, stop=True) as calls:
        try:
            run_layer(visit.layer, stream.inputs[:1], visit.device, visit.offload)
        except StopForward:
            pass
    return calls


@contextmanager
def recording_calls(visit: Visit, names: list[str], stop: bool = False):
    """Within the block, the first call of each module of ``names`` in ``visit.layer`` is recorded (name →
    (args, kwargs, first output)); ``stop``: the forward raises ``StopForward`` once all of them have run."""
    calls: dict[str, tuple[tuple, dict[str, Any], Any]] = {}

    def hook(name: str):
        def capture(module, args, kwargs, out):
            if name not in calls:
                calls[name] = (args, kwargs, _first(out))
            if stop and len(calls) == len(set(names)):
                raise StopForward
        return capture

    handles = [visit.module(name).register_forward_hook(hook(name), with_kwargs=True) for name in dict.fromkeys(names)]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _params(module: nn.Module) -> int:
    """Parameters of a module: its own count where it has one (a low-rank module's integer factors count)."""
    if hasattr(module, "num_parameters"):
        return module.num_parameters()
    return sum(p.numel() for p in module.parameters())


def _bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (packed integers included)."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def log_entry(step: StepPlan, name: str, target: Target | None, outcome: Outcome, seconds: float,
              group_error: float | None = None) -> dict[str, Any]:
    shape = list(target.weight.shape) if target is not None else None
    entry: dict[str, Any] = {"name": name, "step": step.index, "method": step.method, "shape": shape,
                             "params_before": _params(target.module) if target is not None else None,
                             "bytes_before": _bytes(target.module) if target is not None else None}
    if outcome.module is None:
        entry.update(kind="dense", params_after=entry["params_before"], rank=None, note=outcome.note or "kept dense")
    else:
        entry.update(kind=getattr(outcome.module, "kind", type(outcome.module).__name__), rank=outcome.rank,
                     params_after=_params(outcome.module), bytes_after=_bytes(outcome.module))
        if getattr(outcome.module, "factor_bits", 16) < 16:  # low-rank factors stored as integers
            entry["factor_bits"] = outcome.module.factor_bits
        entry.update(_errors(target, outcome.module) if group_error is None and target is not None
                     else {"rel_error": None, "rel_group_output_error": group_error})
        if outcome.note:
            entry["note"] = outcome.note
    entry.update(outcome.extra)
    entry["seconds"] = round(seconds, 4)
    return entry


def _errors(target: Target, module: nn.Module) -> dict[str, float | None]:
    approx = effective_weight(module)  # as stored; relative_error works in fp64 row chunks
    if tuple(approx.shape) != tuple(target.original.shape):
        return {"rel_error": None, "rel_output_error": None}
    gram = target.stats.gram if target.stats is not None else None
    return {"rel_error": relative_error(target.original, approx),
            "rel_output_error": None if gram is None else relative_error(target.original, approx,
                                                                         gram.to(approx.device))}
