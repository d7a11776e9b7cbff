"""Suite-wide settings and shared fixtures.

One intra-op thread: tiny tensors, and oversubscribed threads on 2 shared cores are 10-100x slower. The fixtures
shared by several test files (digits classifier, Inception stand-in, image folder, tiny VAE, extracted latents)
are session-scoped, so each is built once per run.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

CLASS_COLOURS = {"b_red": (255, 0, 0), "a_blue": (0, 0, 255)}  # created in this order, labelled by sorted name
IMAGES_PER_CLASS = {"b_red": 4, "a_blue": 4}  # class boundary inside chunk 1


#################################################################################
#                     Digits classifier and Inception stand-in                  #
#################################################################################

@pytest.fixture(scope="session")
def trained_classifier(tmp_path_factory):
    """Train the digits classifier once for the session and cache it to safetensors: (model, accuracy, path)."""
    from classifier import load_or_train_digits_classifier
    path = str(tmp_path_factory.mktemp("classifier") / "digits_classifier.safetensors")
    model, accuracy = load_or_train_digits_classifier(path, seed=0)
    return model, accuracy, path


class InceptionStandIn(torch.nn.Module):
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


@pytest.fixture
def inception_stand_in(tmp_path) -> tuple[InceptionStandIn, str]:
    """The stand-in and its TorchScript file (what load_inception_torchscript reads)."""
    stand_in = InceptionStandIn()
    path = str(tmp_path / "inception-stand-in.pt")
    torch.jit.script(stand_in).save(path)
    return stand_in, path


#################################################################################
#                     Image folder, tiny VAE, extracted latents                 #
#################################################################################

@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """Two classes of small images: left-to-right ramps of the class colour, a distinct peak per image."""
    from PIL import Image
    root = tmp_path_factory.mktemp("images")
    for name, colour in CLASS_COLOURS.items():
        (root / name).mkdir()
        for k in range(IMAGES_PER_CLASS[name]):
            height, width = (32, 40) if k == 1 else (32, 32)  # one non-square image
            ramp = np.linspace(0.2, 1.0, width) * (k + 2) / (IMAGES_PER_CLASS[name] + 1)  # (W,), not symmetric
            pixels = np.broadcast_to(ramp[None, :, None] * np.array(colour), (height, width, 3))
            Image.fromarray(pixels.round().astype(np.uint8)).save(root / name / f"{k}.png")
    return root


@pytest.fixture(scope="session")
def vae_dir(tmp_path_factory) -> Path:
    """A tiny randomly initialised AutoencoderKL (4 levels: 8x downsampling) saved with save_pretrained."""
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                        layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32,
                        scaling_factor=0.5)  # not SD's 0.18215, so a hard-coded factor would be caught
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def vae(vae_dir):
    """The tiny VAE loaded back through load_vae (from_pretrained)."""
    from vae import load_vae
    return load_vae(str(vae_dir), "cpu")


@pytest.fixture(scope="session")
def run_extract(image_folder, vae_dir) -> Callable[..., dict]:
    """extract_features.py in-process (one process) on the test folder: chunks of 3 images, batches of 2."""
    import extract_features

    def run(out: Path, *extra: str) -> dict:
        return extract_features.main(["--data_path", str(image_folder), "--features_path", str(out), "--vae",
                                      str(vae_dir), "--image_size", "32", "--chunk_size", "3", "--batch_size", "2",
                                      *extra])
    return run


@pytest.fixture(scope="session")
def features(tmp_path_factory, run_extract) -> Path:
    """Latents of the test folder with flipped copies, using the posterior mean so they can be recomputed."""
    out = tmp_path_factory.mktemp("features") / "feats"
    run_extract(out, "--flip", "True", "--sample_posterior", "False")
    return out
