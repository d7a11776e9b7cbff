"""Ship a dataset's Table-1 models from the sweep: the EMA weights of training seed 0 of experiments/sweep.py's
table1 DiT and FPDM (trained at equal training compute with the paper's S-JFB M = N = 12), as fp16 safetensors in
pretrained/<model>-<dataset>.safetensors; with --experiment depth, the depth experiment's 28-block DiT and FPDM (the
paper's depth ratio) as pretrained/<model>-<dataset>-depth.safetensors. Checked after export:
  * unguided samples at the Table-1 protocol (DDPM, no guidance, 20 DiT steps' worth of blocks, the FPDM with
    solution reuse at its Table-1 iterations): FID on the dataset's classifier features and classifier accuracy;
  * `sample.py --ckpt <file>` as a user runs it (its defaults: guidance 4): classifier accuracy, and its grid is
    copied to experiments/results/<model>-<dataset>-grid.png for the README.
Writes experiments/results/export_<dataset>.json (export_<dataset>_depth.json).

    python -m experiments.export_models --dataset mnist5k
    python -m experiments.export_models --dataset mnist5k --experiment depth
    python -m experiments.export_models --quick --out_dir /tmp/export   # after a --quick sweep into the same folder
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

import cli
import sample
from config import UserError, flag
from experiments import common, sweep

NAME = "export_models"
CHECK_SAMPLES, CHECK_SAMPLES_QUICK = 500, 8
USER_SAMPLES = 100  # sample.py --num_samples for the guided check (its defaults otherwise)
SHIPPED = {"table1": ("dit", "fpdm"), "depth": ("dit28", "fpdm")}  # the pair each experiment ships


@dataclass
class ExportConfig(common.ExperimentConfig):
    """Flags of export_models."""
    dataset: str = flag("mnist5k", "Dataset whose models (training seed 0) are shipped.", choices=tuple(sweep.RECIPES))
    experiment: str = flag("table1", "The sweep experiment whose pair is shipped: table1 (the dataset's DiT and "
                                     "FPDM) or depth (the 28-block DiT and the FPDM, the paper's depth ratio).",
                           choices=tuple(SHIPPED))
    export_dir: str = flag("", "Where the weights go ('': pretrained/; --quick: <out_dir>/pretrained).")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    config, run = common.start(NAME, ExportConfig, __doc__, argv)
    export_dir = Path(config.export_dir or (run.out_dir / "pretrained" if config.quick else common.PRETRAINED_DIR))
    sweep_config = sweep.SweepConfig(quick=config.quick, experiments=config.experiment, datasets=config.dataset,
                                     training_seeds="0", configurations=",".join(SHIPPED[config.experiment]))
    suffix = "" if config.experiment == "table1" else f"-{config.experiment}"  # table1's files keep their names
    records = {}
    for job in sweep.jobs(sweep_config, run.out_dir):
        run_dir = common.finished_run(job.model, job.train)
        if run_dir is None:
            raise UserError(f"--dataset {config.dataset}: {job.train.output_dir}/{job.train.output_subdir} is not a "
                            f"finished run; run python -m experiments.sweep --experiments {config.experiment} "
                            f"--datasets {config.dataset} first")
        path = common.export_ema(run_dir, export_dir / f"{job.name}-{config.dataset}{suffix}.safetensors")
        records[job.name] = {"run_dir": str(run_dir), "exported_to": str(path),
                             "size_bytes": path.stat().st_size, **check(path, job, config, run.out_dir, suffix)}
        print(f"{job.name}: {path} ({path.stat().st_size / 1e6:.1f} MB); unguided accuracy "
              f"{records[job.name]['unguided']['accuracy_mean']:.3f}, FID {records[job.name]['unguided']['fid_mean']:.2f};"
              f" sample.py accuracy {records[job.name]['sample_py']['accuracy']:.3f}")
    payload = {"dataset": config.dataset, "experiment": config.experiment, "quick": config.quick, "models": records,
               "evaluator": sweep.evaluator(config.dataset).describe()}
    common.write_result(replace(run, name=f"export_{config.dataset}{suffix.replace('-', '_')}"), payload)
    return payload


def check(path: Path, job: sweep.Job, config: ExportConfig, out_dir: Path, suffix: str) -> dict[str, Any]:
    """The exported file's unguided Table-1 numbers and what `sample.py --ckpt <file>` draws."""
    loaded, score = common.load(path), sweep.evaluator(job.dataset)
    blocks, _ = sweep.dit_budgets(job, 20)
    setting = replace(common.EVALUATION_SAMPLING, budget=blocks)
    if loaded.config.fixed_point:  # the iterations its Table-1 search chose most often at this budget, with reuse
        setting = replace(setting, fixed_point_iters=table1_iters(job, out_dir), fixed_point_reuse_solution=True)
    count = CHECK_SAMPLES_QUICK if config.quick else CHECK_SAMPLES
    unguided = common.evaluate_setting(loaded, score, setting, count, [0])

    folder = out_dir / "runs" / NAME / f"{job.name}-{job.dataset}{suffix}"
    shutil.rmtree(folder, ignore_errors=True)  # this script's own scratch folder
    num = CHECK_SAMPLES_QUICK if config.quick else USER_SAMPLES
    extra = ["--num_sampling_steps", "10"] if config.quick else []
    sample.main(["--ckpt", str(path), "--output_dir", str(folder), "--num_samples", str(num), *extra])
    images = np.stack([np.array(Image.open(folder / f"{i:06d}.png").convert("RGB")) for i in range(num)])
    labels = np.arange(num) % 10  # sample.py cycles the classes
    grid = out_dir / f"{job.name}-{job.dataset}{suffix}-grid.png"
    shutil.copyfile(folder / "grid.png", grid)
    return {"unguided": {k: v for k, v in unguided.items() if k != "per_seed"},
            "sample_py": {"command": f"python sample.py --ckpt {path}", "num_samples": num,
                          "accuracy": score(images, labels)["accuracy"],
                          "grid": str(grid)}}


def table1_iters(job: sweep.Job, out_dir: Path) -> int:
    """The FPDM's iterations per step chosen for DDPM at 20 DiT steps in its table1 result (seed 0)."""
    from records import read_json
    result = read_json(job.result_path(out_dir), flag="--out_dir")
    rows = [r for r in result["evaluation"]["rows"] if r["sampler"] == "ddpm"]
    return rows[-1]["block_matched"]["best_iters"]


if __name__ == "__main__":
    cli.run(main)
