"""Tests for classifier.py: the digits CNN (accuracy, safetensors cache) and digits-FID on its features; the
shipped MNIST-5k classifier."""
from pathlib import Path

import numpy as np
import pytest

import classifier
import fid
from config import UserError
from data import load_digits_uint8, load_mnist5k_uint8

MNIST5K_CLASSIFIER = Path(__file__).resolve().parents[1] / "experiments" / "results" / "mnist5k_classifier.safetensors"


def _add_pixel_noise(images: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """Add N(0, std^2) noise in [-1, 1] pixel space (same on all channels) and re-quantise to uint8."""
    x = images.astype(np.float64) / 127.5 - 1.0
    x = x + rng.normal(0.0, std, size=images.shape[:3])[..., None]
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


#################################################################################
#                        Digits classifier and digits-FID                       #
#################################################################################

def test_digits_classifier_accuracy_and_cache(trained_classifier):
    model, accuracy, path = trained_classifier
    print(f"digits classifier test accuracy: {accuracy:.4f}")
    assert accuracy > 0.9
    test_images, test_labels = load_digits_uint8("test")
    assert len(test_images) == 450 and len(load_digits_uint8("train")[0]) == 1347
    # Shuffled labels: accuracy falls to chance, so the metric really looks at the labels.
    shuffled = np.random.default_rng(4).permutation(test_labels)
    assert classifier.classifier_accuracy(model, test_images, shuffled) < 0.3
    # 2x nearest-upsampled samples (a 16x16 model's output) are downsampled exactly back to 8x8.
    upsampled = test_images.repeat(2, axis=1).repeat(2, axis=2)
    assert classifier.classifier_accuracy(model, upsampled, test_labels) == pytest.approx(accuracy)
    # The safetensors cache reloads the same weights (same features, same accuracy) without retraining.
    reloaded, reloaded_accuracy = classifier.load_or_train_digits_classifier(path, seed=0)
    assert reloaded_accuracy == pytest.approx(accuracy)
    assert classifier.digits_feature_extractor_id(reloaded) == classifier.digits_feature_extractor_id(model)
    with pytest.raises(ValueError, match="seed"):
        classifier.load_or_train_digits_classifier(path, seed=1)


def test_digits_fid_real_vs_real_and_increasing_with_noise(trained_classifier):
    model, _, _ = trained_classifier
    images, _ = load_digits_uint8("all")
    features = classifier.digits_features(model, images)
    assert features.shape == (1797, classifier.DIGITS_FEATURE_DIM)
    full = fid.FeatureStats.from_features(features)
    same = fid.fid_from_stats(full, full)
    assert abs(same) < 1e-6

    permutation = np.random.default_rng(5).permutation(len(images))
    half_a, half_b = images[permutation[:898]], images[permutation[898:]]
    stats_a = fid.FeatureStats.from_features(classifier.digits_features(model, half_a))
    rng = np.random.default_rng(6)
    stds = [0.0, 0.1, 0.2, 0.4, 0.8]
    fids = [fid.fid_from_stats(stats_a, fid.FeatureStats.from_features(
        classifier.digits_features(model, _add_pixel_noise(half_b, std, rng)))) for std in stds]
    print(f"digits-FID same set {same:.2e}; disjoint halves {fids[0]:.3f}; "
          + ", ".join(f"noise {s}: {f:.2f}" for s, f in zip(stds, fids)))
    assert fids[0] < 0.2 * fids[-1]  # disjoint halves of real data: small next to heavily corrupted data
    assert all(later > earlier for earlier, later in zip(fids, fids[1:])), fids

    # The convenience used by experiments agrees with the pieces.
    metrics = classifier.evaluate_digits_samples(model, half_b, reference=stats_a)
    assert metrics["digits_fid"] == pytest.approx(fids[0], rel=1e-9)
    assert sum(metrics["predicted_class_histogram"]) == len(half_b)


#################################################################################
#                              MNIST-5k classifier                              #
#################################################################################

def test_shipped_mnist5k_classifier_loads_and_is_accurate(trained_classifier):
    from safetensors.torch import safe_open
    assert MNIST5K_CLASSIFIER.stat().st_size < 1_000_000
    with safe_open(str(MNIST5K_CLASSIFIER), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == classifier.MNIST5K_CLASSIFIER_FORMAT and metadata["steps"] == "1500"
    model, accuracy = classifier.load_or_train_classifier("mnist5k", str(MNIST5K_CLASSIFIER), seed=0)
    print(f"mnist5k classifier test accuracy: {accuracy:.4f} (recorded {metadata['test_accuracy']})")
    assert isinstance(model, classifier.Mnist5kClassifier) and accuracy >= 0.95
    assert accuracy == pytest.approx(float(metadata["test_accuracy"]), abs=1e-6)
    images, labels = load_mnist5k_uint8("test")
    features = classifier.digits_features(model, images[:50])
    assert features.shape == (50, classifier.MNIST5K_FEATURE_DIM) and np.isfinite(features).all()
    assert classifier.digits_feature_extractor_id(model).startswith(classifier.MNIST5K_CLASSIFIER_FORMAT)
    shuffled = np.random.default_rng(4).permutation(labels)
    assert classifier.classifier_accuracy(model, images, shuffled) < 0.3
    # A classifier file of the other dataset is refused by its format, not loaded into the wrong network.
    _, _, digits_path = trained_classifier
    with pytest.raises(UserError, match="not a mnist5k classifier"):
        classifier.load_or_train_classifier("mnist5k", digits_path, seed=0)
    with pytest.raises(UserError, match="not a digits classifier"):
        classifier.load_or_train_digits_classifier(str(MNIST5K_CLASSIFIER), seed=0)
    with pytest.raises(UserError, match="--dataset 'cifar'"):
        classifier.classifier_spec("cifar")


def test_digits_logits_predict_what_the_classifier_predicts(trained_classifier):
    model, _, _ = trained_classifier
    images, labels = load_digits_uint8("test")
    logits = classifier.digits_logits(model, images, batch_size=100)   # batches: the same as one pass
    assert logits.shape == (len(images), 10)
    assert np.mean(logits.argmax(axis=1) == labels) == pytest.approx(classifier.classifier_accuracy(model, images,
                                                                                                    labels))
    assert classifier.predicted_class_histogram(model, images) == np.bincount(logits.argmax(1), minlength=10).tolist()
