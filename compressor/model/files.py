"""The files a model is read from, checked before use, and the one place where a library's error while
reading them becomes one line naming the file, what is wrong with it and what to do.

- ``check_model_folder``: a local model directory's weights are safetensors (pickled ``pytorch_model.bin``
  and the like are refused, never unpickled: unpickling can run code) and its ``config.json`` holds a
  layer count of at least one and dtypes that are dtypes;
- ``read_header`` / ``read_headers``: a safetensors file's header checked as the format requires (a
  header of sane size, JSON, known dtypes, shapes that match their byte ranges, ranges that tile the data
  exactly) before any tensor is read; a link to a file that is not one is named with its target;
- ``check_vocabulary``: the config's vocabulary covers the tokenizer's;
- ``reading(model, culprit, what, fix)``: a block whose library exceptions (safetensors, tokenizers, json,
  transformers' config validation, OS, memory) become ``CompressorError`` naming ``culprit``; code a model
  ships (``--trust-remote-code``) and a Hub model missing offline get lines of their own;
- ``load_tokenizer``: ``AutoTokenizer.from_pretrained`` under ``reading``, naming the tokenizer file at fault.
"""

from __future__ import annotations

import json
import math
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import CompressorError, one_line, quote

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8,
              "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
              "I64": 64, "U64": 64, "F64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
MAX_HEADER = 100_000_000  # bytes; safetensors' own limit
PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
WEIGHTS_FIX = "save the model again with save_pretrained (safetensors), or download it again"
TOKENIZER_FIX = "save the tokenizer again with save_pretrained, or copy its files from the original model"
CONFIG_FIX = "fix the field it names in config.json"


# -- pickles and config.json ---------------------------------------------------------------------------------


def convert_command(folder: Path) -> str:
    """The one-liner that re-saves a pickled checkpoint as safetensors (beside it, ``-st``)."""
    source = str(folder).rstrip("/")
    return (f"python -c \"from transformers import AutoModelForCausalLM as M; "
            f"M.from_pretrained({source!r}).save_pretrained({source + '-st'!r})\"")


def check_model_folder(folder: Path) -> None:
    """A local model directory holds safetensors weights, not pickles, and a sane ``config.json``."""
    folder = Path(folder)
    if not any(folder.glob("*.safetensors")):
        pickled = sorted({p.name for pattern in PICKLED for p in folder.glob(pattern)})
        if pickled:
            raise CompressorError(f"{folder}: its weights are pickled ({pickled[0]}), which compressor never "
                                  "loads (unpickling can run code); convert them to safetensors: "
                                  f"{convert_command(folder)}")
    check_config_file(folder / "config.json")


def check_config_file(path: Path) -> None:
    """``config.json``: JSON, a layer count of at least 1, ``dtype``/``torch_dtype`` naming a torch dtype (the
    fields transformers would turn into an AttributeError or a model without layers), also in text_config."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CompressorError(f"{path}: cannot read the config ({reason(exc)}); {CONFIG_FIX}") from None
    if not isinstance(data, dict):
        raise CompressorError(f"{path}: not a model config (a JSON object was expected); {CONFIG_FIX}")
    sections = [("", data)] + ([("text_config.", data["text_config"])]
                               if isinstance(data.get("text_config"), dict) else [])
    for prefix, section in sections:
        for key in LAYER_KEYS:
            value = section.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value < 1:
                raise CompressorError(f"{path}: {prefix}{key} is {value}, but a model has at least one decoder "
                                      f"layer; set it to the number of layers its weights hold")
        for key in ("dtype", "torch_dtype"):
            value = section.get(key)
            if isinstance(value, str) and not isinstance(getattr(torch, value, None), torch.dtype):
                raise CompressorError(f"{path}: {prefix}{key} {quote(value)} is not a dtype; set it to one "
                                      "(float32, bfloat16, float16) or remove it")


def check_vocabulary(config: Any, tokenizer: Any, where: str | Path) -> None:
    """The model's embedding covers every token of the tokenizer's vocabulary (added tokens aside); ``where``:
    the config's file (``config_file``)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    size, tokens = getattr(text, "vocab_size", None), getattr(tokenizer, "vocab_size", None)
    if isinstance(size, int) and isinstance(tokens, int) and 0 < size < tokens:
        raise CompressorError(f"{where}: vocab_size {size} is smaller than the tokenizer's "
                              f"vocabulary ({tokens} tokens), so token ids from {size} on have no embedding; use "
                              "the tokenizer that belongs to these weights, or fix vocab_size")


# -- safetensors headers -------------------------------------------------------------------------------------


def named(path: Path) -> str:
    """``path`` for an error line; a symbolic link with the file it points at."""
    path = Path(path)
    return f"{path} (a link to {os.path.realpath(path)})" if path.is_symlink() else str(path)


def _bad(path: Path, why: str) -> CompressorError:
    return CompressorError(f"{named(path)}: not a valid safetensors file ({why}); {WEIGHTS_FIX}")


def read_header(path: Path) -> dict[str, dict]:
    """A safetensors file's header, checked: name → {dtype, shape, data_offsets (from the data start), start
    (where the data starts in the file)}. Refuses (one line naming the file) what safetensors would refuse and
    more: a header larger than the file, not JSON, unknown dtypes, a byte range that does not match its shape,
    ranges that overlap, leave gaps or do not end where the file does."""
    path = Path(path)
    try:
        total = path.stat().st_size
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if total < 8 or not 2 <= size <= min(MAX_HEADER, total - 8):
                raise _bad(path, f"its header claims {size} bytes of a {total}-byte file")
            header = json.loads(handle.read(size).decode("utf-8"))
    except CompressorError:
        raise
    except (OSError, ValueError, RecursionError, MemoryError) as exc:
        raise _bad(path, f"its header is {'not JSON: ' if isinstance(exc, ValueError) else ''}"
                   f"{reason(exc)}") from None
    if not isinstance(header, dict):
        raise _bad(path, "its header is not a JSON object")
    header.pop("__metadata__", None)
    entries = {name: _entry(path, name, entry) for name, entry in header.items()}
    end = 0
    for name, entry in sorted(entries.items(), key=lambda item: tuple(item[1]["data_offsets"])):
        begin, stop = entry["data_offsets"]
        if begin != end:
            raise _bad(path, f"tensor {name[:100]} starts at byte {begin}, where {end} was expected "
                       "(overlapping or gapped data)")
        end = stop
    if end != total - 8 - size:
        raise _bad(path, f"its tensors end at byte {end} of {total - 8 - size} bytes of data (truncated or padded)")
    return {name: dict(entry, start=8 + size) for name, entry in entries.items()}


def _entry(path: Path, name: str, entry: Any) -> dict:
    """One tensor's header entry, checked: a known dtype, a shape of non-negative ints, a byte range its size."""
    if not isinstance(entry, dict):
        raise _bad(path, f"the entry of {name[:100]} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BITS:
        raise _bad(path, f"tensor {name[:100]} has dtype {quote(dtype)}, which is not one")
    if not (isinstance(shape, list) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                            for n in shape)):
        raise _bad(path, f"tensor {name[:100]} has shape {quote(shape)}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(n, int) for n in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise _bad(path, f"tensor {name[:100]} has data_offsets {quote(offsets)}")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 == 0 and offsets[1] - offsets[0] != bits // 8:
        raise _bad(path, f"tensor {name[:100]} of shape {shape} and dtype {dtype} has {offsets[1] - offsets[0]} "
                   f"bytes, not {bits // 8}")
    return entry


def indexed_files(folder: Path) -> list[str] | None:
    """The weight files ``folder``'s ``model.safetensors.index.json`` lists (None: no index, one file)."""
    index = Path(folder) / "model.safetensors.index.json"
    if not index.is_file():
        return None
    try:
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise CompressorError(f"{index}: not a safetensors index (no weight_map)") from None


def weight_files(folder: Path, every: bool = False) -> list[Path]:
    """The safetensors files of a model directory: its index's shards, else ``model.safetensors`` (with
    ``every``: every ``*.safetensors`` there)."""
    folder = Path(folder)
    names = indexed_files(folder)
    if names is None:
        return sorted(folder.glob("*.safetensors")) if every else [folder / "model.safetensors"]
    return [folder / name for name in names]


def read_headers(paths: list[Path]) -> dict[Path, dict[str, dict]]:
    """Each file's header (``read_header``), every file present: nothing read but the headers."""
    found = {}
    for path in paths:
        if not path.is_file():
            raise CompressorError(f"{named(path)}: weight file missing; {WEIGHTS_FIX}")
        found[path] = read_header(path)
    return found


# -- library errors as one line ------------------------------------------------------------------------------


def reason(exc: BaseException) -> str:
    """Why reading failed, in a few words (what an OS error names, a library's message cut to 300 characters)."""
    if isinstance(exc, FileNotFoundError):
        return f"{exc.filename or 'a file'} is missing"
    if isinstance(exc, IsADirectoryError):
        return f"{exc.filename or 'it'} is a directory"
    if isinstance(exc, NotADirectoryError):
        return f"a part of {exc.filename or 'its path'} is not a directory"
    if isinstance(exc, PermissionError):
        return f"permission denied on {exc.filename or 'it'}"
    if isinstance(exc, MemoryError):
        return "too large to read into memory"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8 text"
    text = one_line(exc)
    text = re.sub(r"^(Class )?[Vv]alidation error for (validator|field) '[^']*':\s*(\w+Error: )?", "", text)
    text = re.sub(r"^Error while deserializing header: ", "", text)
    return text if len(text) <= 300 else text[:300] + "..."


def _offline_miss(model: str, message: str) -> bool:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    return offline and "/" in model and not Path(model).exists() and ("connect" in message or "offline" in message)


def translate(exc: BaseException, model: str, culprit: str | Path, what: str, fix: str = "") -> CompressorError:
    """One line for ``exc``, raised while reading ``what`` (the config, the tokenizer, the weights) of
    ``model`` from ``culprit`` (a file or directory): which, why, what to do."""
    message = one_line(exc)
    if "trust_remote_code" in message:
        return CompressorError(f"model {model!r} ships its own code (auto_map), which runs only if you pass "
                               "--trust-remote-code; refused")
    if _offline_miss(model, message):
        from huggingface_hub import constants

        return CompressorError(f"model {model!r} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                               "HF_HUB_OFFLINE=1 forbids downloading it; download it once online, or set HF_HOME / "
                               "HF_HUB_CACHE to the cache that holds it")
    why = reason(exc)
    if isinstance(exc, FileNotFoundError) and not Path(culprit).exists():
        why = "the file is missing"
    return CompressorError(f"{named(Path(culprit))}: cannot read {what} ({why})" + (f"; {fix}" if fix else ""))


@contextmanager
def reading(model: str, culprit: str | Path, what: str, fix: str = "") -> Iterator[None]:
    """The block reads ``what`` of ``model`` from ``culprit``: any library exception in it becomes one line
    (``translate``); errors of our own pass unchanged."""
    try:
        yield
    except CompressorError:
        raise
    except Exception as exc:  # safetensors, tokenizers and transformers raise types of their own (or Exception)
        raise translate(exc, model, culprit, what, fix) from None


def config_file(source: str | Path) -> str | Path:
    """What to name for a fault of a model's config: its ``config.json`` when local, else the model."""
    path = Path(source) / "config.json"
    return path if path.is_file() else source


def _tokenizer_culprit(source: str) -> tuple[Path, str] | None:
    """(file, why) when one of a local directory's tokenizer files is itself unreadable."""
    folder = Path(source)
    if not folder.is_dir():
        return None
    if (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        try:
            Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:  # tokenizers raises plain Exception
            return folder / "tokenizer.json", reason(exc)
    for name in ("tokenizer_config.json", "special_tokens_map.json", "vocab.json"):
        try:
            if (folder / name).is_file():
                json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            return folder / name, f"not JSON: {reason(exc)}"
    return None


def load_tokenizer(source: str, model: str, trust_remote_code: bool = False, **kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained(source)``; a failure is one line naming the tokenizer file at fault
    (``tokenizer.json`` that the tokenizers library cannot read, a config that is not JSON), else the
    directory and transformers' reason."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    except CompressorError:
        raise
    except Exception as exc:
        culprit = _tokenizer_culprit(source) if "trust_remote_code" not in one_line(exc) else None
        if culprit is not None:
            raise CompressorError(f"{named(culprit[0])}: cannot read the tokenizer ({culprit[1]}); "
                                  f"{TOKENIZER_FIX}") from None
        raise translate(exc, model, source, "the tokenizer", TOKENIZER_FIX) from None
