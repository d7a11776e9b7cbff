"""Beta schedules: linear, cosine, and the zero-terminal-SNR rescaling of Lin et al. (2023).

All schedules are float64 numpy arrays of length T (``betas[i]`` is the variance added at step i). The paper
(Sec. 4.1) trains with the linear schedule (1e-4 .. 0.02) rescaled to zero terminal SNR and v-prediction.
"""

import math
from typing import Callable

import numpy as np

NOISE_SCHEDULES = ("linear", "cosine")


#################################################################################
#                               Named schedules                                 #
#################################################################################

def linear_beta_schedule(num_diffusion_timesteps: int) -> np.ndarray:
    """Linear betas from 1e-4 to 0.02 for T=1000, with both ends scaled by 1000/T for other T (as DiT does)."""
    scale = 1000.0 / num_diffusion_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)


def betas_for_alpha_bar(num_diffusion_timesteps: int, alpha_bar: Callable[[float], float],
                        max_beta: float = 0.999) -> np.ndarray:
    """Discretise a continuous alpha_bar(s), s in [0, 1]: beta_i = 1 - alpha_bar((i+1)/T) / alpha_bar(i/T), capped."""
    steps = np.arange(num_diffusion_timesteps, dtype=np.float64)
    ratios = np.array([alpha_bar((i + 1) / num_diffusion_timesteps) / alpha_bar(i / num_diffusion_timesteps)
                       for i in steps])
    return np.minimum(1.0 - ratios, max_beta)


def cosine_alpha_bar(s: float, offset: float = 0.008) -> float:
    """Nichol & Dhariwal (2021): alpha_bar(s) = cos^2(pi/2 * (s + offset) / (1 + offset)) (unnormalised)."""
    return math.cos((s + offset) / (1.0 + offset) * math.pi / 2) ** 2


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """Betas of a named schedule ("linear" or "cosine") over ``num_diffusion_timesteps`` steps."""
    if not isinstance(num_diffusion_timesteps, (int, np.integer)) or num_diffusion_timesteps < 1:
        raise ValueError(f"--diffusion_steps must be a positive integer, got {num_diffusion_timesteps!r}")
    if schedule_name == "linear":
        betas = linear_beta_schedule(num_diffusion_timesteps)
    elif schedule_name == "cosine":
        betas = betas_for_alpha_bar(num_diffusion_timesteps, cosine_alpha_bar)
    else:
        raise ValueError(f"--noise_schedule must be one of {NOISE_SCHEDULES}, got {schedule_name!r}")
    if not (np.all(betas > 0) and np.all(betas < 1)):
        raise ValueError(f"--diffusion_steps={num_diffusion_timesteps} gives betas outside (0, 1) for the "
                         f"{schedule_name} schedule (the linear schedule needs T > 20)")
    return betas


#################################################################################
#                      Zero terminal SNR (Lin et al. 2023)                      #
#################################################################################

def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift and scale sqrt(alpha_bar) so its last value is exactly 0 and its first is unchanged; return new betas.

    With s_i = sqrt(alpha_bar_i): s'_i = (s_i - s_last) * s_0 / (s_0 - s_last). The map is affine with a positive
    slope, so alpha_bar stays strictly decreasing; the last beta becomes exactly 1 (x_{T-1} is pure noise).
    """
    betas = np.asarray(betas, dtype=np.float64)
    sqrt_alpha_bar = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_alpha_bar[0], sqrt_alpha_bar[-1]
    sqrt_alpha_bar = (sqrt_alpha_bar - last) * (first / (first - last))
    sqrt_alpha_bar[0] = first     # exact, rather than up to rounding
    sqrt_alpha_bar[-1] = 0.0      # exact (it is already 0 up to rounding)
    alpha_bar = sqrt_alpha_bar ** 2
    alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1.0 - alphas
