#!/usr/bin/env bash
# Make .venv and install flashtron into it (editable). Safe to run again: it skips work already done.
#  - A machine whose python3 already has torch and triton (the GPU machine, offline): the venv sees
#    them (--system-site-packages) and nothing is downloaded or reinstalled.
#  - Anywhere else: the tested torch, then flashtron with its pins (triton 3.6, numpy<2.3) and the dev
#    and bench extras (transformers 5.17.0, pytest, ruff, matplotlib). Which torch:
#      * Linux without an NVIDIA GPU: torch 2.13.0+cpu, the CPU build asked for by name. It comes from
#        the machine's own pip sources when they hold it (a local wheel, offline), else from PyPI's
#        companion index https://download.pytorch.org/whl/cpu. A plain `torch==2.13.0` would fetch
#        the CUDA build and its multi-GB nvidia wheels.
#      * Linux with an NVIDIA GPU: torch 2.11.0, whose CUDA build pins triton 3.6.0 (2.13's pins
#        3.7.1, which flashtron is not tested with).
#      * Other systems: torch 2.13.0 (PyPI's macOS and Windows builds are CPU builds; no triton).
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
  pip=(.venv/bin/python -m pip install -q)
  "${pip[@]}" --upgrade pip
  if [ "$(uname -s)" != Linux ]; then
    torch_req="torch==2.13.0"
  elif [ -e /proc/driver/nvidia/version ] || nvidia-smi -L >/dev/null 2>&1; then
    torch_req="torch==2.11.0"
  else
    torch_req="torch==2.13.0+cpu"
  fi
  if ! "${pip[@]}" "$torch_req" -e ".[dev,bench]" 2>/dev/null; then
    if [ "$torch_req" = "torch==2.13.0+cpu" ]; then  # not in this machine's pip sources: the CPU index
      "${pip[@]}" "$torch_req" --index-url https://download.pytorch.org/whl/cpu
    fi
    "${pip[@]}" "$torch_req" -e ".[dev,bench]"  # again, with its errors shown
  fi
fi
echo "$want" > "$stamp"
echo "setup: $(.venv/bin/python -c '
import importlib.metadata as m
print(", ".join(f"{p} {m.version(p)}" for p in ("torch", "triton", "numpy") if __import__("importlib.util").util.find_spec(p)))
')"
