"""vae.py: AutoencoderKL loading, encoding with the config's scaling factor, decoding."""
import pytest
import torch

from vae import decode_latents, encode_images, load_vae


def test_vae_round_trip_and_errors(vae, tmp_path):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean = vae.encode(images).latent_dist.mode()
    torch.testing.assert_close(encode_images(vae, images, sample_posterior=False), mean * 0.5)
    first = encode_images(vae, images, torch.Generator().manual_seed(1))
    assert torch.equal(first, encode_images(vae, images, torch.Generator().manual_seed(1)))
    assert not torch.allclose(first, mean * 0.5)
    decoded = decode_latents(vae, first)
    assert decoded.shape == (2, 3, 32, 32) and decoded.min() >= -1 and decoded.max() <= 1
    with pytest.raises(FileNotFoundError, match="--vae"):
        load_vae(str(tmp_path / "missing_vae"))
    (tmp_path / "not_a_vae").mkdir()
    with pytest.raises(ValueError, match="--vae.*local folder"):
        load_vae(str(tmp_path / "not_a_vae"))
