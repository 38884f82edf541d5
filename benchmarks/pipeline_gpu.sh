#!/usr/bin/env bash
# GPU smoke run of the whole pipeline from the repository root (repo not pip-installed; python3 with torch): teacher
# and FACD student trained on CUDA with bf16 autocast and channels_last (the contrastive loss on the fused kernel),
# then the eval gate. Writes $OUT/pipeline_gpu.log and $OUT/pipeline_gpu_eval.json.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
export FACD_KERNEL_CACHE="${FACD_KERNEL_CACHE:-$PWD/build/kernel-cache}"
OUT="${OUT:-$PWD/benchmarks-out}"
mkdir -p "$OUT"
run_dir=$(mktemp -d)
start=$(date +%s)
timeout "${LIMIT:-240}" python3 -m pipeline all --run-dir "$run_dir" --set train.iters="${ITERS:-600}" --set train.amp='"bf16"' \
    --set train.channels_last=true 2>&1 | tr '\r' '\n' | grep -v '^\s*$' | grep -v 'it/s\]$' | tee "$OUT/pipeline_gpu.log"
rc=${PIPESTATUS[0]}
echo "pipeline all exit code: $rc, $(( $(date +%s) - start )) s" | tee -a "$OUT/pipeline_gpu.log"
grep -h '"contrast"' "$run_dir/student/log.jsonl" | tail -n 2 | tee -a "$OUT/pipeline_gpu.log"
cp "$run_dir/eval.json" "$OUT/pipeline_gpu_eval.json" 2>/dev/null
exit "$rc"
