#!/usr/bin/env bash
# One device call: the GPU work in phases, a short summary last, full logs and results under $OUT.
#   PHASES (default "tests,bench"), comma-separated; they run in this order, whatever order is given:
#     fa4    make FlashAttention-4 importable for the bench (scripts/fa4_peer.sh install; carry .fa4b,
#            after a call that ran `bash scripts/fa4_peer.sh stash` with .fa4a on the same warm machine)
#     serial pytest -m gpu on SERIAL_TESTS, one process, CUDA_LAUNCH_BLOCKING=1, long tracebacks
#            SERIAL_TIMEOUT=s
#     tune   (1) scripts/tune.py check, started alongside the tests   TUNE_TIMEOUT=s TUNE_WORKERS=n
#     tests  pytest -m gpu (xdist, -v log)          GPU_TESTS=paths  TEST_TIMEOUT=s  WORKERS=n
#            PER_TEST_TIMEOUT=s (pytest-timeout: a stuck test fails on its own instead of ending the run)
#            GPU_MARK="gpu and smoke" runs the quick subset; then pytest -m gpu_big alone (BIG=0 skips it)
#     tune   (2) scripts/tune.py time on the idle GPU   TUNE_TIME_TIMEOUT=s; TUNE_ONLY="kind:d,..."
#     paged  scripts/tune.py paged: paged decode against contiguous, by extra pipeline stages
#            PAGED_TIMEOUT=s
#     diag   scripts/diag_compile.py: compiled vs eager GPT step, one op at a time on its PyTorch path
#            DIAG_TIMEOUT=s
#     demo   flashtron train-demo on the GPU        DEMO_ARGS="..."  DEMO_TIMEOUT=s
#     bench  flashtron bench "$@" (default --quick)
#   SAVE_CACHE=1 brings the compiled kernels back (carry .triton-cache next time to skip compiling).
# Usage (device tool): PHASES=tests,tune,demo bash scripts/gpu.sh [bench args...]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
PHASES=",${PHASES:-tests,bench},"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export TRITON_CACHE_DIR="$PWD/.triton-cache"
has() { [[ "$PHASES" == *",$1,"* ]]; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cudnn', torch.backends.cudnn.version())" | tee -a "$OUT/device.txt"
date -u +%FT%TZ | tee -a "$OUT/device.txt"
summary=()

if has fa4; then
  source scripts/fa4_peer.sh install > "$OUT/fa4.log" 2>&1  # no pipe: it exports PYTHONPATH into this shell
  tail -3 "$OUT/fa4.log"
  summary+=("fa4: $(python3 -c 'import flash_attn.cute.interface; print("importable")' 2>&1 | tail -1)")
fi

if has serial; then  # failures with their full messages: a crashed xdist worker loses them
  CUDA_LAUNCH_BLOCKING=1 timeout "${SERIAL_TIMEOUT:-150}" python3 -m pytest -m gpu -p no:warnings -n 0 -rfE \
    --tb=long $SERIAL_TESTS > "$OUT/serial-tests.log" 2>&1
  serial_rc=$?
  summary+=("serial tests: $(tail -1 "$OUT/serial-tests.log") (exit $serial_rc)")
  grep -E "^E |Error|error:" "$OUT/serial-tests.log" | head -30
fi

# tests and the tune check share the GPU (correctness only); each compiles on its own cores
if has tune; then
  timeout "${TUNE_TIMEOUT:-300}" python3 scripts/tune.py check --workers "${TUNE_WORKERS:-4}" > "$OUT/tune-check.log" 2>&1 &
  tune_pid=$!
fi
if has tests; then
  per_test=()
  python3 -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout "${PER_TEST_TIMEOUT:-300}")
  start=$(date +%s)
  timeout "${TEST_TIMEOUT:-470}" python3 -m pytest -m "${GPU_MARK:-gpu}" -v -p no:warnings -n "${WORKERS:-14}" -rfE \
    --tb=short --durations=40 "${per_test[@]}" --junitxml="$OUT/gpu-tests.xml" ${GPU_TESTS:-tests} \
    > "$OUT/gpu-tests.log" 2>&1
  test_rc=$?
  grep -E "^(FAILED|ERROR)" "$OUT/gpu-tests.log" | cut -c1-300 | head -40
  sed -n '/Triton compiles/,/^=/p' "$OUT/gpu-tests.log" | head -12
  summary+=("gpu tests wall: $(($(date +%s) - start)) s")
  if [ "${BIG:-1}" = 1 ]; then  # ~40 GB each: alone, after the tier
    timeout "${BIG_TIMEOUT:-120}" python3 -m pytest -m gpu_big -v -p no:warnings -n 0 -rfE --tb=short \
      ${GPU_TESTS:-tests} > "$OUT/gpu-big-tests.log" 2>&1
    big_rc=$?
    grep -E "^(FAILED|ERROR)" "$OUT/gpu-big-tests.log" | cut -c1-300
    summary+=("gpu_big tests: $(grep -E '(passed|failed|error)' "$OUT/gpu-big-tests.log" | tail -1) (exit $big_rc)")
  fi
  summary+=("gpu tests: $(grep -E '(passed|failed|error)' "$OUT/gpu-tests.log" | tail -1) (exit $test_rc)")
fi
if has tune; then
  wait "$tune_pid"
  check_rc=$?
  summary+=("tune check: $(grep -c ' ok ' "$OUT/tune-check.log") ok, $(grep -c ' BAD ' "$OUT/tune-check.log") bad (exit $check_rc)")
  timeout "${TUNE_TIME_TIMEOUT:-200}" python3 scripts/tune.py time > "$OUT/tune-time.log" 2>&1
  summary+=("tune time: exit $?")
  grep " BAD " "$OUT/tune-check.log" | cut -c1-200
  cat "$OUT/tune-time.log"
fi
if has paged; then
  timeout "${PAGED_TIMEOUT:-150}" python3 scripts/tune.py paged > "$OUT/paged.log" 2>&1
  summary+=("paged sweep: exit $?")
  grep -E "^(paged|contiguous)" "$OUT/paged.log"
fi
if has diag; then
  timeout "${DIAG_TIMEOUT:-200}" python3 scripts/diag_compile.py > "$OUT/diag-compile.log" 2>&1
  summary+=("diag compile: exit $?")
  grep -E "^(tf32|pytorch path)" "$OUT/diag-compile.log"
fi
if has demo; then
  timeout "${DEMO_TIMEOUT:-150}" python3 -m flashtron.cli train-demo ${DEMO_ARGS:-} --out "$OUT/train-demo.md" \
    > "$OUT/train-demo.log" 2>&1
  summary+=("train-demo: exit $?")
  cat "$OUT/train-demo.md" 2>/dev/null || tail -20 "$OUT/train-demo.log"
fi
if has bench; then
  python3 -m flashtron.cli bench ${@:---quick} --out "$OUT/bench" 2>"$OUT/bench-progress.log" | tee "$OUT/bench.log"
  summary+=("bench: exit ${PIPESTATUS[0]}")
  tar czf "$OUT/bench.tgz" -C "$OUT" bench && rm -rf "$OUT/bench"
fi
[ "${SAVE_CACHE:-0}" = 1 ] && tar cf - .triton-cache | xz -T8 -3 | split -b 15M - "$OUT/triton-cache.tar.xz."
echo "================ summary ================"
cat "$OUT/device.txt"
printf '%s\n' "${summary[@]}"
