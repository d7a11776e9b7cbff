"""Tests for evaluate.py end to end: digits-FID with the classifier, Inception FID with a stand-in network."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import evaluate
from config import UserError
from data import load_digits_uint8, load_mnist5k_uint8
from fid import FeatureStats

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST5K_CLASSIFIER = os.path.join(REPO_ROOT, "experiments", "results", "mnist5k_classifier.safetensors")


def test_evaluate_cli_digits_end_to_end(tmp_path, trained_classifier):
    _, accuracy, classifier_path = trained_classifier
    images, labels = load_digits_uint8("test")
    samples = tmp_path / "samples.npz"
    np.savez(samples, images[:200], labels[:200])  # 8x8 RGB "samples" (real digits)
    setup = {"ckpt": "results/000/checkpoints/0001000.pt", "ema": True, "sampler": "ddpm", "num_sampling_steps": 10,
             "fixed_point_iters": 4, "iteration_schedule": "fixed", "budget": 60, "cfg_scale": 1.0, "vae": None}
    (tmp_path / "setup.json").write_text(json.dumps(setup))
    out = tmp_path / "eval.jsonl"
    argv = ["--samples", str(samples), "--dataset", "digits", "--classifier", classifier_path,
            "--setup", str(tmp_path / "setup.json"), "--out", str(out),
            "--ref_stats", str(tmp_path / "digits_ref.npz")]
    with pytest.warns(UserWarning, match="50,000"):
        evaluate.main(argv)
    with pytest.warns(UserWarning, match="50,000"):
        evaluate.main(argv)  # second run reads the cached reference statistics
    lines = out.read_text().splitlines()
    assert len(lines) == 2 and os.path.exists(tmp_path / "digits_ref.npz")
    first, second = json.loads(lines[0]), json.loads(lines[1])
    print(f"evaluate.py digits end to end: {first['metrics']}")
    assert first["metrics"]["fid"] == pytest.approx(second["metrics"]["fid"], rel=1e-9)
    assert first["metrics"]["classifier_accuracy"] > 0.9
    assert first["metrics"]["classifier_test_accuracy"] == pytest.approx(accuracy)
    assert first["setup"]["sampling"] == setup
    assert first["setup"]["num_samples"] == 200 and first["setup"]["reference"]["split"] == "all"
    assert first["setup"]["reference"]["num_images"] == 1797
    assert any("50,000" in w for w in first["warnings"])
    assert "digits-FID" in first["setup"]["note"]
    # The five metrics, from the classifier's features and logits; the cache key is recorded and reused.
    metrics = first["metrics"]
    assert metrics["precision"] > 0.9 and metrics["recall"] > 0.5 and metrics["kid"] == second["metrics"]["kid"]
    assert metrics["inception_score"] > 5.0 and metrics["inception_score_input"] == "logits"
    assert len(metrics["per_class_accuracy"]) == 10 and min(metrics["per_class_accuracy"]) > 0.7
    reference = first["setup"]["reference"]
    assert reference["cache_key"] == second["setup"]["reference"]["cache_key"] and reference["features_available"]
    assert not os.path.isabs(first["setup"]["samples"]) and not os.path.isabs(reference["stats_path"])

    # A cache of another reference set is refused rather than silently reused.
    with pytest.raises(ValueError, match="--ref_stats.*digits_ref.npz"), pytest.warns(UserWarning, match="50,000"):
        evaluate.main(argv + ["--ref_split", "test"])
    assert len(out.read_text().splitlines()) == 2

    # Flags: unknown and abbreviated flags are rejected.
    for bad in (["--samples", str(samples), "--bogus", "1"], ["--sample", str(samples)]):
        with pytest.raises(SystemExit):
            evaluate.main(bad)


def test_evaluate_inception_path_with_stand_in(tmp_path, inception_stand_in):
    _, inception_path = inception_stand_in
    rng = np.random.default_rng(8)
    np.savez(tmp_path / "real.npz", rng.integers(0, 256, size=(40, 16, 16, 3), dtype=np.uint8))
    np.savez(tmp_path / "fake.npz", rng.integers(0, 128, size=(30, 16, 16, 3), dtype=np.uint8))
    out = str(tmp_path / "eval.jsonl")
    with pytest.warns(UserWarning):
        record = evaluate.main(["--samples", str(tmp_path / "fake.npz"), "--inception", inception_path,
                                "--ref_npz", str(tmp_path / "real.npz"), "--out", out])
    assert record["metrics"]["fid_kind"] == "inception-fid" and record["metrics"]["fid"] > 0.0
    assert "not comparable to the paper's TensorFlow-evaluator numbers" in record["setup"]["note"]
    assert record["setup"]["feature_extractor"]["feature_dim"] == 6
    assert "sampling" not in record["setup"]
    # sample_ddp.py's setup.json beside the samples is picked up without --setup.
    (tmp_path / "setup.json").write_text(json.dumps({"setup": {"ckpt": "x.pt", "budget": 140}, "runs": []}))
    with pytest.warns(UserWarning):
        record = evaluate.main(["--samples", str(tmp_path / "fake.npz"), "--inception", inception_path,
                                "--ref_npz", str(tmp_path / "real.npz"), "--out", out])
    assert record["setup"]["sampling"]["setup"]["budget"] == 140
    assert len(open(out).read().splitlines()) == 2
    with pytest.raises(ValueError, match="--inception"):
        evaluate.main(["--samples", str(tmp_path / "fake.npz"), "--features", "inception", "--ref_npz",
                       str(tmp_path / "real.npz"), "--out", out])
    with pytest.raises(ValueError, match="reference"):
        evaluate.main(["--samples", str(tmp_path / "fake.npz"), "--inception", inception_path, "--out", out])


def test_evaluate_script_reports_missing_file(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "evaluate.py"), "--samples", str(tmp_path / "absent.npz"),
         "--out", str(tmp_path / "eval.jsonl")],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 2
    assert "--samples" in result.stderr and "absent.npz" in result.stderr
    assert not (tmp_path / "eval.jsonl").exists()


def test_digits_features_refuse_other_sizes_and_missing_classifiers(tmp_path, trained_classifier):
    _, _, classifier_path = trained_classifier
    images, labels = load_digits_uint8("test")
    big = tmp_path / "big.npz"
    np.savez(big, images[:20].repeat(4, axis=1).repeat(4, axis=2), labels[:20])  # 32x32: never shrunk silently
    out = tmp_path / "eval.jsonl"
    with pytest.raises(UserError, match=r"--samples .*big.npz.*8x8.*32x32"):
        evaluate.main(["--samples", str(big), "--classifier", classifier_path, "--out", str(out)])
    small = tmp_path / "small.npz"
    np.savez(small, images[:80], labels[:80])
    typo = tmp_path / "digits_clasifier.safetensors"
    with pytest.raises(UserError, match=r"--classifier .*digits_clasifier.safetensors.*--train_classifier"):
        evaluate.main(["--samples", str(small), "--classifier", str(typo), "--out", str(out)])
    assert not typo.exists() and not out.exists()
    with pytest.warns(UserWarning, match="50,000"):
        evaluate.main(["--samples", str(small), "--classifier", str(typo), "--train_classifier", "True",
                       "--out", str(out)])
    assert typo.is_file() and len(out.read_text().splitlines()) == 1


def test_evaluate_mnist5k_with_the_shipped_classifier_and_refuse_other_sizes(tmp_path):
    images, labels = load_mnist5k_uint8("test")
    chosen = np.random.default_rng(0).permutation(len(images))[:300]  # the split is sorted by class: mix it
    samples = tmp_path / "samples.npz"
    np.savez(samples, images[chosen], labels[chosen])  # 28x28 RGB "samples" (real MNIST-5k test digits)
    out = tmp_path / "eval.jsonl"
    argv = ["--samples", str(samples), "--dataset", "mnist5k", "--classifier", MNIST5K_CLASSIFIER, "--out", str(out)]
    with pytest.warns(UserWarning, match="50,000"):
        record = evaluate.main(argv)
    metrics, setup = record["metrics"], record["setup"]
    print(f"evaluate.py mnist5k: {metrics}")
    assert metrics["fid_kind"] == "mnist5k-fid" and metrics["fid"] >= 0.0
    assert metrics["classifier_accuracy"] > 0.95 and metrics["classifier_test_accuracy"] >= 0.95
    assert setup["reference"]["num_images"] == 5000 and setup["reference"]["dataset"] == "mnist5k"
    assert setup["feature_extractor"]["classifier_dataset"] == "mnist5k" and "mnist5k-FID" in setup["note"]
    assert metrics["precision"] > 0.9 and metrics["recall"] > 0.5 and metrics["inception_score"] > 5.0
    assert metrics["kid"] is not None and len(metrics["per_class_accuracy"]) == 10
    small = tmp_path / "small.npz"
    digits, digit_labels = load_digits_uint8("test")
    np.savez(small, digits[:20], digit_labels[:20])  # 8x8 digits samples: not an mnist5k model's output
    with pytest.raises(UserError, match=r"--samples .*small.npz.*mnist5k classifier takes 28x28.*8x8"):
        evaluate.main(["--samples", str(small), "--dataset", "mnist5k", "--classifier", MNIST5K_CLASSIFIER,
                       "--out", str(out)])
    assert len(out.read_text().splitlines()) == 1


class NaNFeatures(torch.nn.Module):
    """A feature network (FID Inception call convention) whose features are all NaN."""

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return torch.full((img.shape[0], 6), float("nan"))


def test_non_finite_features_or_reference_stop_naming_the_file(tmp_path, inception_stand_in):
    _, inception_path = inception_stand_in
    rng = np.random.default_rng(8)
    np.savez(tmp_path / "real.npz", rng.integers(0, 256, size=(40, 16, 16, 3), dtype=np.uint8))
    np.savez(tmp_path / "fake.npz", rng.integers(0, 128, size=(30, 16, 16, 3), dtype=np.uint8))
    nan_path = str(tmp_path / "nan-inception.pt")
    torch.jit.script(NaNFeatures()).save(nan_path)
    out = tmp_path / "eval.jsonl"
    with pytest.raises(UserError, match=r"--samples .*fake.npz.*not finite"), pytest.warns(UserWarning):
        evaluate.main(["--samples", str(tmp_path / "fake.npz"), "--inception", nan_path,
                       "--ref_npz", str(tmp_path / "real.npz"), "--out", str(out)])
    stats = tmp_path / "nan_stats.npz"
    FeatureStats(mu=np.full(6, np.nan), sigma=np.eye(6), n=40).save(str(stats))
    with pytest.raises(UserError, match=r"nan_stats.npz.*not finite"), pytest.warns(UserWarning):
        evaluate.main(["--samples", str(tmp_path / "fake.npz"), "--inception", inception_path,
                       "--ref_stats", str(stats), "--out", str(out)])
    assert not out.exists()


class InceptionWithLogits(torch.nn.Module):
    """Stand-in with the full Inception interface: uint8 (N, 3, H, W) -> (N, 6) features with return_features=True,
    else (N, 8) logits."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(1)
        self.register_buffer("projection", torch.randn(6, 6, generator=generator))
        self.register_buffer("classes", torch.randn(6, 8, generator=generator) * 4.0)

    def forward(self, img: torch.Tensor, return_features: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        x = img.to(torch.float32) / 255.0                                  # (N, 3, H, W)
        features = torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], 1) @ self.projection   # (N, 6)
        if return_features:
            return features                                                # (N, 6)
        bias = torch.zeros(8) if no_output_bias else torch.arange(8.0) * 3.0
        return features @ self.classes + bias                              # (N, 8) logits


def test_inception_records_all_metrics_and_refuses_a_stale_reference_cache(tmp_path):
    import metrics
    path = str(tmp_path / "inception-logits.pt")
    stand_in = InceptionWithLogits()
    torch.jit.script(stand_in).save(path)
    rng = np.random.default_rng(3)
    real = rng.integers(0, 256, size=(60, 16, 16, 3), dtype=np.uint8)
    fake = np.concatenate([real[:30], rng.integers(0, 200, size=(10, 16, 16, 3), dtype=np.uint8)])
    np.savez(tmp_path / "real.npz", real)
    np.savez(tmp_path / "fake.npz", fake, rng.integers(0, 8, size=40))
    argv = ["--samples", str(tmp_path / "fake.npz"), "--inception", path, "--ref_npz", str(tmp_path / "real.npz"),
            "--ref_stats", str(tmp_path / "cache.npz"), "--out", str(tmp_path / "eval.jsonl"), "--kid_subsets", "5",
            "--metric_block_size", "7"]
    with pytest.warns(UserWarning):
        record = evaluate.main(argv)
    result = record["metrics"]
    logits = stand_in(torch.from_numpy(fake).permute(0, 3, 1, 2), no_output_bias=True).double().numpy()
    assert result["inception_score"] == pytest.approx(metrics.inception_score(logits, "logits")[0], rel=1e-5)
    real_features = stand_in(torch.from_numpy(real).permute(0, 3, 1, 2), True).double().numpy()
    fake_features = stand_in(torch.from_numpy(fake).permute(0, 3, 1, 2), True).double().numpy()
    expected = metrics.precision_recall(real_features, fake_features, device="cpu")
    assert (result["precision"], result["recall"]) == pytest.approx(expected, abs=1e-9)
    assert 0.0 < result["precision"] < 1.0 and result["recall"] > 0.0
    assert result["kid"] is not None and result["fid"] > 0
    assert result["per_class_accuracy"] is None and "1008" in result["per_class_accuracy_unavailable"]
    key = record["setup"]["reference"]["cache_key"]
    np.savez(tmp_path / "real.npz", real[:50])                        # the reference changes under its cache
    with pytest.raises(UserError, match=r"--ref_stats .*cache.npz.*stale"), pytest.warns(UserWarning):
        evaluate.main(argv)
    np.savez(tmp_path / "real.npz", real)                             # back: the cache is valid again
    with pytest.warns(UserWarning):
        assert evaluate.main(argv)["setup"]["reference"]["cache_key"] == key


def test_inception_without_logits_or_reference_images_says_why(tmp_path, inception_stand_in):
    _, path = inception_stand_in                                      # returns features only
    rng = np.random.default_rng(4)
    np.savez(tmp_path / "fake.npz", rng.integers(0, 256, size=(30, 16, 16, 3), dtype=np.uint8))
    np.savez(tmp_path / "adm_stats.npz", mu=np.zeros(6), sigma=np.eye(6))   # ADM statistics-only reference
    with pytest.warns(UserWarning):
        record = evaluate.main(["--samples", str(tmp_path / "fake.npz"), "--inception", path, "--ref_npz",
                                str(tmp_path / "adm_stats.npz"), "--out", str(tmp_path / "eval.jsonl")])
    assert any("do not say which feature extractor" in warning for warning in record["warnings"])
    result = record["metrics"]
    assert result["fid"] > 0 and result["kid"] is None and result["precision"] is None and result["recall"] is None
    assert "adm_stats.npz holds only mu/sigma" in result["kid_unavailable"]
    assert result["inception_score"] is None and "return_features" in result["inception_score_unavailable"]
    np.savez(tmp_path / "wide_stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))   # another network's statistics
    np.savez(tmp_path / "neither.npz", labels=np.zeros(3))
    for reference, message in (("wide_stats.npz", r"wide_stats.npz has 2048-d.*6-d"), ("neither.npz", r"arr_0.*mu")):
        with pytest.raises(UserError, match=message), pytest.warns(UserWarning):
            evaluate.main(["--samples", str(tmp_path / "fake.npz"), "--inception", path, "--ref_npz",
                           str(tmp_path / reference), "--out", str(tmp_path / "eval.jsonl")])
    assert len((tmp_path / "eval.jsonl").read_text().splitlines()) == 1


def test_unconditional_digits_samples_record_why_accuracy_is_missing(tmp_path, trained_classifier):
    _, _, classifier_path = trained_classifier
    images, _ = load_digits_uint8("test")
    np.savez(tmp_path / "samples.npz", images[:60])                   # no arr_1
    with pytest.warns(UserWarning):
        record = evaluate.main(["--samples", str(tmp_path / "samples.npz"), "--classifier", classifier_path,
                                "--out", str(tmp_path / "eval.jsonl"), "--progress", "False"])
    result = record["metrics"]
    assert result["classifier_accuracy"] is None and result["per_class_accuracy"] is None
    assert "no labels" in result["per_class_accuracy_unavailable"]
    assert all(result[name] is not None for name in ("fid", "kid", "precision", "recall", "inception_score"))
