"""Refactor check: every shipped recipe on tiny random models of five architectures, outputs compared
bit for bit against a saved run.

    python scripts/golden.py save  [--dir DIR]    # run every (recipe, arch) and keep the outputs
    python scripts/golden.py check [--dir DIR]    # run again and compare with the saved outputs
    python scripts/golden.py save --only 'lord|modegpt'  # only the runs whose name (arch/run) matches, the
                                                         # file's other runs kept

Kept per run: every tensor of the written checkpoint (model and adapter), the logits of the reloaded
model on fixed ids, and the per-module ranks of the log. DIR defaults to the user's cache
(``~/.cache/compressor/golden``); nothing is written into the checkout. Exit status 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402

ARCHS = ("llama", "qwen2", "mistral", "opt", "gpt2")
# tiny models have 3 layers (CURing never touches the first or last) and 64-wide linears
TINY = {"curing": ["curing.n_layers=1"], "eora": ["eora.rank=8"], "lqlora": ["lqlora.rank=8"]}
# paths the shipped recipes do not take: (label, shipped recipe, overrides)
VARIANTS = [
    ("lord-activation-original", "lord-svd-llm", ["lord.whiten=activation", "propagate=original"]),
    ("lord-gram-welore-rule", "lord-svd-llm", ["lord.rank_rule=welore"]),
    ("lord-model-ratio", "lord-svd-llm", ["lord.model_ratio=0.1"]),
    ("curing-walk-covariance", "curing", ["curing.statistics=walk", "curing.score=covariance"]),
    ("gptq-per-step", "gptq-w4-eora-r64", ["statistics=per_step", "eora.space=weight"]),
    ("welore-ratio", "welore-50", ["welore.ratio=0.1"]),
]


def run_all(root: Path, only: str | None = None) -> dict[str, dict[str, torch.Tensor]]:
    import conftest
    from safetensors.torch import load_file

    import compressor
    from compressor.plan.recipe import shipped

    torch.set_num_threads(1)
    conftest.LAYERS = 3
    tokenizer = conftest.build_tokenizer()
    text = root / "speech.txt"
    text.write_text(conftest._speech_texts(1)[0][:20000])
    ids = tokenizer("The state of our union is strong. " * 6, return_tensors="pt")["input_ids"][:, :40]
    results = {}
    for arch in ARCHS:
        model_dir = root / arch
        conftest.build_model(arch, len(tokenizer)).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        runs = [(name, name, []) for name in sorted(shipped())] + VARIANTS
        for name, recipe, variant in runs:
            if only is not None and not re.search(only, f"{arch}/{name}"):
                continue
            overrides = [*conftest.SMALL_CALIBRATION, f"calibration.dataset={text}"]
            for method, extra in TINY.items():
                if f"method: {method}" in shipped()[recipe].read_text():
                    overrides += extra
            out = root / f"{arch}-{name}"
            try:
                compressor.compress(str(model_dir), recipe, out, overrides=overrides + variant, progress=False)
            except compressor.CompressorError as exc:  # a recipe's targets absent from this architecture
                if "match none" not in str(exc):
                    raise
                results[f"{arch}/{name}"] = {"refused: targets match nothing": torch.ones(1)}
                print(f"{arch}/{name}: refused (targets match nothing)", flush=True)
                continue
            tensors = {}
            for file in sorted(out.rglob("*.safetensors")):
                for key, value in load_file(str(file)).items():
                    tensors[f"{file.relative_to(out)}:{key}"] = value
            with torch.no_grad():
                tensors["logits"] = compressor.load(out)(input_ids=ids, use_cache=False).logits
            log = [json.loads(line) for line in (out / "compression_log.jsonl").read_text().splitlines()]
            tensors["ranks"] = torch.tensor([-1 if e.get("rank") is None else e["rank"] for e in log])
            results[f"{arch}/{name}"] = tensors
            print(f"{arch}/{name}: {len(tensors)} tensors", flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["save", "check"])
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "compressor" / "golden"
    parser.add_argument("--dir", type=Path, default=cache)
    parser.add_argument("--only", help="a regular expression: only the runs (arch/run) it finds; check compares "
                        "those alone")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = run_all(Path(tmp), args.only)
    file = args.dir / "golden.pt"
    if args.mode == "save":
        args.dir.mkdir(parents=True, exist_ok=True)
        kept = torch.load(file) if args.only is not None and file.is_file() else {}  # --only updates those runs
        merged = {**kept, **results}
        torch.save(merged, file)
        print(f"saved {len(results)} runs to {file} ({len(merged)} in all)")
        return 0
    saved = torch.load(file)
    if args.only is not None:
        saved = {run: tensors for run, tensors in saved.items() if re.search(args.only, run)}
    bad = 0
    for run in sorted(set(saved) | set(results)):
        old, new = saved.get(run), results.get(run)
        if old is None or new is None:
            print(f"{run}: only in {'new' if old is None else 'saved'}")
            bad += 1
            continue
        for key in sorted(set(old) | set(new)):
            a, b = old.get(key), new.get(key)
            if a is None or b is None or a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b):
                diff = (a.double() - b.double()).abs().max().item() if a is not None and b is not None \
                    and a.shape == b.shape else "shape/presence"
                print(f"{run} {key}: differs ({diff})")
                bad += 1
    print(f"{len(results)} runs compared, {bad} differences")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
