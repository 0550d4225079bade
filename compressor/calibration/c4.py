"""``c4``: allenai/c4 ``en`` through ``datasets``, GPTQ's ``get_c4`` convention.

Calibration: documents of the first train shard drawn at random until one has more than
``seq_len`` tokens, then a random window of it. Evaluation: the same from the first validation
shard, 256 windows, seed 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .text import Source, hub_dataset, tokenize

_FILES = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}


def _documents(split: str) -> list[str]:
    return hub_dataset("c4", "allenai/c4", data_files={split: _FILES[split]}, split=split)["text"]


def _windows(split: str, tokenizer, n_samples: int, seq_len: int, seed: int) -> Tensor:
    docs = _documents(split)
    generator = torch.Generator().manual_seed(seed)
    windows = []
    while len(windows) < n_samples:
        ids = tokenize(tokenizer, docs[int(torch.randint(len(docs), (1,), generator=generator))])
        if ids.numel() > seq_len:
            start = int(torch.randint(ids.numel() - seq_len, (1,), generator=generator))
            windows.append(ids[start: start + seq_len])
    return torch.stack(windows)


SOURCE = Source(
    "c4", "allenai/c4 en (first train / validation shard), needs the Hugging Face Hub",
    calibration=lambda tok, n, seq_len, seed: _windows("train", tok, n, seq_len, seed),
    evaluation=lambda tok, seq_len, max_tokens: _windows("validation", tok, (max_tokens or 256 * seq_len) // seq_len,
                                                         seq_len, 0),
)
