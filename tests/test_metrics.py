"""Tests for metrics.py against slow reference implementations written here (explicit loops, exact distances)."""
import math

import numpy as np
import pytest

import fid
import metrics
from classifier import digits_features
from data import load_digits_uint8


#################################################################################
#                     Slow, independent reference implementations               #
#################################################################################

def slow_radii(points: np.ndarray, k: int) -> np.ndarray:
    """Distance of each point to its k-th nearest other point (one point at a time, exact differences)."""
    radii = []
    for i in range(len(points)):
        others = [np.sqrt(np.sum((points[i] - points[j]) ** 2)) for j in range(len(points)) if j != i]
        radii.append(sorted(others)[k - 1])
    return np.array(radii)


def slow_coverage(queries: np.ndarray, support: np.ndarray, radii: np.ndarray) -> float:
    """Fraction of queries within some support point's ball."""
    hits = 0
    for q in queries:
        hits += any(np.sqrt(np.sum((q - s) ** 2)) <= r for s, r in zip(support, radii))
    return hits / len(queries)


def slow_precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    return (slow_coverage(fake, real, slow_radii(real, k)), slow_coverage(real, fake, slow_radii(fake, k)))


def slow_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3 by explicit double loops."""
    d = x.shape[1]

    def kernel(a, b):
        return (float(np.dot(a, b)) / d + 1.0) ** 3

    m, n = len(x), len(y)
    xx = sum(kernel(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(kernel(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(kernel(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2.0 * xy


def slow_inception_score(logits: np.ndarray, splits: int) -> float:
    """Mean over splits of exp(mean KL(p(y|x) || p(y))), one sample and one class at a time."""
    scores = []
    for part in np.array_split(logits, splits):
        probs = [np.exp(row - row.max()) / np.sum(np.exp(row - row.max())) for row in part]
        marginal = np.mean(probs, axis=0)
        kls = [sum(p[c] * (math.log(p[c]) - math.log(marginal[c])) for c in range(len(p)) if p[c] > 0)
               for p in probs]
        scores.append(math.exp(np.mean(kls)))
    return float(np.mean(scores))


#################################################################################
#                          Precision and recall                                 #
#################################################################################

def test_precision_recall_match_brute_force_at_any_block_size():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(60, 5))
    fake = rng.normal(loc=0.4, scale=1.3, size=(45, 5))
    expected = slow_precision_recall(real, fake)
    assert 0.0 < expected[0] < 1.0 and 0.0 < expected[1] < 1.0     # a case where the answer is not trivial
    for block_size in (7, 16, 1000):                                # blocks that do and do not divide N
        got = metrics.precision_recall(real, fake, block_size=block_size, device="cpu")
        assert got == pytest.approx(expected, abs=1e-12)
    radii = metrics.knn_radii(metrics._as_tensor(real, metrics.torch.device("cpu")), k=3, block_size=9).numpy()
    np.testing.assert_allclose(radii, slow_radii(real, 3), rtol=1e-9)


def test_identical_sets_give_zero_fid_and_kid_and_full_precision_recall():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(400, 8))
    result = metrics.feature_metrics(real, real.copy(), kid_subsets=20, kid_subset_size=200, device="cpu",
                                     block_size=64)
    assert result["precision"] == 1.0 and result["recall"] == 1.0
    assert result["fid"] == pytest.approx(0.0, abs=1e-8)
    shifted = metrics.feature_metrics(real, real + 3.0, kid_subsets=20, kid_subset_size=200, device="cpu")
    assert abs(result["kid"]) < 0.01 * shifted["kid"]                # ~0 on the scale of a real difference
    assert shifted["precision"] < 0.5 and shifted["recall"] < 0.5


def test_mode_dropped_digits_give_high_precision_and_low_recall(trained_classifier):
    model, _, _ = trained_classifier
    images, labels = load_digits_uint8("all")
    real = digits_features(model, images)
    one_class = digits_features(model, images[labels == 3])          # every generated image is a real "3"
    precision, recall = metrics.precision_recall(real, one_class, device="cpu")
    print(f"mode-dropped digits: precision {precision:.3f}, recall {recall:.3f}")
    assert precision > 0.95 and recall < 0.25
    assert recall == pytest.approx(slow_coverage(real, one_class, slow_radii(one_class, 3)), abs=1e-12)


def test_too_few_images_are_recorded_unavailable_with_a_reason():
    rng = np.random.default_rng(2)
    result = metrics.feature_metrics(rng.normal(size=(50, 3)), rng.normal(size=(3, 3)), device="cpu")
    assert result["precision"] is None and result["recall"] is None
    assert "k = 3" in result["precision_unavailable"] and result["kid"] is not None
    stats_only = metrics.feature_metrics(None, rng.normal(size=(20, 3)),
                                         reference=fid.FeatureStats(np.zeros(3), np.eye(3), 0),
                                         no_real_reason="only mu/sigma")
    assert stats_only["kid"] is None and stats_only["kid_unavailable"] == "only mu/sigma"
    assert stats_only["precision_unavailable"] == "only mu/sigma" and stats_only["fid"] > 0


#################################################################################
#                                   KID, FID                                    #
#################################################################################

def test_unbiased_polynomial_mmd_matches_explicit_loops():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(9, 4)), rng.normal(loc=0.5, size=(7, 4))
    got = metrics.polynomial_mmd2_unbiased(metrics.torch.from_numpy(x), metrics.torch.from_numpy(y))
    assert got == pytest.approx(slow_mmd2_unbiased(x, y), rel=1e-10)
    # Subsets as large as the sets use every vector: the estimate is the full-set one, whatever the order drawn.
    mean, std, size = metrics.kernel_inception_distance(x[:7], y, num_subsets=5, subset_size=50, device="cpu")
    assert size == 7 and mean == pytest.approx(slow_mmd2_unbiased(x[:7], y), rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-9 * abs(mean))


def test_kid_over_subsets_matches_loops_on_the_same_subsets():
    rng = np.random.default_rng(4)
    real, fake = rng.normal(size=(30, 3)), rng.normal(scale=1.5, size=(25, 3))
    mean, std, size = metrics.kernel_inception_distance(real, fake, num_subsets=4, subset_size=10, seed=7,
                                                        device="cpu")
    draw = np.random.default_rng(7)                                  # the documented draw: real, then fake indices
    values = []
    for _ in range(4):
        real_idx, fake_idx = draw.choice(30, 10, replace=False), draw.choice(25, 10, replace=False)
        values.append(slow_mmd2_unbiased(real[real_idx], fake[fake_idx]))
    assert size == 10
    assert mean == pytest.approx(np.mean(values), rel=1e-10) and std == pytest.approx(np.std(values), rel=1e-8)


def test_shifted_gaussians_give_the_closed_form_fid():
    rng = np.random.default_rng(5)
    dim, n = 6, 3000
    # Whitened samples have sample mean 0 and sample covariance I exactly, so the closed form holds exactly:
    # FID(N(0, I), N(mu, diag(s^2))) = ||mu||^2 + sum(1 + s^2 - 2 s).
    z = rng.normal(size=(n, dim))
    z -= z.mean(axis=0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
    mu, scale = rng.normal(size=dim), rng.uniform(0.5, 2.0, size=dim)
    result = metrics.feature_metrics(z, z * scale + mu, kid_subsets=2, kid_subset_size=100, device="cpu")
    expected = np.sum(mu ** 2) + np.sum(1.0 + scale ** 2 - 2.0 * scale)
    assert result["fid"] == pytest.approx(expected, rel=1e-8)


#################################################################################
#                       Inception Score, per-class accuracy                     #
#################################################################################

def test_inception_score_uniform_is_one_and_perfect_balanced_is_the_number_of_classes():
    classes, splits = 7, 10
    uniform = np.zeros((140, classes))
    assert metrics.inception_score(uniform, "logits", splits)[0] == pytest.approx(1.0, abs=1e-12)
    labels = np.tile(np.arange(classes), 20)                          # each split of 14 holds every class twice
    confident = np.eye(classes)[labels]                               # one-hot probabilities
    mean, std = metrics.inception_score(confident, "probabilities", splits)
    assert mean == pytest.approx(classes, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)
    assert metrics.score_kind(confident) == "probabilities" and metrics.score_kind(uniform + 1.0) == "logits"
    logits = 60.0 * np.eye(classes)[labels]                           # a near-certain classifier, as logits
    assert metrics.inception_score(logits, "logits", splits)[0] == pytest.approx(classes, rel=1e-6)


def test_inception_score_matches_explicit_loops_on_random_logits():
    logits = np.random.default_rng(6).normal(scale=3.0, size=(53, 5))   # 53: splits of unequal size
    mean, _ = metrics.inception_score(logits, "logits", 10)
    assert mean == pytest.approx(slow_inception_score(logits, 10), rel=1e-10)
    assert 1.0 < mean < 5.0
    with pytest.raises(ValueError, match="10 splits"):
        metrics.inception_score(logits[:9], "logits", 10)


def test_per_class_accuracy_matches_a_loop():
    rng = np.random.default_rng(9)
    labels, predictions = rng.integers(0, 4, size=50), rng.integers(0, 4, size=50)
    labels[labels == 2] = 1                                            # class 2 never appears
    got = metrics.per_class_accuracy(predictions, labels, 4)
    for c in (0, 1, 3):
        members = [p for p, l in zip(predictions, labels) if l == c]
        assert got[c] == pytest.approx(sum(p == c for p in members) / len(members))
    assert got[2] is None
