"""Encode an image folder into VAE latents for --dataset latents (the paper's ImageNet setting, Sec. 4.1).

    python extract_features.py --data_path /data/imagenet/train --features_path features/imagenet256 --image_size 256
    accelerate launch --num_processes 8 extract_features.py --data_path ... --features_path ... --flip True

Each process encodes chunks chunk_id % world_size == rank of the sorted image list; every chunk file is written
atomically, so an interrupted run resumes by rerunning the same command (finished chunks are skipped). The main
process writes manifest.json once all chunks exist; the format is described in latents.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import cli
import distributed
from config import ExtractConfig, UserError, build_config, make_parser
from data import ImageFolderDataset
from latents import (MANIFEST_NAME, extract_latent_chunks, extraction_settings, find_complete_chunks, plan_chunks,
                     remove_stale_temp_files, write_latents_manifest)
from vae import load_vae


def build_parser():
    """Command-line flags of extract_features.py (one per ExtractConfig field; abbreviations are rejected)."""
    return make_parser(__doc__.splitlines()[0], ExtractConfig)


def parse_args(argv: Sequence[str] | None = None) -> ExtractConfig:
    """The validated ExtractConfig of `argv`."""
    return build_config(ExtractConfig, vars(build_parser().parse_args(argv))).validate()


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Run the extraction; returns the manifest on the main process (None on the others)."""
    args = parse_args(argv)
    state = distributed.init()

    # Everything that can be wrong with the inputs fails here, on every process, before any work.
    dataset = ImageFolderDataset(args.data_path, args.image_size, random_flip=False)
    settings = extraction_settings(args.vae, args.image_size, args.flip, args.chunk_size, args.seed,
                                   args.sample_posterior, args.dtype)
    folder = Path(args.features_path)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--features_path {str(folder)!r} exists and is not a folder")
    complete = find_complete_chunks(folder, dataset, settings)
    num_chunks = len(plan_chunks(dataset.num_images, args.chunk_size))
    if state.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MANIFEST_NAME).unlink(missing_ok=True)  # the folder reads as complete only once rewritten
        remove_stale_temp_files(folder)  # safe: the other processes wait at the barrier below
    distributed.print0(f"{dataset.num_images} images, {dataset.num_classes} classes -> {num_chunks} chunks "
                       f"({len(complete)} already done) in {folder}, {state.num_processes} process(es)")
    distributed.barrier()

    vae = load_vae(args.vae, state.device)
    my_chunks = range(state.process_index, num_chunks, state.num_processes)
    extract_latent_chunks(dataset, folder, vae, settings, my_chunks, batch_size=args.batch_size,
                          num_workers=args.num_workers, progress=state.is_main_process)
    distributed.barrier()

    manifest = None
    if state.is_main_process:
        manifest = write_latents_manifest(folder, dataset, vae, settings)
        print(f"wrote {folder / MANIFEST_NAME}: latents {manifest['latent_shape']}, "
              f"scaling factor {manifest['scaling_factor']}, flips {manifest['flip']}")
    distributed.barrier()
    return manifest


if __name__ == "__main__":
    cli.run(main)
