"""The "Low-rank quality" table of docs/results.md from results/bench-quality.json (``--suite quality``).

    python scripts/quality_table.py [--json results/bench-quality.json] [--write docs/results.md]

One row per mechanism (the suite's run names without the ratio), held-out and calibration perplexity at
ratios 0.2 and 0.4, compression seconds at 0.2; the best held-out figure of each ratio in bold. ``--write``
replaces the table in that page (the block that starts with the header row) instead of printing it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADER = "| mechanism (LoRD gram) | 0.2 held-out | 0.2 calibration | 0.4 held-out | 0.4 calibration | compression s (0.2) |"
RATIOS = ("0.2", "0.4")
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
}


def table(runs: list[dict]) -> list[str]:
    by_name = {r["name"]: r for r in runs if "error" not in r}
    best = {ratio: min((r["perplexity"] for n, r in by_name.items() if n.endswith("-" + ratio)), default=None)
            for ratio in RATIOS}

    def cell(run: dict | None, key: str, ratio: str | None = None) -> str:
        value = None if run is None else run.get(key)
        if value is None:
            return ""
        text = f"{value:.2f}"
        return f"**{text}**" if ratio is not None and value == best[ratio] else text

    lines = [HEADER, "|---|---|---|---|---|---|"]
    dense = by_name.get("dense")
    if dense is not None:
        lines.append(f"| dense | {cell(dense, 'perplexity')} | {cell(dense, 'calibration_perplexity')} | | | |")
    for key, label in ROWS.items():
        runs_at = {ratio: by_name.get(f"lord-gram-{key}-{ratio}") for ratio in RATIOS}
        if not any(runs_at.values()):
            continue
        at_02 = runs_at["0.2"]
        seconds = f"{at_02['seconds']['compression']:.0f}" if at_02 else ""
        cells = [c for ratio in RATIOS for c in (cell(runs_at[ratio], "perplexity", ratio),
                                                  cell(runs_at[ratio], "calibration_perplexity"))]
        lines.append(f"| {label} | {' | '.join(cells)} | {seconds} |")
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
    start = text.index(HEADER)
    end = next(i for i in range(start, len(text)) if not text[i].startswith("|"))
    args.write.write_text("\n".join(text[:start] + lines + text[end:]) + "\n")


if __name__ == "__main__":
    main()
