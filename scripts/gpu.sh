#!/usr/bin/env bash
# One device call: the GPU test tier, then the benchmark. A short summary prints last; full logs and
# results go under $OUT. Usage (device tool): bash scripts/gpu.sh [bench args...]  (default: --quick)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cudnn', torch.backends.cudnn.version())" | tee -a "$OUT/device.txt"
# Compiled kernels land in the repo, so `tar` can bring them back and a later call can carry them.
export TRITON_CACHE_DIR="$PWD/.triton-cache"
# DIAG=1: sweep the backward tiles (scripts/diag_bwd.py): correctness alongside the tests, timing after.
[ "${DIAG:-0}" = 1 ] && { timeout 420 python3 scripts/diag_bwd.py check > "$OUT/diag-check.log" 2>&1 & }
TESTS=${GPU_TESTS:-tests}
# xdist: each kernel configuration compiles for ~20 s on one core; 12 workers compile in parallel.
# -v to the log so a run cut short still shows which tests passed and failed.
timeout "${TEST_TIMEOUT:-400}" python3 -m pytest -m gpu -v -p no:warnings -n "${WORKERS:-12}" -rfE --tb=short $TESTS \
  > "$OUT/gpu-tests.log" 2>&1
test_rc=$?
grep -E "^(FAILED|ERROR)" "$OUT/gpu-tests.log" | head -40
if [ "${DIAG:-0}" = 1 ]; then
  wait
  python3 scripts/diag_bwd.py time > "$OUT/diag-time.log" 2>&1
  echo "---- backward tile sweep"; cat "$OUT/diag-check.log" "$OUT/diag-time.log"
fi
bench_rc=skipped
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  python3 -m flashtron.cli bench ${@:---quick} --out "$OUT/bench" 2>"$OUT/bench-progress.log" | tee "$OUT/bench.log"
  bench_rc=${PIPESTATUS[0]}
  tar czf "$OUT/bench.tgz" -C "$OUT" bench && rm -rf "$OUT/bench"
fi
# SAVE_CACHE=1: bring the compiled kernels back (carry .triton-cache next time to skip recompiling).
[ "${SAVE_CACHE:-0}" = 1 ] && tar cf - .triton-cache | xz -T8 -3 | split -b 15M - "$OUT/triton-cache.tar.xz."
echo "================ summary ================"
cat "$OUT/device.txt"
echo "gpu tests: $(grep -E '(passed|failed|error)' "$OUT/gpu-tests.log" | tail -1) (exit $test_rc)"
echo "bench: exit $bench_rc"
