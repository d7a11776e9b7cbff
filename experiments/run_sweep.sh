#!/usr/bin/env bash
# The resumable sweep (experiments/sweep.py) in priority order, as two 1-thread workers on a 2-core CPU (WORKERS=n
# for more). Run it again after an interruption: finished jobs are skipped, an interrupted training resumes from its
# last checkpoint (every 500 steps), and jobs a live worker holds are left to it. Then python -m experiments.claims.
#   (a) Table 1 on MNIST-5k (block- and FLOP-matched) and (c) its smoothing / reuse sweep
#   (b) Table 5 at N = 6, 12 and Fig. 7 at 0/1/2/4 pre/post layers on digits, then Table 1 on digits at M = N = 12
#   (d) Table 5 and Fig. 7 on MNIST-5k (only with SWEEP_MNIST5K_ABLATIONS=1: hours of CPU)
# Logs: experiments/results/runs/logs/sweep-worker<i>.log
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
WORKERS="${WORKERS:-2}"
export OMP_NUM_THREADS=1
LOGS=experiments/results/runs/logs
mkdir -p "$LOGS"

worker() {
    "$PYTHON" -m experiments.sweep --experiments table1,smoothing --datasets mnist5k
    "$PYTHON" -m experiments.sweep --experiments table5,prepost --datasets digits
    "$PYTHON" -m experiments.sweep --experiments table1,smoothing --datasets digits
    "$PYTHON" -m experiments.sweep --experiments smoothing --datasets mnist5k  # models the other worker finished
    if [ "${SWEEP_MNIST5K_ABLATIONS:-0}" = 1 ]; then
        "$PYTHON" -m experiments.sweep --experiments table5,prepost --datasets mnist5k
    fi
}

pids=()
for i in $(seq 1 "$WORKERS"); do
    worker >> "$LOGS/sweep-worker$i.log" 2>&1 &
    pids+=($!)
    sleep 5  # let each worker claim its first job before the next one looks
done
for pid in "${pids[@]}"; do wait "$pid"; done
"$PYTHON" -m experiments.claims
