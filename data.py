"""Training data: built-in digits, VAE latents written by extract_features.py, and image folders.

Every dataset item is ``(x, y)``: ``x`` a float32 tensor (pixels in [-1, 1], or scaled VAE latents) and ``y`` a 0-dim
int64 class label. ``create_dataset`` picks the dataset named by ``--dataset`` and resolves the model's input settings
(channels, image size, latent or pixel space, number of classes) from the data.

Sharding across processes: a dataset with ``is_sharded = True`` (``LatentDataset``) already holds only this process's
shard, so the trainer indexes all of it; the others (digits, image folders) hold everything and the trainer splits
indices across ranks itself.

Latent storage format (``--feature_path`` folder, written by ``extract_features.py``)::

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

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Collection, Iterable

import numpy as np
import torch
from torch.utils.data import Dataset

from checkpoint import atomic_write
from config import ModelConfig, TrainConfig

LATENTS_FORMAT = "fpdm-latents"
LATENTS_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
VAE_SHORTCUTS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")
VAE_DOWNSAMPLING = 8  # ModelConfig.input_size assumes image_size // 8 latents (the Stable Diffusion VAE)
DATASETS = ("digits", "latents", "imagefolder")


#################################################################################
#                              Built-in digits                                  #
#################################################################################

def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 handwritten digits as images (N, 1, 8, 8) in [-1, 1] and labels (N,) int64."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    pixels = torch.from_numpy(digits.images.astype(np.float32))  # (N, 8, 8), integer levels 0..16
    images = (pixels / 8.0 - 1.0).unsqueeze(1)                   # (N, 1, 8, 8), 0 -> -1 and 16 -> 1
    labels = torch.from_numpy(digits.target.astype(np.int64))    # (N,)
    return images, labels


class DigitsDataset(Dataset):
    """The built-in digits in pixel space (1 channel, 8x8, 10 classes); the whole set on every rank."""

    is_sharded = False
    num_classes = 10

    def __init__(self):
        self.images, self.labels = load_digits_tensors()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]


#################################################################################
#                               Image folders                                   #
#################################################################################

def center_crop_image(image: "Image.Image", image_size: int) -> np.ndarray:
    """ADM/DiT centre crop: halve (BOX) while the short side >= 2*size, bicubic-resize short side to size, crop."""
    from PIL import Image
    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    pixels = np.asarray(image)                             # (H, W, 3) uint8, short side == image_size
    top = (pixels.shape[0] - image_size) // 2
    left = (pixels.shape[1] - image_size) // 2
    return pixels[top:top + image_size, left:left + image_size]


def list_image_folder(root: str | os.PathLike) -> tuple[list[str], list[tuple[str, int]]]:
    """Sorted class folder names and (relative path, label) pairs, images sorted within each class."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--data_path {str(root)!r} is not a folder (expected one sub-folder per class)")
    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    samples = []
    for label, name in enumerate(classes):
        for folder, subfolders, files in os.walk(root / name):
            subfolders.sort()
            for file in sorted(files):
                if file.lower().endswith(IMAGE_EXTENSIONS) and not file.startswith("."):
                    samples.append(((Path(folder) / file).relative_to(root).as_posix(), label))
    if not samples:
        raise ValueError(f"--data_path {str(root)!r} holds no images: expected class sub-folders containing "
                         f"{', '.join(IMAGE_EXTENSIONS)} files (found {len(classes)} sub-folders)")
    return classes, samples


class ImageFolderDataset(Dataset):
    """Class sub-folders of images (sorted names -> labels 0, 1, ...), centre-cropped RGB in [-1, 1].

    random_flip=True serves every image twice: items [0, N) as stored and items [N, 2N) mirrored left-right, so a
    shuffled sampler draws a random flip without any random state in the dataset (an epoch sees both versions).
    """

    is_sharded = False

    def __init__(self, root: str | os.PathLike, image_size: int, random_flip: bool = True):
        if image_size < 1:
            raise ValueError(f"--image_size must be positive, got {image_size}")
        self.root = Path(root)
        self.image_size = image_size
        self.random_flip = random_flip
        self.classes, self.samples = list_image_folder(self.root)
        self.num_classes = len(self.classes)
        self.num_images = len(self.samples)

    def __len__(self) -> int:
        return self.num_images * (2 if self.random_flip else 1)

    def load_image(self, image_index: int) -> torch.Tensor:
        """Image `image_index` of the sorted list, centre-cropped, as a (3, H, W) float tensor in [-1, 1]."""
        from PIL import Image
        path = self.root / self.samples[image_index][0]
        try:
            with Image.open(path) as image:
                pixels = center_crop_image(image.convert("RGB"), self.image_size)
        except OSError as error:
            raise ValueError(f"--data_path: cannot read image {str(path)!r}: {error}") from error
        image = torch.from_numpy(pixels.copy()).permute(2, 0, 1)  # (3, H, W) uint8 (copy: PIL arrays are read-only)
        return image.float() / 127.5 - 1.0

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        image_index, mirrored = index % self.num_images, index >= self.num_images
        image = self.load_image(image_index)
        if mirrored:
            image = image.flip(-1)
        return image, torch.tensor(self.samples[image_index][1], dtype=torch.int64)


#################################################################################
#                                     VAE                                       #
#################################################################################

def resolve_vae_name(name_or_path: str) -> str:
    """Expand the shortcuts ema/mse to their hub names; local folders become absolute paths."""
    if name_or_path in VAE_SHORTCUTS:
        return VAE_SHORTCUTS[name_or_path]
    if os.path.isdir(os.path.expanduser(name_or_path)):
        return os.path.abspath(os.path.expanduser(name_or_path))
    return name_or_path


def _local_vae_folder(name_or_path: str) -> tuple[str, str | None] | None:
    """(folder, subfolder) when `name_or_path` is a local VAE (or a pipeline folder with a vae/ sub-folder)."""
    path = Path(os.path.expanduser(name_or_path))
    looks_like_path = name_or_path.startswith(("/", "./", "../", "~")) or path.exists()
    if not looks_like_path:
        return None
    if not path.is_dir():
        raise FileNotFoundError(f"--vae {name_or_path!r}: no such folder (expected a save_pretrained AutoencoderKL "
                                f"folder with config.json, or a hub name such as ema / mse)")
    if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        return str(path), "vae"
    return str(path), None


def load_vae(name_or_path: str, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> "AutoencoderKL":
    """diffusers AutoencoderKL from a local folder or hub name (ema/mse shortcuts), in eval mode, frozen."""
    from diffusers import AutoencoderKL
    if not name_or_path:
        raise ValueError("--vae is empty: pass a local AutoencoderKL folder or a hub name (ema, mse)")
    local = _local_vae_folder(name_or_path)
    source = local[0] if local else resolve_vae_name(name_or_path)
    kwargs = {"subfolder": local[1]} if local and local[1] else {}
    try:
        vae = AutoencoderKL.from_pretrained(source, torch_dtype=dtype, **kwargs)
    except Exception as error:  # hub/network/format errors all become one actionable message
        raise ValueError(
            f"--vae {name_or_path!r}: could not load an AutoencoderKL from {source!r} ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}). Without network access, download it elsewhere "
            f"(e.g. `huggingface-cli download {VAE_SHORTCUTS['ema']} --local-dir sd-vae-ft-ema`) and pass "
            f"--vae <local folder>.") from error
    return vae.to(device).eval().requires_grad_(False)


def vae_scale_and_shift(vae: Any) -> tuple[float, float]:
    """The latent scaling factor (0.18215 for SD VAEs) and shift (None -> 0) from the VAE's config."""
    shift = getattr(vae.config, "shift_factor", None)
    return float(vae.config.scaling_factor), float(shift or 0.0)


def vae_downsampling(vae_config: Any) -> int:
    """Spatial downsampling factor of an AutoencoderKL: 2 per encoder level after the first."""
    channels = vae_config["block_out_channels"] if isinstance(vae_config, dict) else vae_config.block_out_channels
    return 2 ** (len(channels) - 1)


@torch.no_grad()
def encode_images(vae: Any, images: torch.Tensor, generator: torch.Generator | None = None,
                  sample_posterior: bool = True) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] -> scaled latents (N, C, H/f, W/f) = (z - shift) * scaling_factor.

    sample_posterior=True draws z from the encoder's Gaussian (as DiT does; `generator` seeds it, a CPU generator
    works for any device); False uses its mean.
    """
    weight = next(vae.parameters())
    posterior = vae.encode(images.to(device=weight.device, dtype=weight.dtype)).latent_dist
    z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
    scale, shift = vae_scale_and_shift(vae)
    return ((z - shift) * scale).float()


@torch.no_grad()
def decode_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents (N, C, h, w) -> images (N, 3, h*f, w*f) clamped to [-1, 1]."""
    weight = next(vae.parameters())
    scale, shift = vae_scale_and_shift(vae)
    z = latents.to(device=weight.device, dtype=weight.dtype) / scale + shift
    return vae.decode(z).sample.clamp(-1.0, 1.0).float()


#################################################################################
#                            Latent storage format                              #
#################################################################################

def chunk_file_name(chunk_id: int) -> str:
    """File name of chunk `chunk_id` inside a feature folder."""
    return f"chunk_{chunk_id:06d}.npz"


def plan_chunks(num_images: int, chunk_size: int) -> list[tuple[int, int]]:
    """[start, end) image ranges of consecutive chunks of `chunk_size` images (the last may be shorter)."""
    if chunk_size < 1:
        raise ValueError(f"--chunk_size must be positive, got {chunk_size}")
    return [(start, min(start + chunk_size, num_images)) for start in range(0, num_images, chunk_size)]


def write_chunk(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write one chunk .npz atomically (a crash never leaves a half-written chunk under its final name)."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as file:  # a file object: np.savez would append .npz to a path
            np.savez(file, **arrays)
    atomic_write(path, write)


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write a JSON file atomically (temp file + rename)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=2)))


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
        raise ValueError("--feature_path is empty: pass the folder written by extract_features.py")
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
        raise ValueError(f"--feature_path: {str(manifest_path)!r} is not valid JSON ({error})") from error
    if manifest.get("format") != LATENTS_FORMAT or manifest.get("version") != LATENTS_FORMAT_VERSION:
        raise ValueError(f"--feature_path: {str(manifest_path)!r} is not a {LATENTS_FORMAT} "
                         f"v{LATENTS_FORMAT_VERSION} manifest (format={manifest.get('format')!r}, "
                         f"version={manifest.get('version')!r})")
    if not manifest.get("chunks") or int(manifest.get("num_images", 0)) < 1:
        raise ValueError(f"--feature_path {str(folder)!r} is empty: its manifest lists no latents")
    return manifest


#################################################################################
#                              Feature extraction                               #
#################################################################################

def extraction_settings(vae_name: str, image_size: int, flip: bool, chunk_size: int, seed: int,
                        sample_posterior: bool, dtype: str) -> dict[str, Any]:
    """The settings a chunk depends on; stored in every chunk and compared when resuming."""
    if dtype not in ("float32", "float16"):
        raise ValueError(f"--dtype must be float32 or float16, got {dtype!r}")
    return {"vae": resolve_vae_name(vae_name), "image_size": int(image_size), "flip": bool(flip),
            "chunk_size": int(chunk_size), "seed": int(seed), "sample_posterior": bool(sample_posterior),
            "dtype": dtype}


def find_complete_chunks(features_path: str | os.PathLike, dataset: ImageFolderDataset, settings: dict[str, Any],
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
            raise ValueError(f"--features_path {str(folder)!r} already holds {chunk_file_name(chunk_id)} made "
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


def extract_latent_chunks(dataset: ImageFolderDataset, features_path: str | os.PathLike, vae: Any,
                          settings: dict[str, Any], chunk_ids: Iterable[int], batch_size: int = 32,
                          num_workers: int = 0, progress: bool = False) -> list[int]:
    """Encode the given chunks that are not complete on disk and write each atomically; returns the ids written."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm
    if batch_size < 1:
        raise ValueError(f"--batch_size must be positive, got {batch_size}")
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
            write_chunk(folder / chunk_file_name(chunk_id), arrays)
    bar.close()
    return todo


def write_latents_manifest(features_path: str | os.PathLike, dataset: ImageFolderDataset, vae: Any,
                           settings: dict[str, Any]) -> dict[str, Any]:
    """Check every chunk exists with these settings, then write manifest.json atomically (the last step)."""
    folder = Path(features_path)
    plan = plan_chunks(dataset.num_images, settings["chunk_size"])
    complete = find_complete_chunks(folder, dataset, settings)
    missing = [chunk_file_name(c) for c in range(len(plan)) if c not in complete]
    if missing:
        raise ValueError(f"--features_path {str(folder)!r} lacks {len(missing)} chunk(s) (first: {missing[0]}); "
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
    write_json_atomic(folder / MANIFEST_NAME, manifest)
    return manifest


#################################################################################
#                               Latent dataset                                  #
#################################################################################

class LatentDataset(Dataset):
    """This process's shard of a feature folder: latents (C, h, w) float32 and labels, read from chunk files.

    Sharding is contiguous over image indices: with N images and W processes, rank r holds images
    [r * (N // W), (r + 1) * (N // W)) and reads only the chunks overlapping that range; every rank has the same
    length and the last N % W images are left out. With flipped copies (extracted with --flip True) and
    use_flips=True, items [0, n) are the shard's latents and items [n, 2n) their mirrored versions, so a shuffled
    sampler draws a random flip with no random state here.
    """

    is_sharded = True

    def __init__(self, feature_path: str | os.PathLike, rank: int = 0, world_size: int = 1, use_flips: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.folder = Path(feature_path)
        self.manifest = read_manifest(feature_path)
        self.image_size = int(self.manifest["image_size"])
        self.latent_shape = tuple(int(n) for n in self.manifest["latent_shape"])
        self.num_classes = int(self.manifest["num_classes"])
        self.class_names = list(self.manifest["class_names"])
        self.has_flips = bool(self.manifest["flip"]) and use_flips

        total = int(self.manifest["num_images"])
        per_rank = total // world_size
        if per_rank < 1:
            raise ValueError(f"--feature_path {str(self.folder)!r} holds {total} latents, fewer than the "
                             f"{world_size} processes")
        first, last = rank * per_rank, (rank + 1) * per_rank   # this shard's image range [first, last)
        latents, flips, labels, indices = [], [], [], []
        self.chunk_files = []
        for entry in self.manifest["chunks"]:
            start, end = int(entry["start"]), int(entry["end"])
            if end <= first or start >= last:
                continue
            chunk = self._read_chunk(entry)
            keep = slice(max(first, start) - start, min(last, end) - start)
            latents.append(chunk["latents"][keep])
            labels.append(chunk["labels"][keep])
            indices.append(chunk["indices"][keep])
            if self.has_flips:
                flips.append(chunk["latents_flip"][keep])
            self.chunk_files.append(entry["file"])
        self.latents = torch.from_numpy(np.concatenate(latents))                      # (n, C, h, w)
        self.latents_flip = torch.from_numpy(np.concatenate(flips)) if self.has_flips else None
        self.labels = torch.from_numpy(np.concatenate(labels))                        # (n,) int64
        self.indices = torch.from_numpy(np.concatenate(indices))                      # (n,) int64
        if not torch.equal(self.indices, torch.arange(first, last)):
            raise ValueError(f"--feature_path {str(self.folder)!r}: chunks do not cover images [{first}, {last}) "
                             f"exactly; the manifest does not match its chunk files")

    def _read_chunk(self, entry: dict[str, Any]) -> dict[str, np.ndarray]:
        """Load one chunk and check its arrays agree with each other and with the manifest."""
        path = self.folder / entry["file"]
        if not path.is_file():
            raise FileNotFoundError(f"--feature_path {str(self.folder)!r}: chunk {entry['file']!r} listed in the "
                                    f"manifest is missing; rerun extract_features.py with the same flags")
        with np.load(path, allow_pickle=False) as chunk:
            arrays = {name: chunk[name] for name in chunk.files if name in
                      ("latents", "latents_flip", "labels", "indices")}
        count = int(entry["end"]) - int(entry["start"])
        problems = []
        for name in ("latents", "labels", "indices") + (("latents_flip",) if self.has_flips else ()):
            if name not in arrays:
                problems.append(f"no '{name}' array")
            elif arrays[name].shape[0] != count:
                problems.append(f"'{name}' has {arrays[name].shape[0]} rows, expected {count}")
        if not problems:
            if tuple(arrays["latents"].shape[1:]) != self.latent_shape:
                problems.append(f"latents of shape {arrays['latents'].shape[1:]}, expected {self.latent_shape}")
            if not np.array_equal(arrays["indices"], np.arange(int(entry["start"]), int(entry["end"]))):
                problems.append("indices differ from the manifest's range")
            if arrays["labels"].size and not (0 <= arrays["labels"].min() and
                                              arrays["labels"].max() < self.num_classes):
                problems.append(f"labels outside [0, {self.num_classes})")
        if problems:
            raise ValueError(f"--feature_path: chunk {str(path)!r} is inconsistent: {'; '.join(problems)}")
        arrays["labels"] = arrays["labels"].astype(np.int64)
        arrays["indices"] = arrays["indices"].astype(np.int64)
        return arrays

    def __len__(self) -> int:
        return self.latents.shape[0] * (2 if self.has_flips else 1)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        count = self.latents.shape[0]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        source = self.latents if index < count else self.latents_flip
        return source[index % count].float(), self.labels[index % count]


#################################################################################
#                              Dataset selection                                #
#################################################################################

def _given(model_cfg: ModelConfig, explicit: Collection[str] | None) -> set[str]:
    """ModelConfig fields the user set: `explicit` when known, else those differing from the defaults."""
    if explicit is not None:
        return set(explicit)
    defaults = ModelConfig()
    return {f.name for f in dataclasses.fields(ModelConfig) if getattr(model_cfg, f.name) != getattr(defaults, f.name)}


def _resolve_num_classes(requested: int, found: int, given: set[str], source: str) -> int:
    """num_classes from the data, or 0 (unconditional) when requested; a given value must agree with the data."""
    if "num_classes" in given and requested not in (0, found):
        raise ValueError(f"--num_classes {requested} disagrees with {source}, which has {found} classes "
                         f"(pass --num_classes {found}, or 0 for an unconditional model)")
    return 0 if requested == 0 else found


def _local_vae_config(name_or_path: str) -> dict[str, Any] | None:
    """The config.json of a local VAE folder, read without loading weights (None for hub names)."""
    local = _local_vae_folder(name_or_path)
    if local is None:
        return None
    folder = Path(local[0]) / (local[1] or "")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"--vae {name_or_path!r}: {str(config_path)!r} not found")
    return json.loads(config_path.read_text())


def create_dataset(train_cfg: TrainConfig, model_cfg: ModelConfig, rank: int = 0, world_size: int = 1,
                   explicit: Collection[str] | None = None) -> tuple[Dataset, ModelConfig]:
    """The --dataset for this process and the ModelConfig with in_channels/image_size/latent/num_classes resolved.

    `explicit` names the ModelConfig fields given on the command line (None: fields differing from the defaults
    count as given); a given --image_size or --num_classes that contradicts the data is an error.
    """
    given = _given(model_cfg, explicit)
    name = train_cfg.dataset
    if name not in DATASETS:
        raise ValueError(f"--dataset {name!r} is unknown; choose one of {', '.join(DATASETS)}")
    for flag, value, owner in (("feature_path", train_cfg.feature_path, "latents"),
                               ("data_path", train_cfg.data_path, "imagefolder")):
        if value and name != owner:
            raise ValueError(f"--{flag} is set but --dataset is {name!r}; did you mean --dataset {owner}?")
    if train_cfg.vae and name != "imagefolder":
        raise ValueError(f"--vae only applies to --dataset imagefolder (got --dataset {name}); "
                         f"latents from extract_features.py are already encoded")

    if name == "digits":
        if model_cfg.image_size != 8:
            raise ValueError(f"--dataset digits holds 8x8 images: --image_size must be 8, got {model_cfg.image_size}")
        if model_cfg.num_classes not in (0, 10):
            raise ValueError(f"--dataset digits has 10 classes: --num_classes must be 10 (or 0 for an "
                             f"unconditional model), got {model_cfg.num_classes}")
        if "in_channels" in given and model_cfg.in_channels != 1:
            raise ValueError(f"--dataset digits is grayscale: --in_channels must be 1, got {model_cfg.in_channels}")
        return DigitsDataset(), dataclasses.replace(model_cfg, in_channels=1, latent=False)

    if name == "latents":
        dataset = LatentDataset(train_cfg.feature_path, rank, world_size)
        channels, height, width = dataset.latent_shape
        if "image_size" in given and model_cfg.image_size != dataset.image_size:
            raise ValueError(f"--image_size {model_cfg.image_size} disagrees with --feature_path "
                             f"{train_cfg.feature_path!r}, extracted at {dataset.image_size} px "
                             f"(pass --image_size {dataset.image_size} or leave it out)")
        if height != width or height * VAE_DOWNSAMPLING != dataset.image_size:
            raise ValueError(f"--feature_path {train_cfg.feature_path!r}: latents {height}x{width} for "
                             f"{dataset.image_size} px images; models expect image_size // {VAE_DOWNSAMPLING}")
        if "in_channels" in given and model_cfg.in_channels != channels:
            raise ValueError(f"--in_channels {model_cfg.in_channels} disagrees with --feature_path latents "
                             f"of {channels} channels")
        num_classes = _resolve_num_classes(model_cfg.num_classes, dataset.num_classes, given,
                                           f"--feature_path {train_cfg.feature_path!r}")
        return dataset, dataclasses.replace(model_cfg, image_size=dataset.image_size, in_channels=channels,
                                            latent=True, num_classes=num_classes)

    # imagefolder: pixels in [-1, 1]; with --vae the trainer encodes each batch with encode_images.
    if not train_cfg.data_path:
        raise ValueError("--dataset imagefolder needs --data_path (a folder of class sub-folders of images)")
    dataset = ImageFolderDataset(train_cfg.data_path, model_cfg.image_size, random_flip=True)
    num_classes = _resolve_num_classes(model_cfg.num_classes, dataset.num_classes, given,
                                       f"--data_path {train_cfg.data_path!r}")
    if not train_cfg.vae:
        if "in_channels" in given and model_cfg.in_channels != 3:
            raise ValueError(f"--in_channels must be 3 for RGB --dataset imagefolder, got {model_cfg.in_channels}")
        return dataset, dataclasses.replace(model_cfg, in_channels=3, latent=False, num_classes=num_classes)
    if model_cfg.image_size % VAE_DOWNSAMPLING:
        raise ValueError(f"--image_size {model_cfg.image_size} must be a multiple of {VAE_DOWNSAMPLING} "
                         f"with --vae (latents are image_size // {VAE_DOWNSAMPLING})")
    vae_config = _local_vae_config(train_cfg.vae)
    channels = int(vae_config.get("latent_channels", 4)) if vae_config else 4  # hub SD VAEs have 4
    if vae_config and vae_downsampling(vae_config) != VAE_DOWNSAMPLING:
        raise ValueError(f"--vae {train_cfg.vae!r} downsamples by {vae_downsampling(vae_config)}; models expect "
                         f"{VAE_DOWNSAMPLING}x latents")
    return dataset, dataclasses.replace(model_cfg, in_channels=channels, latent=True, num_classes=num_classes)

