#!/usr/bin/env bash
# Matched compute on the default student (issue: the study a user would trust): does distillation beat training the
# student longer without a teacher? `none` at 4x and 10x `pipeline all`'s 600 iterations (a `none` iteration costs
# about a thirtieth of a `facd` one), `out` and `fd` at 600, beside benchmarks/students_cpu.sh's `anchor_m` runs
# (facd and none at 600, seeds 0-2). Every run evaluates on the eval set as it goes (learning curves); one thread
# per lane, two lanes. An interrupted run resumes; a finished one is skipped. Then:
#
#   bash benchmarks/matched_cpu.sh &
#   .venv/bin/python benchmarks/matched_cpu.py --runs runs/students runs/matched --out benchmarks/results/matched_cpu
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs/matched}
PIPELINE=${PIPELINE:-.venv/bin/pipeline}
run() {  # method, iterations, seed
    local dir="$RUNS/$1-i$2-seed$3" resume=()
    [ -f "$dir/student/last.pt" ] && resume=(--resume)
    OMP_NUM_THREADS=1 "$PIPELINE" -q distill --run-dir "$dir" "${resume[@]}" --set 'model.student="anchor_m"' \
        --set "distill.method=\"$1\"" --set "train.iters=$2" --set "train.eval_every=$(($2 / 6))" --set "seed=$3"
}
mkdir -p "$RUNS"
lscpu | grep -E "Model name|Flags" > "$RUNS/cpu.txt"
(for s in 0 1 2; do run none 2400 "$s"; done; for s in 0 1 2; do run none 6000 "$s"; done) > "$RUNS/lane1.log" 2>&1 &
(run out 600 0; run fd 600 0; run out 600 1; run fd 600 1) > "$RUNS/lane2.log" 2>&1
wait
