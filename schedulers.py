"""Modern multistep samplers from diffusers (DPM-Solver++, UniPC, Euler) on the checkpoint's own diffusion.

This is the only module that touches diffusers schedulers. The project's ADM diffusion (diffusion/) keeps training,
DDPM and DDIM; here a diffusers scheduler is built from the same ModelConfig: the same betas (the named schedule,
rescaled to zero terminal SNR by diffusers' own ``rescale_betas_zero_snr`` when the model was trained that way), the
same prediction type and the spacing of ``--timestep_spacing``. ``SchedulerStepper`` then plays the part of one
diffusion step in sampling.sample_batch: one model evaluation per step (the model function sampling.py gives it, so
the FPDM iteration plan, solution reuse, Anderson, guidance and per-image noise stay exactly as under DDPM/DDIM),
followed by the scheduler's update. Multistep solvers keep their past outputs inside the scheduler object, which
sample_batch builds afresh for every batch.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from config import ModelConfig, UserError

SAMPLER_FLAG = "--sampler_options"

# What --timestep_spacing means to a diffusers scheduler. default: even spacing from T-1 (diffusers' "linspace",
# DiT's spacing for the project's samplers); trailing: Lin et al. (2023) Table 2, identical to the project's.
SPACINGS = {"default": "linspace", "trailing": "trailing"}

# Our prediction type -> diffusers' name for it.
PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


@dataclass(frozen=True)
class SchedulerSpec:
    """How one --sampler name maps onto a diffusers scheduler class."""
    class_name: str                       # diffusers class
    settings: dict[str, Any]              # the project's defaults (the measured best, README "Samplers")
    clip: Callable[[bool], dict[str, Any]]  # settings that clip x0 to [-1, 1] for pixel models (or not)
    step_kwargs: dict[str, Any] = field(default_factory=dict)
    noise_kwarg: Optional[str] = None     # step() argument taking the per-image noise (stochastic variants)
    own_timesteps: bool = False           # pass the project's (integer) timesteps instead of diffusers' spacing


def _threshold(clip: bool) -> dict[str, Any]:
    """Dynamic thresholding with its maximum at 1 is the plain clamp to [-1, 1] of DDPM/DDIM (Saharia et al.)."""
    return {"thresholding": clip, "sample_max_value": 1.0}


SCHEDULERS: dict[str, SchedulerSpec] = {
    # DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): second order, data prediction; 1st-order final steps below 15 steps.
    "dpm++2m": SchedulerSpec("DPMSolverMultistepScheduler",
                             {"solver_order": 2, "algorithm_type": "dpmsolver++", "lower_order_final": True,
                              "final_sigmas_type": "zero"},
                             _threshold, noise_kwarg="variance_noise"),
    # UniPC (Zhao et al. 2023): B(h) = e^h - 1 predictor-corrector; the corrector reuses the next step's
    # evaluation, so it costs no extra model call.
    "unipc": SchedulerSpec("UniPCMultistepScheduler",
                           {"solver_order": 2, "solver_type": "bh2", "lower_order_final": True,
                            "final_sigmas_type": "zero"},
                           _threshold),
    # Euler (Karras et al. 2022, Alg. 1 with s_churn = 0): first order in sigma space. diffusers' Euler cannot clip
    # x0; with diffusers' "linspace" its timesteps are fractional, so it visits the project's integer timesteps.
    "euler": SchedulerSpec("EulerDiscreteScheduler", {"final_sigmas_type": "zero"}, lambda clip: {},
                           own_timesteps=True),
    # diffusers' DDIM: not a --sampler choice (the project has its own); it checks this module against sampling.py.
    "diffusers-ddim": SchedulerSpec("DDIMScheduler", {"set_alpha_to_one": True},
                                    lambda clip: {"clip_sample": clip, "clip_sample_range": 1.0},
                                    step_kwargs={"eta": 0.0, "use_clipped_model_output": True},
                                    noise_kwarg="variance_noise"),
}
SAMPLERS = ("dpm++2m", "unipc", "euler")   # the --sampler names served here
# Set from the checkpoint and --timestep_spacing; --sampler_options may not override them.
RESERVED = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
            "rescale_betas_zero_snr", "timestep_spacing")


def prediction_type(model_config: ModelConfig) -> str:
    """diffusers' prediction_type of the checkpoint (eps, x0 or v)."""
    ours = "v" if model_config.predict_v else "x0" if model_config.predict_xstart else "eps"
    return PREDICTION_TYPES[ours]


def _scheduler_class(name: str) -> type:
    """The diffusers class of sampler `name`."""
    import diffusers
    return getattr(diffusers, SCHEDULERS[name].class_name)


def _parse_value(text: str) -> Any:
    """A --sampler_options value: True/False, an int, a float, or the text itself."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_options(text: str, name: str) -> dict[str, Any]:
    """--sampler_options 'key=value,...': settings of the diffusers scheduler of sampler `name` ('' -> {})."""
    if not text.strip():
        return {}
    if name not in SCHEDULERS:
        raise UserError(f"{SAMPLER_FLAG} applies to --sampler {', '.join(SAMPLERS)} only (got --sampler {name})")
    allowed = set(inspect.signature(_scheduler_class(name).__init__).parameters) - {"self", *RESERVED}
    options = {}
    for item in text.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key:
            raise UserError(f"{SAMPLER_FLAG}: expected key=value pairs separated by commas (got {item.strip()!r})")
        if key not in allowed:
            raise UserError(f"{SAMPLER_FLAG}: {key!r} is not a setting of {SCHEDULERS[name].class_name} that may "
                            f"be set (settable: {', '.join(sorted(allowed))})")
        options[key] = _parse_value(value)
    return options


def scheduler_settings(name: str, model_config: ModelConfig, timestep_spacing: str, clip: bool,
                       options: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The keyword arguments of the diffusers scheduler (recorded in setup.json, betas summarised by name)."""
    from diffusion import get_named_beta_schedule
    spec = SCHEDULERS[name]
    betas = get_named_beta_schedule(model_config.noise_schedule, model_config.diffusion_steps)
    return {"num_train_timesteps": model_config.diffusion_steps, "trained_betas": betas.tolist(),
            "prediction_type": prediction_type(model_config),
            "rescale_betas_zero_snr": model_config.use_zero_terminal_snr,
            "timestep_spacing": SPACINGS[timestep_spacing], **spec.settings, **spec.clip(clip), **(options or {})}


def describe(name: str, model_config: ModelConfig, timestep_spacing: str, clip: bool,
             options: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """What setup.json records about a diffusers sampler: its class and settings (betas named, not listed)."""
    settings = scheduler_settings(name, model_config, timestep_spacing, clip, options)
    settings["trained_betas"] = f"{model_config.noise_schedule} schedule, T = {model_config.diffusion_steps}"
    return {"class": SCHEDULERS[name].class_name, "settings": settings, "model_calls_per_step": 1,
            "step_kwargs": SCHEDULERS[name].step_kwargs}


def build_scheduler(name: str, model_config: ModelConfig, num_steps: int, timestep_spacing: str, clip: bool,
                    options: Optional[dict[str, Any]] = None, project_timesteps: Optional[list[int]] = None) -> Any:
    """A diffusers scheduler for sampler `name` set to `num_steps` steps.

    project_timesteps: the project's respaced timesteps (ascending), used by schedulers whose own spacing gives
    fractional timesteps (SchedulerSpec.own_timesteps).
    """
    scheduler = _scheduler_class(name)(**scheduler_settings(name, model_config, timestep_spacing, clip, options))
    try:
        if SCHEDULERS[name].own_timesteps:
            scheduler.set_timesteps(timesteps=sorted(project_timesteps, reverse=True))
        else:
            scheduler.set_timesteps(num_steps)
    except ValueError as error:
        raise UserError(f"{SAMPLER_FLAG}: {SCHEDULERS[name].class_name} refuses these settings ({error})") from None
    timesteps = scheduler.timesteps
    if len(timesteps) != num_steps or not bool((timesteps == timesteps.round()).all()):
        raise UserError(f"{SAMPLER_FLAG}: {SCHEDULERS[name].class_name} visits {len(timesteps)} timesteps "
                        f"({timesteps[:4].tolist()}...), not {num_steps} integer ones: one model call per step at the "
                        "model's discrete timesteps is what the budget plans")
    return scheduler


class SchedulerStepper:
    """One step of a diffusers scheduler, called like sampling.DiffusionStepper: one model evaluation, one update.

    The model gets the scheduler's x_t (scale_model_input: Euler keeps x in sigma space) and the original integer
    timestep; the scheduler gets the mean channels (learned-sigma channels are not used by these solvers).
    """

    def __init__(self, name: str, scheduler: Any):
        self.spec = SCHEDULERS[name]
        self.scheduler = scheduler
        self.timesteps = [int(t) for t in scheduler.timesteps]       # original timesteps, sampling order
        self.init_noise_sigma = float(scheduler.init_noise_sigma)

    def __call__(self, model_fn: Callable[..., Any], x: Tensor, step: int, *, model_kwargs: dict[str, Any],
                 noise: Tensor) -> tuple[Tensor, Any]:
        """x at step `step` (0 = first) -> (x at the next step, the model's extra: FPDM statistics)."""
        timestep = self.scheduler.timesteps[step]
        if getattr(self.scheduler, "step_index", None) not in (None, step):   # multistep history must follow the loop
            raise ValueError(f"scheduler is at step {self.scheduler.step_index}, the loop at {step}")
        model_input = self.scheduler.scale_model_input(x, timestep)
        t = torch.full((x.shape[0],), self.timesteps[step], device=x.device, dtype=torch.long)
        output, extra = model_fn(model_input, t, **model_kwargs)
        mean = output[:, :x.shape[1]]                                 # (N, C, H, W): mean channels
        step_kwargs = dict(self.spec.step_kwargs)
        if self.spec.noise_kwarg:
            step_kwargs[self.spec.noise_kwarg] = noise                # per-image noise (stochastic variants only)
        sample = self.scheduler.step(mean, timestep, x, return_dict=False, **step_kwargs)[0]
        return sample, extra


def make_stepper(name: str, model_config: ModelConfig, num_steps: int, timestep_spacing: str, clip: bool,
                 options: Optional[dict[str, Any]] = None,
                 project_timesteps: Optional[list[int]] = None) -> SchedulerStepper:
    """A fresh stepper (a new scheduler: its multistep history starts empty) for one batch's trajectory."""
    return SchedulerStepper(name, build_scheduler(name, model_config, num_steps, timestep_spacing, clip, options,
                                                  project_timesteps))


def sampler_record(model_config: ModelConfig, config: Any) -> dict[str, Any]:
    """setup.json's "sampler" (the resolved name) and, for a diffusers sampler, "sampler_settings"."""
    name = config.resolved_sampler
    if name not in SAMPLERS:
        return {"sampler": name}
    options = parse_options(config.sampler_options, name)
    return {"sampler": name, "sampler_settings": describe(name, model_config, config.timestep_spacing,
                                                          not model_config.latent, options)}
