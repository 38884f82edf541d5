#!/usr/bin/env bash
# Kernel tuning experiment on a GPU machine, from the repository root (not pip-installed; python3 with torch):
# builds the FACD_TILES variants of benchmarks/kernel_tune.py for this GPU's architecture, gates each on correctness against the
# float64 oracle, times forward + backward at N = M = 36864 (fp16, C = 64 and 256) next to naive / SDPA / cuBLAS, and
# names the fastest row per C. About 2-3 minutes; hard limit 280 s (each variant 45 s, a hung one is killed and the
# rest go on). Results in $OUT: run.log, tune_summary.txt (readable), tune.json / tune.jsonl (everything), worker.log.
#   TUNE_ARGS="--only c64-base c64-lazy" benchmarks/kernel_tune.sh     # a subset (names: python3 benchmarks/kernel_tune.py --list)
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
export FACD_KERNEL_CACHE="${FACD_KERNEL_CACHE:-$PWD/build/kernel-cache}"  # writable, outside $OUT
OUT="${OUT:-$PWD/benchmarks-out}"
mkdir -p "$OUT"
LOG="$OUT/run.log"

{
    echo "== environment ($(date -u +%FT%TZ))"
    timeout 20 nvidia-smi -L
    timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
    nvcc --version | tail -n 2
    echo "cpus: $(nproc)"
} 2>&1 | tee "$LOG"

echo "== tune" | tee -a "$LOG"
# --budget: no new worker after 220 s; timeout: the whole run, builds included.
timeout -k 10 280 python3 benchmarks/kernel_tune.py --out "$OUT" --budget 220 --variant-timeout 45 ${TUNE_ARGS:-} 2>&1 |
    tee -a "$LOG"
rc=${PIPESTATUS[0]}
echo "tune exit code: $rc" | tee -a "$LOG"
exit "$rc"
