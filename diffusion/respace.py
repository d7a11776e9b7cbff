"""Timestep respacing: run a diffusion trained with T steps on a subset of its timesteps (DiT semantics).

The kept timesteps keep their original alpha_bar values; the betas of the shorter chain are rebuilt from them,
beta_i = 1 - abar_{k_i} / abar_{k_{i-1}}. The network is always called with the ORIGINAL timesteps.
"""

import re
from typing import Any, Callable, Iterable, List, Sequence, Set, Union

import numpy as np
import torch
from torch import Tensor

from .gaussian_diffusion import GaussianDiffusion, ModelMeanType

_RESPACING_HELP = ("expected '' (all steps), 'N' (N evenly spread steps), 'ddimN' (integer stride, starts at 0), "
                   "'trailingN' (Lin et al. trailing spacing, ends at T-1) or section counts like '10,15,20'")


#################################################################################
#                         Which timesteps to keep                               #
#################################################################################

def _section_timesteps(num_timesteps: int, section_counts: Sequence[int]) -> List[int]:
    """Split [0, T) into len(section_counts) near-equal sections; take evenly spaced steps (ends included) in each."""
    num_sections = len(section_counts)
    base_size, remainder = divmod(num_timesteps, num_sections)
    kept: List[int] = []
    section_start = 0
    for i, count in enumerate(section_counts):
        size = base_size + (1 if i < remainder else 0)
        if count < 1 or count > size:
            raise ValueError(f"timestep_respacing: section {i} has {size} timesteps, cannot take {count} of them "
                             f"(--num_sampling_steps must be between 1 and --diffusion_steps)")
        stride = (size - 1) / (count - 1) if count > 1 else 1.0
        kept += [section_start + round(j * stride) for j in range(count)]
        section_start += size
    return kept


def _ddim_timesteps(num_timesteps: int, count: int) -> List[int]:
    """range(0, T, stride) for the integer stride that gives exactly ``count`` steps (never visits T-1 unless
    stride divides T-1; under zero terminal SNR prefer trailing spacing)."""
    for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == count:
            return list(range(0, num_timesteps, stride))
    raise ValueError(f"timestep_respacing='ddim{count}': no integer stride gives exactly {count} of "
                     f"{num_timesteps} steps")


def _trailing_timesteps(num_timesteps: int, count: int) -> List[int]:
    """Lin et al. (2023) Table 2 'trailing': round(T - i*T/N) - 1 for i < N, which always includes T-1."""
    if not 1 <= count <= num_timesteps:
        raise ValueError(f"timestep_respacing='trailing{count}': need 1 <= N <= {num_timesteps} "
                         f"(--num_sampling_steps)")
    kept = (np.round(num_timesteps - np.arange(count) * (num_timesteps / count)) - 1).astype(int)
    return sorted(int(k) for k in kept)


def space_timesteps(num_timesteps: int, section_counts: Union[None, str, Sequence[int]]) -> Set[int]:
    """The set of original timesteps to keep.

    section_counts: None or "" (all), "N" (one section: N steps spread evenly, first and last included),
    "ddimN" (stride so exactly N steps starting at 0: "ddim50" on T=1000 is 0, 20, ..., 980 and never visits
    T-1), "trailingN" (always ends at T-1, recommended with zero terminal SNR), or comma-separated counts /
    a list of ints (the T steps are split into that many near-equal sections; count i is taken from section i).
    """
    if section_counts is None or section_counts == "":
        return set(range(num_timesteps))
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        match = re.fullmatch(r"(ddim|trailing)(\d+)", spec)
        if match:
            kind, count = match.group(1), int(match.group(2))
            steps = _ddim_timesteps(num_timesteps, count) if kind == "ddim" else \
                _trailing_timesteps(num_timesteps, count)
            return set(steps)
        if not re.fullmatch(r"\d+(,\d+)*", spec):
            raise ValueError(f"timestep_respacing={section_counts!r} is not understood: {_RESPACING_HELP}")
        counts = [int(c) for c in spec.split(",")]
    else:
        counts = [int(c) for c in section_counts]
        if not counts:
            raise ValueError(f"timestep_respacing={section_counts!r}: {_RESPACING_HELP}")
    return set(_section_timesteps(num_timesteps, counts))


#################################################################################
#                              Respaced diffusion                               #
#################################################################################

class _WrappedModel:
    """Calls ``model`` with original timesteps: index i of the respaced chain -> timestep_map[i].

    ``map_on(device)`` gives the map as a long tensor on a device (the diffusion's cached copy, so a call copies
    nothing to the device). Whatever the model returns (a Tensor or a tuple (Tensor, extra)) is passed through
    unchanged.
    """

    def __init__(self, model: Callable, map_on: Callable[[torch.device], Tensor]):
        self.model = model
        self.map_on = map_on

    def __call__(self, x: Tensor, ts: Tensor, **kwargs: Any) -> Any:
        original_ts = self.map_on(ts.device)[ts.long()]   # (N,)
        return self.model(x, original_ts, **kwargs)


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion restricted to ``use_timesteps`` of the base process built from ``kwargs["betas"]``.

    ``timestep_map[i]`` is the original timestep of step i (ascending); ``alphas_cumprod`` equals the base
    process's alpha_bar at those timesteps exactly.
    """

    def __init__(self, use_timesteps: Iterable[int], **kwargs: Any):
        base_betas = np.asarray(kwargs["betas"], dtype=np.float64)
        self.original_num_steps = len(base_betas)
        kept = sorted(set(int(t) for t in use_timesteps))
        if not kept or kept[0] < 0 or kept[-1] >= self.original_num_steps:
            raise ValueError(f"timestep_respacing keeps timesteps outside [0, {self.original_num_steps}): {kept[:5]}")
        base_alpha_bar = np.cumprod(1.0 - base_betas)
        if base_alpha_bar[-1] == 0 and kwargs.get("model_mean_type") == ModelMeanType.EPSILON:
            raise ValueError("--use_zero_terminal_snr cannot be combined with epsilon prediction: "
                             "use --predict_v True")
        kept_alpha_bar = base_alpha_bar[kept]
        previous = np.append(1.0, kept_alpha_bar[:-1])
        kwargs["betas"] = 1.0 - kept_alpha_bar / previous
        kwargs["alphas_cumprod"] = kept_alpha_bar
        super().__init__(**kwargs)
        self.timestep_map = kept
        self.timestep_map_array = np.asarray(kept, dtype=np.int64)

    def timestep_map_on(self, device: torch.device) -> Tensor:
        """timestep_map as a long tensor (num_timesteps,) on `device`, copied there once."""
        return self._tables.get("timestep_map_array", self.timestep_map_array, device, torch.long)

    def _wrap_model(self, model: Callable) -> Callable:
        """Map step indices to original timesteps before calling the model (idempotent)."""
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(model, self.timestep_map_on)
