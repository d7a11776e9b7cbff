"""Tests of the diffusion package: schedules, zero terminal SNR, parameterisations, posterior, respacing, losses and
samplers. Reference values are re-derived here independently (float64), never read back from the implementation.
"""

import math

import numpy as np
import pytest
import torch

from diffusion import create_diffusion, space_timesteps
from diffusion.gaussian_diffusion import ModelMeanType, ModelVarType
from diffusion.schedules import get_named_beta_schedule, rescale_zero_terminal_snr

T = 1000


def reference_alpha_bar(schedule: str = "linear", steps: int = T, zero_snr: bool = False) -> np.ndarray:
    """alpha_bar computed from the formulas, independently of diffusion/ (float64)."""
    if schedule == "linear":
        scale = 1000.0 / steps
        betas = np.linspace(scale * 1e-4, scale * 0.02, steps)
        alpha_bar = np.cumprod(1.0 - betas)
    else:
        f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = np.array([min(1 - f((i + 1) / steps) / f(i / steps), 0.999) for i in range(steps)])
        alpha_bar = np.cumprod(1.0 - betas)
    if zero_snr:
        root = np.sqrt(alpha_bar)
        root = (root - root[-1]) / (root[0] - root[-1]) * root[0]
        alpha_bar = root ** 2
    return alpha_bar


#################################################################################
#                           Schedules, zero terminal SNR                        #
#################################################################################

def test_linear_schedule_endpoints_and_scaling():
    betas = get_named_beta_schedule("linear", 1000)
    assert betas[0] == pytest.approx(1e-4, rel=1e-12) and betas[-1] == pytest.approx(0.02, rel=1e-12)
    betas = get_named_beta_schedule("linear", 250)   # DiT scales both ends by 1000 / T
    assert betas[0] == pytest.approx(4e-4, rel=1e-12) and betas[-1] == pytest.approx(0.08, rel=1e-12)
    assert np.all(np.diff(betas) > 0)


def test_cosine_schedule_follows_alpha_bar():
    betas = get_named_beta_schedule("cosine", T)
    np.testing.assert_allclose(np.cumprod(1 - betas)[:900], reference_alpha_bar("cosine")[:900], rtol=1e-10)
    assert betas.max() <= 0.999


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_zero_terminal_snr(schedule):
    original = np.cumprod(1 - get_named_beta_schedule(schedule, T))
    diffusion = create_diffusion("", noise_schedule=schedule, predict_v=True, use_zero_terminal_snr=True)
    alpha_bar = diffusion.alphas_cumprod
    assert alpha_bar[-1] == 0.0                              # exactly
    assert diffusion.betas[-1] == 1.0
    assert alpha_bar[0] == pytest.approx(original[0], rel=1e-12, abs=0)
    assert np.all(np.diff(alpha_bar) < 0)                    # strictly decreasing
    # sqrt(alpha_bar) is the affine shift-and-scale of the original (Lin et al. Alg. 1).
    root, root_original = np.sqrt(alpha_bar), np.sqrt(original)
    expected = (root_original - root_original[-1]) * root_original[0] / (root_original[0] - root_original[-1])
    np.testing.assert_allclose(root, expected, rtol=1e-9, atol=1e-12)
    assert original[-1] > 0 and not np.allclose(alpha_bar[500:], original[500:])   # it did change something


def test_rescale_keeps_first_beta_and_makes_last_one():
    betas = get_named_beta_schedule("linear", 100)
    rescaled = rescale_zero_terminal_snr(betas)
    assert rescaled[-1] == 1.0 and rescaled[0] == pytest.approx(betas[0], rel=1e-9)
    assert np.all((rescaled > 0) & (rescaled <= 1))


#################################################################################
#                          Parameterisation conversions                         #
#################################################################################

@pytest.mark.parametrize("zero_snr", [False, True])
def test_v_eps_x0_round_trip(zero_snr):
    diffusion = create_diffusion("", predict_v=True, use_zero_terminal_snr=zero_snr)
    g = torch.Generator().manual_seed(0)
    x_start = torch.randn(64, 3, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(64, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.randint(0, T, (64,), generator=g)
    t[:4] = torch.tensor([0, 1, T - 2, T - 1])               # include both ends (abar = 0 under zero SNR)
    x_t = diffusion.q_sample(x_start, t, noise=noise)
    alpha_bar = torch.from_numpy(reference_alpha_bar(zero_snr=zero_snr))[t].reshape(-1, 1, 1, 1)
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    torch.testing.assert_close(x_t, a * x_start + s * noise, rtol=1e-9, atol=1e-9)
    v = diffusion.get_v(x_start, t, noise)
    torch.testing.assert_close(v, a * noise - s * x_start, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(diffusion.predict_xstart_from_v(x_t, t, v), x_start, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(diffusion.predict_eps_from_v(x_t, t, v), noise, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(diffusion.predict_eps_from_xstart(x_t, t, x_start), noise, rtol=1e-9, atol=1e-9)
    if zero_snr:
        assert torch.equal(x_t[3], noise[3])                 # pure noise at t = T-1
    else:
        torch.testing.assert_close(diffusion.predict_xstart_from_eps(x_t, t, noise), x_start,
                                   rtol=1e-6, atol=1e-6)


#################################################################################
#                                   Posterior                                   #
#################################################################################

def bayes_posterior(alpha_bar_prev: np.ndarray, alpha_bar: np.ndarray):
    """q(x_{t-1} | x_t, x_0) by conditioning the joint Gaussian of (x_{t-1}, x_t) given x_0.

    x_{t-1} = a' x_0 + s' e1, x_t = sqrt(alpha) x_{t-1} + sqrt(1 - alpha) e2 with alpha = abar / abar'.
    Returns (coefficient of x_0, coefficient of x_t, variance).
    """
    alpha = alpha_bar / alpha_bar_prev
    var_prev = 1 - alpha_bar_prev
    gain = np.sqrt(alpha) * var_prev / (1 - alpha_bar)      # Cov(x_{t-1}, x_t) / Var(x_t)
    coef_xt = gain
    coef_x0 = np.sqrt(alpha_bar_prev) - gain * np.sqrt(alpha_bar)
    variance = var_prev - gain * np.sqrt(alpha) * var_prev
    return coef_x0, coef_xt, variance


@pytest.mark.parametrize("respacing,zero_snr", [("", False), ("", True), ("trailing10", True), ("10,20", False)])
def test_posterior_matches_bayes(respacing, zero_snr):
    diffusion = create_diffusion(respacing, predict_v=True, use_zero_terminal_snr=zero_snr)
    kept = reference_alpha_bar(zero_snr=zero_snr)[diffusion.timestep_map]
    kept_prev = np.append(1.0, kept[:-1])
    n = diffusion.num_timesteps
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, n, (32,), generator=g)
    t[:3] = torch.tensor([0, 1, n - 1])
    x_start = torch.randn(32, 2, 3, generator=g, dtype=torch.float64)
    x_t = torch.randn(32, 2, 3, generator=g, dtype=torch.float64)
    mean, variance, log_variance = diffusion.q_posterior_mean_variance(x_start, x_t, t)
    coef_x0, coef_xt, var = (torch.from_numpy(c)[t].reshape(-1, 1, 1) for c in bayes_posterior(kept_prev, kept))
    torch.testing.assert_close(mean, coef_x0 * x_start + coef_xt * x_t, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(variance, var.expand_as(x_t), rtol=1e-8, atol=1e-12)
    assert torch.all(variance[t == 0] == 0)
    # log variance is clipped at t = 0 (beta~_0 = 0) to the value of t = 1; elsewhere it is log beta~_t.
    positive = t > 0
    torch.testing.assert_close(log_variance[positive], var.expand_as(x_t)[positive].log(), rtol=1e-8, atol=1e-10)
    clipped = math.log(bayes_posterior(kept_prev, kept)[2][1])
    torch.testing.assert_close(log_variance[~positive], torch.full_like(log_variance[~positive], clipped))
    assert torch.isfinite(mean).all() and torch.isfinite(log_variance).all()


#################################################################################
#                                   Respacing                                   #
#################################################################################

@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("respacing", ["", "250", "ddim50", "trailing10", "10,20"])
def test_respacing_keeps_alpha_bar_exactly(respacing, zero_snr):
    full = create_diffusion("", predict_v=True, use_zero_terminal_snr=zero_snr)
    spaced = create_diffusion(respacing, predict_v=True, use_zero_terminal_snr=zero_snr)
    kept = np.array(spaced.timestep_map)
    assert np.all(np.diff(kept) > 0) and kept[0] >= 0 and kept[-1] <= T - 1
    assert np.array_equal(spaced.alphas_cumprod, full.alphas_cumprod[kept])        # bit-exact
    np.testing.assert_allclose(spaced.alphas_cumprod, reference_alpha_bar(zero_snr=zero_snr)[kept],
                               rtol=1e-9, atol=1e-15)
    # The rebuilt betas reproduce the kept alpha_bar: beta_i = 1 - abar_i / abar_{i-1}.
    np.testing.assert_allclose(np.cumprod(1 - spaced.betas), spaced.alphas_cumprod, rtol=1e-10, atol=1e-15)


def test_respacing_timesteps():
    assert space_timesteps(T, "") == set(range(T)) and space_timesteps(T, None) == set(range(T))
    steps = sorted(space_timesteps(T, "250"))
    assert len(steps) == 250 and steps[0] == 0 and steps[-1] == T - 1
    assert sorted(space_timesteps(T, "ddim50")) == list(range(0, T, 20))   # 50 steps, never T-1
    assert sorted(space_timesteps(T, "trailing10")) == list(range(99, T, 100))
    for count in (1, 7, 50, 333, 1000):
        steps = space_timesteps(T, f"trailing{count}")
        assert len(steps) == count and T - 1 in steps
    steps = sorted(space_timesteps(T, "10,20"))
    assert len(steps) == 30 and sum(s < 500 for s in steps) == 10
    assert steps[0] == 0 and steps[9] == 499 and steps[10] == 500 and steps[-1] == T - 1
    assert space_timesteps(T, [10, 20]) == space_timesteps(T, "10,20")
    diffusion = create_diffusion("ddim50")
    assert diffusion.num_timesteps == 50 and diffusion.timestep_map == list(range(0, T, 20))


def test_wrapped_model_maps_timesteps_and_passes_extra():
    diffusion = create_diffusion("trailing10", predict_v=True, use_zero_terminal_snr=True, learn_sigma=False)
    seen = []

    def model_with_extra(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x), {"t": int(t[0])}

    g = torch.Generator().manual_seed(0)
    steps = list(diffusion.ddim_sample_loop_progressive(model_with_extra, (2, 3), generator=g))
    assert [int(t[0]) for t in seen] == list(range(T - 1, 0, -100))            # original timesteps, descending
    assert [s["model_extra"]["t"] for s in steps] == list(range(T - 1, 0, -100))
    assert all(s["sample"].shape == (2, 3) and s["pred_xstart"].shape == (2, 3) for s in steps)
    plain = diffusion.p_sample(lambda x, t: torch.zeros_like(x), torch.zeros(2, 3), torch.tensor([3, 3]))
    assert plain["model_extra"] is None
    losses = diffusion.training_losses(model_with_extra, torch.zeros(2, 3), torch.tensor([0, 9]))
    assert [int(t) for t in seen[-1]] == [99, 999] and losses["loss"].shape == (2,)


#################################################################################
#                                    Losses                                     #
#################################################################################

class LinearModel(torch.nn.Module):
    """A per-channel affine map of x_t with a timestep-dependent bias, enough to have gradients."""

    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.weight = torch.nn.Parameter(torch.randn(out_channels, channels, generator=g, dtype=torch.float64))
        self.bias = torch.nn.Parameter(torch.randn(out_channels, generator=g, dtype=torch.float64))

    def forward(self, x, t):
        out = torch.einsum("oc,nchw->nohw", self.weight, x) + self.bias[None, :, None, None]
        return torch.tanh(out + (t.double() / T)[:, None, None, None])


def _batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1,
            torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64))


def test_learned_range_vb_nonnegative_and_finite_at_ends_under_zero_snr():
    diffusion = create_diffusion("", predict_v=True, use_zero_terminal_snr=True, learn_sigma=True)
    model = LinearModel(3, 6)
    x_start, noise = _batch()
    t = torch.tensor([0, 0, T - 1, T - 1, 1, 500, 998, 250])
    losses = diffusion.training_losses(model, x_start, t, noise=noise)
    for key in ("loss", "mse", "vb"):
        assert losses[key].shape == (8,) and torch.isfinite(losses[key]).all(), key
    assert torch.all(losses["vb"] >= 0) and torch.all(losses["vb"][:4] > 0)
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])
    losses["loss"].sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # p_mean_variance and both samplers are finite at both ends too.
    for step in (diffusion.p_sample, diffusion.ddim_sample):
        for t_end in (0, T - 1):
            out = step(model, noise, torch.full((8,), t_end), generator=torch.Generator().manual_seed(0))
            assert torch.isfinite(out["sample"]).all() and torch.isfinite(out["pred_xstart"]).all()


def test_vb_stop_gradient_trains_only_the_variance_channels():
    diffusion = create_diffusion("", predict_v=True, use_zero_terminal_snr=True, learn_sigma=True)
    x_start, noise = _batch()
    output = torch.randn(8, 6, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1),
                         requires_grad=True)
    t = torch.tensor([0, 3, 100, 400, 600, 900, 998, 999])
    losses = diffusion.training_losses(lambda x, t: output, x_start, t, noise=noise)
    (grad,) = torch.autograd.grad(losses["vb"].sum(), output)
    assert torch.all(grad[:, :3] == 0) and grad[:, 3:].abs().sum() > 0


def test_kl_is_zero_for_the_true_posterior():
    diffusion = create_diffusion("", learn_sigma=False, sigma_small=True, use_kl=True)
    x_start, noise = _batch()
    t = torch.tensor([1, 2, 10, 100, 400, 700, 900, 999])
    losses = diffusion.training_losses(lambda x, t: noise, x_start, t, noise=noise)   # the oracle eps
    torch.testing.assert_close(losses["loss"], torch.zeros(8, dtype=torch.float64), atol=1e-9, rtol=0)
    wrong = diffusion.training_losses(lambda x, t: -noise, x_start, t, noise=noise)
    assert torch.all(wrong["loss"] > 0) and torch.equal(wrong["vb"], wrong["loss"])
    assert torch.equal(wrong["mse"], torch.zeros(8, dtype=torch.float64))


@pytest.mark.parametrize("mean_type", ["epsilon", "start_x", "v"])
def test_mse_targets(mean_type):
    flags = {"epsilon": {}, "start_x": {"predict_xstart": True}, "v": {"predict_v": True}}[mean_type]
    diffusion = create_diffusion("", learn_sigma=False, **flags)
    x_start, noise = _batch()
    prediction = torch.randn(x_start.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    t = torch.tensor([0, 1, 10, 100, 300, 500, 800, 999])
    losses = diffusion.training_losses(lambda x, t: prediction, x_start, t, noise=noise)
    alpha_bar = torch.from_numpy(reference_alpha_bar())[t].reshape(-1, 1, 1, 1)
    target = {"epsilon": noise, "start_x": x_start,
              "v": alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x_start}[mean_type]
    torch.testing.assert_close(losses["mse"], ((target - prediction) ** 2).mean(dim=(1, 2, 3)))
    assert torch.equal(losses["vb"], torch.zeros(8, dtype=torch.float64))
    torch.testing.assert_close(losses["loss"], losses["mse"])


def test_authors_v_loss_weighting():
    diffusion = create_diffusion("", predict_v=True, use_zero_terminal_snr=True, learn_sigma=True,
                                 v_loss_weighting="authors")
    x_start, noise = _batch()
    output = torch.randn(8, 6, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0, 1, 10, 100, 500, 900, 998, T - 1])
    losses = diffusion.training_losses(lambda x, t: output, x_start, t, noise=noise)
    alpha_bar = torch.from_numpy(reference_alpha_bar(zero_snr=True))[t].reshape(-1, 1, 1, 1)
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    x_t = a * x_start + s * noise
    x0_pred = a * x_t - s * output[:, :3]
    expected = (alpha_bar / (1 - alpha_bar) * s * (x_start - x0_pred) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(losses["mse"], expected)
    assert losses["mse"][-1] == 0 and torch.all(losses["mse"][:-1] > 0)     # no signal at the zero-SNR step
    assert torch.isfinite(losses["loss"]).all() and losses["vb"][-1] > 0


#################################################################################
#                     Samplers against an exact Gaussian oracle                  #
#################################################################################
# Data x_0 ~ N(MU, SIGMA2) (one channel). The optimal denoiser is linear, E[x_0 | x_t] = MU + k (x_t - a MU) with
# k = a SIGMA2 / (a^2 SIGMA2 + s^2), so both samplers are affine-Gaussian recursions we can follow exactly here.
MU, SIGMA2, VAR_CHANNEL = 0.5, 0.09, 0.3


def gaussian_oracle(alpha_bar_original: np.ndarray, mean_type: str, learned_variance: bool):
    """Model (x, t original) -> the exact prediction of eps / x_0 / v (plus a constant variance channel)."""
    table = torch.from_numpy(alpha_bar_original)

    def model(x, t):
        alpha_bar = table[t].reshape(-1, 1)
        a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        x0 = MU + a * SIGMA2 / (a * a * SIGMA2 + s * s) * (x - a * MU)
        out = {"epsilon": (x - a * x0) / s, "start_x": x0, "v": (a * x - x0) / s}[mean_type]
        return torch.cat([out, torch.full_like(out, VAR_CHANNEL)], dim=1) if learned_variance else out
    return model


def expected_moments(kept: np.ndarray, sampler: str, var_type: str, eta: float = 0.0):
    """Mean and variance of the final sample, following the sampler's recursion from x_{T} ~ N(0, 1)."""
    mean, var = 0.0, 1.0
    kept_prev = np.append(1.0, kept[:-1])
    for i in range(len(kept) - 1, -1, -1):
        a, s = math.sqrt(kept[i]), math.sqrt(1 - kept[i])
        a_prev, s_prev = math.sqrt(kept_prev[i]), math.sqrt(1 - kept_prev[i])
        k = a * SIGMA2 / (a * a * SIGMA2 + s * s)           # x0_hat = MU + k (x_t - a MU)
        if sampler == "ddim":
            sigma = eta * math.sqrt((1 - kept_prev[i]) / (1 - kept[i]) * (1 - kept[i] / kept_prev[i]))
            # x_{t-1} = a' x0_hat + sqrt(s'^2 - sigma^2) eps_hat + sigma z, eps_hat = (x_t - a x0_hat) / s
            c_x0 = a_prev - math.sqrt(max(s_prev ** 2 - sigma ** 2, 0.0)) * a / s
            c_xt = math.sqrt(max(s_prev ** 2 - sigma ** 2, 0.0)) / s
            noise_var = sigma ** 2 if i > 0 else 0.0
        else:
            c_x0, c_xt, posterior_var = (float(c) for c in bayes_posterior(kept_prev[i], kept[i]))
            beta = 1 - kept[i] / kept_prev[i]
            if var_type == "fixed_small":
                noise_var = posterior_var
            elif var_type == "fixed_large":
                noise_var = beta
            else:                                          # learned range, constant channel value VAR_CHANNEL
                frac = (VAR_CHANNEL + 1) / 2
                noise_var = math.exp(frac * math.log(beta) + (1 - frac) * math.log(posterior_var)) if i > 0 else 0.0
            noise_var = noise_var if i > 0 else 0.0          # no noise is added at the last step
        slope = c_x0 * k + c_xt
        mean = slope * mean + c_x0 * MU * (1 - k * a)
        var = slope ** 2 * var + noise_var
    return mean, var


SAMPLER_CASES = [
    # (respacing, steps, zero_snr, mean_type, var_type, sampler, eta)
    ("", 100, False, "epsilon", "fixed_small", "ddpm", 0.0),
    ("", 100, False, "epsilon", "fixed_large", "ddpm", 0.0),
    ("25", 1000, False, "start_x", "fixed_small", "ddpm", 0.0),
    ("trailing20", 1000, True, "v", "learned_range", "ddpm", 0.0),
    ("50", 1000, True, "v", "fixed_large", "ddpm", 0.0),
    ("ddim25", 1000, False, "epsilon", "fixed_large", "ddim", 0.0),
    ("trailing25", 1000, True, "v", "learned_range", "ddim", 0.0),
    ("trailing25", 1000, True, "v", "fixed_small", "ddim", 1.0),
    ("10,15", 1000, False, "start_x", "fixed_small", "ddim", 0.5),
]


@pytest.mark.parametrize("respacing,steps,zero_snr,mean_type,var_type,sampler,eta", SAMPLER_CASES)
def test_samplers_match_exact_gaussian_recursion(respacing, steps, zero_snr, mean_type, var_type, sampler, eta):
    diffusion = create_diffusion(respacing, diffusion_steps=steps, use_zero_terminal_snr=zero_snr,
                                 predict_v=mean_type == "v", predict_xstart=mean_type == "start_x",
                                 learn_sigma=var_type == "learned_range", sigma_small=var_type == "fixed_small")
    alpha_bar = reference_alpha_bar(steps=steps, zero_snr=zero_snr)
    kept = alpha_bar[diffusion.timestep_map]
    model = gaussian_oracle(alpha_bar, mean_type, var_type == "learned_range")
    mean, var = expected_moments(kept, sampler, var_type, eta)
    num = 50000
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(num, 1, generator=g, dtype=torch.float64)
    if sampler == "ddim":
        samples = diffusion.ddim_sample_loop(model, (num, 1), noise=noise, clip_denoised=False, eta=eta, generator=g)
    else:
        samples = diffusion.p_sample_loop(model, (num, 1), noise=noise, clip_denoised=False, generator=g)
    if sampler == "ddim" and eta == 0.0:
        # Deterministic and affine in the noise: compare the map itself, exactly.
        slope = torch.linalg.lstsq(torch.cat([noise, torch.ones_like(noise)], 1), samples).solution
        assert slope[0, 0].item() == pytest.approx(math.sqrt(var), rel=1e-8)
        assert slope[1, 0].item() == pytest.approx(mean, rel=1e-8, abs=1e-10)
    else:
        assert samples.mean().item() == pytest.approx(mean, abs=5 * math.sqrt(var / num))
        assert samples.var().item() == pytest.approx(var, rel=5 * math.sqrt(2 / num))
    # The recursion itself lands near the data (variance is biased by the few steps, as expected).
    assert abs(mean - MU) < 0.01 and 0.5 * SIGMA2 < var < 1.2 * SIGMA2


def test_generator_makes_sampling_reproducible_and_progress_bar_runs():
    diffusion = create_diffusion("10", predict_v=True, use_zero_terminal_snr=True, learn_sigma=True)
    model = gaussian_oracle(reference_alpha_bar(zero_snr=True), "v", True)
    run = lambda seed, **kw: diffusion.p_sample_loop(model, (5, 1), generator=torch.Generator().manual_seed(seed),
                                                     **kw)
    first = run(0)
    assert torch.equal(first, run(0, progress=True)) and not torch.equal(first, run(1))
    ddim = lambda seed: diffusion.ddim_sample_loop(model, (5, 1), eta=1.0,
                                                   generator=torch.Generator().manual_seed(seed))
    assert torch.equal(ddim(0), ddim(0)) and not torch.equal(ddim(0), ddim(1))


def test_explicit_step_noise_equals_generator_noise():
    diffusion = create_diffusion("10", predict_v=True, use_zero_terminal_snr=True, learn_sigma=True)
    model = gaussian_oracle(reference_alpha_bar(zero_snr=True), "v", True)
    x = torch.randn(6, 1, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    t = torch.full((6,), 5)
    z = torch.randn(6, 1, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    for step, kwargs in ((diffusion.p_sample, {}), (diffusion.ddim_sample, {"eta": 0.7})):
        drawn = step(model, x, t, generator=torch.Generator().manual_seed(9), **kwargs)["sample"]
        given = step(model, x, t, noise=z, **kwargs)["sample"]
        assert torch.equal(drawn, given)
        assert not torch.equal(given, step(model, x, t, noise=-z, **kwargs)["sample"])


def test_clip_and_denoised_fn_apply_to_pred_xstart():
    diffusion = create_diffusion("5", learn_sigma=False, predict_xstart=True)
    x = torch.zeros(4, 2)
    t = torch.full((4,), 2)
    out = diffusion.p_sample(lambda x, t: torch.full_like(x, 3.0), x, t, clip_denoised=True)
    assert torch.all(out["pred_xstart"] == 1.0)
    out = diffusion.ddim_sample(lambda x, t: torch.full_like(x, 3.0), x, t, clip_denoised=False,
                                denoised_fn=lambda x0: x0 * 0 - 0.25)
    assert torch.all(out["pred_xstart"] == -0.25)


#################################################################################
#                                   Bad input                                   #
#################################################################################

def test_flags_map_to_parameterisation():
    d = create_diffusion("")
    assert (d.model_mean_type, d.model_var_type) == (ModelMeanType.EPSILON, ModelVarType.LEARNED_RANGE)
    d = create_diffusion("", predict_v=True, learn_sigma=False)
    assert (d.model_mean_type, d.model_var_type) == (ModelMeanType.VELOCITY, ModelVarType.FIXED_LARGE)
    d = create_diffusion("", predict_xstart=True, learn_sigma=False, sigma_small=True)
    assert (d.model_mean_type, d.model_var_type) == (ModelMeanType.START_X, ModelVarType.FIXED_SMALL)
    assert create_diffusion("", diffusion_steps=21).num_timesteps == 21


def test_zero_snr_with_epsilon_prediction_is_refused():
    with pytest.raises(ValueError, match=r"--use_zero_terminal_snr.*--predict_v"):
        create_diffusion("", use_zero_terminal_snr=True)
    with pytest.raises(ValueError, match=r"--use_zero_terminal_snr"):
        create_diffusion("ddim50", use_zero_terminal_snr=True, predict_v=False)


@pytest.mark.parametrize("kwargs,flag", [
    (dict(noise_schedule="quadratic"), "--noise_schedule"),
    (dict(v_loss_weighting="snr"), "--v_loss_weighting"),
    (dict(v_loss_weighting="authors"), "--v_loss_weighting"),      # needs v-prediction
    (dict(predict_v=True, predict_xstart=True), "--predict_v"),
    (dict(diffusion_steps=0), "--diffusion_steps"),
    (dict(diffusion_steps=20), "--diffusion_steps"),               # linear betas would reach 1
])
def test_bad_options_raise(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        create_diffusion("", **kwargs)


@pytest.mark.parametrize("respacing", ["fifty", "ddim", "ddimx", "trailing0", "trailing2000", "0", "2000",
                                       "10,,20", "ddim1", "-5", "10, 20x"])
def test_bad_respacing_raises(respacing):
    with pytest.raises(ValueError, match="timestep_respacing"):
        create_diffusion(respacing)


def test_wrong_number_of_output_channels_raises():
    learned = create_diffusion("5", predict_v=True)
    with pytest.raises(ValueError, match="learn_sigma"):
        learned.p_sample(lambda x, t: x, torch.zeros(2, 3), torch.tensor([1, 1]))
    fixed = create_diffusion("5", predict_v=True, learn_sigma=False)
    with pytest.raises(ValueError, match="learn_sigma"):
        fixed.training_losses(lambda x, t: torch.cat([x, x], 1), torch.zeros(2, 3), torch.tensor([1, 1]))


#################################################################################
#                     Schedule tables: copied to a device once                  #
#################################################################################

def old_extract(values: np.ndarray, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The per-call lookup the diffusion used before caching (a fresh tensor from the numpy table every call)."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    out = torch.from_numpy(values).to(device=timesteps.device, dtype=dtype)[timesteps.long()]
    return out.reshape(out.shape + (1,) * (like.ndim - 1)).to(like.device)


def test_schedule_tables_are_copied_once_and_give_the_old_values(monkeypatch):
    diffusion = create_diffusion("ddim50", predict_v=True, use_zero_terminal_snr=True)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 7, 20, 49])
    derived = {"one_minus_alphas_cumprod": 1.0 - diffusion.alphas_cumprod,  # computed per call before
               "log_one_minus_alphas_cumprod": np.log(1.0 - diffusion.alphas_cumprod),
               "log_fixed_large_variance": np.log(diffusion.fixed_large_variance)}
    names = ["alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
             "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
             "log_betas", "fixed_large_variance", *derived]
    for like in (x, x.double()):
        for name in names:
            values = derived.get(name, getattr(diffusion, name))
            assert torch.equal(diffusion._extract(name, t, like), old_extract(values, t, like)), name

    def model(x_t, timesteps, **kwargs):
        return torch.cat([x_t * 0.5, torch.zeros_like(x_t)], dim=1)  # mean and variance channels

    def one_of_each() -> list[torch.Tensor]:
        losses = diffusion.training_losses(model, x, t, generator=torch.Generator().manual_seed(1))
        ddim = diffusion.ddim_sample(model, x, t, generator=torch.Generator().manual_seed(2))
        ddpm = diffusion.p_sample(model, x, t, generator=torch.Generator().manual_seed(3))
        return [losses["loss"], ddim["sample"], ddpm["sample"], *diffusion.q_mean_variance(x, t)]

    first = one_of_each()
    copies = []
    real_from_numpy = torch.from_numpy
    monkeypatch.setattr(torch, "from_numpy", lambda array: copies.append(array) or real_from_numpy(array))
    again = one_of_each()
    assert copies == []  # every table (and the respaced timestep map) already lives on the device
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    diffusion.alphas_cumprod = diffusion.alphas_cumprod.copy()  # a replaced table is copied anew
    diffusion._extract("alphas_cumprod", t, x)
    assert len(copies) == 1
