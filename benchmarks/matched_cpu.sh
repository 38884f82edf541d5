#!/usr/bin/env bash
# Matched compute on the default student (issue: the study a user would trust): does distillation beat training the
# student longer without a teacher? On the 24-crop eval set, anchor_m from the shipped teacher. In order, so that an
# interrupted lane still holds whole comparisons: seeds 3-7 of out and none at `pipeline all`'s 600 iterations (with
# benchmarks/students_cpu.sh's seeds 0-2, 8 seeds where the difference is under 0.05 dB); none at 4x and 6x; facd;
# out at 4x; the lambda_out grid beyond its default 3; the gate at a margin that closes a quarter of the patches;
# none at 10x (about out's wall clock at 600: a `none` iteration costs about a tenth of an `out` one); out at 4x on
# seeds 1-2; fd; fd and facd at 4x; the fd and facd weights beyond their defaults; 8 seeds of lambda_out 10 (under
# 0.05 dB from 3); 8 seeds of the gate margin and facd (under 0.05 dB apart); fd, then facd, at 4x on seeds 1-2. Every
# run evaluates on the eval set as it goes (learning curves).
# Each copy of the script is one lane of one thread working down the same list (a run another lane holds is left to
# it); start one per free core. An interrupted run resumes; a finished one is skipped, and so is one the committed
# results ($RECORDED) already hold, whose folder a fresh checkout no longer has (matched_cpu.py reads its record):
#
#   bash benchmarks/matched_cpu.sh & bash benchmarks/matched_cpu.sh &
#   .venv/bin/python benchmarks/matched_cpu.py --runs runs/matched24 runs/students24 \
#       --out benchmarks/results/matched_cpu_eval24 --recorded benchmarks/results/matched_cpu_eval24.json
#
# benchmarks/results/matched_cpu.* (the 7-photo eval set) came from this script at commit 8761608, whose lanes also
# ran none at 10x and facd with a 0.03 dB gate margin, beside benchmarks/students_cpu.sh's facd and none runs.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs/matched24}
PIPELINE=${PIPELINE:-.venv/bin/pipeline}
PYTHON=${PYTHON:-.venv/bin/python}
RECORDED=${RECORDED:-benchmarks/results/matched_cpu_eval24.json}
run() {  # tag, iterations, seed, then `--set` overrides (KEY=VALUE) beyond method, iterations and seed
    local tag=$1 iters=$2 seed=$3 dir="$RUNS/$1-i$2-seed$3" resume=() sets=() kv
    shift 3
    for kv in "$@"; do sets+=(--set "distill.$kv"); done
    grep -qF "\"run\": \"$dir\"" "$RECORDED" 2>/dev/null && return 0
    exec 9> "$dir.lock"
    flock -n 9 || return 0
    [ -f "$dir/student/last.pt" ] && resume=(--resume)
    mkdir -p "$dir"  # the CPU of every start: matched_cpu.py times a run on the CPU it trained on
    "$PYTHON" -c 'import json; from pipeline.machine import machine; print(json.dumps(machine()))' \
        >> "$dir/machine.jsonl"
    OMP_NUM_THREADS=1 "$PIPELINE" -q distill --run-dir "$dir" "${resume[@]}" --set 'model.student="anchor_m"' \
        --set "distill.method=\"${tag%%-*}\"" --set "train.iters=$iters" --set "train.eval_every=$((iters / 6))" \
        --set "seed=$seed" "${sets[@]}"
}
mkdir -p "$RUNS"
{
    for s in 3 4 5 6 7; do run none 600 "$s"; run out 600 "$s"; done  # out - none is under 0.05 dB: 8 seeds
    for s in 0 1 2; do run none 2400 "$s"; done
    run facd 600 0
    run out 2400 0
    for s in 0 1 2; do run none 3600 "$s"; done  # about out's wall clock at 600
    for s in 0 1 2; do run out-lo10 600 "$s" lambda_out=10; done  # the weight grid beyond the default 3
    for s in 1 2; do run facd 600 "$s"; done
    # The gate at a margin that closes a quarter of the training patches (benchmarks/gate_margin.py on facd's seed 0:
    # benchmarks/results/gate_margin_anchor_m.json).
    margin=0.34
    for s in 0 1 2; do run "facd-m$margin" 600 "$s" gate_margin="$margin"; done
    for s in 0 1 2; do run none 6000 "$s"; done  # about the wall clock of out at 600
    for s in 1 2; do run out 2400 "$s"; done
    for s in 0 1 2; do run fd 600 "$s"; done
    for m in fd facd; do run "$m" 2400 0; done  # every method to 4x: learning curves
    for s in 0 1 2; do run fd-lf10 600 "$s" lambda_fd=10; done  # the feature weights beyond their defaults
    for s in 0 1 2; do run facd-lc1 600 "$s" lambda_facd=1; done
    for s in 3 4 5 6 7; do run out-lo10 600 "$s" lambda_out=10; done  # 10 - 3 is under 0.05 dB: 8 seeds
    for s in 3 4 5 6 7; do  # the margin's effect is under 0.05 dB: 8 seeds
        run facd 600 "$s"; run "facd-m$margin" 600 "$s" gate_margin="$margin"
    done
    for m in fd facd; do for s in 1 2; do run "$m" 2400 "$s"; done; done
} > "$RUNS/lane$$.log" 2>&1
echo ALLDONE >> "$RUNS/lane$$.log"
