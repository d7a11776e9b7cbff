"""Generate many samples across processes for FID and pack them into the ADM evaluator's .npz.

    torchrun --nproc_per_node 8 sample_ddp.py --ckpt CKPT --num_fid_samples 50000 --budget 280 --fixed_point_iters 8
    accelerate launch --num_processes 8 sample_ddp.py --ckpt CKPT ...        (NCCL on GPU, gloo on CPU)
    python sample_ddp.py --ckpt CKPT --num_fid_samples 1000                   (one process)

Image i (0 <= i < --num_fid_samples) uses seed --global_seed + i for its class label, initial noise and step noise,
so the set is the same whatever the number of processes or --per_proc_batch_size (the adaptive schedule excepted:
it stops on the whole batch's residual).

Files in --sample_dir (sample_folders.py): setup.json (the setup, and one entry per run), shards/ (what each rank
wrote), images/ (with --png True) and samples_N.npz, the ADM evaluator's archive: arr_0 uint8 (N, H, W, 3) RGB
(grayscale repeated to 3 channels) and, for class-conditional models, arr_1 int64 labels.

Resuming: a rerun (any number of processes) reads which indices the shards already hold, removes unfinished
temporary files, and deals the missing indices round-robin to all its ranks (on a fresh run rank r draws
i = r, r + W, ...); an interrupted run loses at most the images of each rank's unfinished shard. An index found in
two shards is an error. Rank 0 then packs images 0..N-1 from the shards into samples_N.npz through a memory-mapped
temporary file, each index exactly once. If a rank meets a user error mid-run (e.g. a non-finite model output), it
keeps its finished images, the other ranks stop after their current batch, and every rank exits with that error.

The default --cfg_scale is 4.0 for class-conditional models (the guidance of the paper's qualitative figures); FID
is commonly reported both without guidance (--cfg_scale 1) and with a low scale (DiT: 1.5): pass the one you mean.
The official DiT spellings (--num-fid-samples, --per-proc-batch-size, --sample-dir, --global-seed, --cfg-scale,
--num-sampling-steps, --tf32) are accepted; they set the same fields as sample.py's --num_samples, --batch_size,
--output_dir, --seed and --precision (--tf32 True is --precision tf32; config.SampleDDPConfig).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

import cli
import distributed
import sampling
from config import SampleDDPConfig
from sample import parse_args
from sample_folders import ShardFolder, draw_shards, share_missing


def main(argv: Sequence[str] | None = None) -> Path | None:
    """Command-line entry point; rank 0 returns the .npz path. Everything that can fail does so before anything is
    written (identically on every rank)."""
    config, model_flags = parse_args(argv, SampleDDPConfig, __doc__.splitlines()[0])
    state = distributed.init()
    rank, world_size = state.process_index, state.num_processes
    rank_gpu = config.device == "auto" and torch.cuda.is_available()  # cuda:LOCAL_RANK, already made current
    loaded = sampling.load(config, model_flags, state.device if rank_gpu else None)
    request = sampling.plan_request(loaded, config)
    folder = ShardFolder.claim(loaded, request)
    todo = share_missing(folder.missing, rank, world_size)
    labels = request.labels(todo, loaded.model_config.num_classes, "random") if todo else None  # may be none left
    everything = draw_shards(folder.writer(rank, request.config), loaded, request, todo, labels, world_size)
    npz = folder.finish(loaded, request, everything, world_size) if distributed.is_main() else None
    distributed.shutdown()
    return npz


if __name__ == "__main__":
    cli.run(main)
