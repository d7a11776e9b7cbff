"""Generate many samples across processes for FID and pack them into the ADM evaluator's .npz.

    torchrun --nproc_per_node 8 sample_ddp.py --ckpt CKPT --num_fid_samples 50000 --budget 280 --fixed_point_iters 8
    accelerate launch --num_processes 8 sample_ddp.py --ckpt CKPT ...        (NCCL on GPU, gloo on CPU)
    python sample_ddp.py --ckpt CKPT --num_fid_samples 1000                   (one process)

Image i (0 <= i < --num_fid_samples) uses seed --global_seed + i for its class label, initial noise and step noise,
so the set is the same whatever the number of processes or --per_proc_batch_size (the adaptive schedule excepted:
it stops on the whole batch's residual). Indices go round-robin to ranks (rank r draws i = r, r + W, ...). Every
PNG is written atomically to --sample_dir/images/, and a rerun skips indices already on disk (resumable); a rerun
whose setup differs from the one recorded in --sample_dir/setup.json is refused. Rank 0 then packs images
0..N-1 into --sample_dir/samples_N.npz: arr_0 uint8 (N, H, W, 3) RGB (grayscale repeated to 3 channels) and, for
class-conditional models, arr_1 int64 labels; setup.json records the setup and the blocks spent.

The default --cfg_scale is 4.0 for class-conditional models (the guidance of the paper's qualitative figures); FID
is commonly reported both without guidance (--cfg_scale 1) and with a low scale (DiT: 1.5): pass the one you mean.
The official DiT spellings (--num-fid-samples, --per-proc-batch-size, --sample-dir, --global-seed, --cfg-scale,
--num-sampling-steps, --tf32) are accepted; they set the same fields as sample.py's --num_samples, --batch_size,
--output_dir and --seed (config.SampleDDPConfig).
"""
from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist

import cli
import sampling
from checkpoint import atomic_write
from config import SampleDDPConfig, UserError, config_diff
from sample import parse_args

SETUP_FILE = "setup.json"
# Flags that change only how the work is split or where it goes, not the images: a resumed run may change them.
NOT_IN_SETUP = {"num_samples", "batch_size", "device", "diagnostics", "output_dir", "tf32"}


#################################################################################
#                               Processes                                       #
#################################################################################

def init_distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun / accelerate launch env vars; one process without them."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1, 0
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=timedelta(minutes=60))
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def barrier() -> None:
    """Wait for every process (no-op on one process)."""
    if dist.is_initialized():
        dist.barrier()


def gather(obj: Any) -> list[Any]:
    """Every process's `obj`, in rank order."""
    if not dist.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def rank_indices(num_samples: int, rank: int, world_size: int) -> list[int]:
    """Image indices this rank is responsible for (round-robin: deterministic, balanced)."""
    return list(range(rank, num_samples, world_size))


def image_path(sample_dir: Path, index: int) -> Path:
    """Where image `index` lives."""
    return sample_dir / "images" / f"{index:06d}.png"


#################################################################################
#                                  Packing                                      #
#################################################################################

def pack_npz(sample_dir: Path, num_samples: int, labels: Any) -> Path:
    """Pack images 0..N-1 into an ADM-evaluator .npz (arr_0 uint8 NHWC RGB; arr_1 labels when conditional)."""
    missing = [i for i in range(num_samples) if not image_path(sample_dir, i).is_file()]
    if missing:
        raise RuntimeError(f"--sample_dir {sample_dir}: {len(missing)} images missing (first {missing[:5]}); rerun")
    first = sampling.load_png_rgb(image_path(sample_dir, 0))
    arrays = np.empty((num_samples, *first.shape), dtype=np.uint8)  # (N, H, W, 3)
    for i in range(num_samples):
        arrays[i] = sampling.load_png_rgb(image_path(sample_dir, i))
    payload = {"arr_0": arrays}
    if labels is not None:
        payload["arr_1"] = labels.numpy().astype(np.int64)
    path = sample_dir / f"samples_{num_samples}.npz"

    def save(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, **payload)
    atomic_write(path, save)
    return path


#################################################################################
#                                    Main                                       #
#################################################################################

def main(argv: Sequence[str] | None = None) -> Path | None:
    """Command-line entry point; rank 0 returns the .npz path."""
    config, model_flags = parse_args(argv, SampleDDPConfig, __doc__.splitlines()[0])

    rank, world_size, local_rank = init_distributed()
    if config.device == "auto" and torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = sampling.resolve_device(config.device)
    if config.tf32 is not None and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = config.tf32

    # Everything that can fail does so before anything is written (identically on every rank).
    model, model_config, ckpt = sampling.load_sampling_model(config.ckpt, device, config.use_ema, model_flags)
    config, plan, notes = sampling.prepare_sampling(model_config, config, model=model)
    class_labels = sampling.parse_class_labels(config.class_labels, model_config.num_classes)
    vae = sampling.load_vae_for(model_config, config.vae, device)
    sample_dir = Path(config.output_dir)
    setup = sampling.sampling_setup(
        ckpt=ckpt, model_config=model_config, config=config, plan=plan, notes=notes, exclude=NOT_IN_SETUP,
        label_mode="random" if not class_labels else "given", vae=config.vae if model_config.latent else None)
    recorded = _read_setup(sample_dir)
    if recorded is not None and recorded.get("setup") != _jsonable(setup):
        raise UserError(f"--sample_dir {sample_dir} holds samples from a different setup "
                         f"(recorded != now: {'; '.join(config_diff(recorded.get('setup', {}), _jsonable(setup))[:8])}); "
                         "use a new --sample_dir or the same flags")
    if rank == 0:
        print(sampling.describe_plan(plan))
        for note in notes + plan.notes:
            print(f"note: {note}")
        (sample_dir / "images").mkdir(parents=True, exist_ok=True)
        if recorded is None:
            sampling.write_json(sample_dir / SETUP_FILE, {"setup": setup, "runs": []})
    barrier()

    todo = [i for i in rank_indices(config.num_samples, rank, world_size)
            if not image_path(sample_dir, i).is_file()]
    labels = sampling.image_labels(todo, config.seed, model_config.num_classes, class_labels,
                                   label_mode="random")
    start = time.time()
    trajectories, counts = [], []
    for batch, pixels in sampling.sample_images(model, model_config, config, plan, todo, labels,
                                                seed=config.seed, batch_size=config.batch_size,
                                                device=device, vae=vae):
        for index, image in zip(batch.indices, pixels):
            sampling.save_png(image, image_path(sample_dir, index))
        trajectories.append(batch.stats)
        counts.append(len(batch.indices))
    seconds = time.time() - start
    if not config.diagnostics:  # keep only delta_t: full residual curves of 50K images are not worth gathering
        for stats in trajectories:
            stats.residuals_per_step = [r[-1:] for r in stats.residuals_per_step]

    everything = gather((trajectories, counts, seconds))
    barrier()
    if rank != 0:
        _shutdown()
        return None
    all_trajectories = [s for part in everything for s in part[0]]
    all_counts = [c for part in everything for c in part[1]]
    stats = sampling.summarize_stats(plan, all_trajectories, all_counts)
    all_labels = sampling.image_labels(range(config.num_samples), config.seed, model_config.num_classes,
                                       class_labels, label_mode="random")
    npz = pack_npz(sample_dir, config.num_samples, all_labels)
    record = _read_setup(sample_dir) or {"setup": setup, "runs": []}
    record["runs"].append({"num_fid_samples": config.num_samples, "generated_now": sum(all_counts),
                           "world_size": world_size, "per_proc_batch_size": config.batch_size,
                           "device": str(device), "seconds_max_rank": max(part[2] for part in everything),
                           "stats": stats, "npz": str(npz)})
    sampling.write_json(sample_dir / SETUP_FILE, record)
    if config.diagnostics and all_trajectories:
        sampling.write_diagnostics(config.diagnostics, plan, all_trajectories, setup)
    blocks = stats.get("blocks_per_image_max", 0)
    print(f"Generated {sum(all_counts)} new images ({config.num_samples - sum(all_counts)} already on disk) on "
          f"{world_size} process(es); transformer-block forward passes per image: {blocks} "
          f"(planned {plan.blocks_per_image})")
    print(f"Saved {npz} (arr_0 {config.num_samples}x{'x'.join(map(str, _image_shape(sample_dir)))} uint8)")
    _shutdown()
    return npz


def _shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _read_setup(sample_dir: Path) -> dict[str, Any] | None:
    path = sample_dir / SETUP_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"--sample_dir {sample_dir}: {path.name} is not valid JSON ({error})") from error


def _image_shape(sample_dir: Path) -> tuple[int, ...]:
    return sampling.load_png_rgb(image_path(sample_dir, 0)).shape


if __name__ == "__main__":
    cli.run(main)
