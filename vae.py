"""The Stable Diffusion AutoencoderKL (diffusers): load from a local folder or the hub, encode, decode.

Latents are stored and modelled scaled: (z - shift_factor) * scaling_factor, with both factors read from the VAE's
config (0.18215 and no shift for the SD VAEs DiT uses), never hard-coded.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch

from config import UserError

VAE_SHORTCUTS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
VAE_DOWNSAMPLING = 8  # ModelConfig.input_size assumes image_size // 8 latents (the Stable Diffusion VAE)


#################################################################################
#                                   Locating                                    #
#################################################################################

def resolve_vae_name(name_or_path: str) -> str:
    """Expand the shortcuts ema/mse to their hub names; local folders become absolute paths."""
    if name_or_path in VAE_SHORTCUTS:
        return VAE_SHORTCUTS[name_or_path]
    if os.path.isdir(os.path.expanduser(name_or_path)):
        return os.path.abspath(os.path.expanduser(name_or_path))
    return name_or_path


def local_vae_folder(name_or_path: str) -> tuple[str, str | None] | None:
    """(folder, subfolder) when `name_or_path` is a local VAE (or a pipeline folder with a vae/ sub-folder)."""
    path = Path(os.path.expanduser(name_or_path))
    looks_like_path = name_or_path.startswith(("/", "./", "../", "~")) or path.exists()
    if not looks_like_path:
        return None
    if not path.is_dir():
        raise FileNotFoundError(f"--vae {name_or_path!r}: no such folder (expected a save_pretrained AutoencoderKL "
                                f"folder with config.json, or a hub name such as ema / mse)")
    if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        return str(path), "vae"
    return str(path), None


def local_vae_config(name_or_path: str) -> dict[str, Any] | None:
    """The config.json of a local VAE folder, read without loading weights (None for hub names)."""
    local = local_vae_folder(name_or_path)
    if local is None:
        return None
    config_path = Path(local[0]) / (local[1] or "") / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"--vae {name_or_path!r}: {str(config_path)!r} not found")
    return json.loads(config_path.read_text())


#################################################################################
#                                    Loading                                    #
#################################################################################

def load_vae(name_or_path: str, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> "AutoencoderKL":
    """diffusers AutoencoderKL from a local folder or hub name (ema/mse shortcuts), in eval mode, frozen."""
    from diffusers import AutoencoderKL
    if not name_or_path:
        raise UserError("--vae is empty: pass a local AutoencoderKL folder or a hub name (ema, mse)")
    local = local_vae_folder(name_or_path)
    source = local[0] if local else resolve_vae_name(name_or_path)
    kwargs = {"subfolder": local[1]} if local and local[1] else {}
    try:
        vae = AutoencoderKL.from_pretrained(source, torch_dtype=dtype, **kwargs)
    except Exception as error:  # hub/network/format errors all become one actionable message
        raise UserError(
            f"--vae {name_or_path!r}: could not load an AutoencoderKL from {source!r} ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}). Without network access, download it elsewhere "
            f"(e.g. `huggingface-cli download {VAE_SHORTCUTS['ema']} --local-dir sd-vae-ft-ema`) and pass "
            f"--vae <local folder>.") from error
    return vae.to(device).eval().requires_grad_(False)


def load_vae_for(model_config: Any, name_or_path: str, device: torch.device) -> Optional[Any]:
    """The AutoencoderKL of a latent model (--vae path or hub name); None for pixel models."""
    return load_vae(name_or_path, device) if model_config.latent else None


def vae_scale_and_shift(vae: Any) -> tuple[float, float]:
    """The latent scaling factor (0.18215 for SD VAEs) and shift (None -> 0) from the VAE's config."""
    shift = getattr(vae.config, "shift_factor", None)
    return float(vae.config.scaling_factor), float(shift or 0.0)


def vae_downsampling(vae_config: Any) -> int:
    """Spatial downsampling factor of an AutoencoderKL: 2 per encoder level after the first."""
    channels = vae_config["block_out_channels"] if isinstance(vae_config, dict) else vae_config.block_out_channels
    return 2 ** (len(channels) - 1)


#################################################################################
#                               Encoding, decoding                              #
#################################################################################

@torch.no_grad()
def encode_images(vae: Any, images: torch.Tensor, generator: torch.Generator | None = None,
                  sample_posterior: bool = True) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] -> scaled latents (N, C, H/f, W/f) = (z - shift) * scaling_factor.

    sample_posterior=True draws z from the encoder's Gaussian (as DiT does; `generator` seeds it, a CPU generator
    works for any device); False uses its mean.
    """
    weight = next(vae.parameters())
    posterior = vae.encode(images.to(device=weight.device, dtype=weight.dtype)).latent_dist
    z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
    scale, shift = vae_scale_and_shift(vae)
    return ((z - shift) * scale).float()


@torch.no_grad()
def decode_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents (N, C, h, w) -> images (N, 3, h*f, w*f) clamped to [-1, 1]."""
    weight = next(vae.parameters())
    scale, shift = vae_scale_and_shift(vae)
    z = latents.to(device=weight.device, dtype=weight.dtype) / scale + shift
    return vae.decode(z).sample.clamp(-1.0, 1.0).float()
