"""``wikitext2``: wikitext-2-raw-v1 through ``datasets`` (train calibrates, test evaluates), GPTQ convention."""

from __future__ import annotations

from .text import hub_dataset, joined_text_source


def _split(split: str) -> str:
    return "\n\n".join(hub_dataset("wikitext2", "wikitext", "wikitext-2-raw-v1", split=split)["text"])


SOURCE = joined_text_source("wikitext2", "wikitext-2-raw-v1 (train / test), needs the Hugging Face Hub",
                            train_text=lambda: _split("train"), test_text=lambda: _split("test"))
