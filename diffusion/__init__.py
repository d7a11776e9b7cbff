"""Gaussian diffusion for DiT / FPDM: ``create_diffusion`` builds a (respaced) GaussianDiffusion.

Same call as DiT's ``create_diffusion``, plus v-prediction, zero terminal SNR and the v-loss weighting used by the
FPDM paper (Sec. 4.1: linear schedule rescaled to zero terminal SNR, v-prediction, learned variance).
"""

from typing import Sequence, Union

from .gaussian_diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType, V_LOSS_WEIGHTINGS
from .respace import SpacedDiffusion, space_timesteps
from .schedules import NOISE_SCHEDULES, get_named_beta_schedule, rescale_zero_terminal_snr

__all__ = ["create_diffusion", "GaussianDiffusion", "SpacedDiffusion", "space_timesteps", "ModelMeanType",
           "ModelVarType", "LossType", "get_named_beta_schedule", "rescale_zero_terminal_snr",
           "NOISE_SCHEDULES", "V_LOSS_WEIGHTINGS"]


def create_diffusion(
    timestep_respacing: Union[None, str, Sequence[int]],
    noise_schedule: str = "linear",
    use_kl: bool = False,
    sigma_small: bool = False,
    predict_xstart: bool = False,
    learn_sigma: bool = True,
    rescale_learned_sigmas: bool = False,
    diffusion_steps: int = 1000,
    predict_v: bool = False,
    use_zero_terminal_snr: bool = False,
    v_loss_weighting: str = "v_mse",
) -> SpacedDiffusion:
    """Build the diffusion: schedule (optionally zero-terminal-SNR), mean/variance types, loss, and respacing.

    timestep_respacing: None/"" (all steps), "250", "ddim50", "trailing50" or section counts "10,15,20"
    (see ``space_timesteps``). learn_sigma -> LEARNED_RANGE (the model outputs 2C channels), else sigma_small picks
    FIXED_SMALL over FIXED_LARGE. use_kl -> RESCALED_KL loss; rescale_learned_sigmas -> RESCALED_MSE.
    v_loss_weighting (v-prediction only): "v_mse" (plain MSE on v) or "authors" (the authors' released loss,
    mean(snr_t * sqrt(1 - abar_t) * (x_0 - x0_pred)^2); its weight is 0 at the zero-SNR step t = T-1, which therefore
    gets no training signal from the mean loss).
    """
    if predict_v and predict_xstart:
        raise ValueError("--predict_v and --predict_xstart are mutually exclusive")
    if use_zero_terminal_snr and not (predict_v or predict_xstart):
        raise ValueError("--use_zero_terminal_snr needs --predict_v True: with epsilon prediction x_0 cannot be "
                         "recovered at the last step, where alpha_bar = 0 (Lin et al. 2023)")
    if v_loss_weighting not in V_LOSS_WEIGHTINGS:
        raise ValueError(f"--v_loss_weighting must be one of {V_LOSS_WEIGHTINGS}, got {v_loss_weighting!r}")

    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)

    if use_kl:
        loss_type = LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if predict_v:
        mean_type = ModelMeanType.VELOCITY
    elif predict_xstart:
        mean_type = ModelMeanType.START_X
    else:
        mean_type = ModelMeanType.EPSILON
    if learn_sigma:
        var_type = ModelVarType.LEARNED_RANGE
    else:
        var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE

    return SpacedDiffusion(
        use_timesteps=space_timesteps(diffusion_steps, timestep_respacing),
        betas=betas,
        model_mean_type=mean_type,
        model_var_type=var_type,
        loss_type=loss_type,
        v_loss_weighting=v_loss_weighting,
    )
