"""The shipped digits models (pretrained/): a new user's first command draws recognisable digits."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sample
from checkpoint import BUNDLED_CHECKPOINT, load_model_for_sampling
from classifier import classifier_accuracy, load_or_train_digits_classifier

REPO = Path(__file__).resolve().parents[1]
CLASSIFIER = REPO / "experiments" / "results" / "digits_classifier.safetensors"


@pytest.fixture(scope="module")
def classifier():
    model, accuracy = load_or_train_digits_classifier(str(CLASSIFIER))
    assert accuracy > 0.95
    return model


def read_samples(folder: Path, count: int) -> np.ndarray:
    return np.stack([np.array(Image.open(folder / f"{i:06d}.png").convert("RGB")) for i in range(count)])


def test_bundled_checkpoint_is_the_shipped_fpdm():
    model, config = load_model_for_sampling(BUNDLED_CHECKPOINT)
    assert config.fixed_point and config.predict_v and config.use_zero_terminal_snr
    assert config.image_size == 8 and config.num_classes == 10
    assert sum(p.numel() for p in model.parameters()) < 2_000_000


def test_sample_py_without_arguments_draws_recognisable_digits(tmp_path, monkeypatch, classifier):
    monkeypatch.chdir(tmp_path)
    record = sample.main([])                     # exactly `python sample.py`
    images = read_samples(tmp_path / "samples", 16)
    labels = np.arange(16) % 10                  # sample.py cycles the classes 0..9
    assert classifier_accuracy(classifier, images, labels) >= 0.75
    assert record["stats"]["blocks_per_image_max"] == record["setup"]["plan"]["blocks_per_image"]
    assert Image.open(tmp_path / "samples" / "grid.png").size[0] >= 4 * 64  # grid enlarged to be seen


def test_shipped_dit_draws_digits_at_a_small_budget(tmp_path, classifier):
    out = tmp_path / "dit"
    sample.main(["--ckpt", str(REPO / "pretrained" / "dit-digits.safetensors"), "--budget", "80",
                 "--cfg_scale", "1.0", "--output_dir", str(out), "--num_samples", "20"])
    images = read_samples(out, 20)
    assert classifier_accuracy(classifier, images, np.arange(20) % 10) >= 0.7


def test_shipped_mnist5k_fpdm_draws_recognisable_digits(tmp_path):
    """`python sample.py --ckpt pretrained/fpdm-mnist5k.safetensors` (fewer steps here to keep the suite fast)."""
    from classifier import load_or_train_classifier
    path = REPO / "pretrained" / "fpdm-mnist5k.safetensors"
    _, config = load_model_for_sampling(path)
    assert config.fixed_point and config.image_size == 28 and config.model == "DiT-Ti/4"
    assert (config.fixed_point_no_grad_max_iters, config.fixed_point_with_grad_max_iters) == (12, 12)
    sample.main(["--ckpt", str(path), "--num_samples", "20", "--num_sampling_steps", "50",
                 "--output_dir", str(tmp_path / "samples")])
    images = read_samples(tmp_path / "samples", 20)
    assert images.shape[1:3] == (28, 28)
    mnist_classifier, test_accuracy = load_or_train_classifier(
        "mnist5k", str(REPO / "experiments" / "results" / "mnist5k_classifier.safetensors"))
    assert test_accuracy > 0.95
    assert classifier_accuracy(mnist_classifier, images, np.arange(20) % 10) >= 0.9
