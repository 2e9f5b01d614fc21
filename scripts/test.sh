#!/usr/bin/env bash
# The test tiers, in order. Extra arguments go to every pytest call.
#  1. default: reference, CPU path, validation, layers (CPU tensors take the PyTorch path);
#  2. interpret: the Triton kernels on CPU tensors through Triton's interpreter;
#  3. gpu: the full grid, only where CUDA is present.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
export PYTHONDONTWRITEBYTECODE=1
echo "== tier 1: CPU path, reference, validation =="
"$PYTHON" -m pytest -q -p no:warnings "$@"
echo "== tier 2: Triton kernels in the interpreter (TRITON_INTERPRET=1) =="
TRITON_INTERPRET=1 "$PYTHON" -m pytest -q -p no:warnings -m interpret "$@"
if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "== tier 3: GPU =="
  "$PYTHON" -m pytest -q -p no:warnings -m gpu "$@"
fi
