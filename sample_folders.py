"""The folders sample.py and sample_ddp.py write (the step "write"), with the setup.json that says how their images
were made: a folder never mixes two setups.

sample.py's --output_dir (PngFolder): NNNNNN.png per image, grid.png, setup.json (setup, stats, trajectories).

sample_ddp.py's --sample_dir (ShardFolder and ShardWriter):
    setup.json                 the setup (a rerun with a different one is refused) and one entry per run in runs[]
    shards/rank{r}_{k:05d}.npz  what rank r wrote: indices int64 (n,), images uint8 (n, H, W, C) as generated,
                               labels int64 (n,) for class-conditional models; n = --shard_size (a rank's last
                               shard may hold fewer). Written atomically from memory: a shard on disk is complete.
    images/NNNNNN.png          only with --png True: each new image also as a PNG, for looking at
    samples_N.npz              the ADM evaluator's archive (images.pack_shards)
A rerun reads which indices the shards already hold, removes unfinished temporary files and deals the missing
indices round-robin to all its ranks; an index found in two shards is an error.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

import cli
import distributed
import sampling
from config import UserError
from images import make_grid, pack_shards, read_shard_indices, save_png, save_shard
from records import (SETUP_FILE, describe_plan, read_json, refuse_other_setup, sampling_setup, to_jsonable,
                     write_diagnostics, write_record)

# sample.py: flags that change where the output goes or how the work is split, not the images (batch_size does
# change them under the adaptive schedule, whose stopping rule looks at the whole batch).
NOT_COMPARED = {"output_dir", "diagnostics", "device", "batch_size"}
# sample_ddp.py: flags that change only how the work is split or where it goes: a resumed run may change them.
NOT_IN_SETUP = {"num_samples", "batch_size", "device", "diagnostics", "output_dir", "tf32", "shard_size", "png"}
SHARD_DIR = "shards"
SHARD_NAME = re.compile(r"rank(\d+)_(\d+)\.npz")
SHARD_LAYOUT = ("rank{r}_{k:05d}.npz: indices int64 (n,), images uint8 (n, H, W, C) as generated, labels int64 (n,) "
                "when class-conditional")
STOP_FILE = ".stop"  # written by a failing rank: the others stop after their current batch


def print_plan(request: sampling.Request) -> None:
    """Say what the plan spends, and its notes."""
    print(describe_plan(request.plan))
    for note in list(request.notes) + request.plan.notes:
        print(f"note: {note}")


#################################################################################
#                          sample.py: a folder of PNGs                          #
#################################################################################

def comparable_setup(setup: dict[str, Any]) -> dict[str, Any]:
    """The part of a recorded setup that decides the images (what two runs in one folder must share)."""
    setup = to_jsonable(setup)
    sample_config = dict(setup.get("sample_config", {}))
    ignored = NOT_COMPARED - ({"batch_size"} if sample_config.get("iteration_schedule") == "adaptive" else set())
    for name in ignored:
        sample_config.pop(name, None)
    return {**{k: v for k, v in setup.items() if k != "device"}, "sample_config": sample_config}


@dataclass
class PngFolder:
    """sample.py's --output_dir, claimed for one setup."""
    path: Path
    setup: dict[str, Any]

    @classmethod
    def claim(cls, loaded: sampling.Loaded, request: sampling.Request, labels: Any) -> "PngFolder":
        """Refuse a folder holding another setup's PNGs and unwritable outputs, before anything is drawn."""
        config, path = request.config, Path(request.config.output_dir)
        setup = sampling_setup(ckpt=loaded.ckpt, model_config=loaded.model_config, config=config, plan=request.plan,
                               notes=request.notes, labels=None if labels is None else labels.tolist(),
                               device=str(loaded.device), vae=config.vae if loaded.model_config.latent else None)
        refuse_other_setup(path, setup, "--output_dir", sorted(path.glob("*.png")), comparable_setup, "PNGs")
        cli.check_writable_folder(path, "--output_dir")
        if config.diagnostics:
            cli.check_writable_folder(Path(config.diagnostics).parent, "--diagnostics")
        print_plan(request)
        return cls(path, setup)

    def save(self, batch: sampling.SampleBatch, pixels: Any) -> None:
        """generate()'s on_batch: the batch's PNGs (the first batch writes setup.json before any PNG lands)."""
        if not (self.path / SETUP_FILE).is_file():
            self.path.mkdir(parents=True, exist_ok=True)
            write_record(self.path / SETUP_FILE, {"setup": self.setup})
        for index, image in zip(batch.indices, pixels):
            save_png(image, self.path / f"{index:06d}.png")

    def finish(self, generated: sampling.Generated, loaded: sampling.Loaded,
               request: sampling.Request) -> dict[str, Any]:
        """grid.png, setup.json with what was spent, --diagnostics; returns the record."""
        config, plan = request.config, request.plan
        save_png(make_grid(generated.images), self.path / "grid.png")
        stats = generated.summary(plan, loaded.model_config, config)
        record = {"setup": self.setup, "stats": stats, "trajectories": [s.to_dict() for s in generated.trajectories]}
        write_record(self.path / SETUP_FILE, record)
        if config.diagnostics:
            plot = write_diagnostics(config.diagnostics, plan, generated.trajectories, self.setup)
            print(f"diagnostics: {config.diagnostics}" + (f" (plot {plot})" if plot else ""))
        spent = f"{stats['blocks_per_image_max']}"
        if stats["blocks_per_image_min"] != stats["blocks_per_image_max"]:  # adaptive: batches stop apart
            spent = f"{stats['blocks_per_image_mean']:.1f} on average, at most {stats['blocks_per_image_max']}"
        count = sum(generated.counts)
        print(f"Total transformer-block forward passes per image: {spent} (planned {plan.blocks_per_image}; "
              f"{stats['gmacs_per_image']:.4g} GMACs; {count} images in {generated.seconds:.1f}s)")
        print(f"Saved {count} PNGs, grid.png and setup.json to {self.path}")
        return record


#################################################################################
#                     sample_ddp.py: shards and the work split                  #
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


class StopRequested(Exception):
    """Another rank failed and asked the others to stop (STOP_FILE)."""


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


@dataclass
class ShardFolder:
    """sample_ddp.py's --sample_dir, claimed for one setup, with the indices still missing from its shards."""
    path: Path
    setup: dict[str, Any]
    missing: list[int]
    next_number: int

    @classmethod
    def claim(cls, loaded: sampling.Loaded, request: sampling.Request) -> "ShardFolder":
        """Every rank checks the setup; rank 0 alone then creates the folder, cleans up after an interrupted run and
        scans the shards, and every rank gets its answer (an error found there is raised on every rank)."""
        config, path = request.config, Path(request.config.output_dir)
        setup = sampling_setup(ckpt=loaded.ckpt, model_config=loaded.model_config, config=config, plan=request.plan,
                               notes=request.notes, exclude=NOT_IN_SETUP,
                               label_mode="random" if not request.class_labels else "given",
                               vae=config.vae if loaded.model_config.latent else None)
        refuse_other_setup(path, setup, "--sample_dir", shard_files(path) + sorted((path / "images").glob("*.png")))
        work = prepare(path, config.num_samples, setup, request) if distributed.is_main() else None
        work = distributed.gather_object(work)[0]                 # rank 0's scan, on every rank (also a barrier)
        if work["error"]:
            raise UserError(work["error"])
        return cls(path, setup, work["missing"], work["next_number"])

    def writer(self, rank: int, config: Any) -> ShardWriter:
        """This rank's writer: its shard numbers start after every number used before."""
        return ShardWriter(self.path, rank, self.next_number, config.shard_size, config.png)

    def finish(self, loaded: sampling.Loaded, request: sampling.Request,
               everything: list[tuple[list[Any], list[int], float, int]], world_size: int) -> Path:
        """Rank 0: pack the .npz, add this run to setup.json, write diagnostics and report the blocks spent."""
        config, plan, sample_dir = request.config, request.plan, self.path
        all_trajectories = [s for part in everything for s in part[0]]
        all_counts = [c for part in everything for c in part[1]]
        stats = sampling.summarize(plan, loaded.model_config, config, all_trajectories, all_counts)
        labels = request.labels(range(config.num_samples), loaded.model_config.num_classes, "random")
        npz = sample_dir / f"samples_{config.num_samples}.npz"
        files = shard_files(sample_dir)
        try:
            shape = pack_shards(npz, files, config.num_samples, None if labels is None else labels.numpy(),
                                f"--sample_dir {sample_dir}")
        except ValueError as error:
            raise UserError(f"{error}; rerun to draw the missing images") from None
        record = read_setup(sample_dir) or {"setup": self.setup, "runs": []}
        record["runs"].append({"num_fid_samples": config.num_samples, "generated_now": sum(all_counts),
                               "world_size": world_size, "per_proc_batch_size": config.batch_size,
                               "device": str(loaded.device), "seconds_max_rank": max(p[2] for p in everything),
                               "shards": {"folder": SHARD_DIR, "layout": SHARD_LAYOUT, "shard_size": config.shard_size,
                                          "files": len(files), "written_now": sum(p[3] for p in everything)},
                               "png": config.png, "stats": stats, "npz": str(npz)})
        write_record(sample_dir / SETUP_FILE, record)
        if config.diagnostics and all_trajectories:
            write_diagnostics(config.diagnostics, plan, all_trajectories, self.setup)
        print(f"Generated {sum(all_counts)} new images ({config.num_samples - sum(all_counts)} already on disk) on "
              f"{world_size} process(es); transformer-block forward passes per image: "
              f"{stats.get('blocks_per_image_max', 0)} (planned {plan.blocks_per_image})")
        print(f"Saved {npz} (arr_0 {'x'.join(map(str, shape))} uint8)")
        return npz


def prepare(sample_dir: Path, num_samples: int, setup: dict[str, Any], request: sampling.Request) -> dict[str, Any]:
    """Rank 0, before any rank writes: print the plan, create the folder and setup.json, clean up after an
    interrupted run and find the missing indices. An error is returned, not raised, so every rank raises it."""
    print_plan(request)
    (sample_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    if read_setup(sample_dir) is None:
        write_record(sample_dir / SETUP_FILE, {"setup": setup, "runs": []})
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


def read_setup(sample_dir: Path) -> dict[str, Any] | None:
    """setup.json of --sample_dir (None before the first run)."""
    path = sample_dir / SETUP_FILE
    return read_json(path, f"--sample_dir {sample_dir}") if path.is_file() else None


def draw_shards(writer: ShardWriter, loaded: sampling.Loaded, request: sampling.Request, todo: list[int],
                labels: Any, world_size: int) -> list[tuple[list[Any], list[int], float, int]]:
    """Draw this rank's share, writing shards as it goes, and gather (trajectories, counts, seconds, shards
    written) of every rank. A user error (e.g. a non-finite output) on any rank asks the others to stop after their
    batch, and then every rank raises it; anything else keeps its traceback."""
    generated, error = None, None
    try:
        generated = sampling.draw(loaded, request, todo, labels, on_batch=writer.add, keep_images=False)
        writer.flush()
    except StopRequested:
        writer.flush()
    except Exception as failure:  # noqa: BLE001 -- user errors are agreed on below, anything else re-raised
        (writer.sample_dir / STOP_FILE).touch()
        if not cli.is_user_error(failure):
            raise
        if not isinstance(failure, OSError):                  # a full disk would fail again
            writer.flush()                                    # the finished batches are good images
        error = failure_message(failure, loaded.ckpt, writer.rank, world_size)
    agree_on_failure(error)
    assert generated is not None  # a rank stops early only when another failed, and then all raised above
    if not request.config.diagnostics:  # keep only delta_t: full residual curves of 50K images are not worth gathering
        for stats in generated.trajectories:
            stats.residuals_per_step = [r[-1:] for r in stats.residuals_per_step]
    return distributed.gather_object((generated.trajectories, generated.counts, generated.seconds,
                                      len(writer.written)))


def agree_on_failure(error: Optional[str]) -> None:
    """A small collective every rank reaches after sampling: if any rank failed, every rank raises its error (cli
    prints it once, on rank 0), so no rank waits forever at the statistics gather."""
    errors = [message for message in distributed.gather_object(error) if message]
    if errors:
        raise UserError(errors[0])


def failure_message(failure: Exception, ckpt: Path, rank: int, world_size: int) -> str:
    """The one line every rank reports for a user error met while sampling."""
    where = f" on rank {rank}" if world_size > 1 else ""
    if isinstance(failure, sampling.NonFiniteError):
        return (f"--ckpt {str(ckpt)!r}: {failure}{where}; stopped before writing that batch (finished shards are "
                "kept: a rerun resumes)")
    return cli.error_line(failure).removeprefix("error: ") + where
