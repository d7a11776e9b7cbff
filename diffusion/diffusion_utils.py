"""Small Gaussian helpers for the variational bound: KL divergence and the discretised decoder likelihood."""

import torch
from torch import Tensor


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension except the batch dimension: (N, ...) -> (N,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """Elementwise KL( N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)) ) in nats."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def discretized_gaussian_log_likelihood(x: Tensor, *, means: Tensor, log_scales: Tensor,
                                        num_bins: int = 256) -> Tensor:
    """Elementwise log-probability (nats) of data x in [-1, 1], quantised into ``num_bins`` bins, under a Gaussian.

    The Gaussian is N(means, exp(2 * log_scales)). Each value owns the interval x +- 1/(num_bins - 1); the two outermost bins extend to -inf and +inf (Ho et al. 2020,
    Eq. 13). Log-CDFs are computed with ``log_ndtr`` so the tails stay finite.
    """
    half_bin = 1.0 / (num_bins - 1)
    inv_scale = torch.exp(-log_scales)
    upper = (x - means + half_bin) * inv_scale
    lower = (x - means - half_bin) * inv_scale
    log_cdf_upper = torch.special.log_ndtr(upper)             # log P(z <= upper): lowest bin
    log_survival_lower = torch.special.log_ndtr(-lower)       # log P(z > lower): highest bin
    bin_mass = torch.special.ndtr(upper) - torch.special.ndtr(lower)
    log_bin_mass = torch.log(bin_mass.clamp(min=1e-12))       # interior bins
    edge = 1.0 - half_bin
    return torch.where(x < -edge, log_cdf_upper, torch.where(x > edge, log_survival_lower, log_bin_mass))
