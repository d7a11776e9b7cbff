"""The sampling pipeline (sampling.py, sample.py) on tiny FPDM / DiT models on the CPU (sample_ddp.py: its own file)."""
import json
import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch

import cost
import sample
import sample_ddp
import sampling
from allocation import plan_for_model, plan_iterations, planned_macs
from checkpoint import save_checkpoint, save_safetensors
from config import ModelConfig, SampleConfig, UserError
from models import create_model

REPO = Path(__file__).resolve().parents[1]

TINY_FPDM = ModelConfig(model="DiT-Ti/4", image_size=8, in_channels=1, num_classes=10, fixed_point=True,
                        fixed_point_no_grad_max_iters=2, fixed_point_with_grad_max_iters=2)
TINY_DIT = replace(TINY_FPDM, fixed_point=False)


#################################################################################
#                                   Helpers                                     #
#################################################################################

def build(model_config: ModelConfig, seed: int = 0, contraction: float = 0.2) -> torch.nn.Module:
    """A tiny model with random (not zero-initialised) weights and a contractive fixed-point map."""
    torch.manual_seed(seed)
    model = create_model(model_config)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.05)
        if model_config.fixed_point:  # shrink the z-part of the injection MLP: f becomes a contraction in z
            hidden = model.block_fixed_point_projection_fc1.weight.shape[1] // 2
            model.block_fixed_point_projection_fc1.weight[:, :hidden] *= contraction
    return model.eval()


def write_pt(model, model_config: ModelConfig, path: Path) -> Path:
    state = model.state_dict()
    save_checkpoint({"model": state, "ema": state, "opt": {}, "step": 0,
                     "config": {"model": asdict(model_config), "train": {}}, "rng": {}}, path)
    return path


class Spy:
    """Calls the wrapped model and records every call's keyword arguments and returned fixed-point state."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def _record(self, result, x, **kwargs):
        init = kwargs.get("init")
        state = result[1] if isinstance(result, tuple) else None
        self.calls.append({"x": x.clone(), "init": None if init is None else init.clone(),
                           "iters": kwargs.get("num_iters"), "tol": kwargs.get("tol"),
                           "solver": kwargs.get("solver"),
                           "solution": None if state is None or state.solution is None else state.solution.clone()})
        return result

    def forward_with_stats(self, x, t, y=None, **kwargs):
        return self._record(self.model.forward_with_stats(x, t, y, **kwargs), x, **kwargs)


def run_batch(model, model_config, plan, indices, seed=0, **config_kwargs):
    config = SampleConfig(**{"cfg_scale": 1.0, **config_kwargs})
    labels = sampling.image_labels(indices, seed, model_config.num_classes)
    return sampling.sample_batch(model, model_config, plan, config, indices, labels, seed=seed)


def fixed_plan(steps=4, iters=2, schedule="fixed", **kwargs):
    return plan_iterations(fixed_point=True, pre_depth=1, post_depth=1, num_sampling_steps=steps,
                           fixed_point_iters=iters, schedule=schedule, **kwargs)


@pytest.fixture(scope="module")
def fpdm():
    return build(TINY_FPDM)


@pytest.fixture(scope="module")
def fpdm_ckpt(tmp_path_factory, fpdm):
    return write_pt(fpdm, TINY_FPDM, tmp_path_factory.mktemp("ckpt") / "fpdm.pt")


#################################################################################
#                         Accounting and allocation                             #
#################################################################################

@pytest.mark.parametrize("schedule", ["fixed", "increasing", "decreasing"])
def test_fpdm_spends_exactly_the_plan(fpdm, schedule):
    plan = plan_iterations(fixed_point=True, pre_depth=1, post_depth=1, num_sampling_steps=4, budget=22,
                           schedule=schedule)
    stats = run_batch(fpdm, TINY_FPDM, plan, [0, 1]).stats
    assert stats.iters_per_step == plan.iters_per_step
    assert stats.blocks_per_image == plan.blocks_per_image == 22
    assert len(stats.timesteps) == 4 and stats.timesteps == sorted(stats.timesteps, reverse=True)


def test_anderson_counts_every_function_evaluation_as_a_block(fpdm):
    plan = fixed_plan(steps=3, iters=4)
    stats = run_batch(fpdm, TINY_FPDM, plan, [0, 1], fixed_point_solver="anderson").stats
    assert stats.iters_per_step == [4, 4, 4] and stats.blocks_per_image == plan.blocks_per_image == 18
    assert all(len(r) == 4 for r in stats.residuals_per_step)


def test_cfg_doubles_the_batch_not_the_blocks(fpdm):
    plan = fixed_plan(steps=3, iters=2)
    spy = Spy(fpdm)
    stats = run_batch(spy, TINY_FPDM, plan, [0, 1, 2], cfg_scale=4.0).stats
    assert stats.blocks_per_image == 3 * (1 + 2 + 1)
    assert all(call["x"].shape[0] == 6 for call in spy.calls)


def test_dit_blocks_accounting():
    dit = build(TINY_DIT)
    plan = plan_iterations(fixed_point=False, depth=8, budget=30)
    stats = run_batch(dit, TINY_DIT, plan, [0, 1]).stats
    assert plan.num_steps == 3 and stats.blocks_per_image == 24 == plan.blocks_per_image
    assert stats.blocks_per_step == [8, 8, 8]


def test_adaptive_stops_early_and_stays_within_budget(fpdm):
    loose = fixed_plan(steps=4, iters=6, schedule="adaptive", fixed_point_tol=10.0, budget=20)
    stats = run_batch(fpdm, TINY_FPDM, loose, [0, 1]).stats
    assert stats.iters_per_step == [1, 1, 1, 1] and stats.blocks_per_image == 12  # every step converged at once
    tight = fixed_plan(steps=4, iters=6, schedule="adaptive", fixed_point_tol=1e-9, budget=20)
    stats = run_batch(fpdm, TINY_FPDM, tight, [0, 1]).stats
    assert stats.blocks_per_image <= 20 and min(stats.iters_per_step) >= 1
    assert stats.iteration_caps[0] == 6 and stats.iters_per_step[-1] == 1  # later steps were squeezed to 1


#################################################################################
#                                  Reuse                                        #
#################################################################################

def test_reuse_changes_the_initialisation_and_nothing_else(fpdm):
    plan = fixed_plan(steps=5, iters=2)
    spies = {}
    for reuse in (False, True):
        spies[reuse] = Spy(fpdm)
        run_batch(spies[reuse], TINY_FPDM, plan, [0, 1, 2], fixed_point_reuse_solution=reuse)
    off, on = spies[False].calls, spies[True].calls
    assert len(off) == len(on) == 5
    torch.testing.assert_close(off[0]["x"], on[0]["x"], rtol=0, atol=0)
    torch.testing.assert_close(off[0]["solution"], on[0]["solution"], rtol=0, atol=0)  # first step identical
    for k in range(5):
        assert (off[k]["iters"], off[k]["tol"], off[k]["solver"]) == (on[k]["iters"], on[k]["tol"], on[k]["solver"])
        assert off[k]["init"] is None
    assert on[0]["init"] is None
    for k in range(1, 5):  # later steps start from the previous step's solution, per sample
        torch.testing.assert_close(on[k]["init"], on[k - 1]["solution"], rtol=0, atol=0)
    torch.testing.assert_close(off[1]["x"], on[1]["x"], rtol=0, atol=0)  # step 0's output did not change
    assert not torch.equal(off[1]["solution"], on[1]["solution"])        # step 1 started elsewhere


def test_reuse_and_no_reuse_converge_to_the_same_samples(fpdm):
    plan = fixed_plan(steps=3, iters=40)
    outputs = [run_batch(fpdm, TINY_FPDM, plan, [0, 1], fixed_point_reuse_solution=reuse, ddim=True).samples
               for reuse in (False, True)]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=1e-4)
    few = fixed_plan(steps=3, iters=1)
    short = [run_batch(fpdm, TINY_FPDM, few, [0, 1], fixed_point_reuse_solution=reuse, ddim=True).samples
             for reuse in (False, True)]
    assert (short[0] - short[1]).abs().max() > 1e-4  # with 1 iteration the starting point matters


def test_cfg_reuse_keeps_conditional_and_unconditional_halves(fpdm):
    plan = fixed_plan(steps=3, iters=2)
    spy = Spy(fpdm)
    run_batch(spy, TINY_FPDM, plan, [0, 1], cfg_scale=3.0, fixed_point_reuse_solution=True)
    second = spy.calls[1]
    assert second["init"].shape[0] == 4  # 2N rows: each half reuses its own solution
    torch.testing.assert_close(second["init"], spy.calls[0]["solution"], rtol=0, atol=0)
    assert not torch.allclose(second["init"][:2], second["init"][2:])  # conditional != unconditional


def test_sampling_leaves_no_state_on_the_model(fpdm):
    def snapshot(model):
        attributes = {}
        for name, module in model.named_modules():
            for key, value in vars(module).items():
                if isinstance(value, dict):
                    attributes[(name, key)] = (id(value), sorted(value))
                elif isinstance(value, (int, float, str, bool, tuple, type(None))):
                    attributes[(name, key)] = value
                else:
                    attributes[(name, key)] = id(value)
        return attributes, {k: v.clone() for k, v in model.state_dict().items()}

    before, weights = snapshot(fpdm)
    run_batch(fpdm, TINY_FPDM, fixed_plan(steps=3, iters=2), [0, 1, 2], cfg_scale=2.0,
              fixed_point_reuse_solution=True)
    after, weights_after = snapshot(fpdm)
    assert before == after
    assert all(torch.equal(weights[k], weights_after[k]) for k in weights)


#################################################################################
#                            Per-image determinism                              #
#################################################################################

@pytest.mark.parametrize("ddim", [False, True])
def test_image_i_is_the_same_whatever_the_batch_size(fpdm, ddim):
    plan = fixed_plan(steps=3, iters=2)
    config = SampleConfig(cfg_scale=2.0, fixed_point_reuse_solution=True, ddim=ddim, ddim_eta=0.5)
    labels = sampling.image_labels(range(7), 5, 10, label_mode="random")
    results = {}
    for batch_size in (3, 5):
        samples = []
        drawn = sampling.generate(fpdm, TINY_FPDM, config, plan, list(range(7)), labels, seed=5,
                                  batch_size=batch_size, on_batch=lambda batch, _: samples.append(batch.samples))
        results[batch_size] = (torch.cat(samples), drawn.images)
    # float32 matmuls sum in a batch-size- and CPU-dependent order; a wrong seed or label moves pixels by ~1.
    torch.testing.assert_close(results[3][0], results[5][0], rtol=0, atol=1e-4)
    assert np.abs(results[3][1].astype(int) - results[5][1].astype(int)).max() <= 1
    assert not torch.allclose(results[3][0][0], results[3][0][1])  # images differ from each other
    other_seed = []
    sampling.generate(fpdm, TINY_FPDM, config, plan, [0], labels[:1], seed=6, batch_size=1,
                      on_batch=lambda batch, pixels: other_seed.append((batch, pixels)))
    assert not torch.allclose(other_seed[0][0].samples[0], results[3][0][0])


def test_labels_come_from_per_image_seeds():
    random_labels = sampling.image_labels(range(20), 3, 10, label_mode="random")
    assert torch.equal(random_labels[5:9], sampling.image_labels(range(5, 9), 3, 10, label_mode="random"))
    assert sampling.image_labels(range(4), 0, 10).tolist() == [0, 1, 2, 3]
    assert sampling.image_labels(range(4), 0, 10, class_labels=[7, 2]).tolist() == [7, 2, 7, 2]
    assert sampling.image_labels(range(4), 0, 0) is None


#################################################################################
#                               Errors                                          #
#################################################################################

def test_flag_checks_name_the_flag():
    with pytest.raises(ValueError, match="--class_labels"):
        sampling.parse_class_labels("3,10", 10)
    with pytest.raises(ValueError, match="--class_labels"):
        sampling.parse_class_labels("three", 10)
    uncond = replace(TINY_FPDM, num_classes=0)
    with pytest.raises(ValueError, match="--cfg_scale"):
        sampling.validate_sample_config(uncond, SampleConfig(cfg_scale=4.0))
    config, notes = sampling.validate_sample_config(uncond, SampleConfig())
    assert config.cfg_scale == 1.0 and notes  # the default guidance quietly becomes 'none'
    with pytest.raises(ValueError, match="--fixed_point_reuse_solution"):
        sampling.validate_sample_config(TINY_DIT, SampleConfig(fixed_point_reuse_solution=True))
    with pytest.raises(ValueError, match="--fixed_point_pre_depth"):
        sampling.check_model_flags({"fixed_point": True, "fixed_point_pre_depth": 2}, TINY_FPDM)
    sampling.check_model_flags({"fixed_point": True, "fixed_point_pre_depth": 1, "fixed_point_post_depth": 1},
                               TINY_FPDM)


def test_missing_bundled_checkpoint_says_to_pass_ckpt(monkeypatch, tmp_path):
    monkeypatch.setattr(sampling, "BUNDLED_CHECKPOINT", tmp_path / "nothing.safetensors")
    with pytest.raises(FileNotFoundError, match="--ckpt"):
        sampling.resolve_checkpoint("")


@pytest.mark.parametrize("extra, error, match", [
    (["--budget", "2"], ValueError, "--budget"),
    (["--class_labels", "10"], ValueError, "--class_labels"),
    (["--fixed_point_pre_depth", "2"], ValueError, "fixed_point_pre_depth"),
    (["--iteration_schedule", "cosine"], ValueError, "--iteration_schedule"),
])
def test_sample_py_errors_write_nothing(fpdm_ckpt, tmp_path, extra, error, match):
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        sample.main(["--ckpt", str(fpdm_ckpt), "--output_dir", str(out), "--num_sampling_steps", "2", *extra])
    assert not out.exists()


def test_bad_checkpoints_are_clear_errors(tmp_path, fpdm_ckpt):
    out = tmp_path / "out"
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(fpdm_ckpt.read_bytes()[:2000])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    for path, error in [(tmp_path / "missing.pt", FileNotFoundError), (truncated, ValueError), (garbage, ValueError)]:
        with pytest.raises(error, match="--ckpt"):
            sample.main(["--ckpt", str(path), "--output_dir", str(out)])
    assert not out.exists()


def test_dit_rejects_fixed_point_iters_and_unconditional_rejects_cfg(tmp_path):
    dit_ckpt = write_pt(build(TINY_DIT), TINY_DIT, tmp_path / "dit.pt")
    with pytest.raises(ValueError, match="--fixed_point_iters"):
        sample.main(["--ckpt", str(dit_ckpt), "--output_dir", str(tmp_path / "a"), "--fixed_point_iters", "4"])
    uncond = replace(TINY_FPDM, num_classes=0)
    uncond_ckpt = tmp_path / "uncond.safetensors"
    save_safetensors(build(uncond).state_dict(), uncond, uncond_ckpt)
    with pytest.raises(ValueError, match="--cfg_scale"):
        sample.main(["--ckpt", str(uncond_ckpt), "--output_dir", str(tmp_path / "b"), "--cfg_scale", "4.0"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


#################################################################################
#                               sample.py                                       #
#################################################################################

@pytest.mark.parametrize("script", [sample, sample_ddp])
def test_help_lists_the_flags(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--help"])
    assert exit_info.value.code == 0
    assert "--fixed_point_reuse_solution" in capsys.readouterr().out


def test_original_readme_commands_run(fpdm_ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the README commands write to the default --output_dir
    first = sample.main(["--ckpt", str(fpdm_ckpt), "--fixed_point", "True", "--fixed_point_pre_depth", "1",
                         "--fixed_point_post_depth", "1", "--cfg_scale", "4.0", "--num_sampling_steps", "20"])
    assert first["stats"]["blocks_per_image_max"] == 20 * (1 + 6 + 1)  # default: DiT-Ti/4 depth 8 - pre - post = 6
    (tmp_path / "second").mkdir()
    monkeypatch.chdir(tmp_path / "second")  # another setup never shares a folder with the first
    second = sample.main(["--ckpt", str(fpdm_ckpt), "--fixed_point", "True", "--fixed_point_pre_depth", "1",
                          "--fixed_point_post_depth", "1", "--cfg_scale", "4.0", "--fixed_point_iters", "12",
                          "--num_sampling_steps", "40", "--fixed_point_reuse_solution", "True"])
    assert second["stats"]["blocks_per_image_max"] == 40 * 14
    written = sorted(p.name for p in (tmp_path / "second" / "samples").iterdir())
    assert written[:16] == [f"{i:06d}.png" for i in range(16)] and "grid.png" in written
    setup = json.loads((tmp_path / "second" / "samples" / "setup.json").read_text())
    assert setup["setup"]["plan"]["blocks_per_image"] == 560 and setup["stats"]["within_budget"]


def test_sample_py_budget_diagnostics_and_safetensors(fpdm, tmp_path, capsys):
    weights = tmp_path / "fpdm.safetensors"
    save_safetensors(fpdm.state_dict(), TINY_FPDM, weights)
    out = tmp_path / "out"
    record = sample.main(["--ckpt", str(weights), "--output_dir", str(out), "--budget", "23", "--fixed_point_iters",
                          "2", "--num_samples", "5", "--batch_size", "2", "--iteration_schedule", "increasing",
                          "--diagnostics", str(tmp_path / "diag.json"), "--ddim", "True"])
    assert record["setup"]["plan"]["num_steps"] == 5 and record["stats"]["blocks_per_image_max"] == 23
    assert "Total transformer-block forward passes per image: 23" in capsys.readouterr().out
    diagnostics = json.loads((tmp_path / "diag.json").read_text())
    assert len(diagnostics["steps"]) == 5 and len(diagnostics["steps"][0]["delta_t"]) == 3  # 3 batches
    assert (tmp_path / "diag.png").is_file()  # the delta_t plot
    from PIL import Image
    assert Image.open(out / "000004.png").size == (8, 8)


def test_latent_models_decode_with_the_vae_and_train_grid(fpdm, tmp_path):
    class FakeVAE(torch.nn.Module):  # the AutoencoderKL surface decode_latents uses: config, decode().sample
        def __init__(self):
            super().__init__()
            self.config = type("Config", (), {"scaling_factor": 0.5, "shift_factor": None})()
            self.mix = torch.nn.Conv2d(4, 3, 1)

        def decode(self, z):
            return type("Out", (), {"sample": torch.tanh(self.mix(torch.repeat_interleave(
                torch.repeat_interleave(z, 8, dim=2), 8, dim=3)))})()

    latent = replace(TINY_FPDM, latent=True, in_channels=4, image_size=32)  # 4x4 latents -> 32x32 pixels
    model = build(latent)
    config = SampleConfig(cfg_scale=1.0)
    plan = fixed_plan(steps=2, iters=1)
    drawn = []
    sampling.generate(model, latent, config, plan, [0, 1], torch.tensor([3, 4]), seed=0, batch_size=2,
                      vae=FakeVAE(), on_batch=lambda batch, pixels: drawn.append((batch, pixels)))
    (batch, pixels), = drawn
    assert batch.samples.shape == (2, 4, 4, 4) and pixels.shape == (2, 32, 32, 3) and pixels.dtype == np.uint8
    grid = sampling.sample_grid_png(fpdm, TINY_FPDM, tmp_path / "grid.png", num_images=4, num_sampling_steps=3)
    from PIL import Image
    assert Image.open(grid).size == (2 * 64 + 3 * 2, 2 * 64 + 3 * 2)  # 8x8 images shown 8x larger


#################################################################################
#                       The generation loop and randomness                      #
#################################################################################

def test_image_random_streams_are_per_image():
    labels = sampling.ImageRandom(3, range(20), 10).labels()
    assert torch.equal(labels, sampling.image_labels(range(20), 3, 10, label_mode="random"))
    assert sampling.ImageRandom(3, range(4), 0).labels() is None
    first, second = sampling.ImageRandom(3, [5, 6], 10), sampling.ImageRandom(3, [4, 5], 10)
    for _ in range(2):  # x_T, then a step's noise: image 5 draws the same whichever batch it is in
        torch.testing.assert_close(first.normal((1, 2, 2))[0], second.normal((1, 2, 2))[1], rtol=0, atol=0)
    stream = torch.Generator().manual_seed(3 + 7)  # label first, then the noise
    label = torch.randint(10, (1,), generator=stream)
    noise = torch.randn((1, 2, 2), generator=stream)
    random = sampling.ImageRandom(3, [7], 10)
    assert torch.equal(random.labels(), label) and torch.equal(random.normal((1, 2, 2))[0], noise)


def test_generate_collects_batches_and_calls_on_batch(fpdm):
    plan = fixed_plan(steps=2, iters=1)
    seen = []
    drawn = sampling.generate(fpdm, TINY_FPDM, SampleConfig(cfg_scale=1.0), plan, [4, 2, 9, 0, 1], None, seed=1,
                              batch_size=2, on_batch=lambda batch, pixels: seen.append((batch.indices, pixels)))
    assert [indices for indices, _ in seen] == [[4, 2], [9, 0], [1]] and drawn.counts == [2, 2, 1]
    assert drawn.images.shape == (5, 8, 8, 1) and drawn.images.dtype == np.uint8
    assert np.array_equal(drawn.images, np.concatenate([pixels for _, pixels in seen]))
    assert torch.equal(drawn.labels, sampling.image_labels([4, 2, 9, 0, 1], 1, 10, label_mode="random"))
    assert len(drawn.trajectories) == 3 and drawn.seconds > 0
    kept = sampling.generate(fpdm, TINY_FPDM, SampleConfig(cfg_scale=1.0), plan, [0], None, seed=1, batch_size=2,
                             keep_images=False)
    assert kept.images is None and kept.counts == [1]


#################################################################################
#                      Folders, non-finite numbers, one-line errors             #
#################################################################################

def test_sample_py_never_mixes_setups_in_one_folder(fpdm_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    common = ["--ckpt", str(fpdm_ckpt), "--output_dir", str(out), "--num_samples", "3", "--cfg_scale", "1"]
    sample.main([*common, "--num_sampling_steps", "2"])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    sample.main([*common, "--num_sampling_steps", "2", "--batch_size", "2"])  # same images: overwritten in place
    assert sorted(p.name for p in out.iterdir()) == sorted(before)
    assert all((out / name).read_bytes() == data for name, data in before.items() if name.endswith(".png"))
    with pytest.raises(UserError, match=rf"--output_dir {out}.*num_sampling_steps: 2 != 3.*another --output_dir"):
        sample.main([*common, "--num_sampling_steps", "3"])
    with pytest.raises(UserError, match="num_samples: 3 != 2"):  # fewer images would leave a stale 000002.png
        sample.main([*common[:-4], "--num_samples", "2", "--cfg_scale", "1", "--num_sampling_steps", "2"])
    assert all((out / name).read_bytes() == data for name, data in before.items() if name.endswith(".png"))
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "000000.png").write_bytes(before["000000.png"])
    with pytest.raises(UserError, match=r"--output_dir .*stray holds 1 PNGs .*no setup.json"):
        sample.main(["--ckpt", str(fpdm_ckpt), "--output_dir", str(stray), "--num_sampling_steps", "2"])
    assert sorted(p.name for p in stray.iterdir()) == ["000000.png"]
    with pytest.raises(SystemExit):
        sample.main(["--help"])
    assert "another setup's run" in " ".join(capsys.readouterr().out.split())


def _run_script(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=240)


@pytest.mark.parametrize("script", ["sample.py", "sample_ddp.py"])
def test_nan_weights_stop_with_one_line_and_no_images(fpdm, tmp_path, script):
    weights = tmp_path / "nan.safetensors"
    state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in fpdm.state_dict().items()}
    save_safetensors(state, TINY_FPDM, weights)
    out = tmp_path / "out"
    result = _run_script(script, "--ckpt", str(weights), "--output_dir", str(out), "--num_samples", "2",
                         "--num_sampling_steps", "2", "--device", "cpu", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --ckpt") and "nan.safetensors" in lines[0]
    assert "NaN" in lines[0] and not list(tmp_path.rglob("*.png")) and not out.exists()


def test_sample_py_bad_flag_is_one_line(tmp_path):
    result = _run_script("sample.py", "--budget", "-5", "--output_dir", str(tmp_path / "x"), cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip() == "error: --budget: must be >= 1 (got -5)"
    assert not (tmp_path / "x").exists()


def test_non_finite_model_output_stops_before_writing(fpdm, fpdm_ckpt, tmp_path, monkeypatch):
    plan = fixed_plan(steps=3, iters=1)
    real_denoise = sampling.denoise
    calls = []

    def nan_at_second_step(model, x, t, y=None, **kwargs):
        calls.append(1)
        model = Spy(model) if len(calls) < 2 else NaNModel(model)
        return real_denoise(model, x, t, y, **kwargs)

    class NaNModel(Spy):
        def forward_with_stats(self, x, t, y=None, **kwargs):
            out, stats = self.model.forward_with_stats(x, t, y, **kwargs)
            return out * float("nan"), stats

    monkeypatch.setattr(sampling, "denoise", nan_at_second_step)
    written = []
    with pytest.raises(sampling.NonFiniteError, match="not finite"):
        sampling.generate(fpdm, TINY_FPDM, SampleConfig(cfg_scale=1.0), plan, [0, 1], None, seed=0, batch_size=2,
                          on_batch=lambda batch, pixels: written.append(batch))
    assert len(calls) == 2 and not written
    calls.clear()
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"--ckpt .*fpdm.pt.*not finite.*timestep"):
        sample.main(["--ckpt", str(fpdm_ckpt), "--output_dir", str(out), "--num_sampling_steps", "3"])
    assert not out.exists()


#################################################################################
#                                   Precision                                   #
#################################################################################

def test_bf16_keeps_the_iterate_and_the_diffusion_in_fp32(fpdm):
    plan = fixed_plan(steps=3, iters=2)
    spies, samples = {}, {}
    for precision in ("fp32", "bf16"):
        spies[precision] = Spy(fpdm)
        samples[precision] = run_batch(spies[precision], TINY_FPDM, plan, [0, 1], precision=precision,
                                       fixed_point_reuse_solution=True).samples
    for call in spies["bf16"].calls:
        assert call["solution"].dtype == torch.float32 and call["x"].dtype == torch.float32
    assert samples["bf16"].dtype == torch.float32
    difference = (samples["bf16"] - samples["fp32"]).abs().max()
    assert 0 < difference < 0.2  # bf16 did run (the network rounds differently), and stays close


def test_precision_flags_resolve_and_are_recorded(fpdm_ckpt, tmp_path):
    from config import SampleDDPConfig
    assert sampling.resolve_precision(SampleConfig(), "cpu")[0].precision == "fp32"
    assert sampling.resolve_precision(SampleConfig(), "cuda")[0].precision == "tf32"
    config, notes = sampling.resolve_precision(SampleConfig(precision="tf32"), "cpu")
    assert config.precision == "fp32" and "CUDA only" in notes[0]
    assert sampling.resolve_precision(SampleDDPConfig(tf32=True), "cuda")[0].precision == "tf32"
    assert sampling.resolve_precision(SampleDDPConfig(tf32=False), "cuda")[0].precision == "fp32"
    with pytest.raises(UserError, match="--tf32 True.*--precision bf16"):
        sampling.resolve_precision(SampleDDPConfig(tf32=True, precision="bf16"), "cuda")
    with pytest.raises(UserError, match="--precision: must be one of auto, fp32, tf32, bf16"):
        sample.main(["--ckpt", str(fpdm_ckpt), "--precision", "fp16"])
    record = sample.main(["--ckpt", str(fpdm_ckpt), "--output_dir", str(tmp_path / "out"), "--num_samples", "2",
                          "--num_sampling_steps", "2", "--precision", "bf16"])
    saved = json.loads((tmp_path / "out" / "setup.json").read_text())
    assert record["setup"]["sample_config"]["precision"] == saved["setup"]["sample_config"]["precision"] == "bf16"


def test_bf16_digits_are_as_good_as_fp32():
    from classifier import classifier_accuracy, load_or_train_digits_classifier
    from checkpoint import load_model_for_sampling
    model, model_config = load_model_for_sampling(REPO / "pretrained" / "fpdm-digits.safetensors")
    digits_classifier, _ = load_or_train_digits_classifier(
        str(REPO / "experiments" / "results" / "digits_classifier.safetensors"))
    accuracy = {}
    for precision in ("fp32", "bf16"):
        config, plan, _ = sampling.prepare_sampling(model_config, SampleConfig(
            num_sampling_steps=8, fixed_point_iters=3, ddim=True, cfg_scale=1.0, precision=precision), model=model)
        drawn = sampling.generate(model, model_config, config, plan, list(range(32)), None, seed=0, batch_size=32)
        accuracy[precision] = classifier_accuracy(digits_classifier, drawn.images.repeat(3, axis=-1),
                                                  drawn.labels.numpy())
    print(f"classifier accuracy of 32 digits, fp32 vs bf16: {accuracy}")
    assert accuracy["fp32"] > 0.8 and abs(accuracy["bf16"] - accuracy["fp32"]) <= 0.10


#################################################################################
#                                     MACs                                      #
#################################################################################

@pytest.mark.parametrize("cfg_scale", ["1", "4"])
def test_setup_records_gmacs_of_the_iterations_run(fpdm_ckpt, tmp_path, cfg_scale):
    out = tmp_path / "out"
    record = sample.main(["--ckpt", str(fpdm_ckpt), "--output_dir", str(out), "--num_samples", "3",
                          "--batch_size", "2", "--num_sampling_steps", "3", "--fixed_point_iters", "2",
                          "--cfg_scale", cfg_scale])
    expected = cost.macs_per_step(TINY_FPDM, 2, cfg=cfg_scale != "1") * 3 / 1e9
    saved = json.loads((out / "setup.json").read_text())["stats"]
    assert saved["gmacs_per_image"] == pytest.approx(expected, rel=1e-12) == record["stats"]["gmacs_per_image"]
    assert saved["planned_gmacs_per_image"] == pytest.approx(expected, rel=1e-12)
    assert saved["blocks_per_image_max"] == 3 * (1 + 2 + 1)  # next to the blocks


@pytest.mark.parametrize("model_config, extra", [
    (TINY_FPDM, []), (TINY_FPDM, ["--fixed_point_iters", "3"]), (TINY_FPDM, ["--num_sampling_steps", "5"]),
    (TINY_FPDM, ["--cfg_scale", "4"]), (TINY_DIT, []),
])
def test_budget_gmacs_is_the_largest_plan_that_fits(tmp_path, model_config, extra):
    weights = tmp_path / "model.safetensors"
    save_safetensors(build(model_config).state_dict(), model_config, weights)
    gmacs = 0.09
    record = sample.main(["--ckpt", str(weights), "--output_dir", str(tmp_path / "out"), "--num_samples", "2",
                          "--budget_gmacs", str(gmacs), *([] if "--cfg_scale" in extra else ["--cfg_scale", "1"]),
                          *extra])
    assert record["stats"]["gmacs_per_image"] <= gmacs
    config = SampleConfig(**{**record["setup"]["sample_config"], "budget_gmacs": None})
    budget = config.budget
    guided = config.cfg_scale != 1.0
    assert record["setup"]["plan"]["blocks_per_image"] == budget
    for larger in range(budget + 1, budget + 60):  # no larger block budget spending more blocks fits
        try:
            plan = plan_for_model(model_config, replace(config, budget=larger))
        except UserError:
            continue
        assert plan.blocks_per_image == budget or planned_macs(model_config, plan, guided) > gmacs * 1e9, larger
    with pytest.raises(UserError, match="--budget_gmacs"):
        sample.main(["--ckpt", str(weights), "--output_dir", str(tmp_path / "b"), "--budget_gmacs", "0.001"])
    with pytest.raises(UserError, match="--budget_gmacs: must be a positive number"):
        sample.main(["--ckpt", str(weights), "--output_dir", str(tmp_path / "b"), "--budget_gmacs", "-1"])
