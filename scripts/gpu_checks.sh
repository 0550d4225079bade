#!/usr/bin/env bash
# The GPU figures (issue 31), one call of a lent GPU machine (the `device` tool runs it in the repository root;
# results come back under $OUT):
#   1. the speed suite (scripts/bench.py --suite speed) with --device cuda, fp32 then bf16;
#   2. llm-compressor's GPTQ beside ours (the suite's peer row), where .venv-llmc exists (it cannot be installed
#      there: no network; the suite records it as skipped otherwise);
#   3. a random Llama of Llama-3.2-1B's width (scripts/bench_memory.py's, 8 layers) compressed with LoRD-gram
#      and GPTQ on the GPU.
# Each part has its own time limit (PART_S seconds, default 150) and writes its JSON as it goes; a failed or cut
# part is recorded in $OUT/gpu-checks.json and the next one runs. The suites resume from results/gpu/, so a
# second call continues where a cut one stopped.
#   --smoke: the same path on the CPU with a tiny random Llama (hidden 256, 2 layers) and a small protocol, in
#            a few minutes on 2 cores (tests/test_gpu_checks.py runs it in the default test run).
# Usage: OUT=/tmp/out scripts/gpu_checks.sh [--smoke]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || { scripts/setup.sh && PYTHON=.venv/bin/python; }
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
status=()  # "part: ok | failed (rc N)" for each part

part() {  # part NAME COMMAND...: run with a time limit; record how it ended, never stop the script
  local name=$1 rc=0
  shift
  timeout --kill-after=10 "${PART_S:-150}" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
  status+=("\"$name\": \"$([ "$rc" = 0 ] && echo ok || echo "failed (rc $rc$([ "$rc" = 124 ] && echo ': time limit'))")\"")
}

if [ "${1:-}" = "--smoke" ]; then
  device=cpu
  model=$("$PYTHON" scripts/bench_memory.py --hidden 256 --layers 2 --checkpoint-only | tail -1)
  speed=(--smoke --model "$model" --no-dense --only plain-forward lord gptq-w4-g64-act-order
         llmcompressor-gptq-w4-g64-act-order)
  contention=(--contention gptq-w4-g64-act-order)  # the first dtype only
  second=(--smoke --model "$model" --no-dense --only plain-forward gptq-w4-g64-act-order)  # bf16: the dtype's path
  memory=(--hidden 256 --layers 2 --dtype float32)
else
  device=cuda
  speed=(--resume)
  second=("${speed[@]}")
  contention=()
  memory=(--layers 8 --dtype bfloat16)
fi
for dtype in float32 bfloat16; do
  json=bench-speed-$device-$dtype.json
  if [ "$device" = cuda ] && [ -f "results/gpu/$json" ]; then cp "results/gpu/$json" "$OUT/"; fi
  part "speed-$dtype" "$PYTHON" scripts/bench.py --suite speed --device "$device" --dtype "$dtype" \
    --out "$OUT/$json" "${speed[@]}" ${contention[@]+"${contention[@]}"}
  contention=()
  speed=("${second[@]}")
done
part memory-1b-width "$PYTHON" scripts/bench_memory.py --recipes lord-lean gptq --device "$device" \
  --out "$OUT/bench-memory-$device.json" "${memory[@]}"
(IFS=,; echo "{\"device\": \"$device\", \"parts\": {${status[*]}}}") > "$OUT/gpu-checks.json"
cat "$OUT/gpu-checks.json"
