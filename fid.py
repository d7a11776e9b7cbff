"""
FID and friends for evaluating FPDM / DiT samples (issue 4, "evaluate.py (FID and friends)"; paper Sec. 4.2).

What lives here (evaluate.py is only a command-line front end to these functions):
  * `frechet_distance`: the Fréchet distance between two Gaussians fitted to feature sets,
        d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}),
    with scipy's matrix square root and the usual handling of complex round-off.
  * `FeatureStats`: (mu, sigma, n) of a feature set, saved to / loaded from `.npz` (reference statistics cache).
  * A digits feature extractor: a small CNN classifier trained here on scikit-learn's 8x8 digits; its 64-d
    penultimate features give a "digits-FID" and its predictions give the classifier accuracy of
    class-conditional samples. Weights can be cached to a safetensors file.
  * The standard FID Inception-V3 (2048-d pool features) loaded from a local TorchScript file (see
    `load_inception_torchscript`); nothing is downloaded at run time.
  * ADM-format sample archives (`.npz` with `arr_0` uint8 (N, H, W, 3) RGB and optional `arr_1` labels),
    as written by sample_ddp.py, and a JSON-lines evaluation record that keeps the full setup beside the number.

Why the Inception loader is a TorchScript file and not a pip package: the maintained PyTorch FID packages
(`pytorch-fid`, `torch-fidelity` 0.4.0, `clean-fid` 0.1.35) all declare torchvision as a hard dependency and import
it when the package is imported (torch-fidelity's `__init__` pulls in `utils.py` / `datasets.py`, clean-fid's
`features.py` pulls in `inception_pytorch.py`, both `import torchvision`), which this project cannot load. The
TorchScript export of the TensorFlow FID Inception (`inception-2015-12-05.pt`, the file NVlabs' StyleGAN2-ADA /
StyleGAN3 / EDM metrics and clean-fid use) needs only torch, resizes internally and returns the 2048-d pool
features when called as `model(images_uint8_nchw, return_features=True)`.
"""
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import linalg

from checkpoint import atomic_write


SAMPLE_SETUP_FILE = "setup.json"  # written by sample_ddp.py next to the samples .npz
FID_REFERENCE_NUM_SAMPLES = 50_000  # paper Sec. 4.1: "all evaluations were performed using 50000 images (FID-50K)"

INCEPTION_FID_NOTE = (
    "in-repo Inception FID: not comparable to the paper's TensorFlow-evaluator numbers unless the standard weights "
    "(inception-2015-12-05 TorchScript) and the standard reference batch (e.g. ADM's VIRTUAL_imagenet256_labeled.npz) "
    "are used, with 50,000 samples"
)
DIGITS_FID_NOTE = (
    "digits-FID: Fréchet distance of the 64-d penultimate features of this repo's digits classifier; comparable only "
    "between evaluations that use the same classifier weights (see feature_extractor) and the same reference set; "
    "not comparable to any Inception FID"
)


#################################################################################
#                              Fréchet Distance                                 #
#################################################################################

def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6,
    imaginary_tol: float = 1e-3,
) -> float:
    """Fréchet distance ||mu1-mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)) between two Gaussians."""
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"frechet_distance: mean vectors differ in shape: {mu1.shape} vs {mu2.shape}")
    dim = mu1.shape[0]
    if sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(
            f"frechet_distance: covariances must be ({dim}, {dim}); got {sigma1.shape} and {sigma2.shape}")
    for name, array in (("mu1", mu1), ("mu2", mu2), ("sigma1", sigma1), ("sigma2", sigma2)):
        if not np.all(np.isfinite(array)):
            raise ValueError(f"frechet_distance: {name} contains NaN or inf")

    mean_term = float(np.sum((mu1 - mu2) ** 2))

    # Matrix square root of the product. A (near-)singular product (e.g. fewer samples than feature dimensions)
    # can make sqrtm return inf/NaN; then regularise both covariances with eps * I and try again.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        covmean = linalg.sqrtm(sigma1 @ sigma2)
    singular = any("singular" in str(w.message).lower() for w in caught)
    if singular or not np.all(np.isfinite(covmean)):
        offset = eps * np.eye(dim)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if not np.all(np.isfinite(covmean)):
            raise ValueError("frechet_distance: matrix square root is not finite even after adding eps * I")

    # S1 S2 has real non-negative eigenvalues (it is similar to S1^{1/2} S2 S1^{1/2}), so an imaginary part is
    # numerical round-off: drop it when tiny, refuse when it is large (it would mean bad covariances).
    if np.iscomplexobj(covmean):
        largest_imaginary = float(np.max(np.abs(covmean.imag)))
        if largest_imaginary > imaginary_tol * max(1.0, float(np.max(np.abs(covmean.real)))):
            raise ValueError(
                f"frechet_distance: sqrtm(sigma1 @ sigma2) has a large imaginary component ({largest_imaginary:.3g}); "
                "the covariances are probably not positive semi-definite")
        covmean = covmean.real

    trace_term = float(np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))
    return mean_term + trace_term


#################################################################################
#                     Feature Statistics (reference cache)                      #
#################################################################################

def _read_npz(path: str, flag: str) -> dict:
    """All arrays of an .npz file (no pickles); any reader failure becomes a ValueError naming flag and file."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not hasattr(archive, "files"):
                raise ValueError("it holds a single .npy array, not an .npz archive")
            return {key: archive[key] for key in archive.files}
    except Exception as error:  # zipfile.BadZipFile, OSError, pickle refusal, truncated members, ...
        raise ValueError(f"{flag}: cannot read {path} as an .npz archive ({error})") from error


@dataclass
class FeatureStats:
    """Mean and covariance of a feature set, plus where they came from."""
    mu: np.ndarray                 # (D,)
    sigma: np.ndarray              # (D, D)
    n: int                         # number of feature vectors (0 if unknown, e.g. third-party stats)
    feature_extractor: str = ""    # fingerprint of the extractor ("" if unknown)
    source: str = ""               # what the features were computed from

    @classmethod
    def from_features(cls, features: np.ndarray, feature_extractor: str = "", source: str = "") -> "FeatureStats":
        """Fit mean and (unbiased) covariance to features of shape (N, D)."""
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2:
            raise ValueError(f"features must have shape (N, D); got {features.shape}")
        if features.shape[0] < 2:
            raise ValueError(f"need at least 2 feature vectors to estimate a covariance; got {features.shape[0]}")
        mu = features.mean(axis=0)                                   # (D,)
        sigma = np.cov(features, rowvar=False)                       # (D, D)
        return cls(mu=mu, sigma=np.atleast_2d(sigma), n=int(features.shape[0]),
                   feature_extractor=feature_extractor, source=source)

    def save(self, path: str) -> None:
        """Write to `.npz` atomically (keys mu, sigma, n, feature_extractor, source)."""
        def write(tmp: str) -> None:
            with open(tmp, "wb") as handle:  # a file object: np.savez would append .npz to a path
                np.savez(handle, mu=self.mu, sigma=self.sigma, n=np.int64(self.n),
                         feature_extractor=np.str_(self.feature_extractor), source=np.str_(self.source))
        atomic_write(path, write)

    @classmethod
    def load(cls, path: str, flag: str = "--ref_stats") -> "FeatureStats":
        """Read from `.npz` with keys mu and sigma (ADM reference batches also work: other keys are ignored)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{flag}: reference statistics file not found: {path}")
        arrays = _read_npz(path, flag)
        if not {"mu", "sigma"} <= set(arrays):
            raise ValueError(f"{flag}: {path} is not a statistics file: needs arrays 'mu' and 'sigma', "
                             f"has {sorted(arrays)}")
        mu = np.asarray(arrays["mu"], dtype=np.float64)
        sigma = np.asarray(arrays["sigma"], dtype=np.float64)
        n = int(arrays["n"]) if "n" in arrays else 0
        feature_extractor = str(arrays["feature_extractor"]) if "feature_extractor" in arrays else ""
        source = str(arrays["source"]) if "source" in arrays else os.path.basename(path)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"{flag}: {path} has mu {mu.shape} and sigma {sigma.shape}; expected (D,) and (D, D)")
        return cls(mu=mu, sigma=sigma, n=n, feature_extractor=feature_extractor, source=source)


def fid_from_stats(stats1: FeatureStats, stats2: FeatureStats) -> float:
    """Fréchet distance between two FeatureStats, refusing stats from different feature extractors."""
    if stats1.feature_extractor and stats2.feature_extractor and stats1.feature_extractor != stats2.feature_extractor:
        raise ValueError(
            f"statistics come from different feature extractors: {stats1.feature_extractor!r} "
            f"({stats1.source}) vs {stats2.feature_extractor!r} ({stats2.source})")
    if stats1.mu.shape != stats2.mu.shape:
        raise ValueError(f"feature dimensions differ: {stats1.mu.shape[0]} ({stats1.source}) vs "
                         f"{stats2.mu.shape[0]} ({stats2.source})")
    return frechet_distance(stats1.mu, stats1.sigma, stats2.mu, stats2.sigma)


def load_or_compute_reference_stats(
    path: Optional[str], compute_fn: Callable[[], FeatureStats], feature_extractor: str = "", source: str = "",
    flag: str = "--ref_stats",
) -> FeatureStats:
    """Load cached reference stats from `path` if it exists, else compute them and cache them there.

    A cache made by another feature extractor or from another source (when both are recorded) is refused.
    """
    if path is not None and os.path.exists(path):
        stats = FeatureStats.load(path, flag=flag)
        if feature_extractor and stats.feature_extractor and stats.feature_extractor != feature_extractor:
            raise ValueError(
                f"{flag}: {path} was computed with feature extractor {stats.feature_extractor!r}, but this evaluation "
                f"uses {feature_extractor!r}; delete the file or pass another path")
        if source and stats.feature_extractor and stats.source != source:
            raise ValueError(f"{flag}: {path} holds statistics of {stats.source!r}, not of {source!r}; delete the file "
                             "or pass another path")
        return stats
    stats = compute_fn()
    if path is not None:
        stats.save(path)
    return stats


#################################################################################
#                              ADM-format samples                               #
#################################################################################

def load_npz_samples(path: str, flag: str = "--samples") -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Read an ADM-format archive: arr_0 uint8 (N, H, W, 3) RGB, optional arr_1 (N,) integer labels."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag}: sample file not found: {path}")
    arrays = _read_npz(path, flag)
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


def images_to_nchw_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) array -> uint8 (N, C, H, W) tensor."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()


#################################################################################
#                          Digits Feature Extractor                             #
#################################################################################

DIGITS_SPLIT_SEED = 0        # the train/test split of load_digits is fixed (independent of the classifier seed)
DIGITS_TEST_FRACTION = 0.25  # 1347 train / 450 test images
DIGITS_FEATURE_DIM = 64
DIGITS_CLASSIFIER_FORMAT = "fpdm-digits-classifier-v1"


def load_digits_split(split: str = "all") -> tuple[np.ndarray, np.ndarray]:
    """sklearn digits as uint8 (N, 8, 8, 3) RGB images (0..16 scaled to 0..255) and labels; split all|train|test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("all", "train", "test"):
        raise ValueError(f"--ref_split must be one of all, train, test; got {split!r}")
    digits = load_digits()
    gray = np.round(digits.images / 16.0 * 255.0).astype(np.uint8)      # (1797, 8, 8)
    images = np.repeat(gray[..., None], 3, axis=-1)                     # (1797, 8, 8, 3)
    labels = digits.target.astype(np.int64)
    if split == "all":
        return images, labels
    indices = np.arange(len(labels))
    train_idx, test_idx = train_test_split(
        indices, test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED, stratify=labels)
    chosen = np.sort(train_idx if split == "train" else test_idx)
    return images[chosen], labels[chosen]


def digits_classifier_inputs(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) images -> float (N, 1, 8, 8) in [-1, 1] (grayscale mean, area-downsampled to 8x8)."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"digits features need uint8 images of shape (N, H, W, C); got {images.dtype} {images.shape}")
    x = images_to_nchw_tensor(images).float() / 255.0 * 2.0 - 1.0       # (N, C, H, W)
    x = x.mean(dim=1, keepdim=True)                                     # (N, 1, H, W)
    height, width = x.shape[-2:]
    if (height, width) != (8, 8):
        if height % 8 == 0 and width % 8 == 0:
            x = F.avg_pool2d(x, kernel_size=(height // 8, width // 8))  # exact inverse of nearest upsampling
        else:
            x = F.interpolate(x, size=(8, 8), mode="bilinear", antialias=True, align_corners=False)
    return x                                                            # (N, 1, 8, 8)


class DigitsClassifier(nn.Module):
    """Small CNN for 8x8 digits; `features` gives the 64-d penultimate activations used for digits-FID."""

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


def _random_shifts(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by -1..1 pixels in each direction (background-padded): cheap augmentation."""
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)                                   # (N, 1, 10, 10)
    crops = torch.stack([padded[:, :, dy:dy + 8, dx:dx + 8] for dy in range(3) for dx in range(3)], dim=1)
    choice = torch.randint(0, 9, (x.shape[0],), generator=generator)              # (N,)
    return crops[torch.arange(x.shape[0]), choice]                                # (N, 1, 8, 8)


@torch.no_grad()
def _predict(model: DigitsClassifier, inputs: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    model.eval()
    return torch.cat([model(inputs[i:i + batch_size]).argmax(dim=1) for i in range(0, len(inputs), batch_size)])


def train_digits_classifier(
    seed: int = 0, steps: int = 400, batch_size: int = 64, lr: float = 3e-3,
) -> tuple[DigitsClassifier, float]:
    """Train the digits classifier on the fixed train split; returns (model in eval mode, test accuracy)."""
    # 8x8 convolutions are too small to gain from intra-op threads; one thread avoids oversubscribing shared CPUs.
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_digits_classifier(seed, steps, batch_size, lr)
    finally:
        torch.set_num_threads(previous_threads)


def _train_digits_classifier(seed: int, steps: int, batch_size: int, lr: float) -> tuple[DigitsClassifier, float]:
    train_images, train_labels = load_digits_split("train")
    test_images, test_labels = load_digits_split("test")
    train_x = digits_classifier_inputs(train_images)                  # (1347, 1, 8, 8)
    train_y = torch.from_numpy(train_labels)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):                           # seeded init without touching global RNG
        torch.manual_seed(seed)
        model = DigitsClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    model.train()
    for _ in range(steps):
        batch = torch.randint(0, len(train_x), (batch_size,), generator=generator)
        loss = F.cross_entropy(model(_random_shifts(train_x[batch], generator)), train_y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    accuracy = classifier_accuracy(model, test_images, test_labels)
    return model, accuracy


def classifier_accuracy(model: DigitsClassifier, images: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of uint8 (N, H, W, C) images the digits classifier assigns to their labels."""
    labels = np.asarray(labels)
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape ({images.shape[0]},); got {labels.shape}")
    predictions = _predict(model, digits_classifier_inputs(images)).numpy()
    return float(np.mean(predictions == labels))


def predicted_class_histogram(model: DigitsClassifier, images: np.ndarray, num_classes: int = 10) -> list[int]:
    """Counts of the classifier's predicted classes (mode coverage of unconditional samples)."""
    predictions = _predict(model, digits_classifier_inputs(images)).numpy()
    return np.bincount(predictions, minlength=num_classes).tolist()


@torch.no_grad()
def digits_features(model: DigitsClassifier, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """uint8 (N, H, W, C) images -> float64 (N, 64) penultimate classifier features."""
    model.eval()
    inputs = digits_classifier_inputs(images)
    features = [model.features(inputs[i:i + batch_size]) for i in range(0, len(inputs), batch_size)]
    return torch.cat(features).double().numpy()


def model_fingerprint(model: nn.Module) -> str:
    """Short sha256 of a model's parameters (identifies the feature extractor in cached stats)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def digits_feature_extractor_id(model: DigitsClassifier) -> str:
    """Name + weight fingerprint of a digits classifier, stored with its statistics."""
    return f"{DIGITS_CLASSIFIER_FORMAT}:{model_fingerprint(model)}"


def load_or_train_digits_classifier(
    path: Optional[str] = None, seed: int = 0, steps: int = 400, flag: str = "--classifier",
) -> tuple[DigitsClassifier, float]:
    """Load classifier weights from a safetensors cache (trained and written if absent); returns (model, test acc)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open, save_file

    if path is None or not os.path.exists(path):
        model, accuracy = train_digits_classifier(seed=seed, steps=steps)
        if path is not None:
            metadata = {"format": DIGITS_CLASSIFIER_FORMAT, "seed": str(seed), "steps": str(steps),
                        "test_accuracy": f"{accuracy:.6f}", "split_seed": str(DIGITS_SPLIT_SEED)}
            tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
            atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
        return model, accuracy

    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
        state_dict = load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{flag}: cannot read {path} as a safetensors file ({error})") from error
    if metadata.get("format") != DIGITS_CLASSIFIER_FORMAT:
        raise ValueError(f"{flag}: {path} is not a digits classifier (metadata format {metadata.get('format')!r})")
    if metadata.get("seed") != str(seed) or metadata.get("steps") != str(steps):
        raise ValueError(f"{flag}: {path} was trained with seed {metadata.get('seed')}, steps {metadata.get('steps')}; "
                         f"requested seed {seed}, steps {steps}: delete the file or pass another path")
    model = DigitsClassifier()
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        raise ValueError(f"{flag}: {path} does not match the DigitsClassifier architecture ({error})") from error
    model.eval()
    test_images, test_labels = load_digits_split("test")
    return model, classifier_accuracy(model, test_images, test_labels)


def digits_reference_stats(model: DigitsClassifier, split: str = "all") -> FeatureStats:
    """Digits-FID reference statistics of the real digits (`split`: all 1797 images, train or test)."""
    images, _ = load_digits_split(split)
    return FeatureStats.from_features(digits_features(model, images),
                                      feature_extractor=digits_feature_extractor_id(model),
                                      source=f"sklearn digits ({split} split)")


def evaluate_digits_samples(
    model: DigitsClassifier, images: np.ndarray, labels: Optional[np.ndarray] = None,
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


#################################################################################
#                       Inception-V3 (TorchScript) Features                     #
#################################################################################

def file_sha256(path: str) -> str:
    """Full sha256 hex digest of a file (identifies weights and reference batches in records)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_inception_torchscript(path: str, device: str = "cpu", flag: str = "--inception") -> torch.jit.ScriptModule:
    """Load the FID Inception-V3 from a local TorchScript file (e.g. inception-2015-12-05.pt); no download.

    Call convention (that of NVlabs' metrics and clean-fid): `model(images, return_features=True)` with `images` a
    uint8 (N, 3, H, W) tensor in 0..255 of any size (the module resizes to 299x299 itself) returns float (N, 2048)
    pool features. Pickled `.pkl` exports are refused: unpickling runs arbitrary code; use the `.pt` TorchScript file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag}: Inception weights file not found: {path} (expected a TorchScript file such "
                                "as inception-2015-12-05.pt; nothing is downloaded at run time)")
    if path.endswith(".pkl"):
        raise ValueError(f"{flag}: {path} is a pickle; pass the TorchScript export (inception-2015-12-05.pt) instead")
    try:
        model = torch.jit.load(path, map_location=device)
    except Exception as error:  # RuntimeError / ValueError from the TorchScript reader
        raise ValueError(f"{flag}: {path} is not a TorchScript archive ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''}); expected the TorchScript FID "
                         "Inception (inception-2015-12-05.pt)") from error
    return model.eval()


@torch.no_grad()
def inception_features(
    model: torch.jit.ScriptModule, images: np.ndarray, batch_size: int = 100, device: str = "cpu",
    flag: str = "--inception",
) -> np.ndarray:
    """uint8 (N, H, W, 3) images -> float64 (N, D) Inception pool features (D = 2048 for the standard weights)."""
    features = []
    for start in range(0, images.shape[0], batch_size):
        batch = images_to_nchw_tensor(images[start:start + batch_size]).to(device)   # (B, 3, H, W) uint8
        try:
            output = model(batch, return_features=True)
        except Exception as error:
            raise ValueError(f"{flag}: the TorchScript module failed on a uint8 (B, 3, H, W) batch with "
                             f"return_features=True ({type(error).__name__}: {error})") from error
        if not isinstance(output, torch.Tensor) or output.ndim != 2 or output.shape[0] != batch.shape[0]:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ValueError(f"{flag}: expected features of shape ({batch.shape[0]}, D); got {shape}")
        features.append(output.double().cpu())
    return torch.cat(features).numpy()                                              # (N, D)


#################################################################################
#                            Evaluation records                                 #
#################################################################################

def _warn(message: str, record_warnings: Optional[list] = None) -> str:
    """warnings.warn + print the message, and keep it for the evaluation record."""
    warnings.warn(message, stacklevel=3)
    print(f"WARNING: {message}", flush=True)
    if record_warnings is not None:
        record_warnings.append(message)
    return message


def sample_count_warning(num_samples: int, minimum: int = FID_REFERENCE_NUM_SAMPLES) -> Optional[str]:
    """Warn (warnings.warn and print) when fewer than `minimum` samples are evaluated; returns the message."""
    if num_samples >= minimum:
        return None
    return _warn(f"only {num_samples} samples evaluated (< {minimum:,}): FID is biased upwards at small sample "
                 f"counts and is not comparable to FID-{minimum // 1000}K numbers such as the paper's")


def _to_json(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)


def write_eval_record(path_jsonl: str, metrics: dict, setup: dict, warnings_list: Optional[list] = None) -> dict:
    """Append one JSON line {"time", "metrics", "setup", "warnings"} to `path_jsonl`; returns the record."""
    record = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "metrics": metrics, "setup": setup,
              "warnings": list(warnings_list or [])}
    line = json.dumps(record, default=_to_json, sort_keys=False)
    directory = os.path.dirname(os.path.abspath(path_jsonl))
    os.makedirs(directory, exist_ok=True)
    with open(path_jsonl, "a") as handle:
        handle.write(line + "\n")
    return record


def load_setup_json(path: str, flag: str = "--setup") -> dict:
    """Read the sampling setup (checkpoint, EMA, sampler, steps, iterations, budget, cfg, VAE, ...) from JSON."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag}: setup file not found: {path}")
    try:
        with open(path) as handle:
            setup = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{flag}: {path} is not valid JSON ({error})") from error
    if not isinstance(setup, dict):
        raise ValueError(f"{flag}: {path} must hold a JSON object; got {type(setup).__name__}")
    return setup


def evaluate_samples(
    samples: str,
    *,
    features: str = "digits",
    ref_stats: Optional[str] = None,
    ref_npz: Optional[str] = None,
    dataset: Optional[str] = None,
    ref_split: str = "all",
    inception: Optional[str] = None,
    classifier: Optional[str] = None,
    classifier_seed: int = 0,
    setup: Optional[str] = None,
    out: Optional[str] = None,
    batch_size: int = 100,
    device: str = "cpu",
) -> dict:
    """Evaluate an ADM-format sample archive; returns (and appends to `out`) the record {metrics, setup, warnings}.

    The sampling setup comes from `setup` (JSON), or else from the `setup.json` that sample_ddp.py writes beside
    its `samples_N.npz` in --sample_dir.

    Reference (pick one source): `ref_stats` alone = precomputed statistics; `ref_npz` (ADM-format real images) or
    `dataset="digits"` = computed now, and cached to `ref_stats` when that path is also given.
    """
    if features not in ("digits", "inception"):
        raise ValueError(f"--features must be digits or inception; got {features!r}")
    if features == "inception" and inception is None:
        raise ValueError("--features inception needs --inception PATH (the TorchScript inception-2015-12-05.pt)")
    if features == "digits" and inception is not None:
        raise ValueError("--inception is only used with --features inception")
    if ref_npz is not None and dataset is not None:
        raise ValueError("pass only one reference source: --ref_npz or --dataset")
    if dataset is not None and dataset != "digits":
        raise ValueError(f"--dataset must be 'digits'; got {dataset!r}")
    if features == "digits" and ref_stats is None and ref_npz is None:
        dataset = "digits"                                  # default reference for digits-FID
    if ref_stats is None and ref_npz is None and dataset is None:
        raise ValueError("--features inception needs a reference: --ref_stats STATS.npz or --ref_npz REAL.npz")
    if ref_stats is not None and ref_npz is None and dataset is None and not os.path.exists(ref_stats):
        raise FileNotFoundError(f"--ref_stats: reference statistics file not found: {ref_stats} (pass --ref_npz or "
                                "--dataset too to compute and cache it)")
    if setup is None and os.path.isfile(os.path.join(os.path.dirname(os.path.abspath(samples)), SAMPLE_SETUP_FILE)):
        setup = os.path.join(os.path.dirname(os.path.abspath(samples)), SAMPLE_SETUP_FILE)  # sample_ddp.py's record
    sampling_setup = load_setup_json(setup) if setup is not None else None  # fail early, before any compute

    images, labels = load_npz_samples(samples)
    if features == "digits" and labels is not None and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"--samples: {samples}: labels (arr_1) must be digits 0..9 for classifier accuracy; "
                         f"got range {labels.min()}..{labels.max()}")
    record_warnings: list = []
    message = sample_count_warning(images.shape[0])
    if message:
        record_warnings.append(message)

    metrics: dict = {}
    run_setup: dict = {
        "samples": os.path.abspath(samples),
        "num_samples": int(images.shape[0]),
        "sample_shape": list(images.shape[1:]),
        "labels_present": labels is not None,
        "features": features,
    }

    # Feature extractor
    if features == "digits":
        model, test_accuracy = load_or_train_digits_classifier(classifier, seed=classifier_seed)
        extractor_id = digits_feature_extractor_id(model)
        extract = lambda array: digits_features(model, array)            # noqa: E731
        run_setup["feature_extractor"] = {
            "name": extractor_id, "feature_dim": DIGITS_FEATURE_DIM, "classifier_path": classifier,
            "classifier_seed": classifier_seed, "classifier_test_accuracy": test_accuracy,
            "classifier_test_split": f"sklearn digits, {DIGITS_TEST_FRACTION:.0%} stratified, split seed "
                                     f"{DIGITS_SPLIT_SEED}"}
        metrics["classifier_test_accuracy"] = test_accuracy
        note = DIGITS_FID_NOTE
    else:
        inception_model = load_inception_torchscript(inception, device=device)
        inception_sha256 = file_sha256(inception)
        extractor_id = f"inception-torchscript:{inception_sha256[:16]}"
        extract = lambda array: inception_features(  # noqa: E731
            inception_model, array, batch_size=batch_size, device=device)
        run_setup["feature_extractor"] = {"name": extractor_id, "inception_path": os.path.abspath(inception),
                                          "inception_sha256": inception_sha256}
        note = INCEPTION_FID_NOTE

    # Reference statistics
    if dataset == "digits":
        reference_source = f"sklearn digits ({ref_split} split)"
    elif ref_npz is not None:
        reference_source = os.path.abspath(ref_npz)
    else:
        reference_source = ""                               # precomputed statistics: whatever they say

    def compute_reference() -> FeatureStats:
        if dataset == "digits":
            real_images, _ = load_digits_split(ref_split)
        else:
            real_images, _ = load_npz_samples(ref_npz, flag="--ref_npz")
        return FeatureStats.from_features(extract(real_images), feature_extractor=extractor_id, source=reference_source)

    reference = load_or_compute_reference_stats(ref_stats, compute_reference, feature_extractor=extractor_id,
                                                source=reference_source)
    if not reference.feature_extractor:
        _warn(f"reference statistics {ref_stats} do not say which feature extractor made them; the FID is only "
              "meaningful if it is the same network as --features/--inception", record_warnings)
    run_setup["reference"] = {"stats_path": os.path.abspath(ref_stats) if ref_stats else None,
                              "source": reference.source, "num_images": reference.n,
                              "dataset": dataset, "split": ref_split if dataset else None,
                              "ref_npz": os.path.abspath(ref_npz) if ref_npz else None}

    # Metrics
    sample_features = extract(images)                                  # (N, D)
    run_setup["feature_extractor"]["feature_dim"] = int(sample_features.shape[1])
    if sample_features.shape[0] <= sample_features.shape[1]:
        _warn(f"{sample_features.shape[0]} samples for {sample_features.shape[1]}-d features: the sample covariance "
              "is rank-deficient", record_warnings)
    sample_stats = FeatureStats.from_features(sample_features, feature_extractor=extractor_id, source=samples)
    metrics["fid"] = fid_from_stats(sample_stats, reference)
    metrics["fid_kind"] = "digits-fid" if features == "digits" else "inception-fid"
    if features == "digits":
        metrics["predicted_class_histogram"] = predicted_class_histogram(model, images)
        if labels is not None:
            metrics["classifier_accuracy"] = classifier_accuracy(model, images, labels)

    if sampling_setup is not None:
        run_setup["sampling"] = sampling_setup
        run_setup["setup_file"] = os.path.abspath(setup)
    else:
        message = ("no --setup given: the record lacks the sampling setup (checkpoint, EMA, sampler, steps, "
                   "iterations, allocation, budget, cfg, VAE)")
        print(f"NOTE: {message}", flush=True)
        record_warnings.append(message)
    run_setup["note"] = note

    record = {"metrics": metrics, "setup": run_setup, "warnings": record_warnings}
    if out is not None:
        written = write_eval_record(out, metrics, run_setup, record_warnings)
        record["time"] = written["time"]
    return record
