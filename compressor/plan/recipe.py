"""Recipes: YAML files of calibration settings and a flat list of steps.

```yaml
calibration: {dataset: sotu, n_samples: 32, seq_len: 512, seed: 0, batch_size: 8}
propagate: compressed          # or: original (statistics from the uncompressed model)
statistics: per_step           # or: once (every step gets the statistics of the layer before any step ran)
steps:
  - method: lord
    targets: []                # name parts ("mlp.down_proj", "experts") or regexes ("re:..."); [] = every decoder linear
    ignore: []
    config: {ratio: 0.2, whiten: gram}
    calibration: {}            # optional: this step's own calibration set, e.g. {dataset: task.jsonl}
heal: {distill: true, steps: 24, lr: 3.0e-5}   # optional: `compressor heal` on the output (HealConfig)
```

``--recipe`` takes a path or the name of a recipe shipped with the package (``lord``).
Overrides are dotted paths: ``calibration.n_samples=64``, ``propagate=original``,
``steps.0.config.ratio=0.4`` or, for the step of a method, ``lord.ratio=0.4``. Their values are read by
the type the schema declares for the key (``prune.pattern=2:4`` is the string a pattern is, not YAML's
base-60 integer), an empty value is an error, and two rank rules set for one step are an error.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional

from ..config import configs, safe_yaml
from ..config.configs import field
from ..errors import CompressorError, quote
from ..methods import registry
from ..model.targets import check_patterns
from ..ranks.uniform import RULES

MIN_SEQ_LEN = 8  # tokens per calibration window: fewer leave too little context before each next token
SEED_MAX = 2**32 - 1


@dataclass
class CalibrationConfig:
    dataset: str = field("sotu", "calibration source: sotu, pydoc, wikitext2, c4, ptb, or a .txt/.jsonl file")
    n_samples: int = field(32, "number of calibration windows")
    seq_len: int = field(512, "tokens per window")
    seed: int = field(0, "seed of the window sampler")
    batch_size: int = field(8, "windows per forward pass")

    def __post_init__(self) -> None:
        for name in ("n_samples", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1")
        if self.seq_len < MIN_SEQ_LEN:
            raise ValueError(f"seq_len (--seq-len, calibration.seq_len) must be ≥ {MIN_SEQ_LEN} (shorter windows "
                             f"give next-token statistics of little meaning); got {self.seq_len}")
        if not 0 <= self.seed <= SEED_MAX:  # what torch's, numpy's and Python's generators all take
            raise ValueError(f"seed (--seed) must be between 0 and {SEED_MAX}; got {str(self.seed)[:40]}")


@dataclass
class StepSpec:
    method: str = field("", "registered compressor name")
    targets: list[str] = field([], "dot-bounded parts of module names (q_proj, mlp.down_proj, experts) or 're:' "
                               "regexes; empty = all decoder linears")
    ignore: list[str] = field([], "patterns excluded from targets (ignore always wins)")
    config: dict[str, Any] = field({}, "the compressor's config")
    calibration: dict[str, Any] = field(
        {}, "this step's own calibration set (e.g. EoRA on task text): calibration keys, unset ones from the recipe's")

    def __post_init__(self) -> None:
        check_patterns([*self.targets, *self.ignore])


@dataclass
class HealConfig:
    """A recipe's ``heal:`` section: ``compressor heal`` run on the compressed output before it is placed at
    ``--out`` (the options of the command; the window length is the compression's)."""
    distill: bool = field(False, "train toward the base model's next-token distributions (KL) instead of the "
                          "text's tokens")
    steps: Optional[int] = field(None, "optimizer steps (default: one pass over the training windows)")
    tokens: Optional[int] = field(None, "budget in training tokens instead of steps")
    lr: float = field(1e-4, "AdamW learning rate")
    n_samples: int = field(64, "training windows")
    batch_size: int = field(4, "windows per step")
    held_out: int = field(8, "held-out windows for the loss logged before and after")
    seed: int = field(0, "seed of the window order")
    dataset: Optional[str] = field(None, "calibration source or file (default: the recipe's, in windows "
                                   "compression did not use)")
    dtype: Literal["float32", "bfloat16"] = field("float32", "forward dtype (bfloat16: autocast)")
    gradient_checkpointing: bool = field(False, "recompute each decoder layer in the backward pass")

    def __post_init__(self) -> None:
        if self.steps is not None and self.tokens is not None:
            raise ValueError("heal: set steps or tokens, not both")
        for name in ("steps", "tokens", "n_samples", "batch_size", "held_out"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"heal: {name} must be ≥ 1; got {value}")
        if not self.lr > 0:
            raise ValueError(f"heal: lr must be > 0; got {self.lr}")

    def describe(self) -> str:
        """One line for the dry run and the progress: budget, batch, learning rate, loss."""
        budget = (f"{self.steps} steps" if self.steps is not None else
                  f"{self.tokens:,} tokens" if self.tokens is not None else "one pass over its windows")
        loss = "distilled from the base model" if self.distill else "next-token loss"
        return f"{budget} of {self.batch_size} windows, lr {self.lr:g}, {loss}"


@dataclass
class Recipe:
    calibration: CalibrationConfig = dataclasses.field(default_factory=CalibrationConfig,
                                                       metadata={"help": "calibration data (see CalibrationConfig)"})
    propagate: Literal["compressed", "original"] = field("compressed", "next layer sees compressed or original outputs")
    statistics: Literal["per_step", "once"] = field(
        "per_step", "per_step: each step collects on the layer as earlier steps left it; once: one pass before any step")
    moe_calibration: Literal["routed", "all"] = field(
        "routed", "mixture-of-experts statistics: routed = each expert's own routed tokens (an expert with fewer "
        "than moe_min_tokens falls back to all tokens); all = every token through every expert, for statistics only")
    moe_min_tokens: int = field(64, "routed: the fewest routed calibration tokens an expert's statistics come from")
    steps: list[StepSpec] = field([], "compression steps, applied in order to each layer")
    heal: Optional[HealConfig] = field(None, "optional: heal the compressed output (HealConfig) before it is placed")

    def __post_init__(self) -> None:
        if self.moe_min_tokens < 1:
            raise ValueError("moe_min_tokens must be ≥ 1")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if data["heal"] is None:  # a recipe without a heal section records none
            del data["heal"]
        return data


CHECKOUT_RECIPES = Path(__file__).resolve().parents[2] / "recipes"  # the data folder of a checkout


def shipped() -> dict[str, Path]:
    """Recipe name → file, for the recipes that ship inside the package (the installer maps the checkout's
    ``recipes/`` folder into it as ``compressor.recipes``; a checkout run without installing reads that
    folder itself)."""
    try:
        folder = resources.files("compressor.recipes")
    except ModuleNotFoundError:
        folder = CHECKOUT_RECIPES
    return {Path(entry.name).stem: Path(str(entry)) for entry in folder.iterdir() if entry.name.endswith(".yaml")}


def read(spec: str) -> dict[str, Any]:
    path = Path(spec).expanduser()
    if not path.is_file():
        known = shipped()
        if spec not in known:
            raise CompressorError(f"recipe not found: {quote(spec)} (shipped recipes: {', '.join(sorted(known))})")
        path = known[spec]
    data = safe_yaml.read_file(path, f"recipe {path}")
    if not isinstance(data, dict):
        raise CompressorError(f"recipe {spec}: expected a mapping at the top level")
    return data


def apply_override(data: dict[str, Any], assignment: str) -> dict[str, Any]:
    """Return a copy of ``data`` with ``a.b.c=value`` set (value read by the field's declared type)."""
    return _assign(data, assignment)[0]


def declared_type(data: dict[str, Any], parts: list[str]) -> Any:
    """The type the recipe schema declares for the value at ``parts`` (steps resolved to their method's
    config), or Any where the schema does not say (an unknown key: ``configs.build`` reports it)."""
    hints = typing.get_type_hints(Recipe)
    if parts[0] != "steps":
        kind = hints.get(parts[0], Any)
        if len(parts) == 1:
            return kind
        section = {"calibration": CalibrationConfig, "heal": HealConfig}.get(parts[0])
        return typing.get_type_hints(section).get(parts[1], Any) if section is not None else Any
    if len(parts) < 3:
        return Any
    step_hints = typing.get_type_hints(StepSpec)
    if parts[2] == "calibration" and len(parts) == 4:
        return typing.get_type_hints(CalibrationConfig).get(parts[3], Any)
    if parts[2] != "config" or len(parts) != 4:
        return step_hints.get(parts[2], Any) if len(parts) == 3 else Any
    steps = data.get("steps") or []
    index = int(parts[1]) if parts[1].isdigit() else next(
        (i for i, s in enumerate(steps) if isinstance(s, dict) and s.get("method") == parts[1]), None)
    method = steps[index].get("method") if index is not None and index < len(steps) else None
    cls = registry.COMPRESSORS.get(method) if isinstance(method, str) else None
    return typing.get_type_hints(cls.Config).get(parts[3], Any) if cls is not None else Any


def _assign(data: dict[str, Any], assignment: str) -> tuple[dict[str, Any], tuple[int, str] | None, Any]:
    """(new data, (step index, rank rule) if the assignment set one, the value)."""
    if "=" not in assignment:
        raise CompressorError(f"override {quote(assignment)}: expected KEY=VALUE")
    key, raw = assignment.split("=", 1)
    data = copy.deepcopy(data)
    parts = key.strip().split(".")
    if not all(parts):
        raise CompressorError(f"override {quote(assignment)}: empty key")
    steps = data.setdefault("steps", [])
    methods = [s.get("method") for s in steps if isinstance(s, dict)]
    if parts[0] in methods and parts[0] not in ("calibration", "propagate", "statistics", "steps", "heal"):
        parts = ["steps", parts[0], "config", *parts[1:]]
    value = configs.parse_text(raw, declared_type(data, parts), f"override {quote(assignment)}")
    node: Any = data
    step_index = None
    for position, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            index = int(part) if part.isdigit() else next((i for i, s in enumerate(node) if s.get("method") == part), None)
            if index is None or index >= len(node):
                raise CompressorError(f"override {quote(assignment)}: no step {quote(part)}")
            node, step_index = node[index], index
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            raise CompressorError(f"override {quote(assignment)}: {'.'.join(parts[:position])} is not a mapping")
    if not isinstance(node, dict):
        raise CompressorError(f"override {quote(assignment)}: cannot set {quote(parts[-1])} here: "
                              f"{'.'.join(parts[:-1])} "
                              f"is {quote(node)} in the recipe, not a mapping")
    node[parts[-1]] = value
    rule = None
    if parts[0] == "steps" and parts[-2:-1] == ["config"] and parts[-1] in RULES and value is not None:
        rule = (step_index, parts[-1])
        for other in RULES:  # one rank rule at a time: --set lord.rank=64 replaces the recipe's ratio
            if other != parts[-1]:
                node.pop(other, None)
    return data, rule, value


def apply_overrides(data: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    """``apply_override`` for each assignment in order; two different rank rules set for one step by the
    assignments are an error (as in a recipe file), not a silent "last one wins"."""
    rules: dict[int, tuple[str, str]] = {}
    for assignment in assignments:
        data, rule, _ = _assign(data, assignment)
        if rule is None:
            continue
        step, name = rule
        earlier = rules.get(step)
        if earlier is not None and earlier[0] != name:
            raise CompressorError(f"--set {earlier[1]} and --set {assignment}: set only one of "
                                  f"{', '.join(RULES)} for a step")
        rules[step] = (name, assignment)
    return data


def parse(data: dict[str, Any], where: str = "recipe") -> Recipe:
    """Validate a recipe mapping: unknown keys anywhere are errors."""
    data = dict(data)
    calibration = configs.build(CalibrationConfig, data.pop("calibration", None), f"{where}: calibration")
    raw_heal = data.pop("heal", None)
    heal = None if raw_heal is None else configs.build(HealConfig, raw_heal, f"{where}: heal")
    raw_steps = data.pop("steps", None)
    if not raw_steps or not isinstance(raw_steps, list):
        raise CompressorError(f"{where}: 'steps' must be a non-empty list")
    steps = []
    for index, raw in enumerate(raw_steps):
        if not isinstance(raw, dict):
            raise CompressorError(f"{where}: step {index} must be a mapping")
        step = configs.build(StepSpec, raw, f"{where}: step {index}")
        if not step.method:
            raise CompressorError(f"{where}: step {index} has no 'method'")
        step_calibration(calibration, step, f"{where}: step {index} calibration")  # checked now
        steps.append(step)
    recipe = configs.build(Recipe, data, where)
    recipe.calibration, recipe.steps, recipe.heal = calibration, steps, heal
    return recipe


def step_calibration(calibration: CalibrationConfig, step: StepSpec, where: str = "step calibration"
                     ) -> CalibrationConfig:
    """The calibration set a step's statistics come from: the recipe's, with the step's own keys over it."""
    if not step.calibration:
        return calibration
    return configs.build(CalibrationConfig, {**dataclasses.asdict(calibration), **step.calibration}, where)


def load(spec: str, overrides: list[str] | None = None) -> Recipe:
    data = apply_overrides(read(spec), list(overrides or []))
    return parse(data, f"recipe {spec}")
