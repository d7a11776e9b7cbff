"""Training: exact resume, atomic checkpoints, non-finite loss, config checks, and a 2-process CPU run."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import checkpoint
from config import ModelConfig, UserError
from models import create_model, draw_sjfb_iters
import train
import training

REPO = Path(__file__).resolve().parents[1]

# A tiny FPDM on digits: few S-JFB iterations so each step takes milliseconds.
TINY = ["--model", "DiT-Ti/2", "--fixed_point", "True", "--fixed_point_no_grad_max_iters", "2",
        "--fixed_point_with_grad_max_iters", "2", "--predict_v", "True", "--use_zero_terminal_snr", "True",
        "--global_batch_size", "16", "--log_every", "2", "--sample_grid", "False"]


def run_train(tmp_path: Path, *extra: str) -> Path:
    return train.main([*TINY, "--output_dir", str(tmp_path), *extra])


def load_weights(run_dir: Path, name: str = "latest.pt") -> dict:
    return checkpoint.load_checkpoint(run_dir / "checkpoints" / name)


def test_resume_is_bit_exact(tmp_path):
    full = run_train(tmp_path, "--max_steps", "6", "--ckpt_every", "3", "--output_subdir", "full")
    half = run_train(tmp_path, "--max_steps", "3", "--ckpt_every", "3", "--output_subdir", "half")
    resumed = train.main(["--resume", str(half / "checkpoints" / "latest.pt"), "--max_steps", "6"])
    assert resumed == half
    a, b = load_weights(full), load_weights(half)
    assert a["step"] == b["step"] == 6
    for part in ("model", "ema"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs after resume"
    # Sanity: the run actually changed the weights (otherwise equality above proves nothing).
    first = load_weights(full, "0000003.pt")
    assert any(not torch.equal(first["model"][k], a["model"][k]) for k in a["model"])


def test_resume_keeps_saved_ema(tmp_path):
    run = run_train(tmp_path, "--max_steps", "2", "--ckpt_every", "2", "--output_subdir", "r")
    saved = load_weights(run)
    assert any(not torch.equal(saved["ema"][k], saved["model"][k]) for k in saved["ema"])
    model_config, train_config, payload, _ = train.parse_configs(["--resume", str(run)])
    assert payload["step"] == 2 and model_config.fixed_point


def test_resume_with_conflicting_flags_names_fields(tmp_path):
    run = run_train(tmp_path, "--max_steps", "1", "--output_subdir", "c")
    with pytest.raises(ValueError, match=r"fixed_point_pre_depth.*\n.*lr|lr.*\n.*fixed_point_pre_depth"):
        train.parse_configs(["--resume", str(run), "--deq_pre_depth", "2", "--lr", "0.5"])
    # Run-length flags may change on resume.
    train.parse_configs(["--resume", str(run), "--max_steps", "10"])


def test_checkpoint_contents_and_config(tmp_path):
    run = run_train(tmp_path, "--max_steps", "2", "--ckpt_every", "1", "--output_subdir", "k")
    payload = load_weights(run)
    assert {"model", "ema", "opt", "step", "config", "rng"} <= set(payload)
    assert payload["config"]["model"]["fixed_point"] is True
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in payload["model"])
    assert sorted(p.name for p in (run / "checkpoints").glob("*.pt")) == ["0000001.pt", "0000002.pt", "latest.pt"]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 2 and {"loss", "mse", "vb", "steps_per_sec", "peak_memory_mb"} <= set(lines[-1])
    model, config = checkpoint.load_model_for_sampling(run / "ema.safetensors")
    assert config.fixed_point and sum(p.numel() for p in model.parameters()) > 0


def test_atomic_save_survives_a_crash(tmp_path, monkeypatch):
    path = tmp_path / "latest.pt"
    checkpoint.save_checkpoint({"step": 1, "model": {"w": torch.ones(3)}}, path)

    def crash(obj, f, *args, **kwargs):  # f: the temporary file's path or its open handle
        if isinstance(f, (str, os.PathLike)):
            with open(f, "wb") as handle:
                handle.write(b"partial")
        else:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint({"step": 2, "model": {"w": torch.zeros(3)}}, path)
    assert checkpoint.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pt"]  # no temp files left behind


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real = training.compute_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        terms = real(*args, **kwargs)
        if calls["n"] == 3:
            terms = {k: v * float("nan") for k, v in terms.items()}
        return terms

    monkeypatch.setattr(training, "compute_loss", poisoned)
    with pytest.raises(training.NonFiniteLossError, match="step 3"):
        run_train(tmp_path, "--max_steps", "5", "--ckpt_every", "2", "--output_subdir", "nan")
    good = load_weights(tmp_path / "nan")
    assert good["step"] == 2
    assert all(torch.isfinite(v).all() for v in good["model"].values())


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "mnist"], "--dataset"),
    (["--global_batch_size", "0"], "--global_batch_size"),
    (["--log_with", "comet"], "--log_with"),
    (["--deq_pre_depth", "-1", "--fixed_point", "True"], "fixed_point_pre_depth"),
    (["--resume", "/nonexistent/ckpt.pt"], "--resume"),
])
def test_bad_input_is_rejected_with_the_flag_name(tmp_path, argv, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train.main([*argv, "--output_dir", str(tmp_path), "--max_steps", "1"])
    assert not any(tmp_path.rglob("*.pt"))


def test_unknown_flag_is_rejected():
    with pytest.raises(SystemExit):
        train.parse_configs(["--no_such_flag", "1"])
    with pytest.raises(SystemExit):  # no prefix matching: --fixed_point_pre would silently mean something else
        train.parse_configs(["--fixed_point_pre", "1"])


def test_default_run_is_a_small_dit_and_the_readme_preset_a_small_fpdm_on_digits():
    model_config, train_config, _, _ = train.parse_configs([])  # the authors' meaning: no flags, a standard DiT
    assert not model_config.fixed_point and train_config.dataset == "digits" and 0 < train_config.max_steps <= 2000
    model_config, train_config, _, _ = train.parse_configs(["--config", str(REPO / "configs" / "digits.yaml")])
    assert model_config.fixed_point and train_config.dataset == "digits" and 0 < train_config.max_steps <= 2000


def test_original_readme_flags_parse():
    model_config, train_config, _, _ = train.parse_configs(
        ["--output_subdir", "v_pred_exp", "--predict_v", "True", "--use_zero_terminal_snr", "True",
         "--fixed_point", "True", "--deq_pre_depth", "4", "--deq_post_depth", "4"])
    assert model_config.fixed_point and model_config.fixed_point_pre_depth == 4
    assert model_config.fixed_point_post_depth == 4 and model_config.predict_v
    assert train_config.output_subdir == "v_pred_exp"
    bare, _, _, _ = train.parse_configs(["--fixed_point"])
    assert bare.fixed_point is True


def test_two_process_cpu_run_keeps_replicas_identical(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "aconfs/cpu_2proc.yaml"),
               "--main_process_port", "29533", str(REPO / "train.py"), *TINY, "--max_steps", "3",
               "--ckpt_every", "3", "--output_dir", str(tmp_path), "--output_subdir", "ddp"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    checksums = summary["rank_weight_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").glob("*.pt")) == ["0000003.pt", "latest.pt"]
    assert load_weights(tmp_path / "ddp")["step"] == 3


# The training commands of the authors' README (shared/paper/original-readme.txt), flags exactly as written;
# on CPU we add a step cap and a small batch ("add flags, change none").
# The "Standard model" command gets --fixed_point False added: FPDM is this project's default.
ORIGINAL_README_COMMANDS = [
    ["--fixed_point", "False"],
    ["--fixed_point", "True", "--deq_pre_depth", "1", "--deq_post_depth", "1"],
    ["--output_subdir", "v_pred_exp", "--predict_v", "True", "--use_zero_terminal_snr", "True",
     "--fixed_point", "True", "--deq_pre_depth", "1", "--deq_post_depth", "1"],
    ["--output_subdir", "v_pred_exp", "--predict_v", "True", "--use_zero_terminal_snr", "True",
     "--fixed_point", "True", "--deq_pre_depth", "4", "--deq_post_depth", "4"],
]


@pytest.mark.parametrize("flags", ORIGINAL_README_COMMANDS, ids=["dit", "fpdm", "fpdm-v-zsnr", "fpdm-4-4"])
def test_original_readme_training_commands_run(tmp_path, flags):
    run = train.main([*flags, "--max_steps", "1", "--global_batch_size", "8", "--sample_grid", "False",
                      "--output_dir", str(tmp_path)])
    payload = load_weights(run)
    assert payload["step"] == 1
    saved = payload["config"]["model"]
    assert saved["fixed_point"] == (flags[flags.index("--fixed_point") + 1] == "True")
    if "--deq_pre_depth" in flags:
        depth = int(flags[flags.index("--deq_pre_depth") + 1])
        assert saved["fixed_point_pre_depth"] == saved["fixed_point_post_depth"] == depth
        assert len([k for k in payload["model"] if k.startswith("blocks_pre.") and k.endswith("attn.qkv.weight")]) == depth


@pytest.mark.parametrize("tracker", ["wandb", "tensorboard"])
def test_trackers_never_crash_a_run(tmp_path, tracker, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # no network here: train.py must choose offline by itself
    monkeypatch.chdir(tmp_path)
    run = run_train(tmp_path, "--max_steps", "2", "--log_with", tracker, "--output_subdir", tracker)
    assert load_weights(run)["step"] == 2
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


def test_compile_keeps_plain_state_dict_keys(tmp_path):
    run = run_train(tmp_path, "--max_steps", "2", "--compile", "True", "--output_subdir", "compiled")
    payload = load_weights(run)
    assert payload["step"] == 2 and all(torch.isfinite(v).all() for v in payload["model"].values())
    fresh = create_model(ModelConfig(**payload["config"]["model"]))
    assert set(payload["model"]) == set(fresh.state_dict())  # no _orig_mod. / module. prefixes


#################################################################################
#          Training on extracted latents and image folders (from test_data)     #
#################################################################################
# Fixtures features / image_folder / vae_dir come from tests/conftest.py.

TINY_DATA_TRAIN = ["--model", "DiT-Ti/2", "--global_batch_size", "4", "--max_steps", "2", "--log_every", "1",
              "--fixed_point_no_grad_max_iters", "1", "--fixed_point_with_grad_max_iters", "1"]


def test_train_on_extracted_latents_decodes_its_grid_with_the_manifest_vae(features, tmp_path, monkeypatch):
    import sampling
    import train
    from checkpoint import load_checkpoint
    grid_vaes = []
    real_grid = sampling.sample_grid_png
    monkeypatch.setattr(sampling, "sample_grid_png",
                        lambda *args, **kwargs: grid_vaes.append(kwargs.get("vae")) or real_grid(*args, **kwargs))
    run = train.main([*TINY_DATA_TRAIN, "--dataset", "latents", "--feature_path", str(features),
                      "--output_dir", str(tmp_path)])
    saved = load_checkpoint(run)["config"]["model"]
    assert saved["latent"] and saved["in_channels"] == 4 and saved["image_size"] == 32 and saved["num_classes"] == 2
    assert len(grid_vaes) == 1 and grid_vaes[0] is not None  # decoded with the VAE named in the manifest
    assert (run / "samples.png").is_file() and "raw latents" not in (run / "log.txt").read_text()


def test_the_end_of_training_grid_uses_the_chosen_sampler(tmp_path, monkeypatch):
    import sampling
    samplers, real_grid = [], sampling.sample_grid_png
    monkeypatch.setattr(sampling, "sample_grid_png",
                        lambda *args, **kwargs: samplers.append(kwargs["sampler"]) or real_grid(*args, **kwargs))
    run = train.main([*TINY_DATA_TRAIN, "--sample_grid_sampler", "dpm++2m", "--output_dir", str(tmp_path)])
    assert samplers == ["dpm++2m"] and (run / "samples.png").is_file()
    with pytest.raises(UserError, match="--sample_grid_sampler: must be one of"):
        train.main([*TINY_DATA_TRAIN, "--sample_grid_sampler", "heun", "--output_dir", str(tmp_path)])


def test_train_on_image_folder_through_the_vae(image_folder, vae_dir, tmp_path):
    import train
    from checkpoint import load_checkpoint
    run = train.main([*TINY_DATA_TRAIN, "--dataset", "imagefolder", "--data_path", str(image_folder), "--vae",
                      str(vae_dir), "--image_size", "32", "--sample_grid", "False", "--output_dir", str(tmp_path)])
    saved = load_checkpoint(run)["config"]["model"]
    assert saved["latent"] and saved["in_channels"] == 4 and saved["num_classes"] == 2
    pixel_run = train.main([*TINY_DATA_TRAIN, "--dataset", "imagefolder", "--data_path", str(image_folder),
                            "--image_size", "16", "--sample_grid", "False", "--output_dir", str(tmp_path)])
    assert load_checkpoint(pixel_run)["config"]["model"]["in_channels"] == 3


#################################################################################
#               Setup apart from the loop; the data implies model fields        #
#################################################################################

def test_training_loop_applies_what_the_data_implies_and_checks_given_flags(tmp_path):
    from config import TrainConfig, UserError
    model_config, train_config, _, _ = train.parse_configs([*TINY, "--max_steps", "1", "--output_dir", str(tmp_path),
                                                           "--output_subdir", "direct"])
    run = training.training_loop(replace(model_config, in_channels=3), train_config,  # not given: the data decides
                                 explicit_model_fields=set())
    assert run == tmp_path / "direct" and load_weights(run)["config"]["model"]["in_channels"] == 1
    with pytest.raises(UserError, match="--in_channels must be 1, got 3"):  # given: must agree with the data
        training.training_loop(replace(model_config, in_channels=3), replace(train_config, output_subdir="other"),
                               explicit_model_fields={"in_channels"})
    assert not (tmp_path / "other").exists()
    assert isinstance(TrainConfig().keep_last_ckpts, int)


#################################################################################
#                       Nothing a user wrote is destroyed                       #
#################################################################################

def folder_checksums(folder: Path) -> dict[str, str]:
    import hashlib
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_existing_run_folder_is_refused_and_left_byte_identical(tmp_path):
    run = run_train(tmp_path, "--max_steps", "2", "--ckpt_every", "1", "--output_subdir", "run")
    before = folder_checksums(run)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *TINY, "--max_steps", "2", "--output_dir",
                             str(tmp_path), "--output_subdir", "run"], capture_output=True, text=True, env=env,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert str(run) in result.stderr and "--resume" in result.stderr and "--output_subdir" in result.stderr
    assert folder_checksums(run) == before
    from config import UserError
    with pytest.raises(UserError, match="already holds a run"):  # in-process too, and with another model
        train.main(["--max_steps", "1", "--output_dir", str(tmp_path), "--output_subdir", "run"])
    assert folder_checksums(run) == before


def test_resume_drops_metrics_after_the_step_and_stale_temporaries(tmp_path):
    run = run_train(tmp_path, "--max_steps", "4", "--ckpt_every", "2", "--log_every", "1", "--output_subdir", "k")
    # Simulate a kill after step 4's metrics but before its checkpoint: latest.pt points back at step 2.
    checkpoints = run / "checkpoints"
    checkpoint.link_latest(checkpoints / "0000002.pt", checkpoints / "latest.pt")
    (checkpoints / "0000004.pt").unlink()
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 5, "loss": 1.0}\n{"step": 6, "lo')  # rows of a later, killed run; one cut short
    (checkpoints / ".latest.pt.x1y2z3.tmp").write_bytes(b"partial")
    train.main(["--resume", str(run), "--max_steps", "4"])
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert not list(checkpoints.glob(".*.tmp"))
    assert load_weights(run)["step"] == 4


#################################################################################
#                   S-JFB: one (n, m) per step, the same on every rank          #
#################################################################################

def test_sjfb_iters_are_drawn_once_per_step_from_the_global_seed_and_logged(tmp_path, monkeypatch):
    from models import FPDM
    seen = []
    real = FPDM.forward_with_stats

    def spy(self, *args, **kwargs):
        if self.training and torch.is_grad_enabled():
            seen.append((kwargs.get("num_no_grad_iters"), kwargs.get("num_iters")))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FPDM, "forward_with_stats", spy)
    run = run_train(tmp_path, "--max_steps", "6", "--log_every", "1", "--global_seed", "3", "--output_subdir", "s",
                    "--fixed_point_no_grad_max_iters", "4", "--fixed_point_with_grad_max_iters", "4")
    bounds = ModelConfig(fixed_point=True, fixed_point_no_grad_max_iters=4, fixed_point_with_grad_max_iters=4)
    generator = torch.Generator().manual_seed(3)
    expected = [draw_sjfb_iters(bounds, generator) for _ in range(6)]
    assert seen == expected and len(set(expected)) > 1  # passed explicitly, one draw per step, varying
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["sjfb_n"], r["sjfb_m"]) for r in rows] == expected
    assert [r["sjfb_n_mean"] for r in rows] == [float(n) for n, _ in expected]


def test_two_process_sjfb_iters_agree_across_ranks_and_vary_across_steps(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "aconfs/cpu_2proc.yaml"),
               "--main_process_port", "29534", str(REPO / "train.py"), *TINY, "--max_steps", "6", "--log_every", "3",
               "--ckpt_every", "6", "--fixed_point_no_grad_max_iters", "4", "--fixed_point_with_grad_max_iters", "4",
               "--grad_checkpointing", "True", "--output_dir", str(tmp_path), "--output_subdir", "ddp"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    # Each logged window gathers every rank's (n, m) per step and stops the run if they differ. With checkpointed
    # fixed-point iterations (non-reentrant) DDP still reduces every gradient once: the replicas stay identical.
    assert result.returncode == 0, result.stderr[-3000:]
    checksums = json.loads((tmp_path / "ddp" / "summary.json").read_text())["rank_weight_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    rows = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6] and all({"sjfb_n", "sjfb_m", "sjfb_n_mean"} <= set(r) for r in rows)
    bounds = ModelConfig(fixed_point=True, fixed_point_no_grad_max_iters=4, fixed_point_with_grad_max_iters=4)
    generator = torch.Generator().manual_seed(0)
    expected = [draw_sjfb_iters(bounds, generator) for _ in range(6)]
    assert [(r["sjfb_n"], r["sjfb_m"]) for r in rows] == [expected[2], expected[5]] and len(set(expected)) > 1
    rng = load_weights(tmp_path / "ddp")["rng"]
    assert len(rng) == 2 and torch.equal(rng[0]["generators"]["sjfb"], rng[1]["generators"]["sjfb"])
    assert not torch.equal(rng[0]["torch"], rng[1]["torch"])  # timesteps, noise, label dropout: per rank


#################################################################################
#                         One-line errors for user mistakes                     #
#################################################################################

def run_script(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "train.py"), *argv], capture_output=True, text=True, env=env,
                          timeout=120, cwd=tmp_path)


def test_user_mistakes_print_one_line(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "empty").mkdir()
    cases = [
        (["--resume", str(tmp_path / "missing.pt")], ["--resume", "missing.pt"]),
        (["--output_dir", str(tmp_path / "a_file" / "runs"), "--max_steps", "1"], ["--output_dir", "a_file"]),
        (["--dataset", "imagefolder", "--data_path", str(tmp_path / "empty"), "--max_steps", "1"],
         ["--data_path", "empty", "holds no images"]),
        (["--dataset", "imagefolder", "--data_path", str(tmp_path / "a_file"), "--max_steps", "1"],
         ["--data_path", "a_file", "not a folder"]),
        (["--lr", "-1", "--max_steps", "1", "--output_dir", str(tmp_path / "x")], ["--lr: must be > 0 (got -1.0)"]),
    ]
    for argv, words in cases:
        result = run_script(tmp_path, *argv)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
        assert all(word in result.stderr for word in words), result.stderr
    assert not (tmp_path / "x").exists()


def test_two_process_bad_batch_size_prints_once_and_every_process_fails(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "aconfs/cpu_2proc.yaml"),
               "--main_process_port", "29535", str(REPO / "train.py"), "--global_batch_size", "63",
               "--output_dir", str(tmp_path), "--max_steps", "1"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    message = "error: --global_batch_size: must be a multiple of the number of processes 2 (got 63)\n"
    assert result.returncode != 0 and result.stderr.startswith(message), result.stderr[-3000:]
    assert result.stderr.count("--global_batch_size") == 1
    exit_codes = [line.split(":")[1].split()[0] for line in result.stderr.splitlines() if "exitcode  :" in line]
    assert len(exit_codes) == 2 and all(code != "0" for code in exit_codes), result.stderr[-3000:]
    assert not any(tmp_path.iterdir())


def test_wrong_shapes_on_resume_name_the_file_and_key(tmp_path):
    from config import UserError
    run = run_train(tmp_path, "--max_steps", "1", "--output_subdir", "w")
    payload = load_weights(run)
    payload["model"]["final_layer.linear.weight"] = payload["model"]["final_layer.linear.weight"][:1]
    bad = run / "checkpoints" / "0000001.pt"
    checkpoint.save_checkpoint({k: v for k, v in payload.items() if k != "format"}, bad)
    with pytest.raises(UserError, match=r"--resume: .*0000001\.pt.*first 'final_layer\.linear\.weight'"):
        train.main(["--resume", str(bad), "--max_steps", "2"])


def test_full_disk_during_a_save_is_one_line_naming_the_file_and_keeps_latest(tmp_path, monkeypatch, capsys):
    import cli
    real_save, calls = torch.save, []

    def second_save_hits_a_full_disk(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) < 2:
            return real_save(obj, f, *args, **kwargs)
        with open("/dev/full", "wb") as full:
            real_save(obj, full)

    monkeypatch.setattr(torch, "save", second_save_hits_a_full_disk)
    with pytest.raises(SystemExit) as caught:
        cli.run(lambda: run_train(tmp_path, "--max_steps", "4", "--ckpt_every", "2", "--output_subdir", "full"))
    assert caught.value.code == 2
    checkpoints = tmp_path / "full" / "checkpoints"
    err = capsys.readouterr().err  # in-process, the run's log lines come first
    assert err.splitlines()[-1] == f"error: No space left on device: {checkpoints / '0000004.pt'}"
    assert err.count("error:") == 1
    monkeypatch.setattr(torch, "save", real_save)
    assert load_weights(tmp_path / "full")["step"] == 2
    assert sorted(p.name for p in checkpoints.iterdir()) == ["0000002.pt", "latest.pt"]


#################################################################################
#                      Old checkpoints pruned; latest.pt a link                 #
#################################################################################

def test_keep_last_ckpts_and_milestones(tmp_path):
    run = run_train(tmp_path, "--max_steps", "5", "--ckpt_every", "1", "--keep_last_ckpts", "2",
                    "--ckpt_milestones_every", "2", "--output_subdir", "keep")
    checkpoints = run / "checkpoints"
    # Five saves: the newest two (4, 5) plus milestone 2 (4 is one too); latest.pt is step 5's file, linked.
    assert sorted(p.name for p in checkpoints.iterdir()) == ["0000002.pt", "0000004.pt", "0000005.pt", "latest.pt"]
    assert os.path.samefile(checkpoints / "latest.pt", checkpoints / "0000005.pt")
    assert load_weights(run)["step"] == 5
    plain = run_train(tmp_path, "--max_steps", "5", "--ckpt_every", "1", "--keep_last_ckpts", "2",
                      "--output_subdir", "plain")
    assert sorted(p.name for p in (plain / "checkpoints").iterdir()) == ["0000004.pt", "0000005.pt", "latest.pt"]


#################################################################################
#          Speed at scale: precision, EMA, no per-step syncs, data, compute     #
#################################################################################

def test_ema_update_is_one_foreach_pass_with_the_per_tensor_values(monkeypatch):
    torch.manual_seed(0)
    model = create_model(ModelConfig(fixed_point=True))
    ema = create_model(ModelConfig(fixed_point=True))
    expected = {name: p.detach().clone() for name, p in ema.named_parameters()}
    for name, param in model.named_parameters():  # the per-tensor formula the update replaced
        expected[name].mul_(0.9).add_(param.detach().float(), alpha=1 - 0.9)
    foreach_adds = []
    real_add = torch._foreach_add_
    monkeypatch.setattr(torch, "_foreach_add_", lambda *a, **k: foreach_adds.append(1) or real_add(*a, **k))
    training.update_ema(ema, model, 0.9)
    assert foreach_adds == [1]  # one call over the parameter list, not one per tensor
    for name, param in ema.named_parameters():
        assert torch.equal(param, expected[name]), name


def test_cuda_only_choices_follow_the_device():
    from types import SimpleNamespace
    from config import TrainConfig
    cpu_params = list(create_model(ModelConfig()).parameters())
    assert not training.use_fused_adamw(cpu_params) and not training.use_fused_adamw([])
    on_cuda = [SimpleNamespace(device=torch.device("cuda", 0))] * 3
    assert training.use_fused_adamw(on_cuda)
    assert not training.use_fused_adamw([*on_cuda, SimpleNamespace(device=torch.device("cpu"))])
    assert not training.create_optimizer(create_model(ModelConfig()), TrainConfig()).defaults["fused"]
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        training.set_tf32(True, torch.device("cpu"))
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        training.set_tf32(True, torch.device("cuda"))
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_mixed_precision_flag_reaches_the_accelerator(tmp_path, monkeypatch):
    from config import UserError
    seen = []
    real_setup = training.setup_processes
    monkeypatch.setattr(training, "setup_processes", lambda config: seen.append(real_setup(config)) or seen[-1])
    run = run_train(tmp_path, "--max_steps", "2", "--mixed_precision", "bf16", "--output_subdir", "bf16")
    assert seen[-1].mixed_precision == "bf16"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and all(math.isfinite(r["loss"]) for r in rows)
    assert "mixed precision bf16" in (run / "log.txt").read_text()
    payload = load_weights(run)
    assert payload["config"]["train"]["mixed_precision"] == "bf16"
    assert all(v.dtype == torch.float32 for v in payload["model"].values())  # fp32 weights, bf16 arithmetic
    # The next run in the same process chooses its own (accelerate would otherwise keep bf16 for the process).
    run_train(tmp_path, "--max_steps", "1", "--output_subdir", "fp32")
    assert seen[-1].mixed_precision == "no"
    with pytest.raises(UserError, match="--mixed_precision: fp16 needs a CUDA device"):  # accelerate: silent fp32
        run_train(tmp_path, "--max_steps", "1", "--mixed_precision", "fp16", "--output_subdir", "fp16")
    assert not (tmp_path / "fp16").exists()
    train.parse_configs(["--resume", str(run), "--mixed_precision", "no"])  # may change on resume


def test_loss_finiteness_is_read_only_when_logging_or_saving(tmp_path, monkeypatch):
    """No collective and no device read inside a step; a non-finite loss between boundaries is still caught at
    the next one, named by its step, and never saved."""
    from accelerate import Accelerator
    inside, reads = [], []
    real_step, real_reduce, real_gather = training.train_step, Accelerator.reduce, Accelerator.gather
    real_check = training.FiniteLossWatch.check

    def step_spy(state, *args, **kwargs):
        inside.append(True)
        try:
            return real_step(state, *args, **kwargs)
        finally:
            inside.pop()

    monkeypatch.setattr(training, "train_step", step_spy)
    monkeypatch.setattr(Accelerator, "reduce", lambda self, *a, **k: reads.append(bool(inside)) or
                        real_reduce(self, *a, **k))
    monkeypatch.setattr(Accelerator, "gather", lambda self, *a, **k: reads.append(bool(inside)) or
                        real_gather(self, *a, **k))
    checks = []
    monkeypatch.setattr(training.FiniteLossWatch, "check",
                        lambda self, accelerator, logger, run_dir, step: checks.append(step) or
                        real_check(self, accelerator, logger, run_dir, step))
    run = run_train(tmp_path, "--max_steps", "6", "--log_every", "3", "--ckpt_every", "2", "--output_subdir", "ok")
    assert reads and not any(reads)  # reductions happen, never inside a step
    assert checks == [2, 3, 4, 6, 6]  # before each save (2, 4, 6) and each log (3, 6)
    assert load_weights(run)["step"] == 6

    real_loss, calls = training.compute_loss, {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        terms = real_loss(*args, **kwargs)
        return {k: v * float("nan") for k, v in terms.items()} if calls["n"] == 2 else terms

    monkeypatch.setattr(training, "compute_loss", poisoned)
    with pytest.raises(training.NonFiniteLossError, match="non-finite at step 2;"):
        run_train(tmp_path, "--max_steps", "8", "--log_every", "5", "--ckpt_every", "5", "--output_subdir", "nan")
    assert not list((tmp_path / "nan" / "checkpoints").glob("*.pt"))  # step 5 had NaN weights: not written
    assert not (tmp_path / "nan" / "metrics.jsonl").exists()
    assert "non-finite loss at step 2; stopping at step 5" in (tmp_path / "nan" / "log.txt").read_text()


def test_data_loader_workers_give_the_same_run(tmp_path, monkeypatch):
    loaders = []
    real_loader = training.DataLoader
    monkeypatch.setattr(training, "DataLoader", lambda *a, **k: loaders.append(k) or real_loader(*a, **k))
    plain = run_train(tmp_path, "--max_steps", "3", "--output_subdir", "plain")
    workers = run_train(tmp_path, "--max_steps", "3", "--num_workers", "2", "--output_subdir", "workers")
    assert [k["num_workers"] for k in loaders] == [0, 2] and not any(k["pin_memory"] for k in loaders)  # CPU
    a, b = load_weights(plain), load_weights(workers)
    for part in ("model", "ema"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs with --num_workers 2"
    # The batches are those of epoch_batches, epoch after epoch, from any step (what makes resume bit-exact).
    data = training.TrainingData(list(range(40)), batch_rank=0, batch_world_size=1, local_batch=16)
    expected = [batch for epoch in range(3) for batch in training.epoch_batches(40, 16, epoch, 5, 0, 1)[:2]]
    assert list(training.StepBatches(data, 5, 0, 6)) == expected
    assert list(training.StepBatches(data, 5, 3, 5)) == expected[3:5] and len(training.StepBatches(data, 5, 3, 5)) == 2


def test_metrics_record_the_training_compute_of_the_logged_step(tmp_path):
    import cost
    run = run_train(tmp_path, "--max_steps", "4", "--log_every", "1", "--output_subdir", "fpdm",
                    "--fixed_point_no_grad_max_iters", "3", "--fixed_point_with_grad_max_iters", "3")
    model_config = ModelConfig(**load_weights(run)["config"]["model"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len({(r["sjfb_n"], r["sjfb_m"]) for r in rows}) > 1
    for row in rows:
        n, m = row["sjfb_n"], row["sjfb_m"]
        # forward 1x + backward 2x of what carries gradient; the n no-grad iterations forward only
        expected = 3 * cost.macs_per_step(model_config, m) + n * (
            cost.macs_per_block(128, 16) + cost.macs_injection(128, 16))
        assert row["train_gmacs_per_image"] == pytest.approx(expected / 1e9, rel=1e-12)
    dit = run_train(tmp_path, "--max_steps", "1", "--fixed_point", "False", "--output_subdir", "dit")
    dit_config = ModelConfig(**load_weights(dit)["config"]["model"])
    row = json.loads((dit / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["train_gmacs_per_image"] == pytest.approx(3 * cost.macs_per_step(dit_config) / 1e9, rel=1e-12)
