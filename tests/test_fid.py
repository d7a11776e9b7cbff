"""Tests for fid.py: Frechet distance, the feature statistics cache, the Inception TorchScript loader."""
import os

import numpy as np
import pytest
import torch

import fid


def _random_covariance(rng: np.random.Generator, dim: int) -> np.ndarray:
    factor = rng.normal(size=(dim, dim))
    return factor @ factor.T / dim + 0.1 * np.eye(dim)


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


#################################################################################
#                       Inception (TorchScript) loading path                    #
#################################################################################

def test_inception_torchscript_loading_and_errors(tmp_path, inception_stand_in):
    stand_in, path = inception_stand_in
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
