"""Generate many samples across processes for FID and pack them into the ADM evaluator's .npz.

    torchrun --nproc_per_node 8 sample_ddp.py --ckpt CKPT --num_fid_samples 50000 --budget 280 --fixed_point_iters 8
    accelerate launch --num_processes 8 sample_ddp.py --ckpt CKPT ...        (NCCL on GPU, gloo on CPU)
    python sample_ddp.py --ckpt CKPT --num_fid_samples 1000                   (one process)

Image i (0 <= i < --num_fid_samples) uses seed --global_seed + i for its class label, initial noise and step noise,
so the set is the same whatever the number of processes or --per_proc_batch_size (the adaptive schedule excepted:
it stops on the whole batch's residual).

Files in --sample_dir:
    setup.json                 the setup (a rerun with a different one is refused) and one entry per run in runs[]
    shards/rank{r}_{k:05d}.npz  what rank r wrote: indices int64 (n,), images uint8 (n, H, W, C) as generated,
                               labels int64 (n,) for class-conditional models; n = --shard_size (a rank's last
                               shard may hold fewer). Written atomically from memory: a shard on disk is complete.
    images/NNNNNN.png          only with --png True: each new image also as a PNG, for looking at
    samples_N.npz              the ADM evaluator's archive: arr_0 uint8 (N, H, W, 3) RGB (grayscale repeated to 3
                               channels) and, for class-conditional models, arr_1 int64 labels

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

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

import cli
import distributed
import sampling
from config import SampleDDPConfig, UserError
from images import pack_shards, read_shard_indices, save_png, save_shard
from records import (SETUP_FILE, describe_plan, read_json, refuse_other_setup, sampling_setup, write_diagnostics,
                     write_json)
from sample import parse_args
from vae import load_vae_for

# Flags that change only how the work is split or where it goes, not the images: a resumed run may change them.
NOT_IN_SETUP = {"num_samples", "batch_size", "device", "diagnostics", "output_dir", "tf32", "shard_size", "png"}
SHARD_DIR = "shards"
SHARD_NAME = re.compile(r"rank(\d+)_(\d+)\.npz")
SHARD_LAYOUT = ("rank{r}_{k:05d}.npz: indices int64 (n,), images uint8 (n, H, W, C) as generated, labels int64 (n,) "
                "when class-conditional")
STOP_FILE = ".stop"  # written by a failing rank: the others stop after their current batch


#################################################################################
#                          Shards and the work split                            #
#################################################################################

def shard_path(sample_dir: Path, rank: int, number: int) -> Path:
    """Where rank `rank` writes its shard `number`."""
    return sample_dir / SHARD_DIR / f"rank{rank}_{number:05d}.npz"


def image_path(sample_dir: Path, index: int) -> Path:
    """Where image `index` goes as a PNG (--png True)."""
    return sample_dir / "images" / f"{index:06d}.png"


def shard_files(sample_dir: Path) -> list[Path]:
    """The complete shard files of --sample_dir (temporary files of unfinished writes are not shards)."""
    folder = sample_dir / SHARD_DIR
    return sorted(p for p in folder.glob("rank*_*.npz") if SHARD_NAME.fullmatch(p.name)) if folder.is_dir() else []


def remove_unfinished(sample_dir: Path) -> int:
    """Delete temporary files left by interrupted atomic writes (shards, PNGs, the archive) and a stale stop
    request; returns how many files went. Only rank 0 calls it, before any rank writes."""
    stale = [p for folder in (sample_dir, sample_dir / SHARD_DIR, sample_dir / "images") if folder.is_dir()
             for p in folder.glob(".*.tmp")]
    for path in stale:
        path.unlink(missing_ok=True)
    (sample_dir / STOP_FILE).unlink(missing_ok=True)
    return len(stale)


@dataclass
class ShardScan:
    """What the shards of --sample_dir hold."""
    files: list[Path]
    covered: np.ndarray      # (num_samples,) bool: image i is in a shard
    next_number: int         # first shard number no rank has used: new names never collide with old ones


def scan_shards(sample_dir: Path, num_samples: int) -> ShardScan:
    """Read every shard's indices (not its images); an index held by two shards is an error."""
    files = shard_files(sample_dir)
    owner = np.full(num_samples, -1, dtype=np.int64)              # (N,): which file holds image i
    for number, path in enumerate(files):
        try:
            indices = read_shard_indices(path, f"--sample_dir {sample_dir}")
        except ValueError as error:
            raise UserError(f"{error}; delete that shard and rerun to draw its images again") from None
        indices = indices[indices < num_samples]                  # images beyond --num_fid_samples stay unused
        repeated = indices[owner[indices] >= 0]
        if len(repeated) or len(np.unique(indices)) != len(indices):
            other = files[owner[repeated[0]]].name if len(repeated) else path.name
            raise UserError(f"--sample_dir {sample_dir}: image {int((repeated if len(repeated) else indices)[0])} "
                            f"is in both {SHARD_DIR}/{other} and {SHARD_DIR}/{path.name}; delete one of them")
        owner[indices] = number
    numbers = [int(SHARD_NAME.fullmatch(p.name).group(2)) for p in files]
    return ShardScan(files, owner >= 0, max(numbers, default=-1) + 1)


def share_missing(missing: Sequence[int], rank: int, world_size: int) -> list[int]:
    """The missing indices this rank draws: dealt round-robin over all current ranks (balanced to one image,
    whatever the world size of earlier runs)."""
    return [int(i) for i in missing[rank::world_size]]


@dataclass
class ShardWriter:
    """Collects one rank's finished batches and writes them as shards of `shard_size` images."""
    sample_dir: Path
    rank: int
    first_number: int
    shard_size: int
    png: bool = False
    written: list[Path] = field(default_factory=list)
    _indices: list[int] = field(default_factory=list)
    _images: list[np.ndarray] = field(default_factory=list)       # per batch (n, H, W, C) uint8
    _labels: list[np.ndarray] = field(default_factory=list)       # per batch (n,), conditional models only

    def add(self, batch: sampling.SampleBatch, pixels: np.ndarray) -> None:
        """generate()'s on_batch: buffer the batch, write full shards, stop if another rank failed."""
        if self.png:
            for index, image in zip(batch.indices, pixels):
                save_png(image, image_path(self.sample_dir, index))
        self._indices += batch.indices
        self._images.append(pixels)
        if batch.labels is not None:
            self._labels.append(batch.labels.numpy())
        while len(self._indices) >= self.shard_size:
            self._write(self.shard_size)
        if (self.sample_dir / STOP_FILE).exists():
            raise StopRequested

    def flush(self) -> None:
        """Write the buffered images (the rank's last, smaller shard)."""
        if self._indices:
            self._write(len(self._indices))

    def _write(self, count: int) -> None:
        images = np.concatenate(self._images)                      # (buffered, H, W, C)
        labels = np.concatenate(self._labels) if self._labels else None
        path = shard_path(self.sample_dir, self.rank, self.first_number + len(self.written))
        save_shard(path, self._indices[:count], images[:count], None if labels is None else labels[:count])
        self.written.append(path)
        self._indices = self._indices[count:]
        self._images = [images[count:]] if self._indices else []
        self._labels = [labels[count:]] if self._indices and labels is not None else []


class StopRequested(Exception):
    """Another rank failed and asked the others to stop (STOP_FILE)."""


def agree_on_failure(error: Optional[str]) -> None:
    """A small collective every rank reaches after sampling: if any rank failed, every rank raises its error (cli
    prints it once, on rank 0), so no rank waits forever at the statistics gather."""
    errors = [message for message in distributed.gather_object(error) if message]
    if errors:
        raise UserError(errors[0])


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
    refuse_other_setup(sample_dir, setup, "--sample_dir",
                       shard_files(sample_dir) + sorted((sample_dir / "images").glob("*.png")))

    work = plan_work(sample_dir, config.num_samples, setup, plan, notes) if distributed.is_main() else None
    work = distributed.gather_object(work)[0]                 # rank 0's scan, on every rank (also a barrier)
    if work["error"]:
        raise UserError(work["error"])

    todo = share_missing(work["missing"], rank, world_size)
    labels = (sampling.image_labels(todo, config.seed, model_config.num_classes, class_labels, label_mode="random")
              if todo else None)                              # a rank may have nothing left to draw
    writer = ShardWriter(sample_dir, rank, work["next_number"], config.shard_size, config.png)
    generated = draw(writer, todo, labels, model=model, model_config=model_config, config=config, plan=plan,
                     device=device, vae=vae, ckpt=ckpt, world_size=world_size)
    if not config.diagnostics:  # keep only delta_t: full residual curves of 50K images are not worth gathering
        for stats in generated.trajectories:
            stats.residuals_per_step = [r[-1:] for r in stats.residuals_per_step]
    everything = distributed.gather_object((generated.trajectories, generated.counts, generated.seconds,
                                            len(writer.written)))
    npz = None
    if distributed.is_main():
        all_labels = sampling.image_labels(range(config.num_samples), config.seed,
                                           model_config.num_classes, class_labels, label_mode="random")
        npz = finish(sample_dir, model_config, config, plan, setup, everything, all_labels, world_size, device)
    distributed.shutdown()
    return npz


def draw(writer: ShardWriter, todo: list[int], labels: Any, *, model: Any, model_config: Any,
         config: SampleDDPConfig, plan: Any, device: torch.device, vae: Any, ckpt: Path,
         world_size: int) -> sampling.Generated:
    """Draw this rank's share, writing shards as it goes. A user error (e.g. a non-finite output) on any rank asks
    the others to stop after their batch, and then every rank raises it; anything else keeps its traceback."""
    generated, error = None, None
    try:
        generated = sampling.generate(model, model_config, config, plan, todo, labels, seed=config.seed,
                                      batch_size=config.batch_size, device=device, vae=vae, on_batch=writer.add,
                                      keep_images=False)
        writer.flush()
    except StopRequested:
        writer.flush()
    except Exception as failure:  # noqa: BLE001 -- user errors are agreed on below, anything else re-raised
        (writer.sample_dir / STOP_FILE).touch()
        if not cli.is_user_error(failure):
            raise
        if not isinstance(failure, OSError):                  # a full disk would fail again
            writer.flush()                                    # the finished batches are good images
        error = failure_message(failure, ckpt, writer.rank, world_size)
    agree_on_failure(error)
    assert generated is not None  # a rank stops early only when another failed, and then all raised above
    return generated


def plan_work(sample_dir: Path, num_samples: int, setup: dict[str, Any], plan: Any,
              notes: Sequence[str]) -> dict[str, Any]:
    """Rank 0, before any rank writes: print the plan, create the folder and setup.json, clean up after an
    interrupted run and find the missing indices. An error is returned, not raised, so every rank raises it."""
    print(describe_plan(plan))
    for note in list(notes) + plan.notes:
        print(f"note: {note}")
    (sample_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    if read_setup(sample_dir) is None:
        write_json(sample_dir / SETUP_FILE, {"setup": setup, "runs": []})
    removed = remove_unfinished(sample_dir)
    if removed:
        print(f"Removed {removed} unfinished temporary file(s) of an interrupted run")
    try:
        scan = scan_shards(sample_dir, num_samples)
    except UserError as error:
        return {"error": str(error)}
    missing = np.flatnonzero(~scan.covered).tolist()
    if len(missing) < num_samples:
        print(f"Resuming: {num_samples - len(missing)} of {num_samples} images already in {len(scan.files)} shards")
    return {"error": None, "missing": missing, "next_number": scan.next_number}


def failure_message(failure: Exception, ckpt: Path, rank: int, world_size: int) -> str:
    """The one line every rank reports for a user error met while sampling."""
    where = f" on rank {rank}" if world_size > 1 else ""
    if isinstance(failure, sampling.NonFiniteError):
        return (f"--ckpt {str(ckpt)!r}: {failure}{where}; stopped before writing that batch (finished shards are "
                "kept: a rerun resumes)")
    return cli.error_line(failure).removeprefix("error: ") + where


def finish(sample_dir: Path, model_config: Any, config: SampleDDPConfig, plan: Any, setup: dict[str, Any],
           everything: list[tuple[list[Any], list[int], float, int]], labels: Any, world_size: int,
           device: torch.device) -> Path:
    """Rank 0: pack the .npz, add this run to setup.json, write diagnostics and report the blocks spent."""
    all_trajectories = [s for part in everything for s in part[0]]
    all_counts = [c for part in everything for c in part[1]]
    seconds = max(part[2] for part in everything)
    stats = sampling.summarize(plan, model_config, config, all_trajectories, all_counts)
    npz = sample_dir / f"samples_{config.num_samples}.npz"
    files = shard_files(sample_dir)
    try:
        shape = pack_shards(npz, files, config.num_samples, None if labels is None else labels.numpy(),
                            f"--sample_dir {sample_dir}")
    except ValueError as error:
        raise UserError(f"{error}; rerun to draw the missing images") from None
    record = read_setup(sample_dir) or {"setup": setup, "runs": []}
    record["runs"].append({"num_fid_samples": config.num_samples, "generated_now": sum(all_counts),
                           "world_size": world_size, "per_proc_batch_size": config.batch_size,
                           "device": str(device), "seconds_max_rank": seconds,
                           "shards": {"folder": SHARD_DIR, "layout": SHARD_LAYOUT, "shard_size": config.shard_size,
                                      "files": len(files), "written_now": sum(part[3] for part in everything)},
                           "png": config.png, "stats": stats, "npz": str(npz)})
    write_json(sample_dir / SETUP_FILE, record)
    if config.diagnostics and all_trajectories:
        write_diagnostics(config.diagnostics, plan, all_trajectories, setup)
    blocks = stats.get("blocks_per_image_max", 0)
    print(f"Generated {sum(all_counts)} new images ({config.num_samples - sum(all_counts)} already on disk) on "
          f"{world_size} process(es); transformer-block forward passes per image: {blocks} "
          f"(planned {plan.blocks_per_image})")
    print(f"Saved {npz} (arr_0 {'x'.join(map(str, shape))} uint8)")
    return npz


def read_setup(sample_dir: Path) -> dict[str, Any] | None:
    """setup.json of --sample_dir (None before the first run)."""
    path = sample_dir / SETUP_FILE
    return read_json(path, f"--sample_dir {sample_dir}") if path.is_file() else None


if __name__ == "__main__":
    cli.run(main)
