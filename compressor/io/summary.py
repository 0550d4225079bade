"""What a run did, step by step, in the numbers that fit each kind of step.

A step's log entries (one per targeted module, ``pipeline.compress.log_entry``) say what it produced; each kind
of step is summarized by what it changes:

- **factorization** (``low_rank``, ``cur`` modules: LoRD, FWSVD, WeLore, CURing): the targeted linears'
  parameters before and after, and the rank reduction (``ranks.uniform.reduction``);
- **quantization** (``quantized``, ``normal_float``, and LQ-LoRA's ``compensated`` modules over a
  ``normal_float`` base): the bit width, the bytes of the targeted linears before and after, and the bits
  stored per weight (scales, zero points, biases and low-rank factors included); where the quantized part
  is accounted on its own (LQ-LoRA: ``quantized_bits``), its bits per weight (what a bit budget counts)
  and the rank of the low-rank parts too;
- **pruning** (dense linears with a ``sparsity``): the fraction of zero weights; the zeros are stored
  dense, so bytes do not change;
- **compensation** (``compensated``: EoRA): the ranks and the parameters and bytes the low-rank paths add;
- **resizing** (layers of a new shape, shrunk attention: MoDeGPT): parameters before and after.

The model line gives the bytes of all parameters and buffers before and after (packed integers
included) and the parameters, counting each quantized weight as one parameter (``params_after`` in the
manifest counts ``nn.Parameter`` elements only, which a packed weight is not).
"""

from __future__ import annotations

from typing import Any

from ..ranks.uniform import reduction

FACTORIZED, COMPENSATED = ("low_rank", "cur"), "compensated"
QUANTIZED_KINDS = ("quantized", "normal_float")


def is_quantized(entry: dict[str, Any]) -> bool:
    """A quantized module, or a compensated one built over a quantized base in the same step (LQ-LoRA)."""
    return entry["kind"] in QUANTIZED_KINDS or entry.get("base_kind") in QUANTIZED_KINDS


def kind_of_step(entries: list[dict[str, Any]]) -> str:
    """"factorization", "quantization", "pruning", "compensation", "resizing", or "unchanged"."""
    kinds = {e["kind"] for e in entries if e["kind"] != "dense"}
    if any(is_quantized(e) for e in entries):
        return "quantization"
    if kinds & set(FACTORIZED):
        return "factorization"
    if COMPENSATED in kinds:
        return "compensation"
    if any("sparsity" in e for e in entries):
        return "pruning"
    return "resizing" if kinds else "unchanged"


def _total(entries: list[dict[str, Any]], key: str) -> int | None:
    """Σ ``key`` over entries; None where an entry lacks it (logs written before it was recorded)."""
    values = [e.get(key) for e in entries]
    return None if any(v is None for v in values) else sum(values)


def _weights(entry: dict[str, Any]) -> int:
    """Elements of the (out, in) weight the entry targeted."""
    out_features, in_features = entry["shape"]
    return out_features * in_features


def step_summary(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The numbers of one step, from its log entries."""
    changed = [e for e in entries if e["kind"] != "dense"]
    kind = kind_of_step(entries)
    summary: dict[str, Any] = {"step": entries[0]["step"], "method": entries[0]["method"], "kind": kind,
                               "targeted": len({e["name"] for e in entries}), "changed": len(changed)}
    before = sum(e["params_before"] or 0 for e in entries)
    after = sum(e["params_after"] or 0 for e in entries)
    if kind == "factorization":
        r = reduction(entries)
        summary.update(params_before=before, params_after=after, param_reduction=r["param_reduction"],
                       rank_reduction=r["rank_reduction"], factorized=r["factorized"])
        factor_bits = sorted({e["factor_bits"] for e in changed if "factor_bits" in e})
        if factor_bits:  # integer factors: the bytes say more than the parameters
            summary.update(factor_bits=factor_bits, bytes_before=_total(entries, "bytes_before"),
                           bytes_after=sum(e.get("bytes_after") or e.get("bytes_before") or 0 for e in entries))
    elif kind == "quantization":
        quantized = [e for e in changed if is_quantized(e)]
        weights = sum(_weights(e) for e in quantized)
        bytes_after = _total(quantized, "bytes_after") or 0
        summary.update(bits=sorted({e["bits"] for e in quantized if "bits" in e}),
                       group_sizes=sorted({e.get("group_size") or e.get("block_size") or 0 for e in quantized}),
                       quantized=len(quantized), weights=weights,
                       bytes_before=_total(quantized, "bytes_before"), bytes_after=bytes_after,
                       bits_per_weight=8 * bytes_after / weights if weights else 0.0)
        accounted = _total(quantized, "quantized_bits")
        if accounted is not None and weights:  # the quantized part on its own (what a bit budget counts)
            summary.update(quantized_bits_per_weight=accounted / weights,
                           ranks=sorted({e["rank"] for e in quantized if e.get("rank")}))
    elif kind == "pruning":
        pruned = [e for e in changed if "sparsity" in e]
        weights = sum(_weights(e) for e in pruned)
        summary.update(pruned=len(pruned),
                       sparsity=sum(e["sparsity"] * _weights(e) for e in pruned) / weights if weights else 0.0)
    elif kind == "compensation":
        compensated = [e for e in changed if e["kind"] == COMPENSATED]
        summary.update(compensated=len(compensated), ranks=sorted({e["rank"] for e in compensated}),
                       params_added=sum(e["params_after"] - e["params_before"] for e in compensated),
                       bytes_added=None if _total(compensated, "bytes_before") is None else
                       _total(compensated, "bytes_after") - _total(compensated, "bytes_before"))
    elif kind == "resizing":
        summary.update(params_before=before, params_after=after,
                       param_reduction=1.0 - after / before if before else 0.0)
    return summary


def steps(log: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary per step, in step order."""
    by_step: dict[int, list[dict[str, Any]]] = {}
    for entry in log:
        by_step.setdefault(entry["step"], []).append(entry)
    return [step_summary(entries) for _, entries in sorted(by_step.items())]


def quantized_weights(log: list[dict[str, Any]]) -> int:
    """Weights stored as packed integers at the end: of modules whose last entry is quantized, or compensated
    after a quantized one, and low-rank factors stored as integers (``factor_bits``)."""
    last: dict[str, dict[str, Any]] = {}
    quantized: set[str] = set()
    for entry in log:
        last[entry["name"]] = entry
        if is_quantized(entry):
            quantized.add(entry["name"])
    return sum(_weights(e) for name, e in last.items()
               if is_quantized(e) or (e["kind"] == COMPENSATED and name in quantized)) + sum(
        e["rank"] * sum(e["shape"]) for e in last.values() if e["kind"] == "low_rank" and "factor_bits" in e)


def _size(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def model_line(manifest: dict[str, Any], log: list[dict[str, Any]]) -> str:
    """Bytes and parameters of the whole model, before and after."""
    params_after = manifest["params_after"] + quantized_weights(log)
    line = f"model: parameters {manifest['params_before']:,} → {params_after:,}"
    if manifest.get("bytes_before") and manifest.get("bytes_after") is not None:
        ratio = manifest["bytes_after"] / manifest["bytes_before"]
        line += f"; {_size(manifest['bytes_before'])} → {_size(manifest['bytes_after'])} ({ratio:.1%} of the bytes)"
    return line


def step_line(s: dict[str, Any]) -> str:
    """One line for a step summary."""
    head = f"step {s['step']} {s['method']}: "
    kind = s["kind"]
    if kind == "factorization":
        return head + (f"{s['factorized']}/{s['targeted']} linears factorized; their parameters "
                       f"{s['params_before']:,} → {s['params_after']:,} ({s['param_reduction']:.1%} removed), "
                       f"{s['rank_reduction']:.1%} rank reduction (Σ ranks cut / Σ min(m,n))"
                       + (f"; factors in {'/'.join(map(str, s['factor_bits']))} bits: {_size(s['bytes_before'])} → "
                          f"{_size(s['bytes_after'])}" if "factor_bits" in s else ""))
    if kind == "quantization":
        bits = "/".join(map(str, s["bits"])) or "?"
        groups = ", ".join(f"group {g}" if g else "per channel" for g in s["group_sizes"])
        if "quantized_bits_per_weight" in s:  # LQ-LoRA: NormalFloat blocks, a bit budget, low-rank parts
            ranks = "/".join(map(str, s["ranks"]))
            return head + (f"{s['quantized']}/{s['targeted']} linears NormalFloat-quantized to {bits} bits "
                           f"(blocks of {'/'.join(map(str, s['group_sizes']))})" + (f" + rank {ranks}" if ranks else "")
                           + f": {s['quantized_bits_per_weight']:.3f} bits per weight in the quantized part, "
                           f"{s['bits_per_weight']:.2f} with everything stored, {_size(s['bytes_before'])} → "
                           f"{_size(s['bytes_after'])}")
        return head + (f"{s['quantized']}/{s['targeted']} linears quantized to {bits} bits ({groups}): "
                       f"{s['bits_per_weight']:.2f} bits per weight with scales, {_size(s['bytes_before'])} → "
                       f"{_size(s['bytes_after'])}")
    if kind == "pruning":
        return head + (f"{s['pruned']}/{s['targeted']} linears pruned to {s['sparsity']:.1%} sparsity "
                       f"(zeros stored dense: bytes unchanged)")
    if kind == "compensation":
        ranks = "/".join(map(str, s["ranks"]))
        return head + (f"{s['compensated']}/{s['targeted']} linears compensated at rank {ranks}: "
                       f"+{s['params_added']:,} parameters, +{_size(s['bytes_added'])}")
    if kind == "resizing":
        return head + (f"{s['changed']}/{s['targeted']} modules resized; their parameters {s['params_before']:,} "
                       f"→ {s['params_after']:,} ({s['param_reduction']:.1%} removed)")
    return head + f"0/{s['targeted']} modules changed"


def lines(manifest: dict[str, Any], log: list[dict[str, Any]]) -> list[str]:
    """The model line and one line per step."""
    return [model_line(manifest, log), *(step_line(s) for s in steps(log))]
