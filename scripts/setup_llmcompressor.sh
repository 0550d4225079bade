#!/usr/bin/env bash
# The virtual environment for the speed suite's peer row (scripts/peer_llmcompressor.py): llm-compressor in
# .venv-llmc beside the project's .venv (idempotent). It pins transformers and compressed-tensors versions of
# its own, so it cannot share .venv. torch==2.13.0 goes in first and a constraints file keeps it: pip never
# replaces it with another build.
#   LLMC   the llmcompressor release (default 0.14.0.1: torch >=2.10,<=2.14.0, transformers 5.15-5.17)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LLMC=${LLMC:-0.14.0.1}
VENV=${VENV:-.venv-llmc}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --quiet)
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
"${pip[@]}" install torch==2.13.0
# the build just installed (2.13.0+cpu here, 2.13.0 with CUDA where that is the wheel found), kept as it is
"$VENV/bin/python" -c 'import torch; print("torch==" + torch.__version__)' > "$constraints"
"${pip[@]}" install -c "$constraints" "llmcompressor==$LLMC"
"$VENV/bin/python" - <<'PY'
import torch
from importlib.metadata import version
assert torch.__version__.startswith("2.13.0"), torch.__version__
print(f"ready: llmcompressor {version('llmcompressor')}, compressed-tensors {version('compressed-tensors')}, "
      f"transformers {version('transformers')}, torch {torch.__version__}")
PY
