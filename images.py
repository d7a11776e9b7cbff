"""Images on disk: uint8 conversion, PNG read/write, grids, and .npz archives (the one np.savez writer).

Sample archives use the ADM evaluator's format: an .npz with ``arr_0`` uint8 (N, H, W, 3) RGB images and, for
class-conditional models, ``arr_1`` (N,) int64 labels (written by sample_ddp.py, read by evaluate.py).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from checkpoint import atomic_write


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


def read_npz(path: str | Path, flag: str) -> dict[str, np.ndarray]:
    """All arrays of an .npz file (no pickles); any reader failure becomes a ValueError naming flag and file."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not hasattr(archive, "files"):
                raise ValueError("it holds a single .npy array, not an .npz archive")
            return {key: archive[key] for key in archive.files}
    except Exception as error:  # zipfile.BadZipFile, OSError, pickle refusal, truncated members, ...
        raise ValueError(f"{flag}: cannot read {path} as an .npz archive ({error})") from error


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
        raise ValueError(f"{flag}: {path} has no 'arr_0' array (found {sorted(arrays)}); expected an ADM-format .npz "
                         "as written by sample_ddp.py")
    images = arrays["arr_0"]
    labels = arrays.get("arr_1")
    if images.dtype != np.uint8:
        raise ValueError(f"{flag}: {path}: arr_0 must be uint8 (0..255); got {images.dtype}")
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{flag}: {path}: arr_0 must have shape (N, H, W, 3) (NHWC, RGB); got {images.shape}")
    if images.shape[0] == 0:
        raise ValueError(f"{flag}: {path}: arr_0 holds no images")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)                       # (N, H, W, 3)
    if labels is not None:
        if labels.ndim != 1 or labels.shape[0] != images.shape[0] or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{flag}: {path}: arr_1 (labels) must be integers of shape ({images.shape[0]},); "
                             f"got {labels.dtype} {labels.shape}")
        labels = labels.astype(np.int64)
    return images, labels
