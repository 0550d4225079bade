"""Compare re-run benchmark figures with the committed ones, at the precision the results tables print
(README.md, docs/results.md).

    python scripts/refactor_check.py --after DIR [--before results] [--out results/refactor-v2-check.json]

For every run name found in both ``BEFORE/bench-<suite>.json`` and ``AFTER/bench-<suite>.json``: the
perplexity (as the results tables print it: 2 decimals, or 3 significant
digits from 1000 up), the parameter count (exact) and the ranks chosen (exact). A suite or run
missing from AFTER is listed as not re-run. Exit status 1 when any re-run figure differs, unless a
``--control`` run explains it: the code from *before* the refactor re-run under the re-run's conditions
(the same machine: its CPU and BLAS kernels set the last bits of a summed Hessian, and GPTQ's sequential
rounding carries them to the 4th digit of a perplexity). A row whose re-run figure equals its control's
exactly is ``explained``: the refactor did not move it, the machine did.

    python scripts/refactor_check.py --after results/v2 --control results/v2/control-pre-v2-bench-quant.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUITES = ("lord", "fwsvd", "curing", "welore", "quant")


def printed(value: float | None) -> str | None:
    """As the results tables print perplexity: 2 decimals, 3 significant digits from 1000 up (2.04e7)."""
    if value is None:
        return None
    return f"{value:.2f}" if value < 1000 else f"{value:.3g}"


def compare(before: dict, after: dict) -> dict:
    row = {
        "name": before["name"],
        "perplexity_before": before.get("perplexity"),
        "perplexity_after": after.get("perplexity"),
        "parameters_before": before.get("parameters"),
        "parameters_after": after.get("parameters"),
    }
    same = (
        printed(before.get("perplexity")) == printed(after.get("perplexity"))
        and before.get("parameters") == after.get("parameters")
        and before.get("ranks") == after.get("ranks")
    )
    if after.get("threads"):  # a merged re-run records each run's thread count
        row["threads_after"] = after["threads"]
    row["same_at_printed_precision"] = same and "error" not in after
    if "error" in after:
        row["error_after"] = after["error"]
    return row


def threads(result: dict) -> str | None:
    return (result.get("environment") or {}).get("OMP_NUM_THREADS")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, default=ROOT / "results")
    parser.add_argument("--after", type=Path, required=True)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--control", type=Path, nargs="*", default=[],
                        help="bench JSON files of the pre-refactor code run under the re-run's conditions")
    args = parser.parse_args()
    where = {
        path: (path.resolve().relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path)
        for path in (args.after, args.before)
    }
    report: dict = {
        "what": f"re-run figures ({where[args.after]}) against the committed ones ({where[args.before]}), "
        "as the results tables print them",
        "suites": {},
    }
    controls = {}
    for path in args.control:
        control = json.loads(path.read_text())
        for run in control["runs"]:
            if run["name"] != "dense":
                controls[run["name"]] = {**run, "file": str(where.get(path, path)), "threads": threads(control)}
    differ = explained = 0
    for suite in SUITES:
        old_file, new_file = args.before / f"bench-{suite}.json", args.after / f"bench-{suite}.json"
        if not old_file.is_file():
            continue
        old_result = json.loads(old_file.read_text())
        new_result = json.loads(new_file.read_text()) if new_file.is_file() else {"runs": []}
        old = {r["name"]: r for r in old_result["runs"]}
        new = {r["name"]: r for r in new_result["runs"]}
        rows = [compare(old[name], new[name]) for name in old if name in new]
        for row in rows:
            control = controls.get(row["name"]) if not row["same_at_printed_precision"] else None
            if control is not None:
                row["control"] = {"perplexity": control.get("perplexity"), "file": control["file"],
                                  "threads": control["threads"]}
                row["explained"] = (control.get("perplexity") == row["perplexity_after"]
                                    and control.get("parameters") == row["parameters_after"])
                explained += row["explained"]
        differ += sum(not r["same_at_printed_precision"] and not r.get("explained") for r in rows)
        report["suites"][suite] = {
            "threads_before": threads(old_result), "threads_after": threads(new_result),
            "re_run": len(rows),
            "of": len(old),
            "rows": rows,
            "not_re_run": [name for name in old if name not in new],
        }
        print(
            f"{suite}: {len(rows)}/{len(old)} re-run, "
            f"{sum(r['same_at_printed_precision'] for r in rows)} same at printed precision"
        )
    report["differ"] = differ  # not explained by a control run
    report["explained"] = explained
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
