"""Sample-quality metrics beyond FID, computed from the features (and class scores) of one feature network.

  * `precision_recall`: improved precision and recall (Kynkäänniemi et al., NeurIPS 2019). Each set's manifold is
    the union of balls around its feature vectors with radius the distance to the k-th nearest neighbour (k = 3) in
    the same set; precision is the fraction of generated features inside the real manifold, recall the fraction of
    real features inside the generated one. Distances are computed in B x B blocks (`block_size`), so 50k x 50k
    sets need only O(B^2) memory, on whatever device the features are moved to.
  * `kernel_inception_distance`: KID (Bińkowski et al., ICLR 2018), the unbiased estimator of the squared MMD with
    the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets (mean and std).
  * `inception_score`: IS (Salimans et al., 2016), exp E_x KL(p(y|x) || p(y)), per split of the samples (10 splits),
    from a classifier's logits or probabilities.
  * `per_class_accuracy`: the classifier's accuracy on the samples of each label.
  * `feature_metrics`: FID, KID, precision and recall of two feature sets in one dict (evaluate.py and experiments/).

A metric that cannot be computed is recorded as None with a `<name>_unavailable` entry saying why
(`unavailable`), never left out silently.
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

import fid

PRECISION_RECALL_K = 3          # Kynkäänniemi et al. 2019 use k = 3
KID_NUM_SUBSETS = 100           # Bińkowski et al. 2018: 100 subsets of 1000 (fewer samples: subsets of all of them)
KID_SUBSET_SIZE = 1000
INCEPTION_SCORE_SPLITS = 10     # Salimans et al. 2016: 10 splits
DEFAULT_BLOCK_SIZE = 4096       # distance blocks of 4096 x 4096 float64: 128 MiB each, at most 3 alive at once


#################################################################################
#                                   Helpers                                     #
#################################################################################

def unavailable(name: str, reason: str, *extra: str) -> dict[str, Any]:
    """The record of a metric that does not apply: `name` (and `extra` companions such as its std) None, plus why."""
    return {name: None, **{key: None for key in extra}, f"{name}_unavailable": reason}


def resolve_device(device: Optional[str]) -> torch.device:
    """`device`, or the GPU when there is one (None or 'auto')."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _blocks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _as_tensor(features: np.ndarray, device: torch.device) -> torch.Tensor:
    """(N, D) float64 tensor on `device` (float64: KID's cubic kernel sums and the distance-vs-radius comparisons
    lose nothing to round-off)."""
    return torch.as_tensor(np.asarray(features, dtype=np.float64), device=device)


def _distances(x: torch.Tensor, y: torch.Tensor, x_sq: torch.Tensor, y_sq: torch.Tensor) -> torch.Tensor:
    """(B, C) Euclidean distances via ||x||^2 + ||y||^2 - 2 x.y: one matmul, then in place (one B x C buffer;
    clamped against round-off)."""
    squared = (x @ y.T).mul_(-2.0).add_(x_sq[:, None]).add_(y_sq[None, :])
    return squared.clamp_min_(0.0).sqrt_()


#################################################################################
#                     Improved precision and recall (k-NN)                      #
#################################################################################

def knn_radii(features: torch.Tensor, k: int = PRECISION_RECALL_K, block_size: int = DEFAULT_BLOCK_SIZE,
              progress: bool = False, desc: str = "k-NN radii") -> torch.Tensor:
    """(N,) distance of each feature vector to its k-th nearest neighbour in the same set (itself excluded).

    Each row block keeps a running k+1 smallest distances over column blocks; the smallest is the point itself (0),
    as in Kynkäänniemi et al.'s definition, so the (k+1)-th smallest is the k-th neighbour.
    """
    n = features.shape[0]
    if n <= k:
        raise ValueError(f"k-NN radii need more than k = {k} feature vectors; got {n}")
    squared = (features * features).sum(dim=1)
    radii = torch.empty(n, dtype=features.dtype, device=features.device)
    rows = list(_blocks(n, block_size))
    for row in tqdm(rows, desc=desc, disable=not progress, leave=False):
        best = torch.full((row.stop - row.start, k + 1), math.inf, dtype=features.dtype, device=features.device)
        for col in _blocks(n, block_size):
            block = _distances(features[row], features[col], squared[row], squared[col])
            if col == row:                              # exact zeros for the points themselves
                block.fill_diagonal_(0.0)
            best = torch.cat([best, block], dim=1).topk(k + 1, dim=1, largest=False).values
        radii[row] = best[:, k]
    return radii


def inside_manifold(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor,
                    block_size: int = DEFAULT_BLOCK_SIZE, progress: bool = False,
                    desc: str = "manifold test") -> torch.Tensor:
    """(Q,) bool: whether each query lies in some ball ||q - s_j|| <= radii[j] around the support vectors."""
    query_sq, support_sq = (queries * queries).sum(dim=1), (support * support).sum(dim=1)
    inside = torch.zeros(queries.shape[0], dtype=torch.bool, device=queries.device)
    for row in tqdm(list(_blocks(queries.shape[0], block_size)), desc=desc, disable=not progress, leave=False):
        for col in _blocks(support.shape[0], block_size):
            block = _distances(queries[row], support[col], query_sq[row], support_sq[col])
            inside[row] |= (block <= radii[col][None, :]).any(dim=1)
    return inside


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = PRECISION_RECALL_K,
                     block_size: int = DEFAULT_BLOCK_SIZE, device: Optional[str] = None,
                     progress: bool = False) -> tuple[float, float]:
    """(precision, recall) of generated features `fake` (M, D) against real features `real` (N, D)."""
    target = resolve_device(device)
    real_t, fake_t = _as_tensor(real, target), _as_tensor(fake, target)
    real_radii = knn_radii(real_t, k, block_size, progress, "precision/recall: real k-NN radii")
    fake_radii = knn_radii(fake_t, k, block_size, progress, "precision/recall: sample k-NN radii")
    precision = inside_manifold(fake_t, real_t, real_radii, block_size, progress, "precision")
    recall = inside_manifold(real_t, fake_t, fake_radii, block_size, progress, "recall")
    return float(precision.double().mean()), float(recall.double().mean())


#################################################################################
#                          Kernel Inception Distance                            #
#################################################################################

def polynomial_mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD^2 of two (m, d) / (n, d) sets with k(a, b) = (a.b / d + 1)^3 (Bińkowski et al. 2018, eq. 3)."""
    m, n, d = x.shape[0], y.shape[0], x.shape[1]
    k_xx = (x @ x.T / d + 1.0) ** 3
    k_yy = (y @ y.T / d + 1.0) ** 3
    k_xy = (x @ y.T / d + 1.0) ** 3
    within_x = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))   # i != j terms only: unbiased
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * k_xy.mean())


def kernel_inception_distance(real: np.ndarray, fake: np.ndarray, num_subsets: int = KID_NUM_SUBSETS,
                              subset_size: int = KID_SUBSET_SIZE, seed: int = 0, device: Optional[str] = None,
                              progress: bool = False) -> tuple[float, float, int]:
    """(mean, std, subset size) of the unbiased polynomial-kernel MMD^2 over `num_subsets` random subsets of
    min(subset_size, N, M) features of each set, drawn without replacement (seeded)."""
    size = min(subset_size, real.shape[0], fake.shape[0])
    if size < 2:
        raise ValueError(f"KID needs at least 2 feature vectors in each set; got {real.shape[0]} and {fake.shape[0]}")
    target = resolve_device(device)
    real_t, fake_t = _as_tensor(real, target), _as_tensor(fake, target)
    rng = np.random.default_rng(seed)
    values = []
    for _ in tqdm(range(num_subsets), desc="KID subsets", disable=not progress, leave=False):
        real_idx = torch.from_numpy(rng.choice(real.shape[0], size, replace=False)).to(target)
        fake_idx = torch.from_numpy(rng.choice(fake.shape[0], size, replace=False)).to(target)
        values.append(polynomial_mmd2_unbiased(real_t[real_idx], fake_t[fake_idx]))
    return float(np.mean(values)), float(np.std(values)), size


#################################################################################
#                         Inception Score, per-class accuracy                   #
#################################################################################

def class_log_probs(scores: np.ndarray, kind: str) -> np.ndarray:
    """(N, C) log p(y|x) from 'logits' (log-softmax) or 'probabilities' (clipped log)."""
    scores = np.asarray(scores, dtype=np.float64)
    if kind == "logits":
        return scores - np.logaddexp.reduce(scores, axis=1, keepdims=True)
    if kind == "probabilities":
        return np.log(np.clip(scores, 1e-30, None))
    raise ValueError(f"class scores must be 'logits' or 'probabilities'; got {kind!r}")


def score_kind(scores: np.ndarray, tol: float = 1e-3) -> str:
    """'probabilities' when every row is non-negative and sums to 1 (e.g. inception-2015-12-05.pt's softmax
    output), else 'logits'."""
    scores = np.asarray(scores, dtype=np.float64)
    if (scores >= 0).all() and np.allclose(scores.sum(axis=1), 1.0, atol=tol):
        return "probabilities"
    return "logits"


def inception_score(scores: np.ndarray, kind: str = "logits",
                    splits: int = INCEPTION_SCORE_SPLITS) -> tuple[float, float]:
    """(mean, std) over `splits` consecutive splits of exp(mean_x KL(p(y|x) || p(y))), p(y) the split's marginal."""
    if scores.ndim != 2 or scores.shape[0] < splits:
        raise ValueError(f"the Inception Score needs (N, C) class scores with N >= {splits} splits; got "
                         f"{scores.shape}")
    log_p = class_log_probs(scores, kind)                                         # (N, C)
    values = []
    for part in np.array_split(log_p, splits):
        log_marginal = np.log(np.exp(part).mean(axis=0))                          # (C,) log p(y)
        kl = (np.exp(part) * (part - log_marginal[None, :])).sum(axis=1)          # (n,) KL(p(y|x) || p(y))
        values.append(math.exp(kl.mean()))
    return float(np.mean(values)), float(np.std(values))


def inception_score_record(scores: Optional[np.ndarray], reason: str = "",
                           splits: int = INCEPTION_SCORE_SPLITS) -> dict[str, Any]:
    """{'inception_score', 'inception_score_std', ...} of (N, C) class scores, or None with why (`reason` when
    there are no scores, or too few images for the splits)."""
    if scores is None:
        return unavailable("inception_score", reason or "no class scores", "inception_score_std")
    if scores.shape[0] < splits:
        return unavailable("inception_score", f"needs at least {splits} images ({splits} splits); got "
                           f"{scores.shape[0]}", "inception_score_std")
    kind = score_kind(scores)
    mean, std = inception_score(scores, kind, splits)
    return {"inception_score": mean, "inception_score_std": std, "inception_score_splits": splits,
            "inception_score_input": kind}


def per_class_accuracy(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> list[Optional[float]]:
    """Accuracy among the samples of each label 0..num_classes-1 (None for a label no sample has)."""
    accuracy: list[Optional[float]] = []
    for label in range(num_classes):
        chosen = labels == label
        accuracy.append(float(np.mean(predictions[chosen] == label)) if chosen.any() else None)
    return accuracy


#################################################################################
#                       All feature metrics of two sets                         #
#################################################################################

def feature_metrics(real: Optional[np.ndarray], fake: np.ndarray, reference: Optional[fid.FeatureStats] = None,
                    k: int = PRECISION_RECALL_K, block_size: int = DEFAULT_BLOCK_SIZE,
                    kid_subsets: int = KID_NUM_SUBSETS, kid_subset_size: int = KID_SUBSET_SIZE, seed: int = 0,
                    device: Optional[str] = None, progress: bool = False, no_real_reason: str = "") -> dict[str, Any]:
    """{'fid', 'kid', 'kid_std', 'precision', 'recall'} of sample features `fake` against real features `real`.

    FID uses `reference` (mu, sigma) when given, else the statistics of `real`. Without real features (precomputed
    statistics only) KID and precision/recall are recorded unavailable with `no_real_reason`.
    """
    reference = reference if reference is not None else fid.FeatureStats.from_features(real)
    metrics: dict[str, Any] = {"fid": fid.fid_from_stats(fid.FeatureStats.from_features(fake), reference)}
    if real is None:
        reason = no_real_reason or "no real features: the reference gives only mu/sigma"
        return {**metrics, **unavailable("kid", reason, "kid_std"), **unavailable("precision", reason),
                **unavailable("recall", reason)}
    if min(real.shape[0], fake.shape[0]) < 2:
        metrics.update(unavailable("kid", "KID needs at least 2 images in each set", "kid_std"))
    else:
        mean, std, size = kernel_inception_distance(real, fake, kid_subsets, kid_subset_size, seed, device, progress)
        metrics.update(kid=mean, kid_std=std, kid_subset_size=size, kid_subsets=kid_subsets)
    if min(real.shape[0], fake.shape[0]) <= k:
        reason = f"k-NN radii with k = {k} need more than {k} images in each set"
        metrics.update(**unavailable("precision", reason), **unavailable("recall", reason))
    else:
        precision, recall = precision_recall(real, fake, k, block_size, device, progress)
        metrics.update(precision=precision, recall=recall, precision_recall_k=k)
    return metrics
