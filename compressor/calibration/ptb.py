"""``ptb``: Penn Treebank (``ptb_text_only``) through ``datasets``; GPTQ's ``get_ptb``: train calibrates,
validation joined with "\\n\\n" evaluates."""

from __future__ import annotations

from .text import hub_dataset, joined_text_source


def _split(split: str) -> str:
    return "\n\n".join(hub_dataset("ptb", "ptb_text_only", "penn_treebank", split=split)["sentence"])


SOURCE = joined_text_source("ptb", "Penn Treebank (train / validation), needs the Hugging Face Hub",
                            train_text=lambda: _split("train"), test_text=lambda: _split("validation"))
