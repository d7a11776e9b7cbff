"""Images on disk: uint8 conversion, PNG read/write, grids, and .npz archives (the one np.savez writer).

Sample archives use the ADM evaluator's format: an .npz with ``arr_0`` uint8 (N, H, W, 3) RGB images and, for
class-conditional models, ``arr_1`` (N,) int64 labels (written by sample_ddp.py, read by evaluate.py).

Image shards are sample_ddp.py's working files (sample_folders.py): an .npz holding ``indices`` int64 (n,) (which images),
``images`` uint8 (n, H, W, C) as generated (C = 1 for grayscale) and, for class-conditional models, ``labels``
int64 (n,). Each is written atomically, so a shard file on disk is always complete. ``pack_shards`` fills the
ADM archive from them through a memory-mapped temporary .npy, so 50,000 images are never held in memory twice.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from checkpoint import atomic_write
from config import UserError


#################################################################################
#                               uint8 conversion                                #
#################################################################################

def to_uint8(images: Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    scaled = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (N, C, H, W)
    return scaled.permute(0, 2, 3, 1).cpu().numpy()


def to_nchw_tensor(images: np.ndarray) -> Tensor:
    """uint8 (N, H, W, C) array -> uint8 (N, C, H, W) tensor."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()


def decode_to_uint8(samples: Tensor, model_config: Any, vae: Any = None) -> np.ndarray:
    """Model-space samples -> (N, H, W, C) uint8 pixels (latents decoded with the VAE, pixels as they are).

    A latent model without a VAE gets a preview: its first 3 latent channels scaled per image to [-1, 1].
    """
    if not model_config.latent:
        return to_uint8(samples)
    if vae is None:
        preview = samples[:, :3]                                        # (N, 3, h, w)
        low = preview.amin(dim=(1, 2, 3), keepdim=True)
        high = preview.amax(dim=(1, 2, 3), keepdim=True)
        return to_uint8((preview - low) / (high - low).clamp_min(1e-8) * 2 - 1)
    from vae import decode_latents
    return to_uint8(decode_latents(vae, samples))


#################################################################################
#                                     PNG                                       #
#################################################################################

def save_png(image: np.ndarray, path: str | Path) -> None:
    """Write one (H, W, C) uint8 image as PNG (grayscale for C = 1), atomically."""
    from PIL import Image
    if image.shape[-1] == 1:
        pil = Image.fromarray(image[..., 0], mode="L")
    else:
        pil = Image.fromarray(np.ascontiguousarray(image[..., :3]), mode="RGB")
    atomic_write(path, lambda tmp: pil.save(tmp, format="PNG"))


def load_png_rgb(path: str | Path) -> np.ndarray:
    """Read a PNG as (H, W, 3) uint8 RGB (grayscale repeated to 3 channels)."""
    from PIL import Image
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def make_grid(images: np.ndarray, nrow: Optional[int] = None, padding: int = 2, min_cell: int = 64) -> np.ndarray:
    """Tile (N, H, W, C) uint8 images into one (rows*(H+p)+p, nrow*(W+p)+p, C) image on a black background.

    Images smaller than `min_cell` pixels are enlarged by an integer factor (nearest neighbour) so that a grid of
    8x8 digits can be seen; the individual PNGs keep the model's resolution.
    """
    scale = max(1, math.ceil(min_cell / max(images.shape[1], images.shape[2])))
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)   # (N, H*s, W*s, C)
    num, height, width, channels = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(num)))
    rows = math.ceil(num / nrow)
    grid = np.zeros((rows * (height + padding) + padding, nrow * (width + padding) + padding, channels), np.uint8)
    for k in range(num):
        top = padding + (k // nrow) * (height + padding)
        left = padding + (k % nrow) * (width + padding)
        grid[top:top + height, left:left + width] = images[k]
    return grid


#################################################################################
#                                 .npz archives                                 #
#################################################################################

def save_npz(path: str | Path, **arrays: Any) -> None:
    """Write arrays to an uncompressed .npz atomically (a crash never leaves a half-written archive at `path`)."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:  # a file object: np.savez would append .npz to a path
            np.savez(handle, **arrays)
    atomic_write(path, write)


def read_npz(path: str | Path, flag: str, keys: Optional[Sequence[str]] = None) -> dict[str, np.ndarray]:
    """All arrays of an .npz file, or only `keys` (others are not read; no pickles); any reader failure (a missing
    key included) becomes a ValueError naming flag and file."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not hasattr(archive, "files"):
                raise ValueError("it holds a single .npy array, not an .npz archive")
            missing = [key for key in keys or () if key not in archive.files]
            if missing:
                raise ValueError(f"it has no {missing} array (found {sorted(archive.files)})")
            return {key: archive[key] for key in (archive.files if keys is None else keys)}
    except Exception as error:  # zipfile.BadZipFile, OSError, pickle refusal, truncated members, ...
        raise UserError(f"{flag}: cannot read {path} as an .npz archive ({error})") from error


def save_sample_npz(path: str | Path, images: np.ndarray, labels: Optional[np.ndarray] = None) -> None:
    """Write an ADM-format archive: arr_0 uint8 (N, H, W, 3), arr_1 (N,) int64 labels when given."""
    arrays = {"arr_0": images}
    if labels is not None:
        arrays["arr_1"] = np.asarray(labels).astype(np.int64)
    save_npz(path, **arrays)


def load_sample_npz(path: str, flag: str = "--samples") -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Read an ADM-format archive: arr_0 uint8 (N, H, W, 3) RGB (grayscale repeated), optional arr_1 labels."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag}: sample file not found: {path}")
    arrays = read_npz(path, flag)
    if "arr_0" not in arrays:
        raise UserError(f"{flag}: {path} has no 'arr_0' array (found {sorted(arrays)}); expected an ADM-format .npz "
                         "as written by sample_ddp.py")
    images = arrays["arr_0"]
    labels = arrays.get("arr_1")
    if images.dtype != np.uint8:
        raise UserError(f"{flag}: {path}: arr_0 must be uint8 (0..255); got {images.dtype}")
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise UserError(f"{flag}: {path}: arr_0 must have shape (N, H, W, 3) (NHWC, RGB); got {images.shape}")
    if images.shape[0] == 0:
        raise UserError(f"{flag}: {path}: arr_0 holds no images")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)                       # (N, H, W, 3)
    if labels is not None:
        if labels.ndim != 1 or labels.shape[0] != images.shape[0] or not np.issubdtype(labels.dtype, np.integer):
            raise UserError(f"{flag}: {path}: arr_1 (labels) must be integers of shape ({images.shape[0]},); "
                             f"got {labels.dtype} {labels.shape}")
        labels = labels.astype(np.int64)
    return images, labels


def to_rgb(images: np.ndarray) -> np.ndarray:
    """(N, H, W, C) uint8 -> (N, H, W, 3): grayscale repeated, extra channels dropped (as PNGs store them)."""
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images[..., :3]


#################################################################################
#                                 Image shards                                  #
#################################################################################

def save_shard(path: str | Path, indices: Sequence[int], images: np.ndarray,
               labels: Optional[np.ndarray] = None) -> None:
    """Write one shard atomically: indices (n,), uint8 images (n, H, W, C) and, when conditional, labels (n,)."""
    indices = np.asarray(indices, dtype=np.int64)                   # (n,)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != indices.shape[0]:
        raise ValueError(f"a shard needs uint8 (n, H, W, C) images for its {indices.shape[0]} indices; "
                         f"got {images.dtype} {images.shape}")
    arrays = {"indices": indices, "images": images}
    if labels is not None:
        arrays["labels"] = np.asarray(labels).astype(np.int64)      # (n,)
    save_npz(path, **arrays)


def read_shard_indices(path: str | Path, flag: str) -> np.ndarray:
    """The image indices a shard holds, (n,) int64 (its images are not read)."""
    indices = read_npz(path, flag, keys=["indices"])["indices"]
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
        raise UserError(f"{flag}: {path}: 'indices' must be a 1-D integer array; got {indices.dtype} {indices.shape}")
    return indices.astype(np.int64)


def read_shard(path: str | Path, flag: str) -> dict[str, np.ndarray]:
    """A whole shard, checked: indices (n,) int64, images uint8 (n, H, W, C), labels (n,) int64 when present."""
    arrays = read_npz(path, flag)
    indices, images, labels = arrays.get("indices"), arrays.get("images"), arrays.get("labels")
    if indices is None or images is None:
        raise UserError(f"{flag}: {path} is not an image shard (arrays {sorted(arrays)}; expected indices, images)")
    count = indices.shape[0] if indices.ndim == 1 else -1
    if count < 0 or images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != count:
        raise UserError(f"{flag}: {path}: expected indices (n,) and uint8 images (n, H, W, C); got indices "
                         f"{indices.shape}, images {images.dtype} {images.shape}")
    if labels is not None and labels.shape != (count,):
        raise UserError(f"{flag}: {path}: labels must have shape ({count},); got {labels.shape}")
    return {"indices": indices.astype(np.int64), "images": images,
            **({} if labels is None else {"labels": labels.astype(np.int64)})}


def pack_shards(path: str | Path, shards: Sequence[str | Path], num_images: int,
                labels: Optional[np.ndarray] = None, flag: str = "--sample_dir") -> tuple[int, ...]:
    """Write images 0..num_images-1 found in `shards` as an ADM archive at `path` (atomically); returns arr_0's
    shape. Every index below num_images must occur exactly once across the shards (larger ones are skipped);
    `labels` (num_images,) becomes arr_1 and must equal the labels the shards recorded.

    The images go into a memory-mapped temporary .npy beside `path`, shard by shard, and np.savez streams it into
    the archive: memory holds one shard at a time, not the whole set.
    """
    path = Path(path)
    scratch = path.parent / f".{path.name}.pack.npy.tmp"
    filled = np.zeros(num_images, dtype=bool)                        # (N,)
    pixels: Optional[np.ndarray] = None                              # (N, H, W, 3) memmap once the size is known
    try:
        for shard_path in shards:
            shard = read_shard(shard_path, flag)
            keep = shard["indices"] < num_images                     # (n,)
            indices = shard["indices"][keep]
            if pixels is None:
                height, width = shard["images"].shape[1:3]
                pixels = np.lib.format.open_memmap(scratch, mode="w+", dtype=np.uint8,
                                                   shape=(num_images, height, width, 3))
            if shard["images"].shape[1:3] != pixels.shape[1:3]:
                raise UserError(f"{flag}: {shard_path} holds {shard['images'].shape[1:3]} images, others "
                                 f"{pixels.shape[1:3]}")
            if filled[indices].any() or len(np.unique(indices)) != len(indices):
                repeated = sorted(set(indices[filled[indices]].tolist()))[:5] or "within the shard"
                raise UserError(f"{flag}: image indices {repeated} occur in more than one shard (e.g. {shard_path})")
            recorded = shard.get("labels")
            if labels is not None and (recorded is None or not np.array_equal(recorded[keep],
                                                                               np.asarray(labels)[indices])):
                raise UserError(f"{flag}: {shard_path} holds other class labels than this setup draws")
            pixels[indices] = to_rgb(shard["images"][keep])          # (n, H, W, 3)
            filled[indices] = True
        if not filled.all():
            missing = np.flatnonzero(~filled)
            raise UserError(f"{flag}: {len(missing)} images missing from the shards (first {missing[:5].tolist()})")
        save_sample_npz(path, pixels, labels)
        return tuple(pixels.shape)
    finally:
        del pixels                                                    # close the memory map before removing it
        if scratch.exists():
            scratch.unlink()
