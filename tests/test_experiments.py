"""experiments/: every script's --quick mode runs end to end into a temporary folder and writes sane JSON + PNG.

The quick models (3 training steps each) are trained once into a shared session folder and reused by every script;
the digits classifier is copied from experiments/results/ when it is committed (else trained once, ~10 s).
"""
import importlib
import json
import math
import shutil
from pathlib import Path

import pytest

from config import UserError
from cost import training_units_per_step
from experiments import common, exp7_prepost, summarize


@pytest.fixture(scope="session")
def quick_dir(tmp_path_factory):
    """A shared --out_dir (quick models trained once) with a private copy of the digits classifier."""
    folder = tmp_path_factory.mktemp("experiments")
    if common.CLASSIFIER_PATH.is_file():
        shutil.copyfile(common.CLASSIFIER_PATH, folder / "classifier.safetensors")
    return folder


def run_quick(name: str, folder: Path, *extra: str) -> dict:
    """Run experiments/<name>.py --quick in-process and return its JSON."""
    module = importlib.import_module(f"experiments.{name}")
    module.main(["--quick", "--out_dir", str(folder), "--classifier", str(folder / "classifier.safetensors"),
                 *extra])
    assert (folder / f"{name}.png").is_file(), f"{name}.png not written"
    return json.loads((folder / f"{name}.json").read_text())


def assert_fid_record(record: dict) -> None:
    """A digits-FID evaluation: finite non-negative FID, accuracy in [0, 1], never over budget."""
    assert math.isfinite(record["fid_mean"]) and record["fid_mean"] >= 0
    assert 0.0 <= record["accuracy_mean"] <= 1.0
    assert record["within_budget"] and record["blocks_per_image_max"] <= record["planned_blocks_per_image"]


def test_training_units_count_forward_and_backward():
    dit = common.digits_model(False)
    fpdm = common.digits_model(True, (0, 3, 1, 3))
    assert training_units_per_step(dit) == 24.0            # 8 blocks x (1 fwd + 2 bwd)
    assert training_units_per_step(fpdm) == 6 + 1.5 + 6.0  # 3 x (pre + post) + E[n] + 3 E[m]
    assert common.steps_for_units(24.0 * 9, fpdm) == 16


def test_iteration_grid_keeps_iterations_that_fit_one_step():
    fpdm = common.digits_model(True, pre_post=2)  # a step costs 2 + k + 2 blocks (cost.blocks_per_step)
    assert common.fpdm_iteration_grid(fpdm, 8, [1, 2, 4, 5, 6]) == [1, 2, 4]


def test_flags_parse_into_the_script_config(tmp_path):
    config, run = common.start("exp3_smoothing", importlib.import_module("experiments.exp3_smoothing").Exp3Config,
                               "doc", ["--quick", "--out_dir", str(tmp_path), "--iters", "1,2", "--ddim"],
                               full={"budget": 80, "iters": "9", "seeds": 2, "num_samples": 1000},
                               quick={"budget": 16, "iters": "9", "seeds": 1, "num_samples": 16})
    assert config.quick and config.ddim and config.budget == 16 and config.iters == "1,2" and config.seeds == 1
    assert run.out_dir == tmp_path and run.command.startswith("python -m experiments.exp3_smoothing --quick")
    with pytest.raises(UserError, match="--budget"):
        common.start("exp3_smoothing", type(config), "doc", ["--budget", "0", "--out_dir", str(tmp_path)], {}, {})
    with pytest.raises(UserError, match="--iters"):
        common.int_list("1,x", "iters")


def test_shipped_fpdm_matches_the_exp1_recipe():
    record = exp7_prepost.check_exp1_recipe(1e-3)
    assert record["recipe_matches_exp1"] and record["train"]["steps"] == 1778
    with pytest.raises(UserError, match="lr"):
        exp7_prepost.check_exp1_recipe(1e-4)


def test_summarize_reads_the_recorded_results(capsys):
    summarize.main(["--out_dir", str(common.DEFAULT_OUT_DIR)])
    printed = capsys.readouterr().out
    assert "not run" not in printed and printed.count("## exp") == 7


def test_exp1_equal_compute(quick_dir):
    result = run_quick("exp1_equal_compute", quick_dir)
    dit, fpdm = result["models"]["dit"], result["models"]["fpdm"]
    assert fpdm["num_params"] < dit["num_params"]
    assert abs(dit["total_units"] - fpdm["total_units"]) <= fpdm["units_per_step"]  # equal compute up to a step
    assert all(math.isfinite(m["final_loss"]) for m in (dit, fpdm))
    assert (quick_dir / "pretrained" / "fpdm-digits.safetensors").is_file()  # quick mode never touches pretrained/


def test_exp2_table1(quick_dir):
    result = run_quick("exp2_table1", quick_dir)
    assert {r["sampler"] for r in result["rows"]} == {"ddpm", "ddim"}
    for row in result["rows"]:
        assert_fid_record(row["DiT"])
        assert_fid_record(row["FPDM"])
        assert row["FPDM"]["planned_blocks_per_image"] == row["budget"]
        assert row["FPDM"]["best_iters"] in [s["iters"] for s in row["fpdm_search"]]


def test_exp2_table1_with_a_modern_solver(tmp_path):
    result = run_quick("exp2_table1", tmp_path, "--samplers", "dpm++2m")
    assert [r["sampler"] for r in result["rows"]] == ["dpm++2m"]
    assert result["rows"][0]["FPDM"]["planned_blocks_per_image"] == result["rows"][0]["budget"]
    with pytest.raises(UserError, match="--samplers"):
        run_quick("exp2_table1", tmp_path, "--samplers", "ddpm,heun")


def test_exp8_samplers(quick_dir):
    from experiments.exp8_samplers import SETTINGS
    result = run_quick("exp8_samplers", quick_dir)
    assert [r["label"] for r in result["rows"]] == [s[0] for s in SETTINGS] + ["ddpm-4"]
    assert {r["sampler"] for r in result["rows"]} == {"ddpm", "ddim", "dpm++2m", "unipc", "euler"}
    for row in result["rows"]:
        assert_fid_record(row)
        assert row["num_steps"] == (4 if row["label"] == "ddpm-4" else 3)


def test_exp3_smoothing(quick_dir):
    result = run_quick("exp3_smoothing", quick_dir)
    steps = [p["num_steps"] for p in result["fpdm"]]
    assert steps == sorted(steps, reverse=True) and len(steps) >= 2  # more iterations -> fewer timesteps
    for point in result["fpdm"]:
        assert_fid_record(point)
    assert_fid_record(result["dit"])


def test_exp4_reuse(quick_dir):
    result = run_quick("exp4_reuse", quick_dir)
    for row in result["sweep"]:
        assert_fid_record(row["reuse"])
        assert_fid_record(row["no_reuse"])
    for key in ("reuse", "no_reuse"):
        assert len(result["diagnostics"][key]["delta_mean"]) == len(result["diagnostics"][key]["timesteps"])
    assert 0.0 <= result["fraction_timesteps_reuse_lowers_delta"] <= 1.0
    assert (quick_dir / "exp4_reuse_delta_reuse.json").is_file()


def test_exp5_sjfb(quick_dir):
    result = run_quick("exp5_sjfb", quick_dir)
    variants = result["variants"]
    assert len(variants) == 3
    units = [v["train"]["steps"] * v["units_per_step"] for v in variants.values()]
    assert max(units) - min(units) <= max(v["units_per_step"] for v in variants.values())
    for variant in variants.values():
        assert_fid_record(variant)


def test_exp6_anderson(quick_dir):
    result = run_quick("exp6_anderson", quick_dir)
    for row in result["rows"]:
        assert_fid_record(row["iteration"])
        assert_fid_record(row["anderson"])
        assert row["iteration"]["blocks_per_image_max"] == row["anderson"]["blocks_per_image_max"]  # equal budget


def test_exp7_prepost(quick_dir):
    result = run_quick("exp7_prepost", quick_dir)
    models = result["models"]
    assert set(models) == {"0", "1", "2"}
    params = [models[d]["num_params"] for d in ("0", "1", "2")]
    assert params == sorted(params) and len(set(params)) == 3  # each pre/post pair adds two blocks
    units = [models[d]["total_units"] for d in ("0", "2")]  # equal training compute up to a step
    assert abs(units[0] - units[1]) <= max(models[d]["units_per_step"] for d in ("0", "2"))
    command = models["0"]["train"]["command"]
    assert command.startswith("python train.py") and "--fixed_point_pre_depth 0" in command
    for depth, model in models.items():
        for row in model["rows"]:
            assert_fid_record(row)
            assert row["planned_blocks_per_image"] == row["budget"]
            assert row["best_iters"] in [s["iters"] for s in row["search"]]
    assert set(result["best_pre_post_per_budget"].values()) <= {0, 1, 2}


def test_a_finished_training_run_is_reused_and_a_different_one_refused(tmp_path):
    from dataclasses import replace
    model_config = common.digits_model(fixed_point=True, sjfb=(0, 1, 1, 1))
    train_config = common.digits_training("fpdm", 2, lr=1e-3, runs_dir=tmp_path, sample_grid=False)
    first = common.train_digits_model(model_config, train_config)
    weights = (tmp_path / "fpdm" / "ema.safetensors").read_bytes()
    again = common.train_digits_model(model_config, train_config)  # an interrupted sweep, run again
    assert again["reused_run"] and not first["reused_run"] and again["wall_clock_s"] == first["wall_clock_s"]
    assert (tmp_path / "fpdm" / "ema.safetensors").read_bytes() == weights and again["loss_curve"] == first["loss_curve"]
    with pytest.raises(UserError, match="already holds a run"):  # same folder, other recipe: never overwritten
        common.train_digits_model(model_config, replace(train_config, lr=5e-4))
