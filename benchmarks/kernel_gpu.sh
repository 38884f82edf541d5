#!/usr/bin/env bash
# One run on a GPU machine, from the repository root (not pip-installed; python3 with torch, pytest, numpy,
# matplotlib): environment, kernel build (timed), GPU + CPU tests, benchmark. Results go to $OUT (5 files):
#   run.log (environment, build, exit codes), gpu_tests.log, bench.log, kernel_bench.json, kernel_memory.png
# Test failures do not stop the benchmark; the script exits non-zero if the tests or the benchmark failed.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
export FACD_KERNEL_CACHE="${FACD_KERNEL_CACHE:-$PWD/build/kernel-cache}"  # writable, outside $OUT
OUT="${OUT:-$PWD/benchmarks-out}"
mkdir -p "$OUT"
LOG="$OUT/run.log"

{
    echo "== environment ($(date -u +%FT%TZ))"
    nvidia-smi -L
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    nvcc --version | tail -n 2
    python3 -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__,
        "| cuda", torch.version.cuda, "|", torch.cuda.get_device_name(), torch.cuda.get_device_capability())'
    echo "== build (all default archs)"
    python3 - <<'EOF'
import time
from kernels.build import build_kernel
start = time.perf_counter()
path = build_kernel(force=True, verbose=True)
print(f"built {path} in {time.perf_counter() - start:.1f} s")
EOF
    echo "build exit code: $?"
} 2>&1 | tee "$LOG"

echo "== tests" | tee -a "$LOG"
timeout 240 python3 -m pytest -q -rs tests/test_kernel_cuda.py tests/test_contrastive.py 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
echo "pytest exit code: $tests_rc" | tee -a "$LOG"

echo "== benchmark" | tee -a "$LOG"
timeout 330 python3 -m kernels.bench --out "$OUT" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
echo "bench exit code: $bench_rc" | tee -a "$LOG"

exit $(( tests_rc != 0 || bench_rc != 0 ))
