"""YAML as recipes and ``--set`` values are read: bounded, with no aliases and no duplicate keys.

``yaml.safe_load`` builds no objects, but it still expands aliases (a few lines of ``&a [*b, *b, ...]`` make
a structure of billions of nodes, or an error line of hundreds of megabytes) and keeps the last of two equal
keys of a mapping without a word (``ratio: 0.2`` then ``ratio: 0.9``); its composer recurses (a deep enough
nesting is a RecursionError). ``Loader`` refuses aliases, duplicate keys and nesting beyond ``MAX_DEPTH``, naming
the line; ``read_file`` refuses a file over ``MAX_BYTES`` before parsing it; every message quotes at most
``errors.QUOTE_LIMIT`` characters of a value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.error import MarkedYAMLError

from ..errors import QUOTE_LIMIT, CompressorError, quote

MAX_BYTES = 1 << 20  # a recipe is a few hundred bytes; 1 MiB leaves room for long lists of targets
MAX_DEPTH = 50  # mappings and lists inside each other (a recipe needs 4)


class Refused(MarkedYAMLError):
    """Valid YAML that a recipe may not hold (an alias, a duplicate key)."""


class Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses aliases (``*name``, and so ``<<: *name`` merges), duplicate keys, and
    nesting deeper than ``MAX_DEPTH`` (the composer recurses: a RecursionError otherwise)."""

    depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise Refused(problem=f"alias {quote('*' + event.anchor)}: aliases are not allowed (they can expand "
                          "without bound); write the value out", problem_mark=event.start_mark)
        if self.depth >= MAX_DEPTH:
            raise Refused(problem=f"nested more than {MAX_DEPTH} levels deep", problem_mark=event.start_mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    earlier = first_line.get(key)
                except TypeError:  # unhashable: the constructor says so
                    continue
                if earlier is not None:
                    raise Refused(problem=f"duplicate key {quote(key)} (also on line {earlier}); keep one",
                                  problem_mark=key_node.start_mark)
                first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def describe(exc: yaml.YAMLError) -> str:
    """One bounded line for a YAML error: ``line L, column C: problem``."""
    if isinstance(exc, MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        problem = ", ".join(str(part) for part in (exc.context, exc.problem) if part) or type(exc).__name__
        text = f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem
    else:
        text = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
    limit = 2 * QUOTE_LIMIT
    return text if len(text) <= limit else f"{text[:limit]}…"


def load(text: str, what: str) -> Any:
    """``text`` parsed by ``Loader``; a CompressorError starting with ``what`` otherwise."""
    try:
        return yaml.load(text, Loader=Loader)  # noqa: S506 (Loader is a SafeLoader)
    except Refused as exc:
        raise CompressorError(f"{what}: {describe(exc)}") from None
    except yaml.YAMLError as exc:
        raise CompressorError(f"{what}: invalid YAML ({describe(exc)})") from None


def read_file(path: Path, what: str, limit: int = MAX_BYTES) -> Any:
    """The YAML file at ``path``, refused over ``limit`` bytes (checked before reading, and while reading:
    a file may grow) or when it is not UTF-8 text."""
    try:
        size = path.stat().st_size
        if size > limit:
            raise CompressorError(f"{what}: {size:,} bytes, over the {_size(limit)} a recipe may hold")
        with open(path, "rb") as stream:
            data = stream.read(limit + 1)
    except OSError as exc:
        raise CompressorError(f"{what}: cannot read it ({exc.strerror})") from None
    if len(data) > limit:
        raise CompressorError(f"{what}: over the {_size(limit)} a recipe may hold")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise CompressorError(f"{what}: not a text file (not UTF-8)") from None
    return load(text, what)


def _size(count: int) -> str:
    return f"{count >> 20} MiB" if count >= 1 << 20 and count % (1 << 20) == 0 else f"{count:,} bytes"
