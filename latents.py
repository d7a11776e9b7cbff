"""The latent storage format written by extract_features.py and read by data.LatentDataset, and the extraction.

A feature folder (``--feature_path``)::

    manifest.json          written last, by one process, once every chunk exists: the folder is complete iff present
    chunk_000000.npz       images [0, chunk_size) of the sorted image list
    chunk_000001.npz       images [chunk_size, 2 * chunk_size) ...

Each chunk holds, side by side so they cannot get out of step:
    latents       (n, C, h, w) float32 or float16: (z - shift_factor) * scaling_factor of image indices[k]
    latents_flip  (n, C, h, w) the same for the horizontally mirrored image (only when extracted with --flip True)
    labels        (n,) int64 class index of image indices[k] (sorted class folder names -> 0, 1, ...)
    indices       (n,) int64 position of the image in the sorted image list (always start..end-1)
    paths         (n,) str path of the image relative to --data_path (for auditing)
    meta          () str JSON of the extraction settings (checked when resuming)
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Protocol

import numpy as np
import torch

from config import UserError
from images import save_npz
from records import write_json
from vae import encode_images, resolve_vae_name, vae_scale_and_shift



class ImageFolder(Protocol):
    """What extraction reads of a data.ImageFolderDataset (named here so latents.py need not import data.py, which
    reads latents)."""
    samples: list[tuple[str, int]]  # (path, class index), in extraction order
    classes: list[str]
    num_images: int
    num_classes: int

LATENTS_FORMAT = "fpdm-latents"
LATENTS_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


#################################################################################
#                                 Chunks, manifest                              #
#################################################################################

def chunk_file_name(chunk_id: int) -> str:
    """File name of chunk `chunk_id` inside a feature folder."""
    return f"chunk_{chunk_id:06d}.npz"


def plan_chunks(num_images: int, chunk_size: int) -> list[tuple[int, int]]:
    """[start, end) image ranges of consecutive chunks of `chunk_size` images (the last may be shorter)."""
    if chunk_size < 1:
        raise UserError(f"--chunk_size must be positive, got {chunk_size}")
    return [(start, min(start + chunk_size, num_images)) for start in range(0, num_images, chunk_size)]




def read_chunk_meta(path: Path) -> tuple[dict[str, Any], list[str]] | None:
    """A chunk's settings and image paths, or None when the file is missing or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as chunk:
            return json.loads(chunk["meta"].item()), [str(p) for p in chunk["paths"]]
    except Exception:  # a foreign or damaged file: rebuilt like a missing one
        return None


def read_manifest(feature_path: str | os.PathLike) -> dict[str, Any]:
    """Load and check a feature folder's manifest.json, with errors naming --feature_path."""
    folder = Path(feature_path)
    if not str(feature_path):
        raise UserError("--feature_path is empty: pass the folder written by extract_features.py")
    if not folder.is_dir():
        raise FileNotFoundError(f"--feature_path {str(folder)!r} does not exist (run extract_features.py "
                                f"--features_path {str(folder)!r} first)")
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        has_chunks = any(folder.glob("chunk_*.npz"))
        raise FileNotFoundError(
            f"--feature_path {str(folder)!r} has no {MANIFEST_NAME}: "
            + ("extraction did not finish; rerun extract_features.py with the same flags to resume"
               if has_chunks else "it is not a feature folder written by extract_features.py"))
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"--feature_path: {str(manifest_path)!r} is not valid JSON ({error})") from error
    if manifest.get("format") != LATENTS_FORMAT or manifest.get("version") != LATENTS_FORMAT_VERSION:
        raise UserError(f"--feature_path: {str(manifest_path)!r} is not a {LATENTS_FORMAT} "
                         f"v{LATENTS_FORMAT_VERSION} manifest (format={manifest.get('format')!r}, "
                         f"version={manifest.get('version')!r})")
    if not manifest.get("chunks") or int(manifest.get("num_images", 0)) < 1:
        raise UserError(f"--feature_path {str(folder)!r} is empty: its manifest lists no latents")
    return manifest




def read_chunk(folder: Path, entry: dict[str, Any], latent_shape: tuple[int, ...], num_classes: int,
               with_flips: bool) -> dict[str, np.ndarray]:
    """Load the chunk a manifest `entry` names and check its arrays agree with each other and with the manifest."""
    path = folder / entry["file"]
    if not path.is_file():
        raise FileNotFoundError(f"--feature_path {str(folder)!r}: chunk {entry['file']!r} listed in the "
                                f"manifest is missing; rerun extract_features.py with the same flags")
    with np.load(path, allow_pickle=False) as chunk:
        arrays = {name: chunk[name] for name in chunk.files if name in
                  ("latents", "latents_flip", "labels", "indices")}
    count = int(entry["end"]) - int(entry["start"])
    problems = []
    for name in ("latents", "labels", "indices") + (("latents_flip",) if with_flips else ()):
        if name not in arrays:
            problems.append(f"no '{name}' array")
        elif arrays[name].shape[0] != count:
            problems.append(f"'{name}' has {arrays[name].shape[0]} rows, expected {count}")
    if not problems:
        if tuple(arrays["latents"].shape[1:]) != latent_shape:
            problems.append(f"latents of shape {arrays['latents'].shape[1:]}, expected {latent_shape}")
        if not np.array_equal(arrays["indices"], np.arange(int(entry["start"]), int(entry["end"]))):
            problems.append("indices differ from the manifest's range")
        if arrays["labels"].size and not (0 <= arrays["labels"].min() and arrays["labels"].max() < num_classes):
            problems.append(f"labels outside [0, {num_classes})")
    if problems:
        raise UserError(f"--feature_path: chunk {str(path)!r} is inconsistent: {'; '.join(problems)}")
    arrays["labels"] = arrays["labels"].astype(np.int64)
    arrays["indices"] = arrays["indices"].astype(np.int64)
    return arrays


#################################################################################
#                              Feature extraction                               #
#################################################################################

def extraction_settings(vae_name: str, image_size: int, flip: bool, chunk_size: int, seed: int,
                        sample_posterior: bool, dtype: str) -> dict[str, Any]:
    """The settings a chunk depends on; stored in every chunk and compared when resuming."""
    if dtype not in ("float32", "float16"):
        raise UserError(f"--dtype must be float32 or float16, got {dtype!r}")
    return {"vae": resolve_vae_name(vae_name), "image_size": int(image_size), "flip": bool(flip),
            "chunk_size": int(chunk_size), "seed": int(seed), "sample_posterior": bool(sample_posterior),
            "dtype": dtype}


def find_complete_chunks(features_path: str | os.PathLike, dataset: ImageFolder, settings: dict[str, Any],
                         chunk_ids: Iterable[int] | None = None) -> set[int]:
    """Ids of chunks (all, or those in `chunk_ids`) already on disk for these settings and images.

    A missing or unreadable chunk is simply not complete; a readable one made with other settings or other images is
    an error, so one folder never mixes two extractions.
    """
    folder = Path(features_path)
    plan = plan_chunks(dataset.num_images, settings["chunk_size"])
    complete = set()
    for chunk_id in (range(len(plan)) if chunk_ids is None else chunk_ids):
        start, end = plan[chunk_id]
        found = read_chunk_meta(folder / chunk_file_name(chunk_id))
        if found is None:
            continue
        meta, paths = found
        differing = [f"{key}: {meta.get(key)!r} != {value!r}" for key, value in settings.items()
                     if meta.get(key) != value]
        expected_paths = [path for path, _ in dataset.samples[start:end]]
        if differing or paths != expected_paths:
            reason = "; ".join(differing) if differing else "the images in --data_path changed"
            raise UserError(f"--features_path {str(folder)!r} already holds {chunk_file_name(chunk_id)} made "
                             f"differently ({reason}); use a new --features_path or delete the old one")
        complete.add(chunk_id)
    return complete


def remove_stale_temp_files(features_path: str | os.PathLike) -> list[str]:
    """Delete temp files left by a killed run (call while no process is writing); returns their names."""
    patterns = (".chunk_*.npz.*.tmp", f".{MANIFEST_NAME}.*.tmp")
    stale = [path for pattern in patterns for path in Path(features_path).glob(pattern)]
    for path in stale:
        path.unlink(missing_ok=True)
    return [p.name for p in stale]


def _chunk_seed(seed: int, chunk_id: int) -> int:
    """Seed of chunk `chunk_id`'s posterior draws: independent of the process count and of resumption."""
    return int(np.random.SeedSequence([seed, chunk_id]).generate_state(1, dtype=np.uint64)[0] >> 1)


def extract_latent_chunks(dataset: ImageFolder, features_path: str | os.PathLike, vae: Any,
                          settings: dict[str, Any], chunk_ids: Iterable[int], batch_size: int = 32,
                          num_workers: int = 0, progress: bool = False) -> list[int]:
    """Encode the given chunks that are not complete on disk and write each atomically; returns the ids written."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm
    if batch_size < 1:
        raise UserError(f"--batch_size must be positive, got {batch_size}")
    folder = Path(features_path)
    folder.mkdir(parents=True, exist_ok=True)
    plan = plan_chunks(dataset.num_images, settings["chunk_size"])
    chunk_ids = sorted(set(chunk_ids))
    complete = find_complete_chunks(folder, dataset, settings, chunk_ids)
    todo = [c for c in chunk_ids if c not in complete]
    # One loader for all pending chunks; its batches never cross a chunk boundary.
    batches = [(c, list(range(s, min(s + batch_size, plan[c][1])))) for c in todo
               for s in range(plan[c][0], plan[c][1], batch_size)]
    loader = DataLoader(dataset, batch_sampler=[indices for _, indices in batches], num_workers=num_workers)
    bar = tqdm(total=sum(plan[c][1] - plan[c][0] for c in chunk_ids), disable=not progress, unit="img",
               desc="extract", dynamic_ncols=True)
    bar.update(sum(plan[c][1] - plan[c][0] for c in chunk_ids if c in complete))
    pending: dict[str, list[torch.Tensor]] = {}
    generator = None
    for (chunk_id, indices), (images, labels) in zip(batches, loader):
        start, end = plan[chunk_id]
        if indices[0] == start:
            pending = {"latents": [], "latents_flip": [], "labels": []}
            generator = torch.Generator().manual_seed(_chunk_seed(settings["seed"], chunk_id))
        pending["latents"].append(encode_images(vae, images, generator, settings["sample_posterior"]).cpu())
        if settings["flip"]:
            pending["latents_flip"].append(
                encode_images(vae, images.flip(-1), generator, settings["sample_posterior"]).cpu())
        pending["labels"].append(labels)
        bar.update(len(indices))
        if indices[-1] == end - 1:
            arrays = {
                "latents": torch.cat(pending["latents"]).numpy().astype(settings["dtype"]),  # (n, C, h, w)
                "labels": torch.cat(pending["labels"]).numpy().astype(np.int64),            # (n,)
                "indices": np.arange(start, end, dtype=np.int64),                           # (n,)
                "paths": np.array([path for path, _ in dataset.samples[start:end]], dtype=np.str_),
                "meta": np.array(json.dumps({**settings, "start": start, "end": end}), dtype=np.str_),
            }
            if settings["flip"]:
                arrays["latents_flip"] = torch.cat(pending["latents_flip"]).numpy().astype(settings["dtype"])
            save_npz(folder / chunk_file_name(chunk_id), **arrays)
    bar.close()
    return todo


def write_latents_manifest(features_path: str | os.PathLike, dataset: ImageFolder, vae: Any,
                           settings: dict[str, Any]) -> dict[str, Any]:
    """Check every chunk exists with these settings, then write manifest.json atomically (the last step)."""
    folder = Path(features_path)
    plan = plan_chunks(dataset.num_images, settings["chunk_size"])
    complete = find_complete_chunks(folder, dataset, settings)
    missing = [chunk_file_name(c) for c in range(len(plan)) if c not in complete]
    if missing:
        raise UserError(f"--features_path {str(folder)!r} lacks {len(missing)} chunk(s) (first: {missing[0]}); "
                         f"rerun extract_features.py with the same flags to finish")
    with np.load(folder / chunk_file_name(0), allow_pickle=False) as chunk:
        latent_shape = list(chunk["latents"].shape[1:])
    scale, shift = vae_scale_and_shift(vae)
    manifest = {
        "format": LATENTS_FORMAT, "version": LATENTS_FORMAT_VERSION,
        "vae": settings["vae"], "scaling_factor": scale, "shift_factor": shift,
        "image_size": settings["image_size"], "latent_shape": latent_shape, "dtype": settings["dtype"],
        "num_images": dataset.num_images, "num_classes": dataset.num_classes, "class_names": dataset.classes,
        "flip": settings["flip"], "sample_posterior": settings["sample_posterior"], "seed": settings["seed"],
        "chunk_size": settings["chunk_size"],
        "chunks": [{"file": chunk_file_name(c), "start": s, "end": e} for c, (s, e) in enumerate(plan)],
    }
    write_json(folder / MANIFEST_NAME, manifest)
    return manifest
