"""Files a streamed run relies on after a crash (in ``.NAME.partial``: the finished layers' shards, the next
layer's hidden states, the compensation paths, the resume record): ``write`` puts each under a temporary name,
flushes it to disk and renames it, and returns the sha256 of the bytes on disk, which the resume record keeps;
``check`` compares a file with that digest again before ``--resume`` reuses it. A file changed or damaged
since it was written (edited, truncated, zeroed, another program's) is refused, never continued from."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

from ..errors import StateRefused

_CHUNK = 1 << 22


def _sha256(handle) -> str:
    digest = hashlib.sha256()
    for chunk in iter(lambda: handle.read(_CHUNK), b""):
        digest.update(chunk)
    return digest.hexdigest()


def write(path: Path, writer: Callable[[Path], object]) -> str:
    """``writer(tmp)``, then flush ``tmp`` to disk and rename it onto ``path``; the sha256 of what it holds."""
    tmp = path.with_name(path.name + ".tmp")
    writer(tmp)
    with open(tmp, "rb") as handle:
        digest = _sha256(handle)
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return digest


def digest(path: Path) -> str:
    """The sha256 of the file at ``path``."""
    with open(path, "rb") as handle:
        return _sha256(handle)


def check(path: Path, expected: str | None, remedy: str) -> None:
    """Refuse ``path`` unless it is there and its sha256 is ``expected`` (None: none was recorded)."""
    if not path.is_file():
        raise StateRefused(f"{path} is missing (it was written by the interrupted run); {remedy}")
    if expected is None:
        raise StateRefused(f"{path}: no checksum of it was recorded, so it cannot be verified; {remedy}")
    try:
        found = digest(path)
    except OSError as exc:
        raise StateRefused(f"cannot read {path}: {exc.strerror or exc}; {remedy}") from None
    if found != expected:
        raise StateRefused(f"{path} changed since the interrupted run wrote it (its sha256 differs from the "
                              f"one recorded: edited, truncated or damaged); {remedy}")
