"""Empirical Fisher information of the targeted weights: a whole-model gradient pass, cached on disk.

For each calibration window ``d`` (one window per backward: the per-example Fisher, LQ-LoRA's
convention; a batch of several windows would square the *mean* gradient and underestimate it,
docs/methods.md#the-fisher-pass)::

    L(d)  = mean next-token cross-entropy of the window (seq_len − 1 shifted targets)
    F_ij  = Σ_d (∂L(d)/∂W_ij)²          # (out, in) per targeted weight, summed (not averaged) over windows

Memory (the pass must fit next to the model, well under twice its size):
- only the targeted weights require gradients; everything else is frozen, the (tied) embedding and
  head included, so no gradient is ever computed for them;
- each weight's gradient is squared into its fp32 accumulator by a post-accumulate-grad hook and freed
  at once, so at most one weight gradient exists at any time (the accumulators, ≈ the size of the
  targeted weights, are the pass's one large allocation);
- ``checkpointing`` recomputes each decoder layer's activations in the backward pass (non-reentrant
  ``torch.utils.checkpoint`` around every layer), so only the layer inputs stay alive between the
  forward and the backward. The model stays in eval mode (no dropout), so the recomputation is exact;
- the head and the loss run on 64 tokens at a time (recomputed in the backward), so the (seq, vocab)
  logits never exist at once (they would be 100 MB per copy on SmolLM2's 49k vocabulary); this path is
  used only where ``head(base_model(ids))`` reproduces the model's logits (checked on a short prefix);
- on glibc, allocations ≥ 1 MiB are served by mmap during the pass (``bounded_heap``) so freed
  activations leave the process instead of staying in a fragmented heap.
Measured on SmolLM2-135M (fp32 model 513 MiB, 32 × 512 tokens): the pass adds ≈ 405 MiB of fp32
accumulators and ≈ 100 MiB of working set (see results/bench-fwsvd.json).

Cache: ``models.cache_dir()/"fisher"/<fingerprint>.safetensors``. The pipeline gives ``decide`` the
model and the token ids, not the model spec or the recipe, so the fingerprint is derived from them:
the architecture, every parameter's name, shape, dtype and a strided sample of its values (a cheap
identity of the weights), the token ids themselves (they determine dataset, n_samples, seq_len, seed
and tokenizer at once; batching does not matter for a per-example Fisher), the targeted names, the
loss convention (labels, draws, seed, statistic: absent from the key at their defaults, so the data-label
Fisher keeps its key) and the reduction. Any method that needs Fisher (FWSVD, LQ-LoRA) calls ``fisher_for``.

``labels: model`` takes the targets from the model's own predictive distribution instead of the text: at
every position a token is drawn from the model's softmax (``draws`` independent draws per window, each its
own backward, averaged; a generator seeded by ``seed`` and the window's tokens, so the pass is reproducible
and independent of the batching or of the rank that takes the window). That is the true Fisher (the KL's
curvature, IO-SVD's output side) where the default is the empirical one. Its expectation is exact per window:
the draws at different positions are independent and each score has mean zero, so the cross terms vanish::

    E[F_ij(d)] = 1/T² Σ_t Σ_y p_t(y) (∂ℓ_t(y)/∂W_ij)²        ℓ_t(y) = −log p_t(y), T = seq_len − 1

``statistic: gradient`` sums the gradients themselves, Σ_d ∂L(d)/∂W (signed; the first-order term of a
change of W, LoRD's ``rank_rule: taylor``), on the data's labels, full (out, in) only.

``reduce: in | out`` accumulates only the Fisher summed over the other axis (FWSVD's per-column or
per-row importance): vectors instead of the 0.8×-the-model fp32 accumulators. A cached full Fisher
also serves a reduced request; a reduced one serves only itself. What is read back is checked
(``check_cached``: every target present, in its expected shape, finite and ≥ 0); a file that fails is a
miss, recomputed and rewritten, and ``info["rejected"]`` says why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import platform
import tempfile
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .. import timing
from ..errors import CompressorError
from ..model import loading as models
from ..model import targets as arch
from ..model.modes import calibration_mode
from ..model.modules import Conv1D, shape_of
from ..parallel import distributed

FORMAT = "fisher-v1: sum over windows of squared grads of the mean next-token CE, batch 1, fp32"
CacheMode = Literal["use", "refresh", "off"]
Reduce = Literal["in", "out", None]
Labels = Literal["data", "model"]
Statistic = Literal["fisher", "gradient"]
Sampler = Callable[[Tensor], Tensor]  # logits (t, vocab) → target token ids (t,)
_SAMPLE = 4096  # values per parameter that enter the model fingerprint
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
LOSS_CHUNK = 64  # tokens whose logits exist at once (64 × 49,152 vocab × 4 B = 12.6 MB on SmolLM2)


@dataclass(frozen=True)
class Pass:
    """What the pass accumulates: the statistic, and for the Fisher whose labels (the text's or drawn from the
    model, ``draws`` per window, seeded)."""

    labels: Labels = "data"
    draws: int = 1
    seed: int = 0
    statistic: Statistic = "fisher"

    def __post_init__(self) -> None:
        if self.labels not in ("data", "model") or self.statistic not in ("fisher", "gradient"):
            raise CompressorError(f"unknown Fisher pass {self}")
        if self.draws < 1 or (self.draws > 1 and self.labels == "data"):
            raise CompressorError("draws ≥ 1, and more than one only with labels: model")
        if self.statistic == "gradient" and self.labels != "data":
            raise CompressorError("the gradient pass takes the data's labels (under the model's own its mean is 0)")

    def header(self) -> dict:
        """The fingerprint's fields: only those that differ from the data-label Fisher's."""
        return {k: v for k, v in vars(self).items() if v != getattr(DATA, k)}

    def sampler(self, ids: Tensor, device: torch.device) -> Sampler | None:
        """Labels drawn from the model's softmax, a generator seeded by ``seed`` and the window ``ids``; None
        for the data's labels."""
        if self.labels == "data":
            return None
        generator = torch.Generator(device=device)
        generator.manual_seed(self.seed * 1_000_003 + zlib.crc32(ids.to("cpu", torch.int64).numpy().tobytes()))

        def draw(logits: Tensor) -> Tensor:  # (t, vocab) → (t,)
            probs = torch.softmax(logits.detach().float(), dim=-1)
            return torch.multinomial(probs, 1, generator=generator)[:, 0]

        return draw


DATA = Pass()


def samples(batches: list[Tensor]) -> list[Tensor]:
    """The calibration windows one by one: (batch, seq_len) tensors → [(1, seq_len), ...]."""
    return [row for ids in batches for row in ids.split(1)]


def next_token_loss(model: nn.Module, ids: Tensor, labels: Sampler | None = None) -> Tensor:
    """Mean cross-entropy of the shifted next-token targets of ``ids`` (1, seq_len), in fp32; ``labels``: the
    targets drawn from the logits instead (the model's own predictions)."""
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1]  # (seq − 1, vocab)
    return nn.functional.cross_entropy(logits.float(), ids[0, 1:] if labels is None else labels(logits))


def _chunk_nll(head: nn.Module, hidden: Tensor, targets: Tensor) -> Tensor:
    return nn.functional.cross_entropy(head(hidden).float(), targets, reduction="sum")


def chunked_next_token_loss(body: nn.Module, head: nn.Module, ids: Tensor, chunk: int = LOSS_CHUNK,
                            labels: Sampler | None = None) -> Tensor:
    """``next_token_loss`` without the (seq, vocab) logits: the head and the loss run on ``chunk`` tokens
    at a time and are recomputed in the backward pass, so one chunk's logits exist at any time. Drawn
    ``labels`` are drawn once per chunk outside the recomputed part (one more head product, no gradient)."""
    hidden = body(input_ids=ids, use_cache=False).last_hidden_state[0, :-1]  # (seq − 1, hidden)
    targets = ids[0, 1:]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk):
        part = slice(start, start + chunk)
        if labels is None:
            wanted = targets[part]
        else:
            with torch.no_grad():
                wanted = labels(head(hidden[part]))
        total = total + checkpoint(_chunk_nll, head, hidden[part], wanted, use_reentrant=False)
    return total / targets.numel()


def loss_function(model: nn.Module, probe: Tensor) -> Callable[[Tensor], Tensor]:
    """The chunked loss when the model's logits are exactly ``head(base_model(ids))`` (checked on a
    16-token prefix of ``probe``: no logit soft-capping or scaling in between), else the plain one."""
    head, body = model.get_output_embeddings(), getattr(model, "base_model", None)
    if head is None or body is None or body is model:
        return functools.partial(next_token_loss, model)
    prefix = probe[:, :16]
    with torch.no_grad():
        try:
            plain = model(input_ids=prefix, use_cache=False).logits[0].float()
            split = head(body(input_ids=prefix, use_cache=False).last_hidden_state[0]).float()
        except (TypeError, AttributeError, ValueError):
            return functools.partial(next_token_loss, model)
    if plain.shape != split.shape or not torch.allclose(plain, split, rtol=1e-4, atol=1e-4):
        return functools.partial(next_token_loss, model)
    return functools.partial(chunked_next_token_loss, body, head)


def window_loss(loss_of: Callable[..., Tensor], ids: Tensor, labels: Sampler | None) -> Tensor:
    """``loss_of(ids)`` on the data's labels, ``loss_of(ids, labels=…)`` on drawn ones."""
    return loss_of(ids) if labels is None else loss_of(ids, labels=labels)


def _target_weights(model: nn.Module, names: list[str]) -> dict[str, nn.Parameter]:
    """name → the dense weight parameter of each targeted linear (its own layout: Conv1D is (in, out))."""
    found = {}
    for name in names:
        module = model.get_submodule(name)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter):
            raise CompressorError(f"Fisher needs a dense weight; {name} is a {type(module).__name__}")
        found[name] = weight
    return found


@contextmanager
def _gradient_setup(model: nn.Module, weights: dict[str, nn.Parameter],
                    checkpointing: bool) -> Iterator[None]:
    """Freeze all but ``weights``, eval mode, grads on, optional per-layer checkpointing; undone on exit."""
    flags = {id(p): (p, p.requires_grad) for p in model.parameters()}
    layers = arch.decoder_layers(model)[1] if checkpointing else []
    for p, _ in flags.values():
        p.requires_grad_(False)
    for p in weights.values():
        p.requires_grad_(True)
    for layer in layers:  # an instance attribute shadows the class's forward; removed on exit
        layer.forward = functools.partial(checkpoint, type(layer).forward.__get__(layer), use_reentrant=False)
    try:
        with calibration_mode(model, gradients=True):
            yield
    finally:
        for layer in layers:
            del layer.forward
        for p, flag in flags.values():
            p.requires_grad_(flag)
            p.grad = None


@contextmanager
def bounded_heap(threshold: int = 1 << 20) -> Iterator[None]:
    """glibc only: trim the free heap, then serve allocations ≥ ``threshold`` by mmap for the duration, so
    the activations freed after each layer go back to the OS at once instead of staying in a fragmented
    heap (≈ 300 MB of extra RSS on SmolLM2-135M otherwise). On exit the threshold is set to glibc's
    dynamic maximum (32 MiB, where its adaptive threshold ends up after large frees) and the heap trimmed."""
    libc = None
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        try:
            libc = ctypes.CDLL(None)
            libc.malloc_trim(0)  # what earlier phases freed (tokenization, loading) leaves the process first
            libc.mallopt(_M_MMAP_THRESHOLD, threshold)
        except (OSError, AttributeError):
            libc = None
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
            libc.malloc_trim(0)


def _summed_dim(module: nn.Module, reduce: Reduce) -> int | None:
    """The dimension of the module's weight *parameter* that ``reduce`` sums over (None: keep all).
    ``in`` keeps the input axis (sums over outputs), ``out`` keeps the output axis; Conv1D is (in, out)."""
    if reduce is None:
        return None
    out_dim = 1 if isinstance(module, Conv1D) else 0
    return out_dim if reduce == "in" else 1 - out_dim


def reduce_fisher(fisher: Tensor, reduce: Reduce) -> Tensor:
    """A full Fisher (out, in) summed over the other axis: (in,) for ``in``, (out,) for ``out``; fp32."""
    if reduce is None:
        return fisher
    return fisher.double().sum(0 if reduce == "in" else 1).float()


def collect_fisher(model: nn.Module, batches: list[Tensor], target_names: list[str],
                   device: torch.device | str = "cpu", checkpointing: bool = False,
                   on_sample: Callable[[int, int], None] | None = None,
                   reduce: Reduce = None, kind: Pass = DATA) -> dict[str, Tensor]:
    """name → Σ over windows of (∂L/∂W)², (out, in) fp32 on CPU, for every name in ``target_names``.

    ``batches`` are token ids, a list of (batch, seq_len) tensors; each window gets its own backward.
    The whole model runs on ``device`` for the pass and goes back where it was afterwards.
    ``reduce``: ``in`` / ``out`` accumulate only the Fisher summed over the other axis, (in,) / (out,)
    (what FWSVD uses; each window's grad² is summed before it is added, so the accumulators are vectors).
    ``kind``: the labels (drawn ones: each window's ``draws`` backward passes averaged) or the plain gradient sum.
    """
    windows = samples(batches)
    if kind.statistic == "gradient" and reduce is not None:
        raise CompressorError("the gradient pass keeps the whole (out, in) gradient: no reduce")
    if not windows:
        raise CompressorError("the Fisher pass needs calibration data")
    if windows[0].shape[1] < 2:
        raise CompressorError("the Fisher pass needs windows of at least 2 tokens (next-token loss)")
    device = torch.device(device)
    home = next(model.parameters()).device
    weights = _target_weights(model, target_names)
    if home != device:
        model.to(device)
    # accumulators on the compute device: the parameter's own layout, or its sum over one dimension
    dims = {name: _summed_dim(model.get_submodule(name), reduce) for name in weights}
    fisher = {name: torch.zeros(p.shape if dims[name] is None else p.shape[1 - dims[name]],
                                dtype=torch.float32, device=device) for name, p in weights.items()}

    def accumulate(name: str):
        dim = dims[name]
        weight = 1.0 / kind.draws  # each window's draws are averaged

        def hook(param: nn.Parameter) -> None:
            grad = param.grad.float()  # a no-op for fp32; bf16/fp16 gradients are squared in fp32
            if kind.statistic == "gradient":
                fisher[name].add_(grad)
            elif kind.draws > 1:
                fisher[name].add_(grad.square() if dim is None else grad.square().sum(dim), alpha=weight)
            elif dim is None:
                fisher[name].addcmul_(grad, grad)
            else:
                fisher[name].add_(grad.square().sum(dim))
            param.grad = None  # at most one weight gradient alive at any time

        return hook

    handles = []
    try:
        with bounded_heap(), _gradient_setup(model, weights, checkpointing):
            loss_of = loss_function(model, windows[0].to(device))
            for name, p in weights.items():
                handles.append(p.register_post_accumulate_grad_hook(accumulate(name)))
            for index, ids in enumerate(windows):
                labels = kind.sampler(ids, device)
                for _ in range(kind.draws):
                    loss = window_loss(loss_of, ids.to(device), labels)
                    if not torch.isfinite(loss):
                        raise CompressorError(f"the Fisher pass got a non-finite loss on window {index}")
                    loss.backward()
                    del loss
                if on_sample:
                    on_sample(index + 1, len(windows))
    finally:
        for handle in handles:
            handle.remove()
        if home != device:
            model.to(home)
    out = {}
    for name in list(fisher):
        value = fisher.pop(name).cpu()  # free each device buffer as we go
        if not bool(torch.isfinite(value).all()):
            raise CompressorError(f"the Fisher of {name} is not finite (gradients overflowed; try float32)")
        conv1d = isinstance(model.get_submodule(name), Conv1D)
        out[name] = value.T.contiguous() if conv1d and value.dim() == 2 else value  # (out, in), (in,), (out,)
    return out


def _tensor_digest(tensor: Tensor) -> bytes:
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // _SAMPLE)
    sample = flat[::step][:_SAMPLE].to("cpu", torch.float64).contiguous()
    return sample.numpy().tobytes()


def fingerprint(model: nn.Module, batches: list[Tensor], target_names: list[str],
                reduce: Reduce = None, kind: Pass = DATA) -> str:
    """A hex key for (model weights, calibration token ids, targets, loss convention, reduction)."""
    digest = hashlib.sha256()
    header = {"format": FORMAT, "class": type(model).__name__, "targets": sorted(target_names), **kind.header()}
    if reduce is not None:
        header["reduce"] = reduce
    digest.update(json.dumps(header).encode())
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        digest.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        digest.update(_tensor_digest(p))
    for ids in samples(batches):
        digest.update(ids.to("cpu", torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def cache_path(key: str) -> Path:
    return models.cache_dir() / "fisher" / f"{key}.safetensors"


def expected_shape(model: nn.Module, name: str, reduce: Reduce) -> tuple[int, ...]:
    """The shape a stored Fisher of target ``name`` must have: (out, in), or (in,) / (out,) when reduced."""
    out_features, in_features = shape_of(model.get_submodule(name))
    if reduce is None:
        return (out_features, in_features)
    return (in_features,) if reduce == "in" else (out_features,)


def check_cached(fisher: dict[str, Tensor], shapes: dict[str, tuple[int, ...]], signed: bool = False) -> str | None:
    """Why what was read back from the cache cannot be used (None: it can): a Fisher is a sum of squares,
    so every value is finite and ≥ 0 (a ``signed`` gradient sum: finite), and each target's tensor has its
    expected shape."""
    for name, shape in shapes.items():
        value = fisher.get(name)
        if value is None:
            return f"no tensor for {name}"
        if tuple(value.shape) != tuple(shape):
            return f"{name} has shape {list(value.shape)}, expected {list(shape)}"
        if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
            return f"{name} holds non-finite values"
        if not signed and bool((value < 0).any()):
            return f"{name} holds negative values (a Fisher is a sum of squares)"
    return None


def load_cached(key: str, shapes: dict[str, tuple[int, ...]],
                signed: bool = False) -> tuple[dict[str, Tensor] | None, str | None]:
    """(the cached Fisher for ``key``, None) if present and valid, else (None, why not: absent, unreadable,
    or failing ``check_cached``)."""
    from safetensors.torch import load_file

    path = cache_path(key)
    if not path.is_file():
        return None, "absent"
    try:
        fisher = load_file(str(path))
    except Exception:  # a truncated or foreign file is a miss, not an error
        return None, "unreadable"
    problem = check_cached(fisher, shapes, signed)
    if problem is not None:
        return None, problem
    return {name: fisher[name] for name in shapes}, None


def save_cached(key: str, fisher: dict[str, Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write the Fisher atomically (temporary file + rename) so a reader never sees half a file."""
    from safetensors.torch import save_file

    path = cache_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in fisher.items()}, tmp,
                  metadata={"format": FORMAT, **(metadata or {})})
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@timing.timed("fisher")
def fisher_for(model: nn.Module, batches: list[Tensor] | None, target_names: list[str],
               device: torch.device | str = "cpu", checkpointing: bool = False,
               cache: CacheMode = "use",
               reduce: Reduce = None, kind: Pass = DATA) -> tuple[dict[str, Tensor], dict[str, object]]:
    """(name → Fisher fp32, info): from the cache if present (``cache: use``), else computed.
    ``kind``: the labels of the Fisher, or the gradient sum instead (``Pass``); part of the key.

    The Fisher is (out, in), or summed over one axis with ``reduce`` (see ``collect_fisher``); a full
    Fisher in the cache also serves a reduced request. ``cache``: ``use`` reads and writes the cache,
    ``refresh`` recomputes and overwrites, ``off`` neither. ``info``: key, hit, seconds, windows, path.
    In a run of several ranks (``distributed``) ``batches`` are this rank's share: the key covers every
    rank's windows, rank 0 alone reads and writes the cache (a hit is sent to the others), and a computed
    Fisher is each rank's pass over its share, summed across ranks.
    """
    if batches is None:
        raise CompressorError("the Fisher pass needs calibration data (batches is None)")
    from ..model.streaming import source_of

    if source_of(model) is not None:
        raise CompressorError("the Fisher pass back-propagates through the whole model at once, which a streamed "
                              "run (--stream) does not hold; run this recipe without --stream")
    start = time.perf_counter()
    world = distributed.world()
    everything = distributed.gather_windows(batches)  # the whole calibration set: what the key covers
    key = fingerprint(model, everything, target_names, reduce, kind) if cache != "off" else None
    found, rejected = (None, {})
    if cache == "use" and world.main:
        found, rejected = _look_up(model, everything, target_names, key, reduce, kind)
    if world.spread and cache == "use":
        hit = distributed.broadcast(None if found is None else found[0])
        if hit is not None:
            shapes = {name: expected_shape(model, name, reduce) for name in target_names}
            found = (hit, distributed.broadcast_tensors(None if found is None else found[1], shapes))
    if found is not None:
        return found[1], {"key": found[0], "hit": True, "seconds": time.perf_counter() - start,
                          "path": str(cache_path(found[0])), "windows": len(samples(everything))}
    fisher = collect_fisher(model, batches, target_names, device, checkpointing, reduce=reduce,
                            **({} if kind == DATA else {"kind": kind}))
    distributed.all_reduce_tensors(fisher.values(), "Fisher")
    info: dict[str, object] = {"key": key, "hit": False, "windows": len(samples(everything))}
    if rejected:
        info["rejected"] = rejected
    if key is not None and world.main:
        info["path"] = str(save_cached(key, fisher, {"windows": str(info["windows"]), "reduce": str(reduce),
                                                     "seq_len": str(batches[0].shape[1]), **{
                                                         k: str(v) for k, v in kind.header().items()}}))
    info["seconds"] = time.perf_counter() - start
    return fisher, info


def _look_up(model: nn.Module, batches: list[Tensor], target_names: list[str], key: str,
             reduce: Reduce, kind: Pass = DATA) -> tuple[tuple[str, dict[str, Tensor]] | None, dict[str, str]]:
    """((the key found, name → Fisher) or None, cache path → why a stored file was rejected): the cached
    Fisher for ``key``, or a full one that serves a reduced request."""
    rejected = {}
    candidates = [(key, reduce)] if reduce is None else [(fingerprint(model, batches, target_names, kind=kind), None),
                                                          (key, reduce)]
    for found, stored in candidates:
        shapes = {name: expected_shape(model, name, stored) for name in target_names}
        cached, problem = load_cached(found, shapes, signed=kind.statistic == "gradient")
        if cached is not None:
            return (found, {name: reduce_fisher(f, reduce) if f.dim() == 2 else f for name, f in cached.items()}), {}
        if problem != "absent":
            rejected[str(cache_path(found))] = problem  # recomputed (and rewritten)
    return None, rejected


def diagonal_weight(fisher: Tensor, axis: Reduce, eps: float = 1e-6) -> Tensor:
    """√(Σ F + eps) (fp64) along ``axis``: (in,) for ``in``, (out,) for ``out``, from a full (out, in) Fisher or
    one already summed; negative or non-finite sums count as zero. FWSVD's weight, LoRD's output weight."""
    importance = fisher.double().sum(0 if axis == "in" else 1) if fisher.dim() == 2 else fisher.double()
    importance = torch.nan_to_num(importance, nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0)
    return (importance + eps).sqrt()
