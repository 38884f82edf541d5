#!/usr/bin/env bash
# Matched compute on the default student (issue: the study a user would trust): does distillation beat training the
# student longer without a teacher? On the 24-crop eval set (the training images are those of the committed
# 7-photo figures: the 12 the shipped teacher trained on): anchor_m with none, fd, facd and out at `pipeline all`'s 600
# iterations and with none at 4x (a `none` iteration costs about a seventeenth of a `facd` one), cheapest first so
# that an interrupted lane still holds whole comparisons; then 8 seeds where a difference is under 0.05 dB (out - none
# on the validation split; on the 7-photo set it was facd - fd, here fd leads facd by about 0.25 dB); then every
# method at 4x. Every run evaluates on the eval set as it goes (learning curves). Each copy of the script is one lane
# of one thread working down the same list (a run another lane holds is left to it); start one per free core. An
# interrupted run resumes; a finished one is skipped:
#
#   bash benchmarks/matched_cpu.sh & bash benchmarks/matched_cpu.sh &
#   .venv/bin/python benchmarks/matched_cpu.py --runs runs/matched24 --out benchmarks/results/matched_cpu_eval24
#
# benchmarks/results/matched_cpu.* (the 7-photo eval set) came from this script at commit 8761608, whose lanes also
# ran none at 10x and facd with a 0.03 dB gate margin, beside benchmarks/students_cpu.sh's facd and none runs.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs/matched24}
PIPELINE=${PIPELINE:-.venv/bin/pipeline}
run() {  # method, iterations, seed[, gate margin (dB)]
    local margin=${4:-0} dir="$RUNS/$1$([ "${4:-0}" = 0 ] || echo "-m$4")-i$2-seed$3" resume=()
    exec 9> "$dir.lock"
    flock -n 9 || return 0
    [ -f "$dir/student/last.pt" ] && resume=(--resume)
    OMP_NUM_THREADS=1 "$PIPELINE" -q distill --run-dir "$dir" "${resume[@]}" --set 'model.student="anchor_m"' \
        --set "distill.method=\"$1\"" --set "train.iters=$2" --set "train.eval_every=$(($2 / 6))" --set "seed=$3" \
        --set "distill.gate_margin=$margin"
}
mkdir -p "$RUNS"
lscpu | grep -E "Model name|Flags" > "$RUNS/cpu.txt"
{
    for s in 0 1 2; do run none 600 "$s"; done
    for s in 0 1 2; do run fd 600 "$s"; done
    for s in 0 1 2; do run none 2400 "$s"; done
    for s in 0 1 2; do run facd 600 "$s"; done
    for s in 0 1 2; do run out 600 "$s"; done
    for s in 3 4 5 6 7; do run none 600 "$s"; run out 600 "$s"; done  # out - none is under 0.05 dB: 8 seeds
    for m in facd out fd; do run "$m" 2400 0; done  # every method to 4x: learning curves (one seed so far)
} > "$RUNS/lane$$.log" 2>&1
echo ALLDONE >> "$RUNS/lane$$.log"
