"""config.py and cli.py: one parser per script, spellings and aliases, given flags, --help defaults, validation,
presets, and one-line user errors."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest

import evaluate
import extract_features
import sample
import train
from config import (EvaluateConfig, ExtractConfig, ModelConfig, SampleConfig, SampleDDPConfig, TrainConfig,
                    UserError, build_config, load_preset, make_parser, parse_flags)

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted((REPO / "configs").glob("*.yaml"))


#################################################################################
#                              Parsing and aliases                              #
#################################################################################

def test_underscore_dash_and_alias_spellings_set_one_field():
    for argv in (["--deq_pre_depth", "3"], ["--deq-pre-depth", "3"], ["--fixed_point_pre_depth", "3"],
                 ["--fixed-point-pre-depth", "3"]):
        assert parse_flags("", [ModelConfig], argv) == {"fixed_point_pre_depth": 3}
    assert parse_flags("", [ModelConfig], ["--deq_post_depth", "2"]) == {"fixed_point_post_depth": 2}


def test_only_given_flags_are_in_the_parse():
    given = parse_flags("", [SampleConfig, ModelConfig], ["--budget", "280", "--fixed_point", "--cfg-scale", "1"])
    assert given == {"budget": 280, "fixed_point": True, "cfg_scale": 1.0}
    config = build_config(SampleConfig, given)
    assert config.budget == 280 and config.num_sampling_steps is None and config.fixed_point_iters is None
    assert build_config(SampleConfig, {}) == SampleConfig()


def test_optional_flags_accept_none_and_bools_accept_spellings():
    assert parse_flags("", [TrainConfig], ["--max_steps", "None"]) == {"max_steps": None}
    assert parse_flags("", [SampleConfig], ["--budget", "none"]) == {"budget": None}
    for text, value in (("True", True), ("false", False), ("1", True), ("no", False)):
        assert parse_flags("", [ModelConfig], ["--fixed_point", text]) == {"fixed_point": value}
    for bad in (["--fixed_point", "maybe"], ["--budget", "many"], ["--fixed_point_pre", "1"], ["--bogus"]):
        with pytest.raises(SystemExit):
            parse_flags("", [SampleConfig, ModelConfig], bad)


def test_sample_ddp_takes_the_official_dit_spellings():
    config, model_flags = sample.parse_args(
        ["--num-fid-samples", "7", "--per-proc-batch-size", "3", "--sample-dir", "out", "--global-seed", "5",
         "--cfg-scale", "1.5", "--num-sampling-steps", "9", "--tf32", "--fixed_point", "True"], SampleDDPConfig)
    assert (config.num_samples, config.batch_size, config.output_dir, config.seed) == (7, 3, "out", 5)
    assert (config.cfg_scale, config.num_sampling_steps, config.tf32) == (1.5, 9, True)
    assert model_flags == {"fixed_point": True}
    same, _ = sample.parse_args(["--num_samples", "7", "--batch_size", "3", "--output_dir", "out", "--seed", "5",
                                 "--cfg_scale", "1.5", "--num_sampling_steps", "9", "--tf32", "True"], SampleDDPConfig)
    assert same == config
    assert SampleDDPConfig().num_samples == 50_000 and SampleConfig().num_samples == 16
    shared = {f.name for f in fields(SampleConfig)}
    # no field repeated under another name (tf32, shard_size and png are sample_ddp.py's own)
    assert {f.name for f in fields(SampleDDPConfig)} - shared == {"tf32", "shard_size", "png"}


def test_extract_features_flags():
    base = ["--data_path", "in", "--features_path", "out"]
    args = extract_features.parse_args(base + ["--flip", "False", "--sample_posterior", "false"])
    assert args.flip is False and args.sample_posterior is False and args.vae == "ema"
    assert extract_features.parse_args(base + ["--flip"]).flip is True
    assert extract_features.parse_args(["--data-path", "in", "--feature_path", "out"]).features_path == "out"
    for bad in (["--bogus", "1"], ["--chunk", "4"], ["--flip", "maybe"]):
        with pytest.raises(SystemExit):
            extract_features.parse_args(base + bad)
    with pytest.raises(SystemExit):  # required
        extract_features.parse_args(["--data_path", "in"])


def test_evaluate_flags():
    args = evaluate.parse_args(["--samples", "s.npz", "--ref-npz", "r.npz"])
    assert isinstance(args, EvaluateConfig) and args.ref_npz == "r.npz" and args.features is None
    with pytest.raises(UserError, match="--ref_npz"):
        evaluate.parse_args(["--samples", "s.npz", "--ref_npz", "r.npz", "--dataset", "digits"])
    with pytest.raises(UserError, match="--features"):
        evaluate.parse_args(["--samples", "s.npz", "--features", "clip"])


@pytest.mark.parametrize("configs", [[TrainConfig, ModelConfig], [SampleConfig, ModelConfig],
                                     [SampleDDPConfig, ModelConfig], [EvaluateConfig], [ExtractConfig]])
def test_help_shows_every_default(configs):
    parser = make_parser("", *configs)
    text = parser.format_help()
    assert "(default: None)" not in text and "default: ==SUPPRESS==" not in text
    for action in parser._actions:
        if action.dest == "help":
            continue
        cls = next(c for c in configs if action.dest in {f.name for f in fields(c)})
        field = next(f for f in fields(cls) if f.name == action.dest)
        if field.default is None:  # derived values say how in their text
            assert "None:" in action.help, action.dest
        elif not action.required:
            assert f"(default: {field.default!r})" in action.help or f"(default: {field.default})" in action.help
    if TrainConfig in configs:
        assert "--max_steps" in text and "(default: 1000)" in text


#################################################################################
#                                  Validation                                   #
#################################################################################

@pytest.mark.parametrize("config, message", [
    (SampleConfig(budget=-5), r"--budget: must be >= 1 \(got -5\)"),
    (SampleConfig(fixed_point_iters=0), "--fixed_point_iters: must be >= 1"),
    (SampleConfig(num_sampling_steps=0), "--num_sampling_steps"),
    (SampleConfig(cfg_scale=float("nan")), "--cfg_scale"),
    (SampleConfig(cfg_channels="x"), "--cfg_channels"),
    (SampleConfig(iteration_schedule="random"), "--iteration_schedule"),
    (SampleConfig(fixed_point_tol=0.0), "--fixed_point_tol"),
    (TrainConfig(max_steps=0), "--max_steps: must be >= 1"),
    (TrainConfig(log_with="comet"), "--log_with"),
    (TrainConfig(dataset="mnist"), "--dataset"),
    (TrainConfig(lr=0), "--lr"),
    (ModelConfig(fixed_point=True, fixed_point_pre_depth=-1), "--fixed_point_pre_depth"),
    (ModelConfig(fixed_point=True, fixed_point_no_grad_min_iters=4, fixed_point_no_grad_max_iters=3),
     "--fixed_point_no_grad_max_iters: must be >= --fixed_point_no_grad_min_iters 4"),
    (ModelConfig(fixed_point=True, fixed_point_with_grad_min_iters=0), "--fixed_point_with_grad_min_iters"),
    (ModelConfig(fixed_point=True, fixed_point_with_grad_min_iters=13), "--fixed_point_with_grad_max_iters"),
    (ModelConfig(noise_schedule="sqrt"), "--noise_schedule"),
    (ModelConfig(predict_v=True, predict_xstart=True), "--predict_xstart"),
    (ExtractConfig(data_path="a", features_path="b", chunk_size=0), "--chunk_size"),
])
def test_validate_names_the_flag(config, message):
    with pytest.raises(UserError, match=message):
        config.validate()


def test_defaults_are_valid_and_fixed_point_defaults_to_false():
    for config in (ModelConfig(), TrainConfig(), SampleConfig(), SampleDDPConfig(), EvaluateConfig(),
                   ExtractConfig()):
        config.validate()
    assert ModelConfig().fixed_point is False and issubclass(UserError, ValueError)
    assert TrainConfig().max_steps == 1000 and TrainConfig(max_steps=None).validate().max_steps is None


#################################################################################
#                                   Presets                                     #
#################################################################################

@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_presets_load_and_validate(path):
    model_config, train_config, _, given = train.parse_configs(["--config", str(path)])
    assert given and train_config.config == str(path)
    assert model_config.predict_v and model_config.use_zero_terminal_snr and model_config.learn_sigma


def test_shipped_presets_hold_the_recipes():
    digits, digits_train, _, _ = train.parse_configs(["--config", str(REPO / "configs" / "digits.yaml")])
    assert digits.fixed_point and (digits.fixed_point_pre_depth, digits.fixed_point_post_depth) == (1, 1)
    assert (digits.fixed_point_no_grad_min_iters, digits.fixed_point_no_grad_max_iters) == (0, 3)
    assert (digits.fixed_point_with_grad_min_iters, digits.fixed_point_with_grad_max_iters) == (1, 3)
    assert (digits_train.lr, digits_train.global_batch_size, digits_train.max_steps) == (1e-3, 64, 1778)
    for name, fixed_point in (("imagenet256_fpdm_xl2", True), ("imagenet256_dit_xl2", False)):
        model, config, _, _ = train.parse_configs(["--config", str(REPO / "configs" / f"{name}.yaml")])
        assert model.fixed_point is fixed_point and model.model == "DiT-XL/2" and model.image_size == 256
        assert model.latent and model.num_classes == 1000 and config.dataset == "latents"
        assert (config.global_batch_size, config.lr, config.max_steps, config.ema_warmup) == (512, 1e-4, 400000, False)
        if fixed_point:
            assert model.fixed_point_no_grad_max_iters == model.fixed_point_with_grad_max_iters == 12


def test_command_line_overrides_the_preset():
    path = str(REPO / "configs" / "digits.yaml")
    model, config, _, given = train.parse_configs(["--config", path, "--lr", "0.5", "--deq_pre_depth", "2",
                                                   "--max_steps", "None"])
    assert config.lr == 0.5 and config.max_steps is None and model.fixed_point_pre_depth == 2
    assert model.fixed_point and "fixed_point" in given  # preset values count as given


def test_preset_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 1e-3\nlearning_rate: 0.1\n")
    with pytest.raises(UserError, match=r"bad\.yaml.*'learning_rate'"):
        train.parse_configs(["--config", str(bad)])
    bad.write_text("global_batch_size: many\n")
    with pytest.raises(UserError, match=r"bad\.yaml: global_batch_size: expected int"):
        load_preset(bad, ModelConfig, TrainConfig)
    bad.write_text("- a list\n")
    with pytest.raises(UserError, match="bad.yaml"):
        load_preset(bad, ModelConfig, TrainConfig)
    assert load_preset(_write(tmp_path / "ok.yaml", "lr: 1e-3\nfixed_point: yes\nmax_steps: null\n"),
                       ModelConfig, TrainConfig) == {"lr": 1e-3, "fixed_point": True, "max_steps": None}
    with pytest.raises(FileNotFoundError):
        train.parse_configs(["--config", str(tmp_path / "missing.yaml")])


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


#################################################################################
#                                    cli.py                                     #
#################################################################################

def _run_script(tmp_path: Path, body: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"
    script.write_text("import cli, config, errno\n" + body)
    environment = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK")}
    environment.update(PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=environment,
                          timeout=120)


@pytest.mark.parametrize("raise_line, expected", [
    ("raise config.UserError('--budget: must be >= 1 (got -5)\\nsecond line')",
     "error: --budget: must be >= 1 (got -5) second line\n"),
    ("open('/nonexistent/file.pt')", "error: No such file or directory: /nonexistent/file.pt\n"),
    ("raise OSError(errno.ENOSPC, 'No space left on device', 'out.png')",
     "error: No space left on device: out.png\n"),
])
def test_cli_prints_one_line_and_exits_2(tmp_path, raise_line, expected):
    result = _run_script(tmp_path, f"def main():\n    {raise_line}\ncli.run(main)\n")
    assert result.returncode == 2 and result.stderr == expected and result.stdout == ""


def test_cli_prints_on_rank_0_only_and_keeps_tracebacks_of_bugs(tmp_path):
    body = "def main():\n    raise config.UserError('bad flag')\ncli.run(main)\n"
    assert _run_script(tmp_path, body, {"RANK": "0"}).stderr == "error: bad flag\n"
    other = _run_script(tmp_path, body, {"RANK": "1", "LOCAL_RANK": "1"})
    assert other.returncode == 2 and other.stderr == ""
    bug = _run_script(tmp_path, "def main():\n    raise KeyError('oops')\ncli.run(main)\n")
    assert bug.returncode == 1 and "Traceback" in bug.stderr and "KeyError" in bug.stderr
    ok = _run_script(tmp_path, "def main():\n    print('done')\ncli.run(main)\n")
    assert ok.returncode == 0 and ok.stdout == "done\n"


def test_scripts_report_user_errors_in_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "--budget_typo", "1"], capture_output=True,
                            text=True, env=env, timeout=120, cwd=tmp_path)
    assert result.returncode == 2 and "unrecognized arguments" in result.stderr  # argparse's own error
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "--lr", "-1"], capture_output=True, text=True,
                            env=env, timeout=120, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr == "error: --lr: must be > 0 (got -1.0)\n"
    result = subprocess.run([sys.executable, str(REPO / "sample.py"), "--budget", "-5"], capture_output=True,
                            text=True, env=env, timeout=120, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr == "error: --budget: must be >= 1 (got -5)\n"


def test_digits_preset_is_the_recipe_of_the_shipped_fpdm():
    """The README's main job (configs/digits.yaml) trains exactly the recipe whose EMA weights ship as
    pretrained/fpdm-digits.safetensors (its train.py command is in RESULTS.md); benchmarks/default_run.py
    measures what it reaches."""
    from checkpoint import BUNDLED_CHECKPOINT, load_safetensors
    repo = Path(__file__).resolve().parents[1]
    preset = load_preset(str(repo / "configs" / "digits.yaml"), ModelConfig, TrainConfig)
    _, shipped = load_safetensors(BUNDLED_CHECKPOINT)
    assert build_config(ModelConfig, preset) == shipped
    import shlex
    import train
    command = next(line for line in (repo / "RESULTS.md").read_text().splitlines()
                   if line.startswith("python train.py") and "--fixed_point True" in line)
    recorded_model, recorded_train, _, _ = train.parse_configs(shlex.split(command)[2:])
    train_config = build_config(TrainConfig, preset)
    assert recorded_model == shipped
    assert (train_config.lr, train_config.global_batch_size, train_config.max_steps) == \
        (recorded_train.lr, recorded_train.global_batch_size, recorded_train.max_steps)
    assert train_config.dataset == "digits" and train_config.global_seed == recorded_train.global_seed


def test_unwritable_output_folders_are_refused_before_any_work(tmp_path):
    import cli
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cli.check_writable_folder(tmp_path / "new" / "deeper", "--output_dir")  # can be created: fine
    assert not (tmp_path / "new").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
    for bad in (a_file, a_file / "sub"):
        with pytest.raises(UserError, match="--output_dir .*is a file, not a folder"):
            cli.check_writable_folder(bad, "--output_dir")
    with pytest.raises(UserError, match="--output_dir .*cannot write"):
        cli.check_writable_folder("/proc/fpdm-test", "--output_dir")
    started = time.time()
    result = subprocess.run([sys.executable, str(REPO / "sample.py"), "--output_dir", str(a_file)],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: --output_dir {a_file}: {a_file} is a file, not a folder"]
    assert time.time() - started < 60  # refused before sampling 16 images x 250 steps
