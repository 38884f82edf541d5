#!/usr/bin/env bash
# The student families side by side on a CPU (issue: a student built for the device): every candidate is distilled
# from the shipped EDSR-baseline x4 teacher with the `pipeline all` recipe (facd, 600 iterations, the config
# defaults), one run directory per candidate and seed, then measured by benchmarks/students_cpu.py.
# tiny_student's three seeds are the distillation study's facd students (benchmarks/results/study_cpu, same recipe
# and teacher); `train tiny` distils them again here when asked. Two lanes of one thread each share two cores.
#
#   bash benchmarks/students_cpu.sh train anchor &    # two lanes: anchor_m and anchor_l, 3 seeds each
#   bash benchmarks/students_cpu.sh train small       # anchor_s, 3 seeds (not run for the committed table)
#   bash benchmarks/students_cpu.sh train tiny        # tiny_student, 3 seeds (optional: the study has them)
#   .venv/bin/python benchmarks/students_cpu.py --runs runs/students --out benchmarks/results/students_cpu
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs/students}
PIPELINE=${PIPELINE:-.venv/bin/pipeline}
distill() {  # preset, seed; an interrupted student is resumed, a finished one skipped
    local run="$RUNS/$1-seed$2" resume=()
    [ -f "$run/student/last.pt" ] && resume=(--resume)
    OMP_NUM_THREADS=1 "$PIPELINE" -q distill --run-dir "$run" "${resume[@]}" --set "model.student=\"$1\"" \
        --set "seed=$2"
}
lane() {  # preset:seed ...
    for item in "$@"; do
        distill "${item%%:*}" "${item##*:}"
    done
}
mkdir -p "$RUNS"
lscpu | grep -E "Model name|Flags" > "$RUNS/cpu.txt"
case "${1:-} ${2:-}" in
    "train anchor")  # each preset's seeds spread over both lanes, so every preset has its first seeds early
        lane anchor_m:0 anchor_m:1 anchor_l:1 > "$RUNS/lane1.log" 2>&1 &
        lane anchor_l:0 anchor_m:2 anchor_l:2 > "$RUNS/lane2.log" 2>&1
        wait
        ;;
    "train small")
        lane anchor_s:0 anchor_s:1 > "$RUNS/lane1.log" 2>&1 &
        lane anchor_s:2 > "$RUNS/lane2.log" 2>&1
        wait
        ;;
    "train tiny")
        lane tiny_student:0 tiny_student:1 tiny_student:2
        ;;
    *)
        echo "usage: $0 train anchor | train small | train tiny   (see the comment at the top)" >&2
        exit 2
        ;;
esac
