#!/usr/bin/env bash
# Run the seven miniature reproductions with their full settings on the CPU (about 30 min on 2 cores for exps 1-6,
# plus about 12.5 min for exp7).
# Two lanes of one-thread processes, as RESULTS.md was produced:
#   stage 1: exp1 (trains + exports pretrained/*.safetensors)  ||  exp5 (trains its own three FPDMs)
#   stage 2: exp2                                                ||  exp3 -> exp4 -> exp6   (use pretrained/)
#   stage 3: exp7 (trains two FPDMs, then evaluates three; itself runs two 1-thread worker processes, --jobs 2)
# Each script writes experiments/results/<name>.{json,png}; logs go to experiments/results/runs/logs/.
# THREADS=2 (and running the lanes one after the other) is faster only on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
THREADS="${THREADS:-1}"
export OMP_NUM_THREADS="$THREADS"
LOGS=experiments/results/runs/logs
mkdir -p "$LOGS"

run() {  # run <name>: one experiment, logged and timed
    local start=$(date +%s)
    "$PYTHON" -m "experiments.$1" --threads "$THREADS" > "$LOGS/$1.log" 2>&1
    echo "$1: $(( $(date +%s) - start )) s"
}

run exp1_equal_compute & lane_a=$!
run exp5_sjfb & lane_b=$!
wait $lane_a && wait $lane_b

run exp2_table1 & lane_a=$!
(run exp3_smoothing && run exp4_reuse && run exp6_anderson) & lane_b=$!
wait $lane_a && wait $lane_b

run exp7_prepost
"$PYTHON" -m experiments.summarize
