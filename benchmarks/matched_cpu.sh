#!/usr/bin/env bash
# Matched compute on the default student (issue: the study a user would trust): does distillation beat training the
# student longer without a teacher? `none` at 4x and 10x `pipeline all`'s 600 iterations (a `none` iteration costs
# about a seventeenth of a `facd` one), `out` and `fd` at 600, facd with a gate margin, beside benchmarks/students_cpu.sh's `anchor_m` runs
# (facd and none at 600, seeds 0-2). Every run evaluates on the eval set as it goes (learning curves); one thread
# per lane, two lanes. An interrupted run resumes; a finished one is skipped. Then:
#
#   bash benchmarks/matched_cpu.sh &
#   .venv/bin/python benchmarks/matched_cpu.py --runs runs/students runs/matched --out benchmarks/results/matched_cpu
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs/matched}
PIPELINE=${PIPELINE:-.venv/bin/pipeline}
run() {  # method, iterations, seed[, gate margin (dB)]
    local margin=${4:-0} dir="$RUNS/$1$([ "${4:-0}" = 0 ] || echo "-m$4")-i$2-seed$3" resume=()
    [ -f "$dir/student/last.pt" ] && resume=(--resume)
    OMP_NUM_THREADS=1 "$PIPELINE" -q distill --run-dir "$dir" "${resume[@]}" --set 'model.student="anchor_m"' \
        --set "distill.method=\"$1\"" --set "train.iters=$2" --set "train.eval_every=$(($2 / 6))" --set "seed=$3" \
        --set "distill.gate_margin=$margin"
}
mkdir -p "$RUNS"
lscpu | grep -E "Model name|Flags" > "$RUNS/cpu.txt"
# The gate at a margin of 0.03 dB: the 25th percentile of the final anchor_m students' per-patch teacher advantage
# on the validation probe (0.024 / 0.039 / 0.032 dB for seeds 0-2), so it closes about a quarter of the patches.
(for s in 0 1 2; do run none 2400 "$s"; done; for s in 0 1 2; do run none 6000 "$s"; done; run facd 600 2 0.03) \
    > "$RUNS/lane1.log" 2>&1 &
(run out 600 0; run fd 600 0; run out 600 1; run fd 600 1; run facd 600 0 0.03; run facd 600 1 0.03) \
    > "$RUNS/lane2.log" 2>&1
wait
