#!/usr/bin/env bash
# The device checks that this project's CPU machine is too slow for, as one short script for a lent GPU
# (the `device` tool runs it in the repository root; results come back under $OUT):
#   the LQ-LoRA suite (issue 12) and the quant suite re-run (issue 10) with compression on CUDA.
# Each suite resumes from its JSON, so a run cut by the time limit continues on the next call.
# Usage: OUT=/tmp/out scripts/gpu_checks.sh [lqlora|quant ...]   (default: lqlora)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
[ -x .venv/bin/python ] || scripts/setup.sh
export HF_HUB_OFFLINE=1
for suite in "${@:-lqlora}"; do
  [ -f "results/gpu/bench-$suite.json" ] && cp "results/gpu/bench-$suite.json" "$OUT/" || true
  .venv/bin/python scripts/bench.py --suite "$suite" --no-speed --resume --device cuda \
    --out "$OUT/bench-$suite.json"
done
