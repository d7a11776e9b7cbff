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
--output_dir, --seed and --precision (--tf32 True is --precision tf32; config.SampleDDPConfig).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

import cli
import distributed
import sampling
from config import SampleDDPConfig, UserError, config_diff
from images import load_png_rgb, save_png, save_sample_npz
from records import SETUP_FILE, describe_plan, read_json, sampling_setup, to_jsonable, write_diagnostics, write_json
from sample import parse_args
from vae import load_vae_for

# Flags that change only how the work is split or where it goes, not the images: a resumed run may change them.
NOT_IN_SETUP = {"num_samples", "batch_size", "device", "diagnostics", "output_dir", "tf32"}


#################################################################################
#                            Work split and packing                             #
#################################################################################

def rank_indices(num_samples: int, rank: int, world_size: int) -> list[int]:
    """Image indices this rank is responsible for (round-robin: deterministic, balanced)."""
    return list(range(rank, num_samples, world_size))


def image_path(sample_dir: Path, index: int) -> Path:
    """Where image `index` lives."""
    return sample_dir / "images" / f"{index:06d}.png"


def pack_npz(sample_dir: Path, num_samples: int, labels: Any) -> Path:
    """Pack images 0..N-1 into an ADM-evaluator .npz (arr_0 uint8 NHWC RGB; arr_1 labels when conditional)."""
    missing = [i for i in range(num_samples) if not image_path(sample_dir, i).is_file()]
    if missing:
        raise UserError(f"--sample_dir {sample_dir}: {len(missing)} images missing (first {missing[:5]}); rerun")
    first = load_png_rgb(image_path(sample_dir, 0))
    pixels = np.empty((num_samples, *first.shape), dtype=np.uint8)  # (N, H, W, 3)
    for i in range(num_samples):
        pixels[i] = load_png_rgb(image_path(sample_dir, i))
    path = sample_dir / f"samples_{num_samples}.npz"
    save_sample_npz(path, pixels, None if labels is None else labels.numpy())
    return path


#################################################################################
#                                    Main                                       #
#################################################################################

def main(argv: Sequence[str] | None = None) -> Path | None:
    """Command-line entry point; rank 0 returns the .npz path."""
    config, model_flags = parse_args(argv, SampleDDPConfig, __doc__.splitlines()[0])

    state = distributed.init()
    rank, world_size = state.process_index, state.num_processes
    if config.device == "auto" and torch.cuda.is_available():
        device = state.device                                 # cuda:LOCAL_RANK, already made current
    else:
        device = sampling.resolve_device(config.device)

    # Everything that can fail does so before anything is written (identically on every rank).
    model, model_config, ckpt = sampling.load_sampling_model(config.ckpt, device, config.use_ema, model_flags)
    sampling.check_finite_weights(model, ckpt)
    config, plan, notes = sampling.prepare_sampling(model_config, config, model=model, device=device)
    class_labels = sampling.parse_class_labels(config.class_labels, model_config.num_classes)
    vae = load_vae_for(model_config, config.vae, device)
    sample_dir = Path(config.output_dir)
    setup = sampling_setup(
        ckpt=ckpt, model_config=model_config, config=config, plan=plan, notes=notes, exclude=NOT_IN_SETUP,
        label_mode="random" if not class_labels else "given", vae=config.vae if model_config.latent else None)
    recorded = read_setup(sample_dir)
    if recorded is None and any((sample_dir / "images").glob("*.png")):
        raise UserError(f"--sample_dir {sample_dir} holds PNGs in images/ but no {SETUP_FILE} saying how they were "
                        "made; use a new --sample_dir")
    if recorded is not None and recorded.get("setup") != to_jsonable(setup):
        raise UserError(f"--sample_dir {sample_dir} holds samples from a different setup (recorded != now: "
                         f"{'; '.join(config_diff(recorded.get('setup', {}), to_jsonable(setup))[:8])}); "
                         "use a new --sample_dir or the same flags")
    if distributed.is_main():
        print(describe_plan(plan))
        for note in notes + plan.notes:
            print(f"note: {note}")
        (sample_dir / "images").mkdir(parents=True, exist_ok=True)
        if recorded is None:
            write_json(sample_dir / SETUP_FILE, {"setup": setup, "runs": []})
    distributed.barrier()

    def save(batch: sampling.SampleBatch, pixels: np.ndarray) -> None:
        for index, image in zip(batch.indices, pixels):
            save_png(image, image_path(sample_dir, index))

    todo = [i for i in rank_indices(config.num_samples, rank, world_size)
            if not image_path(sample_dir, i).is_file()]
    labels = sampling.image_labels(todo, config.seed, model_config.num_classes, class_labels, label_mode="random")
    try:
        generated = sampling.generate(model, model_config, config, plan, todo, labels, seed=config.seed,
                                      batch_size=config.batch_size, device=device, vae=vae, on_batch=save,
                                      keep_images=False)
    except sampling.NonFiniteError as error:
        raise UserError(f"--ckpt {str(ckpt)!r}: {error}; stopped before writing that batch") from None
    if not config.diagnostics:  # keep only delta_t: full residual curves of 50K images are not worth gathering
        for stats in generated.trajectories:
            stats.residuals_per_step = [r[-1:] for r in stats.residuals_per_step]

    everything = distributed.gather_object((generated.trajectories, generated.counts, generated.seconds))
    distributed.barrier()
    npz = None
    if distributed.is_main():
        all_labels = sampling.image_labels(range(config.num_samples), config.seed,
                                           model_config.num_classes, class_labels, label_mode="random")
        npz = finish(sample_dir, model_config, config, plan, setup, everything, all_labels, world_size, device)
    distributed.shutdown()
    return npz


def finish(sample_dir: Path, model_config: Any, config: SampleDDPConfig, plan: Any, setup: dict[str, Any],
           everything: list[tuple[list[Any], list[int], float]], labels: Any, world_size: int,
           device: torch.device) -> Path:
    """Rank 0: pack the .npz, add this run to setup.json, write diagnostics and report the blocks spent."""
    all_trajectories = [s for part in everything for s in part[0]]
    all_counts = [c for part in everything for c in part[1]]
    seconds = max(part[2] for part in everything)
    stats = sampling.summarize(plan, model_config, config, all_trajectories, all_counts)
    npz = pack_npz(sample_dir, config.num_samples, labels)
    record = read_setup(sample_dir) or {"setup": setup, "runs": []}
    record["runs"].append({"num_fid_samples": config.num_samples, "generated_now": sum(all_counts),
                           "world_size": world_size, "per_proc_batch_size": config.batch_size,
                           "device": str(device), "seconds_max_rank": seconds,
                           "stats": stats, "npz": str(npz)})
    write_json(sample_dir / SETUP_FILE, record)
    if config.diagnostics and all_trajectories:
        write_diagnostics(config.diagnostics, plan, all_trajectories, setup)
    blocks = stats.get("blocks_per_image_max", 0)
    print(f"Generated {sum(all_counts)} new images ({config.num_samples - sum(all_counts)} already on disk) on "
          f"{world_size} process(es); transformer-block forward passes per image: {blocks} "
          f"(planned {plan.blocks_per_image})")
    shape = load_png_rgb(image_path(sample_dir, 0)).shape
    print(f"Saved {npz} (arr_0 {config.num_samples}x{'x'.join(map(str, shape))} uint8)")
    return npz


def read_setup(sample_dir: Path) -> dict[str, Any] | None:
    """setup.json of --sample_dir (None before the first run)."""
    path = sample_dir / SETUP_FILE
    return read_json(path, f"--sample_dir {sample_dir}") if path.is_file() else None


if __name__ == "__main__":
    cli.run(main)
