"""experiments/sweep.py and experiments/claims.py: the resumable sweep at the paper's settings writes one JSON per
(experiment, dataset, configuration, training seed), skips finished jobs, resumes interrupted training bit-exactly,
and claims.py turns the files into claims.json and RESULTS.md's summary block."""
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from config import UserError
from cost import training_units_per_step
from experiments import claims, common, sweep


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A --quick sweep on digits: Table 1 and its smoothing sweep with 2 training seeds, Table 5 and Fig. 7 with 1."""
    out = tmp_path_factory.mktemp("sweep")
    first = sweep.main(["--quick", "--out_dir", str(out), "--datasets", "digits", "--experiments",
                        "table1,smoothing", "--training_seeds", "0,1"])
    sweep.main(["--quick", "--out_dir", str(out), "--datasets", "digits", "--experiments", "table5,prepost",
                "--training_seeds", "0"])
    return out, first


def test_one_json_per_job_with_the_papers_settings(swept):
    out, first = swept
    assert len(first["written"]) == 2 * 2 + 2  # (DiT, FPDM) x 2 seeds, then smoothing on both FPDMs
    fpdm = json.loads((out / "sweep/table1/digits/fpdm/seed1.json").read_text())
    run_dir = Path(fpdm["train"]["run_dir"])  # outside a repository: relative to the record's folder
    assert not run_dir.is_absolute() and (out / "sweep/table1/digits/fpdm" / run_dir / "ema.safetensors").is_file()
    assert fpdm["training_seed"] == 1 and fpdm["train"]["config"]["train"]["global_seed"] == 1
    assert (fpdm["settings"]["N"], fpdm["settings"]["M"]) == (12, 12)  # paper Sec. 4.1
    row = fpdm["evaluation"]["rows"][0]
    # FLOP-matched: the FPDM's plan never costs more GMACs than the DiT's budget, block-matched never more blocks
    assert row["flop_matched"]["planned_gmacs_per_image"] <= row["budget_gmacs"] + 1e-9
    assert row["block_matched"]["planned_blocks_per_image"] <= row["budget_blocks"]
    for matching in ("block_matched", "flop_matched"):  # metrics.py's fidelity and coverage beside FID
        assert all(0.0 <= row[matching][f"{name}_mean"] <= 1.0 for name in ("precision", "recall"))
    names = sorted(p.name for p in (out / "sweep/table5/digits").iterdir())
    assert names == sorted(["N6-jfb", "N6-multistep", "N6-sjfb", "N12-jfb", "N12-multistep", "N12-sjfb"])
    bounds = {n: json.loads((out / f"sweep/table5/digits/{n}/seed0.json").read_text())["settings"] for n in names}
    assert (bounds["N6-jfb"]["m_min"], bounds["N6-jfb"]["M"]) == (1, 1)
    assert (bounds["N12-multistep"]["m_min"], bounds["N12-multistep"]["M"]) == (12, 12)
    assert sorted(p.name for p in (out / "sweep/prepost/digits").iterdir()) == [f"prepost{p}" for p in (0, 1, 2, 4)]
    assert not list(out.glob("sweep/**/*.lock"))


def test_equal_training_compute_within_an_experiment(swept):
    out, _ = swept
    units = [json.loads(p.read_text())["settings"]["training_units_per_image"]
             for p in (out / "sweep/table5/digits").glob("*/seed0.json")]
    per_step = max(json.loads(p.read_text())["settings"]["units_per_step"]
                   for p in (out / "sweep/table5/digits").glob("*/seed0.json"))
    assert max(units) - min(units) <= per_step  # equal up to rounding to whole steps


def test_a_second_run_skips_finished_jobs(swept):
    out, _ = swept
    again = sweep.main(["--quick", "--out_dir", str(out), "--datasets", "digits", "--experiments", "table1",
                        "--training_seeds", "0,1"])
    assert again["written"] == [] and len(again["already_there"]) == 4


def test_a_live_workers_lock_is_respected_and_a_dead_ones_taken_over(tmp_path):
    lock = tmp_path / "job.lock"
    assert sweep.claim(lock) and not sweep.claim(lock)  # held by this (live) process
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(f"{os.uname().nodename} {int(finished.stdout)}")
    assert sweep.claim(lock) and lock.read_text().endswith(str(os.getpid()))


def test_unknown_experiment_or_bad_seed_list_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="--experiments"):
        sweep.main(["--quick", "--out_dir", str(tmp_path), "--experiments", "table9"])
    with pytest.raises(UserError, match="--training_seeds"):
        sweep.main(["--quick", "--out_dir", str(tmp_path), "--training_seeds", "1,x"])
    with pytest.raises(UserError, match="--configurations: expected a comma list of dit12, dit28, dit4, dit8, fpdm"):
        sweep.main(["--quick", "--out_dir", str(tmp_path), "--experiments", "depth", "--configurations", "dit5"])


def test_configurations_picks_jobs_in_run_order(tmp_path):
    config = sweep.SweepConfig(quick=True, experiments="depth", datasets="digits,mnist5k", training_seeds="0,1",
                               configurations="dit28,fpdm")
    picked = [(job.dataset, job.seed, job.name) for job in sweep.jobs(config, tmp_path)]
    assert picked == [(d, s, n) for d in ("mnist5k", "digits") for s in (0, 1) for n in ("fpdm", "dit28")]


def test_solvers_compares_every_setting_with_the_ddpm_reference(swept):
    """The solvers experiment samples table1's trained DiT under every setting at 3 steps and DDPM at 4 (quick)."""
    out, _ = swept
    sweep.main(["--quick", "--out_dir", str(out), "--datasets", "digits", "--experiments", "solvers",
                "--training_seeds", "0"])
    result = json.loads((out / "sweep/solvers/digits/dit/seed0.json").read_text())["evaluation"]
    assert [r["label"] for r in result["rows"]] == [s[0] for s in sweep.SOLVER_SETTINGS] + ["ddpm-4"]
    assert {r["sampler"] for r in result["rows"]} == {"ddpm", "ddim", "dpm++2m", "unipc", "euler"}
    assert all(r["num_steps"] == (4 if r["label"] == "ddpm-4" else 3) and r["within_budget"] for r in result["rows"])
    assert result["best"] == min(result["rows"][:-1], key=lambda r: r["fid_mean"])["label"]


def test_a_sampling_only_job_trains_its_model_when_no_trainer_will(tmp_path):
    """A fresh clone holds table1's committed result but no run folder: solvers trains the DiT itself (unless a
    live worker holds the trainer's lock) instead of waiting forever for a job that never runs again."""
    args = ["--quick", "--out_dir", str(tmp_path), "--datasets", "digits", "--training_seeds", "0"]
    trainer_lock = tmp_path / "sweep/table1/digits/dit/seed0.lock"
    trainer_lock.parent.mkdir(parents=True)
    trainer_lock.write_text(f"{sweep.socket.gethostname()} {os.getpid()}")  # a live worker trains it
    assert sweep.main([*args, "--experiments", "solvers"])["written"] == []
    trainer_lock.unlink()
    assert sweep.main([*args, "--experiments", "solvers"])["written"] == ["solvers/digits/dit/seed0"]
    assert not trainer_lock.exists()
    assert not (tmp_path / "sweep/table1/digits/dit/seed0.json").exists()  # trained, not evaluated as table1


def test_a_finished_training_run_is_reused_and_a_different_one_refused(tmp_path):
    model = sweep.base_model("digits")
    train = sweep.training_config("table1", "digits", "fpdm", 0, model, tmp_path, quick=True)
    run_dir = Path(train.output_dir) / train.output_subdir
    first = common.train_digits_model(model, train)
    weights = (run_dir / "ema.safetensors").read_bytes()
    again = common.train_digits_model(model, train)  # an interrupted sweep, run again
    assert again["reused_run"] and not first["reused_run"] and again["wall_clock_s"] == first["wall_clock_s"]
    assert (run_dir / "ema.safetensors").read_bytes() == weights and again["loss_curve"] == first["loss_curve"]
    with pytest.raises(UserError, match="already holds a run"):  # same folder, other recipe: never overwritten
        common.train_digits_model(model, replace(train, lr=5e-4))
    recorded = json.loads((run_dir / "config.json").read_text())
    del recorded["train"]["sample_grid_sampler"]  # a run recorded before the field existed ran with its default
    (run_dir / "config.json").write_text(json.dumps(recorded))
    assert common.finished_run(model, train) == run_dir
    assert common.finished_run(model, replace(train, sample_grid_sampler="unipc")) is None


def test_interrupted_training_resumes_bit_exactly(tmp_path):
    model = sweep.base_model("digits")
    train = replace(sweep.training_config("table1", "digits", "run", 0, model, tmp_path / "a", quick=True),
                    output_dir=str(tmp_path / "a"), max_steps=4, ckpt_every=2)
    full = common.run_training(model, train)
    interrupted = common.run_training(model, replace(train, output_dir=str(tmp_path / "b")))
    # make run b look as if it was killed after its step-2 checkpoint
    (interrupted / "summary.json").unlink()
    for name in ("0000004.pt", "latest.pt"):
        (interrupted / "checkpoints" / name).unlink()
    os.link(interrupted / "checkpoints" / "0000002.pt", interrupted / "checkpoints" / "latest.pt")
    assert common.finished_run(model, replace(train, output_dir=str(tmp_path / "b"))) is None
    resumed = common.run_training(model, replace(train, output_dir=str(tmp_path / "b")))
    a, b = (torch.load(d / "checkpoints" / "latest.pt", weights_only=True) for d in (full, resumed))
    assert a["step"] == b["step"] == 4
    for key in a["ema"]:
        assert torch.equal(a["ema"][key], b["ema"][key]), key
    assert common.finished_run(model, replace(train, output_dir=str(tmp_path / "b"))) == resumed


def test_claims_json_and_results_block(swept, tmp_path):
    out, _ = swept
    markdown = tmp_path / "RESULTS.md"
    markdown.write_text(f"# Results\n\nbefore\n\n{claims.BEGIN}\nstale\n{claims.END}\n\nafter\n")
    produced = claims.main(["--results_dir", str(out), "--results_md", str(markdown), "--include_quick", "True"])
    written = json.loads((out / "claims.json").read_text())["claims"]
    assert [c["id"] for c in written] == [c["id"] for c in produced]
    by_id = {c["id"]: c for c in written}
    for cid in ("table1_block_matched", "table1_flop_matched", "fig4_smoothing", "fig6a_reuse", "table5_sjfb",
                "fig7_prepost", "params", "memory"):
        claim = by_id[cid]
        assert {"claim", "paper", "ours", "settings", "verdict", "files"} <= set(claim)
        assert all(v in ("agrees", "partly", "disagrees", "not measured") for v in claim["verdict"].values()), cid
    cell = by_id["table1_block_matched"]["ours"]["digits"][0]
    assert cell["fpdm_fid"]["n"] == 2 and cell["welch_p"] is not None  # two training seeds: a Welch test
    assert by_id["table1_block_matched"]["settings"]["digits"]["fpdm"]["training_seeds"] == [0, 1]
    text = markdown.read_text()
    assert "stale" not in text and text.startswith("# Results\n\nbefore") and text.rstrip().endswith("after")
    assert text.count("| FPDM beats DiT") == 2  # block- and FLOP-matched, on digits
    for figure in ("sweep_table1_digits.png", "sweep_loss_table5_digits.png", "sweep_loss_prepost_digits.png"):
        assert (out / figure).is_file(), figure


def test_a_model_that_samples_non_finite_values_is_recorded_and_left_out_of_the_means(tmp_path, monkeypatch):
    """A diverged training (IFT seed 1 on digits) is a result: the job writes its JSON instead of crashing the
    worker, and claims.py lists it and averages only the finite seeds."""
    from sampling import NonFiniteError

    def diverged(job, record, config):
        if job.seed == 1:
            raise NonFiniteError("the model output is not finite (NaN or inf) at timestep 3")
        return finite(job, record, config)

    finite = sweep.EVALUATIONS["table1"]
    monkeypatch.setitem(sweep.EVALUATIONS, "table1", diverged)
    written = sweep.main(["--quick", "--out_dir", str(tmp_path), "--datasets", "digits", "--experiments", "table1",
                          "--configurations", "fpdm", "--training_seeds", "0,1"])["written"]
    assert written == ["table1/digits/fpdm/seed0", "table1/digits/fpdm/seed1"]
    record = json.loads((tmp_path / "sweep/table1/digits/fpdm/seed1.json").read_text())
    assert record["evaluation"] == {"non_finite": "the model output is not finite (NaN or inf) at timestep 3"}
    read = claims.Sweep.read(tmp_path, include_quick=True)
    assert [r["training_seed"] for r in read.get("table1", "digits", "fpdm")] == [0]
    assert [(r["configuration"], r["training_seed"]) for r in read.non_finite] == [("fpdm", 1)]
    assert "table1 digits fpdm seed 1" in claims.markdown(claims.all_claims(read), None, read.non_finite)


def test_export_ships_seed_0_and_checks_it(swept):
    out, _ = swept
    from experiments import export_models
    record = export_models.main(["--quick", "--out_dir", str(out), "--dataset", "digits"])
    for name in ("dit", "fpdm"):
        model = record["models"][name]
        assert Path(model["exported_to"]) == out / "pretrained" / f"{name}-digits.safetensors"
        assert model["run_dir"].endswith(f"table1/digits/{name}-seed0")
        assert 0.0 <= model["sample_py"]["accuracy"] <= 1.0 and Path(model["sample_py"]["grid"]).is_file()
        assert common.load(model["exported_to"]).config.fixed_point == (name == "fpdm")
        from safetensors import safe_open  # the file itself holds fp16 weights
        with safe_open(model["exported_to"], framework="pt") as handle:
            assert all(handle.get_tensor(k).dtype == torch.float16 for k in handle.keys()
                       if handle.get_tensor(k).is_floating_point())
    written = json.loads((out / "export_digits.json").read_text())["models"]["fpdm"]
    assert written["exported_to"] == "pretrained/fpdm-digits.safetensors"  # relative to the record's folder


def test_export_refuses_an_untrained_dataset(tmp_path):
    from experiments import export_models
    with pytest.raises(UserError, match="not a finished run"):
        export_models.main(["--quick", "--out_dir", str(tmp_path), "--dataset", "mnist5k"])
    with pytest.raises(UserError, match="--experiment: must be one of table1, depth"):
        export_models.main(["--quick", "--out_dir", str(tmp_path), "--experiment", "prepost"])
    with pytest.raises(UserError, match="run python -m experiments.sweep --experiments depth --datasets digits"):
        export_models.main(["--quick", "--out_dir", str(tmp_path), "--dataset", "digits", "--experiment", "depth"])


def test_welch_comparison_and_verdicts():
    clear = claims.compare([1.0, 1.1, 0.9], [5.0, 5.2, 4.8])
    assert clear["a_better"] and clear["exceeds_spread"] and claims.winner(clear, "A", "B") == "A"
    noisy = claims.compare([1.0, 3.0, 2.0], [2.5, 1.5, 2.2])
    assert noisy["exceeds_spread"] is False and claims.winner(noisy, "A", "B") == "tie"
    assert claims.compare([1.0], [2.0])["welch_p"] is None
    assert claims.fmt(claims.spread([2.0])) == "2.00 (n=1)"  # one seed shows no spread, not "± 0.00"
    assert claims.fmt(claims.spread([1.0, 3.0]), 1) == "2.0 ± 1.4 (n=2)"
    assert [claims.verdict(m) for m in ([True, True], [True, False], [False], [])] == [
        "agrees", "partly", "disagrees", "not measured"]
    # Table 1: matching only the paper's one DiT win (DDIM at 560) is no support for FPDM
    cells = [{"paper_winner": "FPDM", "winner": "DiT"}] * 5 + [{"paper_winner": "DiT", "winner": "DiT"}]
    assert claims.table1_verdict(cells) == "disagrees"
    cells[0] = {"paper_winner": "FPDM", "winner": "FPDM"}
    assert claims.table1_verdict(cells) == "partly"
    cells = [{"paper_winner": "FPDM", "winner": "FPDM"}] * 5 + [{"paper_winner": "DiT", "winner": "tie"}]
    assert claims.table1_verdict(cells) == "partly"
    cells[-1] = {"paper_winner": "DiT", "winner": "DiT"}
    assert claims.table1_verdict(cells) == "agrees"


def test_crossover_is_measured_extrapolated_or_not_approaching():
    def level(fpdm: float, dit: float, spread: float = 0.1):
        return claims.compare([fpdm - spread, fpdm, fpdm + spread], [dit - spread, dit, dit + spread])

    closing = [(1e4, level(4.0, 1.0)), (1e5, level(2.0, 1.0))]  # the ratio halves per decade: 1 at 1e6
    cross = claims.crossover(closing)
    assert cross["status"] == "extrapolated" and cross["units"] == pytest.approx(1e6)
    assert claims.crossover(closing + [(1e6, level(0.5, 1.0))]) | {"ratios": None} == {
        "status": "measured", "units": 1e6, "measured_at": 1e6, "ratios": None}
    tied = closing + [(1e6, level(0.99, 1.0, spread=0.5))]  # ahead within the spread: not a measured crossing
    assert claims.crossover(tied)["status"] == "extrapolated"
    assert claims.crossover([(1e4, level(2.0, 1.0)), (1e5, level(3.0, 1.0))])["status"] == "not approaching"
    assert claims.crossover(closing[:1])["status"] == "one level"
    slowing = closing + [(1e6, level(1.5, 1.0))]  # the fall slows: the last two levels cross later than all three
    cross = claims.crossover(slowing)
    assert cross["status"] == "extrapolated" and cross["units"] < cross["units_last_two"]
    assert cross["units_last_two"] == pytest.approx(1e6 * 1.5 ** (1 / math.log10(4 / 3)), rel=1e-6)
    stalled = closing + [(1e6, level(2.5, 1.0))]  # still falling overall, rising over the last two levels
    assert claims.crossover(stalled)["status"] == "extrapolated" and claims.crossover(stalled)["units_last_two"] is None


def test_units_are_written_in_k_m_or_as_a_power_of_ten():
    assert [claims.units_text(u) for u in (67_200, 1.2e6, 537.6e6, 4.2e16)] == ["67k", "1.2M", "538M", "4.2e+16"]


def test_sweep_compute_is_counted_in_dit_steps():
    dit, fpdm = sweep.dit_model("mnist5k"), sweep.base_model("mnist5k")
    assert training_units_per_step(dit) == 24 and training_units_per_step(fpdm) == 3 * 2 + 6 + 3 * 6.5
    train = sweep.training_config("table1", "mnist5k", "fpdm", 0, fpdm, Path("/tmp/unused"), quick=False)
    assert train.max_steps == round(2000 * 24 / 31.5)


def test_no_sweep_run_is_stopped_by_its_epochs(tmp_path):
    """Every job trains its max_steps (the compute its record counts): one step per epoch would still reach it."""
    config = sweep.SweepConfig(experiments="depth_compute,gradient,table1", datasets="digits,mnist5k",
                               training_seeds="0")
    jobs = sweep.jobs(config, tmp_path)
    assert max(job.train.max_steps for job in jobs) > 40_000  # DiT-4 at 537k units on digits
    assert all(job.train.epochs >= job.train.max_steps for job in jobs)


def test_a_run_its_epochs_stop_short_is_an_error(tmp_path):
    """A record counts max_steps of compute: a run that --epochs ended sooner must not be recorded."""
    model = sweep.base_model("digits")
    train = replace(sweep.training_config("table1", "digits", "fpdm", 0, model, tmp_path, quick=True),
                    global_batch_size=512, epochs=1, max_steps=50)  # one epoch of digits: a few steps at batch 512
    with pytest.raises(UserError, match="not --max_steps 50 .*--epochs 1"):
        common.train_digits_model(model, train)


def test_mnist5k_presets_are_the_shipped_models_recipe(tmp_path):
    import train
    config = sweep.SweepConfig(experiments="table1", datasets="mnist5k", training_seeds="0")
    for job in sweep.jobs(config, tmp_path):
        preset = "mnist5k.yaml" if job.name == "fpdm" else "mnist5k_dit.yaml"
        model, training, _, _ = train.parse_configs(["--config", str(common.REPO_ROOT / "configs" / preset)])
        assert model == job.model, preset
        assert (training.max_steps, training.lr, training.global_batch_size, training.dataset) == (
            job.train.max_steps, job.train.lr, job.train.global_batch_size, "mnist5k"), preset


def test_depth_experiment_trains_every_model_for_the_same_units(tmp_path):
    """The depth experiment: the FPDM (DiT-equivalent 26 iterations) and DiTs of depth 4/8/12/28, each trained for
    67,200 block-pass units per image (to within one step), budgets counted in steps of the 28-block DiT."""
    from cost import blocks_per_step, default_sampling_iters, model_architecture, training_units_per_step
    config = sweep.SweepConfig(experiments="depth,depth_smoothing", datasets="digits", training_seeds="0")
    selected = sweep.jobs(config, tmp_path)
    depth_jobs = [job for job in selected if job.experiment == "depth"]
    assert [job.name for job in depth_jobs] == ["fpdm", "dit4", "dit8", "dit12", "dit28"]
    assert [model_architecture(job.model).depth for job in depth_jobs] == [28, 4, 8, 12, 28]
    for job in depth_jobs:
        units = training_units_per_step(job.model)
        assert abs(units * job.train.max_steps - 67_200) <= units / 2, job.name
    assert default_sampling_iters(depth_jobs[0].model) == 26
    smoothing = [job for job in selected if job.experiment == "depth_smoothing"]
    assert len(smoothing) == 1 and not smoothing[0].trains and smoothing[0].train == depth_jobs[0].train
    assert blocks_per_step(sweep.reference_dit("depth", "digits"), 0) * 5 == 140


def test_depth_claims_compare_every_depth_at_equal_compute(tmp_path):
    """A --quick depth sweep (2 training seeds) through claims: each cell holds every DiT depth and the FPDM, its
    best is the lowest mean FID, the settings carry the depth and the compute per image, and the figure and
    RESULTS.md's depth table are written."""
    sweep.main(["--quick", "--out_dir", str(tmp_path), "--datasets", "digits", "--experiments",
                "depth,depth_smoothing,depth_solvers", "--training_seeds", "0,1"])
    sweep.main(["--quick", "--out_dir", str(tmp_path), "--datasets", "digits", "--experiments",
                "depth_compute,gradient", "--training_seeds", "0"])
    results_md = tmp_path / "RESULTS.md"
    written = claims.main(["--results_dir", str(tmp_path), "--include_quick", "True", "--results_md", str(results_md)])
    by_id = {c["id"]: c for c in written}
    cells = by_id["depth_every_dit"]["ours"]["digits"]
    assert [c["sampler"] for c in cells] == ["ddpm", "ddim"]
    for cell in cells:
        assert sorted(cell["fid"]) == sorted(claims.DEPTH_CONFIGS) and all(v["n"] == 2 for v in cell["fid"].values())
        assert cell["best"] == min(cell["fid"], key=lambda n: cell["fid"][n]["mean"])
        assert len(cell["fpdm_searched_iters"]) == 2 and set(cell["fpdm_searched_iters"]) <= set(sweep.DEPTH_ITERS)
    settings = by_id["depth_every_dit"]["settings"]["digits"]
    assert {n: s["dit_depth"] for n, s in settings.items()} == {"dit4": 4, "dit8": 8, "dit12": 12, "dit28": 28,
                                                               "fpdm": 28}
    target = settings["dit8"]["training_units_per_image"]  # equal training compute, to within one step of each model
    assert all(abs(s["training_units_per_image"] - target) <= s["training_units_per_image"] / s["steps"] / 2 + 1e-9
               for s in settings.values())
    block = by_id["table1_block_matched_dit28"]["ours"]["digits"]
    assert all(0 <= c["fpdm_precision"]["mean"] <= 1 and 0 <= c["dit_recall"]["mean"] <= 1 for c in block)
    assert by_id["fig4_smoothing_dit28"]["ours"]["digits"]["dit_equivalent_iters"] == 26
    assert (tmp_path / "sweep_depth_digits.png").is_file()
    for path in (tmp_path / "sweep" / "depth_solvers" / "digits").glob("*/seed0.json"):  # modern solvers, exact budgets
        rows = json.loads(path.read_text())["evaluation"]["rows"]
        assert [row["sampler"] for row in rows] == list(sweep.MODERN_SAMPLERS)
        for row in rows:
            assert row["block_matched"]["sampler"] == row["sampler"]
            assert row["block_matched"]["blocks_per_image_max"] == row["block_matched"]["planned_blocks_per_image"] \
                <= row["budget_blocks"]
    solvers = by_id["depth_every_dit_solvers"]["ours"]["digits"]
    assert [c["sampler"] for c in solvers] == list(sweep.MODERN_SAMPLERS) and (tmp_path / "sweep_depth_solvers_digits.png").is_file()
    frontier = by_id["depth_compute"]["ours"]["digits"]  # depth's level and depth_compute's four
    assert list(frontier["levels"]) == ["24k", "67k", "134k", "268k", "537k"]
    assert frontier["levels"]["537k"]["models"] == ["dit4", "dit8", "fpdm"]
    for cell in frontier["cells"]:
        assert list(cell["fid"]["fpdm"]) == list(frontier["levels"])  # 67k's DPM-Solver++ from depth_solvers
        assert list(cell["fid"]["dit8"]) == ["67k", "268k", "537k"] and "537k" not in cell["fid"]["dit28"]
        assert cell["best_dit"]["537k"] in ("dit4", "dit8")
        assert set(cell["best_dit"].values()) <= set(claims.COMPUTE_DITS)  # the phantom FPDM is not a DiT
        assert set(cell["crossover"]) == {"dit4", "best_dit", "phantom_vs_best_dit"}
        assert cell["bound_vs_lower_dit"] == []
        # The phantom-gradient FPDM: gradient's run at 67k (DDPM and DDIM only), depth_compute's at 268k.
        phantom_levels = ["67k", "268k"] if cell["sampler"] in sweep.PAPER_SAMPLERS else ["268k"]
        assert list(cell["fid"]["phantom"]) == phantom_levels
        assert list(cell["phantom_vs"]["best_dit"]) == list(cell["phantom_vs"]["fpdm"]) == phantom_levels
        against = cell["phantom_vs"]["best_dit"]["268k"]
        assert against["other"] == cell["best_dit"]["268k"] and against["b"] == cell["fid"][against["other"]]["268k"]
        assert cell["phantom_vs"]["fpdm"]["268k"]["b"] == cell["fid"]["fpdm"]["268k"]
        assert len(cell["crossover"]["phantom_vs_best_dit"]["ratios"]) == len(phantom_levels)
    assert "fpdm-134k" in by_id["depth_compute"]["settings"]["digits"]
    text = results_md.read_text()
    assert "**Training compute on digits**" in text and "**Where the FPDM overtakes the DiTs on digits**" in text
    assert "| FPDM (phantom) / best DiT by level | its crossing |" in text
    assert "[sweep_depth_compute_digits.png](sweep_depth_compute_digits.png)" in text
    assert (tmp_path / "sweep_depth_compute_digits.png").is_file()
    # The FPDM alone at 537k: compared with the best DiT at 268k (a lower bound on the ratio), outside the crossing fit.
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("dit4-537k", "dit8-537k"):
        (tmp_path / "sweep" / "depth_compute" / "digits" / name).rename(moved / name)
    alone = {c["id"]: c for c in claims.main(["--results_dir", str(tmp_path), "--include_quick", "True",
                                              "--results_md", str(results_md)])}["depth_compute"]["ours"]["digits"]
    assert alone["levels"]["537k"]["models"] == ["fpdm"]
    for cell, before in zip(alone["cells"], frontier["cells"]):
        [bound] = cell["bound_vs_lower_dit"]
        assert (bound["level"], bound["dit_level"], bound["dit"]) == ("537k", "268k", cell["best_dit"]["268k"])
        assert bound["a"] == before["fid"]["fpdm"]["537k"] and bound["b"] == before["fid"][bound["dit"]]["268k"]
        assert [r["units"] for r in cell["crossover"]["best_dit"]["ratios"]] == [
            r["units"] for r in before["crossover"]["best_dit"]["ratios"]][:-1]
    assert "537k: " in results_md.read_text() and "(FPDM alone)" in results_md.read_text()
    # DiTs trained at a level before the FPDM (its depth_compute runs not done): no frontier from depth's level alone.
    for path in (tmp_path / "sweep" / "depth_compute" / "digits").glob("fpdm-*"):
        path.rename(moved / path.name)
    (tmp_path / "sweep_loss_depth_compute_digits.png").unlink()
    dits_only = {c["id"]: c for c in claims.main(["--results_dir", str(tmp_path), "--include_quick", "True",
                                                  "--results_md", str(results_md)])}["depth_compute"]
    assert "digits" not in dits_only["ours"] and "**Training compute on digits**" not in results_md.read_text()
    assert not (tmp_path / "sweep_loss_depth_compute_digits.png").exists()  # no figure RESULTS.md would not link
    gradients = by_id["gradient_methods"]["ours"]["digits"]  # S-JFB is the depth experiment's FPDM (2 seeds)
    for cell in gradients["cells"]:
        assert cell["fid"]["sjfb"]["n"] == 2 and cell["fid"]["phantom"]["n"] == cell["fid"]["ift"]["n"] == 1
        assert set(cell["vs_sjfb"]) == {"phantom", "ift"} and cell["best"] == min(
            cell["fid"], key=lambda n: cell["fid"][n]["mean"])
    memory, cost = gradients["step_memory"], gradients["training_cost"]
    assert memory["ift"]["saved_activation_mb"] < memory["phantom"]["saved_activation_mb"] < \
        memory["sjfb"]["saved_activation_mb"]  # one evaluation < 5 damped steps < 12 iterations
    assert cost["sjfb"]["units_per_step"]["mean"] == 31.5 and cost["ift"]["units_per_step"]["mean"] == 27.0
    assert "**Training gradients on digits**" in text
    assert "**Depth at equal training compute on digits**" in results_md.read_text()
    from experiments import export_models  # the depth pair ships beside table1's, named apart from it
    shipped = export_models.main(["--quick", "--out_dir", str(tmp_path), "--dataset", "digits", "--experiment", "depth"])
    assert sorted(shipped["models"]) == ["dit28", "fpdm"]
    for name, model in shipped["models"].items():
        assert Path(model["exported_to"]) == tmp_path / "pretrained" / f"{name}-digits-depth.safetensors"
        assert common.load(model["exported_to"]).config.depth == 28
    assert json.loads((tmp_path / "export_digits_depth.json").read_text())["experiment"] == "depth"
