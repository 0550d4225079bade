"""The tokenizer of an output as GGUF ``tokenizer.ggml.*`` keys, the way llama.cpp's converter writes it.

Two kinds, read from the directory's ``tokenizer.json``:

- **byte-level BPE** (GPT-2, Llama 3, Qwen, SmolLM, our tests' tokenizer): ``tokenizer.ggml.model = gpt2``,
  the tokens in id order (added tokens included; padded with ``[PAD<i>]`` up to the embedding's rows),
  their types (control for special tokens, user-defined for other added ones), the merges, and
  ``tokenizer.ggml.pre``, llama.cpp's name for the pre-tokenizer's regex (``pre_tokenizer``); one it has
  no name for is written ``default`` and reported (llama.cpp then splits with its default regex).
- **BPE with byte fallback** (Llama 2, Mistral, Gemma and Phi-3 as converted by transformers):
  ``tokenizer.ggml.model = llama`` through ``gguf.LlamaHfVocab`` (scores from merge ranks).

Special token ids, ``add_bos_token`` and the chat template come from ``gguf.SpecialVocab``.

``general.name`` is written here too, because llama.cpp's tokenizer reads it: a name containing "phi3" or
"phi-3" makes llama.cpp look up Phi-3's special tokens (``PHI3_TOKENS``) and fail to load ("unordered_map::at")
when one is missing; such a name is written with that part as "phi" instead, and said.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..errors import CompressorError

# llama.cpp's pre-tokenizer names by the Split regex that precedes ByteLevel(use_regex=False)
_WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_LLAMA3 = _WORDS + r"\p{N}{1,3}" + _REST
_QWEN2 = _WORDS + r"\p{N}" + _REST
PRE_BY_REGEX = {_LLAMA3: "llama-bpe", _QWEN2: "qwen2"}
# the tokens llama.cpp's vocabulary loader looks up in any model whose general.name says Phi-3
PHI3_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")
PHI3_NAME = re.compile("phi-?3", re.IGNORECASE)


def model_name(name: str, tokens: list) -> tuple[str, str | None]:
    """(the ``general.name`` to write, a note or None): ``name`` unless llama.cpp would look up Phi-3's
    special tokens for it and ``tokens`` (str or UTF-8 bytes) lack one of them."""
    if not PHI3_NAME.search(name):
        return name, None
    texts = {t.decode("utf-8", "replace") if isinstance(t, bytes) else t for t in tokens}
    missing = [t for t in PHI3_TOKENS if t not in texts]
    if not missing:
        return name, None
    written = PHI3_NAME.sub("phi", name)
    return written, (f"general.name written as {written!r}: llama.cpp treats a name containing 'phi3' as Phi-3's "
                     f"tokenizer and cannot load one without {', '.join(missing)}")


def pre_tokenizer_name(pre: dict[str, Any] | None) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a tokenizer.json ``pre_tokenizer`` ("default" when unknown)."""
    if not pre:
        return "default"
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = steps[0].get("pattern", {})
        return PRE_BY_REGEX.get(pattern.get("Regex", ""), "default")
    return "default"


def write_tokenizer(writer: Any, folder: Path, n_vocab: int, name: str) -> list[str]:
    """Write ``folder``'s tokenizer and the model's ``name`` into ``writer`` (``n_vocab``: the embedding's rows);
    returns notes for the user (an unknown pre-tokenizer, a name changed for llama.cpp)."""
    import gguf

    file = folder / "tokenizer.json"
    if not file.is_file():
        raise CompressorError(f"GGUF export: {folder} has no tokenizer.json (the tokenizer is written into the GGUF)")
    data = json.loads(file.read_text(encoding="utf-8"))
    model = data.get("model", {})
    notes: list[str] = []
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        vocab = gguf.LlamaHfVocab(folder)
        tokens, scores, types = [], [], []
        for text, score, kind in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(kind)
        _pad(tokens, types, n_vocab, scores)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        merges = False
    elif model.get("type") == "BPE":
        tokens, types = _byte_level_tokens(data, n_vocab)
        writer.add_tokenizer_model("gpt2")
        pre = pre_tokenizer_name(data.get("pre_tokenizer"))
        if pre == "default":
            notes.append("the tokenizer's pre-tokenizer has no llama.cpp name; written as 'default' (llama.cpp "
                         "may split text differently; token ids given directly are unaffected)")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
        merges = False
    else:
        raise CompressorError(f"GGUF export: a {model.get('type')} tokenizer is not written by this exporter "
                              "(byte-level BPE and BPE with byte fallback are)")
    written, note = model_name(name, tokens)
    writer.add_name(written)
    notes += [note] if note else []
    special = gguf.SpecialVocab(folder, load_merges=merges, n_vocab=n_vocab)
    special.add_to_gguf(writer, quiet=True)
    return notes


def _byte_level_tokens(data: dict[str, Any], n_vocab: int) -> tuple[list[str], list[int]]:
    """(tokens in id order, their ``gguf.TokenType``) of a byte-level BPE tokenizer.json."""
    import gguf

    by_id: dict[int, str] = {index: text for text, index in data["model"]["vocab"].items()}
    kinds: dict[int, int] = {}
    for added in data.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        kinds[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if by_id and max(by_id) >= n_vocab:
        raise CompressorError(f"GGUF export: the tokenizer has token id {max(by_id)} but the embedding only "
                              f"{n_vocab} rows")
    tokens, types = [], []
    for index in range(n_vocab):
        if index in by_id:
            tokens.append(by_id[index])
            types.append(kinds.get(index, gguf.TokenType.NORMAL))
        else:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
    return tokens, types


def _pad(tokens: list, types: list, n_vocab: int, scores: list) -> None:
    """Pad (or refuse) a SentencePiece-style vocabulary to the embedding's ``n_vocab`` rows."""
    import gguf

    if len(tokens) > n_vocab:
        raise CompressorError(f"GGUF export: the tokenizer has {len(tokens)} tokens but the embedding only "
                              f"{n_vocab} rows")
    for index in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{index}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
