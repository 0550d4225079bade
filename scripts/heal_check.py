"""Healing measured on a compressed output of the default model: held-out perplexity before and after
``compressor heal`` on both held-out domains (sotu 2000-, the speeches; pydoc, Python's reference topics), with
the heal's wall and CPU seconds, written as JSON.

    python scripts/heal_check.py OUT --name lord-20 [--steps 12 --lr 3e-5 --n-samples 48 --batch-size 4]
                                 [--distill] [--dtype bfloat16] [--reuse-before]
                                 [--json results/heal-check.json]

OUT is a compressed output (e.g. ``compressor compress smollm2-135m --recipe lord --out OUT``); the healed copy
goes to a temporary directory. Each command runs in a subprocess of its own; CPU seconds are the children's
user + system. The entry ``NAME`` of the JSON file is replaced, the others kept. Run on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
DOMAINS = ("sotu", "pydoc")


def run(args: list[str]) -> tuple[float, float]:
    """(wall, CPU seconds) of ``compressor ARGS`` in a subprocess; raises on failure."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "compressor", *args], check=True, cwd=ROOT)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def perplexities(model: str, scratch: Path) -> dict[str, float]:
    """Held-out perplexity of ``model`` on each domain (the default protocol: 40,960 tokens, 512-token windows)."""
    result = {}
    for domain in DOMAINS:
        file = scratch / f"eval-{domain}-{len(list(scratch.iterdir()))}.json"
        run(["eval", model, "--dataset", domain, "--json", str(file)])
        result[domain] = round(json.loads(file.read_text())["perplexity"]["value"], 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="a compressed output directory")
    parser.add_argument("--name", required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--n-samples", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--distill", action="store_true", help="heal --distill (KL to the base model)")
    parser.add_argument("--dtype", default="float32", help="heal --dtype")
    parser.add_argument("--reuse-before", action="store_true",
                        help="take the perplexities before healing from an entry of --json with the same output")
    parser.add_argument("--json", type=Path, default=ROOT / "results" / "heal-check.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        healed = scratch / "healed"
        done = json.loads(args.json.read_text()) if args.json.is_file() else {}
        known = [entry["perplexity_before"] for entry in done.values() if entry["output"] == Path(args.output).name]
        before = known[0] if args.reuse_before and known else perplexities(args.output, scratch)
        wall, cpu = run(["heal", args.output, "--out", str(healed), "--steps", str(args.steps), "--lr", str(args.lr),
                         "--n-samples", str(args.n_samples), "--batch-size", str(args.batch_size), "--quiet",
                         "--dtype", args.dtype, *(["--distill"] if args.distill else [])])
        after = perplexities(str(healed), scratch)
        record = json.loads((healed / "compression.json").read_text())["healing"][-1]
    entry = {"output": Path(args.output).name,
             "heal": {k: record[k] for k in ("steps", "tokens", "lr", "batch_size", "seq_len", "n_samples",
                                              "dataset", "held_out_loss_before", "held_out_loss_after")},
             "loss": record.get("loss", "next_token"), "dtype": record.get("dtype", "float32"),
             "heal_wall_seconds": round(wall, 1), "heal_cpu_seconds": round(cpu, 1), "threads": os.cpu_count(),
             "perplexity_before": before, "perplexity_after": after,
             "heldout": {"sotu": "2000- speeches, first 40,960 tokens, 512-token windows",
                         "pydoc": "second half of Python's reference topics, first 40,960 tokens, 512-token windows"},
             "python": f"{sys.version_info.major}.{sys.version_info.minor}"}
    done = json.loads(args.json.read_text()) if args.json.is_file() else {}
    done[args.name] = entry
    args.json.write_text(json.dumps(done, indent=1) + "\n")
    print(json.dumps(entry, indent=1))


if __name__ == "__main__":
    main()
