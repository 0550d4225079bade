"""Print the README's results tables (Markdown) from results/bench-*.json.

    python scripts/results_table.py [results/bench-lord.json ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def fmt_ppl(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if value < 1000 else f"{value:.3g}"


def table(path: Path) -> str:
    data = json.loads(path.read_text())
    runs = data["runs"]
    dense = next((r for r in runs if r["name"] == "dense"), None)
    lines = [f"**{path.name}** — model {data.get('model')}, calibration {data.get('calibration')}",
             "", "| config | perplexity | parameters | removed | bytes on disk | run / plain forward | peak RSS (MiB) |",
             "|---|---|---|---|---|---|---|"]
    for run in runs:
        if "error" in run:
            lines.append(f"| {run['name']} | error: {run['error']} | | | | | |")
            continue
        params = run.get("parameters")
        before = run.get("parameters_before") or (dense or {}).get("parameters")
        removed = f"{1 - params / before:.1%}" if params and before else "–"
        ratio = run.get("run_over_plain_forward")
        lines.append(f"| {run['name']} | {fmt_ppl(run.get('perplexity'))} | {params:,} | {removed} | "
                     f"{run.get('bytes_on_disk') or '–':,} | {'' if ratio is None else f'{ratio:.2f}×'} | "
                     f"{run.get('peak_rss_mib', 0):.0f} |" if isinstance(run.get('bytes_on_disk'), int) else
                     f"| {run['name']} | {fmt_ppl(run.get('perplexity'))} | {params:,} | {removed} | – | "
                     f"{'' if ratio is None else f'{ratio:.2f}×'} | {run.get('peak_rss_mib', 0):.0f} |")
    return "\n".join(lines)


def main() -> None:
    paths = [Path(p) for p in sys.argv[1:]] or sorted((ROOT / "results").glob("bench-*.json"))
    print("\n\n".join(table(p) for p in paths))


if __name__ == "__main__":
    main()
