"""FID for evaluating FPDM / DiT samples (paper Sec. 4.2): Frechet distance, feature statistics, Inception features.

  * `frechet_distance`: the Frechet distance between two Gaussians fitted to feature sets,
        d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}),
    with scipy's matrix square root and the usual handling of complex round-off.
  * `FeatureStats`: (mu, sigma, n) of a feature set, saved to / loaded from `.npz` (reference statistics cache).
  * The standard FID Inception-V3 (2048-d pool features) loaded from a local TorchScript file (see
    `load_inception_torchscript`); nothing is downloaded at run time. The digits feature network is classifier.py;
    evaluate.py puts the pieces together.

Why the Inception loader is a TorchScript file and not a pip package: the maintained PyTorch FID packages
(`pytorch-fid`, `torch-fidelity` 0.4.0, `clean-fid` 0.1.35) all declare torchvision as a hard dependency and import
it when the package is imported, which this project cannot load. The TorchScript export of the TensorFlow FID
Inception (`inception-2015-12-05.pt`, the file NVlabs' StyleGAN2-ADA / StyleGAN3 / EDM metrics and clean-fid use)
needs only torch, resizes internally and returns the 2048-d pool features when called as
`model(images_uint8_nchw, return_features=True)`.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from scipy import linalg

from config import UserError
from images import read_npz, save_npz, to_nchw_tensor

FID_REFERENCE_NUM_SAMPLES = 50_000  # paper Sec. 4.1: "all evaluations were performed using 50000 images (FID-50K)"

INCEPTION_FID_NOTE = (
    "in-repo Inception FID: not comparable to the paper's TensorFlow-evaluator numbers unless the standard weights "
    "(inception-2015-12-05 TorchScript) and the standard reference batch (e.g. ADM's VIRTUAL_imagenet256_labeled.npz) "
    "are used, with 50,000 samples"
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

@dataclass
class FeatureStats:
    """Mean and covariance of a feature set, plus where they came from."""
    mu: np.ndarray                 # (D,)
    sigma: np.ndarray              # (D, D)
    n: int                         # number of feature vectors (0 if unknown, e.g. third-party stats)
    feature_extractor: str = ""    # fingerprint of the extractor ("" if unknown)
    source: str = ""               # what the features were computed from
    features: Optional[np.ndarray] = None  # (N, D) float32 features themselves (KID, precision/recall), if kept
    cache_key: str = ""            # evaluate.py's key of (reference, extractor) when this is its cache ("" if none)

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
        """Write to `.npz` atomically (keys mu, sigma, n, feature_extractor, source; features and cache_key when
        set)."""
        extra = {"cache_key": np.str_(self.cache_key)} if self.cache_key else {}
        if self.features is not None:
            extra["features"] = np.asarray(self.features, dtype=np.float32)
        save_npz(path, mu=self.mu, sigma=self.sigma, n=np.int64(self.n),
                 feature_extractor=np.str_(self.feature_extractor), source=np.str_(self.source), **extra)

    @classmethod
    def load(cls, path: str, flag: str = "--ref_stats") -> "FeatureStats":
        """Read from `.npz` with keys mu and sigma (ADM reference batches also work: other keys are ignored)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{flag}: reference statistics file not found: {path}")
        arrays = read_npz(path, flag)
        if not {"mu", "sigma"} <= set(arrays):
            raise UserError(f"{flag}: {path} is not a statistics file: needs arrays 'mu' and 'sigma', "
                             f"has {sorted(arrays)}")
        mu = np.asarray(arrays["mu"], dtype=np.float64)
        sigma = np.asarray(arrays["sigma"], dtype=np.float64)
        n = int(arrays["n"]) if "n" in arrays else 0
        feature_extractor = str(arrays["feature_extractor"]) if "feature_extractor" in arrays else ""
        source = str(arrays["source"]) if "source" in arrays else os.path.basename(path)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise UserError(f"{flag}: {path} has mu {mu.shape} and sigma {sigma.shape}; expected (D,) and (D, D)")
        features = arrays.get("features")
        if features is not None and (features.ndim != 2 or features.shape[1] != mu.shape[0]):
            raise UserError(f"{flag}: {path} has features {features.shape}; expected (N, {mu.shape[0]})")
        cache_key = str(arrays["cache_key"]) if "cache_key" in arrays else ""
        return cls(mu=mu, sigma=sigma, n=n, feature_extractor=feature_extractor, source=source, features=features,
                   cache_key=cache_key)


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
            raise UserError(
                f"{flag}: {path} was computed with feature extractor {stats.feature_extractor!r}, but this evaluation "
                f"uses {feature_extractor!r}; delete the file or pass another path")
        if source and stats.feature_extractor and stats.source != source:
            raise UserError(f"{flag}: {path} holds statistics of {stats.source!r}, not of {source!r}; delete the file "
                             "or pass another path")
        return stats
    stats = compute_fn()
    if path is not None:
        stats.save(path)
    return stats


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
    pool features; `model(images)` returns class outputs (inception_class_scores, for the Inception Score). Pickled `.pkl` exports are refused: unpickling runs arbitrary code; use the `.pt` TorchScript file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag}: Inception weights file not found: {path} (expected a TorchScript file such "
                                "as inception-2015-12-05.pt; nothing is downloaded at run time)")
    if path.endswith(".pkl"):
        raise UserError(f"{flag}: {path} is a pickle; pass the TorchScript export (inception-2015-12-05.pt) instead")
    try:
        model = torch.jit.load(path, map_location=device)
    except Exception as error:  # RuntimeError / ValueError from the TorchScript reader
        raise UserError(f"{flag}: {path} is not a TorchScript archive ({type(error).__name__}: "
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
        batch = to_nchw_tensor(images[start:start + batch_size]).to(device)   # (B, 3, H, W) uint8
        try:
            output = model(batch, return_features=True)
        except Exception as error:
            raise UserError(f"{flag}: the TorchScript module failed on a uint8 (B, 3, H, W) batch with "
                             f"return_features=True ({type(error).__name__}: {error})") from error
        if not isinstance(output, torch.Tensor) or output.ndim != 2 or output.shape[0] != batch.shape[0]:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise UserError(f"{flag}: expected features of shape ({batch.shape[0]}, D); got {shape}")
        features.append(output.double().cpu())
    return torch.cat(features).numpy()                                              # (N, D)


def class_score_kwargs(model: torch.jit.ScriptModule) -> dict[str, bool]:
    """{'no_output_bias': True} when the module's forward takes it (inception-2015-12-05.pt does): the original
    Inception Score code (Salimans et al. 2016) takes the softmax of pool3 @ W without the output bias."""
    try:
        names = {argument.name for argument in model.forward.schema.arguments}
    except AttributeError:  # not a scripted forward: call it plainly
        return {}
    return {"no_output_bias": True} if "no_output_bias" in names else {}


@torch.no_grad()
def inception_class_scores(
    model: torch.jit.ScriptModule, images: np.ndarray, batch_size: int = 100, device: str = "cpu",
    flag: str = "--inception",
) -> np.ndarray:
    """uint8 (N, H, W, 3) images -> float64 (N, C) class scores of `model(images)` (return_features=False; with
    no_output_bias=True where the module takes it): the 1008-way softmax of inception-2015-12-05.pt, or logits of
    another network (metrics.score_kind tells which)."""
    scores, kwargs = [], class_score_kwargs(model)
    for start in range(0, images.shape[0], batch_size):
        batch = to_nchw_tensor(images[start:start + batch_size]).to(device)   # (B, 3, H, W) uint8
        try:
            output = model(batch, **kwargs)
        except Exception as error:
            raise UserError(f"{flag}: the TorchScript module gives no class scores when called without "
                            f"return_features ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
                            ) from error
        if not isinstance(output, torch.Tensor) or output.ndim != 2 or output.shape[0] != batch.shape[0]:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise UserError(f"{flag}: expected class scores of shape ({batch.shape[0]}, C) without return_features; "
                            f"got {shape}")
        scores.append(output.double().cpu())
    return torch.cat(scores).numpy()                                                # (N, C)


#################################################################################
#                              Small-sample warning                             #
#################################################################################

def record_warning(message: str, record_warnings: Optional[list] = None) -> str:
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
    return record_warning(f"only {num_samples} samples evaluated (< {minimum:,}): FID is biased upwards at small "
                          f"sample counts and is not comparable to FID-{minimum // 1000}K numbers such as the paper's")
