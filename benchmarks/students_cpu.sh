#!/usr/bin/env bash
# The student families side by side on a CPU (issue: a student built for the device): every candidate is distilled
# from the shipped EDSR-baseline x4 teacher with the `pipeline all` recipe (facd, 600 iterations, the config
# defaults), one run directory per candidate and seed, then measured by benchmarks/students_cpu.py.
# `<preset>+none-seed<k>`: the same students trained without distillation (about a minute each), the comparison a
# user makes before paying for a teacher. tiny_student's seeds 1 and 2 are the distillation study's facd students
# (benchmarks/results/study_cpu, same recipe and teacher; FP32 Y-PSNR only). Two lanes of one thread each share two
# cores (about an hour).
#
#   bash benchmarks/students_cpu.sh train &    # anchor_m seeds 0-2, anchor_l and anchor_s seeds 0-1, tiny seed 0
#   .venv/bin/python benchmarks/students_cpu.py --runs runs/students --out benchmarks/results/students_cpu
#
# The latency columns alone on another CPU (one `none` student per shape, a few minutes in all):
#
#   RUNS=runs/avx2 bash benchmarks/students_cpu.sh timing
#   .venv/bin/python benchmarks/students_cpu.py --runs runs/avx2 --latency-only --out benchmarks/results/students_cpu_avx2
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs/students}
PIPELINE=${PIPELINE:-.venv/bin/pipeline}
distill() {  # preset, seed[, method]; an interrupted student is resumed, a finished one skipped
    local method=${3:-facd}
    local run="$RUNS/$1$([ "$method" = facd ] || echo "+$method")-seed$2" resume=()
    [ -f "$run/student/last.pt" ] && resume=(--resume)
    OMP_NUM_THREADS=1 "$PIPELINE" -q distill --run-dir "$run" "${resume[@]}" --set "model.student=\"$1\"" \
        --set "seed=$2" --set "distill.method=\"$method\""
}
lane() {  # preset:seed[:method] ...
    local item
    for item in "$@"; do
        IFS=: read -r preset seed method <<< "$item"
        distill "$preset" "$seed" "$method"
    done
}
mkdir -p "$RUNS"
lscpu | grep -E "Model name|Flags" > "$RUNS/cpu.txt"
case "${1:-}" in
    train)  # the committed table's students over both lanes, anchor_m's three seeds first
        lane anchor_m:0 anchor_m:2 tiny_student:0 anchor_s:0 > "$RUNS/lane1.log" 2>&1 &
        lane anchor_m:1 anchor_l:0 anchor_l:1 anchor_s:1 > "$RUNS/lane2.log" 2>&1
        wait
        lane anchor_m:0:none anchor_m:1:none anchor_m:2:none > "$RUNS/lane3.log" 2>&1  # the default without a teacher
        ;;
    timing)  # one student per shape, for students_cpu.py --latency-only
        lane anchor_l:0:none anchor_m:0:none anchor_s:0:none tiny_student:0:none > "$RUNS/timing.log" 2>&1
        ;;
    *)
        echo "usage: $0 train|timing   (see the comment at the top)" >&2
        exit 2
        ;;
esac
