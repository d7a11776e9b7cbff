"""Tests for fid.py (Fréchet distance, stats cache, digits classifier, Inception loader) and evaluate.py."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import evaluate  # noqa: E402
import fid  # noqa: E402


#################################################################################
#                                  Fixtures                                     #
#################################################################################

@pytest.fixture(scope="module")
def trained_classifier(tmp_path_factory):
    """Train the digits classifier once for the module and cache it to safetensors."""
    path = str(tmp_path_factory.mktemp("classifier") / "digits_classifier.safetensors")
    model, accuracy = fid.load_or_train_digits_classifier(path, seed=0)
    return model, accuracy, path


def _random_covariance(rng: np.random.Generator, dim: int) -> np.ndarray:
    factor = rng.normal(size=(dim, dim))
    return factor @ factor.T / dim + 0.1 * np.eye(dim)


def _add_pixel_noise(images: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """Add N(0, std^2) noise in [-1, 1] pixel space (same on all channels) and re-quantise to uint8."""
    x = images.astype(np.float64) / 127.5 - 1.0
    x = x + rng.normal(0.0, std, size=images.shape[:3])[..., None]
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


#################################################################################
#                              Fréchet distance                                 #
#################################################################################

def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    dim = 12
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    s1, s2 = rng.uniform(0.1, 3.0, size=dim), rng.uniform(0.1, 3.0, size=dim)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2.0 * np.sqrt(s1 * s2))
    got = fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert fid.frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1)) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_full_covariance_matches_eigendecomposition():
    rng = np.random.default_rng(1)
    dim = 16
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    sigma1, sigma2 = _random_covariance(rng, dim), _random_covariance(rng, dim)
    # Independent route: Tr((S1 S2)^{1/2}) = Tr((S1^{1/2} S2 S1^{1/2})^{1/2}) = sum of sqrt of its eigenvalues.
    values, vectors = np.linalg.eigh(sigma1)
    root1 = vectors @ np.diag(np.sqrt(values)) @ vectors.T
    inner_eigenvalues = np.clip(np.linalg.eigvalsh(root1 @ sigma2 @ root1), 0.0, None)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.sum(np.sqrt(inner_eigenvalues))
    got = fid.frechet_distance(mu1, sigma1, mu2, sigma2)
    assert got == pytest.approx(expected, rel=1e-8)
    assert fid.frechet_distance(mu2, sigma2, mu1, sigma1) == pytest.approx(got, rel=1e-8)  # symmetric


def test_frechet_distance_singular_covariances_and_bad_shapes():
    # Rank-deficient covariances (e.g. fewer samples than dimensions): finite and close to the closed form.
    sigma = np.diag([2.0, 0.0, 0.0])
    assert fid.frechet_distance(np.zeros(3), sigma, np.zeros(3), sigma) == pytest.approx(0.0, abs=1e-4)
    zeros = np.zeros((3, 3))
    assert fid.frechet_distance(np.zeros(3), zeros, np.ones(3), zeros) == pytest.approx(3.0, abs=1e-4)
    with pytest.raises(ValueError, match="covariances"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4)[:3])
    with pytest.raises(ValueError, match="mean"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_frechet_distance_complex_round_off(monkeypatch):
    real_sqrtm = fid.linalg.sqrtm
    monkeypatch.setattr(fid.linalg, "sqrtm", lambda a: real_sqrtm(a) + 1e-9j)   # tiny imaginary part: dropped
    assert fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2)) == pytest.approx(0.0, abs=1e-8)
    monkeypatch.setattr(fid.linalg, "sqrtm", lambda a: real_sqrtm(a) + 0.5j)    # large: refused
    with pytest.raises(ValueError, match="imaginary"):
        fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2))


#################################################################################
#                        Feature statistics and cache                           #
#################################################################################

def test_feature_stats_round_trip_and_reference_cache(tmp_path):
    rng = np.random.default_rng(2)
    features = rng.normal(size=(50, 4))
    calls = []

    def compute():
        calls.append(1)
        return fid.FeatureStats.from_features(features, feature_extractor="extractor-a", source="test")

    path = str(tmp_path / "ref" / "stats.npz")
    first = fid.load_or_compute_reference_stats(path, compute, feature_extractor="extractor-a")
    second = fid.load_or_compute_reference_stats(path, compute, feature_extractor="extractor-a")
    assert len(calls) == 1 and os.path.exists(path)
    np.testing.assert_allclose(second.mu, features.mean(0))
    np.testing.assert_allclose(second.sigma, np.cov(features, rowvar=False))
    assert (second.n, second.feature_extractor, second.source) == (50, "extractor-a", "test")
    assert fid.fid_from_stats(first, second) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="extractor-a"):
        fid.load_or_compute_reference_stats(path, compute, feature_extractor="extractor-b")
    with pytest.raises(ValueError, match="different feature extractors"):
        fid.fid_from_stats(first, fid.FeatureStats(first.mu, first.sigma, 50, feature_extractor="other"))
    with pytest.raises(FileNotFoundError, match="--ref_stats"):
        fid.FeatureStats.load(str(tmp_path / "missing.npz"))
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="garbage.npz"):
        fid.FeatureStats.load(str(garbage))
    np.savez(tmp_path / "images.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        fid.FeatureStats.load(str(tmp_path / "images.npz"))


def test_load_npz_samples_formats_and_errors(tmp_path):
    images = np.random.default_rng(3).integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "ok.npz", images, np.arange(5))
    loaded, labels = fid.load_npz_samples(str(tmp_path / "ok.npz"))
    np.testing.assert_array_equal(loaded, images)
    np.testing.assert_array_equal(labels, np.arange(5))
    np.savez(tmp_path / "gray.npz", images[..., :1])
    assert fid.load_npz_samples(str(tmp_path / "gray.npz"))[0].shape == (5, 8, 8, 3)
    assert fid.load_npz_samples(str(tmp_path / "gray.npz"))[1] is None

    with pytest.raises(FileNotFoundError, match="--samples.*nope.npz"):
        fid.load_npz_samples(str(tmp_path / "nope.npz"))
    bad_cases = {
        "float.npz": ({"arr_0": images.astype(np.float32)}, "uint8"),
        "nchw.npz": ({"arr_0": images.transpose(0, 3, 1, 2)}, "N, H, W, 3"),
        "nokey.npz": ({"images": images}, "arr_0"),
        "labels.npz": ({"arr_0": images, "arr_1": np.arange(4)}, "arr_1"),
    }
    for name, (arrays, message) in bad_cases.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(ValueError, match=message):
            fid.load_npz_samples(str(tmp_path / name))
    (tmp_path / "truncated.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="truncated.npz"):
        fid.load_npz_samples(str(tmp_path / "truncated.npz"))


#################################################################################
#                        Digits classifier and digits-FID                       #
#################################################################################

def test_digits_classifier_accuracy_and_cache(trained_classifier):
    model, accuracy, path = trained_classifier
    print(f"digits classifier test accuracy: {accuracy:.4f}")
    assert accuracy > 0.9
    test_images, test_labels = fid.load_digits_split("test")
    assert len(test_images) == 450 and len(fid.load_digits_split("train")[0]) == 1347
    # Shuffled labels: accuracy falls to chance, so the metric really looks at the labels.
    shuffled = np.random.default_rng(4).permutation(test_labels)
    assert fid.classifier_accuracy(model, test_images, shuffled) < 0.3
    # 2x nearest-upsampled samples (a 16x16 model's output) are downsampled exactly back to 8x8.
    upsampled = test_images.repeat(2, axis=1).repeat(2, axis=2)
    assert fid.classifier_accuracy(model, upsampled, test_labels) == pytest.approx(accuracy)
    # The safetensors cache reloads the same weights (same features, same accuracy) without retraining.
    reloaded, reloaded_accuracy = fid.load_or_train_digits_classifier(path, seed=0)
    assert reloaded_accuracy == pytest.approx(accuracy)
    assert fid.digits_feature_extractor_id(reloaded) == fid.digits_feature_extractor_id(model)
    with pytest.raises(ValueError, match="seed"):
        fid.load_or_train_digits_classifier(path, seed=1)


def test_digits_fid_real_vs_real_and_increasing_with_noise(trained_classifier):
    model, _, _ = trained_classifier
    images, _ = fid.load_digits_split("all")
    features = fid.digits_features(model, images)
    assert features.shape == (1797, fid.DIGITS_FEATURE_DIM)
    full = fid.FeatureStats.from_features(features)
    same = fid.fid_from_stats(full, full)
    assert abs(same) < 1e-6

    permutation = np.random.default_rng(5).permutation(len(images))
    half_a, half_b = images[permutation[:898]], images[permutation[898:]]
    stats_a = fid.FeatureStats.from_features(fid.digits_features(model, half_a))
    rng = np.random.default_rng(6)
    stds = [0.0, 0.1, 0.2, 0.4, 0.8]
    fids = [fid.fid_from_stats(stats_a, fid.FeatureStats.from_features(
        fid.digits_features(model, _add_pixel_noise(half_b, std, rng)))) for std in stds]
    print(f"digits-FID same set {same:.2e}; disjoint halves {fids[0]:.3f}; "
          + ", ".join(f"noise {s}: {f:.2f}" for s, f in zip(stds, fids)))
    assert fids[0] < 0.2 * fids[-1]  # disjoint halves of real data: small next to heavily corrupted data
    assert all(later > earlier for earlier, later in zip(fids, fids[1:])), fids

    # The convenience used by experiments agrees with the pieces.
    metrics = fid.evaluate_digits_samples(model, half_b, reference=stats_a)
    assert metrics["digits_fid"] == pytest.approx(fids[0], rel=1e-9)
    assert sum(metrics["predicted_class_histogram"]) == len(half_b)


#################################################################################
#                       Inception (TorchScript) loading path                    #
#################################################################################

class _InceptionStandIn(torch.nn.Module):
    """Tiny stand-in with the FID Inception call convention: uint8 (N, 3, H, W), return_features=True -> (N, D)."""

    def __init__(self, feature_dim: int = 6):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("projection", torch.randn(6, feature_dim, generator=generator))

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        if img.dtype != torch.uint8:
            raise RuntimeError("expected uint8 images")
        if not return_features:
            raise RuntimeError("stand-in only returns features")
        x = img.to(torch.float32) / 255.0                                  # (N, 3, H, W)
        moments = torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], 1)   # (N, 6)
        return moments @ self.projection                                   # (N, D)


def test_inception_torchscript_loading_and_errors(tmp_path):
    stand_in = _InceptionStandIn()
    path = str(tmp_path / "inception-stand-in.pt")
    torch.jit.script(stand_in).save(path)
    model = fid.load_inception_torchscript(path)
    images = np.random.default_rng(7).integers(0, 256, size=(7, 12, 12, 3), dtype=np.uint8)
    features = fid.inception_features(model, images, batch_size=3)
    expected = stand_in(torch.from_numpy(images).permute(0, 3, 1, 2), return_features=True).double().numpy()
    assert features.shape == (7, 6)
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)

    with pytest.raises(FileNotFoundError, match="--inception.*missing.pt"):
        fid.load_inception_torchscript(str(tmp_path / "missing.pt"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(256))
    with pytest.raises(ValueError, match="--inception.*garbage.pt.*TorchScript"):
        fid.load_inception_torchscript(str(garbage))
    pickle_file = tmp_path / "inception-2015-12-05.pkl"
    pickle_file.write_bytes(b"\x80\x04.")
    with pytest.raises(ValueError, match="--inception.*pickle"):
        fid.load_inception_torchscript(str(pickle_file))

    class _WrongShape(torch.nn.Module):
        def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return img.to(torch.float32).mean(dim=(1, 2, 3))              # (N,): not (N, D)

    wrong_path = str(tmp_path / "wrong.pt")
    torch.jit.script(_WrongShape()).save(wrong_path)
    with pytest.raises(ValueError, match="--inception.*shape"):
        fid.inception_features(fid.load_inception_torchscript(wrong_path), images)


#################################################################################
#                             evaluate.py end to end                            #
#################################################################################

def test_evaluate_cli_digits_end_to_end(tmp_path, trained_classifier):
    _, accuracy, classifier_path = trained_classifier
    images, labels = fid.load_digits_split("test")
    samples = tmp_path / "samples.npz"
    np.savez(samples, images[:200].repeat(2, axis=1).repeat(2, axis=2), labels[:200])  # 16x16 "samples"
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

    # A cache of another reference set is refused rather than silently reused.
    with pytest.raises(ValueError, match="--ref_stats.*digits_ref.npz"), pytest.warns(UserWarning, match="50,000"):
        evaluate.main(argv + ["--ref_split", "test"])
    assert len(out.read_text().splitlines()) == 2

    # Flags: unknown and abbreviated flags are rejected.
    for bad in (["--samples", str(samples), "--bogus", "1"], ["--sample", str(samples)]):
        with pytest.raises(SystemExit):
            evaluate.main(bad)


def test_evaluate_inception_path_with_stand_in(tmp_path):
    inception_path = str(tmp_path / "inception-stand-in.pt")
    torch.jit.script(_InceptionStandIn()).save(inception_path)
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
