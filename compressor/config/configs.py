"""Config dataclasses built from plain mappings: unknown keys are errors that list the valid ones.

Every compressor's config (and the recipe itself) is a ``@dataclass`` whose fields carry
``metadata={"help": ...}``. ``build(cls, mapping, where)`` is the only way a mapping becomes a
config, so the checks (unknown keys, types) exist once.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, get_args, get_origin

from ..errors import CompressorError, quote
from . import safe_yaml


def field(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with a help text (shown by ``compressor methods``)."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def _check_type(value: Any, annotation: Any, name: str, where: str) -> Any:
    """Coerce ``value`` to ``annotation`` where that is lossless (int → float); raise on a mismatch."""
    origin = get_origin(annotation)
    if annotation is Any:
        return value
    if origin is Literal:
        allowed = get_args(annotation)
        if value not in allowed:
            raise CompressorError(f"{where}: {name} must be one of {', '.join(map(str, allowed))}; got {quote(value)}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, name, where)
            except CompressorError as exc:
                errors.append(str(exc))
        raise CompressorError(errors[0] if errors else f"{where}: bad value for {name}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise CompressorError(f"{where}: {name} must be a list; got {quote(value)}")
        (item_type, *_) = get_args(annotation) or (Any,)
        return [_check_type(v, item_type, name, where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise CompressorError(f"{where}: {name} must be a mapping; got {quote(value)}")
        return dict(value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool):
        if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
            raise CompressorError(f"{where}: {name} must be {annotation.__name__}; got {quote(value)}")
        return value
    return value


_NULL = ("null", "none", "~")
_BOOLS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def parse_text(raw: str, annotation: Any, what: str) -> Any:
    """A command-line value read by its field's declared type (``--set KEY=VALUE``), not guessed by YAML:
    ``2:4`` stays the string a ``str`` field declares (YAML reads it as the base-60 integer 124), ``1e-3`` is
    a float where one is declared, ``null`` clears an optional field. An empty value is an error."""
    text = raw.strip()
    if not text:
        raise CompressorError(f"{what}: empty value (write null to unset an optional field)")
    origin = get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [o for o in get_args(annotation) if o is not type(None)]
        if text.lower() in _NULL and len(options) < len(get_args(annotation)):
            return None
        return parse_text(text, options[0], what) if len(options) == 1 else _yaml(text, what)
    if annotation is str:
        return text
    if origin is Literal:
        allowed = get_args(annotation)
        return text if all(isinstance(a, str) for a in allowed) else _yaml(text, what)
    if annotation is bool:
        if text.lower() not in _BOOLS:
            raise CompressorError(f"{what}: expected true or false; got {quote(text)}")
        return _BOOLS[text.lower()]
    if annotation is int:
        try:
            return int(text)
        except ValueError:
            raise CompressorError(f"{what}: expected an integer; got {quote(text)}") from None
    if annotation is float:
        try:
            value = float(text)
        except ValueError:
            raise CompressorError(f"{what}: expected a number; got {quote(text)}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise CompressorError(f"{what}: expected a finite number; got {quote(text)}")
        return value
    if origin in (list, tuple):
        if text.startswith("["):
            return _yaml(text, what)
        (item,) = get_args(annotation)[:1] or (Any,)
        return [parse_text(text, item, what)]
    if dataclasses.is_dataclass(annotation):
        if text.startswith("{"):  # the whole section as a mapping
            return _yaml(text, what)
        raise CompressorError(f"{what}: this is a section, not a value; set one of its keys "
                              f"({', '.join(f.name for f in dataclasses.fields(annotation))}) as KEY.NAME=VALUE")
    return _yaml(text, what)


def _yaml(text: str, what: str) -> Any:
    return safe_yaml.load(text, f"{what}: not a valid value")


def build(cls: type, mapping: dict[str, Any] | None, where: str) -> Any:
    """``cls(**mapping)`` with unknown keys and wrong types reported as one-line errors."""
    if mapping is not None and not isinstance(mapping, dict):
        raise CompressorError(f"{where}: expected a mapping of keys to values; got {quote(mapping)}")
    mapping = dict(mapping or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        raise CompressorError(
            f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {_some(unknown)}; "
            f"valid: {', '.join(sorted(fields))}"
        )
    values = {k: _check_type(v, hints[k], k, where) for k, v in mapping.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise CompressorError(f"{where}: {exc}") from None


def _some(names: list, shown: int = 5) -> str:
    """The first few of ``names``, each quoted, and how many more (an error line stays short)."""
    more = f" and {len(names) - shown:,} more" if len(names) > shown else ""
    return ", ".join(quote(str(name), 40) for name in names[:shown]) + more


def describe(cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) for each field of a config dataclass."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        type_name = str(hints[f.name]).replace("typing.", "")
        if isinstance(hints[f.name], type):
            type_name = hints[f.name].__name__
        rows.append((f.name, type_name, default, f.metadata.get("help", "")))
    return rows


def to_dict(config: Any) -> dict[str, Any]:
    """The config with every default filled, as plain data (for compression.json)."""
    return dataclasses.asdict(config)
