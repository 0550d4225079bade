"""``pydoc``: Python's language-reference topics, the technical documentation CPython ships (``pydoc_data``).

A second domain far from speeches, offline on any machine with Python: the topics of
``pydoc_data.topics`` (the text ``help("if")`` shows: the reference's sections on statements, operators, data
model ...) in sorted key order; the first half of the keys calibrate, the second half is held out (about
63,000 SmolLM2 tokens on Python 3.11; the default protocol scores its first 40,960 in 512-token windows).
The text is the running interpreter's: figures on it name the Python version (``text_version``).
"""

from __future__ import annotations

import sys

from .text import joined_text_source


def _topics(held_out: bool) -> str:
    from pydoc_data.topics import topics

    keys = sorted(topics)
    half = len(keys) // 2
    return "\n\n".join(topics[key] for key in (keys[half:] if held_out else keys[:half]))


def text_version() -> str:
    """The Python version whose documentation the source reads (``3.11``)."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"


SOURCE = joined_text_source(
    "pydoc", "Python's language-reference topics (pydoc_data, shipped with CPython): first half of the topics "
             "calibrate, second half held out (offline; technical documentation)",
    train_text=lambda: _topics(False), test_text=lambda: _topics(True),
    eval_seq_len=512, eval_max_tokens=40960,
)
