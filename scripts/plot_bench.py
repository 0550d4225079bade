"""Perplexity against bytes on disk for every benchmarked run, from the committed results, and README.md's
comparison table.

    python scripts/plot_bench.py [--out results/ppl-vs-bytes.png] [--table] [--names NAME ...]

Reads ``results/bench-*.json`` (what ``scripts/bench.py`` writes; a run named in several suites is drawn
once) and draws held-out perplexity against the bytes of the written safetensors, both on log scales, one
colour per method family (low-rank factors stored in 8 bits, ``factor_bits: 8``, a family of their own), the runs
on the lower-left (Pareto) front labelled; runs far above the usable range (perplexity > 400) sit hollow on the
top edge. A healed run (the quality suite's ``healing``) is drawn at its healed perplexity inside a black ring,
a dotted line down from its perplexity before healing (the bytes do not change). Needs matplotlib (the ``plot``
extra). ``--table`` prints a Markdown table of the chosen runs in ``compressor compare``'s columns
(``compare.row_of_bench``), with the generation speed measured in ``results/generation-*.json`` where there
is one (batch 1, best of the rounds). The dense run records no bytes: they are measured on the converted
default model in the cache, where it is, else counted as 4 bytes per parameter.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compressor.evaluation import compare  # noqa: E402

RESULTS = ROOT / "results"
TABLE = ["dense", "lord-gram-0.2", "lord-gram-fisher-rows-loss-0.2", "lord-gram-0.4", "fwsvd-0.2", "welore-0.05",
         "lord-gram-welore-0.05", "curing-5", "modegpt-0.2", "lord-gram-as-modegpt-0.2", "modegpt-0.3", "rtn-w4",
         "gptq-w4-act-order-sequential", "gptq-w4-g64", "rtn-w4-eora-r64", "gptq-w4-eora-r64", "gptq-w3-eora-r64",
         "rtn-w3", "sparsegpt-2of4", "sparsegpt-2of4-eora-r64", "nf4", "nf3", "lqlora-3.0-r64",
         "lqlora-3.0-r64-fisher", "lqlora-2.75-r64"]


def write(folder: Path = RESULTS, out: Path | None = None) -> Path:
    """The plot of every run in ``folder``'s bench-*.json, written to ``out`` (default: folder/ppl-vs-bytes.png)."""
    runs, heldout = load_runs(folder)
    out = out or folder / "ppl-vs-bytes.png"
    plot(runs, heldout, out, dense_bytes(next((r["parameters"] for r in runs if r["name"] == "dense"), 0)))
    return out


def load_runs(folder: Path = RESULTS) -> tuple[list[dict], dict]:
    """(runs with a perplexity and bytes on disk, in file order, each name once; the held-out protocol of the
    first file). The distributed suite's runs (the same outputs made by several ranks) have no bytes of
    their own and are left out."""
    runs, seen, heldout = [], set(), None
    for file in sorted(folder.glob("bench-*.json")):
        data = json.loads(file.read_text())
        heldout = heldout or data.get("heldout")
        for run in data["runs"]:
            if run.get("perplexity") is None or run.get("bytes_on_disk") is None or run["name"] in seen \
                    or "error" in run:
                continue
            seen.add(run["name"])
            runs.append({**run, "suite": file.stem.removeprefix("bench-")})
    return runs, heldout or {}


def speeds(folder: Path = RESULTS, batch: int = 1) -> dict[str, dict]:
    """Run name → best prefill/decode tokens/s at ``batch`` from the generation-speed results."""
    found = {}
    for file in sorted(folder.glob("generation-*.json")):
        data = json.loads(file.read_text())
        for row in data.get("rows", []):
            if row.get("batch") == batch:
                found[row["model"]] = {"prefill_tokens_per_s": row.get("prefill_tokens_per_s_best"),
                                       "decode_tokens_per_s": row.get("decode_tokens_per_s_best")}
    return found


def dense_bytes(parameters: int) -> int:
    """Bytes of the dense default model's safetensors: measured in the cache where it is converted."""
    from compressor.evaluation.evaluate import bytes_on_disk
    from compressor.model.loading import DEFAULT_MODEL, cache_dir

    folder = cache_dir() / "models" / DEFAULT_MODEL
    return (bytes_on_disk(folder) if (folder / "config.json").is_file() else 0) or 4 * parameters


def family(run: dict) -> str:
    """The colour group of a run: its method, with the compensation and LoRD's whitening named."""
    recipe = run.get("recipe") or {}
    if recipe.get("peer"):  # another library's run (the speed suite's llm-compressor GPTQ)
        return f"{recipe['peer']} gptq"
    steps = recipe.get("steps") or []
    if not steps:
        return "dense"
    first = steps[0]
    name = first["method"]
    config = first.get("config") or {}
    if name == "quantize":
        name = config.get("algorithm", "rtn")
    elif name == "prune":
        name = config.get("algorithm", "prune")
    elif name == "lord":
        name = f"lord {config.get('whiten', 'gram')}"
    if len(steps) > 1 and steps[1]["method"] == "eora":
        name += " + " + ("svd" if (steps[1].get("config") or {}).get("space") == "weight" else "eora")
    if any((step.get("config") or {}).get("factor_bits") == 8 for step in steps):
        name += " (int8 factors)"
    return name


def healed_points(runs: list[dict]) -> list[tuple[float, float, float]]:
    """(MB on disk, perplexity before healing, after) of every healed run."""
    return [(run["bytes_on_disk"] / 1e6, run["healing"]["before"]["perplexity"], run["perplexity"])
            for run in runs if run.get("healing") and run.get("bytes_on_disk")]


def pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The points no other point beats on both bytes and perplexity."""
    front, best = [], float("inf")
    for x, y, name in sorted(points):
        if y < best:
            front.append((x, y, name))
            best = y
    return front


def plot(runs: list[dict], heldout: dict, out: Path, dense: int, ceiling: float = 400.0) -> None:
    """Both axes on log scales; runs above ``ceiling`` (the factorizations without data-aware whitening) are
    drawn hollow on the top edge, their values in a note, so that the usable range stays readable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(10, 6), dpi=100)
    groups: dict[str, list[tuple[float, float, str]]] = {}
    for run in runs:
        size = run.get("bytes_on_disk") or (dense if not run.get("recipe") else None)
        if size:
            groups.setdefault(family(run), []).append((size / 1e6, run["perplexity"], run["name"]))
    markers = "osD^v<>pPXh8"
    colours = plt.get_cmap("tab20").colors
    above = []
    for index, (name, points) in enumerate(sorted(groups.items(), key=lambda item: item[0] != "dense")):
        inside = [p for p in points if p[1] <= ceiling]
        outside = [p for p in points if p[1] > ceiling]
        above += [(name, p) for p in outside]
        if name == "dense":
            ax.scatter([p[0] for p in inside], [p[1] for p in inside], marker="*", s=240, color="black",
                       label="dense fp32", zorder=3)
            continue
        marker, colour = markers[index % len(markers)], colours[(2 * index) % 20 + (index // 10) % 2]
        ax.scatter([p[0] for p in inside], [p[1] for p in inside], marker=marker, s=38, alpha=0.9, color=colour,
                   label=name + (" (above the top edge)" if outside and not inside else ""), zorder=2)
        if outside:
            ax.scatter([p[0] for p in outside], [ceiling * 0.96] * len(outside), marker=marker, s=38,
                       facecolors="none", edgecolors=colour, zorder=2)
    healed = healed_points(runs)
    for x, before, after in healed:
        ax.plot([x, x], [min(before, ceiling * 0.96), min(after, ceiling * 0.96)], linestyle=":", color="black",
                linewidth=1, zorder=1)
    if healed:
        ax.scatter([x for x, _, _ in healed], [min(after, ceiling * 0.96) for _, _, after in healed], marker="o",
                   s=130, facecolors="none", edgecolors="black", linewidths=1.2, zorder=4,
                   label="healed (compressor heal); dotted: before healing")
    for x, y, name in pareto([p for points in groups.values() for p in points if p[1] <= ceiling]):
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, -11), fontsize=7)
    if above:
        worst = sorted(above, key=lambda item: item[1][1])
        ax.text(0.16, 0.93, f"hollow, on the top edge: {len(above)} runs above perplexity {ceiling:.0f} "
                f"({worst[0][1][1]:,.0f} to {worst[-1][1][1]:.1e}): " +
                ", ".join(sorted({name for name, _ in above})), transform=ax.transAxes, fontsize=7, va="top")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(top=ceiling)
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(plain)
    ax.tick_params(which="minor", labelsize=7)
    ax.set_xlabel("bytes on disk (MB, log scale)")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title(f"SmolLM2-135M, every benchmarked run: held-out perplexity against bytes on disk\n"
                 f"({heldout.get('dataset', '?')}, {heldout.get('tokens', 0):,} tokens in windows of "
                 f"{heldout.get('seq_len', '?')}; scripts/bench.py, results/bench-*.json)", fontsize=9)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def table(runs: list[dict], heldout: dict, names: list[str], dense: int) -> str:
    by_name = {run["name"]: run for run in runs}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise SystemExit(f"not in the results: {', '.join(missing)}")
    measured = speeds()
    on = f"{heldout.get('dataset', '?')}, {heldout.get('seq_len', '?')}"
    rows = [compare.row_of_bench(by_name[n], on, measured.get(n), dense) for n in names]
    return compare.markdown(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "ppl-vs-bytes.png")
    parser.add_argument("--table", action="store_true", help="print the Markdown comparison table too")
    parser.add_argument("--names", nargs="*", default=TABLE, help="runs of the table, in order")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args()
    runs, heldout = load_runs()
    dense = dense_bytes(next((r["parameters"] for r in runs if r["name"] == "dense"), 0))
    if not args.no_plot:
        try:
            plot(runs, heldout, args.out, dense)
        except ImportError:
            raise SystemExit("the plot needs matplotlib: pip install 'compressor[plot]'") from None
        print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes, {len(runs)} runs)")
    if args.table:
        print(table(runs, heldout, args.names, dense), end="")


if __name__ == "__main__":
    main()
