"""End to end: a tiny MLP denoiser trained with ``training_losses`` on a 2-D mixture of 8 Gaussians must produce
DDPM and DDIM samples (respaced to 50 steps) whose mean, covariance and mode occupancy match the data.

This exercises the whole path (schedule, loss target, respacing, samplers). Two set-ups: epsilon prediction with
the plain linear schedule and a fixed (small) variance, and the paper's set-up (Sec. 4.1): v-prediction, zero
terminal SNR and a learned variance. A negative control checks that the same criteria reject a broken sampling
path (the prediction's sign flipped).
"""

import math
from typing import Dict, List

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from diffusion import create_diffusion

NUM_MODES = 8
RADIUS = 0.7
MODE_STD = 0.08
CENTERS = torch.tensor([[RADIUS * math.cos(2 * math.pi * k / NUM_MODES),
                         RADIUS * math.sin(2 * math.pi * k / NUM_MODES)] for k in range(NUM_MODES)])   # (K, 2)
TRAIN_STEPS = 1000
BATCH_SIZE = 256
LEARNING_RATE = 3e-3
HIDDEN = 128
SEED = 0
NUM_SAMPLES = 2000

SETUPS = {
    "eps": dict(predict_v=False, use_zero_terminal_snr=False, learn_sigma=False, sigma_small=True),
    "v_zero_snr": dict(predict_v=True, use_zero_terminal_snr=True, learn_sigma=True),
}
# (DDPM respacing, DDIM respacing): "50" includes t = T-1; "trailing50" is the spacing meant for zero-SNR.
RESPACINGS = {"eps": ("50", "ddim50"), "v_zero_snr": ("50", "trailing50")}


#################################################################################
#                              Data and denoiser                                #
#################################################################################

def sample_mixture(num: int, generator: torch.Generator) -> torch.Tensor:
    """Draw (num, 2) points from the ring of 8 isotropic Gaussians."""
    modes = torch.randint(0, NUM_MODES, (num,), generator=generator)
    return CENTERS[modes] + MODE_STD * torch.randn(num, 2, generator=generator)


class TinyDenoiser(nn.Module):
    """MLP on x_t (plus Fourier features of x_t) with a sinusoidal timestep embedding injected into every layer."""

    def __init__(self, out_channels: int, hidden: int = HIDDEN, time_dim: int = 32, num_freqs: int = 4):
        super().__init__()
        self.time_dim, self.num_freqs = time_dim, num_freqs
        self.input = nn.Linear(2 + 4 * num_freqs, hidden)
        self.time_proj = nn.Linear(time_dim, 3 * hidden)
        self.hidden1 = nn.Linear(hidden, hidden)
        self.hidden2 = nn.Linear(hidden, hidden)
        self.output = nn.Linear(hidden, out_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        half = self.time_dim // 2
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half) / half)
        angles = t.float()[:, None] * freqs[None]                                   # (N, half)
        time_emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)        # (N, time_dim)
        scaled = (x[..., None] * 2.0 ** torch.arange(self.num_freqs)).flatten(1)   # (N, 2 * num_freqs)
        features = torch.cat([x, torch.sin(scaled), torch.cos(scaled)], dim=1)
        bias1, bias2, bias3 = self.time_proj(time_emb).chunk(3, dim=1)
        h = F.silu(self.input(features) + bias1)
        h = h + F.silu(self.hidden1(h) + bias2)
        h = h + F.silu(self.hidden2(h) + bias3)
        return self.output(h)


#################################################################################
#                                 Criteria                                      #
#################################################################################

def distribution_errors(samples: torch.Tensor) -> List[str]:
    """Every way ``samples`` (N, 2) fails to look like the mixture; empty when they match."""
    errors = []
    if not torch.isfinite(samples).all():
        return ["non-finite samples"]
    reference = sample_mixture(20000, torch.Generator().manual_seed(123))
    mean_error = (samples.mean(0) - reference.mean(0)).abs().max().item()
    if mean_error > 0.05:
        errors.append(f"mean off by {mean_error:.3f}")
    cov_error = (torch.cov(samples.T) - torch.cov(reference.T)).abs().max().item()
    if cov_error > 0.06:
        errors.append(f"covariance off by {cov_error:.3f}")
    distance, nearest = torch.cdist(samples, CENTERS).min(dim=1)
    occupancy = torch.bincount(nearest, minlength=NUM_MODES).float() / len(samples)
    if occupancy.min() < 0.5 / NUM_MODES or occupancy.max() > 1.5 / NUM_MODES:
        errors.append(f"mode occupancy {occupancy.min():.3f}..{occupancy.max():.3f}, expected ~{1 / NUM_MODES:.3f}")
    far = (distance > 4 * MODE_STD).float().mean().item()   # data: exp(-8) ~ 0.0003
    if far > 0.15:
        errors.append(f"{far:.3f} of samples farther than 4 std from every mode")
    median_distance = distance.median().item() / MODE_STD    # data: sqrt(2 ln 2) ~ 1.18 std
    if median_distance > 3.0:
        errors.append(f"median distance to the nearest mode {median_distance:.2f} std")
    return errors


#################################################################################
#                                  Training                                     #
#################################################################################

def train_denoiser(setup: str) -> nn.Module:
    """Train a TinyDenoiser for ``setup`` with ``training_losses`` (TRAIN_STEPS Adam steps, fixed seeds)."""
    flags = SETUPS[setup]
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    diffusion = create_diffusion("", **flags)
    model = TinyDenoiser(out_channels=4 if flags["learn_sigma"] else 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LEARNING_RATE, total_steps=TRAIN_STEPS,
                                                   pct_start=0.1)
    losses = []
    for _ in range(TRAIN_STEPS):
        x_start = sample_mixture(BATCH_SIZE, generator)
        t = torch.randint(0, diffusion.num_timesteps, (BATCH_SIZE,), generator=generator)
        loss = diffusion.training_losses(model, x_start, t, generator=generator)["loss"].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    first, last = sum(losses[:50]) / 50, sum(losses[-50:]) / 50
    assert math.isfinite(last) and last < first, (setup, first, last)
    return model.eval()


@pytest.fixture(scope="module")
def trained() -> Dict[str, nn.Module]:
    """One trained denoiser per set-up, on one CPU thread (a few seconds each)."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield {setup: train_denoiser(setup) for setup in SETUPS}
    finally:
        torch.set_num_threads(previous_threads)


def draw(model: nn.Module, setup: str, sampler: str, sign: float = 1.0) -> torch.Tensor:
    """NUM_SAMPLES samples with the 50-step DDPM or DDIM sampler of ``setup`` (sign=-1: negated model output)."""
    ddpm_spacing, ddim_spacing = RESPACINGS[setup]
    diffusion = create_diffusion(ddpm_spacing if sampler == "ddpm" else ddim_spacing, **SETUPS[setup])
    assert diffusion.num_timesteps == 50
    fn = model if sign == 1.0 else (lambda x, t: sign * model(x, t))
    generator = torch.Generator().manual_seed(1)
    loop = diffusion.p_sample_loop if sampler == "ddpm" else diffusion.ddim_sample_loop
    with torch.no_grad():
        return loop(fn, (NUM_SAMPLES, 2), clip_denoised=False, generator=generator)


#################################################################################
#                                    Tests                                      #
#################################################################################

@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samples_match_mixture(trained, setup, sampler):
    samples = draw(trained[setup], setup, sampler)
    assert distribution_errors(samples) == []


@pytest.mark.parametrize("setup", list(SETUPS))
def test_broken_sampler_is_caught(trained, setup):
    # Negative control: the same criteria must reject samples when the prediction's sign is flipped.
    for sampler in ("ddpm", "ddim"):
        assert distribution_errors(draw(trained[setup], setup, sampler, sign=-1.0)) != [], sampler
