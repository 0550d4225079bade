"""The one explicit registry of compressors: name → class."""

from __future__ import annotations

import difflib

from ..config.configs import build
from ..contract import Compressor
from ..errors import CompressorError, quote
from . import curing, eora, fwsvd, lord, lqlora, modegpt, prune, quantize, welore

COMPRESSORS: dict[str, type[Compressor]] = {
    cls.name: cls for cls in (lord.LoRD, welore.WeLore, quantize.Quantize, eora.EoRA, prune.Prune,
                              curing.CURing, fwsvd.FWSVD, modegpt.MoDeGPT, lqlora.LQLoRA)
}


def get(name: str) -> type[Compressor]:
    if name not in COMPRESSORS:
        close = difflib.get_close_matches(name, COMPRESSORS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise CompressorError(f"unknown method {quote(name)}{hint}; valid: {', '.join(sorted(COMPRESSORS))}")
    return COMPRESSORS[name]


def create(name: str, config: dict | None, where: str = "") -> Compressor:
    cls = get(name)
    return cls(build(cls.Config, config, where or name))
