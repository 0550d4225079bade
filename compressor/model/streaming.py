"""Streaming a checkpoint: a model whose weights stay on disk until the layer walk reaches them.

``open_streamed(spec, dtype)`` builds the model from its config with every parameter on the meta device
(buffers that the config computes, such as rotary frequencies, are real) and attaches a ``LayerSource``
(``source_of(model)``): the walk asks it to ``materialize`` a module (its tensors read from the
checkpoint's safetensors files, converted to the model's dtype, checked for shape and
finiteness) before using it and to ``release`` it afterwards (its parameters back on meta). So the process
holds one decoder layer's weights at a time, plus what the walk keeps (calibration activations), whatever
the depth; the output is written as layers finish (``io.shards``).

Sources: a local directory with ``*.safetensors`` (one file or shards with an index), a Hugging Face id
(only the config, tokenizer and safetensors files are downloaded, through ``huggingface_hub``, then read
from its cache), or a ``.gguf`` file (converted once into a cached safetensors directory, then streamed).
A parameter whose name the checkpoint spells with or without the model's ``base_model_prefix`` (GPT-2's
``h.0...`` for ``transformer.h.0...``) is found either way; a tied output head reads the input embedding.
"""

from __future__ import annotations

import gc
import hashlib
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..errors import CompressorError, one_line
from ..portable.modeling_compressor import checkpoint_names
from . import experts, files, weights
from .files import SAFETENSORS_DTYPES

_SOURCES: "weakref.WeakKeyDictionary[nn.Module, LayerSource]" = weakref.WeakKeyDictionary()
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]


_TRIM = None  # glibc's malloc_trim, once looked up (False: not available)


def return_freed_memory() -> None:
    """Give freed heap memory back to the system (glibc's ``malloc_trim``; elsewhere nothing). Without it
    a layer's freed tensors stay in the process's heap, fragmented, and the resident set grows by about
    a layer per layer walked even though nothing is held."""
    global _TRIM
    gc.collect()  # tensors held only by reference cycles (a layer's hooks, visits) go now, not at some later pass
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 1 << 20


def map_large_allocations() -> bool:
    """Have glibc's malloc serve every allocation of 1 MiB or more by its own mapping (``mallopt``), which
    goes back to the system when freed. By default glibc raises that threshold, after the first such block
    is freed, up to 32 MiB, and blocks under it come from the heap, where freed ones stay resident: a streamed
    layer walk (tensors of a few MB to a few hundred, freed in turn) then held ~150 MB more at its peak at
    Llama-3.2-1B's width. Called once by a streamed run; False where there is no glibc."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def source_of(model: nn.Module) -> "LayerSource | None":
    """The streaming source attached to ``model`` (None: an ordinary model in memory)."""
    return _SOURCES.get(model)


class Checkpoint:
    """The tensors of a safetensors checkpoint directory by name, each read on request with plain file reads
    (not a memory map: mapped pages would stay in the process's resident set until the file is closed, so
    a whole checkpoint read layer by layer would end up counted in it)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        paths = files.weight_files(self.folder, every=True)
        if not paths:
            raise CompressorError(f"{self.folder}: --stream reads safetensors files, and this model directory "
                                  "has none (convert it with save_pretrained, or run without --stream)")
        self.entries: dict[str, tuple[Path, dict]] = {}  # tensor name → (file, header entry)
        for path, header in files.read_headers(paths).items():
            self.entries.update({key: (path, entry) for key, entry in header.items()})

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def read(self, name: str) -> torch.Tensor:
        path, entry = self.entries[name]
        begin, end = entry["data_offsets"]
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CompressorError(f"{path}: tensor {name} has dtype {entry['dtype']}, which --stream does not read")
        raw = torch.empty(end - begin, dtype=torch.uint8)
        with open(path, "rb") as handle:
            handle.seek(entry["start"] + begin)
            if handle.readinto(memoryview(raw.numpy())) != end - begin:
                raise CompressorError(f"{path}: tensor {name} is cut short (the file is truncated)")
        return raw.view(dtype).reshape(entry["shape"])


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built within the block get their parameters on the meta device (and no initialization);
    buffers stay where their constructor made them (rotary frequencies are computed, not stored)."""
    from transformers.initialization import no_init_weights

    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        with no_init_weights():
            yield
    finally:
        nn.Module.register_parameter = register


def _slots(module: nn.Module) -> list[tuple[str, nn.Module, str, bool]]:
    """(qualified name, owner, attribute, is parameter) for every parameter and persistent buffer."""
    slots = []
    for owner_name, owner in module.named_modules(remove_duplicate=False):
        for attr, value in owner._parameters.items():
            if value is not None:
                slots.append((f"{owner_name}.{attr}" if owner_name else attr, owner, attr, True))
        for attr, value in owner._buffers.items():
            if value is not None and attr not in owner._non_persistent_buffers_set:
                slots.append((f"{owner_name}.{attr}" if owner_name else attr, owner, attr, False))
    return slots


class LayerSource:
    """Where a streamed model's tensors come from: ``materialize`` before use, ``release`` after."""

    def __init__(self, model: nn.Module, checkpoint: Checkpoint, dtype: torch.dtype, where: str) -> None:
        self.model, self.checkpoint, self.dtype, self.where = model, checkpoint, dtype, where
        self.names = {id(module): name for name, module in model.named_modules(remove_duplicate=False)}
        self.prefix = getattr(model, "base_model_prefix", "") or ""
        # the family's renames (GPT-NeoX's head), each expert's own tensors, and what transformers would fuse
        self.renamed, self.fused = checkpoint_names(model, checkpoint.entries)
        sharing: dict[int, list[str]] = {}  # a parameter → every name it has (a tied head and embedding)
        for name, param in model.named_parameters(remove_duplicate=False):
            sharing.setdefault(id(param), []).append(name)
        self.tied = {name: names for names in sharing.values() for name in names}  # name → all its names

    def _find(self, names: list[str]) -> str | None:
        """The checkpoint's name for a tensor the model calls ``names`` (several when tied), None if absent:
        as the model spells it, with or without its ``base_model_prefix``, or as the family renames it."""
        for name in names:
            candidates = [name]
            if self.prefix and name.startswith(self.prefix + "."):
                candidates.append(name[len(self.prefix) + 1:])
            elif self.prefix:
                candidates.append(f"{self.prefix}.{name}")
            for key in candidates:
                if key in self.renamed:
                    return self.renamed[key]
                if key in self.checkpoint:
                    return key
        return None

    def _key(self, names: list[str]) -> str:
        """``_find``, or one line saying why the checkpoint does not serve the tensor."""
        key = self._find(names)
        if key is not None:
            return key
        fused = next((self.fused[n] for n in names if n in self.fused), None)
        if fused is not None:
            raise CompressorError(f"{self.where}: --stream does not read {names[0]}, which transformers assembles "
                                  f"on loading from {len(fused)} tensors of the checkpoint ({fused[0]}, ...: "
                                  "experts fused into one tensor); run without --stream")
        raise CompressorError(f"{self.where}: the checkpoint lacks tensor {names[0]}, which the model needs; it "
                              "is incomplete, or its config.json describes more than its weights hold")

    def check(self) -> None:
        """Every tensor the model needs has a checkpoint key, and the checkpoint holds no tensor the model
        lacks (``weights.check_complete``: buffers transformers ignores aside; a tied head's copy is the
        head's): names only, nothing read, so a checkpoint this reader cannot serve fails before any work."""
        used = set()
        for name, owner, attr, is_param in self._slots((self.model,)):
            names = self.tied.get(name, [name]) if is_param else [name]
            if getattr(owner, attr).device.type == "meta":  # what materialize would read
                used.add(self._key(names))
            used.update(self._find([each]) for each in names)
        unexpected = [key for key in self.checkpoint.entries if key not in used]
        weights.check_complete(self.model, self.where, [], [], unexpected)

    def _slots(self, modules: tuple[nn.Module, ...]) -> list[tuple[str, nn.Module, str, bool]]:
        """``_slots`` of several modules with model-level names (a tensor two of them share stays shared)."""
        found = []
        for module in modules:
            base = self.names[id(module)]
            found += [(f"{base}.{relative}" if base else relative, owner, attr, is_param)
                      for relative, owner, attr, is_param in _slots(module)]
        return found

    def materialize(self, *modules: nn.Module) -> None:
        """Read the modules' parameters and persistent buffers from the checkpoint (those still on meta)."""
        done: dict[int, torch.Tensor] = {}
        for name, owner, attr, is_param in self._slots(modules):
            value = getattr(owner, attr)
            if value.device.type != "meta":
                continue
            if id(value) not in done:
                key = self._key(self.tied.get(name, [name]) if is_param else [name])
                tensor = self.checkpoint.read(key)
                if tuple(tensor.shape) != tuple(value.shape):
                    weights.check_complete(self.model, self.where, [], [(key, tensor.shape, value.shape)])
                tensor = tensor.to(self.dtype) if tensor.is_floating_point() else tensor
                done[id(value)] = nn.Parameter(tensor, requires_grad=False) if is_param else tensor
            setattr(owner, attr, done[id(value)])
        if done:
            weights.check_finite(self.model, self.where)  # what is not on meta: just what was read, and buffers

    def release(self, *modules: nn.Module) -> None:
        """Put the modules' parameters and buffers back on meta (shapes and dtypes kept, memory freed)."""
        done: dict[int, torch.Tensor] = {}
        for _, owner, attr, is_param in self._slots(modules):
            value = getattr(owner, attr)
            if value.device.type == "meta":
                continue
            if id(value) not in done:
                empty = torch.empty_like(value, device="meta")
                done[id(value)] = nn.Parameter(empty, requires_grad=False) if is_param else empty
            setattr(owner, attr, done[id(value)])
        return_freed_memory()

    @contextmanager
    def held(self, modules: list[nn.Module]) -> Iterator[None]:
        """``modules`` materialized within the block, released after."""
        self.materialize(*modules)
        try:
            yield
        finally:
            self.release(*modules)


def local_folder(spec: str) -> tuple[str, Path]:
    """(source, a local safetensors directory) for MODEL: a directory as it is, a hub id downloaded (config,
    tokenizer and safetensors only) into the hub's cache, a ``.gguf`` file converted once into our cache."""
    from . import loading

    source, gguf_file = loading.resolve(spec)
    if gguf_file is not None:
        gguf = Path(source) / gguf_file
        stat = gguf.stat()
        digest = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        target = loading.cache_dir() / "models" / f"{gguf.stem}-{digest}"
        if not (target / "config.json").is_file():
            loading.convert_gguf(gguf, target)
        return str(target), target
    if Path(source).is_dir():
        return source, Path(source)
    try:
        from huggingface_hub import snapshot_download

        return source, Path(snapshot_download(source, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # offline without the files cached, unknown id, no access
        raise CompressorError(f"cannot get model {spec!r} from the Hugging Face hub: {one_line(exc)}") from None


def open_streamed(spec: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """(model with its weights left on disk, tokenizer, the local folder) for MODEL; ``source_of(model)``
    reads them layer by layer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    _, folder = local_folder(spec)
    checkpoint = Checkpoint(folder)
    map_large_allocations()
    tokenizer = files.load_tokenizer(str(folder), spec, trust_remote_code)
    with files.reading(spec, files.config_file(folder), "the config", files.CONFIG_FIX):
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        with parameters_on_meta():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()  # tying by assignment happened before the parameters moved to meta
    files.check_vocabulary(config, tokenizer, files.config_file(folder))
    model.eval()
    experts.unfuse(model)  # each expert's projections read on their own, as the checkpoint holds them
    source = LayerSource(model, checkpoint, dtype, f"model {spec}")
    source.check()
    _SOURCES[model] = source
    return model, tokenizer, folder
