"""The one manifest validator: ``compression.json`` read, its structure checked, its claims held to the tensors.

``read_manifest(path)`` refuses a file that is not JSON, a format newer than this package, and entries of
the wrong type (``modules`` a mapping of module name → spec with a known ``kind``, ``merged`` a boolean).
What the manifest says about the tensors (which modules are factorized, quantized or merged, and their
ranks and shapes) is checked when they are loaded: ``io.load`` builds the model the manifest describes
and ``model.weights.load_state`` refuses any tensor that is missing, extra or of another shape, with
``mismatch_hint`` naming the manifest as the likely culprit. So an edited ``"merged": true`` on a
factorized output is an error, not a model with random linears.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import CompressorError
from ..model.modules import MODULE_KINDS

FORMAT_VERSION = 1
MANIFEST = "compression.json"
_KINDS = {"dense", *MODULE_KINDS}


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of an output directory, its structure checked."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise CompressorError(f"not a compressed model directory (no {MANIFEST}): {path}")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CompressorError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise CompressorError(f"{file}: expected a JSON object at the top level")
    version = manifest.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise CompressorError(f"{file}: format_version must be an integer; got {version!r}")
    if version > FORMAT_VERSION:
        raise CompressorError(f"{path} was written by a newer format ({version}); upgrade compressor")
    validate(manifest, file)
    return manifest


def validate(manifest: dict[str, Any], file: Path) -> None:
    """Types of the entries ``load`` and ``inspect`` rely on."""
    merged = manifest.get("merged", False)
    if not isinstance(merged, bool):
        raise CompressorError(f"{file}: merged must be true or false; got {merged!r}")
    modules = manifest.get("modules", {})
    if not isinstance(modules, dict):
        raise CompressorError(f"{file}: modules must be a mapping of module name → spec")
    for name, spec in modules.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str):
            raise CompressorError(f"{file}: the entry of module {name} has no kind")
        if spec["kind"] not in _KINDS:
            raise CompressorError(f"{file}: unknown module kind {spec['kind']!r} for {name}")
    for key in ("params_before", "params_after"):
        if key in manifest and (not isinstance(manifest[key], int) or isinstance(manifest[key], bool)):
            raise CompressorError(f"{file}: {key} must be an integer; got {manifest[key]!r}")


def mismatch_hint(manifest: dict[str, Any]) -> str:
    """What the manifest claimed, for an error about the tensors not matching it."""
    kinds = sorted({spec["kind"] for spec in manifest.get("modules", {}).values()})
    return (f"; {MANIFEST} (merged: {str(manifest.get('merged', False)).lower()}, modules of kind "
            f"{', '.join(kinds) or 'none'}) does not match the weight files")
