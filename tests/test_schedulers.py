"""diffusers' samplers (schedulers.py) against the project's own diffusion and sampling loop."""
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import sample
import sample_ddp
import sampling
import schedulers
from allocation import plan_iterations
from config import SAMPLERS, ModelConfig, SampleConfig, UserError
from test_sampling import TINY_DIT, TINY_FPDM, build, fixed_plan

REPO = Path(__file__).resolve().parents[1]
DIFFUSERS_SAMPLERS = [*schedulers.SAMPLERS, "diffusers-ddim"]
# Every schedule and prediction type the project trains (epsilon prediction cannot have zero terminal SNR).
DIFFUSIONS = [dict(noise_schedule=schedule, predict_v=v, predict_xstart=x0, use_zero_terminal_snr=zsnr)
              for schedule in ("linear", "cosine")
              for v, x0 in ((False, False), (False, True), (True, False))
              for zsnr in (False, True) if v or x0 or not zsnr]


def diffusion_id(kwargs: dict) -> str:
    kind = "v" if kwargs["predict_v"] else "x0" if kwargs["predict_xstart"] else "eps"
    return f"{kwargs['noise_schedule']}-{kind}{'-zsnr' if kwargs['use_zero_terminal_snr'] else ''}"


@pytest.mark.parametrize("name", DIFFUSERS_SAMPLERS)
@pytest.mark.parametrize("diffusion", DIFFUSIONS, ids=diffusion_id)
def test_diffusers_schedule_equals_ours(name, diffusion):
    model_config = ModelConfig(**diffusion)
    ours = model_config.create_diffusion("").alphas_cumprod                        # (T,) float64
    scheduler = schedulers.build_scheduler(name, model_config, 10, "trailing", clip=True,
                                           project_timesteps=list(range(99, 1000, 100)))
    theirs = scheduler.alphas_cumprod.double().numpy()
    np.testing.assert_allclose(theirs[:-1], ours[:-1], rtol=2e-5, atol=1e-7)
    if model_config.use_zero_terminal_snr:   # sigma-space solvers clip the zero terminal alpha_bar to 2^-24
        assert ours[-1] == 0 and theirs[-1] <= 2.0 ** -24
    else:
        assert theirs[-1] == pytest.approx(ours[-1], rel=1e-5)
    assert scheduler.config.prediction_type == {"v": "v_prediction", "x0": "sample", "eps": "epsilon"}[
        diffusion_id(diffusion).split("-")[1]]


@pytest.mark.parametrize("name", DIFFUSERS_SAMPLERS)
@pytest.mark.parametrize("steps", [7, 10, 25])
def test_trailing_spacing_visits_the_projects_timesteps(name, steps):
    model_config = ModelConfig(predict_v=True, use_zero_terminal_snr=True)
    ours = sampling.make_sampling_diffusion(model_config, steps, "trailing").timestep_map
    scheduler = schedulers.build_scheduler(name, model_config, steps, "trailing", clip=True, project_timesteps=ours)
    assert [int(t) for t in scheduler.timesteps] == sorted(ours, reverse=True)


DDIM_CASES = [(TINY_DIT, dict(predict_v=True, use_zero_terminal_snr=True), 1.0, False),
              (TINY_DIT, dict(noise_schedule="cosine"), 1.0, False),
              (TINY_DIT, dict(predict_xstart=True), 1.0, False),
              (TINY_FPDM, dict(predict_v=True, use_zero_terminal_snr=True), 3.0, True)]


@pytest.mark.parametrize("base, diffusion, cfg_scale, reuse", DDIM_CASES)
def test_diffusers_ddim_equals_the_projects_ddim(base, diffusion, cfg_scale, reuse):
    """Same model, noise, plan, guidance and solution reuse: only the DDIM update differs in who computes it."""
    model_config = replace(base, **diffusion)
    model = build(model_config)
    plan = fixed_plan(steps=10, iters=2) if model_config.fixed_point else \
        plan_iterations(fixed_point=False, depth=8, num_sampling_steps=10)
    config = SampleConfig(sampler="ddim", timestep_spacing="trailing", cfg_scale=cfg_scale,
                          fixed_point_reuse_solution=reuse)
    labels = sampling.image_labels([0, 1, 2], 0, 10)
    ours = sampling.sample_batch(model, model_config, plan, config, [0, 1, 2], labels, seed=0)
    timesteps = sampling.make_sampling_diffusion(model_config, 10, "trailing").timestep_map
    stepper = schedulers.make_stepper("diffusers-ddim", model_config, 10, "trailing", clip=True,
                                      project_timesteps=timesteps)
    theirs = sampling.sample_batch(model, model_config, plan, config, [0, 1, 2], labels, seed=0, stepper=stepper)
    assert ours.samples.abs().max() > 0.1
    torch.testing.assert_close(theirs.samples, ours.samples, rtol=0, atol=1e-5)
    assert theirs.stats.timesteps == ours.stats.timesteps
    assert theirs.stats.blocks_per_step == ours.stats.blocks_per_step


@pytest.fixture(scope="module")
def fpdm():
    return build(TINY_FPDM)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("schedule, extra", [("fixed", {}), ("increasing", {"fixed_point_reuse_solution": True}),
                                             ("decreasing", {"fixed_point_solver": "anderson", "cfg_scale": 2.0})])
def test_every_sampler_spends_the_fpdm_budget_exactly(fpdm, sampler, schedule, extra):
    config, plan, _ = sampling.prepare_sampling(TINY_FPDM, SampleConfig(
        sampler=sampler, budget=40, num_sampling_steps=6, iteration_schedule=schedule, **{"cfg_scale": 1.0, **extra}))
    drawn = sampling.generate(fpdm, TINY_FPDM, config, plan, [0, 1, 2], None, seed=0, batch_size=2)
    for stats in drawn.trajectories:
        assert stats.iters_per_step == plan.iters_per_step and len(stats.timesteps) == 6
        assert stats.blocks_per_image == plan.blocks_per_image == 40
        assert stats.reused_solution[1:] == [bool(extra.get("fixed_point_reuse_solution"))] * 5
    assert np.isfinite(drawn.images.astype(float)).all()


def test_adaptive_schedule_stays_within_budget_under_dpm(fpdm):
    config, plan, _ = sampling.prepare_sampling(TINY_FPDM, SampleConfig(
        sampler="dpm++2m", budget=40, num_sampling_steps=6, iteration_schedule="adaptive", fixed_point_tol=0.05,
        cfg_scale=1.0))
    stats = sampling.generate(fpdm, TINY_FPDM, config, plan, [0, 1], None, seed=0, batch_size=2).trajectories[0]
    assert stats.blocks_per_image <= plan.blocks_per_image and len(stats.timesteps) == 6


@pytest.mark.parametrize("sampler, options", [("unipc", ""), ("dpm++2m", "algorithm_type=sde-dpmsolver++")])
def test_image_i_is_the_same_whatever_the_batch_size(fpdm, sampler, options):
    plan = fixed_plan(steps=4, iters=2)
    config = SampleConfig(sampler=sampler, sampler_options=options, cfg_scale=2.0, fixed_point_reuse_solution=True)
    labels = sampling.image_labels(range(5), 5, 10, label_mode="random")
    samples = {}
    for batch_size in (2, 5):
        parts = []
        sampling.generate(fpdm, TINY_FPDM, config, plan, list(range(5)), labels, seed=5, batch_size=batch_size,
                          on_batch=lambda batch, _: parts.append(batch.samples))
        samples[batch_size] = torch.cat(parts)
    # A batch of 2 and a batch of 5 sum the float32 matmuls in different orders (how depends on the CPU's SIMD path),
    # and UniPC's corrector amplifies that to ~1e-5; a wrong seed or label per image moves pixels by ~1.
    torch.testing.assert_close(samples[2], samples[5], rtol=0, atol=1e-4)
    other = sampling.sample_batch(fpdm, TINY_FPDM, plan, config, [0], labels[:1], seed=6).samples
    assert (other[0] - samples[2][0]).abs().max() > 0.1


def test_stochastic_dpm_draws_the_images_own_noise(fpdm):
    """The SDE variant's noise comes from the image's generator: another seed at the same x_T gives another image."""
    plan = fixed_plan(steps=4, iters=2)
    labels = sampling.image_labels([0], 0, 10)
    ode = SampleConfig(sampler="dpm++2m", cfg_scale=1.0)
    sde = replace(ode, sampler_options="algorithm_type=sde-dpmsolver++")
    a, b = (sampling.sample_batch(fpdm, TINY_FPDM, plan, c, [0], labels, seed=0).samples for c in (ode, sde))
    assert not torch.allclose(a, b, atol=1e-4)


def test_sampler_flag_mistakes_are_one_line_user_errors():
    with pytest.raises(UserError, match="--ddim"):
        SampleConfig(ddim=True, sampler="dpm++2m").validate()
    SampleConfig(ddim=True, sampler="ddim").validate()  # the two spellings agree
    assert SampleConfig(ddim=True).resolved_sampler == "ddim" and SampleConfig().resolved_sampler == "ddpm"
    with pytest.raises(UserError, match="--sampler"):
        SampleConfig(sampler="heun").validate()
    with pytest.raises(UserError, match="--ddim_eta"):
        SampleConfig(sampler="unipc", ddim_eta=0.5).validate()
    with pytest.raises(UserError, match="--sampler_options"):
        SampleConfig(sampler="ddpm", sampler_options="solver_order=3").validate()
    for bad in ("solver_order", "prediction_type=epsilon", "no_such_setting=1", "final_sigmas_type=nope"):
        with pytest.raises(UserError, match="--sampler_options"):
            sampling.prepare_sampling(TINY_FPDM, SampleConfig(sampler="dpm++2m", sampler_options=bad,
                                                              num_sampling_steps=10, cfg_scale=1.0))


def test_sample_py_records_the_sampler_and_refuses_contradictions(tmp_path):
    ckpt = str(REPO / "pretrained" / "dit-digits.safetensors")
    record = sample.main(["--ckpt", ckpt, "--sampler", "dpm++2m", "--num_sampling_steps", "5", "--num_samples", "2",
                          "--sampler_options", "final_sigmas_type=sigma_min", "--output_dir", str(tmp_path / "a"),
                          "--device", "cpu"])
    setup = json.loads((tmp_path / "a" / "setup.json").read_text())["setup"]
    assert setup["sampler_settings"] == json.loads(json.dumps(record["setup"]["sampler_settings"]))
    assert setup["sampler"] == "dpm++2m" and setup["sampler_settings"]["class"] == "DPMSolverMultistepScheduler"
    assert setup["sampler_settings"]["settings"]["final_sigmas_type"] == "sigma_min"
    assert setup["sampler_settings"]["settings"]["prediction_type"] == "v_prediction"
    assert record["stats"]["blocks_per_image_max"] == record["stats"]["planned_blocks_per_image"]
    old = sample.main(["--ckpt", ckpt, "--num_sampling_steps", "5", "--num_samples", "2", "--output_dir",
                       str(tmp_path / "b"), "--device", "cpu"])
    assert old["setup"]["sampler"] == "ddpm" and "sampler" not in old["setup"]["sample_config"]
    result = subprocess.run([sys.executable, "sample.py", "--ckpt", ckpt, "--ddim", "True", "--sampler", "unipc",
                             "--output_dir", str(tmp_path / "c")], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "--ddim" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("sampler", ["euler", "unipc"])
def test_sample_ddp_runs_every_model_under_a_diffusers_sampler(tmp_path, sampler):
    for name in ("dit-digits", "fpdm-digits"):
        npz = sample_ddp.main(["--ckpt", str(REPO / "pretrained" / f"{name}.safetensors"), "--sampler", sampler,
                               "--budget", "120", "--num_fid_samples", "3", "--sample_dir", str(tmp_path / name),
                               "--device", "cpu"])
        record = json.loads((tmp_path / name / "setup.json").read_text())
        assert np.load(npz)["arr_0"].shape == (3, 8, 8, 3)
        assert record["setup"]["sampler"] == sampler
        assert record["runs"][-1]["stats"]["blocks_per_image_max"] <= 120


def test_dpm_solver_beats_ddpm_at_ten_steps_on_the_shipped_digits_dit(trained_classifier):
    """The issue's claim at a testable size: 400 digits, DPM-Solver++(2M) vs DDPM, both at 10 steps."""
    from checkpoint import load_model_for_sampling
    from classifier import digits_reference_stats, evaluate_digits_samples
    classifier_model = trained_classifier[0]
    reference = digits_reference_stats(classifier_model, "all")
    model, model_config = load_model_for_sampling(REPO / "pretrained" / "dit-digits.safetensors")
    fid = {}
    for sampler in ("ddpm", "dpm++2m"):
        config, plan, _ = sampling.prepare_sampling(model_config, SampleConfig(
            sampler=sampler, num_sampling_steps=10, cfg_scale=1.0), model=model)
        indices = list(range(400))
        labels = sampling.image_labels(indices, 0, 10, label_mode="random")
        drawn = sampling.generate(model, model_config, config, plan, indices, labels, seed=0, batch_size=200)
        fid[sampler] = evaluate_digits_samples(classifier_model, drawn.images, labels.numpy(), reference)["digits_fid"]
    print(f"digits-FID of 400 samples at 10 steps: {fid}")
    assert fid["dpm++2m"] < 0.8 * fid["ddpm"]


class InputSpy:
    """Records the x and t each model call receives."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def forward_with_stats(self, x, t, y=None, **kwargs):
        self.calls.append((x.clone(), t.clone()))
        return self.model.forward_with_stats(x, t, y, **kwargs)


@pytest.mark.parametrize("sampler", schedulers.SAMPLERS)
@pytest.mark.parametrize("spacing", ["default", "trailing"])
def test_the_model_gets_x_t_and_its_integer_timestep(sampler, spacing):
    """Euler keeps x in sigma space (x_T ~ 4096 N(0, 1) under zero terminal SNR): the model must still get x_t."""
    model_config = replace(TINY_DIT, predict_v=True, use_zero_terminal_snr=True)
    spy = InputSpy(build(model_config))
    plan = plan_iterations(fixed_point=False, depth=8, num_sampling_steps=6)
    config = SampleConfig(sampler=sampler, timestep_spacing=spacing, cfg_scale=1.0)
    batch = sampling.sample_batch(spy, model_config, plan, config, list(range(8)), None, seed=0)
    first_x, first_t = spy.calls[0]
    assert 0.8 < float(first_x.std()) < 1.2 and int(first_t[0]) == 999
    assert [int(t[0]) for _, t in spy.calls] == batch.stats.timesteps
    assert all(t.dtype == torch.long and 0 <= int(t[0]) < 1000 for _, t in spy.calls)
    assert batch.samples.abs().max() < 10

