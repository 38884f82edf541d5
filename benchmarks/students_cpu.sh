#!/usr/bin/env bash
# The student families side by side on a CPU (issue: a student built for the device): every candidate is distilled
# from the shipped EDSR-baseline x4 teacher with the `pipeline all` recipe (the config defaults: out, 600
# iterations), one run directory per candidate and seed, then measured by benchmarks/students_cpu.py.
# `<preset>+none-seed<k>`: the same students trained without distillation (about a minute each), the comparison a
# user makes before paying for a teacher. Two lanes of one thread each share two cores (about an hour).
#
#   bash benchmarks/students_cpu.sh train &    # every candidate, seeds 0-2
#   .venv/bin/python benchmarks/students_cpu.py --runs runs/students --out benchmarks/results/students_cpu_eval24
#
# benchmarks/results/students_cpu.* (the 7-photo eval set, Xeon) came from this script at commit 8761608, with the
# recipe of then (facd); tiny_student's seeds 1 and 2 there are the distillation study's facd students.
#
# The latency columns alone on another CPU (one `none` student per shape, a few minutes in all):
#
#   RUNS=runs/avx2 bash benchmarks/students_cpu.sh timing
#   .venv/bin/python benchmarks/students_cpu.py --runs runs/avx2 --latency-only --out benchmarks/results/students_cpu_avx2
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs/students}
PIPELINE=${PIPELINE:-.venv/bin/pipeline}
distill() {  # preset, seed[, method (default: the config's)]; an interrupted student is resumed, a finished one skipped
    local method=${3:-}
    local run="$RUNS/$1${method:++$method}-seed$2" resume=() extra=()
    [ -f "$run/student/last.pt" ] && resume=(--resume)
    [ -n "$method" ] && extra=(--set "distill.method=\"$method\"")
    OMP_NUM_THREADS=1 "$PIPELINE" -q distill --run-dir "$run" "${resume[@]}" --set "model.student=\"$1\"" \
        --set "seed=$2" "${extra[@]}"
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
        lane anchor_m:0 anchor_m:1 anchor_m:2 anchor_s:0 anchor_s:1 anchor_s:2 > "$RUNS/lane1.log" 2>&1 &
        lane anchor_m:0:none anchor_m:1:none anchor_m:2:none tiny_student:0 tiny_student:1 tiny_student:2 \
            anchor_l:0 anchor_l:1 anchor_l:2 > "$RUNS/lane2.log" 2>&1
        wait
        ;;
    timing)  # one student per shape, for students_cpu.py --latency-only
        lane anchor_l:0:none anchor_m:0:none anchor_s:0:none tiny_student:0:none > "$RUNS/timing.log" 2>&1
        ;;
    *)
        echo "usage: $0 train|timing   (see the comment at the top)" >&2
        exit 2
        ;;
esac
