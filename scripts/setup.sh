#!/usr/bin/env bash
# Make .venv and install flashtron into it (editable). Safe to run again: it skips work already done.
#  - A machine whose python3 already has torch and triton (the GPU machine, offline): the venv sees
#    them (--system-site-packages) and nothing is downloaded or reinstalled.
#  - Anywhere else (a fresh CPU machine): torch 2.13.0 (CPU build) plus the dev pins from pyproject.toml
#    (triton 3.6, numpy<2.3, transformers 5.17.0, pytest, ruff) and matplotlib for the benchmark plots.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.flashtron-setup
want="$(sha1sum pyproject.toml scripts/setup.sh | sha1sum | cut -c1-40)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import flashtron" 2>/dev/null; then
  exit 0
fi
if "$PY" -c "import torch, triton" 2>/dev/null; then
  [ -x .venv/bin/python ] || "$PY" -m venv --system-site-packages .venv
  # offline: no dependency resolution, no build isolation (setuptools comes from the system)
  if ! .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null; then
    site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    echo "$PWD/src" > "$site/flashtron-src.pth"
    printf '#!/bin/sh\nexec "%s" -m flashtron.cli "$@"\n' "$PWD/.venv/bin/python" > .venv/bin/flashtron
    chmod +x .venv/bin/flashtron
  fi
else
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==2.13.0" -e ".[dev,bench]"
fi
echo "$want" > "$stamp"
echo "setup: $(.venv/bin/python -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)')"
