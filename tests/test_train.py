"""Training: exact resume, atomic checkpoints, non-finite loss, config checks, and a 2-process CPU run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoint
from config import ModelConfig
from models import create_model
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
