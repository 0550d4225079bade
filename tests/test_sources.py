"""The offline text sources: ``pydoc`` (the second held-out domain) gives disjoint calibration and held-out
text, windows of the asked shape, and is found by name like the others."""

from __future__ import annotations

from pydoc_data.topics import topics

from compressor import calibration
from compressor.calibration import pydoc


def test_pydoc_halves_are_the_sorted_topics_split_once():
    keys = sorted(topics)
    train, held_out = pydoc._topics(False), pydoc._topics(True)
    assert train == "\n\n".join(topics[k] for k in keys[: len(keys) // 2])
    assert held_out.endswith(topics[keys[-1]]) and topics[keys[-1]] not in train
    assert topics[keys[0]] not in held_out
    assert len(held_out) > 200_000  # enough for the 40,960-token protocol


def test_pydoc_windows(tokenizer):
    source = calibration.get("pydoc")
    assert source.name == "pydoc" and source.eval_seq_len == 512 and source.eval_max_tokens == 40960
    windows = source.calibration(tokenizer, 4, 64, 0)
    assert windows.shape == (4, 64)
    held_out = source.evaluation(tokenizer, 64, 64 * 10)
    assert held_out.shape == (10, 64)
    assert not any(held_out[0].tolist() == w.tolist() for w in windows)
    assert pydoc.text_version().count(".") == 1
