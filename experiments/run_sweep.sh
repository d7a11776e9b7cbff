#!/usr/bin/env bash
# The resumable sweep (experiments/sweep.py) in priority order, as two 1-thread workers on a 2-core CPU (WORKERS=n
# for more). Run it again after an interruption: finished jobs are skipped, an interrupted training resumes from its
# last checkpoint (every 200 steps), and jobs a live worker holds are left to it. Then python -m experiments.claims.
# OUT_DIR (default experiments/results) receives the results: run the workers from a snapshot of the code (a git
# worktree) with OUT_DIR pointing at the checkout being edited, so edits never reach a running sweep.
#   (new) the training-compute frontier and the implicit gradients (issue 31): digits at 268k units per image
#       (FPDM, DiT-4 first), the phantom / IFT gradients at 67k, then DiT-8 at 268k, 537k, MNIST-5k at 134k, the
#       rest of the frontier, and the MNIST-5k ablations (Table 5, Fig. 7 seeds 1-2)
#   (0) the depth experiment (Table 1 at the paper's depth ratio) on digits, then on MNIST-5k, and its smoothing;
#       then depth_compute on digits (24k and 134k units per image)
#   (a) Table 1 on MNIST-5k (block- and FLOP-matched) and (c) its smoothing / reuse sweep
#   (b) Table 5 at N = 6, 12 and Fig. 7 at 0/1/2/4 pre/post layers on digits, then Table 1 on digits at M = N = 12
# Logs: experiments/results/runs/logs/sweep-worker<i>.log
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
WORKERS="${WORKERS:-2}"
export OMP_NUM_THREADS=1
OUT_DIR="${OUT_DIR:-experiments/results}"
LOGS="$OUT_DIR/runs/logs"
mkdir -p "$LOGS"

# A failed sweep (e.g. a training whose loss went non-finite) is logged and the worker goes on to the next line.
sweep() {
    "$PYTHON" -m experiments.sweep --out_dir "$OUT_DIR" "$@" || echo "run_sweep.sh: sweep $* failed; going on" >&2
}

worker() {
    sweep --experiments depth_compute --datasets digits --configurations fpdm-268k,dit4-268k --training_seeds 0
    sweep --experiments gradient --datasets digits
    sweep --experiments depth_compute --datasets digits --configurations fpdm-268k,dit4-268k
    sweep --experiments depth_compute --datasets digits --configurations dit8-268k
    sweep --experiments depth_compute --datasets digits --configurations fpdm-537k,dit4-537k
    sweep --experiments depth_compute --datasets mnist5k
    sweep --experiments depth_compute --datasets digits  # the rest: DiT-28 and the phantom FPDM at 268k, DiT-8 at 537k
    sweep --experiments table5,prepost --datasets mnist5k
    sweep --experiments depth,depth_smoothing --datasets digits
    sweep --experiments depth,depth_smoothing --datasets mnist5k
    sweep --experiments depth_solvers --datasets digits,mnist5k  # sampling only, on depth's finished models
    sweep --experiments depth_compute --datasets digits
    sweep --experiments table1,smoothing --datasets mnist5k
    sweep --experiments table5,prepost --datasets digits
    sweep --experiments table1,smoothing,solvers --datasets digits
    sweep --experiments smoothing --datasets mnist5k  # models the other worker finished
}

pids=()
for i in $(seq 1 "$WORKERS"); do
    worker >> "$LOGS/sweep-worker$i.log" 2>&1 &
    pids+=($!)
    sleep 5  # let each worker claim its first job before the next one looks
done
for pid in "${pids[@]}"; do wait "$pid"; done
"$PYTHON" -m experiments.claims --results_dir "$OUT_DIR"
