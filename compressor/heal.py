"""``compressor heal OUT --out HEALED``: a short fine-tune of a compressed output's small parts, the base frozen.

What trains is what the output already stores as small parts (``SMALL_PARTS``): low-rank factors (LoRD,
FWSVD, WeLore: ``up`` (out, r) and ``down`` (r, in)), the low-rank path of a compensated linear (EoRA,
LQ-LoRA: ``lora.up``, ``lora.down``), CURing's ``U`` (r, r) (its ``C`` and ``R`` are columns and rows of the
original weight, kept as they are), MoDeGPT's kept matrices (a shrunk attention's q/k/v/o weights, a shrunk
MLP's linears). Everything else (embeddings, norms, biases, quantized or pruned bases) is frozen, so the
healed output has the same kinds, shapes, dtypes and bytes; it is written through ``io.save`` (a temporary
sibling renamed onto ``--out``, one run per ``--out``), its manifest's ``healing`` list recording the run.
Low-rank factors stored as integers (``factor_bits: 8``) do not train: such an output is refused with one line.

Data: by default the output's own calibration source, in windows that share no token with the windows
compression calibrated on (``calibration.disjoint_windows``: the recipe's windows are re-drawn from its
recorded seed and the text's tiles touching them are dropped); ``--held-out`` more such windows, disjoint
from the training ones too, give the held-out loss logged before and after. A source that cannot give its
text (c4) is drawn with a seed compression did not use. The model is held in float32 (the trained factors
are AdamW's master weights); ``dtype`` bfloat16 runs the forward under autocast; the output is written back
in its own dtype.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import calibration as sources
from . import io
from .errors import CompressorError, quote
from .evaluation.evaluate import load_tokenizer, perplexity
from .evaluation.speed import base_of
from .io.checkpoint import output_dtype
from .model import loading as models
from .model.modules import dequantized

# module kind (the manifest's) → its parameters that train; a shrunk attention's are its four linears' weights
SMALL_PARTS: dict[str, tuple[str, ...]] = {
    "low_rank": ("up.weight", "down.weight"),
    "compensated": ("lora.up.weight", "lora.down.weight"),
    "cur": ("U",),
    "dense": ("weight",),  # a plain linear of a new shape (MoDeGPT's shrunk MLP)
    "shrunk_attention": (),  # by role: ``_attention_parts``
}
COMPUTE_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def trainable_modules(manifest: dict[str, Any]) -> dict[str, str]:
    """Module name → kind of every module of the manifest whose small parts heal trains."""
    return {name: spec["kind"] for name, spec in manifest.get("modules", {}).items() if spec["kind"] in SMALL_PARTS}


def small_parts(model: nn.Module, manifest: dict[str, Any]) -> dict[str, nn.Parameter]:
    """Qualified parameter name → parameter, for every small part of ``model`` (``SMALL_PARTS``)."""
    parts: dict[str, nn.Parameter] = {}
    for name, kind in trainable_modules(manifest).items():
        module = model.get_submodule(name)
        names = _attention_parts(module) if kind == "shrunk_attention" else SMALL_PARTS[kind]
        for local in names:
            parts[f"{name}.{local}"] = module.get_parameter(local)
    return parts


def _attention_parts(module: nn.Module) -> tuple[str, ...]:
    return tuple(f"{module.names[role]}.weight" for role in ("q", "k", "v", "o"))


def check_source(path: Path) -> dict[str, Any]:
    """The manifest of an output heal can train, or one line saying why not."""
    if not (path / io.MANIFEST).is_file():
        raise CompressorError(f"{path} is not a compressor output (no {io.MANIFEST}): heal trains the small parts "
                              "a compression stored; compress the model first (a dense model has none)")
    manifest = io.read_manifest(path)
    if manifest["merged"]:
        raise CompressorError(f"{path} is a merged output (--merge): its weights are dense, with no small parts "
                              "to train; heal the output written without --merge")
    integer = sorted(name for name, spec in manifest.get("modules", {}).items() if spec.get("factor_bits", 16) < 16)
    if integer:
        raise CompressorError(f"{path} stores its low-rank factors as integers (factor_bits "
                              f"{manifest['modules'][integer[0]]['factor_bits']}, {len(integer)} modules), which heal "
                              "cannot train: compress with factor_bits 16 to heal the factors")
    if not trainable_modules(manifest):
        kinds = sorted({spec["kind"] for spec in manifest.get("modules", {}).values()}) or ["none"]
        raise CompressorError(f"{path} stores nothing heal can train (modules of kind {', '.join(kinds)}): heal "
                              "trains low-rank factors, low-rank adapters (eora, lqlora), CURing's U and MoDeGPT's "
                              "kept matrices; add a low-rank path when compressing (e.g. an eora step)")
    return manifest


def check_options(n_samples: int, batch_size: int, held_out: int, steps: int | None, tokens: int | None,
                  lr: float, seq_len: int | None, log_every: int | None) -> None:
    """The numeric options, before anything is read."""
    for option, value in (("--n-samples", n_samples), ("--batch-size", batch_size), ("--held-out", held_out),
                          ("--steps", steps), ("--tokens", tokens), ("--log-every", log_every)):
        if value is not None and value < 1:
            raise CompressorError(f"{option} must be ≥ 1; got {value}")
    if steps is not None and tokens is not None:
        raise CompressorError("--steps and --tokens both give the budget; give one of them")
    if not (lr > 0 and math.isfinite(lr)):
        raise CompressorError(f"--lr must be a positive number; got {lr}")
    if seq_len is not None and seq_len < 2:
        raise CompressorError(f"--seq-len must be ≥ 2 (a window trains on its seq_len − 1 next tokens); "
                              f"got {seq_len}")


def compression_spans(manifest: dict[str, Any], dataset: str, tokens: int) -> list[tuple[int, int]]:
    """The [start, end) token spans of ``dataset`` (a text of ``tokens`` tokens) that the compression's
    calibration windows covered: every calibration set of its recipe on that source, re-drawn from its seed."""
    recipe = manifest.get("recipe") or {}
    base = recipe.get("calibration") or {}
    sets = [base, *({**base, **(step.get("calibration") or {})} for step in recipe.get("steps", []))]
    spans: set[tuple[int, int]] = set()
    for cal in sets:
        if cal.get("dataset") != dataset or tokens <= cal.get("seq_len", tokens):
            continue
        length = cal["seq_len"]
        starts = sources.random_starts(tokens, cal["n_samples"], length, cal.get("seed", 0))
        spans |= {(s, s + length) for s in starts.tolist()}
    return sorted(spans)


def heal_windows(manifest: dict[str, Any], tokenizer, dataset: str, count: int, seq_len: int,
                 seed: int) -> torch.Tensor:
    """``count`` windows (count, seq_len) of ``dataset`` that compression did not calibrate on."""
    source = sources.get(dataset)
    if source.calibration_ids is not None:
        ids = source.calibration_ids(tokenizer)  # (N,)
        spans = compression_spans(manifest, dataset, ids.numel())
        return sources.disjoint_windows(ids, spans, count, seq_len, seed, dataset)
    recipe = manifest.get("recipe") or {}
    used = {(recipe.get("calibration") or {}).get("seed", 0),
            *((step.get("calibration") or {}).get("seed", 0) for step in recipe.get("steps", []))}
    return source.calibration(tokenizer, count, seq_len, max(used) + 1 + seed)  # a seed compression did not use


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``ids`` (b, seq)."""
    logits = model(input_ids=ids, use_cache=False).logits.float()  # (b, seq, vocab)
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def distill_loss(model: nn.Module, teacher: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens of ``ids`` (b, seq) of KL(teacher ‖ model) between their next-token distributions
    (the base model's predictions as soft targets: every position carries a whole distribution, not one token)."""
    with torch.no_grad():
        target = torch.log_softmax(teacher(input_ids=ids, use_cache=False).logits.float(), -1)  # (b, seq, vocab)
    logits = model(input_ids=ids, use_cache=False).logits.float()  # (b, seq, vocab)
    vocab = logits.shape[-1]
    return nn.functional.kl_div(torch.log_softmax(logits, -1).reshape(-1, vocab), target.reshape(-1, vocab),
                                reduction="batchmean", log_target=True)


def mean_loss(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device, autocast) -> float:
    """Mean next-token loss of ``model`` on ``windows`` (k, seq), no gradients (``evaluation.perplexity``)."""
    with torch.no_grad(), autocast():
        return perplexity(model, windows, batch_size, device)["nll"]


def _autocast(device: torch.device, dtype: torch.dtype) -> Callable[[], Any]:
    if dtype == torch.float32:
        return nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def _step_line(say: Callable[[str], None], start: float, step: int, steps: int, done: int, loss: float) -> None:
    """Step ``step`` of ``steps`` (``done`` of them in this run) with the loss and an ETA."""
    elapsed = time.perf_counter() - start
    eta = elapsed / done * (steps - step)
    say(f"step {step}/{steps}: loss {loss:.4f}, {elapsed:.1f}s elapsed, eta {eta:.1f}s")


def train(model: nn.Module, optimizer: torch.optim.Optimizer, windows: torch.Tensor, steps: int,
          batch_size: int, device: torch.device, autocast, gradient_checkpointing: bool,
          say: Callable[[str], None] | None, log_every: int, first: int = 1,
          checkpoint: Callable[[int], None] | None = None, save_every: int = 0,
          loss_of: Callable[[nn.Module, torch.Tensor], torch.Tensor] = lm_loss) -> list[float]:
    """AdamW steps ``first``..``steps`` over the batches of ``windows`` (n, seq), in turn (step i takes batch
    i − 1 modulo their count, so a resumed run sees what the uninterrupted one would); the step losses
    (``loss_of(model, ids)``: the next-token loss, or the distillation loss). ``checkpoint(step)`` every
    ``save_every`` steps."""
    batches = windows.split(batch_size)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    losses, start = [], time.perf_counter()
    try:
        with dequantized(model):  # frozen quantized bases: dequantized once, not at every call
            for step in range(first, steps + 1):
                with autocast():
                    loss = loss_of(model, batches[(step - 1) % len(batches)].to(device))
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                if say is not None and (step % log_every == 0 or step == steps):
                    _step_line(say, start, step, steps, step - first + 1, losses[-1])
                if checkpoint is not None and save_every and step % save_every == 0 and step < steps:
                    checkpoint(step)
    finally:
        model.eval()
        if gradient_checkpointing:
            model.gradient_checkpointing_disable()
    return losses


def _log(path: Path) -> list[dict[str, Any]]:
    file = path / io.LOG
    if not file.is_file():
        return []
    return [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]


class ResumeState:
    """``--resume``: every ``save_every`` steps the trained tensors, AdamW's moments and the step are written to
    ``.NAME.heal-state.safetensors`` beside ``--out`` (renamed into place: never half-written), with the run's
    options; a run with ``resume`` continues from it when the options match, and a finished run removes it."""

    def __init__(self, out: str | Path, options: dict[str, Any]) -> None:
        out = Path(os.path.abspath(Path(out).expanduser()))
        self.path = out.parent / f".{out.name}.heal-state.safetensors"
        self.options = options

    def check(self, resume: bool) -> None:
        """Refuse a kept state without ``resume``, ``resume`` without one, and a state of other options."""
        if not self.path.is_file():
            if resume:
                raise CompressorError(f"--resume: there is no interrupted heal to continue ({self.path} is absent)")
            return
        if not resume:
            raise CompressorError(f"an interrupted heal of this --out is kept in {self.path}: continue it with "
                                  "--resume, or remove that file to start over")
        kept = json.loads(self._metadata()["options"])
        for key, value in self.options.items():
            if kept.get(key) != value:
                raise CompressorError(f"--resume: the kept heal ran with {key} {kept.get(key)!r}, this one with "
                                      f"{value!r}; run the same command, or remove {self.path} to start over")

    def _metadata(self) -> dict[str, str]:
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as handle:
            return handle.metadata()

    def save(self, step: int, parts: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer,
             before: dict[str, float]) -> None:
        from safetensors.torch import save_file

        tensors = {}
        for name, param in parts.items():
            moments = optimizer.state.get(param, {})
            tensors[f"param:{name}"] = param.detach().cpu().contiguous()
            for key in ("exp_avg", "exp_avg_sq"):
                if key in moments:
                    tensors[f"{key}:{name}"] = moments[key].detach().cpu().contiguous()
        tmp = self.path.with_name(self.path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"step": str(step), "options": json.dumps(self.options),
                                               "before": json.dumps(before)})
        os.replace(tmp, self.path)

    def restore(self, parts: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer) -> tuple[int, dict]:
        """Put the kept tensors and moments back; (the step reached, the losses before the first step)."""
        from safetensors.torch import load_file

        if not self.path.is_file():
            return 0, {}
        tensors, meta = load_file(str(self.path)), self._metadata()
        step = int(meta["step"])
        with torch.no_grad():
            for name, param in parts.items():
                param.copy_(tensors[f"param:{name}"])
                if f"exp_avg:{name}" in tensors:
                    optimizer.state[param] = {"step": torch.tensor(float(step)),
                                              "exp_avg": tensors[f"exp_avg:{name}"].to(param.device),
                                              "exp_avg_sq": tensors[f"exp_avg_sq:{name}"].to(param.device)}
        return step, json.loads(meta["before"])

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def heal(path: str | Path, out: str | Path, *, dataset: str | None = None, n_samples: int = 64,
         seq_len: int | None = None, batch_size: int = 4, steps: int | None = None, tokens: int | None = None,
         lr: float = 1e-4, held_out: int = 8, seed: int = 0, device: str = "cpu", dtype: str = "float32",
         gradient_checkpointing: bool = False, distill: bool = False, overwrite: bool = False,
         resume: bool = False, save_every: int | None = None,
         say: Callable[[str], None] | None = None, log_every: int | None = None) -> dict[str, Any]:
    """Fine-tune the small parts of the compressed output ``path`` and write it to ``out``; returns the
    healing record (also the last entry of the new manifest's ``healing``) with ``model`` (the healed model).
    ``dataset``: default the output's calibration source; ``seq_len`` default its windows' length. The budget
    is ``steps`` or ``tokens`` (rounded up to whole steps of ``batch_size × seq_len``), default one pass over
    the ``n_samples`` training windows. ``say``: a line every ``log_every`` steps with the loss and an ETA.
    ``save_every``: keep the state every N steps (``ResumeState``; None: a tenth of the steps, 0: never) for
    ``resume``, which continues it. ``distill``: train toward the base model's next-token distributions
    (``distill_loss``; the base the manifest records is loaded beside the output) instead of the text's tokens."""
    check_options(n_samples, batch_size, held_out, steps, tokens, lr, seq_len, log_every)
    if save_every is not None and save_every < 0:
        raise CompressorError(f"--save-every must be ≥ 0; got {save_every}")
    if dtype not in COMPUTE_DTYPES:
        raise CompressorError(f"--dtype: {quote(dtype)}; heal runs in {', '.join(COMPUTE_DTYPES)}")
    path = Path(path)
    manifest = check_source(path)
    compute = models.compute_device(device)
    calibration = (manifest.get("recipe") or {}).get("calibration") or {}
    dataset = dataset or calibration.get("dataset", "sotu")
    seq_len = seq_len or calibration.get("seq_len", 512)
    steps = steps or math.ceil((tokens or n_samples * seq_len) / (batch_size * seq_len))
    sources.get(dataset)  # an unknown source fails before the output is reserved
    options = dict(source=str(path.resolve()), dataset=dataset, n_samples=n_samples, seq_len=seq_len,
                   batch_size=batch_size, steps=steps, lr=lr, held_out=held_out, seed=seed,
                   dtype=str(COMPUTE_DTYPES[dtype]).removeprefix("torch."), loss="distill" if distill else "next_token")
    state = ResumeState(out, options)
    state.check(resume)
    with io.OutputDirectory(out, overwrite, inputs=[path, dataset]) as output:
        tokenizer = load_tokenizer(str(path))
        model = io.load(path, compute, dtype=torch.float32)
        models.check_seq_len(model.config, seq_len, "--seq-len")
        teacher = models.load(base_of(path, manifest), torch.float32, compute)[0] if distill else None
        windows = heal_windows(manifest, tokenizer, dataset, n_samples + held_out, seq_len, seed)
        train_windows, held_windows = windows[:n_samples], windows[n_samples:]  # (n, seq), (held_out, seq)
        record = run(model, manifest, train_windows, held_windows, steps, batch_size, lr, compute,
                     COMPUTE_DTYPES[dtype], gradient_checkpointing, say, log_every, state, save_every, teacher)
        del teacher
        record.update({key: value for key, value in options.items() if key != "source"}, device=str(compute),
                      gradient_checkpointing=gradient_checkpointing,
                      windows="disjoint from the compression's calibration windows and from each other")
        healed = dict(manifest, healing=[*manifest.get("healing", []), record])
        reshaped = {name: model.get_submodule(name) for name, spec in manifest["modules"].items()
                    if spec["kind"] == "dense"}
        io.save(model.cpu(), tokenizer, output, healed, _log(path), reshaped=reshaped,
                storage_dtype=output_dtype(path))
    state.remove()
    return {**record, "out": str(output.path), "model": model}


def run(model: nn.Module, manifest: dict[str, Any], train_windows: torch.Tensor, held_windows: torch.Tensor,
        steps: int, batch_size: int, lr: float, device: torch.device, dtype: torch.dtype,
        gradient_checkpointing: bool, say: Callable[[str], None] | None, log_every: int | None,
        state: ResumeState | None = None, save_every: int | None = None,
        teacher: nn.Module | None = None) -> dict[str, Any]:
    """The healing of ``model`` in place: its small parts trained, the losses before and after; the record.
    ``teacher``: the steps minimise ``distill_loss`` to it instead of ``lm_loss``. The losses before and after
    are next-token losses either way, on the held-out windows and on as many training windows (not all of
    them: a pass over every training window before and after would cost a third of a short heal)."""
    seq_len = train_windows.shape[1]
    parts = small_parts(model, manifest)
    trained = set(map(id, parts.values()))
    for param in model.parameters():
        param.requires_grad_(id(param) in trained)
    autocast = _autocast(device, dtype)
    start = time.perf_counter()
    optimizer = torch.optim.AdamW(list(parts.values()), lr=lr, weight_decay=0.0)
    done, before = state.restore(parts, optimizer) if state is not None else (0, {})
    probe = train_windows[:max(1, held_windows.shape[0])]  # (k, seq): the training loss before and after
    if not before:
        before = {"loss": mean_loss(model, probe, batch_size, device, autocast),
                  "held_out_loss": mean_loss(model, held_windows, batch_size, device, autocast)}
    if say is not None:
        resumed = f", resumed after step {done}" if done else ""
        say(f"healing {len(parts)} tensors ({sum(p.numel() for p in parts.values()):,} parameters) for {steps} "
            f"steps of {batch_size} × {seq_len} tokens{resumed}; held-out loss {before['held_out_loss']:.4f}")
    checkpoint = (lambda step: state.save(step, parts, optimizer, before)) if state is not None else None
    losses = train(model, optimizer, train_windows, steps, batch_size, device, autocast, gradient_checkpointing,
                   say, log_every or max(1, steps // 10), done + 1, checkpoint,
                   max(1, steps // 10) if save_every is None else save_every,
                   lm_loss if teacher is None else lambda student, ids: distill_loss(student, teacher, ids))
    for param in model.parameters():
        param.requires_grad_(False)
    after = {"loss": mean_loss(model, probe, batch_size, device, autocast),
             "held_out_loss": mean_loss(model, held_windows, batch_size, device, autocast)}
    if say is not None:
        say(f"held-out loss {before['held_out_loss']:.4f} → {after['held_out_loss']:.4f}, training loss "
            f"{before['loss']:.4f} → {after['loss']:.4f}")
    kinds = trainable_modules(manifest)
    return {"steps": steps, "tokens": steps * batch_size * seq_len, "lr": lr, "batch_size": batch_size,
            "loss_before": before["loss"], "loss_after": after["loss"], "loss_windows": probe.shape[0],
            "held_out_loss_before": before["held_out_loss"], "held_out_loss_after": after["held_out_loss"],
            "first_step_loss": losses[0] if losses else None, "last_step_loss": losses[-1] if losses else None,
            "resumed_after_step": done or None,
            "trained": {"modules": len(kinds), "kinds": sorted(set(kinds.values())), "tensors": len(parts),
                        "parameters": sum(p.numel() for p in parts.values())},
            "seconds": time.perf_counter() - start}
