"""Gaussian diffusion: forward process, training losses, DDPM and DDIM samplers.

Written from the equations of Ho et al. 2020 (DDPM), Nichol & Dhariwal 2021 (learned variance, VLB term),
Song et al. 2021 (DDIM), Salimans & Ho 2022 (v-prediction) and Lin et al. 2023 (zero terminal SNR).

Notation, with abar_t = alpha_bar_t = prod_{s<=t} (1 - beta_s), a_t = sqrt(abar_t), s_t = sqrt(1 - abar_t):
    x_t = a_t * x_0 + s_t * eps
    v   = a_t * eps - s_t * x_0
    x_0 = a_t * x_t - s_t * v          eps = s_t * x_t + a_t * v
    x_0 = (x_t - s_t * eps) / a_t      eps = (x_t - a_t * x_0) / s_t
Under zero terminal SNR, abar_{T-1} = 0 (a = 0, s = 1): x_{T-1} = eps exactly and x_0 cannot be recovered from eps.
Hence epsilon prediction is refused there, and the x_0 and v paths never divide by a_t. s_t > 0 always since
abar_0 = 1 - beta_0 < 1.

MODEL PROTOCOL: ``model(x, t, **model_kwargs)`` returns a Tensor, or a tuple ``(Tensor, extra)``; ``extra`` (e.g. the
FPDM ``FixedPointState``) is handed back in each step dict as ``"model_extra"`` (None for a plain Tensor).
"""

import enum
import math
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .diffusion_utils import discretized_gaussian_log_likelihood, mean_flat, normal_kl

V_LOSS_WEIGHTINGS = ("v_mse", "authors")


#################################################################################
#                             Parameterisation types                            #
#################################################################################

class ModelMeanType(enum.Enum):
    """What the network's mean channels predict."""
    EPSILON = "epsilon"   # the noise eps
    START_X = "start_x"   # the clean sample x_0
    VELOCITY = "v"        # v = a_t * eps - s_t * x_0


class ModelVarType(enum.Enum):
    """How the reverse-process variance is chosen."""
    FIXED_SMALL = "fixed_small"      # the true posterior variance beta~_t (log clipped at t = 0)
    FIXED_LARGE = "fixed_large"      # beta_t (with beta~_1 at t = 0)
    LEARNED_RANGE = "learned_range"  # extra C output channels v in [-1, 1]: log var = interp(log beta~_t, log beta_t)


class LossType(enum.Enum):
    """Training objective."""
    MSE = "mse"                    # MSE on the mean target (+ VLB term for a learned variance)
    RESCALED_MSE = "rescaled_mse"  # as MSE, with the VLB term scaled by T / 1000
    KL = "kl"                      # the variational bound only
    RESCALED_KL = "rescaled_kl"    # the variational bound times T

    def is_vb(self) -> bool:
        """True for the pure variational-bound objectives."""
        return self in (LossType.KL, LossType.RESCALED_KL)


#################################################################################
#                                   Helpers                                     #
#################################################################################

class DeviceTables:
    """Torch copies of 1-D numpy tables, made once per (name, device, dtype) and reused.

    A host-to-device copy per lookup would cost a copy (and, from pageable memory, a stall) at every training step
    and sampling step; the tables never change after construction, so one copy per device suffices. A table
    replaced by a new array under the same name is copied again.
    """

    def __init__(self) -> None:
        self._copies: Dict[Tuple[str, torch.device, torch.dtype], Tuple[np.ndarray, Tensor]] = {}

    def get(self, name: str, values: np.ndarray, device: torch.device, dtype: torch.dtype) -> Tensor:
        """`values` as a tensor on `device` with `dtype`, copied on first use."""
        key = (name, torch.device(device), dtype)
        cached = self._copies.get(key)
        if cached is None or cached[0] is not values:
            cached = (values, torch.from_numpy(values).to(device=device, dtype=dtype))
            self._copies[key] = cached
        return cached[1]


def split_model_output(output: Any) -> Tuple[Tensor, Any]:
    """Apply the model protocol: a Tensor -> (Tensor, None); a tuple (Tensor, extra) -> (Tensor, extra)."""
    if isinstance(output, (tuple, list)):
        if len(output) != 2 or not torch.is_tensor(output[0]):
            raise ValueError("a model must return a Tensor or a tuple (Tensor, extra), "
                             f"got a {type(output).__name__} of length {len(output)}")
        return output[0], output[1]
    return output, None


def _randn(shape: Sequence[int], like: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """Standard normal noise with the dtype/device of ``like``, drawn from ``generator`` (global RNG if None)."""
    return torch.randn(tuple(shape), generator=generator, device=like.device, dtype=like.dtype)


#################################################################################
#                              Gaussian diffusion                               #
#################################################################################

class GaussianDiffusion:
    """A discrete-time Gaussian diffusion with T = len(betas) steps, indexed t = 0 .. T-1.

    Args:
        betas: (T,) variances of the forward process, in (0, 1] (a last beta of 1 means zero terminal SNR).
        model_mean_type / model_var_type / loss_type: see the enums above.
        v_loss_weighting: with v-prediction, "v_mse" (plain MSE on v) or "authors" (the authors' released loss;
            see ``training_losses``).
        alphas_cumprod: optional (T,) alpha_bar values to use verbatim instead of cumprod(1 - betas) (respacing
            passes the kept original values so they are kept bit-exactly); must agree with the betas.
    """

    def __init__(self, *, betas: np.ndarray, model_mean_type: ModelMeanType, model_var_type: ModelVarType,
                 loss_type: LossType, v_loss_weighting: str = "v_mse",
                 alphas_cumprod: Optional[np.ndarray] = None):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        if v_loss_weighting not in V_LOSS_WEIGHTINGS:
            raise ValueError(f"--v_loss_weighting must be one of {V_LOSS_WEIGHTINGS}, got {v_loss_weighting!r}")
        if v_loss_weighting == "authors" and model_mean_type != ModelMeanType.VELOCITY:
            raise ValueError("--v_loss_weighting authors weights the v-prediction loss; it needs --predict_v True")
        self.v_loss_weighting = v_loss_weighting

        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) == 0 or not (np.all(betas > 0) and np.all(betas <= 1)):
            raise ValueError("betas must be a non-empty 1-D array with values in (0, 1]")
        self.betas = betas
        self.num_timesteps = len(betas)
        self.timestep_map = list(range(self.num_timesteps))   # respacing replaces this

        alphas = 1.0 - betas
        if alphas_cumprod is None:
            alphas_cumprod = np.cumprod(alphas)
        else:
            alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
            if alphas_cumprod.shape != betas.shape or not np.allclose(
                    alphas_cumprod, np.cumprod(alphas), rtol=1e-9, atol=1e-12):
                raise ValueError("alphas_cumprod does not match cumprod(1 - betas)")
        if not np.all(np.diff(alphas_cumprod) < 0):
            raise ValueError("alpha_bar must be strictly decreasing")
        if alphas_cumprod[-1] == 0 and model_mean_type == ModelMeanType.EPSILON:
            raise ValueError("--use_zero_terminal_snr makes x_0 unrecoverable from eps at the last step "
                             "(alpha_bar = 0): use --predict_v True (or predict x_0) with it")
        self.alphas_cumprod = alphas_cumprod
        self.alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - alphas_cumprod)

        # Posterior q(x_{t-1} | x_t, x_0) = N(coef1 * x_0 + coef2 * x_t, beta~_t) (Ho et al. Eq. 6-7).
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod)
        # beta~_0 = 0: its log is clipped to beta~_1 (beta_0 when T = 1).
        first_variance = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first_variance, self.posterior_variance[1:]))
        self.log_betas = np.log(betas)
        # FIXED_LARGE uses beta_t, except beta~_1 at t = 0 (a better decoder variance).
        self.fixed_large_variance = np.append(first_variance, betas[1:])
        self.log_fixed_large_variance = np.log(self.fixed_large_variance)
        self.one_minus_alphas_cumprod = 1.0 - alphas_cumprod
        self.log_one_minus_alphas_cumprod = np.log(1.0 - alphas_cumprod)
        self._tables = DeviceTables()

    def _extract(self, name: str, timesteps: Tensor, like: Tensor) -> Tensor:
        """Table `name` at `timesteps`, broadcastable against ``like``: (N,) -> (N, 1, ..., 1).

        Float64 inputs get float64 coefficients; anything else gets float32 (as the original DDPM code). The table
        lives on the timesteps' device, copied there once (DeviceTables).
        """
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        table = self._tables.get(name, getattr(self, name), timesteps.device, dtype)
        out = table[timesteps.long()]                                       # (N,)
        return out.reshape(out.shape + (1,) * (like.ndim - 1)).to(like.device)

    #############################################################################
    #                         Forward process and posterior                     #
    #############################################################################

    def q_mean_variance(self, x_start: Tensor, t: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and log-variance of q(x_t | x_0)."""
        mean = self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
        variance = self._extract("one_minus_alphas_cumprod", t, x_start).expand_as(x_start)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start).expand_as(x_start)
        return mean, variance, log_variance

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Optional[Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        """Draw x_t ~ q(x_t | x_0) = a_t x_0 + s_t eps."""
        if noise is None:
            noise = _randn(x_start.shape, x_start, generator)
        return (self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
                + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start: Tensor, x_t: Tensor, t: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of the posterior q(x_{t-1} | x_t, x_0)."""
        mean = (self._extract("posterior_mean_coef1", t, x_t) * x_start
                + self._extract("posterior_mean_coef2", t, x_t) * x_t)
        variance = self._extract("posterior_variance", t, x_t).expand_as(x_t)
        log_variance = self._extract("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    #############################################################################
    #                     Conversions between eps, x_0 and v                    #
    #############################################################################

    def get_v(self, x_start: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """The velocity target v = a_t eps - s_t x_0."""
        return (self._extract("sqrt_alphas_cumprod", t, noise) * noise
                - self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * x_start)

    def predict_xstart_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """x_0 = a_t x_t - s_t v (no division: finite at abar = 0)."""
        return (self._extract("sqrt_alphas_cumprod", t, x_t) * x_t
                - self._extract("sqrt_one_minus_alphas_cumprod", t, x_t) * v)

    def predict_eps_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """eps = s_t x_t + a_t v."""
        return (self._extract("sqrt_one_minus_alphas_cumprod", t, x_t) * x_t
                + self._extract("sqrt_alphas_cumprod", t, x_t) * v)

    def predict_xstart_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_0 = (x_t - s_t eps) / a_t. Divides by a_t: only for epsilon prediction (never at abar = 0)."""
        return ((x_t - self._extract("sqrt_one_minus_alphas_cumprod", t, x_t) * eps)
                / self._extract("sqrt_alphas_cumprod", t, x_t))

    def predict_eps_from_xstart(self, x_t: Tensor, t: Tensor, pred_xstart: Tensor) -> Tensor:
        """eps = (x_t - a_t x_0) / s_t (s_t > 0 for every t)."""
        return ((x_t - self._extract("sqrt_alphas_cumprod", t, x_t) * pred_xstart)
                / self._extract("sqrt_one_minus_alphas_cumprod", t, x_t))

    def predict_xstart(self, x_t: Tensor, t: Tensor, mean_output: Tensor) -> Tensor:
        """x_0 implied by the network's mean channels under this diffusion's mean type."""
        if self.model_mean_type == ModelMeanType.START_X:
            return mean_output
        if self.model_mean_type == ModelMeanType.VELOCITY:
            return self.predict_xstart_from_v(x_t, t, mean_output)
        return self.predict_xstart_from_eps(x_t, t, mean_output)

    #############################################################################
    #                              Reverse process                              #
    #############################################################################

    def _wrap_model(self, model: Callable) -> Callable:
        """Hook for respacing, which maps step indices to original timesteps; identity here."""
        return model

    def _split_learned_variance(self, output: Tensor, x: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """Split (N, 2C, ...) into mean and variance channels for LEARNED_RANGE; (output, None) otherwise."""
        channels = x.shape[1]
        if self.model_var_type == ModelVarType.LEARNED_RANGE:
            if output.shape[1] != 2 * channels:
                raise ValueError(f"learn_sigma=True needs a model output with 2*{channels} channels, "
                                 f"got shape {tuple(output.shape)}")
            return output[:, :channels], output[:, channels:]
        if output.shape[1] != channels:
            raise ValueError(f"learn_sigma=False needs a model output with {channels} channels, "
                             f"got shape {tuple(output.shape)} (was the model trained with learn_sigma=True?)")
        return output, None

    def p_mean_variance(self, model: Callable, x: Tensor, t: Tensor, clip_denoised: bool = True,
                        denoised_fn: Optional[Callable[[Tensor], Tensor]] = None,
                        model_kwargs: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Run the model at (x_t, t) and return p(x_{t-1} | x_t): "mean", "variance", "log_variance",
        "pred_xstart", "model_output" (mean channels) and "extra" (the model protocol's extra, or None)."""
        model = self._wrap_model(model)
        output, extra = split_model_output(model(x, t, **(model_kwargs or {})))
        mean_output, variance_values = self._split_learned_variance(output, x)

        if self.model_var_type == ModelVarType.LEARNED_RANGE:
            # Nichol & Dhariwal Eq. 15: interpolate log-variance between beta~_t and beta_t.
            min_log = self._extract("posterior_log_variance_clipped", t, x)
            max_log = self._extract("log_betas", t, x)
            fraction = (variance_values + 1) / 2
            log_variance = fraction * max_log + (1 - fraction) * min_log
            variance = torch.exp(log_variance)
        else:
            if self.model_var_type == ModelVarType.FIXED_LARGE:
                table, log_table = "fixed_large_variance", "log_fixed_large_variance"
            else:
                table, log_table = "posterior_variance", "posterior_log_variance_clipped"
            variance = self._extract(table, t, x).expand_as(x)
            log_variance = self._extract(log_table, t, x).expand_as(x)

        pred_xstart = self.predict_xstart(x, t, mean_output)
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance,
                "pred_xstart": pred_xstart, "model_output": mean_output, "extra": extra}

    #############################################################################
    #                                DDPM sampling                              #
    #############################################################################

    def p_sample(self, model: Callable, x: Tensor, t: Tensor, clip_denoised: bool = True,
                 denoised_fn: Optional[Callable[[Tensor], Tensor]] = None,
                 model_kwargs: Optional[Dict[str, Any]] = None,
                 generator: Optional[torch.Generator] = None, noise: Optional[Tensor] = None) -> Dict[str, Any]:
        """One ancestral (DDPM) step x_t -> x_{t-1}; no noise is added at t = 0.

        ``noise`` (shape of x) is the step noise to use instead of drawing it (per-image seeds in sampling.py).
        """
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                   model_kwargs=model_kwargs)
        if noise is None:
            noise = _randn(x.shape, x, generator)
        nonzero = (t != 0).to(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))   # (N, 1, ..., 1)
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"], "model_extra": out["extra"]}

    def p_sample_loop(self, model: Callable, shape: Sequence[int], noise: Optional[Tensor] = None,
                      clip_denoised: bool = True, denoised_fn: Optional[Callable[[Tensor], Tensor]] = None,
                      model_kwargs: Optional[Dict[str, Any]] = None, device: Optional[torch.device] = None,
                      progress: bool = False, generator: Optional[torch.Generator] = None) -> Tensor:
        """Draw samples with DDPM over all of this diffusion's steps; returns the final x_0."""
        final = None
        for final in self.p_sample_loop_progressive(
                model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                model_kwargs=model_kwargs, device=device, progress=progress, generator=generator):
            pass
        return final["sample"]

    def p_sample_loop_progressive(self, model: Callable, shape: Sequence[int], noise: Optional[Tensor] = None,
                                  clip_denoised: bool = True,
                                  denoised_fn: Optional[Callable[[Tensor], Tensor]] = None,
                                  model_kwargs: Optional[Dict[str, Any]] = None,
                                  device: Optional[torch.device] = None, progress: bool = False,
                                  generator: Optional[torch.Generator] = None) -> Iterator[Dict[str, Any]]:
        """Yield each DDPM step's dict ("sample", "pred_xstart", "model_extra"), from t = T-1 down to 0.

        ``generator`` drives all noise, including the initial x_{T-1} when ``noise`` is None.
        """
        def step(x: Tensor, t: Tensor) -> Dict[str, Any]:
            return self.p_sample(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                 model_kwargs=model_kwargs, generator=generator)
        yield from self._sample_loop(model, shape, noise, device, progress, generator, step)

    #############################################################################
    #                                DDIM sampling                              #
    #############################################################################

    def ddim_sample(self, model: Callable, x: Tensor, t: Tensor, clip_denoised: bool = True,
                    denoised_fn: Optional[Callable[[Tensor], Tensor]] = None,
                    model_kwargs: Optional[Dict[str, Any]] = None, eta: float = 0.0,
                    generator: Optional[torch.Generator] = None, noise: Optional[Tensor] = None) -> Dict[str, Any]:
        """One DDIM step x_t -> x_{t-1} (Song et al. Eq. 12); eta = 0 is deterministic, eta = 1 is DDPM-like.

        x_{t-1} = a_{t-1} x_0 + sqrt(1 - abar_{t-1} - sigma^2) eps + sigma z,
        sigma = eta * sqrt((1 - abar_{t-1}) / (1 - abar_t)) * sqrt(1 - abar_t / abar_{t-1}).
        eps is re-derived from the (possibly clipped) x_0 as (x_t - a_t x_0) / s_t: finite at abar_t = 0.
        ``noise`` (shape of x) is the step noise z to use instead of drawing it from ``generator``.
        """
        if eta < 0:
            raise ValueError(f"--ddim_eta must be >= 0, got {eta}")
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                   model_kwargs=model_kwargs)
        pred_xstart = out["pred_xstart"]
        eps = self.predict_eps_from_xstart(x, t, pred_xstart)
        alpha_bar = self._extract("alphas_cumprod", t, x)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, x)
        sigma = (eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
                 * torch.sqrt(1 - alpha_bar / alpha_bar_prev))
        if noise is None:
            noise = _randn(x.shape, x, generator)
        mean = (torch.sqrt(alpha_bar_prev) * pred_xstart
                + torch.sqrt((1 - alpha_bar_prev - sigma ** 2).clamp(min=0)) * eps)
        nonzero = (t != 0).to(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))   # (N, 1, ..., 1)
        sample = mean + nonzero * sigma * noise
        return {"sample": sample, "pred_xstart": pred_xstart, "model_extra": out["extra"]}

    def ddim_sample_loop(self, model: Callable, shape: Sequence[int], noise: Optional[Tensor] = None,
                         clip_denoised: bool = True, denoised_fn: Optional[Callable[[Tensor], Tensor]] = None,
                         model_kwargs: Optional[Dict[str, Any]] = None, device: Optional[torch.device] = None,
                         progress: bool = False, eta: float = 0.0,
                         generator: Optional[torch.Generator] = None) -> Tensor:
        """Draw samples with DDIM over all of this diffusion's steps; returns the final x_0."""
        final = None
        for final in self.ddim_sample_loop_progressive(
                model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                model_kwargs=model_kwargs, device=device, progress=progress, eta=eta, generator=generator):
            pass
        return final["sample"]

    def ddim_sample_loop_progressive(self, model: Callable, shape: Sequence[int], noise: Optional[Tensor] = None,
                                     clip_denoised: bool = True,
                                     denoised_fn: Optional[Callable[[Tensor], Tensor]] = None,
                                     model_kwargs: Optional[Dict[str, Any]] = None,
                                     device: Optional[torch.device] = None, progress: bool = False,
                                     eta: float = 0.0,
                                     generator: Optional[torch.Generator] = None) -> Iterator[Dict[str, Any]]:
        """Yield each DDIM step's dict ("sample", "pred_xstart", "model_extra"), from t = T-1 down to 0."""
        def step(x: Tensor, t: Tensor) -> Dict[str, Any]:
            return self.ddim_sample(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                    model_kwargs=model_kwargs, eta=eta, generator=generator)
        yield from self._sample_loop(model, shape, noise, device, progress, generator, step)

    def _sample_loop(self, model: Callable, shape: Sequence[int], noise: Optional[Tensor],
                     device: Optional[torch.device], progress: bool, generator: Optional[torch.Generator],
                     step: Callable[[Tensor, Tensor], Dict[str, Any]]) -> Iterator[Dict[str, Any]]:
        """Shared loop: initial noise, then ``step`` from the last index to 0 (optionally with a tqdm bar)."""
        if device is None:
            if noise is not None:
                device = noise.device
            elif isinstance(model, torch.nn.Module):
                device = next(model.parameters()).device
            elif isinstance(getattr(model, "__self__", None), torch.nn.Module):   # e.g. model.forward_with_cfg
                device = next(model.__self__.parameters()).device
            else:
                device = torch.device("cpu")
        if noise is not None:
            x = noise.to(device)
        else:
            x = torch.randn(tuple(shape), generator=generator, device=device)
        indices = range(self.num_timesteps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm
            indices = tqdm(indices)
        for i in indices:
            t = torch.full((x.shape[0],), i, device=device, dtype=torch.long)
            with torch.no_grad():
                out = step(x, t)
            yield out
            x = out["sample"]

    #############################################################################
    #                                 Training                                  #
    #############################################################################

    def _vb_terms_bpd(self, model: Callable, x_start: Tensor, x_t: Tensor, t: Tensor,
                      clip_denoised: bool = False,
                      model_kwargs: Optional[Dict[str, Any]] = None) -> Dict[str, Tensor]:
        """One term of the variational bound in bits per dimension, (N,): KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))
        for t > 0 and the discretised decoder NLL -log p(x_0 | x_1) at t = 0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])) / math.log(2.0)
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model: Callable, x_start: Tensor, t: Tensor,
                        model_kwargs: Optional[Dict[str, Any]] = None, noise: Optional[Tensor] = None,
                        generator: Optional[torch.Generator] = None) -> Dict[str, Tensor]:
        """Per-sample losses, each (N,): "loss" (to minimise), "mse" and "vb" (zeros unless the variance is learned).

        mse: mean over elements of (target - prediction)^2, target = eps, x_0 or v by mean type. With v-prediction
        and v_loss_weighting="authors", it is instead the authors' released loss,
            mean(snr_t * s_t * (x_0 - x0_pred)^2),  snr_t = abar_t / (1 - abar_t),  x0_pred = a_t x_t - s_t v_pred,
        i.e. abar_t * s_t * (v - v_pred)^2: its weight is exactly 0 at a zero-SNR step (abar = 0), so the step
        t = T-1 gets no training signal from it.
        vb: for LEARNED_RANGE, the VLB term (bits/dim) with a stop-gradient on the mean channels, so it trains only
        the variance (improved DDPM's L_hybrid); scaled by T/1000 for RESCALED_MSE.
        loss = mse + vb; for the KL losses, loss = vb = the full bound term, mean and variance both trained (times
        T for RESCALED_KL), and mse is zeros. ``noise`` defaults to N(0, I) drawn from ``generator``.
        """
        model = self._wrap_model(model)
        model_kwargs = model_kwargs or {}
        if noise is None:
            noise = _randn(x_start.shape, x_start, generator)
        x_t = self.q_sample(x_start, t, noise=noise)

        if self.loss_type.is_vb():
            vb = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=False, model_kwargs=model_kwargs)["output"]
            if self.loss_type == LossType.RESCALED_KL:
                vb = vb * self.num_timesteps
            return {"loss": vb, "mse": torch.zeros_like(vb), "vb": vb}

        output, _ = split_model_output(model(x_t, t, **model_kwargs))
        mean_output, variance_values = self._split_learned_variance(output, x_t)

        if variance_values is not None:
            # Stop-gradient on the mean: the VLB term only trains the variance channels.
            frozen = torch.cat([mean_output.detach(), variance_values], dim=1)
            vb = self._vb_terms_bpd(lambda *args, **kwargs: frozen, x_start, x_t, t, clip_denoised=False)["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                vb = vb * (self.num_timesteps / 1000.0)
        else:
            vb = torch.zeros(x_start.shape[0], device=x_start.device, dtype=x_start.dtype)

        if self.model_mean_type == ModelMeanType.VELOCITY and self.v_loss_weighting == "authors":
            alpha_bar = self._extract("alphas_cumprod", t, x_start)
            snr = alpha_bar / (1 - alpha_bar)
            pred_xstart = self.predict_xstart_from_v(x_t, t, mean_output)
            mse = mean_flat(snr * torch.sqrt(1 - alpha_bar) * (x_start - pred_xstart) ** 2)
        else:
            if self.model_mean_type == ModelMeanType.VELOCITY:
                target = self.get_v(x_start, t, noise)
            elif self.model_mean_type == ModelMeanType.START_X:
                target = x_start
            else:
                target = noise
            mse = mean_flat((target - mean_output) ** 2)
        return {"loss": mse + vb, "mse": mse, "vb": vb}
